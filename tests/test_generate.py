"""Generation with a KV cache: cached equals uncached, a padded batch equals each prompt alone, stop tokens,
the max_seq_len rule, MoE routing while generating, and seeded sampling.

Greedy decoding compares argmaxes, which fp32 rounding can flip only at a near-tie; the tests check that
the top-two margin along every compared path exceeds the rounding bound (`logit_tolerance`), so token
equality is a real assertion and not a coin flip on another CPU. Random-init models use init_std 0.1
(not 0.02) so attention is peaked: which keys a query sees changes the tokens.

RoPE scores depend only on the offset between positions, so shifting a whole row's positions by its
padding changes nothing but rounding; per-row positions matter for the max_seq_len rule (a short row in a
batch with a long one must not run off the RoPE table: test_rows_end_at_max_seq_len...) and for the
cached key of each token to carry the angle it has in the full forward.
"""

from __future__ import annotations

import math

import pytest
import torch

from scaletrain.config import ModelConfig, MoEConfig
from scaletrain.generate import KVCache, complete, generate
from scaletrain.model import Transformer
from scaletrain.moe import moe_layers

V, MAX_LEN = 61, 40
PROMPT_LENGTHS = (5, 1, 12, 8)

CONFIGS = {
    "dense": (dict(), None),
    "swiglu_qknorm_bias": (dict(activation="swiglu", norm="rmsnorm", qk_norm=True, bias=True), None),
    "moe_top2_dropless": (dict(), MoEConfig(name="m", n_experts=4, top_k=2, every=2, n_shared=1)),
}


def tiny_model(name: str = "dense", moe: MoEConfig | None = None, seed: int = 0) -> Transformer:
    kw, default_moe = CONFIGS[name]
    torch.manual_seed(seed)
    cfg = ModelConfig(name="t", d_model=64, n_layers=2, n_heads=4, d_ff=128, init_std=0.1, **kw)
    return Transformer(cfg, vocab_size=V, max_seq_len=MAX_LEN, moe_cfg=moe or default_moe).eval()


