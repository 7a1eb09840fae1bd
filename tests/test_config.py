"""Configuration: every shipped YAML composes and validates; bad input fails early, naming the key."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

from scaletrain.config import (
    FRACTION,
    NAME_MAX,
    PATH,
    ConfigError,
    ModelConfig,
    Rule,
    TrainConfig,
    check_values,
    load_config,
)

from .conftest import CONF_DIR, NO_LOCAL, REPO, compose_cfg, tiny_overrides

GROUPS = [
    "model",
    "model/attention",
    "model/mlp",
    "moe",
    "optim",
    "data",
    "cluster",
    "train",
    "logging",
    "experiment",
    "debug",
]
# conf/local holds this machine's git-ignored files: only the committed example is a shipped option
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))] + [("local", "example")]
NAMELESS = ("experiment", "logging", "debug", "local")  # groups whose options carry no `name` key


def test_every_config_group_exists_with_at_least_one_option():
    assert all(list((CONF_DIR / g).glob("*.yaml")) for g in [*GROUPS, "local"])


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_shipped_option_composes_and_validates(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    load_config(cfg)
    if group not in NAMELESS:
        assert OmegaConf.select(cfg, group.replace("/", ".")).name == option


def test_default_composition_is_the_seed_baseline():
    cfg = compose_cfg()
    m = cfg.model
    assert (m.name, m.d_model, m.n_layers, m.n_heads, m.d_ff) == ("baseline_10m", 512, 3, 4, 2048)
    assert (m.activation, m.dropout > 0, cfg.moe.name, cfg.optim.name) == ("relu", True, "none", "adamw")
    assert (cfg.data.name, cfg.cluster.name, cfg.logging.wandb.mode) == ("tinystories", "local", "offline")


def _leaves(cfg) -> dict[str, object]:
    """Every leaf of a composed config as dotted key -> value (interpolations left unresolved)."""
    out: dict[str, object] = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def _changed_keys(a, b) -> set[str]:
    la, lb = _leaves(a), _leaves(b)
    return {k for k in la.keys() | lb.keys() if la.get(k, "<unset>") != lb.get(k, "<unset>")}


@pytest.mark.parametrize("preset", ["moe_8x", "tiny", "small_5m"])
def test_model_variants_differ_from_baseline_10m_exactly_in_the_keys_their_yaml_sets(preset):
    """The variants inherit (defaults: [baseline_10m]): every key they do not set is the baseline's."""
    own = {f"model.{k}" for k in OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml") if k != "defaults"}
    changed = _changed_keys(compose_cfg(["model=baseline_10m"]), compose_cfg([f"model={preset}"]))
    assert "model.name" in changed and {k for k in changed if k.startswith("model.")} <= own
    # moe_8x also picks its MoE option (moe=top2_8e); the dense variants leave every other group alone
    assert {k.split(".")[0] for k in changed} == ({"model", "moe"} if preset == "moe_8x" else {"model"})


def test_debug_cpu_tiny_sets_the_tiny_cpu_run_and_wins_over_an_experiment_recipe():
    cfg = compose_cfg(["debug=cpu_tiny", "experiment=quickstart"])  # quickstart: small_5m, seq_len 256, lr 2e-3
    load_config(cfg)
    assert (cfg.experiment, cfg.model.name, cfg.data.seq_len, cfg.data.tokenizer.vocab_size) == (
        "quickstart",
        "tiny",
        64,
        512,
    )
    t = cfg.train
    assert (t.device, t.batch_size, t.max_steps, t.eval_every, t.eval_batches, t.ckpt_every, t.log_every) == (
        "cpu",
        8,
        20,
        10,
        2,
        10,
        5,
    )
    assert (t.progress_bar, t.sample_count, t.sample_tokens, t.measure_cpu_peak) == (False, 1, 8, False)
    assert (cfg.optim.lr, cfg.optim.schedule.warmup_steps, cfg.logging.wandb.mode) == (5e-3, 2, "disabled")


def test_the_command_line_wins_over_the_debug_group(tmp_path):
    cfg = compose_cfg(
        tiny_overrides(
            tmp_path / "data", tmp_path / "cache", model="moe_8x", **{"train.max_steps": 3, "data.seq_len": 32}
        )
    )
    assert (cfg.model.name, cfg.moe.name, cfg.train.max_steps, cfg.data.seq_len) == ("moe_8x", "top2_8e", 3, 32)
    assert (cfg.data.path, cfg.data.cache_dir) == (str(tmp_path / "data"), str(tmp_path / "cache"))
    assert cfg.train.device == "cpu"  # what the command line leaves alone stays the debug group's


def test_local_example_sets_only_machine_settings():
    changed = _changed_keys(compose_cfg(), compose_cfg(["local=example"]))
    machine = {
        "data.path",
        "data.cache_dir",
        "logging.wandb.entity",
        "logging.wandb.mode",
        "logging.wandb.dir",
        "cluster.partition",
        "cluster.account",
        "cluster.qos",
        "cluster.constraint",
        "cluster.setup",
    }
    assert changed and changed <= machine


def test_conf_local_default_applies_to_every_run_and_a_checkout_without_it_composes(tmp_path):
    """`optional local: default`: a fresh clone (no conf/local/default.yaml) composes as the tests do; a
    machine's file sets its keys under every composition, debug=cpu_tiny included; the command line wins."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf, ignore=lambda d, names: ["default.yaml"] if d.endswith("local") else [])

    def compose_in_copy(*overrides: str):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    assert compose_in_copy() == compose_cfg()
    (conf / "local" / "default.yaml").write_text((conf / "local" / "example.yaml").read_text())
    for cfg in (compose_in_copy(), compose_in_copy("debug=cpu_tiny", "experiment=quickstart")):
        assert (cfg.data.path, cfg.logging.wandb.entity) == ("/data/tinystories", "my-team")
    assert compose_in_copy("data.path=/elsewhere").data.path == "/elsewhere"


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
    with pytest.raises(MissingConfigException, match="model/nope") as err:
        compose_cfg(["model=nope"])
    assert "baseline_10m" in str(err.value) and "tiny" in str(err.value)


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.n_heads=3", "model.n_heads"),
        ("model.dropout=1.5", "model.dropout"),
        ("train.device=tpu", "train.device"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("model.tie_embeddings=true model.n_embed=64", "model.tie_embeddings"),
        ("train.max_steps=0", "train.max_steps"),
    ],
)
def test_inconsistent_values_fail_validation_naming_the_key(override, key):
    cfg = compose_cfg(override.split())
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(cfg)


@dataclass
class Knobs:
    """A schema as a plugin writes one: its own rules in RULES, each type's rule for the rest."""

    RULES: ClassVar[dict[str, Rule]] = {"rate": FRACTION, "folder": PATH, "warmup": Rule(lo=0, note="(0 = off)")}
    rate: float = 0.5
    warmup: int = 10
    count: int = 1
    seed: int = 0
    folder: str | None = None
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"rate": 1.0}, "x.rate: must be a finite number in [0, 1), got 1.0"),
        ({"rate": math.nan}, "x.rate: must be a finite number in [0, 1), got nan"),
        ({"warmup": -1}, "x.warmup: must be >= 0 (0 = off), got -1"),
        (
            {"count": 2**64},
            "x.count: must fit in a 64-bit integer (at most 9223372036854775807), got 18446744073709551616",
        ),
        ({"seed": 2**40}, "x.seed: must be in [0, 4294967295] (numpy's seed range), got 1099511627776"),
        ({"folder": " "}, "x.folder: empty; use null or a non-empty string"),
        (
            {"folder": "a/" + "b" * (NAME_MAX + 1)},
            f"x.folder: has a name of {NAME_MAX + 1} bytes, more than this system",
        ),
        ({"tags": ["a", ""]}, "x.tags[1]: empty; expected a non-empty string, got ''"),
        ({"weights": {"a": 1.0, "b": -math.inf}}, "x.weights.b: must be a finite number, got -inf"),
    ],
)
def test_a_value_invalid_in_itself_is_refused_naming_the_key_the_value_and_what_is_expected(change, message):
    check_values(Knobs(), "x.")  # the defaults are valid
    with pytest.raises(ConfigError) as err:
        check_values(Knobs(**change), "x.")
    assert str(err.value).startswith(message)


