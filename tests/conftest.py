"""Shared fixtures and helpers: the real conf/ composed with the debug group (debug=cpu_tiny) and tmp
paths, the ../shared test data, and readers of a run directory's records (metrics.jsonl, summary.json)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from scaletrain import records
from scaletrain.compose import compose
from scaletrain.config import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "scaletrain" / "conf"
SHARED = Path(os.environ.get("SCALETRAIN_SHARED", REPO.parent / "shared")).resolve()
TINYSTORIES = SHARED / "data" / "tinystories"
DEBUG = "cpu_tiny"  # conf/debug/cpu_tiny.yaml: the tiny CPU settings every training test starts from
NO_LOCAL = "~local"  # drop this machine's git-ignored conf/local/default.yaml: tests compose as CI does

register_configs()
pytest_plugins = ["tests.reliability.table"]  # the README's reliability table (--reliability-table=README.md)


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml as `python -m scaletrain.run` does, with overrides, minus any conf/local
    machine settings (unless the overrides choose a `local` option themselves)."""
    overrides = list(overrides or [])
    if not any(o.lstrip("~+").startswith("local") for o in overrides):
        overrides.append(NO_LOCAL)
    return compose(overrides)


@pytest.fixture(scope="session")
def tinystories_dir() -> Path:
    if not (TINYSTORIES / "train.txt").is_file():
        pytest.fail(f"TinyStories sample not found at {TINYSTORIES}; set SCALETRAIN_SHARED to the shared folder")
    return TINYSTORIES


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenizer/token cache shared by the tests of a session (built once, reused)."""
    return tmp_path_factory.mktemp("scaletrain_cache")


def tinystories_head(folder: Path, tinystories_dir: Path, train_chars: int, valid_chars: int) -> Path:
    """`folder` with the first whole stories of the TinyStories sample (up to the given characters per split):
    quick to tokenize, enough for a tiny run."""
    eot = "<|endoftext|>"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n_chars in (("train.txt", train_chars), ("valid.txt", valid_chars)):
        text = (tinystories_dir / name).read_text(encoding="utf-8")[:n_chars]
        (folder / name).write_text(text[: text.rindex(eot)] + eot + "\n", encoding="utf-8")
    return folder


def tiny_overrides(data_dir: Path, cache: Path, **extra: object) -> list[str]:
    """A CPU-sized run: `debug=cpu_tiny` (tiny model, short sequences, 20 steps, W&B disabled, ...) with
    this session's data and cache folders; `extra` overrides any key or group (`model="moe_8x"`).
    The list works both for compose_cfg and on the command line of `python -m scaletrain.run`."""
    paths = {"data.path": data_dir, "data.cache_dir": cache}
    return [f"debug={DEBUG}", NO_LOCAL, *(f"{k}={v}" for k, v in {**paths, **extra}.items())]


# two gloo ranks on this machine: the prefix of every torchrun command in the tests
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in the order written."""
    return [json.loads(line) for line in (run_dir / records.METRICS_FILE).read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss of a run (the logged steps only)."""
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def read_summary(run_dir: Path) -> dict:
    """A run's summary.json, checked against the Summary contract (a missing field fails here)."""
    summary = records.read_summary(run_dir)
    assert summary is not None, f"no {records.SUMMARY_FILE} in {run_dir}"
    return summary.to_dict()
