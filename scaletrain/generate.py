"""Decoding from a `Transformer`: functions that take the model as their first argument.

Here: `KVCache` (keys and values of every layer, preallocated once per generation, keys stored after RoPE),
`complete` (prompts of any lengths in one batch -> each row's new tokens; greedy or sampled; each row stops
at its stop token: evaluation, `scaletrain-sample`), `generate` (prompts of one length -> a [B, T + n]
tensor: the training samples), the decoding loop both share, dropless MoE routing while decoding
(`_dropless`) and the token sampler (`_sampler`). Not here: the forward pass they call (model.py:
`Transformer.forward(idx, pad_B, cache, last_only)`, whose `Context` carries per-row positions, the mask
and the cache into every attention layer), unwrapping a DDP-wrapped model (callers pass the module itself:
FSDP2 shards it in place, so calling it still gathers its parameters).

Generation. `forward(idx_BT)` is the training path (positions 0..T-1, `is_causal` SDPA), untouched by
what follows. Generation passes `pad_B` (rows left-padded into one batch) and/or a `KVCache`; then each
row's tokens take positions 0, 1, ... from its first real token, and attention uses an explicit boolean
mask (a real key at or before the query), so a row computes what it would compute alone. A padding
query may see only itself: a fully masked row would make SDPA return NaN, and a NaN key or value would
reach real rows through 0 * NaN in the weighted sum.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from scaletrain.model import Transformer
from scaletrain.moe import moe_layers


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated once per generation.

    One [B, H, T_max, K] tensor per layer for k and one for v, filled left to right; `length` slots are
    filled (the same for every row: rows are left-padded, row b's first `pad_B[b]` slots are padding and
    never attended to). Keys are stored after RoPE, at their absolute positions, so a cached key never
    needs re-rotating. dtype: what the projections produce (the autocast dtype if autocast is on).
    """

    def __init__(self, n_layers: int, pad_B: torch.Tensor, n_heads: int, t_max: int, head_dim: int, dtype):
        shape = (pad_B.shape[0], n_heads, t_max, head_dim)
        self.k_BHTK = [pad_B.new_zeros(shape, dtype=dtype) for _ in range(n_layers)]  # one per layer
        self.v_BHTK = [pad_B.new_zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.pad_B, self.t_max, self.length = pad_B, t_max, 0


@torch.no_grad()
def complete(
    model: Transformer,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    lockstep: bool = False,
) -> list[list[int]]:
    """Continue prompts of any lengths in one batch -> each row's new tokens, cut before its stop token.

    Rows are left-padded; each keeps its own positions and never sees padding, so with greedy decoding
    (temperature 0) a row's answer is the one it gets alone and the same with or without the cache (up
    to fp32 rounding, which can only flip a near-tie between the top two logits). temperature > 0:
    sample from softmax(logits / temperature), over the top_k logits if top_k, drawing from generator.
    A row ends at its first stop_token (not returned), after max_new_tokens, or when prompt + new tokens
    reach max_seq_len (the RoPE table and the trained context end there); a prompt longer than
    max_seq_len is an error (cutting it would silently change the question). use_cache=False recomputes
    every position at every step: the reference the cache is tested against. Runs in the model's
    current mode (call .eval(): dropout). MoE layers route dropless here (`_dropless`). lockstep: every rank
    of the default process group decodes the same number of steps (until every row of every rank is done),
    as FSDP2 needs when ranks complete different prompts (rank-split evaluation).
    """
    rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]
    lengths = [len(r) for r in rows]
    if not rows or min(lengths) == 0 or max(lengths) > model.max_seq_len:
        raise ValueError(
            f"complete: need at least one prompt, each of 1..max_seq_len={model.max_seq_len} tokens "
            f"(got lengths {sorted(set(lengths))})"
        )
    P, device = max(lengths), model.tok_emb.weight.device
    pad_B = torch.tensor([P - n for n in lengths], device=device)
    idx_BT = torch.tensor([[0] * (P - n) + r for r, n in zip(rows, lengths)], device=device)  # 0: any id
    budget_B = torch.tensor([max(0, min(max_new_tokens, model.max_seq_len - n)) for n in lengths], device=device)
    sampler = _sampler(temperature, top_k, generator)
    new_BT = _decode(model, idx_BT, pad_B, budget_B, sampler, stop_token, use_cache, lockstep)
    out = []
    for row, budget in zip(new_BT.tolist(), budget_B.tolist()):
        row = row[:budget]
        out.append(row[: row.index(stop_token)] if stop_token in row else row)
    return out


