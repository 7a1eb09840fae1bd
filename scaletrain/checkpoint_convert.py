"""Convert a sharded (DCP) checkpoint folder into one full checkpoint file:

    python -m scaletrain.checkpoint_convert RUN/checkpoints/step_0001000 step_0001000.pt

The folder is verified first (every file against its manifest, `.metadata` against the allowlist); then DCP's
`dcp_to_torch_save` gathers every shard into whole tensors, and the file is written as the full format is:
model, optimizer (keyed by parameter name, as FSDP2 gathers it), and the folder's `extra.pt` (scheduler,
loader position, RNG, step, config, ...), with its digest, atomically. `load_checkpoint`
accepts it, and `train.resume=FILE` continues training from it on any number of ranks (one process included).
It holds the whole model and optimizer state: the machine that converts needs that much memory and twice that
much free disk (DCP's plain file, then the checksummed one). Not here: the formats themselves (`checkpoint.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from scaletrain import checkpoint as ckpt
from scaletrain.records import is_sharded_checkpoint


def convert(sharded: Path, out: Path) -> Path:
    """Write the sharded checkpoint folder `sharded` as one full checkpoint file `out` (which must not exist)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    sharded, out = Path(sharded), Path(out)
    if not is_sharded_checkpoint(sharded):
        raise ckpt.CheckpointError(f"{sharded}: not a sharded checkpoint folder (no .metadata and extra.pt in it)")
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it first, or name another file")
    extra = ckpt.load_checkpoint(sharded)  # verified: extra.pt's digest, .metadata, the shard files present
    ckpt.verify_all_items(sharded)  # this process reads every item: it checks every one
    plain = out.parent / f".{out.name}.dcp.tmp"  # hidden, beside the result: the same disk
    try:
        with ckpt._single_process_is_intended():
            dcp_to_torch_save(sharded, plain)  # every shard read in this one process: whole tensors
        shards: dict[str, Any] = torch.load(plain, map_location="cpu", weights_only=True, mmap=True)
        ckpt.save_weights(out, {**extra, "model": shards["model"], "optimizer": shards["optimizer"]})
    finally:
        plain.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scaletrain.checkpoint_convert", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("sharded", help="a sharded checkpoint folder (checkpoints/step_XXXXXXX/)")
    parser.add_argument("out", help="the full checkpoint file to write (.pt; must not exist)")
    args = parser.parse_args(argv)
    try:
        out = convert(Path(args.sharded), Path(args.out))
    except (ckpt.CheckpointError, OSError) as err:  # NoSpaceError and FileExistsError are OSErrors
        print(f"convert error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (resume with train.resume={out}, on any number of ranks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