def test_value_rules_hold_for_dataclasses_built_in_python_and_run_before_the_rules_relating_keys():
    with pytest.raises(ConfigError, match=r"^train\.seed: must be in \[0, 4294967295\]"):
        TrainConfig(seed=-1)
    with pytest.raises(ConfigError, match=r"^model\.n_heads: must be positive, got 0"):  # not D % 0
        ModelConfig(name="t", n_heads=0)
    with pytest.raises(ConfigError, match=r"^model\.n_kv_heads: must be positive or null, got 0"):
        ModelConfig(name="t", n_kv_heads=0)  # once taken as n_heads: null says that


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m scaletrain.run` as a user runs it, minus this machine's conf/local settings."""
    return subprocess.run(
        [sys.executable, "-m", "scaletrain.run", *args, NO_LOCAL], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_rejects_inconsistent_heads_before_any_work(tmp_path):
    res = run_cli("model.n_heads=3", f"hydra.run.dir={tmp_path}/run")
    assert res.returncode != 0
    assert "model.n_heads" in res.stderr and "divisible" in res.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_console_scripts_run_from_any_folder(tmp_path):
    """`scaletrain-run` (pyproject [project.scripts]; what Hydra's tab completion completes) composes the
    repo's conf/ wherever it is started; `scaletrain-report` answers --help."""
    bin_dir = Path(sys.executable).parent
    res = subprocess.run(
        [str(bin_dir / "scaletrain-run"), "--cfg", "job", "model=tiny", NO_LOCAL],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "name: tiny" in res.stdout
    res = subprocess.run([str(bin_dir / "scaletrain-report"), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--experiment" in res.stdout


def test_cli_cfg_job_prints_the_composed_config():
    """stdout is YAML and holds exactly the config `compose` gives for the same overrides: every group, every key
    (interpolations as written, as Hydra prints them), nothing else."""
    overrides = ["model=tiny", "train.seed=7"]
    res = run_cli("--cfg", "job", *overrides)
    assert res.returncode == 0, res.stderr
    printed = OmegaConf.to_container(OmegaConf.create(res.stdout), resolve=False)
    composed = OmegaConf.to_container(compose_cfg(overrides), resolve=False, enum_to_str=True)
    assert printed == composed
    assert printed["model"]["name"] == "tiny" and printed["model"]["d_model"] == 128 and printed["train"]["seed"] == 7


@pytest.mark.parametrize(
    "overrides",
    [
        ["data=mixture"],  # tinystories + reasoning: a source the default data option does not have
        ["data=synthetic_reasoning"],  # one source under another name
        ["data=gsm8k", "data.sources.gsm8k.strip_calculator=false"],
    ],
)
def test_a_run_folder_config_reads_back_exactly_whatever_its_sources_are_named(tmp_path, overrides):
    """The eval/export commands rebuild a run's Config from its config.json: every source the run trained on,
    with its settings, and none of the default option's others (study 003's mixture runs once failed here)."""
    from scaletrain import records
    from scaletrain.config import load_config, to_dict
    from scaletrain.runs import config_of_run

    cfg = load_config(compose_cfg(overrides))
    records.write_json(tmp_path / records.CONFIG_FILE, to_dict(cfg))
    assert config_of_run(tmp_path) == cfg
    again = config_of_run(tmp_path, ["train.eval_problems=7"])
    assert again.train.eval_problems == 7 and again.data == cfg.data


def test_a_run_and_a_checkpoint_saved_before_model_attention_and_model_mlp_existed_still_load_and_resume(tmp_path):
    """Their config.json has no `model.attention` / `model.mlp` node: it meant the built-ins (sdpa, mlp), so the run
    folder reads back as today's default and a resume sees no change; another MLP than the saved one still blocks."""
    import copy

    from scaletrain import records
    from scaletrain.checkpoint import config_changes
    from scaletrain.config import to_dict
    from scaletrain.runs import config_of_run

    cfg = load_config(compose_cfg())
    assert (cfg.model.attention.name, cfg.model.mlp.name) == ("sdpa", "mlp")
    now = to_dict(cfg)
    old = copy.deepcopy(now)
    del old["model"]["attention"], old["model"]["mlp"]
    records.write_json(tmp_path / records.CONFIG_FILE, old)
    assert config_of_run(tmp_path) == cfg
    assert config_changes(old, now) == ([], [])
    now["model"]["mlp"]["_target_"] = "torch.nn.Identity"
    assert config_changes(old, now) == (["model.mlp._target_: torch.nn.Identity (checkpoint: (absent))"], [])
