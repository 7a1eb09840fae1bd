"""Muon: Newton-Schulz band, batched = per-matrix, parity with torch.optim.Muon / AdamW, the role
split, exact resume, and 2-process gloo DDP / FSDP2 = one process on the same global batch."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from scaletrain.config import (
    ConfigError,
    ModelConfig,
    MoEConfig,
    MuonConfig,
    MuonOptimConfig,
    ScheduleConfig,
    load_config,
)
from scaletrain.model import Transformer
from scaletrain.moe import MoE
from scaletrain.muon import (
    MuonWithAdamW,
    adamw_group,
    adjusted_lr,
    muon_group,
    newton_schulz,
)
from scaletrain.optim import build_optimizer, build_scheduler
from scaletrain.roles import Role, RoleError, format_param_split, param_roles

from .conftest import compose_cfg

COEFFS = (3.4445, -4.7750, 2.0315)


def _ns(G: torch.Tensor) -> torch.Tensor:
    return newton_schulz(G, COEFFS, steps=5, eps=1e-7, dtype=torch.float32)


def _with_spectrum(rows: int, cols: int, smallest: float, gen: torch.Generator) -> torch.Tensor:
    """A random matrix whose singular values are log-spaced from `smallest` to 1."""
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    return U @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), k)) @ V.T


def _quintic(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = COEFFS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 128)], ids=["square", "tall", "wide"])
def test_newton_schulz_maps_each_singular_value_into_the_quintic_band_and_keeps_the_singular_vectors(shape):
    gen = torch.Generator().manual_seed(0)
    for G in (torch.randn(shape, generator=gen), _with_spectrum(*shape, smallest=1e-2, gen=gen)):
        O = _ns(G)
        assert O.shape == G.shape and O.dtype == torch.float32
        # NS acts on each singular value s / ||G||_F through the scalar quintic, 5 times ...
        s_in = torch.linalg.svdvals(G.double()) / torch.linalg.norm(G.double())
        s_out = torch.linalg.svdvals(O.double())
        expected = _quintic(s_in).sort(descending=True).values  # the quintic is not monotone
        torch.testing.assert_close(s_out, expected, rtol=0, atol=2e-3)
        # ... which lands in [0.5, 1.21] from s / ||G||_F >= 1.07e-3 up (tiny ones, e.g. the smallest
        # singular value of a random square matrix, stay small: Muon barely moves along them).
        reached = s_in > 2e-3
        assert reached.sum() >= min(shape) - 1
        assert 0.5 < _quintic(s_in)[reached].min() and s_out.max() < 1.25
        assert (s_out > 0.5).sum() == reached.sum()
        # ... and keeps the singular vectors: in G's singular bases the output is diagonal.
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        D = U.T @ O @ Vh.T
        assert (D - torch.diag(torch.diagonal(D))).abs().max() < 1e-3


def test_batched_stack_newton_schulz_equals_the_per_matrix_path():
    gen = torch.Generator().manual_seed(1)
    for shape in [(4, 24, 24), (3, 40, 16), (3, 16, 40)]:
        G_EMN = torch.randn(shape, generator=gen)
        per = torch.stack([_ns(G_MN) for G_MN in G_EMN])
        torch.testing.assert_close(_ns(G_EMN), per, rtol=0, atol=1e-6)
    G_ABMN = torch.randn(2, 3, 8, 12, generator=gen)  # more leading dims flatten into one batch
    torch.testing.assert_close(_ns(G_ABMN)[1, 2], _ns(G_ABMN[1, 2]), rtol=0, atol=1e-6)


def test_an_in_out_expert_stack_steps_like_its_experts_as_separate_linear_weights():
    # Stack [E, d_in, d_out] (x @ w, layout in_out) vs E nn.Linear-style [d_out, d_in] matrices: same
    # update, including the `original` lr factor sqrt(max(1, d_out / d_in)) = sqrt(2) here.
    gen = torch.Generator().manual_seed(2)
    w_EIO = torch.randn(3, 12, 24, generator=gen)
    stack = nn.Parameter(w_EIO.clone())
    singles = [nn.Parameter(w.T.clone()) for w in w_EIO]
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr="original", ns_dtype="fp32")
    opt_stack = MuonWithAdamW([muon_group([stack], **kw, layout="in_out")])
    opt_singles = MuonWithAdamW([muon_group(singles, **kw)])
    for _ in range(3):
        g_EIO = torch.randn(3, 12, 24, generator=gen)
        stack.grad = g_EIO.clone()
        for p, g in zip(singles, g_EIO):
            p.grad = g.T.clone()
        opt_stack.step()
        opt_singles.step()
    torch.testing.assert_close(stack.detach(), torch.stack([p.detach().T for p in singles]), rtol=0, atol=1e-6)
    assert adjusted_lr(1.0, "original", stack.shape, "in_out") == pytest.approx(2**0.5)


def _muon_vs_torch(adjust_lr: str, nesterov: bool, ns_dtype: str, steps: int = 4):
    gen = torch.Generator().manual_seed(3)
    # Same-shape matrices (incl. a tall/wide pair) take the stacked batched path; the others run alone.
    init = [torch.randn(s, generator=gen) for s in [(32, 32), (32, 32), (48, 16), (16, 48), (16, 40)]]
    ours, ref = [nn.Parameter(w.clone()) for w in init], [nn.Parameter(w.clone()) for w in init]
    hp = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, ns_steps=5)
    opt = MuonWithAdamW([muon_group(ours, **hp, adjust_lr=adjust_lr, ns_dtype=ns_dtype)])
    opt_ref = torch.optim.Muon(ref, **hp, adjust_lr_fn=adjust_lr)
    for _ in range(steps):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    assert not torch.equal(ours[0], init[0])
    return ours, ref


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_2d_updates_equal_torch_muon_bit_for_bit_over_several_steps(adjust_lr, nesterov):
    # torch.optim.Muon always runs NS in bf16, so the parity check selects bf16 too.
    ours, ref = _muon_vs_torch(adjust_lr, nesterov, ns_dtype="bf16")
    assert all(torch.equal(p, q) for p, q in zip(ours, ref))


def test_fp32_newton_schulz_stays_within_bf16_rounding_of_torch_muon():
    ours, ref = _muon_vs_torch("original", True, ns_dtype="fp32")
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-3)


@pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}])
def test_adamw_groups_equal_torch_adamw_bit_for_bit(impl):
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=gen) for s in [(8, 4), (5,)]]
    ours, ref = [nn.Parameter(w.clone()) for w in init], [nn.Parameter(w.clone()) for w in init]
    opt = MuonWithAdamW([adamw_group(ours, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, **impl)])
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, **impl)
    for _ in range(4):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, ref))


def _dense(**kw) -> Transformer:
    cfg = dict(name="t", d_model=32, n_layers=2, n_heads=2, d_ff=64)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg), vocab_size=50, max_seq_len=8)


def _groups_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["group"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}


def test_dense_split_covers_every_parameter_once_with_roles_where_documented():
    model = _dense(bias=True, qk_norm=True, activation="swiglu")
    opt = build_optimizer(model, MuonOptimConfig(), "cpu")
    groups = _groups_by_name(model, opt)
    all_names = [n for g in groups.values() for n in g]
    assert sorted(all_names) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    hidden = {
        f"blocks.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_in", "mlp.w_gate", "mlp.w_out")
    }
    assert groups["muon"] == hidden
    assert groups["adamw_decay"] == {"W_e.weight", "W_ue.weight"}
    no_decay = groups["adamw_no_decay"]
    assert "tok_emb.weight" in no_decay and "blocks.1.attn.q_norm.weight" in no_decay
    assert all(n.endswith("bias") or "norm" in n or n == "tok_emb.weight" for n in no_decay)
    kinds = {g["group"]: (g["kind"], g["weight_decay"]) for g in opt.param_groups}
    assert kinds == {"muon": ("muon", 0.1), "adamw_decay": ("adamw", 0.1), "adamw_no_decay": ("adamw", 0.0)}
    table = format_param_split(model)
    assert "muon           blocks.0.mlp.w_gate.weight" in table and "total muon: 14 tensors" in table


def test_tied_unembedding_is_listed_once_as_the_token_embedding():
    roles = param_roles(_dense(tie_embeddings=True))
    assert [r.role for r in roles if r.name == "tok_emb.weight"] == ["embedding"]
    assert not any(r.name.startswith("W_ue") for r in roles)


def test_real_moe_layer_sends_expert_stacks_to_muon_and_router_and_expert_biases_to_adamw():
    mcfg = ModelConfig(name="t", d_model=16, n_layers=1, n_heads=2, d_ff=32, bias=True, activation="swiglu")
    model = nn.Module()  # the path the model gives an MoE layer: blocks.N.mlp
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].mlp = moe = MoE(mcfg, MoEConfig(name="m", n_experts=4, top_k=2, n_shared=1))
    roles = {r.name: (r.role, r.group) for r in param_roles(model)}
    assert roles.pop("blocks.0.mlp.w_router_ED") == ("router", "adamw_decay")
    for name, (role, group) in roles.items():
        leaf = name.rsplit(".", 1)[1]  # w_in_EDF / w_gate_EDF / w_out_EFD, b_in_EF / b_gate_EF / b_out_ED
        expected = ("bias", "adamw_no_decay") if leaf.startswith("b_") else ("expert", "muon_experts")
        if leaf == "w_out_EFD":  # writes into the residual stream: its own init scale, the same optimizer group
            expected = ("expert_out", "muon_experts")
        assert (role, group) == expected, name
    assert len(roles) == 12  # routed + shared experts: 3 weights + 3 biases each

    opt = build_optimizer(model, MuonOptimConfig(muon=MuonConfig(adjust_lr="original")), "cpu")
    assert {g["group"]: g["layout"] for g in opt.param_groups if g["kind"] == "muon"} == {"muon_experts": "in_out"}
    before = moe.experts.w_in_EDF.detach().clone()
    y = moe(torch.randn(2, 5, 16))
    (y.pow(2).mean() + moe.aux_loss).backward()
    opt.step()
    # Each expert moved by its own orthogonalized momentum: lr * sqrt(max(1, F / D)) * NS(g_e) (wd aside).
    step_EDF = (moe.experts.w_in_EDF.detach() - before * (1 - 1e-3 * 0.1)) / (-1e-3 * 2**0.5)
    g_EDF = moe.experts.w_in_EDF.grad
    torch.testing.assert_close(
        step_EDF, torch.stack([_ns(g * 0.05 + g * 0.95 * 0.05) for g in g_EDF]), rtol=0, atol=1e-4
    )


class _StandInExperts(nn.Module):
    """A user module declaring its roles: a 2-D `scale` that is not a matrix to orthogonalize, and a router."""

    def __init__(self):
        super().__init__()
        self.w_up = nn.Parameter(torch.randn(4, 16, 24))
        self.scale = nn.Parameter(torch.ones(4, 24))
        self.router = nn.Linear(16, 4, bias=False)

    def param_roles(self) -> dict[str, Role]:
        return {"w_up": Role.expert, "scale": Role.norm, "router.weight": Role.router}


def test_roles_declared_by_the_owning_module_drive_the_optimizer_split():
    model = nn.Module()
    model.blocks = nn.ModuleList([_StandInExperts()])
    roles = {r.name: (r.role, r.group) for r in param_roles(model)}
    assert roles == {
        "blocks.0.w_up": ("expert", "muon_experts"),
        "blocks.0.scale": ("norm", "adamw_no_decay"),
        "blocks.0.router.weight": ("router", "adamw_decay"),
    }


def test_a_parameter_without_a_declared_role_is_an_error_naming_it():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].scale = nn.Parameter(torch.ones(4, 4))
    with pytest.raises(RoleError, match=r"parameter blocks\.0\.scale \(shape \[4, 4\], in Module\) has no role"):
        param_roles(model)


def test_a_declaration_naming_no_parameter_is_an_error_naming_it():
    class Typo(_StandInExperts):
        def param_roles(self) -> dict[str, Role]:
            return {**super().param_roles(), "w_upp": Role.expert}

    with pytest.raises(RoleError, match=r"Typo.param_roles\(\) at <model> names 'w_upp'"):
        param_roles(Typo())


def test_ddp_and_compile_wrapper_prefixes_do_not_change_roles():
    model = _dense()
    wrapper = nn.Module()
    wrapper.module = model
    assert [(r.name, r.role) for r in param_roles(wrapper)] == [(r.name, r.role) for r in param_roles(model)]


def _train(model, opt, sched, steps: int, seed: int, grad_accum: int = 2) -> list[float]:
    """The trainer's step: grad accumulation, clip_grad_norm_ on all parameters, step, schedule."""
    gen, losses = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        for _ in range(grad_accum):
            x = torch.randint(0, 50, (2, 8), generator=gen)
            loss = F.cross_entropy(model(x).logits.flatten(0, 1), x.roll(-1, 1).flatten()) / grad_accum
            loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return losses


