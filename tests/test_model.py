"""Model behaviour: shapes, causality, RoPE properties, parameter-count formula, attention parity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from scaletrain.config import ModelConfig
from scaletrain.dropout import Dropout
from scaletrain.generate import generate
from scaletrain.model import Attention, RotaryEmbedding, Transformer

from .conftest import compose_cfg


def small_cfg(**kw) -> ModelConfig:
    base = dict(name="t", d_model=64, n_layers=2, n_heads=4, d_ff=128, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def test_forward_returns_logits_of_shape_batch_time_vocab():
    model = Transformer(small_cfg(), vocab_size=97, max_seq_len=32)
    logits = model(torch.randint(0, 97, (3, 17))).logits
    assert logits.shape == (3, 17, 97)


@pytest.mark.parametrize(
    "activation,norm,qk_norm", [("relu", "layernorm", False), ("swiglu", "rmsnorm", True), ("gelu", "layernorm", True)]
)
def test_changing_future_tokens_never_changes_earlier_logits(activation, norm, qk_norm):
    torch.manual_seed(0)
    model = Transformer(small_cfg(activation=activation, norm=norm, qk_norm=qk_norm), 50, 16).eval()
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, 50, (2, 7))
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_rope_scores_depend_only_on_the_offset_between_positions():
    torch.manual_seed(0)
    K, T = 16, 40
    rope = RotaryEmbedding(K, T, theta=10000.0)
    q, k = torch.randn(K), torch.randn(K)
    # place the same q and k vectors at every position, rotate, and take all pairwise scores
    q_rot = rope(q.expand(1, T, 1, K).contiguous())[0, :, 0]
    k_rot = rope(k.expand(1, T, 1, K).contiguous())[0, :, 0]
    scores = q_rot @ k_rot.T  # scores[m, n] = <R_m q, R_n k>
    for offset in (0, 1, 5, 17):
        diag = torch.diagonal(scores, offset=-offset)  # pairs with m - n = offset
        torch.testing.assert_close(diag, diag[0].expand_as(diag), rtol=1e-5, atol=1e-5)
    assert not torch.isclose(scores[3, 0], scores[5, 0])


def test_rope_equals_complex_rotation_of_interleaved_pairs():
    torch.manual_seed(1)
    K, T, theta = 8, 10, 500.0
    x = torch.randn(2, T, 3, K)
    freqs = theta ** (-torch.arange(0, K, 2, dtype=torch.float64) / K)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)
    rot = torch.polar(torch.ones(T, K // 2, dtype=torch.float64), angles)
    xc = torch.view_as_complex(x.double().reshape(2, T, 3, K // 2, 2))
    expected = torch.view_as_real(xc * rot[None, :, None, :]).reshape(2, T, 3, K).float()
    torch.testing.assert_close(RotaryEmbedding(K, T, theta)(x), expected, rtol=1e-6, atol=1e-6)
    # position 0 is the identity
    torch.testing.assert_close(RotaryEmbedding(K, T, theta)(x)[:, 0], x[:, 0])


def expected_param_count(c: ModelConfig, V: int) -> dict[str, int]:
    D, Fh, L, E = c.d_model, c.d_ff, c.n_layers, c.n_embed or c.d_model
    b = 1 if c.bias else 0
    norm = D * (2 if (c.norm == "layernorm" and c.bias) else 1)
    attn = 4 * (D * D + b * D) + (2 * (D // c.n_heads) if c.qk_norm else 0)
    n_mlp_in = 2 if c.activation == "swiglu" else 1
    mlp = n_mlp_in * (D * Fh + b * Fh) + Fh * D + b * D
    non_emb = L * (attn + mlp + 2 * norm) + norm
    emb = V * E + (E * D + b * D) + (0 if c.tie_embeddings else D * V)
    return {"total": emb + non_emb, "embedding": emb, "non_embedding": non_emb, "active": emb + non_emb}


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(bias=True),
        dict(activation="swiglu", norm="rmsnorm"),
        dict(tie_embeddings=True, qk_norm=True),
        dict(n_embed=32, bias=True, norm="layernorm"),
        dict(d_model=512, n_layers=3, n_heads=4, d_ff=2048, dropout=0.1),
    ],
)
def test_parameter_count_equals_its_formula(kw):
    cfg = small_cfg(**kw)
    model = Transformer(cfg, vocab_size=4096, max_seq_len=16)
    assert model.param_counts() == expected_param_count(cfg, 4096)


def preset_param_counts(*overrides: str) -> dict[str, int]:
    """Parameter counts of a composed preset (default data: the 4096-token BPE), built on the meta device."""
    cfg = compose_cfg(list(overrides))
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.model.vocab_size or cfg.data.tokenizer.vocab_size, cfg.data.seq_len, cfg.moe)
    return model.param_counts()


# baseline_10m: per block 4 x 512^2 attention + 2 x 512 x 2048 MLP + 2 LayerNorm weights of 512; + final norm;
# embedding: tok_emb 4096 x 512, W_e 512 x 512, W_ue 512 x 4096 (untied)
BASELINE_NON_EMB, BASELINE_EMB = 3 * (4 * 512**2 + 2 * 512 * 2048 + 2 * 512) + 512, 4096 * 512 + 512 * 512 + 512 * 4096
MLP_512, ROUTER_8 = 2 * 512 * 2048, 512 * 8  # one expert = the baseline's MLP; router: d_model x n_experts


def test_baseline_10m_preset_has_9_44m_non_embedding_and_4_46m_embedding_parameters():
    counts = preset_param_counts("model=baseline_10m")
    assert counts["non_embedding"] == BASELINE_NON_EMB == 9_440_768
    assert counts["embedding"] == BASELINE_EMB == 4_456_448
    assert counts["total"] == counts["active"] == 13_897_216  # the YAML's "13.9M"


def test_small_5m_preset_has_5_3m_parameters_of_which_2_2m_embedding():
    counts = preset_param_counts("model=small_5m")
    assert counts["embedding"] == 4096 * 256 + 256 * 256 + 256 * 4096 == 2_162_688
    assert counts["non_embedding"] == 4 * (4 * 256**2 + 2 * 256 * 1024 + 2 * 256) + 256
    assert counts["total"] == 5_310_720


def test_moe_8x_preset_holds_eight_baseline_mlps_per_layer_and_activates_two():
    counts = preset_param_counts("model=moe_8x")
    assert counts["embedding"] == BASELINE_EMB
    assert counts["total"] == BASELINE_EMB + BASELINE_NON_EMB + 3 * (7 * MLP_512 + ROUTER_8) == 57_949_696
    assert counts["active"] == BASELINE_EMB + BASELINE_NON_EMB + 3 * (MLP_512 + ROUTER_8) == 20_200_960
    assert preset_param_counts("model=moe_8x", "moe=none") == preset_param_counts("model=baseline_10m")


def test_tied_embeddings_share_one_tensor():
    model = Transformer(small_cfg(tie_embeddings=True), vocab_size=40, max_seq_len=8)
    assert model.W_ue.weight.data_ptr() == model.tok_emb.weight.data_ptr()


def test_sdpa_attention_equals_explicit_softmax_reference():
    torch.manual_seed(0)
    cfg = small_cfg(bias=True, qk_norm=True)
    rope = RotaryEmbedding(16, 12, cfg.rope_theta)
    attn = Attention(cfg, cfg.attention, rope).eval()
    x = torch.randn(2, 12, 64)
    B, T, H, K = 2, 12, 4, 16
    q = attn.q_norm(attn.wq(x).view(B, T, H, K))
    k = attn.k_norm(attn.wk(x).view(B, T, H, K))
    v = attn.wv(x).view(B, T, H, K)
    q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(K)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    o = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, H * K)
    torch.testing.assert_close(attn(x), attn.wo(o), rtol=1e-5, atol=1e-5)


def test_flops_per_token_follows_6n_plus_attention_formula():
    cfg = small_cfg()
    model = Transformer(cfg, vocab_size=100, max_seq_len=32)
    matmul = 2 * (4 * 64 * 64 + 2 * 64 * 128) + 64 * 64 + 64 * 100
    assert model.flops_per_token(32) == 6 * matmul + 12 * 2 * 32 * 64
    # causal: query t meets t + 1 keys; summed over t = 0..31 and divided by 32 tokens: (32 + 1) / 2 keys each
    keys = sum(t + 1 for t in range(32)) / 32
    assert model.flops_per_token(32, causal=True) == 6 * matmul + 12 * 2 * keys * 64


def test_greedy_generation_is_deterministic_and_extends_the_prompt():
    torch.manual_seed(0)
    model = Transformer(small_cfg(), vocab_size=30, max_seq_len=8).eval()
    prompt = torch.tensor([[1, 2, 3]])
    out1 = generate(model, prompt, 10, temperature=0.0)
    out2 = generate(model, prompt, 10, temperature=0.0)
    assert out1.shape == (1, 13) and torch.equal(out1, out2) and torch.equal(out1[:, :3], prompt)
    # greedy token equals argmax of the model's last-position logits (context cropped to max_seq_len)
    assert out1[0, 3].item() == model(prompt).logits[0, -1].argmax().item()


@pytest.mark.parametrize(
    "norm,act,bias,tie,qk",
    list(
        itertools.product(
            ["layernorm", "rmsnorm"], ["relu", "gelu", "swiglu"], [False, True], [False, True], [False, True]
        )
    )[::5],
)
def test_every_switch_combination_starts_near_uniform_loss_and_gives_every_parameter_a_gradient(
    norm, act, bias, tie, qk
):
    torch.manual_seed(0)
    model = Transformer(small_cfg(norm=norm, activation=act, bias=bias, tie_embeddings=tie, qk_norm=qk), 40, 8)
    idx = torch.randint(0, 40, (2, 8))
    loss = F.cross_entropy(model(idx).logits.flatten(0, 1), idx.roll(-1, 1).flatten())
    loss.backward()
    assert math.isclose(loss.item(), math.log(40), rel_tol=0.05)  # near-uniform at init
    assert all(p.grad is not None for p in model.parameters())


def test_attention_dropout_is_its_own_knob_and_only_acts_in_training():
    """`dropout` drops hidden activations; `attn_dropout` drops attention probabilities (SDPA's dropout_p)."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    for attn_p, varies in ((0.0, False), (0.5, True)):
        cfg = small_cfg(dropout=0.3, attn_dropout=attn_p)
        attn = Attention(cfg, cfg.attention, RotaryEmbedding(16, 16, 10000.0))
        attn.train()
        attn.resid_dropout.eval()  # isolate the attention probabilities
        a, b = attn(x), attn(x)
        assert (not torch.equal(a, b)) == varies
        attn.eval()
        torch.testing.assert_close(attn(x), attn(x), rtol=0, atol=0)


def test_the_dense_124m_preset_has_gpt2_smalls_size():
    """model=dense_124m is the ~124M dense model of the GPU throughput target (built on the meta device)."""
    counts = preset_param_counts("model=dense_124m", "data.seq_len=1024")
    # tied token embedding 50304 x 768 + W_e 768 x 768; 12 blocks of 4 x 768^2 + 2 x 768 x 3072 (+ norms)
    assert counts["embedding"] == 50304 * 768 + 768 * 768
    assert counts["total"] == 124_177_152


# ---- Dropout: nn.Dropout's semantics with a cheaper CPU mask ------------------------------------------


def test_dropout_keeps_each_element_with_probability_one_minus_p_in_every_lane_of_a_draw():
    p, n = 0.1, 4_000_000
    drop = Dropout(p).train()
    torch.manual_seed(0)
    kept = drop(torch.ones(n)) != 0
    p_eff = drop.threshold / 2**15
    assert abs(p_eff - p) <= 2**-16  # p rounded to a multiple of 2^-15
    # each lane of a 64-bit draw (positions i % 4) is its own Bernoulli(1 - p_eff) sample of n/4 elements:
    # 5 binomial standard deviations, so a correct mask fails this with probability < 1e-6
    for lane in range(4):
        rate = kept[lane::4].double().mean().item()
        assert abs(rate - (1 - p_eff)) < 5 * math.sqrt(p_eff * (1 - p_eff) / (n / 4)), lane


def test_dropout_scales_kept_elements_so_the_expectation_is_unchanged_and_backward_uses_the_same_mask():
    drop = Dropout(0.1).train()
    x = torch.randn(8, 33, 17, requires_grad=True)  # numel not a multiple of 4: the last draw is cut
    torch.manual_seed(1)
    y = drop(x)
    keep = y != 0
    assert drop.scale == 2**15 / (2**15 - drop.threshold)  # 1 / (1 - p_eff): E[y] = x exactly
    torch.testing.assert_close(y[keep], x[keep] * drop.scale, rtol=0, atol=0)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, keep * drop.scale, rtol=0, atol=0)


def test_dropout_draws_from_the_default_generator_so_a_restored_rng_state_repeats_the_mask():
    drop, x = Dropout(0.3).train(), torch.ones(1000)
    state = torch.get_rng_state()
    first = drop(x)
    torch.set_rng_state(state)  # what checkpoint.set_rng_state does on resume
    assert torch.equal(drop(x), first) and not torch.equal(drop(x), first)


def test_dropout_is_the_identity_in_eval_mode_and_at_p_zero_and_rounds_bf16_once():
    x = torch.randn(64, 64)
    assert Dropout(0.5).eval()(x) is x and Dropout(0.0).train()(x) is x
    torch.manual_seed(2)
    xb = x.bfloat16()
    y = Dropout(0.1).train()(xb)
    keep = y != 0
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y[keep], (xb.float()[keep] * Dropout(0.1).scale).bfloat16(), rtol=0, atol=0)
