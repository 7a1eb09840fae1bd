"""Configuration: every shipped YAML composes and validates; bad input fails early, naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

from scaletrain.config import ConfigError, validate

from .conftest import CONF_DIR, REPO, compose_cfg

GROUPS = ["model", "moe", "optim", "data", "cluster", "train", "logging", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


def test_every_config_group_exists():
    assert all((CONF_DIR / g).is_dir() for g in GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_shipped_option_composes_and_validates(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    validate(cfg)
    if group not in ("experiment", "logging"):
        assert cfg[group].name == option


def test_default_composition_is_the_seed_baseline():
    cfg = compose_cfg()
    m = cfg.model
    assert (m.name, m.d_model, m.n_layers, m.n_heads, m.d_ff) == ("baseline_10m", 512, 3, 4, 2048)
    assert (m.activation, m.dropout > 0, cfg.moe.name, cfg.optim.name) == ("relu", True, "none", "adamw")
    assert (cfg.data.name, cfg.cluster.name, cfg.logging.wandb.mode) == ("tinystories", "local", "offline")


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["optim.lrr=1"])
    assert isinstance(err.value.__cause__, ConfigAttributeError) and "optim.lrr" in str(err.value.__cause__)


def test_wrong_type_fails_naming_key_and_type():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["model.d_model=abc"])
    cause = err.value.__cause__
    assert isinstance(cause, ValidationError) and "model.d_model" in str(cause) and "Integer" in str(cause)


def test_wrong_enum_value_lists_the_allowed_ones():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["model.norm=batchnorm"])
    assert "layernorm" in str(err.value.__cause__) and "rmsnorm" in str(err.value.__cause__)


def test_unknown_option_lists_available_ones():
    with pytest.raises(Exception) as err:
        compose_cfg(["model=nope"])
    assert "model/nope" in str(err.value) and "baseline_10m" in str(err.value) and "tiny" in str(err.value)


@pytest.mark.parametrize(
    "override,key",
    [("model.n_heads=3", "model.n_heads"), ("model.dropout=1.5", "model.dropout"),
     ("train.device=tpu", "train.device"), ("optim.betas=[0.9]", "optim.betas"),
     ("model.tie_embeddings=true model.n_embed=64", "model.tie_embeddings"),
     ("train.max_steps=0", "train.max_steps")],
)
def test_inconsistent_values_fail_validation_naming_the_key(override, key):
    cfg = compose_cfg(override.split())
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaletrain.run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_rejects_inconsistent_heads_before_any_work(tmp_path):
    res = run_cli("model.n_heads=3", f"hydra.run.dir={tmp_path}/run")
    assert res.returncode != 0
    assert "model.n_heads" in res.stderr and "divisible" in res.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_cfg_job_prints_the_resolved_config():
    res = run_cli("--cfg", "job", "model=tiny", "train.seed=7")
    assert res.returncode == 0
    assert "name: tiny" in res.stdout and "seed: 7" in res.stdout and "d_model: 128" in res.stdout