def _built(cfg: MuonOptimConfig, max_steps: int = 10):
    torch.manual_seed(0)
    model = _dense(dropout=0.0)
    opt = build_optimizer(model, cfg, "cpu")
    return model, opt, build_scheduler(opt, cfg, max_steps)


def test_resumed_optimizer_continues_exactly_like_the_uninterrupted_run():
    cfg = MuonOptimConfig(
        lr=3e-3,
        schedule=ScheduleConfig(warmup_steps=2),
        muon=MuonConfig(lr=3e-3, adjust_lr="match_rms_adamw", ns_dtype="fp32"),
    )
    model, opt, sched = _built(cfg)
    _train(model, opt, sched, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    straight = _train(model, opt, sched, 3, seed=2)

    model2, opt2, sched2 = _built(cfg)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    resumed = _train(model2, opt2, sched2, 3, seed=2)
    assert resumed == straight
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_the_lr_schedule_scales_muon_and_adamw_groups_by_the_same_factor():
    cfg = MuonOptimConfig(
        lr=1e-3, schedule=ScheduleConfig(warmup_steps=4), muon=MuonConfig(lr=0.02, adjust_lr="original")
    )
    model, opt, sched = _built(cfg)
    _train(model, opt, sched, 2, seed=0, grad_accum=1)
    lrs = {g["group"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"muon": 0.02 * 3 / 4, "adamw_decay": 1e-3 * 3 / 4, "adamw_no_decay": 1e-3 * 3 / 4})


def test_muon_option_composes_with_adamw_settings_reused_and_bad_values_fail_naming_the_key():
    cfg = compose_cfg(["optim=muon", "optim.lr=2e-3"])
    load_config(cfg)
    assert (cfg.optim.muon.lr, cfg.optim.muon.weight_decay, cfg.optim.muon.adjust_lr) == (2e-3, 0.1, "match_rms_adamw")
    with pytest.raises(ConfigError, match="optim.muon.ns_coefficients"):
        load_config(compose_cfg(["optim=muon", "optim.muon.ns_coefficients=[1.0,2.0]"]))


# ---- distributed: 2 gloo processes on CPU ------------------------------------------------------------

DIST_STEPS, DIST_CFG = (
    3,
    MuonOptimConfig(
        lr=1e-2, muon=MuonConfig(lr=1e-2, ns_dtype="fp32"), schedule=ScheduleConfig(warmup_steps=0, decay="constant")
    ),
)


def _global_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 50, (4, 8), generator=gen) for _ in range(DIST_STEPS)]


