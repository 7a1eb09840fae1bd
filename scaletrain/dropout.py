"""Dropout for the model's activations: nn.Dropout's semantics with a mask that is cheap to draw on CPU.

Here: `Dropout` only (used by model.py and moe.py). Not here: attention-probability dropout (SDPA's
`dropout_p`, `model.attn_dropout`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Dropout(nn.Module):
    """Dropout with nn.Dropout's semantics (training: each element kept with probability 1 - p and scaled by
    1 / (1 - p); eval or p = 0: identity) and a mask that is cheaper to draw on CPU.

    Written by hand because torch's CPU dropout draws its mask with `bernoulli_`, one generator call and a
    float per element: ~15% of a baseline_10m training step on 2-core Xeons and EPYCs (issue 16). Here one
    64-bit draw from the same default generator (so seeding and checkpointed RNG state cover it) gives four
    15-bit uniforms; an element is kept when its uniform is >= round(p * 2^15). p is thus rounded to a
    multiple of 2^-15 (0.1 -> 0.100006) and the scale is 1 / (1 - that p), so E[y] = x exactly. On GPUs, and
    under torch.compile (which generates its own fused RNG), this is F.dropout.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 2**15)  # uniforms in [0, 2^15): keep u >= threshold
        self.scale = 2**15 / (2**15 - self.threshold) if self.threshold < 2**15 else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()  # uniform in [0, 2^63)
        u = words.view(torch.int16)[:n].view(x.shape) & 0x7FFF  # 4 lanes; the top one has 15 bits, so all use 15
        keep = u >= self.threshold
        if x.dtype == torch.float32:  # one multiply each way: autograd keeps the scaled fp32 mask for backward
            return x * (keep * self.scale)
        return torch.where(keep, x * self.scale, 0.0)  # bf16/fp16: scale in the op's fp32 math, not a rounded mask

    def extra_repr(self) -> str:
        return f"p={self.p}"
