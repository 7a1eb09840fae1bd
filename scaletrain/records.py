"""The record contracts every writer (trainer, checkpoint, metrics) and reader (report, tests) shares.

Here: the file names of a run directory, the run states of `status.json` with its writer and reader,
the fields of `summary.json` (`Summary`), checkpoint names and their discovery, the metric keys that
more than one module reads, and `atomic_write`, the one way a record is written. A reader never
spells a file name, state, field or key itself: it imports it from here, so a writer and a reader
cannot disagree.
Not here: what to log and when (trainer.py), checkpoint contents and formats (checkpoint.py), how a
sweep's jobs are judged from these records (scaletrain/report/collect.py). No torch import: the report reads records
without loading torch.

A run directory holds:
    config.json      the resolved config                          (metrics.write_run_record)
    run_info.json    git SHA, versions, hardware, cluster         (metrics.write_run_record)
    metrics.jsonl    one JSON object per logged step, "step" key  (metrics.MetricsLogger)
    status.json      RunState, step, pid, host, error             (write_status, every state change)
    summary.json     Summary, written once the run has finished   (write_summary)
    wandb_id         the folder's one W&B run id                  (trainer, when W&B is on)
    tokenizer.json   the run's tokenizer                           (trainer, at the start)
    model.pt         final weights, step and config, checksummed   (trainer, when the run finishes)
    eval.json        metrics of `python -m scaletrain.eval`        (scaletrain.eval)
    checkpoints/     step_XXXXXXX.pt files and step_XXXXXXX/ DCP folders; hidden names (.*) are
                     temporary and never a checkpoint
    .lease           the lock of the process that owns the folder, JSON naming it (scaletrain/lease.py)
    .<name>.<pid>-<hex>.tmp   an `atomic_write` in progress, or a leftover of one killed midway (ATOMIC_TMP)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import socket
import time
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

from scaletrain.config import BadInput, suggest

# ----------------------------------------------------------------------------------------------------
# File names of a run directory

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"
CKPT_DIR = "checkpoints"
TOKENIZER_FILE = "tokenizer.json"  # the run's tokenizer: sample/eval need no data folder or cache
MODEL_FILE = "model.pt"  # the final weights (model state, step, config; checksummed), written when the run ends
EVAL_FILE = "eval.json"  # what `python -m scaletrain.eval` measured
WANDB_ID_FILE = "wandb_id"  # a resumed attempt logs into the same W&B run, even one killed before any checkpoint
LEASE_FILE = ".lease"  # one process per run folder: an OS lock on it, never deleted (lease.py); not a record
# every record of a run, what train.overwrite=true deletes (W&B's own wandb/ folder stays: one subfolder per W&B
# run, nothing mixes, and an offline run there may not be synced yet)
RUN_RECORDS = (
    CONFIG_FILE,
    RUN_INFO_FILE,
    METRICS_FILE,
    STATUS_FILE,
    SUMMARY_FILE,
    CKPT_DIR,
    TOKENIZER_FILE,
    MODEL_FILE,
    EVAL_FILE,
    WANDB_ID_FILE,
)

# ----------------------------------------------------------------------------------------------------
# Metric keys read by more than one module (metrics.jsonl records and W&B)

STEP = "step"  # every metrics.jsonl record carries it
TRAIN_LOSS = "train/loss"
TRAIN_TOKENS = "train/tokens"  # tokens seen so far (all ranks)
VAL_LOSS = "val/loss"
VAL_BPB = "val/bpb"
PERF_TOKENS_PER_S = "perf/tokens_per_s"
PERF_STEP_S = "perf/step_s"  # mean seconds per optimizer step since the previous train record
PERF_MFU = "perf/mfu"
MOE_LOAD_MAX_OVER_MEAN = "moe/load_max_over_mean"  # max over MoE layers; 1 = balanced
SAMPLES = "samples"


def source_metric(source: str, what: str) -> str:
    """`val/<source>/<what>`: a validation metric of one data source (loss, bpb, exact_match)."""
    return f"val/{source}/{what}"


# lm-evaluation-harness results (scaletrain.harness): downstream/<task>/<metric>, /<filter> appended unless the
# harness's filter is "none", and the harness's standard error of each as <key>_stderr
DOWNSTREAM = "downstream/"
STDERR = "_stderr"
# the harness's metrics where lower is better (its registry marks every other one, acc, exact_match, f1, ..., higher)
DOWNSTREAM_LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def downstream_metric(task: str, metric: str, filt: str = "none") -> str:
    return f"{DOWNSTREAM}{task}/{metric}" + ("" if filt == "none" else f"/{filt}")


def downstream_higher_is_better(key: str) -> bool:
    """The direction of a downstream/... key (its `_stderr` too): the harness's for its metric."""
    parts = key.split("/")
    return (parts[2] if len(parts) > 2 else "").removesuffix(STDERR) not in DOWNSTREAM_LOWER_IS_BETTER


