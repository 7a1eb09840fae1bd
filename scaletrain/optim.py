"""Optimizer and LR-schedule builders.

Here: weight-decay parameter groups, the built-in builders (AdamW, fused on CUDA and CPU, foreach elsewhere; Muon,
from `muon.py`), `build_optimizer` (calls the builder the config's `_target_` names) and `lr_at` / `build_scheduler`
(linear warmup, then cosine, linear, WSD or constant). Not here: Muon's update itself (`muon.py`).
A new optimizer (here or in a plugin package): a schema subclassing config.OptimConfig whose `_target_` names its
builder, and a YAML in an `optim/` config folder (examples/scaletrain_lion).

Decay policy (as in nanoGPT / OLMo): weight decay only on matrices that multiply activations; no
decay on norms, biases (including stacked MoE expert biases) or the token embedding. W_e, W_ue and the
MoE router are linear maps and are decayed. Roles come from `roles.param_roles`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scaletrain.config import (
    AdamWConfig,
    Decay,
    MuonOptimConfig,
    OptimConfig,
    OptimImpl,
    ScheduleConfig,
    resolve_target,
)
from scaletrain.muon import build_muon
from scaletrain.roles import param_roles


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay / no-decay groups from the parameter roles that also drive Muon's split (roles.py), so AdamW and
    Muon runs agree on what is decayed. Public: a plugin optimizer builds its groups with it."""
    decay, no_decay = [], []
    for r in param_roles(model):
        (decay if r.role.decay else no_decay).append(r.param)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]


def _impl_flags(impl: OptimImpl, device_type: str) -> dict[str, bool]:
    """torch's fused / foreach switches for `optim.implementation`."""
    if impl == OptimImpl.auto:
        # fused on CPU too: baseline_10m AdamW step 9.5 ms fused vs 27 ms for-loop vs 50 ms foreach (2-core Zen 3)
        impl = OptimImpl.fused if device_type in ("cuda", "cpu") else OptimImpl.foreach
    return {"fused": impl == OptimImpl.fused, "foreach": impl == OptimImpl.foreach}


def build_adamw(model: nn.Module, cfg: AdamWConfig, device_type: str) -> torch.optim.Optimizer:
    """torch AdamW on the decay / no-decay groups."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        **_impl_flags(cfg.implementation, device_type),
    )


def build_muon_with_adamw(model: nn.Module, cfg: MuonOptimConfig, device_type: str) -> torch.optim.Optimizer:
    """Muon on hidden matrices, AdamW (the inherited AdamW settings) on the rest, in one optimizer."""
    return build_muon(model, cfg, **_impl_flags(cfg.implementation, device_type))


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """The optimizer `cfg` names: its `_target_` builder (`fn(model, cfg, device_type)`: the built-ins above or a
    plugin's), checked to return a torch Optimizer (the LR schedule and the checkpoint need one)."""
    builder = resolve_target(cfg._target_, "optim._target_")
    optimizer = builder(model, cfg, device_type)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optim._target_={cfg._target_} returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
        )
    return optimizer


def lr_at(step: int, max_steps: int, base_lr: float, s: ScheduleConfig) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to base_lr, then the configured decay."""
    min_lr = base_lr * s.min_lr_ratio
    warmup = min(s.warmup_steps, max_steps)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if s.decay == Decay.constant:
        return base_lr
    if s.decay == Decay.wsd:
        decay_start = max(warmup, max_steps - int(round(s.decay_frac * max_steps)))
        if step < decay_start:
            return base_lr
        progress = (step - decay_start) / max(1, max_steps - decay_start)
        return base_lr + (min_lr - base_lr) * min(1.0, progress)
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if s.decay == Decay.linear:
        return base_lr + (min_lr - base_lr) * progress
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """A LambdaLR whose state (last_epoch) is checkpointed with the optimizer."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, max_steps, cfg.lr, cfg.schedule) / cfg.lr
    )
