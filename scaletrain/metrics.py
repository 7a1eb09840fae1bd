"""Run records and metric sinks: run_info.json, metrics.jsonl, W&B, and the MFU denominator.

Here: `write_run_record` (resolved config, git SHA, package versions, hardware), `MetricsLogger`
(one JSON object per logged step in metrics.jsonl, mirrored to W&B; `finish()` always closes the W&B
run so multirun jobs never share one), the GPU dense-peak table and the CPU matmul-peak measurement.
Not here: what to log and when (that is the trainer's loop).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# Dense (not sparse) bf16 tensor-core peaks in FLOP/s, from vendor datasheets.
GPU_BF16_PEAK = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores; V100 has no bf16
}
_PACKAGES = ("torch", "numpy", "hydra-core", "omegaconf", "datasets", "tokenizers", "wandb", "submitit")


def gpu_peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key in sorted(GPU_BF16_PEAK, key=len, reverse=True):  # most specific name first
        if key in name:
            return GPU_BF16_PEAK[key]
    return None


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, times: int) -> list[float]:
    """FLOP/s of `times` n^3 matmuls on `device`, one figure per matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = []
    for _ in range(times):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(2 * n**3 / (time.perf_counter() - t0))
    return out


def matmul_peak_size(device: torch.device, dtype: torch.dtype, max_n: int = 2048) -> int:
    """n doubles from 256 up to `max_n` while one matmul takes under 50 ms, so a dtype without a fast path
    (bf16 on CPUs lacking AVX512-BF16: ~0.2 GFLOP/s) is measured in about a second, not minutes."""
    n = 256
    while n < max_n and 2 * n**3 / max(matmul_flops(device, dtype, n, 2)) < 0.05:
        n *= 2
    return n


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, max_n: int = 2048, reps: int = 5) -> float:
    """Median FLOP/s of an n^3 matmul on `device` (n from `matmul_peak_size`, first run discarded): the
    achievable limit MFU is measured against on CPU."""
    n = matmul_peak_size(device, dtype, max_n)
    return statistics.median(matmul_flops(device, dtype, n, reps + 1)[1:])


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


def hardware_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(),
                    cuda=torch.version.cuda)
    return info


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["torch"] = torch.__version__
    return out


def write_run_record(run_dir: Path, config: dict, device: torch.device,
                     cluster: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write run_info.json (git SHA, versions, hardware, where the job ran: launcher, ranks, SLURM job
    ids, log files; see distributed.cluster_env) and config.json (resolved config)."""
    record = {"git_sha": git_sha(), "versions": versions(), "hardware": hardware_info(device),
              "cluster": cluster or {}, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    (run_dir / "run_info.json").write_text(json.dumps(record, indent=2))
    return record


def write_status(run_dir: Path, state: str, step: int, error: BaseException | None = None) -> None:
    """Atomically write status.json: running | finished | failed | interrupted, so a sweep report can
    tell a failed or stopped job from a running one without reading logs."""
    status: dict[str, Any] = {"state": state, "step": step, "pid": os.getpid(), "host": socket.gethostname(),
                              "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if error is not None:
        status["error"] = f"{type(error).__name__}: {error}"
        status["traceback"] = "".join(traceback.format_exception(error))
    path = Path(run_dir) / "status.json"
    tmp = path.with_name(f".status.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(status, indent=2))
    os.replace(tmp, path)


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


class MetricsLogger:
    """metrics.jsonl + W&B. Only the rank that owns logging constructs one."""

    def __init__(self, run_dir: Path, wandb_cfg: Any, config: dict, run_name: str, run_id: str | None):
        self.run_dir = Path(run_dir)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.wandb_run = None
        if str(wandb_cfg.mode) != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                mode=str(wandb_cfg.mode),
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
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_histograms(self, step: int, values: dict[str, list[float]]) -> None:
        """Per-expert token counts and the like: raw lists in metrics.jsonl, bar histograms in W&B."""
        if not values:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({k: wandb.Histogram(np_histogram=(v, list(range(len(v) + 1))))
                                for k, v in values.items()}, step=step)

    def log_samples(self, step: int, samples: list[str]) -> None:
        self._jsonl.write(json.dumps({"step": step, "samples": samples}) + "\n")
        if self.wandb_run is not None:
            import wandb

            table = wandb.Table(columns=["step", "sample"], data=[[step, s] for s in samples])
            self.wandb_run.log({"samples": table}, step=step)

    def finish(self, summary: dict[str, Any] | None = None, exit_code: int = 0) -> None:
        """Close the W&B run (also after a failure, so the next job of a sweep gets its own run)."""
        if self.wandb_run is not None:
            if summary:
                self.wandb_run.summary.update(summary)
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
        if not self._jsonl.closed:
            self._jsonl.close()
