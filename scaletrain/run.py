"""Entry point: `python -m scaletrain.run [group=option ...] [key=value ...]` (add `-m` for sweeps).

Composes conf/ against the typed schema, validates cross-field rules before any work, and trains
in Hydra's run (or sweep job) directory. Nothing else lives here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from scaletrain.config import ConfigError, register_configs, validate

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        validate(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from scaletrain.trainer import train  # torch import only after the config is known to be valid

    from scaletrain.data import DataError

    hc = HydraConfig.get()
    try:
        summary = train(cfg, Path(hc.runtime.output_dir), run_name=hc.job.override_dirname or "default")
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return summary["val_loss"]


if __name__ == "__main__":
    main()
