"""Decoder-only transformer: token embedding + W_e, pre-norm blocks (RoPE attention, MLP), W_ue.

Here: `Transformer`, `Block`, `Attention`, `MLP`, `RotaryEmbedding`, norm construction, parameter
counting and FLOPs per token (active parameters for MoE), and sampling. Not here: the MoE layer that
replaces the MLP of configured blocks (`moe.py`), parallelism (applied from outside the model,
torchtitan style), optimizer grouping (`optim.py`, `muon.py`).

The forward pass returns `LMOutput(logits, aux_loss)`: the MoE balancing losses travel with the output
(summed block by block), so a recomputed block (activation checkpointing) cannot count them twice and
the training step needs one handle to the model. Shape letters: the legend in scaletrain/__init__.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config import Activation, ModelConfig, MoEConfig, Norm
from scaletrain.dropout import Dropout
from scaletrain.moe import MoE, inactive_params, is_moe_layer, moe_matmul_params


def mark_residual_out(linear: nn.Linear) -> None:
    """A projection that writes into the residual stream: its init is scaled (Transformer._init_weights)."""
    linear.is_residual_out = True  # type: ignore[assignment]  # a plain attribute, not a submodule


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
        inv_freq_P = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles_TP = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq_P)
        self.cos_TP: torch.Tensor  # buffers (declared for the type checker)
        self.sin_TP: torch.Tensor
        self.register_buffer("cos_TP", angles_TP.cos().float(), persistent=False)
        self.register_buffer("sin_TP", angles_TP.sin().float(), persistent=False)

    def forward(self, x_BTHK: torch.Tensor) -> torch.Tensor:
        # Each pair (x0, x1) as the complex number x0 + i*x1, rotated by multiplying with e^(i*angle) (as in
        # Llama / torchtitan): one complex multiply, 3x faster fwd+bwd on CPU than the real-valued stack.
        T = x_BTHK.shape[1]
        rot_T1P = torch.complex(self.cos_TP[:T], self.sin_TP[:T])[:, None, :]
        x_BTHP = torch.view_as_complex(x_BTHK.float().contiguous().unflatten(-1, (-1, 2)))
        return torch.view_as_real(x_BTHP * rot_T1P).flatten(-2).type_as(x_BTHK)


class Attention(nn.Module):
    """Multi-head causal self-attention through SDPA (flash kernel where the device has one)."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        D, H = cfg.d_model, cfg.n_heads
        self.n_heads, self.head_dim, self.attn_dropout = H, D // H, cfg.attn_dropout
        self.wq = nn.Linear(D, D, bias=cfg.bias)
        self.wk = nn.Linear(D, D, bias=cfg.bias)
        self.wv = nn.Linear(D, D, bias=cfg.bias)
        self.wo = nn.Linear(D, D, bias=cfg.bias)
        mark_residual_out(self.wo)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.rope = rope
        self.resid_dropout = Dropout(cfg.dropout)

    def _heads(self, x_BTD: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        w_HKD = proj.weight.view(self.n_heads, self.head_dim, -1)
        y_BTHK = torch.einsum("btd,hkd->bthk", x_BTD, w_HKD)
        return y_BTHK if proj.bias is None else y_BTHK + proj.bias.view(self.n_heads, self.head_dim)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        q_BTHK, k_BTHK, v_BTHK = (self._heads(x_BTD, p) for p in (self.wq, self.wk, self.wv))
        if self.q_norm is not None and self.k_norm is not None:
            q_BTHK, k_BTHK = self.q_norm(q_BTHK), self.k_norm(k_BTHK)
        q_BTHK, k_BTHK = self.rope(q_BTHK), self.rope(k_BTHK)
        o_BHTK = F.scaled_dot_product_attention(
            q_BTHK.transpose(1, 2),
            k_BTHK.transpose(1, 2),
            v_BTHK.transpose(1, 2),
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=True,
        )
        w_DHK = self.wo.weight.view(-1, self.n_heads, self.head_dim)
        y_BTD = torch.einsum("bhtk,dhk->btd", o_BHTK, w_DHK)
        if self.wo.bias is not None:
            y_BTD = y_BTD + self.wo.bias
        return self.resid_dropout(y_BTD)


class MLP(nn.Module):
    """Two-layer MLP (ReLU or GELU), or SwiGLU (gate * up) when activation=swiglu; dropout on the output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, Fh = cfg.d_model, cfg.d_ff
        self.activation = cfg.activation
        self.w_in = nn.Linear(D, Fh, bias=cfg.bias)
        self.w_gate = nn.Linear(D, Fh, bias=cfg.bias) if cfg.activation == Activation.swiglu else None
        self.w_out = nn.Linear(Fh, D, bias=cfg.bias)
        mark_residual_out(self.w_out)
        self.dropout = Dropout(cfg.dropout)

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
    the block is one of the configured MoE layers."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, moe_cfg: MoEConfig | None = None, layer_idx: int = 0):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, rope)
        self.mlp_norm = make_norm(cfg, cfg.d_model)
        self.mlp = (
            MoE(cfg, moe_cfg, layer_idx) if moe_cfg is not None and is_moe_layer(layer_idx, moe_cfg) else MLP(cfg)
        )

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (output, this block's MoE aux loss or None): the loss is read right after the MoE forward that
        made it and returned, never collected from module attributes later."""
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD))
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return x_BTD, (self.mlp.aux_loss if isinstance(self.mlp, MoE) else None)


