"""Decoder-only transformer: token embedding + W_e, pre-norm blocks (RoPE attention, MLP), W_ue.

Here: `Transformer`, `Block`, `Attention`, `MLP`, `RotaryEmbedding`, norm construction, parameter
counting and FLOPs per token (active parameters for MoE), and what decoding needs of the forward pass
(`Context`: per-row positions, the padding mask and the KV cache, built by `Transformer._context`). Not here:
decoding itself (`generate.py`: `KVCache`, `complete`, `generate`, dropless MoE routing while decoding, and how
the forward's generation inputs work), the MoE layer that replaces the MLP of configured blocks (`moe.py`),
parallelism (applied from outside the model, torchtitan style), optimizer grouping (`optim.py`, `muon.py`).

The forward pass returns `LMOutput(logits, aux_loss)`: the MoE balancing losses travel with the output
(summed block by block), so a recomputed block (activation checkpointing) cannot count them twice and
the training step needs one handle to the model. Shape letters: the legend in scaletrain/__init__.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config import Activation, AttentionConfig, MLPConfig, ModelConfig, MoEConfig, Norm, resolve_target
from scaletrain.dropout import Dropout
from scaletrain.moe import MoE, inactive_params, is_moe_layer, moe_layers, moe_matmul_params
from scaletrain.roles import Role, param_roles

if TYPE_CHECKING:  # generate.py imports this module: the cache is only a type here
    from scaletrain.generate import KVCache

MOE_ROLES = (Role.expert, Role.expert_out, Role.router)  # counted per token by moe_matmul_params


def param_seed(seed: int, name: str) -> int:
    """The seed of parameter `name`'s own generator: a stable hash of (seed, name) (hashlib: the same in every
    process and run, unlike Python's salted hash()), 63 bits."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Context(NamedTuple):
    """Where the T input tokens of a generation forward sit (None on the training path). Both token and
    key axes are sequence positions, hence T twice; keys span the cache slots filled so far plus the inputs.
    """

    positions_BT: torch.Tensor  # RoPE position of each input token within its own row (padding: 0)
    allowed_B1TT: torch.Tensor  # bool [B, 1, queries, keys]: key is real and at or before the query (pads: self)
    start: int  # cache slot of the first input token (0 without a cache)
    # None: attend to the inputs only. The cache object, not its tensors: a wrapper that casts a module's
    # floating-point inputs (FSDP2's mixed precision) would otherwise write the new keys into a copy.
    cache: KVCache | None = None
    layer: int = 0  # the block's index in the cache


