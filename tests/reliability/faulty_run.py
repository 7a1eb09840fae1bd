"""`python -m scaletrain.run` with one fault injected, for the kill trials of test_kill.py:

    KILL_AT_SAVE=N python tests/reliability/faulty_run.py <overrides>

The Nth checkpoint save writes half of its file under the save's temporary name (a sharded save: after every
shard was written, in the middle of its extra.pt) and then the process SIGKILLs itself: exactly what a
kill -9, an out-of-memory kill or a node failure in the middle of torch.save leaves behind. The fault lives
here, not in scaletrain, so the product has no test hooks."""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from scaletrain import checkpoint, records

_saves = 0


def _dies_in_the_middle(path: Path, state: dict[str, Any]) -> None:
    global _saves
    _saves += 1
    if _saves < int(os.environ["KILL_AT_SAVE"]):
        return _real(path, state)

    def half_then_kill(f) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        f.write(buf.getvalue()[: buf.tell() // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    records.atomic_write(path, half_then_kill)


_real = checkpoint._save_verified
checkpoint._save_verified = _dies_in_the_middle

if __name__ == "__main__":
    from scaletrain.run import cli

    sys.argv[0] = "scaletrain.run"
    cli()
