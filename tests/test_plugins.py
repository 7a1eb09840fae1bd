"""Open platform: the config tree ships in the package, user config folders join the search path, and a plugin
package's components (an optimizer, an MLP here) go through the same door as the built-ins, with the same typed
checks.

The plugin is written into tmp_path and named by SCALETRAIN_PLUGINS; every check runs in a subprocess (the console
script as a user runs it), so its schema never registers in this test process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaletrain import compose as front_door
from scaletrain.config import MLPConfig, load_config
from scaletrain.model import MLP, Transformer
from scaletrain.plugins import plugin_config_dirs, plugin_modules

from .conftest import REPO, tiny_overrides

PLUGIN = '''
"""A user's optimizer: torch SGD with momentum, as a scaletrain plugin."""
from dataclasses import dataclass

import torch

from scaletrain.config import ConfigError, OptimConfig
from scaletrain.optim import param_groups


@dataclass
class SGDConfig(OptimConfig):
    name: str = "sgd"
    _target_: str = "my_sgd.build_sgd"
    momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum: must be in [0, 1), got {self.momentum}")


def build_sgd(model, cfg, device_type):
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
'''


MLP_PLUGIN = '''
"""A user's MLP: squared ReLU (Primer, So et al. 2021: relu(x W_up)^2 W_down), as a scaletrain plugin."""
from dataclasses import dataclass

import torch
from torch import nn

from scaletrain.config import ConfigError, MLPConfig, ModelConfig
from scaletrain.roles import Role


@dataclass
class Relu2Config(MLPConfig):
    name: str = "relu2"
    _target_: str = "my_relu2.Relu2MLP"
    expansion: int = 4  # hidden width = expansion * d_model

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expansion < 1:
            raise ConfigError(f"model.mlp.expansion: must be >= 1, got {self.expansion}")


class Relu2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp: Relu2Config):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, mlp.expansion * cfg.d_model, bias=False)
        self.down = nn.Linear(mlp.expansion * cfg.d_model, cfg.d_model, bias=False)

    def param_roles(self):
        return {"up.weight": Role.hidden, "down.weight": Role.hidden_out}

    def forward(self, x_BTD):
        return self.down(torch.relu(self.up(x_BTD)).square())
