"""The typed path conf -> Config dataclasses -> builders: one conversion at the entry, each rule with its schema,
optimizer schemas that carry only their own keys, holes Hydra leaves open closed (`+key`, `--cfg job`), the
nearest valid name in errors, and W&B run names from the swept keys."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaletrain.build import build
from scaletrain.config import (
    AdamWConfig,
    CkptFormat,
    Config,
    ConfigError,
    MuonOptimConfig,
    OptimImpl,
    ParallelMode,
    load_config,
    optimizer_schemas,
    to_dict,
)
from scaletrain.hardware import cpu_info, hardware_info
from scaletrain.model import LMOutput, Transformer
from scaletrain.run import run_name

from .conftest import REPO, compose_cfg


def test_load_config_returns_dataclasses_with_enums_not_dictconfigs():
    cfg = load_config(compose_cfg(["optim=muon"]))
    assert type(cfg) is Config and type(cfg.optim) is MuonOptimConfig
    assert cfg.train.parallel is ParallelMode.ddp and cfg.train.ckpt_format is CkptFormat.auto
    assert cfg.optim.implementation is OptimImpl.auto
    assert cfg.optim.muon.lr == cfg.optim.lr  # the ${..lr} interpolation was resolved in the conversion


def test_an_adamw_run_records_no_muon_keys_and_a_muon_run_adds_only_its_block():
    adamw = to_dict(load_config(compose_cfg()))["optim"]
    muon = to_dict(load_config(compose_cfg(["optim=muon"])))["optim"]
    assert "muon" not in adamw
    assert set(muon) - set(adamw) == {"muon"}
    own = ("muon", "name", "_target_")  # the option's identity: its name and the builder it names
    assert {k: v for k, v in muon.items() if k not in own} == {
        k: v for k, v in adamw.items() if k not in own
    }  # muon.yaml inherits adamw.yaml's values
    assert (adamw["_target_"], muon["_target_"]) == (
        "scaletrain.optim.build_adamw",
        "scaletrain.optim.build_muon_with_adamw",
    )


def test_muon_inherits_what_adamw_yaml_sets_and_the_command_line_still_wins():
    cfg = load_config(compose_cfg(["optim=muon", "optim.lr=7e-3", "optim.schedule.warmup_steps=3"]))
    assert (cfg.optim.lr, cfg.optim.muon.lr, cfg.optim.schedule.warmup_steps, cfg.optim.betas) == (
        7e-3,
        7e-3,
        3,
        [0.9, 0.95],
    )


def test_every_optimizer_schema_is_registered_under_its_name():
    assert optimizer_schemas() == {"adamw": AdamWConfig, "muon": MuonOptimConfig}


@pytest.mark.parametrize(
    "override,message",
    [
        ("+optim.lrr=1", r"optim\.lrr: not a key of AdamWConfig \(did you mean 'lr'\?\)"),
        ("+model.d_modle=64", r"model\.d_modle: not a key of ModelConfig \(did you mean 'd_model'\?\)"),
        ("+train.nonsense=1", r"train\.nonsense: not a key of TrainConfig"),
    ],
)
def test_a_key_added_with_plus_that_the_schema_lacks_fails_naming_the_nearest_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(compose_cfg([override]))


def test_plus_may_still_add_entries_to_free_form_dict_fields():
    cfg = load_config(compose_cfg(["cluster=slurm", "+cluster.additional_parameters.mail-type=END"]))
    assert cfg.cluster.additional_parameters == {"mail-type": "END"}


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.name=muon", "optim.name"),
        ("train.device=cdua", "train.device"),
        ("moe=top2_8e moe.every=9", "moe.every"),
        ("optim=muon optim.muon.momentum=1.0", "optim.muon.momentum"),
        ("train.batch_size=0", "train.batch_size"),
    ],
)
def test_each_rule_fails_in_its_schema_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')}: "):
        load_config(compose_cfg(override.split()))


def test_a_schema_rule_also_holds_for_dataclasses_built_in_python():
    with pytest.raises(ConfigError, match="optim.muon.ns_steps"):
        MuonOptimConfig(muon=dataclasses.replace(MuonOptimConfig().muon, ns_steps=0))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scaletrain.run", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["--cfg", "job", "model.n_heads=3"],
            "config error: model.n_heads: d_model=512 must be divisible by n_heads=3",
        ),
        (["+optim.lrr=1"], "config error: optim.lrr: not a key of AdamWConfig (did you mean 'lr'?)"),
        (["optim.lrr=1"], "config error: optim.lrr: no such key (did you mean 'lr'?)"),
        (["model=baseline10m"], "(did you mean 'baseline_10m'?)"),
        (["modell=tiny"], "config error: modell: no such key (did you mean 'model'?)"),
        (
            ["-m", "optim.lr=1e-3,inf", "--cfg", "job"],
            "config error: optim.lr: must be a finite positive number, got inf",
        ),
    ],
)
def test_the_cli_rejects_bad_input_in_one_line_with_exit_code_2_before_any_work(args, expected, tmp_path):
    res = run_cli(*args, f"hydra.run.dir={tmp_path}/run")
    assert res.returncode == 2, res.stderr
    assert expected in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


def test_sweep_jobs_are_named_by_the_swept_keys_and_single_runs_by_model_and_optimizer(tmp_path):
    cfg = load_config(compose_cfg(["model=tiny"]))
    task = ["model=tiny", "optim.lr=0.003", "train.seed=2", "data.path=/x"]
    assert run_name(cfg, task, ["optim.lr", "train.seed"], tmp_path / "7") == "optim.lr=0.003,train.seed=2"
    assert run_name(cfg, task, [], tmp_path / "12-00-01") == "tiny-adamw-12-00-01"
    moe = load_config(compose_cfg(["model=moe_8x", "logging.wandb.name=mine"]))
    assert run_name(moe, task, ["optim.lr"], tmp_path) == "mine"


def test_the_model_returns_its_moe_aux_loss_once_even_when_blocks_are_recomputed():
    cfg = load_config(compose_cfg(["model=tiny", "moe=top2_8e", "model.dropout=0"]))
    torch.manual_seed(0)
    model = Transformer(cfg.model, 64, 16, cfg.moe)
    idx = torch.randint(0, 64, (2, 16))
    out = model(idx)
    assert isinstance(out, LMOutput) and out.aux_loss is not None
    layers = [b.mlp.aux_loss for b in model.blocks]
    torch.testing.assert_close(out.aux_loss, sum(layers[1:], layers[0]))
    ref = torch.autograd.grad(out.logits.sum() + out.aux_loss, model.blocks[0].mlp.w_router_ED)[0]

    def checkpointed(x):  # activation checkpointing of every block: forward runs again in backward
        aux = None
        for block in model.blocks:
            x, a = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            aux = a if aux is None else aux + a
        return model.W_ue(model.final_norm(x)), aux

    logits, aux = checkpointed(model.W_e(model.tok_emb(idx)))
    torch.testing.assert_close(aux, out.aux_loss)  # counted once, not once per recompute
    got = torch.autograd.grad(logits.sum() + aux, model.blocks[0].mlp.w_router_ED)[0]
    torch.testing.assert_close(got, ref)


def test_a_dense_model_returns_no_aux_loss():
    cfg = load_config(compose_cfg(["model=tiny"]))
    assert Transformer(cfg.model, 64, 16).forward(torch.zeros(1, 4, dtype=torch.long)).aux_loss is None


def test_build_gives_the_benchmark_and_the_trainer_the_same_components():
    cfg = load_config(
        compose_cfg(["model=tiny", "optim=muon", "train.device=cpu", "train.batch_size=4", "data.seq_len=16"])
    )
    tokens = (torch.arange(10_000) % 300).numpy().astype("uint16")
    a, b = build(cfg, train_tokens=tokens), build(cfg, train_tokens=tokens)
    assert type(a.optimizer).__name__ == "MuonWithAdamW" and a.dp_model is a.model  # one process: no wrapper
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name  # seeded from train.seed inside build
    x, y = a.loader.next_batch()
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_run_info_records_the_cpu_model_its_speed_flags_and_cores():
    info = hardware_info(torch.device("cpu"))["cpu"]
    assert info == cpu_info() and info["cores"] >= 1 and isinstance(info["model"], str) and info["model"]
    flags = Path("/proc/cpuinfo").read_text().split("\n\n")[0] if Path("/proc/cpuinfo").exists() else ""
    if "avx2" in flags.split():
        assert "avx2" in info["flags"]
    assert set(info["flags"]) <= {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"}
    json.dumps(info)  # plain JSON for run_info.json


@pytest.mark.slow
def test_a_cli_run_logs_to_its_run_log_and_shows_no_progress_bar_without_a_terminal(
    tmp_path, tinystories_dir, data_cache
):
    from .conftest import tiny_overrides

    overrides = tiny_overrides(tinystories_dir, data_cache, **{"train.max_steps": 5, "train.progress_bar": True})
    res = run_cli(*overrides, f"hydra.run.dir={tmp_path}/run")
    assert res.returncode == 0, res.stderr[-2000:]
    log = (tmp_path / "run" / "run.log").read_text()  # Hydra's file handler: what the console showed
    assert "model tiny:" in log and "done: step 5" in log and "step 5/5: loss" in log
    assert "\r" not in res.stderr and "it/s" not in res.stderr  # stderr is a pipe here: no tqdm bar
