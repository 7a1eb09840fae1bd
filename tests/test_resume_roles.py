"""Each config key's role for a resumed run (config.Resume: identity / hyperparameter / placement), declared on the
schema fields and read by the resume check (checkpoint.config_changes), the W&B run names and Hydra's
override_dirname. The roles replaced hand-kept lists of key prefixes in checkpoint.py: a copy of that logic, kept
here, proves the move classifies every key of the shipped configs as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from scaletrain.checkpoint import _flatten, config_changes
from scaletrain.compose import compose
from scaletrain.config import (
    UNNAMED_OVERRIDES,
    Resume,
    load_config,
    override_dirname_exclude,
    placement_keys,
    resume_role,
    to_dict,
)
from scaletrain.run import run_name

from .conftest import NO_LOCAL, REPO, compose_cfg

# ---- checkpoint.py's hand lists before the roles (kept verbatim: the reference the roles are checked against)
_FIXED = (
    "model.",
    "moe.",
    "data.tokenizer.",
    "data.sources.",
    "data.seq_len",
    "optim.name",
    "train.batch_size",
    "train.grad_accum",
    "train.seed",
)
_FIXED_EXCEPT = ("model.dropout", "model.attn_dropout", "moe.impl", "moe.router_jitter", "model.name", "moe.name")
_APPLIES = (".sample_prompt", ".prompt_template")
_NOT_TRAINING = (
    "train.resume",
    "train.device",
    "train.progress_bar",
    "train.measure_cpu_peak",
    "logging.",
    "cluster.",
    "data.path",
    "data.cache_dir",
    "data.num_proc",
    "experiment",
    "train.cpu_malloc_cache",
)
_WHERE_LEAVES = (".path", ".path_key")
# conf/config.yaml's hand-kept hydra.job.config.override_dirname.exclude_keys before the roles
_OLD_EXCLUDE_KEYS = (
    "experiment, debug, local, hydra.run.dir, hydra.sweep.dir, data.path, data.cache_dir, cluster, logging.wandb.mode, "
    "train.device, train.progress_bar, train.measure_cpu_peak, train.cpu_malloc_cache, train.resume"
).split(", ")


def old_role(key: str) -> Resume:
    """The classification config_changes made from the hand lists."""
    if key.startswith(_NOT_TRAINING) or key.endswith(_WHERE_LEAVES):
        return Resume.placement
    fixed = key.startswith(_FIXED) and not key.startswith(_FIXED_EXCEPT) and not key.endswith(_APPLIES)
    return Resume.identity if fixed else Resume.hyperparameter


# Where the roles differ from the lists on purpose: the optimizer's builder is its kind, as optim.name (the list
# predates optim._target_ and let it apply; a checkpoint from before it exists counts at its implied value).
# Keys added after the lists: the process-group timeout is where/how a run executes, free to change; so are the
# folders the downstream tasks read their data from (the tasks and their settings are hyperparameters).
DELIBERATE = {
    "optim._target_": Resume.identity,
    "train.dist_timeout_s": Resume.placement,
    "train.eval_tasks_data.gsm8k_dir": Resume.placement,
    "train.eval_tasks_data.tinystories_dir": Resume.placement,
}

CONFIGS = [[], ["optim=muon"], ["model=moe_8x"], ["data=mixture"], ["experiment=reasoning_mixture"]]


def leaf_keys(config: dict) -> list[str]:
    """Every key config_changes compares (lists are values), and each list item's key (`optim.betas[1]`)."""
    flat = _flatten(config)
    items = [f"{k}[{i}]" for k, v in flat.items() if isinstance(v, list) for i in range(len(v))]
    return [*flat, *items]


def leaf_paths(config: dict, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every value config_changes compares (a dict's key may hold a dot: study.arms.<a>.inherit)."""
    if not isinstance(config, dict):
        return [path]
    return [p for k, v in config.items() for p in leaf_paths(v, (*path, k))]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(o) or "default")
def test_every_key_of_the_shipped_configs_has_the_role_the_hand_lists_gave_it(overrides):
    config = to_dict(load_config(compose_cfg(overrides)))
    keys = leaf_keys(config)
    assert len(keys) > 100 and any(k.startswith("data.sources.") for k in keys)
    if overrides == ["optim=muon"]:
        assert "optim.muon.ns_steps" in keys  # a subclass schema's own fields are among them
    for key in keys:
        listed = key.split("[")[0]  # a list's items share the list's role
        expected = DELIBERATE.get(listed, old_role(listed))
        assert resume_role(key, config) == expected, key
        assert resume_role(key) == expected, key  # without a config: the first schema that has the key


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(o) or "default")
def test_a_change_of_any_one_key_blocks_applies_or_passes_a_resume_as_before(overrides):
    """Each key changed alone (to a value no config has): identity keys block the resume, hyperparameters are
    listed as applied, placement keys pass unreported."""
    saved = to_dict(load_config(compose_cfg(overrides)))
    for path in leaf_paths(saved):
        key, now = ".".join(path), json.loads(json.dumps(saved))
        node = now
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = "changed"
        blocking, applied = config_changes(saved, now)
        line = [f"{key}: changed (checkpoint: {_flatten(saved)[key]})"]
        expected = DELIBERATE.get(key, old_role(key))
        assert (blocking, applied) == {
            Resume.identity: (line, []),
            Resume.hyperparameter: ([], line),
            Resume.placement: ([], []),
        }[expected], key