@torch.no_grad()
def generate(
    model: Transformer,
    idx_BT: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """[B, T] prompts of one length -> [B, T + n] prompts and continuations (the training samples).

    Stops once every row has produced stop_token (later tokens of a row are stop_token) or after
    max_new_tokens. Past max_seq_len the context slides (the last max_seq_len tokens, recomputed each
    step without the cache); `complete` is the API for evaluation (any prompt lengths, no sliding).
    """
    B, T = idx_BT.shape
    fits = T + max_new_tokens <= model.max_seq_len
    budget_B = idx_BT.new_full((B,), max_new_tokens)
    sampler = _sampler(temperature, top_k, generator)
    new_BT = _decode(model, idx_BT, idx_BT.new_zeros(B), budget_B, sampler, stop_token, use_cache and fits)
    return torch.cat((idx_BT, new_BT), dim=1)


def _decode(
    model: Transformer,
    idx_BT: torch.Tensor,
    pad_B: torch.Tensor,
    budget_B: torch.Tensor,
    sampler: Callable[[torch.Tensor], torch.Tensor],
    stop_token: int | None,
    use_cache: bool,
    lockstep: bool = False,
) -> torch.Tensor:
    """The loop behind `complete` and `generate` -> new tokens [B, n], n = steps until every row is done
    (stop token or budget). Done rows stay in the batch (static shapes) and are fed stop_token. lockstep:
    the step count and "every row done" are agreed over the default process group (one all-reduce each)."""
    B, T = idx_BT.shape
    steps, padded = int(budget_B.max()), bool(pad_B.any())
    if lockstep:
        steps = agree(steps, torch.distributed.ReduceOp.MAX, idx_BT.device)
    cache, dtype = None, model.tok_emb.weight.dtype
    if torch.is_autocast_enabled(idx_BT.device.type):
        dtype = torch.get_autocast_dtype(idx_BT.device.type)
    if use_cache and steps > 0:  # the last new token is never fed back: T + steps - 1 slots
        G, K = model.cfg.n_kv_heads or model.cfg.n_heads, model.cfg.d_model // model.cfg.n_heads
        cache = KVCache(len(model.blocks), pad_B, G, T + steps - 1, K, dtype)
    done_B = budget_B <= 0
    seq_BT, input_BT, new = idx_BT, idx_BT, []
    with _dropless(model):
        for t in range(steps):
            # model(...), not model.forward(...): module hooks (FSDP2's parameter gathering) must run
            if cache is not None:
                logits_B1V = model(input_BT, cache=cache, last_only=True).logits
            elif padded:
                logits_B1V = model(seq_BT, pad_B=pad_B, last_only=True).logits
            else:  # the training forward; slides past max_seq_len (generate only: complete never gets there)
                logits_B1V = model(seq_BT[:, -model.max_seq_len :], last_only=True).logits
            next_B = sampler(logits_B1V[:, -1].float())
            if stop_token is not None:
                next_B = torch.where(done_B, stop_token, next_B)
                done_B = done_B | (next_B == stop_token)
            new.append(next_B)
            done_B = done_B | (budget_B <= t + 1)
            all_done = bool(done_B.all())
            if lockstep:
                all_done = bool(agree(int(all_done), torch.distributed.ReduceOp.MIN, idx_BT.device))
            if all_done:
                break
            input_BT = next_B[:, None]
            seq_BT = torch.cat((seq_BT, input_BT), dim=1)
    return torch.stack(new, dim=1) if new else idx_BT.new_zeros(B, 0)


def agree(value: int, op, device: torch.device) -> int:
    """`value` reduced with `op` (a torch.distributed.ReduceOp) over the default process group (itself without
    one): what every rank must agree on before a collective-bearing loop (decoding steps, batch counts)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor(value, device=device)
    torch.distributed.all_reduce(t, op=op)
    return int(t)


@contextlib.contextmanager
def _dropless(model: Transformer) -> Iterator[None]:
    """MoE layers route without capacity while generating. With a capacity factor, which tokens drop
    depends on every token in the forward (N = B*T at prefill, B per decode step, padding included), so
    a row's answer would depend on its batch mates and on the cache; dropless routing is per token.
    A model trained with a capacity factor thus generates with the routing its tokens asked for."""
    layers = moe_layers(model)
    saved = [m.moe_cfg for m in layers]
    for m in layers:
        m.moe_cfg = dataclasses.replace(m.moe_cfg, capacity_factor=None)
    try:
        yield
    finally:
        for m, moe_cfg in zip(layers, saved):
            m.moe_cfg = moe_cfg


def _sampler(temperature: float, top_k: int | None, generator: torch.Generator | None):
    """logits_BV (fp32) -> next token ids [B]: argmax when temperature <= 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest logits."""

    def sample(logits_BV: torch.Tensor) -> torch.Tensor:
        if temperature <= 0:
            return logits_BV.argmax(-1)
        logits_BV = logits_BV / temperature
        if top_k:
            kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.size(-1))).values[:, -1:]
            logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
        return torch.multinomial(F.softmax(logits_BV, dim=-1), 1, generator=generator)[:, 0]

    return sample