class LMOutput(NamedTuple):
    """What `Transformer.forward` returns. A NamedTuple, so DDP, FSDP2 and torch.compile pass it through."""

    logits: torch.Tensor  # [B, T, V], in the autocast dtype if autocast is on
    aux_loss: torch.Tensor | None  # sum of the MoE layers' balancing losses (coefficients applied); None if dense


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == Norm.rmsnorm:
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class RotaryEmbedding(nn.Module):
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ...: pair i at position t is rotated by t * theta^(-2i/K).

    cos/sin tables are buffers (not saved in checkpoints) sized for `max_seq_len`.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos_TP, sin_TP = self._tables()
        self.cos_TP: torch.Tensor  # buffers (declared for the type checker)
        self.sin_TP: torch.Tensor
        self.register_buffer("cos_TP", cos_TP, persistent=False)
        self.register_buffer("sin_TP", sin_TP, persistent=False)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [max_seq_len, P] in fp32, computed in float64 on the CPU (MPS has no float64)."""
        K = self.head_dim
        inv_freq_P = self.theta ** (-torch.arange(0, K, 2, dtype=torch.float64, device="cpu") / K)
        angles_TP = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64, device="cpu"), inv_freq_P)
        return angles_TP.cos().float(), angles_TP.sin().float()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """Recompute the tables in place (after `to_empty` materialized a meta-device model: garbage until then)."""
        cos_TP, sin_TP = self._tables()
        self.cos_TP.copy_(cos_TP)
        self.sin_TP.copy_(sin_TP)

    def forward(self, x_BTHK: torch.Tensor, positions_BT: torch.Tensor | None = None) -> torch.Tensor:
        """positions_BT: each token's position (generation: per row, after padding and cached tokens);
        None = 0..T-1 in every row (training)."""
        # Each pair (x0, x1) as the complex number x0 + i*x1, rotated by multiplying with e^(i*angle) (as in
        # Llama / torchtitan): one complex multiply, 3x faster fwd+bwd on CPU than the real-valued stack.
        if positions_BT is None:
            T = x_BTHK.shape[1]
            rot_BT1P = torch.complex(self.cos_TP[:T], self.sin_TP[:T])[None, :, None, :]  # B = 1: broadcast
        else:
            rot_BT1P = torch.complex(self.cos_TP[positions_BT], self.sin_TP[positions_BT])[:, :, None, :]
        x_BTHP = torch.view_as_complex(x_BTHK.float().contiguous().unflatten(-1, (-1, 2)))
        return torch.view_as_real(x_BTHP * rot_BT1P).flatten(-2).type_as(x_BTHK)


class Attention(nn.Module):
    """Multi-head causal self-attention through SDPA (flash kernel where the device has one); the built-in target
    of `model.attention` (model/attention=sdpa). A variant subclasses it, overrides `attend` (the scores and
    weighted sum, given projected, rotated heads) and declares any parameters it adds in `param_roles`."""

    def __init__(self, cfg: ModelConfig, attn: AttentionConfig, rope: RotaryEmbedding):
        super().__init__()
        self.attn_cfg = attn
        D, H = cfg.d_model, cfg.n_heads
        G, K = cfg.n_kv_heads or H, D // H  # G key/value heads, each shared by H / G query heads (GQA)
        self.n_heads, self.n_kv_heads, self.head_dim, self.attn_dropout = H, G, K, cfg.attn_dropout
        self.wq = nn.Linear(D, D, bias=cfg.bias)
        self.wk = nn.Linear(D, G * K, bias=cfg.bias)
        self.wv = nn.Linear(D, G * K, bias=cfg.bias)
        self.wo = nn.Linear(D, D, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.rope = rope
        self.resid_dropout = Dropout(cfg.dropout)

    def param_roles(self) -> dict[str, Role]:
        roles = {f"{p}.weight": Role.hidden for p in ("wq", "wk", "wv")} | {"wo.weight": Role.hidden_out}
        return roles | {f"{p}.bias": Role.bias for p in ("wq", "wk", "wv", "wo")}  # norms: leaf defaults

    def _heads(self, x_BTD: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """[B, T, D] -> [B, T, n, K] for the n heads `proj` has (n_heads for q, n_kv_heads for k and v)."""
        w_HKD = proj.weight.view(-1, self.head_dim, proj.weight.shape[1])
        y_BTHK = torch.einsum("btd,hkd->bthk", x_BTD, w_HKD)
        return y_BTHK if proj.bias is None else y_BTHK + proj.bias.view(-1, self.head_dim)

    @property
    def gqa(self) -> dict:
        """SDPA's grouped-query switch (repeats each key/value head for its query heads inside the kernel)."""
        return {"enable_gqa": True} if self.n_kv_heads != self.n_heads else {}

    def forward(self, x_BTD: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
        q_BTHK, k_BTHK, v_BTHK = (self._heads(x_BTD, p) for p in (self.wq, self.wk, self.wv))
        if self.q_norm is not None and self.k_norm is not None:
            q_BTHK, k_BTHK = self.q_norm(q_BTHK), self.k_norm(k_BTHK)
        if ctx is None:  # training: every row starts at position 0, plain causal attention
            q_BTHK, k_BTHK = self.rope(q_BTHK), self.rope(k_BTHK)
            o_BHTK = self.attend(q_BTHK.transpose(1, 2), k_BTHK.transpose(1, 2), v_BTHK.transpose(1, 2), None, 0)
        else:
            o_BHTK = self._attend_in_context(q_BTHK, k_BTHK, v_BTHK, ctx)
        w_DHK = self.wo.weight.view(-1, self.n_heads, self.head_dim)
        y_BTD = torch.einsum("bhtk,dhk->btd", o_BHTK, w_DHK)
        if self.wo.bias is not None:
            y_BTD = y_BTD + self.wo.bias
        return self.resid_dropout(y_BTD)

    def _attend_in_context(self, q_BTHK, k_BTHK, v_BTHK, ctx: Context) -> torch.Tensor:
        """Generation: per-row positions, the explicit mask, and the cache (written at slots start.., then
        read up to the last input, so the inputs see the cached tokens and each other)."""
        q_BHTK = self.rope(q_BTHK, ctx.positions_BT).transpose(1, 2)
        k_BHTK = self.rope(k_BTHK, ctx.positions_BT).transpose(1, 2)
        v_BHTK = v_BTHK.transpose(1, 2)
        if ctx.cache is not None:
            cache_k_BHTK, cache_v_BHTK = ctx.cache.k_BHTK[ctx.layer], ctx.cache.v_BHTK[ctx.layer]
            end = ctx.start + q_BHTK.shape[2]
            cache_k_BHTK[:, :, ctx.start : end] = k_BHTK
            cache_v_BHTK[:, :, ctx.start : end] = v_BHTK
            k_BHTK, v_BHTK = cache_k_BHTK[:, :, :end].to(q_BHTK.dtype), cache_v_BHTK[:, :, :end].to(q_BHTK.dtype)
        return self.attend(q_BHTK, k_BHTK, v_BHTK, ctx.allowed_B1TT, ctx.start)

    def attend(
        self,
        q_BHTK: torch.Tensor,
        k_BHTK: torch.Tensor,
        v_BHTK: torch.Tensor,
        allowed_B1TT: torch.Tensor | None,
        start: int,
    ) -> torch.Tensor:
        """Attention of the queries over the keys (both axes sequence positions, hence T twice) -> [B, H, T, K].
        `allowed_B1TT` None: training (query t and key t are
        position t, plain causal); else generation: query i sits at cache slot start + i, key j at slot j, and the
        mask already excludes padding and the future. The override point of attention variants."""
        return F.scaled_dot_product_attention(
            q_BHTK,
            k_BHTK,
            v_BHTK,
            attn_mask=allowed_B1TT,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=allowed_B1TT is None,
            **self.gqa,
        )


class MLP(nn.Module):
    """Two-layer MLP (ReLU or GELU), or SwiGLU (gate * up) when activation=swiglu; dropout on the output. The
    built-in target of `model.mlp` (model/mlp=mlp): its shape and activation come from the model config
    (model.d_ff, model.activation, model.bias, model.dropout), so `mlp` carries nothing it reads. A variant is any
    module class built as `cls(cfg, mlp)`, [B, T, D] -> [B, T, D], declaring its parameters in `param_roles`."""

    def __init__(self, cfg: ModelConfig, mlp: MLPConfig):
        super().__init__()
        self.mlp_cfg = mlp
        D, Fh = cfg.d_model, cfg.d_ff
        self.activation = cfg.activation
        self.w_in = nn.Linear(D, Fh, bias=cfg.bias)
        self.w_gate = nn.Linear(D, Fh, bias=cfg.bias) if cfg.activation == Activation.swiglu else None
        self.w_out = nn.Linear(Fh, D, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)

    def param_roles(self) -> dict[str, Role]:
        roles = {"w_in.weight": Role.hidden, "w_gate.weight": Role.hidden, "w_out.weight": Role.hidden_out}
        return roles | {f"{p}.bias": Role.bias for p in ("w_in", "w_gate", "w_out")}

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h_BTF = self.w_in(x_BTD)
        if self.w_gate is not None:  # swiglu
            h_BTF = F.silu(self.w_gate(x_BTD)) * h_BTF
        elif self.activation == Activation.gelu:
            h_BTF = F.gelu(h_BTF)
        else:
            h_BTF = F.relu(h_BTF)
        return self.dropout(self.w_out(h_BTF))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); `mlp` is an MoE layer when
    the block is one of the configured MoE layers, else the `model.mlp` component (built-in: MLP)."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, moe_cfg: MoEConfig | None = None, layer_idx: int = 0):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = resolve_target(cfg.attention._target_, "model.attention._target_")(cfg, cfg.attention, rope)
        self.mlp_norm = make_norm(cfg, cfg.d_model)
        if moe_cfg is not None and is_moe_layer(layer_idx, moe_cfg):
            self.mlp = MoE(cfg, moe_cfg, layer_idx)
        else:
            self.mlp = resolve_target(cfg.mlp._target_, "model.mlp._target_")(cfg, cfg.mlp)

    def forward(self, x_BTD: torch.Tensor, ctx: Context | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (output, this block's MoE aux loss or None): the loss is read right after the MoE forward that
        made it and returned, never collected from module attributes later. ctx: generation only."""
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), ctx)
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return x_BTD, (self.mlp.aux_loss if isinstance(self.mlp, MoE) else None)


class Transformer(nn.Module):
    """Token embedding [V, C] -> W_e [C -> D] -> blocks -> final norm -> W_ue [D -> V] logits."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int, moe_cfg: MoEConfig | None = None):
        super().__init__()
        self.cfg, self.vocab_size, self.max_seq_len = cfg, vocab_size, max_seq_len
        D, C = cfg.d_model, cfg.n_embed or cfg.d_model
        self.tok_emb = nn.Embedding(vocab_size, C)
        # embed_proj=false (Llama's shape): no projection, the embedding (C = D) feeds the blocks directly
        self.W_e = nn.Linear(C, D, bias=cfg.bias) if cfg.embed_proj else nn.Identity()
        self.emb_dropout = Dropout(cfg.dropout)
        # One RoPE table shared by all layers (a buffer, so it follows .to(device)).
        self.rope = RotaryEmbedding(D // cfg.n_heads, max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg, self.rope, moe_cfg, i) for i in range(cfg.n_layers))
        self.final_norm = make_norm(cfg, D)
        self.W_ue = nn.Linear(D, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.W_ue.weight = self.tok_emb.weight
        if not self.tok_emb.weight.is_meta:  # on the meta device (sizing, parallelize) there is nothing to fill
            self.init_weights()

    def param_roles(self) -> dict[str, Role]:
        # tok_emb and the norms: leaf defaults (roles.LEAF_ROLES); a tied W_ue.weight is tok_emb's tensor
        roles = {"W_ue.weight": Role.unembedding}
        if isinstance(self.W_e, nn.Linear):  # embed_proj=false: an nn.Identity, no parameters
            roles |= {"W_e.weight": Role.embedding_proj, "W_e.bias": Role.bias}
        return roles

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, write: Callable[[nn.Parameter, torch.Tensor], None] | None = None):
        """Every parameter and buffer to its initial value, in place (the rule: each parameter's role, `Role.init`).

        seed None: normal draws come from the global generator, in parameter order (what the constructor does,
        so `torch.manual_seed(s); Transformer(...)` is reproducible). seed given (parallelize.py, after
        materializing): each parameter draws its full tensor from its own generator, seeded by (seed, its name)
        (`param_seed`), so its value depends neither on the other parameters nor on how the model is wrapped or
        sharded: one process, DDP and FSDP2 on any number of ranks start from the same weights (tested bit-exact).
        `write(param, value)` puts a full-size value into a parameter (default: copy_); parallelize.py passes one
        that keeps a sharded parameter's own shard. Tied weights are initialized once, under their first name.
        """
        for r in param_roles(self):  # each tensor once (tied weights under their first name)
            kind, x = r.role.init(self.cfg.init_std, self.cfg.n_layers)
            param = r.param
            # param.shape is the full shape, also of a sharded parameter (a DTensor)
            value = torch.empty(param.shape, dtype=param.dtype, device=param.device)
            if kind == "normal":
                gen = None if seed is None else torch.Generator(param.device).manual_seed(param_seed(seed, r.name))
                value.normal_(0.0, x, generator=gen)
            else:
                value.fill_(x)  # 0 (biases) or 1 (norm gains): no draw
            if write is None:
                param.copy_(value)
            else:
                write(param, value)
        self.rope.reset_tables()
        for layer in moe_layers(self):
            layer.reset_buffers()

    def forward(
        self,
        idx_BT: torch.Tensor,
        pad_B: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> LMOutput:
        """Token ids [B, T] -> LMOutput(logits [B, T, V], MoE aux loss summed over blocks or None).

        Training passes ids only. Generation: `pad_B` = left-padding tokens per row (positions restart at
        each row's first real token, padding is never attended to); `cache` = the ids continue the cached
        tokens (the cache holds the padding layout, so pad_B is not given with it) and are appended to it;
        `last_only`: logits of the last position only ([B, 1, V]: a prefill's [B, T, V] with a 50k vocabulary
        would be gigabytes that generation never reads).
        """
        x_BTD = self.emb_dropout(self.W_e(self.tok_emb(idx_BT)))
        ctx = None if pad_B is None and cache is None else self._context(idx_BT.shape[1], pad_B, cache)
        aux = None
        for i, block in enumerate(self.blocks):
            x_BTD, block_aux = block(x_BTD, None if ctx is None else ctx._replace(layer=i))
            if block_aux is not None:
                aux = block_aux if aux is None else aux + block_aux
        if cache is not None:
            cache.length += idx_BT.shape[1]
        if last_only:
            x_BTD = x_BTD[:, -1:]
        return LMOutput(self.W_ue(self.final_norm(x_BTD)), aux)

    def _context(self, T: int, pad_B: torch.Tensor | None, cache: KVCache | None) -> Context:
        """Positions and mask of T new tokens after `cache.length` cached slots (0 without a cache)."""
        start = 0
        if cache is not None:
            if pad_B is not None:
                raise ValueError("pass pad_B when creating the KVCache, not with it")
            if cache.length + T > cache.t_max:
                raise ValueError(f"KVCache full: {cache.length} + {T} tokens > {cache.t_max} slots")
            start, pad_B = cache.length, cache.pad_B
        assert pad_B is not None
        query_T = torch.arange(start, start + T, device=pad_B.device)
        key_T = torch.arange(start + T, device=pad_B.device)
        # Positions past the RoPE table occur only in rows that have already finished (generation keeps them
        # in the batch for static shapes and discards their tokens): clamped, so they cannot index out of range.
        positions_BT = (query_T - pad_B[:, None]).clamp(0, self.max_seq_len - 1)
        causal_TT = key_T[None, :] <= query_T[:, None]
        real_BT = key_T[None, :] >= pad_B[:, None]  # [B, keys]
        allowed_BTT = causal_TT & (real_BT[:, None, :] | (key_T[None, :] == query_T[:, None]))
        return Context(positions_BT, allowed_BTT[:, None], start, cache)

    def param_counts(self) -> dict[str, int]:
        """Parameter counts. `embedding` = token embedding + W_e + W_ue (shared tensors counted once);
        `active` = what one token uses (MoE: router, shared experts and top_k of the routed experts)."""
        seen: set[int] = set()

        def count(module: nn.Module) -> int:
            n = 0
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
            return n

        embedding = count(self.tok_emb) + count(self.W_e) + count(self.W_ue)
        non_embedding = count(self.blocks) + count(self.final_norm)
        total = embedding + non_embedding
        active = total - inactive_params(self)
        return {"total": total, "embedding": embedding, "non_embedding": non_embedding, "active": active}

    def flops_per_token(self, seq_len: int, causal: bool = False) -> float:
        """Training FLOPs per token: 6 * (matmul weights) + 12 * L * T * D for attention scores/values.

        Matmul weights exclude the embedding lookup but include W_e and W_ue (PaLM / nanoGPT convention,
        attention counted as if non-causal, as in most published MFU figures: every query against all T keys);
        for MoE layers only the weights a token is routed through (router, shared experts, top_k routed experts)
        count. causal=True: the attention a causal mask leaves, query t against its t + 1 keys, on average
        (T + 1) / 2: 6 * L * (T + 1) * D (what the kernels do; the summary, MFU and FLOPs budgets use the first).
        """
        # dense matrices by role (a tied W_ue counts: the unembedding matmul runs); MoE: the weights a token uses
        dense = (r for r in param_roles(self, tied=True) if r.role.matmul and r.role not in MOE_ROLES)
        matmul = sum(r.param.numel() for r in dense) + moe_matmul_params(self)
        keys = (seq_len + 1) / 2 if causal else seq_len  # keys per query, averaged over the T positions
        return 6.0 * matmul + 12.0 * self.cfg.n_layers * keys * self.cfg.d_model
