"""Muon for the hidden matrices and AdamW for everything else, in one `torch.optim.Optimizer`.

Here: batched Newton-Schulz (`newton_schulz`),
`MuonWithAdamW` (muon groups and adamw groups: one state_dict, one LambdaLR) and `build_muon`.
Not here: the LR schedule and plain AdamW (`optim.py`); which parameter goes to Muon (its role, declared by the
module that owns it: `roles.py`).

What comes from torch and what is written here by hand (torch 2.13):
- `torch.optim.Muon` accepts 2-D tensors only, always runs Newton-Schulz in bf16 (6-12x slower than
  fp32 on a 2-core Zen 3 EPYC, which lacks AVX512-BF16) and has no distributed logic, so its step
  cannot be called.
  Its math is replicated op for op instead (momentum and Nesterov by `lerp`, NS with `addmm`,
  decoupled weight decay with the unadjusted lr, then the shape-adjusted lr); with `ns_dtype="bf16"`
  a 2-D update is bit-identical to `torch.optim.Muon` (tests/test_muon.py checks it).
- Written by hand: 3-D stacks (moe.Experts' `w_in_EDF`, ... `[E, d_in, d_out]`, group "muon_experts")
  orthogonalized per expert by one batched NS (`baddbmm`), lr adjusted per expert matrix; same-shape
  2-D matrices stacked into one batched NS as well (faster on CPU; bit-identical to torch's per-matrix
  bf16 result in the parity test); the NS dtype switch; the distributed split.
- The AdamW groups run torch's functional `torch.optim.adamw.adamw`, the code `torch.optim.AdamW`
  runs (foreach / fused), so they equal `torch.optim.AdamW` exactly.

Distributed: under FSDP2 (DTensor parameters on a 1-D mesh) each update matrix is gathered whole
(`full_tensor()`), orthogonalized by one rank (matrices sorted by size, dealt round-robin) and
scattered back to the shards (`distribute_tensor(..., src_data_rank=owner)`); a shard is never
orthogonalized. Under DDP (plain tensors, gradients already all-reduced) each rank orthogonalizes its
share (stacked by shape) and broadcasts it. Momentum buffers stay sharded/local. Other meshes (HSDP,
TP) fall back to every rank orthogonalizing every gathered matrix (correct, but repeated work).

Shape letters: the package legend (scaletrain/__init__.py); here E is the leading dim of a stack of matrices
(experts), I and J the rows and columns of one matrix.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.adamw import adamw as adamw_functional

from scaletrain.config import MuonOptimConfig
from scaletrain.roles import GROUPS, param_roles


def newton_schulz_flops(model: nn.Module, ns_steps: int) -> float:
    """FLOPs of one optimizer step's Newton-Schulz orthogonalizations (every Muon matrix, each expert's own):
    per iteration on the wide orientation (m <= n), A = X X^T costs 2 m^2 n, A^2 2 m^3 and B X 2 m^2 n, so
    ns_steps * (4 m^2 n + 2 m^3) per matrix; the normalization and the momentum update are O(mn) and left out.
    Counted the same under DDP/FSDP2 (the work is dealt out across ranks, not repeated)."""
    total = 0.0
    for r in param_roles(model):
        if r.group not in ("muon", "muon_experts"):
            continue
        *lead, rows, cols = r.param.shape
        m, n = min(rows, cols), max(rows, cols)
        copies = math.prod(lead) if lead else 1
        total += copies * ns_steps * (4.0 * m * m * n + 2.0 * m**3)
    return total


def newton_schulz(
    G: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> Tensor:
    """Approximate orthogonalization U V^T of every matrix in G [..., I, J], returned in `dtype`.

    Quintic iteration X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation (I <= J) so
    A is the smaller Gram matrix; the output singular values land in about [0.7, 1.2], not exactly 1.
    2-D input runs torch.optim.Muon's exact op sequence; more dims run as one batched (baddbmm) NS.
    """
    a, b, c = coefficients
    tall = G.size(-2) > G.size(-1)
    X = G.to(dtype)  # may alias G (e.g. the momentum buffer): X is never modified in place below
    if tall:
        X = X.mT
    if X.ndim == 2:
        X = X / X.norm().clamp(min=eps)  # Frobenius norm >= spectral norm, so all singular values <= 1
        for _ in range(steps):
            A = X @ X.T
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
    else:
        lead = X.shape[:-2]
        X_EIJ = X.reshape(-1, *X.shape[-2:])
        X_EIJ = X_EIJ / X_EIJ.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            A_EII = X_EIJ @ X_EIJ.mT
            B_EII = torch.baddbmm(A_EII, A_EII, A_EII, beta=b, alpha=c)
            X_EIJ = torch.baddbmm(X_EIJ, B_EII, X_EIJ, beta=a)
        X = X_EIJ.reshape(*lead, *X_EIJ.shape[-2:])
    return X.mT if tall else X


def adjusted_lr(lr: float, mode: str, shape: torch.Size, layout: str = "out_in") -> float:
    """Per-matrix lr. `original` (K. Jordan): sqrt(max(1, rows/cols)); `match_rms_adamw` (Moonlight):
    0.2 * sqrt(max(rows, cols)), giving updates with AdamW's RMS so AdamW's lr and wd carry over.

    rows = fan-out, cols = fan-in, as torch.optim.Muon reads an nn.Linear weight [out, in] (layout
    "out_in"); MoE stacks stored [E, in, out] for x @ w (layout "in_out") are read transposed.
    """
    rows, cols = (shape[-2], shape[-1]) if layout == "out_in" else (shape[-1], shape[-2])
    if mode == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if mode == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    raise ValueError(f"optim.muon.adjust_lr: expected original | match_rms_adamw, got {mode!r}")


def ns_dtype_for(setting: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA (K. Jordan's choice), fp32 elsewhere."""
    if setting == "bf16" or (setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if setting in ("fp32", "auto"):
        return torch.float32
    raise ValueError(f"optim.muon.ns_dtype: expected auto | fp32 | bf16, got {setting!r}")


def muon_group(
    params,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients=(3.4445, -4.7750, 2.0315),
    ns_steps: int = 5,
    eps: float = 1e-7,
    adjust_lr: str = "original",
    ns_dtype: str = "auto",
    layout: str = "out_in",
) -> dict:
    """A Muon parameter group for `MuonWithAdamW`: matrices [out, in] (layout "out_in", nn.Linear) or
    stacks of them; layout "in_out" for stacks [E, in, out] (only `adjust_lr=original` reads it)."""
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"layout: expected out_in | in_out, got {layout!r}")
    return dict(
        params=list(params),
        kind="muon",
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        ns_coefficients=tuple(ns_coefficients),
        ns_steps=ns_steps,
        eps=eps,
        adjust_lr=str(adjust_lr),
        ns_dtype=str(ns_dtype),
        layout=layout,
    )


