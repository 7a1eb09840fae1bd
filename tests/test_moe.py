"""MoE layer: parity with the dense MLP and with a naive per-token reference, balancing losses,
capacity dropping, aux-loss-free bias, torch.compile, and the `moe` config group."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scaletrain.config import ConfigError, ModelConfig, MoEConfig, load_config
from scaletrain.model import MLP
from scaletrain.moe import MoE, inactive_params, moe_matmul_params, moe_metrics, pick_impl

from .conftest import compose_cfg


def make(n_experts=8, top_k=2, d_model=32, d_ff=64, activation="relu", bias=False, **moe) -> MoE:
    torch.manual_seed(0)
    # n_heads=1: an MoE layer has no attention, and 1 divides any d_model (ModelConfig checks d_model % n_heads)
    mc = ModelConfig(name="t", d_model=d_model, d_ff=d_ff, n_layers=2, n_heads=1, activation=activation, bias=bias)
    return MoE(mc, MoEConfig(name="t", n_experts=n_experts, top_k=top_k, **moe))


def run(layer: MoE, x_BTD: torch.Tensor, impl: str, dtype=torch.float32):
    """Forward + backward of mean(y^2) + aux; returns output, input grad and parameter grads."""
    layer.moe_cfg.impl = impl
    layer.zero_grad(set_to_none=True)
    x_BTD = x_BTD.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        y_BTD = layer(x_BTD)
    (y_BTD.float().pow(2).mean() + layer.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y_BTD.detach().float(), x_BTD.grad.clone(), grads


def naive_reference(layer: MoE, x_BTD: torch.Tensor) -> torch.Tensor:
    """Token by token, choice by choice: y_n = sum_k gate_nk * expert_{e_nk}(x_n) (dropless)."""
    x_ND = x_BTD.flatten(0, 1)
    _, _, experts_NK, gates_NK = layer.route(x_ND)
    ex = layer.experts
    rows = []
    for n in range(x_ND.shape[0]):
        y_D = torch.zeros(x_ND.shape[1])
        for k in range(layer.top_k):
            e = int(experts_NK[n, k])
            h_F = x_ND[n] @ ex.w_in_EDF[e] + (ex.b_in_EF[e] if ex.b_in_EF is not None else 0)
            if ex.w_gate_EDF is not None:
                g_F = x_ND[n] @ ex.w_gate_EDF[e] + (ex.b_gate_EF[e] if ex.b_gate_EF is not None else 0)
                h_F = torch.nn.functional.silu(g_F) * h_F
            else:
                h_F = torch.relu(h_F)
            out_D = h_F @ ex.w_out_EFD[e] + (ex.b_out_ED[e] if ex.b_out_ED is not None else 0)
            y_D = y_D + gates_NK[n, k] * out_D
        rows.append(y_D)
    return torch.stack(rows).view(x_BTD.shape)


def assert_same_run(a, b, atol=1e-5, rtol=1e-4):
    (ya, gxa, ga), (yb, gxb, gb) = a, b
    torch.testing.assert_close(ya, yb, atol=atol, rtol=rtol)
    torch.testing.assert_close(gxa, gxb, atol=atol, rtol=rtol)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


# --- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation,bias", [("relu", False), ("gelu", True), ("swiglu", True)])
@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_moe_with_one_expert_and_top1_matches_dense_mlp(activation, bias, impl):
    layer = make(n_experts=1, top_k=1, activation=activation, bias=bias, aux_loss_coef=0.0, z_loss_coef=0.0)
    mlp = MLP(layer.cfg, layer.cfg.mlp)
    ex = layer.experts
    with torch.no_grad():
        ex.w_in_EDF[0].copy_(mlp.w_in.weight.T)
        ex.w_out_EFD[0].copy_(mlp.w_out.weight.T)
        if activation == "swiglu":
            ex.w_gate_EDF[0].copy_(mlp.w_gate.weight.T)
        if bias:
            ex.b_in_EF[0].copy_(mlp.w_in.bias)
            ex.b_out_ED[0].copy_(mlp.w_out.bias)
            if activation == "swiglu":
                ex.b_gate_EF[0].copy_(mlp.w_gate.bias)
    x = torch.randn(2, 6, 32, requires_grad=True)
    y_dense = mlp(x)
    y_dense.pow(2).mean().backward()
    y_moe, gx, grads = run(layer, x, impl)
    torch.testing.assert_close(y_moe, y_dense.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(grads["experts.w_in_EDF"][0], mlp.w_in.weight.grad.T, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(grads["experts.w_out_EFD"][0], mlp.w_out.weight.grad.T, atol=1e-7, rtol=1e-5)
    if bias:
        torch.testing.assert_close(grads["experts.b_in_EF"][0], mlp.w_in.bias.grad, atol=1e-7, rtol=1e-5)
    assert layer.dispatch.startswith(impl)


@pytest.mark.parametrize(
    "capacity_factor,activation,bias,score",
    [
        (None, "relu", False, "softmax"),
        (1.0, "relu", False, "softmax"),
        (None, "swiglu", True, "softmax"),
        (1.0, "swiglu", True, "sigmoid"),
        (1.0, "gelu", True, "softmax"),
        (None, "gelu", False, "sigmoid"),
    ],
)
def test_grouped_path_matches_loop_reference_with_idle_experts(capacity_factor, activation, bias, score):
    layer = make(activation=activation, bias=bias, capacity_factor=capacity_factor, n_shared=1, score=score)
    layer.expert_bias_E[5:] = -1e4  # experts 5, 6, 7 never selected: empty groups
    x = torch.randn(2, 12, 32)
    grouped, loop = run(layer, x, "grouped"), run(layer, x, "loop")
    assert layer.stats["tokens_per_expert"][5:].sum() == 0
    assert_same_run(grouped, loop)
    assert grouped[2]["experts.w_in_EDF"][5:].abs().sum() == 0  # idle experts get exactly zero gradient
    if capacity_factor is not None:
        assert layer.stats["dropped_frac"] > 0


def test_dropless_grouped_path_matches_a_naive_per_token_loop():
    layer = make(activation="swiglu", bias=True)
    layer.expert_bias_E[6:] = -1e4
    x = torch.randn(2, 8, 32)
    y, _, _ = run(layer, x, "grouped")
    with torch.no_grad():
        torch.testing.assert_close(y, naive_reference(layer, x), atol=1e-5, rtol=1e-4)


def test_grouped_path_matches_loop_in_bf16_autocast():
    layer = make(activation="swiglu", capacity_factor=1.25)
    x = torch.randn(2, 16, 32)
    yg, gxg, gg = run(layer, x, "grouped", torch.bfloat16)
    assert layer.dispatch == "grouped (grouped_mm on cpu bfloat16)"
    yl, gxl, _ = run(layer, x, "loop", torch.bfloat16)
    torch.testing.assert_close(yg, yl, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(gxg, gxl, atol=2e-4, rtol=5e-2)
    y32, _, _ = run(layer, x, "grouped")
    torch.testing.assert_close(yg, y32, atol=5e-3, rtol=5e-2)  # bf16 close to fp32
    assert gg["experts.w_in_EDF"].dtype == torch.float32  # parameters and grads stay fp32


# --- losses ---------------------------------------------------------------------------------------


def test_aux_loss_for_uniform_router_probabilities_equals_its_coefficient():
    layer = make(aux_loss_coef=0.01, z_loss_coef=0.0)
    nn.init.zeros_(layer.w_router_ED)  # every token: probability 1/E for each expert
    layer(torch.randn(2, 8, 32))
    assert layer.stats["aux_loss"].item() == pytest.approx(1.0, abs=1e-6)
    assert layer.aux_loss.item() == pytest.approx(0.01, abs=1e-8)


def test_aux_loss_for_perfectly_balanced_routing_and_for_collapse_match_analytic_values():
    E, D = 8, 32
    layer = make(top_k=1, aux_loss_coef=1.0, z_loss_coef=0.0)
    with torch.no_grad():
        layer.w_router_ED.copy_(torch.eye(E, D) * 5.0)
    x_ND = torch.eye(E, D).repeat(4, 1)  # token n prefers expert n % E: f_e = 1/E, P_e = 1/E by symmetry
    layer(x_ND[None])
    assert layer.stats["load_max_over_mean"].item() == 1.0
    assert layer.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    x_ND = torch.eye(E, D)[[3]].repeat(32, 1)  # every token picks expert 3: aux = E * p_3
    layer(x_ND[None])
    p3 = math.exp(5.0) / (math.exp(5.0) + E - 1)
    assert layer.aux_loss.item() == pytest.approx(E * p3, rel=1e-6)
    assert layer.stats["load_max_over_mean"].item() == E


def test_z_loss_equals_mean_squared_logsumexp_on_fixed_logits():
    E, D = 4, 8
    layer = make(n_experts=E, top_k=2, d_model=D, aux_loss_coef=0.0, z_loss_coef=0.5)
    with torch.no_grad():
        layer.w_router_ED.copy_(torch.eye(E, D))
    x_ND = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0, 0, 0, 0], [0.0, 0.0, 0.0, -1.0, 0, 0, 0, 0]])
    layer(x_ND[None])
    lse = [math.log(sum(math.exp(v) for v in row[:E])) for row in x_ND.tolist()]
    expected = sum(v * v for v in lse) / len(lse)
    assert layer.stats["z_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert layer.aux_loss.item() == pytest.approx(0.5 * expected, rel=1e-6)


# --- capacity -------------------------------------------------------------------------------------


def routed_layer(n_tokens_first: list[int], impl: str, capacity_factor: float) -> tuple[MoE, torch.Tensor]:
    """E=2, top-2, D=8: token n's logits are (a_n, b_n) on dims 0, 1; the other dims feed the experts."""
    layer = make(n_experts=2, top_k=2, d_model=8, d_ff=16, capacity_factor=capacity_factor, impl=impl)
    with torch.no_grad():
        layer.w_router_ED.copy_(torch.eye(2, 8))
    x_ND = torch.randn(len(n_tokens_first), 8)
    x_ND[:, :2] = torch.tensor([[2.0, 0.0] if e == 0 else [0.0, 2.0] for e in n_tokens_first])
    return layer, x_ND


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_capacity_drops_exactly_the_overflow_slots_in_priority_order(impl):
    # Tokens 0-2 choose expert 0 first, token 3 expert 1. Capacity = ceil(4 * 2 * 0.5 / 2) = 2 slots.
    # Queue of expert 0: first choices 0, 1, 2, then token 3's second choice -> serves tokens 0, 1.
    # Queue of expert 1: token 3's first choice, then second choices 0, 1, 2 -> serves tokens 3, 0.
    layer, x_ND = routed_layer([0, 0, 0, 1], impl, capacity_factor=0.5)
    layer.eval()
    y_ND = layer(x_ND[None])[0]
    _, _, experts_NK, gates_NK = layer.route(x_ND)
    expert = [lambda v, e=e: layer.experts.one(v[None], e, torch.float32)[0] for e in range(2)]
    g = gates_NK.detach()
    expected = torch.stack(
        [
            g[0, 0] * expert[0](x_ND[0]) + g[0, 1] * expert[1](x_ND[0]),
            g[1, 0] * expert[0](x_ND[1]),
            torch.zeros(8),
            g[3, 0] * expert[1](x_ND[3]),
        ]
    )
    assert experts_NK.tolist() == [[0, 1], [0, 1], [0, 1], [1, 0]]
    torch.testing.assert_close(y_ND, expected.detach(), atol=1e-6, rtol=1e-5)
    assert layer.stats["dropped_frac"].item() == 0.5
    assert layer.stats["tokens_per_expert"].tolist() == [4.0, 4.0]  # counted before capacity
    assert torch.equal(x_ND[2] + y_ND[2], x_ND[2])  # fully dropped token passes through the residual


