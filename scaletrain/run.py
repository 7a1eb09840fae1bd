"""Entry point: `python -m scaletrain.run [group=option ...] [key=value ...]` (add `-m` for sweeps).

Composes conf/ against the typed schema, validates cross-field rules before any work, and trains
in Hydra's run (or sweep job) directory. Nothing else lives here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from scaletrain.config import ConfigError, register_configs, validate

register_configs()


def _fail(kind: str, err: Exception) -> None:
    """A single run stops with a one-line message and exit code 2. Under -m the error is raised as an
    ordinary exception instead: the launcher records this job as failed and runs the others."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise err
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
    return summary["val_loss"]


if __name__ == "__main__":
    main()