def make_prompts(seed: int = 1, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def logit_tolerance(model: Transformer, T: int) -> float:
    """Bound on |a - b| between two fp32 evaluations of the same logits whose sums run in different orders
    (cache vs full forward: other GEMM shapes and blockings, other SDPA kernels and masks; AVX2's 8 lanes
    or AVX-512's 16, with or without FMA, only pick an order).

    A sum of n products in fp32 is within ~n*u * sum|a_i b_i| of the exact sum in the worst case (u =
    2^-24), and within lambda * sqrt(n) * u * sum|a_i b_i| with probability >= 1 - 2n exp(-lambda^2 / 2)
    when the roundings behave as independent zero-mean errors (Higham & Mary 2019, "A new approach to
    probabilistic rounding error analysis", thm 2.4); lambda = 8 makes that 1 - 3e-12 per sum. Since
    sum|a_i b_i| <= ||a|| ||b|| (Cauchy-Schwarz), each reduction of length n on a token's path adds a
    relative error of lambda * sqrt(n) * u; independent errors of all of them add in quadrature:
    eps = lambda * u * sqrt(sum n_i). The reductions, per block: two norms (D), q, k, v projections (D
    each), scores (K), softmax normalizer and weighted values (T each), output projection (D), MLP in (D;
    twice for SwiGLU) and out (F) (MoE: router D, the experts as an MLP, the shared expert as another, the
    top-k combine R); then the final norm and the logit itself (D each). Pre-norm residual blocks near init
    add their outputs to the stream without amplifying it much, so eps is the relative error of the final
    hidden state h, with ||h|| <= sqrt(D) * max|gain| after the final norm; a logit is w_v . h, and each
    path errs on its own (factor 2): |a - b| <= 2 * eps * max_v ||w_v|| * sqrt(D) * max|gain|. Observed
    differences are ~200x smaller (many sums are computed in the same order on both paths), while
    padding off by one moves the logits >100x more (test below), so the bound can fail only for a bug.
    """
    c, u, lam = model.cfg, torch.finfo(torch.float32).eps / 2, 8.0
    D, K, Fh = c.d_model, c.d_model // c.n_heads, c.d_ff
    mlp = [D] * (2 if c.activation == "swiglu" else 1) + [Fh]
    reductions = [D, D]  # final norm, logit
    for block in model.blocks:
        reductions += [D, D, D, D, D, K, T, T, D]  # norms, q, k, v, scores, softmax, values, output projection
        moe = moe_layers(block)
        reductions += mlp if not moe else [D, moe[0].top_k] + mlp * (1 + (moe[0].shared is not None))
    eps = lam * u * math.sqrt(sum(reductions))
    gain = dict(model.final_norm.named_parameters())["weight"].abs().max().item()  # zero bias at init
    w_max = model.W_ue.weight.norm(dim=1).max().item()
    return 2 * eps * w_max * math.sqrt(D) * gain


def greedy_margins(model: Transformer, prompt: list[int], new: list[int]) -> torch.Tensor:
    """Top-1 minus top-2 logit at each step of a greedy path (training forward of the row alone)."""
    logits_TV = model(torch.tensor([prompt + new])).logits[0, len(prompt) - 1 : len(prompt) + len(new) - 1]
    top_T2 = logits_TV.topk(2, dim=-1).values
    return top_T2[:, 0] - top_T2[:, 1]


def assert_no_near_ties(model: Transformer, prompts, outs) -> None:
    tol = logit_tolerance(model, MAX_LEN)
    for prompt, new in zip(prompts, outs):
        margin = greedy_margins(model, prompt, new).min().item()
        assert margin > 2 * tol, f"near-tie {margin:.2e} <= 2 * tol {tol:.2e}: pick another seed for this test"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_greedy_generation_equals_uncached_token_for_token(name):
    model, prompts = tiny_model(name), make_prompts()
    cached = complete(model, prompts, 20)
    uncached = complete(model, prompts, 20, use_cache=False)
    assert [len(r) for r in cached] == [20] * len(prompts)
    assert cached == uncached
    assert_no_near_ties(model, prompts, uncached)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_left_padded_generation_equals_each_prompt_alone(name):
    model, prompts = tiny_model(name), make_prompts(seed=2)
    batched = complete(model, prompts, 16)
    # alone and uncached: no padding, so every step is the plain training forward
    alone = [complete(model, [p], 16, use_cache=False)[0] for p in prompts]
    assert batched == alone
    assert len({tuple(r) for r in batched}) == len(prompts)  # the rows really differ
    assert_no_near_ties(model, prompts, alone)


def test_cached_logits_match_the_full_forward_within_the_rounding_bound():
    model, prompts = tiny_model("swiglu_qknorm_bias"), make_prompts(seed=3)
    new = complete(model, prompts, 12)
    seqs = [p + n for p, n in zip(prompts, new)]
    P = max(len(p) for p in prompts)
    pad_B = torch.tensor([P - len(p) for p in prompts])
    idx_BT = torch.tensor([[0] * int(pad) + s for pad, s in zip(pad_B, seqs)])  # the same tokens, left-padded
    # prefill the prompts, then feed the generated tokens one at a time, as `complete` does
    H, K = model.cfg.n_heads, model.cfg.d_model // model.cfg.n_heads
    cache = KVCache(len(model.blocks), pad_B, H, idx_BT.shape[1], K, torch.float32)
    with torch.no_grad():
        steps = [model(idx_BT[:, :P], cache=cache).logits]
        steps += [model(idx_BT[:, t : t + 1], cache=cache).logits for t in range(P, idx_BT.shape[1])]
        cached_BTV = torch.cat(steps, dim=1)
        # a bug the bound must catch: padding off by one (each row's first token taken for padding)
        shifted_BTV = model(idx_BT, pad_B=pad_B + 1).logits
    tol = logit_tolerance(model, idx_BT.shape[1])
    worst = worst_shifted = 0.0
    for b, s in enumerate(seqs):
        with torch.no_grad():
            full_TV = model(torch.tensor([s])).logits[0]  # the training forward of the row alone
        real = slice(int(pad_B[b]), None)
        worst = max(worst, (cached_BTV[b, real] - full_TV).abs().max().item())
        worst_shifted = max(worst_shifted, (shifted_BTV[b, real][1:] - full_TV[1:]).abs().max().item())
    assert worst <= tol, f"cached logits differ by {worst:.2e} > bound {tol:.2e}"
    assert worst_shifted > 100 * tol


def test_each_row_stops_at_its_own_stop_token_while_others_continue():
    model, prompts = tiny_model(), make_prompts(seed=4)
    free = complete(model, prompts, 15)
    # the stop token: row 0's first new token (from the third on) that some other row never produces
    k = next(i for i in range(2, 15) if free[0][i] not in free[0][:i] and any(free[0][i] not in r for r in free[1:]))
    stop = free[0][k]
    stopped = complete(model, prompts, 15, stop_token=stop)
    for row_free, row in zip(free, stopped):  # each row: its free-running tokens, cut before its first stop
        assert row == (row_free[: row_free.index(stop)] if stop in row_free else row_free)
    assert len(stopped[0]) == k
    assert any(len(r) == 15 for r in stopped[1:])  # some row did not stop and ran to max_new_tokens


def test_generation_stops_computing_once_every_row_has_stopped():
    model, prompts = tiny_model(), make_prompts(seed=5)[:2]
    free = complete(model, prompts, 15)
    stop = free[1][3]  # row 1's fourth token; row 0 produces it earlier (premise below)
    steps = [row.index(stop) + 1 for row in free]  # the step at which each row ends
    assert max(steps) < 15
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    stopped = complete(model, prompts, 15, stop_token=stop)
    assert [len(r) + 1 for r in stopped] == steps
    assert len(calls) == max(steps)  # one forward per step, none after the last row stopped


def test_sampling_with_a_seeded_generator_is_reproducible():
    model, prompts = tiny_model(), make_prompts(seed=6)

    def sample(seed: int, **kw) -> list[list[int]]:
        return complete(model, prompts, 24, temperature=0.8, generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(0, top_k=8) == sample(0, top_k=8)
    assert sample(0) == sample(0, use_cache=False)  # both paths draw the same numbers from the same logits
    assert sample(0) != sample(1)
    assert sample(0, top_k=1) == complete(model, prompts, 24)  # top-1 sampling is greedy decoding


def test_rows_end_at_max_seq_len_and_longer_prompts_are_rejected():
    model = tiny_model("swiglu_qknorm_bias")  # its greedy paths vary more than dense's
    prompts = make_prompts(seed=7, lengths=(MAX_LEN - 3, 2, MAX_LEN))
    out = complete(model, prompts, 10)
    assert [len(r) for r in out] == [3, 10, 0]
    assert out == complete(model, prompts, 10, use_cache=False)
    # the cap is per row, not set by batch mates; the short row runs past slot max_seq_len of the batch
    # but not past its own position max_seq_len - 1 (alone + uncached: the training forward)
    assert out == [complete(model, [p], 10, use_cache=False)[0] for p in prompts]
    assert out[0] == complete(model, [prompts[0]], 50)[0]
    with pytest.raises(ValueError, match="max_seq_len"):
        complete(model, make_prompts(seed=7, lengths=(3, MAX_LEN + 1)), 5)
    with pytest.raises(ValueError, match="at least one"):
        complete(model, [[1, 2], []], 5)


def test_moe_with_a_capacity_factor_generates_with_dropless_routing():
    capped_cfg = MoEConfig(name="m", n_experts=4, top_k=2, capacity_factor=0.5)
    capped, dropless = tiny_model(moe=capped_cfg), tiny_model(moe=MoEConfig(name="m", n_experts=4, top_k=2))
    dropless.load_state_dict(capped.state_dict())
    prompts = make_prompts(seed=8)
    with torch.no_grad():  # premise: at this capacity the training forward does drop tokens
        capped(torch.tensor([p[:1] * 8 for p in prompts]))
    assert moe_layers(capped)[0].stats["dropped_frac"] > 0
    out = complete(capped, prompts, 12)
    assert out == complete(dropless, prompts, 12) == complete(capped, prompts, 12, use_cache=False)
    assert all(m.moe_cfg is capped_cfg for m in moe_layers(capped))  # the configured routing is restored
    assert_no_near_ties(dropless, prompts, out)


def test_generate_returns_prompt_and_continuation_filled_with_the_stop_token():
    model = tiny_model()
    prompt_BT = torch.tensor(make_prompts(seed=9, lengths=(6, 6, 6)))
    free_BT = generate(model, prompt_BT, 10, temperature=0.0)
    assert torch.equal(free_BT, generate(model, prompt_BT, 10, temperature=0.0, use_cache=False))
    stop = int(free_BT[0, 8])
    out_BT = generate(model, prompt_BT, 10, temperature=0.0, stop_token=stop)
    assert torch.equal(out_BT[:, :6], prompt_BT)
    for free, row in zip(free_BT.tolist(), out_BT.tolist()):
        cut = free.index(stop, 6) if stop in free[6:] else len(free)
        assert row[:cut] == free[:cut] and all(t == stop for t in row[cut:])
