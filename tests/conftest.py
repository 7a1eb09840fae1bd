"""Shared fixtures: the real conf/ composed with tiny CPU overrides, and the ../shared test data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from scaletrain.config import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHARED = Path(os.environ.get("SCALETRAIN_SHARED", REPO.parent / "shared")).resolve()
TINYSTORIES = SHARED / "data" / "tinystories"

register_configs()


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml exactly as `python -m scaletrain.run` does, with overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


@pytest.fixture(scope="session")
def tinystories_dir() -> Path:
    if not (TINYSTORIES / "train.txt").is_file():
        pytest.fail(f"TinyStories sample not found at {TINYSTORIES}; set SCALETRAIN_SHARED to the shared folder")
    return TINYSTORIES


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenizer/token cache shared by the tests of a session (built once, reused)."""
    return tmp_path_factory.mktemp("scaletrain_cache")


def tiny_overrides(data_dir: Path, cache: Path, **extra: object) -> list[str]:
    """CPU-sized run: tiny model, short sequences, W&B disabled, no progress bar."""
    base = {
        "model": "tiny",
        "data.path": str(data_dir),
        "data.cache_dir": str(cache),
        "data.seq_len": 64,
        "data.tokenizer.vocab_size": 512,
        "train.batch_size": 8,
        "train.max_steps": 20,
        "train.eval_every": 10,
        "train.eval_batches": 2,
        "train.ckpt_every": 10,
        "train.log_every": 5,
        "train.progress_bar": False,
        "train.sample_count": 1,
        "train.sample_tokens": 8,
        "train.measure_cpu_peak": False,
        "train.device": "cpu",
        "optim.lr": 5e-3,
        "optim.schedule.warmup_steps": 2,
        "logging.wandb.mode": "disabled",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