def test_capacity_keeps_earlier_tokens_when_one_expert_overflows_with_top1():
    layer = make(n_experts=2, top_k=1, d_model=8, d_ff=16, capacity_factor=0.5)  # capacity 2 of 8 tokens
    with torch.no_grad():
        layer.w_router_ED.copy_(torch.eye(2, 8))
    x_ND = torch.randn(8, 8)
    x_ND[:, :2] = torch.tensor([[3.0, 0.0]] * 6 + [[0.0, 3.0]] * 2)
    y_ND = layer(x_ND[None])[0]
    served = (y_ND.abs().sum(-1) > 0).tolist()
    assert served == [True, True, False, False, False, False, True, True]
    assert layer.stats["dropped_frac"].item() == pytest.approx(0.5)


# --- aux-loss-free balancing ----------------------------------------------------------------------


def test_aux_loss_free_bias_moves_a_skewed_router_toward_balance():
    layer = make(top_k=2, bias_update_rate=0.01, aux_loss_coef=0.0)
    with torch.no_grad():
        layer.w_router_ED.normal_(0.0, 0.3)  # varied preferences across tokens ...
        layer.w_router_ED[0, 0] = 4.0  # ... but dim 0 is 1 for every token: expert 0 is everyone's favourite
    x = torch.randn(4, 64, 32)
    x[..., 0] = 1.0
    layer.train()
    skew = []
    for _ in range(80):
        layer(x[:2])
        layer(x[2:])  # two micro-batches per optimizer step: their loads add up
        load_E = layer.load_acc_E.clone()
        assert load_E.sum().item() == 4 * 64 * 2
        skew.append((load_E.max() / load_E.mean()).item())
        layer.update_bias()
        assert layer.load_acc_E.sum().item() == 0
    assert skew[0] > 3.0
    assert sum(skew[-20:]) / 20 < 1.5
    assert layer.expert_bias_E[0] < 0 < layer.expert_bias_E[1:].min()
    assert "expert_bias_E" in layer.state_dict() and "load_acc_E" not in layer.state_dict()


