"""MoE end to end through the trainer: falling loss with balanced load, exact resume, active-parameter FLOPs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scaletrain import data as data_mod
from scaletrain.config import ModelConfig, MoEConfig
from scaletrain.model import Transformer
from scaletrain.optim import param_groups
from scaletrain.records import Summary
from scaletrain.trainer import train

from .conftest import compose_cfg, read_metrics, tiny_overrides, train_losses

# moe_8x's routing (8 experts, top-2, aux loss 0.01) at a CPU-sized width.
MOE_TINY = {"model": "moe_8x", "model.d_model": 64, "model.n_heads": 4, "model.d_ff": 128, "model.dropout": 0.0}


def run_moe(tinystories_dir, data_cache, run_dir, **extra) -> tuple[Summary, list[float]]:
    cfg = compose_cfg(tiny_overrides(tinystories_dir, data_cache, **MOE_TINY, **{"train.max_steps": 40}, **extra))
    summary = train(cfg, run_dir)
    loads = [r["moe/load_max_over_mean"] for r in read_metrics(run_dir) if "moe/load_max_over_mean" in r]
    return summary, loads


def test_moe_8x_trains_with_falling_loss_and_balancing_undoes_router_collapse(tinystories_dir, data_cache, tmp_path):
    # Switch aux loss + DeepSeek-V3 selection bias (its published update rate)
    summary, loads = run_moe(
        tinystories_dir, data_cache, tmp_path / "on", **{"moe.aux_loss_coef": 0.01, "moe.bias_update_rate": 0.001}
    )
    losses = train_losses(tmp_path / "on")
    assert losses[40] < losses[5] - 0.3 and summary.val_loss < math.log(512) - 1.0
    assert summary.params_active < summary.params_total
    # At this width and lr the untrained router starts collapsed: its logits are ~0, so top-2 follows a
    # direction all tokens share and two experts take every slot (max/mean load = 8/2 = 4.0). Without
    # balancing it stays there; with it, after 40 steps the busiest expert of any layer is closer to balance
    # than to collapse. Balance reads ~1.15, not 1: each expert's share of a step's 512 tokens x 2 slots is
    # ~Binomial(512, 1/4) (mean 128, sd 9.8), and the maximum of 3 layers x 8 experts lies ~2 sd above the
    # mean. Halfway to collapse is (1.15 + 4.0) / 2 ~ 2.6. Measured at step 40 (seeds 1337, 1, 2, 3): 2.16,
    # 1.40, 2.17, 1.97 (the 2.0 this asserted before parameters were seeded by name held for the old init only).
    _, unbalanced = run_moe(
        tinystories_dir, data_cache, tmp_path / "off", **{"moe.aux_loss_coef": 0.0, "moe.bias_update_rate": 0.0}
    )
    assert len(loads) == len(unbalanced) == 8
    assert min(unbalanced[-3:]) > 3.5 and loads[-1] < 2.5
    hist = [r for r in read_metrics(tmp_path / "on") if "moe/layer0/tokens_per_expert" in r]
    assert hist and sum(hist[-1]["moe/layer0/tokens_per_expert"]) == 8 * 64 * 2  # every slot of the batch


def test_interrupted_moe_run_with_bias_balancing_resumes_exactly(tinystories_dir, data_cache, tmp_path, monkeypatch):
    extra = {
        **MOE_TINY,
        "train.max_steps": 20,
        "train.ckpt_every": 10,
        "train.eval_every": 10,
        "moe.bias_update_rate": 0.01,
        "train.grad_accum": 2,
        "train.batch_size": 4,
    }
    reference = tmp_path / "ref"
    train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), reference)

    original, calls = data_mod.BatchLoader.next_batch, {"n": 0}

    def crash_late(self):
        calls["n"] += 1
        if calls["n"] > 26:  # 2 micro-batches per step: dies during step 14, after the step-10 checkpoint
            raise KeyboardInterrupt("simulated crash")
        return original(self)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(data_mod.BatchLoader, "next_batch", crash_late)
    with pytest.raises(KeyboardInterrupt):
        train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), resumed)
    monkeypatch.setattr(data_mod.BatchLoader, "next_batch", original)
    assert json.loads((resumed / "status.json").read_text())["state"] == "interrupted"
    train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra, **{"train.resume": "auto"})), resumed)

    ref_losses, res_losses = train_losses(reference), train_losses(resumed)
    assert res_losses.keys() == ref_losses.keys()
    for step, loss in ref_losses.items():
        assert res_losses[step] == pytest.approx(loss, abs=1e-6), step
    ref_state = torch.load(reference / "checkpoints" / "step_0000020.pt", weights_only=False)["model"]
    res_state = torch.load(resumed / "checkpoints" / "step_0000020.pt", weights_only=False)["model"]
    bias_keys = [k for k in ref_state if k.endswith("expert_bias_E")]
    assert bias_keys and any(ref_state[k].abs().sum() > 0 for k in bias_keys)  # the bias did move
    for k in bias_keys:
        assert torch.equal(ref_state[k], res_state[k]), k


def test_moe_model_counts_active_parameters_and_flops_per_token():
    cfg = ModelConfig(name="m", d_model=32, n_layers=2, n_heads=2, d_ff=64)
    moe = MoEConfig(name="t", n_experts=4, top_k=2, every=2, n_shared=1)
    model = Transformer(cfg, vocab_size=50, max_seq_len=8, moe_cfg=moe)
    dense = Transformer(cfg, vocab_size=50, max_seq_len=8)
    expert = 2 * 32 * 64  # w_in + w_out of one expert (= the dense MLP)
    router = 4 * 32
    # layer 1 is MoE (every=2): 4 routed experts + 1 shared expert + router replace one dense MLP
    assert model.param_counts()["total"] == dense.param_counts()["total"] + 4 * expert + router
    assert model.param_counts()["active"] == dense.param_counts()["total"] + 2 * expert + router
    assert model.flops_per_token(8) == dense.flops_per_token(8) + 6 * (2 * expert + router)


def test_adamw_decays_expert_matrices_and_router_but_not_expert_biases():
    cfg = ModelConfig(name="m", d_model=16, n_layers=1, n_heads=2, d_ff=32, bias=True)
    model = Transformer(cfg, 20, 4, MoEConfig(name="t", n_experts=2, top_k=1))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {"blocks.0.mlp.experts.w_in_EDF", "blocks.0.mlp.w_router_ED"} <= {names[id(p)] for p in decay["params"]}
    assert {"blocks.0.mlp.experts.b_in_EF", "blocks.0.mlp.experts.b_out_ED"} <= {
        names[id(p)] for p in no_decay["params"]
    }
