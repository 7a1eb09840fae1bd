"""Sliding-window attention (scaletrain_lion/attention.py): the banded mask against its definition, SDPA under
it against a naive softmax loop, and the generation path against the training path.

Tolerances: the comparisons run in fp64 (eps = 2.2e-16) on inputs of size O(1). SDPA and the loop compute the
same softmax-weighted sums over at most 12 keys in different orders and with different exp implementations,
each step off by a few eps relative, so results differ by well under 100 eps ~ 2e-14; atol = rtol = 1e-12
leaves a 50x margin and still fails on any masking error (a wrongly included key moves outputs by ~0.1).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from scaletrain.config import ModelConfig
from scaletrain.model import RotaryEmbedding

from scaletrain_lion.attention import SlidingWindowAttention, sliding_window_mask
from scaletrain_lion.schemas import SlidingWindowConfig

ATOL = RTOL = 1e-12


def loop_mask(T_q: int, S: int, start: int, window: int) -> list[list[bool]]:
    return [[start + i - window < j <= start + i for j in range(S)] for i in range(T_q)]


def naive_attention(q_BHTK, k_BGSK, v_BGSK, allowed_BHTS) -> torch.Tensor:
    """Softmax attention one query position at a time; key/value head g serves query heads g*H/G..(g+1)*H/G-1,
    as SDPA's enable_gqa does."""
    H, G, T, K = q_BHTK.shape[1], k_BGSK.shape[1], q_BHTK.shape[2], q_BHTK.shape[3]
    k_BHSK, v_BHSK = k_BGSK.repeat_interleave(H // G, dim=1), v_BGSK.repeat_interleave(H // G, dim=1)
    allowed_BHTS = allowed_BHTS.expand(q_BHTK.shape[0], H, T, k_BHSK.shape[2])
    o_BHTK = torch.empty_like(q_BHTK)
    for i in range(T):
        scores_BHS = torch.einsum("bhk,bhsk->bhs", q_BHTK[:, :, i], k_BHSK) / math.sqrt(K)
        probs_BHS = scores_BHS.masked_fill(~allowed_BHTS[:, :, i], -math.inf).softmax(dim=-1)
        o_BHTK[:, :, i] = torch.einsum("bhs,bhsk->bhk", probs_BHS, v_BHSK)
    return o_BHTK


def sliding_attention(window: int, n_heads: int, n_kv_heads: int) -> SlidingWindowAttention:
    """The module as scaletrain builds it (`cls(model_cfg, attention_cfg, rope)`); `attend` gets q, k, v directly,
    so its projections and rotary table are never used here."""
    cfg = ModelConfig(name="test", d_model=8 * n_heads, n_heads=n_heads, n_kv_heads=n_kv_heads)
    rope = RotaryEmbedding(head_dim=8, max_seq_len=16, theta=cfg.rope_theta)
    return SlidingWindowAttention(cfg, SlidingWindowConfig(window=window), rope).eval()


def qkv(B: int, H: int, G: int, T: int, S: int, K: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, t, K, generator=gen, dtype=torch.float64) for h, t in ((H, T), (G, S), (G, S)))


@pytest.mark.parametrize(
    "T_q, S, start, window",
    [(6, 6, 0, 3), (6, 6, 0, 1), (6, 6, 0, 10), (2, 9, 7, 4), (1, 12, 11, 5), (3, 5, 2, 5)],
)
def test_mask_allows_key_slot_j_for_query_slot_s_iff_s_minus_window_below_j_at_most_s(T_q, S, start, window):
    assert sliding_window_mask(T_q, S, start, window, "cpu").tolist() == loop_mask(T_q, S, start, window)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2)])
def test_training_path_equals_a_naive_softmax_loop_under_the_window(n_heads, n_kv_heads):
    q, k, v = qkv(B=2, H=n_heads, G=n_kv_heads, T=12, S=12)
    out = sliding_attention(window=4, n_heads=n_heads, n_kv_heads=n_kv_heads).attend(q, k, v, None, 0)
    allowed = torch.tensor(loop_mask(12, 12, 0, 4))
    torch.testing.assert_close(out, naive_attention(q, k, v, allowed), atol=ATOL, rtol=RTOL)


def test_sdpa_with_the_mask_equals_a_naive_softmax_loop():
    q, k, v = qkv(B=1, H=2, G=2, T=3, S=10)
    mask_TS = sliding_window_mask(3, 10, 7, 5, "cpu")  # the last 3 of 10 cache slots, as in decoding
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TS)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask_TS), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("window", [12, 13, 100])
def test_a_window_of_at_least_the_sequence_length_is_plain_causal_attention(window):
    q, k, v = qkv(B=2, H=4, G=2, T=12, S=12)
    out = sliding_attention(window, n_heads=4, n_kv_heads=2).attend(q, k, v, None, 0)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, causal, atol=ATOL, rtol=RTOL)


def test_decoding_the_last_positions_from_a_cache_equals_the_training_path():
    q, k, v = qkv(B=2, H=4, G=2, T=9, S=9)
    attn = sliding_attention(window=3, n_heads=4, n_kv_heads=2)
    full = attn.attend(q, k, v, None, 0)
    allowed_B1TS = torch.ones(2, 1, 2, 9, dtype=torch.bool).tril(diagonal=7)  # queries at slots 7, 8: causal
    last_two = attn.attend(q[:, :, 7:], k, v, allowed_B1TS, start=7)
    torch.testing.assert_close(last_two, full[:, :, 7:], atol=ATOL, rtol=RTOL)


def test_left_padding_stays_masked_and_padding_queries_still_see_themselves():
    # row 0 has 3 padding slots (0..2) before its 5 tokens; row 1 has none. Queries: slots 2..7 (start 2), so
    # row 0's first query is padding; scaletrain's mask lets it see itself (as model.py's Context documents)
    q, k, v = qkv(B=2, H=2, G=1, T=6, S=8, seed=1)
    real_BS = torch.tensor([[False] * 3 + [True] * 5, [True] * 8])
    slot_T, key_S = torch.arange(2, 8), torch.arange(8)
    causal_TS = key_S[None, :] <= slot_T[:, None]
    allowed_B1TS = (causal_TS & (real_BS[:, None, :] | (key_S[None, :] == slot_T[:, None])))[:, None]
    out = sliding_attention(window=3, n_heads=2, n_kv_heads=1).attend(q, k, v, allowed_B1TS, start=2)
    expected_B1TS = allowed_B1TS & torch.tensor(loop_mask(6, 8, 2, 3))
    assert expected_B1TS[0, 0, 0].tolist() == [False, False, True] + [False] * 5  # the padding query: itself only
    assert expected_B1TS[0, 0, 1].tolist() == [False] * 3 + [True] + [False] * 4  # first real token (slot 3): no pads
    assert expected_B1TS.any(dim=-1).all()  # every query keeps at least itself: no softmax over nothing (NaN)
    torch.testing.assert_close(out, naive_attention(q, k, v, expected_B1TS), atol=ATOL, rtol=RTOL)