def test_selection_bias_changes_which_experts_are_chosen_but_not_the_gates():
    layer = make(top_k=2)
    x_ND = torch.randn(16, 32)
    layer.expert_bias_E[3] = 10.0
    _, scores_NE, experts_NK, gates_NK = layer.route(x_ND)
    assert (experts_NK == 3).any(-1).all()
    p = scores_NE.gather(1, experts_NK)
    torch.testing.assert_close(gates_NK, p / p.sum(-1, keepdim=True))


def test_router_jitter_is_random_in_training_and_off_in_eval():
    layer = make(router_jitter=0.5)
    x = torch.randn(1, 16, 32)
    layer.train()
    logits_a, logits_b = layer.route(x[0])[0], layer.route(x[0])[0]
    assert not torch.equal(logits_a, logits_b)
    layer.eval()
    torch.testing.assert_close(layer.route(x[0])[0], x[0] @ layer.w_router_ED.T)


# --- torch.compile --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_forward_and_backward_match_eager(dtype):
    torch._dynamo.reset()
    layer = make(activation="swiglu", capacity_factor=1.0)
    x = torch.randn(2, 8, 32)
    eager = run(layer, x, "auto", dtype)
    compiled_fn = torch.compile(layer, fullgraph=True)  # fullgraph: the grouped path has no graph breaks
    layer.zero_grad(set_to_none=True)
    xc = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        y = compiled_fn(xc)
    (y.float().pow(2).mean() + layer.aux_loss).backward()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-3, rtol=5e-2)
    torch.testing.assert_close(y.detach().float(), eager[0], **tol)
    torch.testing.assert_close(xc.grad, eager[1], **tol)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, eager[2][name], **tol, msg=lambda m, name=name: f"{name}: {m}")
    assert layer.dispatch.startswith("grouped")


