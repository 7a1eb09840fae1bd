"""Sliding-window causal attention (Mistral 7B; Longformer's local attention): each query sees itself and the
`window - 1` positions before it, so a layer's receptive field is `window` tokens and stacking L layers reaches
L * (window - 1) tokens back.

Shapes: scaletrain's legend (B batch, H heads, K head dim, T query positions), except S, which here is the key
axis as in scaletrain's `Attention.attend` (cache slots 0..S-1; S = T on the training path), not routed slots.

Here: the banded mask (`sliding_window_mask`, a plain function so the math is testable on its own) and the
`Attention` subclass that applies it. Not here: projections, RoPE, the KV cache and left padding, which
scaletrain's `Attention` owns; this class only replaces how the scores are masked. The cache is still the full
context: the memory saving of a rolling window-sized cache would need scaletrain's KVCache to support it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from scaletrain.config import ModelConfig
from scaletrain.model import Attention, RotaryEmbedding

if TYPE_CHECKING:  # the schema needs scaletrain's config layer; this module only reads its `window`
    from scaletrain_lion.schemas import SlidingWindowConfig


def sliding_window_mask(T_q: int, S: int, start: int, window: int, device: torch.device | str) -> torch.Tensor:
    """bool [T_q, S]: query i sits at slot s = start + i and may see key slot j iff s - window < j <= s.

    Slots, not RoPE positions, are compared: with left padding a row's positions are its slots shifted by its
    pad count, the same shift for its queries and keys, so the slot difference is the position difference."""
    s_T1 = torch.arange(start, start + T_q, device=device)[:, None]
    j_1S = torch.arange(S, device=device)[None, :]
    return (j_1S <= s_T1) & (j_1S > s_T1 - window)


class SlidingWindowAttention(Attention):
    """scaletrain's attention with the causal mask narrowed to a band of `window` keys per query."""

    def __init__(self, cfg: ModelConfig, attn: SlidingWindowConfig, rope: RotaryEmbedding):
        super().__init__(cfg, attn, rope)
        self.window = attn.window

    def attend(
        self,
        q_BHTK: torch.Tensor,
        k_BHTK: torch.Tensor,
        v_BHTK: torch.Tensor,
        allowed_B1TT: torch.Tensor | None,
        start: int,
    ) -> torch.Tensor:
        """SDPA under the band; `allowed_B1TT` (generation: real keys at or before each query, padding queries
        see themselves) is narrowed by it. The band always keeps the diagonal, so no query loses every key."""
        T, S = q_BHTK.shape[2], k_BHTK.shape[2]  # queries, keys (both sequence positions: T in the legend)
        mask_TT = sliding_window_mask(T, S, start, self.window, q_BHTK.device)
        mask = mask_TT if allowed_B1TT is None else allowed_B1TT & mask_TT
        # the base class's SDPA call (dropout in training, grouped-query heads) under this mask instead of is_causal
        return super().attend(q_BHTK, k_BHTK, v_BHTK, mask, start)