'''


def plugin_env(tmp_path: Path, module: str, source: str, options: dict[str, str]) -> dict[str, str]:
    """The environment of a shell where the user's package `module` (its __init__.py: `source`; `options`: YAML
    files by their path under its conf/) is importable and named in SCALETRAIN_PLUGINS."""
    pkg = tmp_path / "src" / module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(source)
    for rel, text in options.items():
        (pkg / "conf" / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / "conf" / rel).write_text(text)
    path = os.pathsep.join([str(tmp_path / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "SCALETRAIN_PLUGINS": module, "WANDB_SILENT": "true"}


@pytest.fixture
def plugin(tmp_path) -> dict[str, str]:
    """The environment of a shell where the user's package `my_sgd` (with conf/optim/sgd.yaml) is importable."""
    sgd = "defaults: [sgd_schema, _self_]\nname: sgd\nlr: 0.05\n"
    return plugin_env(tmp_path, "my_sgd", PLUGIN, {"optim/sgd.yaml": sgd})


@pytest.fixture
def mlp_plugin(tmp_path) -> dict[str, str]:
    """The environment of a shell where the user's package `my_relu2` (with conf/model/mlp/relu2.yaml) is importable."""
    relu2 = "defaults: [relu2_schema, _self_]\nname: relu2\nexpansion: 4\n"
    return plugin_env(tmp_path, "my_relu2", MLP_PLUGIN, {"model/mlp/relu2.yaml": relu2})


def scaletrain_run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "scaletrain.run", "~local", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def train_4_steps(choice: list[str], env: dict[str, str], tmp_path: Path, data_dir: Path, cache: Path) -> dict:
    """A tiny 4-step run with the plugin's option(s) `choice` in tmp_path/run -> its step-4 checkpoint."""
    run_dir = tmp_path / "run"
    args = [*tiny_overrides(data_dir, cache), *choice, "train.max_steps=4", "train.ckpt_every=4"]
    res = scaletrain_run([*args, f"hydra.run.dir={run_dir}"], env, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(run_dir / "checkpoints" / "step_0000004.pt", weights_only=True)


def test_the_config_tree_ships_inside_the_package_and_composes_without_a_clone():
    assert front_door.CONFIG_PATH == "pkg://scaletrain.conf"
    tree = REPO / "scaletrain" / "conf"
    assert (tree / "config.yaml").is_file() and not (REPO / "conf").exists()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"scaletrain.conf" = ["*.yaml", "*/*.yaml", "*/*/*.yaml"]' in pyproject  # every depth of the tree
    deepest = max(len(p.relative_to(tree).parts) for p in tree.rglob("*.yaml"))
    assert deepest <= 3  # model/attention/sdpa.yaml: the package-data globs above reach it


def test_a_user_config_folder_on_the_search_path_adds_options_and_machine_settings(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "local").mkdir()
    (tmp_path / "model" / "wide.yaml").write_text("defaults: [baseline_10m, _self_]\nname: wide\nd_model: 768\n")
    (tmp_path / "local" / "default.yaml").write_text("# @package _global_\ndata:\n  path: /data/ts\n")
    monkeypatch.setenv(front_door.CONFIG_PATH_ENV, str(tmp_path))
    cfg = load_config(front_door.compose(["model=wide"]))
    assert (cfg.model.name, cfg.model.d_model, cfg.model.n_layers, cfg.data.path) == ("wide", 768, 3, "/data/ts")
    monkeypatch.delenv(front_door.CONFIG_PATH_ENV)  # the same folder through Hydra's own key
    cfg = load_config(front_door.compose(["model=wide", "~local", f"hydra.searchpath=[file://{tmp_path}]"]))
    assert cfg.model.d_model == 768 and cfg.data.path != "/data/ts"


def test_a_plugin_named_in_the_environment_is_found_with_its_config_folder(plugin, monkeypatch):
    monkeypatch.setenv("SCALETRAIN_PLUGINS", "my_sgd")
    monkeypatch.setenv("PYTHONPATH", plugin["PYTHONPATH"])
    monkeypatch.syspath_prepend(plugin["PYTHONPATH"].split(os.pathsep)[0])
    assert plugin_modules() == {"my_sgd": "$SCALETRAIN_PLUGINS"}
    (conf,) = plugin_config_dirs()
    assert conf.startswith("file://") and conf.endswith("my_sgd/conf")


def test_a_plugin_optimizer_composes_validates_and_reports_bad_input_like_a_built_in(plugin, tmp_path):
    ok = scaletrain_run(["optim=sgd", "optim.momentum=0.5", "--cfg", "job"], plugin, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "_target_: my_sgd.build_sgd" in ok.stdout and "momentum: 0.5" in ok.stdout and "lr: 0.05" in ok.stdout
    cases = {  # command line -> the one line it must print
        "optim.momentm=0.5": "optim.momentm: no such key (did you mean 'momentum'?)",
        "optim.momentum=1.5": "config error: optim.momentum: must be in [0, 1), got 1.5",
        "optim._target_=my_sgd.build_sgdd": "optim._target_: module 'my_sgd' has no 'build_sgdd' (did you mean "
        "'build_sgd'?)",
        "optim._target_=my_sgdd.build_sgd": "optim._target_: cannot import module 'my_sgdd'",
    }
    for override, line in cases.items():
        res = scaletrain_run(["optim=sgd", override, "--cfg", "job"], plugin, tmp_path)
        assert res.returncode == 2 and line in res.stderr, (override, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_a_plugin_that_fails_to_import_is_one_line_naming_it(plugin, tmp_path):
    broken = {**plugin, "SCALETRAIN_PLUGINS": "my_sgd,not_installed_anywhere"}
    res = scaletrain_run(["--cfg", "job"], broken, tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == (
        "plugin error: plugin 'not_installed_anywhere' ($SCALETRAIN_PLUGINS) failed to import: "
        "ModuleNotFoundError: No module named 'not_installed_anywhere'"
    )


@pytest.mark.slow
def test_a_plugin_optimizer_trains_and_checkpoints_its_own_state(plugin, tmp_path, tinystories_dir, data_cache):
    state = train_4_steps(["optim=sgd"], plugin, tmp_path, tinystories_dir, data_cache)
    groups = state["optimizer"]["param_groups"]
    assert {g["momentum"] for g in groups} == {0.9} and {g["lr"] for g in groups} != {0.05}  # SGD's, scheduled
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())


def test_the_default_config_builds_the_built_in_mlp_in_every_dense_block():
    cfg = load_config(front_door.compose(["~local", "debug=cpu_tiny"]))
    assert (cfg.model.mlp.name, cfg.model.mlp._target_) == ("mlp", "scaletrain.model.MLP")
    assert type(cfg.model.mlp) is MLPConfig
    model = Transformer(cfg.model, vocab_size=64, max_seq_len=16)
    assert all(type(block.mlp) is MLP for block in model.blocks)
    moe = load_config(front_door.compose(["~local", "debug=cpu_tiny", "moe=top2_8e", "moe.every=2"]))
    blocks = Transformer(moe.model, vocab_size=64, max_seq_len=16, moe_cfg=moe.moe).blocks
    assert [type(b.mlp).__name__ for b in blocks] == ["MLP", "MoE"]  # MoE layers stay MoE


def test_a_plugin_mlp_composes_validates_and_is_noted_by_the_dry_run(mlp_plugin, tmp_path):
    ok = scaletrain_run(["model/mlp=relu2", "model.mlp.expansion=3", "--cfg", "job"], mlp_plugin, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "name: relu2" in ok.stdout and "_target_: my_relu2.Relu2MLP" in ok.stdout and "expansion: 3" in ok.stdout
    cases = {  # command line -> the one line it must print
        "model.mlp._target_=my_relu2.Relu2MLPP": "model.mlp._target_: module 'my_relu2' has no 'Relu2MLPP' (did you "
        "mean 'Relu2MLP'?)",
        "model.mlp.expansion=0": "config error: model.mlp.expansion: must be >= 1, got 0",
        "model.mlp.expansionn=2": "model.mlp.expansionn: no such key (did you mean 'expansion'?)",
    }
    for override, line in cases.items():
        res = scaletrain_run(["model/mlp=relu2", override, "--cfg", "job"], mlp_plugin, tmp_path)
        assert res.returncode == 2 and line in res.stderr, (override, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    dry = tmp_path / "dry"
    res = scaletrain_run(["model/mlp=relu2", "train.dry_run=true", f"hydra.run.dir={dry}"], mlp_plugin, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    note = "model.mlp=relu2 (my_relu2.Relu2MLP) is not the built-in MLP"
    assert f"note: {note}" in res.stdout
    (written,) = json.loads((dry / "sizing.json").read_text())["notes"]
    assert written.startswith(note)


@pytest.mark.slow
def test_a_plugin_mlp_trains_and_its_parameters_fill_the_checkpoint(mlp_plugin, tmp_path, tinystories_dir, data_cache):
    state = train_4_steps(["model/mlp=relu2"], mlp_plugin, tmp_path, tinystories_dir, data_cache)
    run_dir = tmp_path / "run"
    D = json.loads((run_dir / "config.json").read_text())["model"]["d_model"]
    mlp = {k.split(".mlp.")[1]: v.shape for k, v in state["model"].items() if ".mlp." in k}
    assert mlp == {"up.weight": (4 * D, D), "down.weight": (D, 4 * D)}  # the user module's, in every block
    n_blocks = len({k.split(".mlp.")[0] for k in state["model"] if ".mlp." in k})
    assert n_blocks == json.loads((run_dir / "config.json").read_text())["model"]["n_layers"]
