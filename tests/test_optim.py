"""Optimizer groups and LR schedules: exact values on fixed inputs."""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import pytest
import torch

from scaletrain.config import AdamWConfig, ConfigError, ModelConfig, OptimConfig, ScheduleConfig, optimizer_schemas
from scaletrain.model import Transformer
from scaletrain.optim import build_optimizer, build_scheduler, lr_at, param_groups


def test_weight_decay_skips_norms_biases_and_embeddings_only():
    model = Transformer(
        ModelConfig(name="t", d_model=32, n_layers=2, n_heads=2, d_ff=64, bias=True, qk_norm=True),
        vocab_size=50,
        max_seq_len=8,
    )
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(skipped) and decayed | skipped == set(names.values())
    assert all(n.endswith("weight") and ("norm" not in n) for n in decayed)
    assert {"tok_emb.weight", "W_e.bias", "final_norm.weight", "blocks.0.attn.q_norm.weight"} <= skipped
    assert {"W_e.weight", "W_ue.weight", "blocks.1.attn.wq.weight", "blocks.1.mlp.w_out.weight"} <= decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def tiny_model() -> Transformer:
    return Transformer(ModelConfig(name="t", d_model=16, n_layers=1, n_heads=2, d_ff=32), vocab_size=20, max_seq_len=4)


def test_adamw_is_fused_on_cpu_and_cuda_and_foreach_elsewhere():
    model = tiny_model()
    for device_type, fused in (("cpu", True), ("cuda", True), ("mps", False)):
        opt = build_optimizer(model, AdamWConfig(), device_type)
        assert isinstance(opt, torch.optim.AdamW)
        assert (bool(opt.defaults["fused"]), bool(opt.defaults["foreach"])) == (fused, not fused)


def test_a_name_that_is_not_the_schemas_own_is_rejected_naming_optim_name():
    with pytest.raises(ConfigError, match="optim.name: is 'sgd2' but the schema is 'adamw'"):
        AdamWConfig(name="sgd2")


def test_a_schema_without_a_target_or_with_a_wrong_one_is_rejected_naming_the_key():
    @dataclass
    class SGDConfig(OptimConfig):
        name: str = "sgd_without_builder"

    try:
        with pytest.raises(ConfigError, match="optim._target_: is not set"):
            SGDConfig()
        with pytest.raises(
            ConfigError,
            match="optim._target_: module 'scaletrain.optim' has no 'build_adamm' "
            r"\(did you mean 'build_adamw'\?\)",
        ):
            SGDConfig(_target_="scaletrain.optim.build_adamm")
        with pytest.raises(ConfigError, match="optim._target_: cannot import module 'scaletrain.optimm'"):
            SGDConfig(_target_="scaletrain.optimm.build_adamw")
    finally:  # defining a subclass registers it (config.optimizer_schemas): let it be collected
        del SGDConfig
        gc.collect()
    assert "sgd_without_builder" not in optimizer_schemas()


def groups_not_an_optimizer(model, cfg, device_type):
    """A builder with the right signature that forgets to build the optimizer."""
    return param_groups(model, cfg.weight_decay)


def test_a_builder_that_returns_no_optimizer_is_rejected_naming_the_target():
    cfg = AdamWConfig(_target_="tests.test_optim.groups_not_an_optimizer")
    with pytest.raises(TypeError, match="optim._target_=tests.test_optim.groups_not_an_optimizer returned list"):
        build_optimizer(tiny_model(), cfg, "cpu")


@pytest.mark.parametrize("decay", ["cosine", "linear", "wsd", "constant"])
def test_warmup_is_linear_to_the_base_lr(decay):
    s = ScheduleConfig(warmup_steps=10, decay=decay, min_lr_ratio=0.1, decay_frac=0.2)
    assert [lr_at(i, 100, 1.0, s) for i in (0, 4, 9)] == [0.1, 0.5, 1.0]


def test_cosine_decays_to_min_lr_through_the_midpoint():
    s = ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_at(10, 110, 2.0, s) == pytest.approx(2.0)
    assert lr_at(60, 110, 2.0, s) == pytest.approx(0.2 + 0.5 * 1.8)
    assert lr_at(110, 110, 2.0, s) == pytest.approx(0.2)


def test_linear_is_halfway_at_the_midpoint_and_wsd_holds_the_lr_until_its_final_decay():
    lin = ScheduleConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert lr_at(50, 100, 1.0, lin) == pytest.approx(0.5)
    wsd = ScheduleConfig(warmup_steps=10, decay="wsd", min_lr_ratio=0.0, decay_frac=0.2)
    assert lr_at(79, 100, 1.0, wsd) == 1.0  # stable phase until the last 20 steps
    assert lr_at(90, 100, 1.0, wsd) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, wsd) == pytest.approx(0.0)


def test_scheduler_sets_the_optimizer_lr_each_step():
    cfg = AdamWConfig(lr=1e-2, schedule=ScheduleConfig(warmup_steps=4, decay="cosine", min_lr_ratio=0.0))
    opt = build_optimizer(tiny_model(), cfg, "cpu")
    sched = build_scheduler(opt, cfg, max_steps=20)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [lr_at(i, 20, 1e-2, cfg.schedule) for i in range(20)]
    assert seen == pytest.approx(expected) and math.isclose(max(seen), 1e-2)
