"""Lion, the sign-momentum optimizer of Chen et al. 2023 ("Symbolic Discovery of Optimization Algorithms",
arXiv 2302.06675, Algorithm 2), and the builder scaletrain calls for `optim=lion`.

Per parameter p with gradient g, momentum m (state key "exp_avg", zeros at the first step), betas (b1, b2),
learning rate lr and decoupled weight decay wd:

    c = b1 * m + (1 - b1) * g           # interpolation that only feeds the sign
    p = p - lr * (sign(c) + wd * p)     # every coordinate moves by exactly lr (sign(0) = 0: torch.sign)
    m = b2 * m + (1 - b2) * g           # the momentum itself uses the slower b2

Here: the optimizer and `build_lion`. Not here: the config schema (`schemas.py`; at import this file needs only
torch, scaletrain is imported inside `build_lion`), the learning rate schedule (scaletrain's LambdaLR scales every
group's `lr`, which `step` reads afresh each call).

The update is written as the paper's expression, one elementwise torch op per arithmetic step, in the paper's
order. Nothing is fused (no `lerp`, no `addcmul`), so the result equals a line-by-line transcription of the
pseudo-code bit for bit, and the ops work unchanged on DTensor shards (FSDP2): there is no reduction anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the schema lives with scaletrain's config layer; the builder only reads its fields
    from scaletrain_lion.schemas import LionConfig


class Lion(torch.optim.Optimizer):
    """Lion with decoupled weight decay; every group may set its own lr, betas and weight_decay."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ):
        if not lr > 0:
            raise ValueError(f"Lion: lr must be positive, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas must be two values in [0, 1), got {betas}")
        if not weight_decay >= 0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    # torch types the closure's loss as float; closures return the loss tensor, which `step` hands back as is
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float] | None = None) -> torch.Tensor | float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():  # the closure runs a forward/backward, which no_grad would break
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:  # no gradient this step (unused parameter): leave p and its momentum alone
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                _lion_update(p, p.grad, state["exp_avg"], b1, b2, lr, wd)
        return loss


def _lion_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, b1: float, b2: float, lr: float, wd: float) -> None:
    """One parameter's update, in place on p and m, as the paper's three lines (in-place `mul_`/`add_` round
    exactly as the out-of-place `*`/`+` of the pseudo-code: the same kernels on the same operands)."""
    c = b1 * m + (1 - b1) * g
    p.sub_(lr * (torch.sign(c) + wd * p))
    m.mul_(b2).add_((1 - b2) * g)


def build_lion(model: torch.nn.Module, cfg: LionConfig, device_type: str) -> torch.optim.Optimizer:
    """`optim=lion`: Lion on scaletrain's decay / no-decay groups (norms, biases, embeddings are not decayed).
    `device_type` is part of the builder signature scaletrain calls; Lion has no per-device kernel choice."""
    from scaletrain.optim import param_groups  # the one definition of which parameters decay

    return Lion(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))