def test_keys_added_after_a_checkpoint_or_unknown_to_the_schemas_take_their_nodes_role():
    assert [resume_role(k) for k in ("model.attention.name", "model.mlp._target_", "optim._target_")] == [
        Resume.identity
    ] * 3
    # a key removed since a checkpoint was written: the role of the node it was in, as the prefixes gave it
    for key in ("model.removed_knob", "train.removed_knob", "cluster.removed_knob", "data.sources.x.removed"):
        assert resume_role(key) == old_role(key), key
    assert resume_role("not_a_group.key") == Resume.hyperparameter
    assert resume_role("model/attention") == Resume.identity  # a group, as an override names it
    assert resume_role("cluster") == resume_role("logging") == Resume.placement


def test_a_plugin_schema_declares_the_roles_of_its_own_fields():
    """A plugin optimizer's fields are found through the schema the config names; a field it declares identity
    blocks a resume, its others apply as optim's, its name and _target_ are identity (ComponentConfig's)."""
    code = textwrap.dedent(
        """
        from dataclasses import dataclass
        from scaletrain.checkpoint import config_changes
        from scaletrain.config import OptimConfig, Resume, hyperparameter, identity, placement, placement_keys
        from scaletrain.config import resume_role

        @dataclass
        class SketchConfig(OptimConfig):
            name: str = "sketch"
            _target_: str = "my_plugin.build_sketch"
            rank: int = identity(4)  # the shape of its state
            momentum: float = 0.9
            log_dir: str = placement("/tmp")

        @dataclass
        class OtherConfig(OptimConfig):
            name: str = "other"
            _target_: str = "my_plugin.build_other"
            rank: float = hyperparameter(1.0)  # the same name, another meaning

        saved = {"optim": {"name": "sketch", "_target_": "my_plugin.build_sketch", "lr": 0.1, "rank": 4,
                           "momentum": 0.9, "log_dir": "/tmp"}}
        now = {"optim": {**saved["optim"], "rank": 8, "momentum": 0.8, "lr": 0.2, "log_dir": "/x"}}
        other = {"optim": {"name": "other", "rank": 2.0}}
        print([str(resume_role(k, saved)) for k in ("optim.rank", "optim.momentum", "optim.log_dir", "optim.name")])
        print(str(resume_role("optim.rank", other)), "optim.log_dir" in placement_keys())
        print(config_changes(saved, now))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "SCALETRAIN_PLUGINS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, check=True)
    roles, other, changes = out.stdout.strip().splitlines()
    assert roles == "['identity', 'hyperparameter', 'placement', 'identity']"
    assert other == "hyperparameter True"
    applied = "['optim.lr: 0.2 (checkpoint: 0.1)', 'optim.momentum: 0.8 (checkpoint: 0.9)']"
    assert changes == f"(['optim.rank: 8 (checkpoint: 4)'], {applied})"


def test_hydra_leaves_every_placement_key_out_of_override_dirname_and_nothing_else():
    """exclude_keys is computed from the roles (config.override_dirname_exclude, stored as scaletrain_hydra): every
    placement key of the schemas, and the overrides that name no key (debug, local, Hydra's run/sweep folders)."""
    hydra = compose([NO_LOCAL], return_hydra_config=True).hydra
    exclude = list(OmegaConf.to_container(hydra.job.config.override_dirname.exclude_keys))  # type: ignore[arg-type]
    assert exclude == override_dirname_exclude() == [*placement_keys(), *UNNAMED_OVERRIDES]
    assert set(_OLD_EXCLUDE_KEYS) <= set(exclude)  # everything left out before still is
    assert all(resume_role(k) == Resume.placement for k in placement_keys())
    overrides = ["optim.lr=0.1", "train.seed=3", "data.path=/x", "cluster=local", "train.device=cpu"]
    overrides += ["logging.wandb.project=p", "data.num_proc=1", "cluster.timeout_min=5", "model.dropout=0.1"]
    job = compose([NO_LOCAL, *overrides], return_hydra_config=True).hydra.job
    assert job.override_dirname == "model.dropout=0.1,optim.lr=0.1,train.seed=3"


def test_a_sweep_job_is_named_by_its_swept_keys_but_not_by_where_it_runs(tmp_path):
    cfg = load_config(compose_cfg(["model=tiny"]))
    task = ["optim.lr=0.003", "train.device=cpu", "cluster.timeout_min=5", "model/attention=sdpa"]
    swept = ["optim.lr", "train.device", "cluster.timeout_min", "model/attention"]
    assert run_name(cfg, task, swept, tmp_path / "7") == "optim.lr=0.003,model/attention=sdpa"
    assert run_name(cfg, task[1:3], swept[1:3], tmp_path / "7") == "tiny-adamw-7"  # only placement swept