# --- dispatch, counting, helpers ------------------------------------------------------------------


def test_auto_dispatch_picks_grouped_where_supported_and_explains_fallbacks():
    cpu = torch.device("cpu")
    assert pick_impl("auto", cpu, torch.float32, (32, 64))[0] == "grouped"
    impl, why = pick_impl("auto", cpu, torch.float32, (30, 64))  # 120-byte rows: not 16-byte aligned
    assert impl == "loop" and "16 bytes" in why
    with pytest.raises(RuntimeError, match="moe.impl=grouped"):
        pick_impl("grouped", cpu, torch.float32, (30, 64))
    layer = make(d_model=30, d_ff=60)
    layer(torch.randn(1, 4, 30)).sum().backward()  # trains through the fallback
    assert layer.dispatch.startswith("loop")


def test_parameter_counts_separate_total_from_active_per_token():
    D, F, E, K = 32, 64, 8, 2
    layer = make(n_experts=E, top_k=K, d_model=D, d_ff=F, n_shared=1)
    c = layer.param_counts()
    expert = 2 * D * F
    assert c["total"] == E * D + E * expert + expert == sum(p.numel() for p in layer.parameters())
    assert c["active"] == c["matmul"] == E * D + K * expert + expert
    model = nn.Sequential(layer, make(n_experts=E, top_k=K, d_model=D, d_ff=F, n_shared=1))
    assert inactive_params(model) == 2 * (E - K) * expert
    assert moe_matmul_params(model) == 2 * c["matmul"]


