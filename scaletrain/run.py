"""Entry point: `python -m scaletrain.run [group=option ...] [key=value ...]` (add `-m` for sweeps).

Composes conf/ against the typed schema, validates cross-field rules before any work, and trains
in Hydra's run (or sweep job) directory. Under -m a failed job's error names the job and its log file
(the launcher hands it back to the sweep's console). Nothing else lives here; ranks, devices and
preemption are in distributed.py.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from scaletrain.config import ConfigError, register_configs, validate

register_configs()
# submitit's local executor sets CUDA_VISIBLE_DEVICES for every job; keep what this shell had, so that the
# jobs of a local sweep can share out all of its GPUs (scaletrain.distributed.claim_local_slot)
os.environ.setdefault("SCALETRAIN_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "all"))


class JobFailed(RuntimeError):
    """A sweep job's error as the sweep's console reports it: which job, what went wrong, where its log is."""


def _job_failed(err: Exception) -> JobFailed:
    """Print the traceback into the job's own log, and name that log in the error the launcher returns."""
    traceback.print_exc()
    hc = HydraConfig.get()
    if os.environ.get("SUBMITIT_EXECUTOR"):  # submitit_slurm / submitit_local: <sweep>/.submitit/<job id>/
        import submitit

        paths = submitit.JobEnvironment().paths
        log = f"{paths.stderr} (stdout: {paths.stdout})"
    else:
        log = str(Path(hc.runtime.output_dir) / f"{hc.job.name}.log")
    return JobFailed(f"job {hc.job.num} ({' '.join(hc.overrides.task)}) failed: {type(err).__name__}: {err}\n"
                     f"  log: {log}\n  run dir: {hc.runtime.output_dir}")


def _fail(kind: str, err: Exception) -> None:
    """A single run stops with a one-line message and exit code 2. Under -m the error is raised as an
    ordinary exception instead: the launcher records this job as failed and runs the others."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise _job_failed(err) from err
    print(f"{kind} error: {err}", file=sys.stderr)
    raise SystemExit(2) from None


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        validate(cfg)
    except ConfigError as err:
        _fail("config", err)
    from scaletrain.data import DataError  # torch imports only after the config is known to be valid
    from scaletrain.trainer import train

    hc = HydraConfig.get()
    try:
        summary = train(cfg, Path(hc.runtime.output_dir), run_name=hc.job.override_dirname or "default")
    except DataError as err:
        _fail("data", err)
    except Exception as err:
        if hc.mode == RunMode.MULTIRUN:
            raise _job_failed(err) from err
        raise
    return summary["val_loss"]


if __name__ == "__main__":
    main()