def _dist_run(model, train_module, rank: int = 0, world: int = 1) -> None:
    """DIST_STEPS steps on this rank's rows of each global batch (all rows when world == 1)."""
    opt = build_optimizer(train_module, DIST_CFG, "cpu")
    for x in _global_batches():
        x = x.chunk(world)[rank]
        loss = F.cross_entropy(train_module(x).logits.flatten(0, 1), x.roll(-1, 1).flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train_module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    import scaletrain.muon as muon

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ns_calls = []
    ns = muon.newton_schulz
    muon.newton_schulz = lambda *a, **k: (ns_calls.append(tuple(a[0].shape)), ns(*a, **k))[1]
    result = {}
    for mode in ("ddp", "fsdp2"):
        torch.manual_seed(0)
        model = _dense(dropout=0.0)
        if mode == "ddp":
            wrapped = DistributedDataParallel(model)
        else:
            for block in model.blocks:
                fully_shard(block)
            wrapped = fully_shard(model)
        ns_calls.clear()
        _dist_run(model, wrapped, rank, world)
        full = {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()
        }
        result[mode] = {"params": full, "ns_shapes": list(ns_calls)}
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_ddp_and_fsdp2_equal_one_process_with_the_work_split_across_ranks(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    reference = _dense(dropout=0.0)
    _dist_run(reference, reference)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    muon_shapes = [tuple(sorted(r.param.shape)) for r in param_roles(reference) if r.group == "muon"]
    for mode in ("ddp", "fsdp2"):
        for r in ranks:
            for name, ref in reference.named_parameters():
                torch.testing.assert_close(r[mode]["params"][name], ref.detach(), rtol=1e-4, atol=1e-5, msg=name)
        # Each whole matrix is orthogonalized once per step, by one rank; the ranks share the work evenly.
        per_rank = [_matrices_in(r[mode]["ns_shapes"]) for r in ranks]
        assert per_rank[0] + per_rank[1] == Counter(muon_shapes * DIST_STEPS), mode
        assert [c.total() for c in per_rank] == [len(muon_shapes) * DIST_STEPS // 2] * 2, mode


def _matrices_in(ns_call_shapes: list[tuple[int, ...]]) -> Counter:
    """Orientation-free shapes of the matrices NS was called on (a 3-D call is a stack of them)."""
    count: Counter = Counter()
    for shape in ns_call_shapes:
        n, mn = (shape[0], shape[1:]) if len(shape) == 3 else (1, shape)
        count[tuple(sorted(mn))] += n
    return count
