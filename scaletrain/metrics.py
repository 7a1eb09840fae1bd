"""Run records and metric sinks: run_info.json, metrics.jsonl, W&B, and the MFU denominator.

Here: `write_run_record` (resolved config, git SHA, package versions, hardware), `MetricsLogger`
(one JSON object per logged step in metrics.jsonl, mirrored to W&B; `finish()` always closes the W&B
run so multirun jobs never share one), `truncate_metrics` (a resumed run drops records after its
checkpoint), `check_wandb` (an online W&B run can log in: run.py asks before data preparation).
Hardware facts (CPU model and flags, GPU, peaks) come from `hardware.py`.
Not here: what to log and when (that is the trainer's loop); file names, status.json and summary.json
(`records.py`, the contracts shared with the report).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

from scaletrain import records
from scaletrain.config import BadInput
from scaletrain.data import unreachable
from scaletrain.hardware import hardware_info

_PACKAGES = ("torch", "numpy", "hydra-core", "omegaconf", "datasets", "tokenizers", "wandb", "submitit")


class WandbUnavailable(BadInput, RuntimeError):
    """logging.wandb.mode=online cannot work on this machine: no API key, or the W&B server is unreachable."""

    kind = "wandb"


def check_wandb(wandb_cfg: Any, timeout_s: float = 5.0) -> None:
    """Before any data or model work: an online W&B run needs an API key (wandb's own lookup: WANDB_API_KEY,
    ~/.netrc; on a terminal it asks for one) and a reachable server. Without these `wandb.init` fails, or
    retries for minutes, only after data preparation and model setup."""
    if str(wandb_cfg.mode) != "online":
        return
    import wandb
    from wandb.errors import UsageError

    fix = "or use logging.wandb.mode=offline (upload later with `wandb sync <run dir>/wandb`) or disabled"
    try:
        wandb.login(verify=False)  # checks that a key is configured; the server is not contacted
    except UsageError as err:
        raise WandbUnavailable(f"logging.wandb.mode=online: {err} Set WANDB_API_KEY, {fix}") from None
    endpoint = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
    failure = unreachable(endpoint, timeout_s)
    if failure:
        raise WandbUnavailable(
            f"logging.wandb.mode=online: cannot reach the W&B server at {endpoint} ({failure}) within "
            f"{timeout_s:g} s; check the network or WANDB_BASE_URL, {fix}"
        )


def git_sha(repo: Path | None = None) -> str:
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["torch"] = torch.__version__
    return out


def write_run_record(
    run_dir: Path, config: dict, device: torch.device, cluster: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write run_info.json (git SHA, versions, hardware, where the job ran: launcher, ranks, SLURM job
    ids, log files; see distributed.cluster_env) and config.json (resolved config)."""
    record = {
        "git_sha": git_sha(),
        "versions": versions(),
        "hardware": hardware_info(device),
        "cluster": cluster or {},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    records.write_json(Path(run_dir) / records.CONFIG_FILE, config)
    records.write_json(Path(run_dir) / records.RUN_INFO_FILE, record)
    return record


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop the metrics.jsonl records written after the checkpoint of `step`, so the file reads
    as one run; a half-written last line (the process was killed mid-write) goes too. Atomic: a crash here
    leaves the old file."""
    path = Path(run_dir) / records.METRICS_FILE
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get(records.STEP, 0) <= step:
            keep.append(line + "\n")
    records.atomic_write(path, "".join(keep))


def default_group(config: dict, run_dir: Path) -> str | None:
    """W&B group of a run with an experiment recipe: `<experiment>-<sweep id>`, where the sweep id is the
    name of the sweep folder (`multirun/<date>/<time>/<job>` -> `<date>_<time>`), so the jobs of one sweep
    share a group and reruns of the same recipe do not mix with it."""
    experiment = config.get("experiment")
    if not experiment:
        return None
    sweep = Path(run_dir).resolve().parent
    return f"{experiment}-{sweep.parent.name}_{sweep.name}"


def config_tags(config: dict) -> list[str]:
    """Tags that make runs filterable by the main axes of an ablation."""
    keys = (("model", "name"), ("moe", "name"), ("optim", "name"), ("data", "name"))
    return [f"{group}={config[group][key]}" for group, key in keys if group in config]


# summary.json fields that W&B already has as the last value of a logged metric (or as its own _step); checked
# against records.Summary at import, so a misspelt field cannot silently send a second copy
_LOGGED_AS = {
    records.Summary.check_field(name): key
    for name, key in {
        "val_loss": records.VAL_LOSS,
        "val_bpb": records.VAL_BPB,
        "tokens_seen": records.TRAIN_TOKENS,
        "step": "_step",
    }.items()
}


def wandb_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json's fields for W&B's run summary, without a second copy of what was logged as a metric."""
    return {k: v for k, v in summary.items() if k not in _LOGGED_AS}


class MetricsLogger:
    """metrics.jsonl + W&B. Only the rank that owns logging constructs one."""

    def __init__(self, run_dir: Path, wandb_cfg: Any, config: dict, run_name: str, run_id: str | None):
        self.run_dir = Path(run_dir)
        self._jsonl = open(self.run_dir / records.METRICS_FILE, "a", buffering=1)
        self.wandb_run = None
        if str(wandb_cfg.mode) != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                mode=cast(Literal["online", "offline", "disabled"], str(wandb_cfg.mode)),
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                group=wandb_cfg.group or default_group(config, self.run_dir),
                job_type=wandb_cfg.job_type,
                tags=[*wandb_cfg.tags, *config_tags(config)],
                name=wandb_cfg.name or run_name,
                dir=str(wandb_cfg.dir or self.run_dir),
                config=config,
                id=run_id,
                resume="allow" if run_id else None,
                reinit="finish_previous",
            )

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._jsonl.write(records.to_json({records.STEP: step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_histograms(self, step: int, values: dict[str, list[float]]) -> None:
        """Per-expert token counts and the like: raw lists in metrics.jsonl, bar histograms in W&B."""
        if not values:
            return
        self._jsonl.write(records.to_json({records.STEP: step, **values}) + "\n")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log(
                {k: wandb.Histogram(np_histogram=(np.asarray(v), np.arange(len(v) + 1))) for k, v in values.items()},
                step=step,
            )

    def log_samples(self, step: int, samples: list[str]) -> None:
        self._jsonl.write(records.to_json({records.STEP: step, records.SAMPLES: samples}) + "\n")
        if self.wandb_run is not None:
            import wandb

            table = wandb.Table(columns=["step", "sample"], data=[[step, s] for s in samples])
            self.wandb_run.log({"samples": table}, step=step)

    def finish(self, summary: dict[str, Any] | None = None, exit_code: int = 0) -> None:
        """Close the W&B run (also after a failure, so the next job of a sweep gets its own run). The run
        summary gets summary.json's fields except those W&B already holds under their metric key."""
        if self.wandb_run is not None:
            if summary:
                self.wandb_run.summary.update(wandb_summary(summary))
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
        if not self._jsonl.closed:
            self._jsonl.close()