def test_model_level_metrics_are_reported_per_layer_and_over_layers():
    model = nn.Sequential(make(), make())
    model[1].layer_idx = 3
    model(torch.randn(1, 8, 32))
    scalars, loads = moe_metrics(model)
    for key in ("aux_loss", "z_loss", "load_max_over_mean", "dropped_frac", "router_entropy", "bias_norm"):
        assert f"moe/{key}" in scalars and f"moe/layer0/{key}" in scalars and f"moe/layer3/{key}" in scalars
    layer0, layer3 = scalars["moe/layer0/aux_loss"], scalars["moe/layer3/aux_loss"]
    assert scalars["moe/aux_loss"] == pytest.approx((layer0 + layer3) / 2)  # the mean over layers ...
    worst = max(scalars["moe/layer0/load_max_over_mean"], scalars["moe/layer3/load_max_over_mean"])
    assert scalars["moe/load_max_over_mean"] == worst  # ... but the worst layer's load
    assert sum(loads["moe/layer3/tokens_per_expert"]) == 8 * 2
    assert moe_metrics(nn.Linear(2, 2)) == ({}, {})


# --- config ---------------------------------------------------------------------------------------


def test_moe_8x_model_composes_with_eight_experts_top2_on_the_baseline_dimensions():
    cfg = compose_cfg(["model=moe_8x"])
    load_config(cfg)
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads, m.d_ff, m.activation, m.norm, m.dropout) == (
        512,
        3,
        4,
        2048,
        "relu",
        "layernorm",
        0.1,
    )
    assert (cfg.moe.name, cfg.moe.n_experts, cfg.moe.top_k) == ("top2_8e", 8, 2)


def test_command_line_moe_choice_overrides_the_model_file():
    dense = compose_cfg(["model=moe_8x", "moe=none"])
    assert (dense.model.name, dense.moe.n_experts) == ("moe_8x", 0)
    top1 = compose_cfg(["model=moe_8x", "moe.top_k=1"])
    assert (top1.moe.name, top1.moe.n_experts, top1.moe.top_k) == ("top2_8e", 8, 1)
    fine = compose_cfg(["model=moe_8x", "moe=fine_64e_top6_shared1"])
    assert (fine.moe.n_experts, fine.moe.top_k, fine.moe.n_shared) == (64, 6, 1)


@pytest.mark.parametrize(
    "override,key",
    [
        ("moe.top_k=9", "moe.top_k"),
        ("moe.top_k=0", "moe.top_k"),
        ("moe.capacity_factor=0", "moe.capacity_factor"),
        ("moe.every=4", "moe.every"),
        ("moe.router_jitter=1.0", "moe.router_jitter"),
        ("moe.aux_loss_coef=-1", "moe.aux_loss_coef"),
    ],
)
def test_inconsistent_moe_settings_fail_validation_naming_the_key(override, key):
    cfg = compose_cfg(["model=moe_8x", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(cfg)