# ----------------------------------------------------------------------------------------------------
# Atomic writes


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (POSIX: the directory itself must be fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write `data` (bytes, UTF-8 text, or a function writing to a binary file, e.g.
    `lambda f: torch.save(state, f)`) to `path` so a reader sees the old file or the whole new one,
    never a part: a hidden temporary file in the same folder, fsynced, renamed over `path`, folder
    fsynced. If writing raises, `path` is untouched and the temporary file is removed."""
    path = Path(path)
    # unique per writer (process and call), so ranks or threads writing the same record never collide
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if the write failed
    fsync_dir(path.parent)
    return path


# the names `atomic_write` gives its temporary files: what a write killed midway leaves behind
ATOMIC_TMP = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp$")


def finite_or_none(obj: Any) -> Any:
    """`obj` with every NaN/Inf float replaced by None, so JSON writers emit `null` (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def to_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON: NaN/Inf become null (json.dumps would write the non-standard NaN / Infinity)."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, to_json(obj, indent=2) + "\n")


def _read_json(path: Path) -> Any:
    """The parsed file, None when it does not exist; ValueError when it is not JSON."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None


# ----------------------------------------------------------------------------------------------------
# status.json: what a run says about itself


class RunState(StrEnum):
    """Every state a run writes to status.json."""

    running = "running"  # at start and on every logging step
    finished = "finished"  # after summary.json was written
    failed = "failed"  # an exception ended the run; `error` and `traceback` say which
    interrupted = "interrupted"  # Ctrl-C, or preempted with no requeue (checkpoint saved)
    requeued = "requeued"  # preempted, checkpoint saved, job back in the scheduler's queue to resume


@dataclass(frozen=True)
class Status:
    """The content of status.json."""

    state: RunState
    step: int = 0
    pid: int | None = None
    host: str | None = None
    updated_at: str | None = None
    error: str | None = None  # "ExceptionType: message"
    traceback: str | None = None

    @classmethod
    def from_dict(cls, d: Any) -> Status:
        if not isinstance(d, dict) or "state" not in d:
            raise ValueError(f"a status needs a 'state' (one of {[s.value for s in RunState]}); got {d!r}")
        try:
            state = RunState(d["state"])
        except ValueError:
            raise ValueError(f"unknown run state {d['state']!r}; known: {[s.value for s in RunState]}") from None
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(state, **{k: v for k, v in d.items() if k in fields and k != "state"})


def write_status(
    run_dir: str | os.PathLike, state: RunState | str, step: int, error: BaseException | None = None
) -> Status:
    """Atomically write status.json, so a sweep report can tell a failed, stopped or requeued job from a
    running one without reading logs. A state that is not a RunState is a ValueError."""
    status = Status(RunState(state), step, os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if error is not None:
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        status = dataclasses.replace(status, error=message, traceback="".join(traceback.format_exception(error)))
    write_json(Path(run_dir) / STATUS_FILE, {k: v for k, v in dataclasses.asdict(status).items() if v is not None})
    return status


def read_status(run_dir: str | os.PathLike) -> Status | None:
    """status.json of `run_dir`; None when there is none, ValueError when it is not a status."""
    d = _read_json(Path(run_dir) / STATUS_FILE)
    return None if d is None else Status.from_dict(d)


# ----------------------------------------------------------------------------------------------------
# summary.json: the result of a finished run


@dataclass(frozen=True)
class Summary:
    """summary.json: what a finished run reports (also W&B's run summary). Every field is written."""

    step: int
    tokens_seen: int
    val_loss: float
    val_bpb: float
    params_total: int
    params_active: int  # per token (MoE: shared + top_k experts)
    params_embedding: int
    params_non_embedding: int
    flops_per_token: float
    flops: float  # flops_per_token * tokens_seen
    wallclock_s: float  # training time over every attempt of the run (resumes included)
    run_name: str
    wandb_id: str | None
    # every final validation metric as metrics.jsonl names it: val/loss, val/<source>/exact_match, ...
    val: dict[str, float | None] = dataclasses.field(default_factory=dict)
    # every final lm-evaluation-harness metric: downstream/<task>/<metric>[/<filter>], each with its <key>_stderr
    downstream: dict[str, float | None] = dataclasses.field(default_factory=dict)
    # Newton-Schulz FLOPs of Muon over the run (0 for AdamW; model FLOPs are `flops`); None: written before it was
    optimizer_flops: float | None = None
    cpu_s: float | None = None  # CPU seconds of the (rank-0) training process, all threads, over every attempt
    # the dtype of the residual stream as the first block received it ("float32", "bfloat16"): under bf16 it is
    # bf16 with FSDP2 (bf16 parameters) or a W_e projection (autocast), fp32 otherwise. Runs that differ in it
    # are different experiments: the report refuses to compare them. None: written before it was recorded
    residual_dtype: str | None = None

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def numeric_fields(cls) -> tuple[str, ...]:
        """The fields that hold a number (all but run_name, wandb_id, val and downstream): what a report can average
        over seeds and compare, and so what a summary field named at run time (a report metric) may be."""
        hints = typing.get_type_hints(cls)
        return tuple(name for name in cls.fields() if hints[name] in (int, float, float | None))

    @classmethod
    def check_field(cls, name: str, numeric: bool = False) -> str:
        """`name` when it is a field (`numeric`: one holding a number); otherwise a ValueError naming the nearest
        valid field. For a field chosen by name at run time: a typo must not read as a missing value."""
        options = list(cls.numeric_fields() if numeric else cls.fields())
        if name not in options:
            what = "numeric summary field" if numeric else "summary field"
            raise ValueError(f"{name!r} is no {what}{suggest(name, options)}; the {what}s: {', '.join(options)}")
        return name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """One level: every field but the dicts in field order, then val's and downstream's metrics under their own
        keys (runs.csv)."""
        return {**{k: v for k, v in self.to_dict().items() if not isinstance(v, dict)}, **self.val, **self.downstream}

    @classmethod
    def from_dict(cls, d: Any) -> Summary:
        """Unknown keys are ignored (a newer writer); a missing field is a ValueError naming it."""
        if not isinstance(d, dict):
            raise ValueError(f"a summary is a JSON object; got {type(d).__name__}")
        # fields with a default (val, downstream, optimizer_flops, cpu_s) came later: older summaries still read
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"summary lacks {missing}")
        return cls(**{k: d[k] for k in cls.fields() if k in d})


def write_summary(run_dir: str | os.PathLike, summary: Summary) -> Path:
    return write_json(Path(run_dir) / SUMMARY_FILE, summary.to_dict())


def read_summary(run_dir: str | os.PathLike) -> Summary | None:
    """summary.json of `run_dir`; None when there is none (the run has not finished), ValueError when
    it is not a Summary."""
    d = _read_json(Path(run_dir) / SUMMARY_FILE)
    return None if d is None else Summary.from_dict(d)


# ----------------------------------------------------------------------------------------------------
# Checkpoint names

_CKPT_NAME = re.compile(r"^step_(\d+)(\.pt)?$")
FULL_SUFFIX = ".pt"
DCP_METADATA = ".metadata"  # written last by torch.distributed.checkpoint
SHARDED_EXTRA = "extra.pt"  # the non-tensor state beside the shards of a sharded checkpoint


def checkpoint_name(step: int, sharded: bool) -> str:
    """`step_0000020.pt` (full: one file) or `step_0000020` (sharded: a DCP folder)."""
    return f"step_{step:07d}" + ("" if sharded else FULL_SUFFIX)


def checkpoint_step(name: str) -> int | None:
    """The step a checkpoint name stands for; None for any other name (temporary files are hidden)."""
    m = _CKPT_NAME.match(name)
    return int(m.group(1)) if m else None


def is_sharded_checkpoint(path: Path) -> bool:
    """A complete DCP folder: its metadata and the extra state are both there."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / SHARDED_EXTRA).is_file()


def is_checkpoint(path: Path) -> bool:
    """A complete checkpoint under a checkpoint name: a step_*.pt file or a complete step_* folder."""
    path = Path(path)
    if checkpoint_step(path.name) is None:
        return False
    return path.is_file() if path.name.endswith(FULL_SUFFIX) else is_sharded_checkpoint(path)


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `ckpt_dir` (files and sharded folders), oldest step first; temporary and
    incomplete ones are left out. A run directory's folder is `run_dir / CKPT_DIR`."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(checkpoint_step(p.name), p.name, p) for p in ckpt_dir.iterdir() if is_checkpoint(p)]
    return [p for _, _, p in sorted(found)]


def read_wandb_id(run_dir: str | os.PathLike) -> str | None:
    """The W&B run id an earlier attempt in `run_dir` logged to, if any."""
    try:
        return (Path(run_dir) / WANDB_ID_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


class RunDirInUse(BadInput, ValueError):
    """A fresh run was pointed at a folder holding another run's records."""

    kind = "run folder"


def check_run_dir_free(run_dir: str | os.PathLike, overwrite: bool) -> list[Path]:
    """The records of another run in `run_dir` (metrics.jsonl, summary.json, checkpoints, model.pt) that a fresh run
    would mix with; RunDirInUse, naming them and the ways on, when there are some and `overwrite` is off."""
    run_dir = Path(run_dir)
    found = [p for p in (run_dir / METRICS_FILE, run_dir / SUMMARY_FILE) if p.is_file()]
    found += list_checkpoints(run_dir / CKPT_DIR)
    found += [p for p in (run_dir / MODEL_FILE,) if p.is_file()]  # the final weights, even without the rest
    if found and not overwrite:
        names = ", ".join(str(p.relative_to(run_dir)) for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunDirInUse(
            f"{run_dir} holds another run's records ({names}): continue that run with train.resume=auto, "
            "delete them and start over with train.overwrite=true, or use another folder (hydra.run.dir=...)"
        )
    return found