def adamw_group(
    params,
    *,
    lr: float,
    weight_decay: float,
    betas=(0.9, 0.95),
    eps: float = 1e-8,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> dict:
    """An AdamW parameter group for `MuonWithAdamW` (same hyperparameters as torch.optim.AdamW)."""
    return dict(
        params=list(params),
        kind="adamw",
        lr=lr,
        weight_decay=weight_decay,
        betas=tuple(betas),
        eps=eps,
        foreach=foreach,
        fused=fused,
    )


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on groups with kind="muon", AdamW on groups with kind="adamw" (see muon_group/adamw_group).

    One optimizer, so one state_dict (exact resume) and one LambdaLR that scales every group's lr.
    """

    def __init__(self, param_groups: list[dict]):
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            if group.get("kind") not in ("muon", "adamw"):
                raise ValueError("every group needs kind='muon' or 'adamw' (build them with muon_group/adamw_group)")
            if group["kind"] == "muon" and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices or stacks of matrices (ndim >= 2) only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        params, updates, mu = [], [], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)  # EMA form, as torch.optim.Muon
            params.append(p)
            updates.append(p.grad.lerp(buf, mu) if group["nesterov"] else buf)
        if not params:
            return
        for p, ortho in zip(params, _orthogonalize(updates, group)):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(ortho.to(p.dtype), alpha=-adjusted_lr(group["lr"], group["adjust_lr"], p.shape, group["layout"]))

    def _adamw_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # as torch.optim.AdamW: the step count lives on the CPU unless fused
                device = p.device if group["fused"] else "cpu"
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw_functional(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=group["foreach"],
            fused=group["fused"],
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def _orthogonalize(updates: list[Tensor], group: dict) -> list[Tensor]:
    """NS of every update, spread over data-parallel ranks when there are several."""

    def ns(full: Tensor) -> Tensor:
        return newton_schulz(full, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype_of(full))

    def dtype_of(u: Tensor) -> torch.dtype:
        return ns_dtype_for(group["ns_dtype"], u.device)

    split = _work_split(updates)
    if any(isinstance(u, DTensor) for u in updates):
        if split is None:  # a mesh we do not split over: every rank gathers and computes everything
            return [_back_to_shards(ns(_whole(u)), u, src=None) for u in updates]
        return _orthogonalize_sharded(updates, ns, dtype_of, *split)
    rank, world = split or (0, 1)  # one process, or DDP: every rank holds the whole all-reduced update
    owners = _deal(updates, world)
    mine = [i for i, owner in enumerate(owners) if owner == rank]
    done = dict(zip(mine, _ns_stacked([updates[i] for i in mine], ns)))
    if world == 1:
        return [done[i] for i in range(len(updates))]
    out = []
    for i, (u, owner) in enumerate(zip(updates, owners)):
        o = done[i] if owner == rank else torch.empty(u.shape, dtype=dtype_of(u), device=u.device)
        out.append(_back_to_shards(o, u, src=owner))
    return out


def _deal(updates: list[Tensor], world: int) -> list[int]:
    """Owner rank of each update: largest first, round-robin (identical on every rank)."""
    owners = [0] * len(updates)
    order = sorted(range(len(updates)), key=lambda i: updates[i].numel(), reverse=True)  # stable
    for k, i in enumerate(order):
        owners[i] = k % world
    return owners


def _ns_stacked(mats: list[Tensor], ns) -> list[Tensor]:
    """ns of each matrix; 2-D matrices of one shape (tall ones transposed to wide) run as one batched NS,
    which on a 2-core CPU was 1.4-3.5x faster than a loop (fewer, larger GEMMs); a lone one runs 2-D."""
    buckets: dict[object, list[int]] = {}
    for i, m in enumerate(mats):
        key = (tuple(sorted(m.shape)), m.dtype, m.device) if m.ndim == 2 else i
        buckets.setdefault(key, []).append(i)
    out: list[Tensor] = [None] * len(mats)  # type: ignore[list-item]
    for idx in buckets.values():
        if len(idx) == 1:
            out[idx[0]] = ns(mats[idx[0]])
            continue
        tall = [mats[i].size(0) > mats[i].size(1) for i in idx]
        O_EIJ = ns(torch.stack([mats[i].mT if t else mats[i] for i, t in zip(idx, tall)]))
        for i, t, O_IJ in zip(idx, tall, O_EIJ.unbind(0)):
            out[i] = O_IJ.mT if t else O_IJ
    return out


def _orthogonalize_sharded(updates: list[Tensor], ns, dtype_of, rank: int, world: int) -> list[Tensor]:
    """FSDP2: gather `world` matrices at a time (bounded memory), rank r orthogonalizes the r-th of
    them, then scatters it back to the shards."""
    out: list[Tensor] = [None] * len(updates)  # type: ignore[list-item]
    order = sorted(range(len(updates)), key=lambda i: updates[i].numel(), reverse=True)  # balance work
    for start in range(0, len(order), world):
        chunk = order[start : start + world]
        wholes = [_whole(updates[i]) for i in chunk]  # all-gathers, in the same order on every rank
        for owner, (i, whole) in enumerate(zip(chunk, wholes)):
            o = ns(whole) if owner == rank else torch.empty(whole.shape, dtype=dtype_of(whole), device=whole.device)
            out[i] = _back_to_shards(o, updates[i], src=owner)
    return out


def _work_split(updates: list[Tensor]) -> tuple[int, int] | None:
    """(rank, world) to deal matrices over, or None to compute everything locally."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    meshes = {u.device_mesh for u in updates if isinstance(u, DTensor)}
    if not meshes:  # DDP: plain tensors holding the same all-reduced gradient on every rank
        return dist.get_rank(), dist.get_world_size()
    mesh = next(iter(meshes))
    if len(meshes) > 1 or mesh.ndim != 1 or not all(isinstance(u, DTensor) for u in updates):
        return None
    return mesh.get_local_rank(), mesh.size()


def _whole(u: Tensor) -> Tensor:
    """The full matrix: an FSDP2 shard is all-gathered (NS of a shard would be wrong)."""
    return u.full_tensor() if isinstance(u, DTensor) else u


def _back_to_shards(o: Tensor, like: Tensor, src: int | None) -> Tensor:
    """Send rank `src`'s full result `o` where `like` lives (None: every rank already holds it)."""
    if isinstance(like, DTensor):
        return distribute_tensor(o, like.device_mesh, like.placements, src_data_rank=src)
    if src is not None:
        o = o.contiguous()  # NS returns a transposed view for tall matrices; broadcast sends raw memory
        dist.broadcast(o, src=src)
    return o


def build_muon(model: nn.Module, cfg: MuonOptimConfig, foreach: bool, fused: bool) -> MuonWithAdamW:
    """Muon (`cfg.muon`) for hidden matrices; AdamW (`cfg.lr/betas/eps/weight_decay`) for the rest."""
    roles = param_roles(model)
    named = {g: [(r.name, r.param) for r in roles if r.group == g] for g in GROUPS}
    m = cfg.muon
    muon_kw: dict[str, Any] = dict(
        lr=m.lr,
        weight_decay=m.weight_decay,
        momentum=m.momentum,
        nesterov=m.nesterov,
        ns_coefficients=tuple(m.ns_coefficients),
        ns_steps=m.ns_steps,
        eps=m.eps,
        adjust_lr=str(m.adjust_lr),
        ns_dtype=str(m.ns_dtype),
    )  # plain str: checkpoints hold no enums
    adamw_kw: dict[str, Any] = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=foreach, fused=fused)
    groups = [
        muon_group(named["muon"], **muon_kw, layout="out_in"),
        muon_group(named["muon_experts"], **muon_kw, layout="in_out"),
        adamw_group(named["adamw_decay"], **adamw_kw, weight_decay=cfg.weight_decay),
        adamw_group(named["adamw_no_decay"], **adamw_kw, weight_decay=0.0),
    ]
    for group, name in zip(groups, GROUPS):
        group["group"] = name
    return MuonWithAdamW([g for g in groups if g["params"]])