class Transformer(nn.Module):
    """Token embedding [V, C] -> W_e [C -> D] -> blocks -> final norm -> W_ue [D -> V] logits."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int, moe_cfg: MoEConfig | None = None):
        super().__init__()
        self.cfg, self.vocab_size, self.max_seq_len = cfg, vocab_size, max_seq_len
        D, C = cfg.d_model, cfg.n_embed or cfg.d_model
        self.tok_emb = nn.Embedding(vocab_size, C)
        self.W_e = nn.Linear(C, D, bias=cfg.bias)
        self.emb_dropout = Dropout(cfg.dropout)
        # One RoPE table shared by all layers (a buffer, so it follows .to(device)).
        self.rope = RotaryEmbedding(D // cfg.n_heads, max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg, self.rope, moe_cfg, i) for i in range(cfg.n_layers))
        self.final_norm = make_norm(cfg, D)
        self.W_ue = nn.Linear(D, vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.W_ue.weight = self.tok_emb.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            # GPT-2: projections that write into the residual stream are scaled by 1/sqrt(2 * n_layers).
            if getattr(module, "is_residual_out", False):
                std = std / math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(self, idx_BT: torch.Tensor) -> LMOutput:
        """Token ids [B, T] -> LMOutput(logits [B, T, V], MoE aux loss summed over blocks or None)."""
        x_BTD = self.emb_dropout(self.W_e(self.tok_emb(idx_BT)))
        aux = None
        for block in self.blocks:
            x_BTD, block_aux = block(x_BTD)
            if block_aux is not None:
                aux = block_aux if aux is None else aux + block_aux
        return LMOutput(self.W_ue(self.final_norm(x_BTD)), aux)

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

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * (matmul weights) + 12 * L * T * D for attention scores/values.

        Matmul weights exclude the embedding lookup but include W_e and W_ue (PaLM / nanoGPT convention,
        attention counted as if non-causal, as in most published MFU figures); for MoE layers only the
        weights a token is routed through (router, shared experts, top_k routed experts) count.
        """
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)) + moe_matmul_params(self)
        return 6.0 * matmul + 12.0 * self.cfg.n_layers * seq_len * self.cfg.d_model

    @torch.no_grad()
    def generate(
        self,
        idx_BT: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        stop_token: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample continuations (no KV cache: fine for the short samples shown during training)."""
        for _ in range(max_new_tokens):
            logits_BV = self(idx_BT[:, -self.max_seq_len :]).logits[:, -1, :].float()
            if temperature <= 0:
                next_B1 = logits_BV.argmax(-1, keepdim=True)
            else:
                logits_BV = logits_BV / temperature
                if top_k:
                    kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.size(-1))).values[:, -1:]
                    logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
                probs_BV = F.softmax(logits_BV, dim=-1)
                next_B1 = torch.multinomial(probs_BV, 1, generator=generator)
            idx_BT = torch.cat((idx_BT, next_B1), dim=1)
            if stop_token is not None and bool((next_B1 == stop_token).all()):
                break
        return idx_BT
