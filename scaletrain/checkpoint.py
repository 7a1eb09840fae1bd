"""Checkpoints: atomic save, discovery of the latest one, load for resume.

A checkpoint is one file `<run_dir>/checkpoints/step_XXXXXXX.pt` holding model, optimizer, scheduler,
data-loader state, RNG states, step, tokens seen and the resolved config. It is written to a
temporary file in the same folder, fsynced, then renamed: a crash mid-write leaves the previous
checkpoint untouched and never a truncated file under a checkpoint name.

Not here (yet): sharded FSDP checkpoints via torch.distributed.checkpoint.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Atomically write `state` as the checkpoint of `step`; keep the `keep` newest ones (0 = all)."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step:07d}.pt"
    tmp = ckpt_dir / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left over if the write failed
    if keep > 0:
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints in `ckpt_dir`, oldest first (temporary files are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """Map `train.resume` to a checkpoint file: none -> None, auto -> latest in run_dir (or None),
    PATH -> that file, or the latest checkpoint in that run directory / checkpoints folder."""
    if resume == "none":
        return None
    if resume == "auto":
        ckpts = list_checkpoints(Path(run_dir) / CKPT_DIR)
        return ckpts[-1] if ckpts else None
    path = Path(resume).expanduser()
    if path.is_file():
        return path
    for folder in (path / CKPT_DIR, path):
        ckpts = list_checkpoints(folder)
        if ckpts:
            return ckpts[-1]
    raise FileNotFoundError(
        f"train.resume={resume!r}: no checkpoint found; expected a step_*.pt file, a run directory "
        f"with {CKPT_DIR}/step_*.pt, or 'auto' / 'none'"
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only=False: the state holds RNG tuples and numpy arrays; checkpoints are our own files.
    return torch.load(path, map_location="cpu", weights_only=False)
