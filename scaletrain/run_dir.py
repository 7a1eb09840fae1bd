"""The run folder of one training run: who owns it, what it records, and its status.

`RunFolder` is the one writer of status.json (the states of `records.RunState`, one vocabulary) and the one place
that decides what the folder holds at the start of a run: rank 0 holds the folder's lease (lease.py: one process
per run folder) before anything is written; a fresh run refuses another run's records unless `train.overwrite=true`
(which deletes every one, records.RUN_RECORDS); leftovers of writes and checkpoint saves that a kill cut short are
removed; the records a run starts with (config, versions, hardware, tokenizer) and ends with (summary) are written
by rank 0. File names and formats are the contracts of records.py; the readers (report, study, runs) never write
here. Not here: checkpoints themselves (checkpoint.py), metrics (metrics.py), the lock itself (lease.py).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from scaletrain import checkpoint as ckpt
from scaletrain import distributed, records
from scaletrain.config import Config
from scaletrain.data import Tokenizer
from scaletrain.lease import CLUSTER_WAIT_S, Lease
from scaletrain.metrics import truncate_metrics, write_run_record
from scaletrain.records import RunState, Summary

log = logging.getLogger("scaletrain")


class RunFolder:
    """One run's folder, seen from one rank (`is_main`: rank 0, which writes the records)."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = Path(path), is_main
        self.path.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lease(self, launcher: str) -> Iterator[None]:
        """Rank 0 holds the folder's lease for the block (the whole job): call it before anything is written. A
        live holder elsewhere is refused (lease.RunFolderBusy, naming it); a dead one's lease is taken over; inside
        a scheduler's job the run first waits `CLUSTER_WAIT_S` for it (an NFS server's lock recovery after a node
        crash). Once the folder is ours, temporary files of writes killed midway are removed."""
        if not self.is_main:
            yield
            return
        wait_s = CLUSTER_WAIT_S if distributed.in_cluster_job() else 0.0
        with Lease(self.path).acquire(launcher, wait_s):
            self.remove_write_leftovers()
            yield

    def remove_write_leftovers(self) -> None:
        """The temporary files of `records.atomic_write`s killed midway beside the run's records (status.json,
        model.pt, summary.json, ...: every record sits at the folder's top level; checkpoints/ has its own clean-up,
        `remove_save_leftovers`): nobody else writes here while this process holds the lease."""
        for path in sorted(self.path.glob(".*.tmp")):
            if path.is_file() and records.ATOMIC_TMP.match(path.name):
                path.unlink(missing_ok=True)
                log.warning("removed %s: left by a write that did not finish", path)

    def claim(self, cfg: Config) -> None:
        """A fresh run (train.resume=none, outside a scheduler's job) must not mix with another run's records:
        refuse (records.RunDirInUse, before anything is written) unless train.overwrite=true, which deletes every
        record of the previous run (records.RUN_RECORDS, model.pt and eval.json included)."""
        if cfg.train.resume != "none" or distributed.in_cluster_job():
            return
        found = records.check_run_dir_free(self.path, cfg.train.overwrite)
        if found and self.is_main:
            deleted = [self.path / name for name in records.RUN_RECORDS if (self.path / name).exists()]
            for path in deleted:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            names = ", ".join(p.name for p in deleted)
            log.warning("train.overwrite=true: deleted another run's records in %s (%s)", self.path, names)

    def status(self, state: RunState, step: int, error: BaseException | None = None, any_rank: bool = False) -> None:
        """status.json, by rank 0; `any_rank`: by whichever rank calls (an exception on any rank is news)."""
        if self.is_main or any_rank:
            records.write_status(self.path, state, step, error)

    def start_records(self, cfg: dict[str, Any], device: torch.device, cluster: dict[str, Any]) -> None:
        """config.json and run_info.json (git SHA, versions, hardware) as the run starts."""
        if self.is_main:
            write_run_record(self.path, cfg, device, cluster)

    def save_tokenizer(self, tokenizer: Tokenizer) -> None:
        """tokenizer.json: with model.pt, what sampling and evaluation of the finished run need (runs.py)."""
        if self.is_main:
            tokenizer.save(self.path / records.TOKENIZER_FILE)

    def remove_save_leftovers(self) -> None:
        if self.is_main:
            for path in ckpt.remove_leftovers(self.path / records.CKPT_DIR):
                log.warning("removed %s: left by a checkpoint save that did not finish", path)

    def truncate_metrics(self, step: int) -> None:
        """metrics.jsonl keeps the records up to `step` (a resumed run rewrites what came after; -1: none)."""
        if self.is_main:
            truncate_metrics(self.path, step)

    def wandb_id(self) -> str | None:
        return records.read_wandb_id(self.path)

    def save_wandb_id(self, wandb_id: str | None) -> None:
        if self.is_main and wandb_id:
            records.atomic_write(self.path / records.WANDB_ID_FILE, wandb_id)

    def finish(self, summary: Summary) -> None:
        """summary.json, then status finished: a reader that sees `finished` finds the summary."""
        if self.is_main:
            records.write_summary(self.path, summary)
            records.write_status(self.path, RunState.finished, summary.step)
