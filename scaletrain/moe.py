"""Mixture-of-Experts layer: a drop-in replacement for `model.MLP` (same input, same output).

Here: the router (softmax or sigmoid scores, top-k, optional aux-loss-free selection bias), the
stacked experts `[E, ...]` with two implementations (grouped GEMM over tokens sorted by expert, and a
per-expert loop kept as the reference), capacity-based dropping, the balancing losses, per-layer
statistics, and helpers the model / trainer call (`is_moe_layer`, `moe_layers`, `update_moe_biases`,
`moe_metrics`, `inactive_params`, `moe_matmul_params`). The balancing losses are not collected here: each
block returns its layer's `aux_loss` with its output (model.py). Not here: expert parallelism (all-to-all),
the optimizer's treatment of router and expert weights (`optim.py`).

Shape letters: the package legend (scaletrain/__init__.py): N tokens in the micro-batch (B*T), E routed
experts, R = top_k choices per token, F expert hidden size, S = R*N routed slots (one per token and choice);
the grouped GEMM takes rows x_SI to y_SJ through w_EIJ.

Routing. Router logits are computed in fp32 (autocast off). Scores are softmax(logits) or
sigmoid(logits). Experts are *selected* by top-k of scores + `expert_bias` (aux-loss-free balancing,
DeepSeek-V3; the bias never enters the gates); gates are the selected scores, renormalized to sum to
1 when `norm_topk` and R > 1. Capacity (if `capacity_factor` is set) is C = ceil(N*R*cf/E) slots per
expert; slots are served in priority order "all first choices, then all second choices, ...; within
a choice rank, by token position n = b*T + t" (Switch / GShard). A dropped slot contributes 0, so a
token dropped by all its experts passes through the block's residual unchanged. Two consequences:
- Capacity and dropping are decided on each rank's micro-batch (its N tokens), so which slots drop
  depends on the number of ranks (and on grad_accum): `balance_scope=global_batch` does not make a
  run with a capacity factor independent of the rank count; only dropless MoE (capacity_factor=null) is.
- With R >= 2, capacity is not causal within a sequence: every first choice is served before any
  second choice, so later tokens' first choices can take the slots an earlier token's second choice
  needed, and a token's output depends on tokens after it (a generation step, routing other tokens,
  drops differently). With R = 1 a token competes only with the tokens before it in n order.

Losses (`self.aux_loss`, coefficients applied): load balance alpha * E * sum_e f_e P_e, where f_e
is the share of the N*R slots routed to e (before capacity) and P_e the mean router probability
(scores normalized per token): Switch's formula with its top-k scaling, equal to alpha when routing is
uniform and E/R * alpha at full collapse (every token on the same R experts, which hold all the
probability: f_e = 1/R there; E * alpha for top-1 only). `balance_scope=global_batch`: f_e counts the
current micro-batch of every data-parallel rank (grad_accum micro-batches are counted one at a time),
so a dropless run trains like 1 process on the same global batch on any number of ranks, up to
rounding (which can flip near-tied top-k choices); with a capacity factor the dropping stays per rank
(see above). Router z-loss: coef * mean_n(logsumexp(logits_n)^2). Loads for the bias update
accumulate over micro-batches until `update_bias()` (once per optimizer step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config import Activation, BalanceScope, ModelConfig, MoEConfig, MoEImpl, RouterScore
from scaletrain.dropout import Dropout
from scaletrain.roles import Role

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)  # public from torch 2.9


def _raw_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if _GROUPED_MM is None:  # pick_impl never chooses "grouped" then; a direct caller learns why
        raise RuntimeError(f"torch {torch.__version__} has no grouped_mm; use moe.impl=loop")
    return _GROUPED_MM(x, w, offs=offs)


# --- grouped GEMM as a custom op ------------------------------------------------------------------
# Wrapping torch's grouped_mm in our own op (1) gives it a shape-only fake kernel, so torch.compile
# works in fp32 too (the built-in meta kernel insists on bf16), (2) makes the upstream gradient
# contiguous (the built-in backward fails on the stride-0 gradient of `y.sum()`), and (3) zeroes the
# rows past offs[-1] (dropped slots), which grouped_mm leaves uninitialized, in forward and backward.


@torch.library.custom_op("scaletrain::grouped_mm", mutates_args=())
def grouped_mm(x_SI: torch.Tensor, w_EIJ: torch.Tensor, offs_E: torch.Tensor, zero_tail: bool) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of x times w[e] (offs: int32 cumsum); zero_tail: rows from offs[-1] on are 0."""
    y_SJ = _raw_grouped_mm(x_SI, w_EIJ, offs_E)
    if not zero_tail:  # caller guarantees offs[-1] == rows
        return y_SJ
    rows_S1 = torch.arange(x_SI.shape[0], device=x_SI.device)[:, None]
    return torch.where(rows_S1 < offs_E[-1], y_SJ, 0)


@grouped_mm.register_fake
def _(x_SI, w_EIJ, offs_E, zero_tail):
    return x_SI.new_empty(x_SI.shape[0], w_EIJ.shape[-1])


@torch.library.custom_op("scaletrain::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(x_SI: torch.Tensor, g_SJ: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Per-group x[group].T @ g[group] -> [E, I, J] (0 for empty groups): the weight gradient."""
    return _raw_grouped_mm(x_SI.t(), g_SJ, offs_E)


@grouped_mm_wgrad.register_fake
def _(x_SI, g_SJ, offs_E):
    return x_SI.new_empty(offs_E.shape[0], x_SI.shape[1], g_SJ.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    x_SI, w_EIJ, offs_E, ctx.zero_tail = inputs
    ctx.save_for_backward(x_SI, w_EIJ, offs_E)


def _grouped_mm_backward(ctx, g_SJ):
    x_SI, w_EIJ, offs_E = ctx.saved_tensors
    g_SJ = g_SJ.contiguous()
    g_x = grouped_mm(g_SJ, w_EIJ.transpose(-2, -1), offs_E, ctx.zero_tail)
    return g_x, grouped_mm_wgrad(x_SI, g_SJ, offs_E), None, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def pick_impl(requested: MoEImpl | str, device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]):
    """Choose `grouped` or `loop` -> (impl, reason). An explicit `grouped` that cannot run raises."""
    if requested == MoEImpl.loop:
        return "loop", "requested"
    why = None
    if _GROUPED_MM is None:
        why = "this torch has no grouped_mm"
    elif device.type == "cuda" and (dtype != torch.bfloat16 or torch.cuda.get_device_capability(device) < (8, 0)):
        why = f"CUDA grouped_mm needs bf16 on SM >= 80 (got {dtype})"
    elif device.type not in ("cpu", "cuda"):
        why = f"no grouped_mm kernel on {device.type}"
    elif any(d * torch.finfo(dtype).bits // 8 % 16 for d in dims):
        why = f"grouped_mm needs row strides that are multiples of 16 bytes (dims {dims}, {dtype})"
    if why is not None and requested == MoEImpl.grouped:
        raise RuntimeError(f"moe.impl=grouped cannot run: {why}")
    return ("loop", why) if why else ("grouped", f"grouped_mm on {device.type} {str(dtype).removeprefix('torch.')}")


class _Permute(torch.autograd.Function):
    """y = x[perm] for a permutation of rows. Its gradient is a gather by the inverse permutation,
    cheaper than the scatter-add that indexing's generic backward does (measurably so on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (inv,) = ctx.saved_tensors
        return g.index_select(0, inv), None, None


# --- experts --------------------------------------------------------------------------------------


class Experts(nn.Module):
    """E feed-forward experts stored as stacked weights (w_in_EDF, w_gate_EDF for SwiGLU, w_out_EFD)."""

    def __init__(self, n: int, d_model: int, d_hidden: int, activation: Activation, bias: bool):
        super().__init__()
        self.activation = activation
        self.w_in_EDF = nn.Parameter(torch.empty(n, d_model, d_hidden))
        self.w_gate_EDF = nn.Parameter(torch.empty(n, d_model, d_hidden)) if activation == Activation.swiglu else None
        self.w_out_EFD = nn.Parameter(torch.empty(n, d_hidden, d_model))
        self.b_in_EF = nn.Parameter(torch.zeros(n, d_hidden)) if bias else None
        self.b_gate_EF = nn.Parameter(torch.zeros(n, d_hidden)) if bias and self.w_gate_EDF is not None else None
        self.b_out_ED = nn.Parameter(torch.zeros(n, d_model)) if bias else None  # biases are 2-D: named b_*

    def matmul_weights(self) -> list[nn.Parameter]:
        return [w for w in (self.w_in_EDF, self.w_gate_EDF, self.w_out_EFD) if w is not None]

    def param_roles(self) -> dict[str, Role]:
        return {
            "w_in_EDF": Role.expert,
            "w_gate_EDF": Role.expert,
            "w_out_EFD": Role.expert_out,  # writes into the residual stream
            "b_in_EF": Role.bias,
            "b_gate_EF": Role.bias,
            "b_out_ED": Role.bias,
        }

    def reset_parameters(self, std: float, out_std: float) -> None:
        for w in self.matmul_weights():
            nn.init.normal_(w, mean=0.0, std=out_std if w is self.w_out_EFD else std)
        for b in (self.b_in_EF, self.b_gate_EF, self.b_out_ED):
            if b is not None:
                nn.init.zeros_(b)

    def _act(self, h_SF: torch.Tensor, gate_SF: torch.Tensor | None) -> torch.Tensor:
        if gate_SF is not None:  # swiglu
            return F.silu(gate_SF) * h_SF
        return F.gelu(h_SF) if self.activation == Activation.gelu else F.relu(h_SF)

    def projections(self) -> dict[str, tuple[nn.Parameter, nn.Parameter | None]]:
        """name -> (stacked weight, stacked bias or None); "gate" only for SwiGLU."""
        p = {"in": (self.w_in_EDF, self.b_in_EF), "out": (self.w_out_EFD, self.b_out_ED)}
        if self.w_gate_EDF is not None:
            p["gate"] = (self.w_gate_EDF, self.b_gate_EF)
        return p

    def _ffn(self, x_SD: torch.Tensor, proj) -> torch.Tensor:
        """The expert MLP, with proj(x, name) applying projection `name` ("in", "gate", "out")."""
        gate_SF = proj(x_SD, "gate") if self.w_gate_EDF is not None else None
        h_SF = self._act(proj(x_SD, "in"), gate_SF)
        return proj(h_SF, "out")

    def one(self, x_SD: torch.Tensor, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e on all rows of x (the shared experts are stored as one expert)."""

        def proj(x, name):
            w, b = self.projections()[name]
            return _affine(x, w[e].to(dtype), None if b is None else b[e].to(dtype))

        return self._ffn(x_SD.to(dtype), proj)

    def loop(self, x_SD: torch.Tensor, counts_E: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Reference path. Rows sorted by expert, counts_E rows each, then rows no expert serves (output 0)."""
        sizes = counts_E.tolist()
        chunks = x_SD.to(dtype).split(sizes + [x_SD.shape[0] - sum(sizes)])
        # unbind once: one stacked gradient per weight, not E zero-filled [E, ...] gradients from w[e]
        w_e = {name: w.to(dtype).unbind(0) for name, (w, _) in self.projections().items()}
        b_e = {
            name: (b.to(dtype).unbind(0) if b is not None else (None,) * len(sizes))
            for name, (_, b) in self.projections().items()
        }
        outs = [
            self._ffn(x_e, lambda x, name, e=e: _affine(x, w_e[name][e], b_e[name][e]))
            for e, x_e in enumerate(chunks[:-1])
        ]
        outs.append(x_SD.new_zeros(chunks[-1].shape[0], x_SD.shape[1], dtype=dtype))
        return torch.cat(outs)

    def grouped(self, x_SD, counts_E, expert_S, dtype: torch.dtype, has_tail: bool) -> torch.Tensor:
        """Same contract as `loop`, one grouped GEMM per projection; expert_S picks each row's biases."""
        offs_E = counts_E.cumsum(0).to(torch.int32)

        def proj(x, name):
            w, b = self.projections()[name]
            y = grouped_mm(x, w.to(dtype), offs_E, has_tail)
            return y if b is None else y + b.to(dtype)[expert_S]

        return self._ffn(x_SD.to(dtype), proj)


def _affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x @ w if b is None else x @ w + b


# --- the layer ------------------------------------------------------------------------------------


def is_moe_layer(layer_idx: int, moe_cfg: MoEConfig | None) -> bool:
    """Layer i (0-based) is MoE when n_experts > 0 and (i + 1) % every == 0 (every=2: layers 1, 3, ...)."""
    return moe_cfg is not None and moe_cfg.n_experts > 0 and (layer_idx + 1) % moe_cfg.every == 0


class MoE(nn.Module):
    """Router + routed experts (+ shared experts) + output dropout. forward(x_BTD) -> y_BTD.

    After each forward: `aux_loss` (scalar with grad, coefficients applied; the trainer adds the sum
    over layers to the loss), `stats` (detached tensors), `dispatch` (which path ran and why).
    `update_bias()` once per optimizer step applies the aux-loss-free bias update.
    """

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, layer_idx: int | None = None):
        super().__init__()
        self.cfg, self.moe_cfg, self.layer_idx = cfg, moe_cfg, layer_idx  # layer_idx names the metrics
        D, E, Fh = cfg.d_model, moe_cfg.n_experts, moe_cfg.d_expert or cfg.d_ff
        self.n_experts, self.top_k, self.d_expert = E, moe_cfg.top_k, Fh
        self.w_router_ED = nn.Parameter(torch.empty(E, D))
        self.experts = Experts(E, D, Fh, cfg.activation, cfg.bias)
        self.shared = Experts(1, D, Fh * moe_cfg.n_shared, cfg.activation, cfg.bias) if moe_cfg.n_shared else None
        self.dropout = Dropout(cfg.dropout)
        self.expert_bias_E: torch.Tensor  # buffers (declared for the type checker)
        self.load_acc_E: torch.Tensor
        self.register_buffer("expert_bias_E", torch.zeros(E))  # saved: part of the model's routing
        self.register_buffer("load_acc_E", torch.zeros(E), persistent=False)  # loads since update_bias
        self.aux_loss = torch.zeros(())
        self.stats: dict[str, torch.Tensor] = {}
        self.dispatch = "not run yet"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Init like the dense model: N(0, init_std); output projections / sqrt(2 * n_layers)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.w_router_ED, mean=0.0, std=std)
        for experts in (self.experts, self.shared):
            if experts is not None:
                experts.reset_parameters(std, out_std)

    def param_roles(self) -> dict[str, Role]:
        return {"w_router_ED": Role.router}  # the experts declare their own

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Selection bias and load accumulator to 0 (after `to_empty` materialized a meta-device model)."""
        self.expert_bias_E.zero_()
        self.load_acc_E.zero_()

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        (N, D), R = x_ND.shape, self.top_k
        dtype = _compute_dtype(x_ND, self.experts.w_in_EDF)
        logits_NE, scores_NE, experts_NR, gates_NR = self.route(x_ND)
        order_S, inv_S, expert_S, weight_RN, kept_E, routed_E = self.plan(experts_NR, gates_NR)
        impl, why = pick_impl(self.moe_cfg.impl, x_ND.device, dtype, (D, self.d_expert))
        self.dispatch = f"{impl} ({why})"
        x_SD = _Permute.apply(x_ND.to(dtype).expand(R, N, D).reshape(R * N, D), order_S, inv_S)
        if impl == "grouped":
            y_SD = self.experts.grouped(x_SD, kept_E, expert_S, dtype, self.moe_cfg.capacity_factor is not None)
        else:
            y_SD = self.experts.loop(x_SD, kept_E, dtype)
        y_RND = _Permute.apply(y_SD, inv_S, order_S).view(R, N, D)  # back to slot order s = r*N + n
        y_ND = (y_RND.float() * weight_RN[..., None]).sum(0).to(dtype)  # (einsum would be a slow tiny-bmm here)
        if self.shared is not None:
            y_ND = y_ND + self.shared.one(x_ND, 0, dtype)
        self._losses_and_stats(logits_NE, scores_NE, kept_E, routed_E)
        return self.dropout(y_ND.view(x_BTD.shape))

    def route(self, x_ND: torch.Tensor):
        """fp32 router -> logits_NE, scores_NE, experts_NR (selected with the bias), gates_NR (without)."""
        with torch.autocast(x_ND.device.type, enabled=False):
            x_ND = x_ND.float()
            eps = self.moe_cfg.router_jitter
            if self.training and eps > 0:
                x_ND = x_ND * torch.empty_like(x_ND).uniform_(1.0 - eps, 1.0 + eps)
            logits_NE = torch.einsum("nd,ed->ne", x_ND, self.w_router_ED.float())
            if self.moe_cfg.score == RouterScore.sigmoid:
                scores_NE = torch.sigmoid(logits_NE)
            else:
                scores_NE = torch.softmax(logits_NE, dim=-1)
            experts_NR = torch.topk(scores_NE.detach() + self.expert_bias_E, self.top_k, dim=-1).indices
            gates_NR = scores_NE.gather(1, experts_NR)
            if self.moe_cfg.norm_topk and self.top_k > 1:
                gates_NR = gates_NR / gates_NR.sum(-1, keepdim=True).clamp_min(1e-20)
        return logits_NE, scores_NE, experts_NR, gates_NR

    def plan(self, experts_NR: torch.Tensor, gates_NR: torch.Tensor):
        """Sort the S = R*N slots (s = r*N + n) by expert; over-capacity slots go last (no host sync).
        Capacity counts this rank's micro-batch only and, with R >= 2, is not causal within a sequence
        (module docstring).

        Returns order_S (slot of each sorted row) and its inverse inv_S, expert_S (expert of each
        sorted row), weight_RN (gates, 0 where dropped), kept_E (rows each expert serves, in sorted
        order) and routed_E (slots routed to each expert before capacity).
        """
        N, R = experts_NR.shape
        E, S = self.n_experts, N * R
        slot_expert_S = experts_NR.t().reshape(-1)  # k-major: all first choices come first (capacity priority)
        routed_E = torch.zeros(E, dtype=torch.long, device=experts_NR.device)
        routed_E = routed_E.scatter_add(0, slot_expert_S, torch.ones_like(slot_expert_S))
        kept_E, key_S, weight_RN = routed_E, slot_expert_S, gates_NR.t()
        order_S = torch.argsort(key_S, stable=True)
        if self.moe_cfg.capacity_factor is not None:
            capacity = math.ceil(S * self.moe_cfg.capacity_factor / E)
            start_E = routed_E.cumsum(0) - routed_E
            rank_S = torch.arange(S, device=order_S.device) - start_E[slot_expert_S[order_S]]  # place in its queue
            keep_S = torch.zeros_like(slot_expert_S, dtype=torch.bool).scatter(0, order_S, rank_S < capacity)
            kept_E, weight_RN = routed_E.clamp(max=capacity), weight_RN * keep_S.view(R, N)
            order_S = torch.argsort(torch.where(keep_S, slot_expert_S, E), stable=True)  # E: after the last group
        inv_S = torch.empty_like(order_S).scatter(0, order_S, torch.arange(S, device=order_S.device))
        return order_S, inv_S, slot_expert_S[order_S], weight_RN, kept_E, routed_E

    def _losses_and_stats(self, logits_NE, scores_NE, kept_E, routed_E) -> None:
        mc = self.moe_cfg
        probs_NE = scores_NE / scores_NE.sum(-1, keepdim=True) if mc.score == RouterScore.sigmoid else scores_NE
        shares_E = routed_E.float()
        if (
            self.training
            and mc.balance_scope == BalanceScope.global_batch
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            torch.distributed.all_reduce(shares_E)  # counts carry no gradient; P_e stays local (DDP averages)
        frac_E = shares_E / shares_E.sum()
        balance = self.n_experts * (frac_E * probs_NE.mean(0)).sum()  # 1.0 when balanced
        z = torch.logsumexp(logits_NE, dim=-1).square().mean()
        self.aux_loss = mc.aux_loss_coef * balance + mc.z_loss_coef * z
        if self.training and mc.bias_update_rate > 0:
            self.load_acc_E += routed_E.detach().float()
        with torch.no_grad():
            load_E = routed_E.float()
            entropy = -(probs_NE * probs_NE.clamp_min(1e-20).log()).sum(-1).mean()
            self.stats = {
                "tokens_per_expert": load_E,
                "load_max_over_mean": load_E.max() / load_E.mean(),
                "dropped_frac": 1.0 - kept_E.sum().float() / routed_E.sum(),
                "aux_loss": balance.detach(),
                "z_loss": z.detach(),
                "router_entropy": entropy,
                "bias_norm": self.expert_bias_E.norm(),
            }

    @torch.no_grad()
    def update_bias(self) -> None:
        """bias += rate * sign(mean load - load) over the loads since the last call (all ranks), then reset."""
        if self.moe_cfg.bias_update_rate <= 0:
            return
        load_E = self.load_acc_E
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load_E)  # every rank applies the same update
        self.expert_bias_E += self.moe_cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        load_E.zero_()

    def param_counts(self) -> dict[str, int]:
        """total; active per token (router + shared + R of E routed experts); matmul = active matmul weights."""
        routed = sum(p.numel() for p in self.experts.parameters())
        routed_matmul = sum(w.numel() for w in self.experts.matmul_weights())
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        shared_matmul = sum(w.numel() for w in self.shared.matmul_weights()) if self.shared is not None else 0
        router = self.w_router_ED.numel()
        E, R = self.n_experts, self.top_k
        return {
            "total": router + routed + shared,
            "active": router + shared + routed * R // E,
            "matmul": router + shared_matmul + routed_matmul * R // E,
        }


def _compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a Linear here: the autocast dtype if on, else the weights' dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return w.dtype


# --- model-level helpers (what Transformer / Trainer call) ----------------------------------------


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def update_moe_biases(model: nn.Module) -> None:
    for m in moe_layers(model):
        m.update_bias()


def inactive_params(model: nn.Module) -> int:
    """Parameters a token does not use: routed experts it is not sent to (total - active)."""
    return sum(c["total"] - c["active"] for c in (m.param_counts() for m in moe_layers(model)))


def moe_matmul_params(model: nn.Module) -> int:
    """Matmul weights a token uses in the MoE layers (for FLOPs per token: 6 x this)."""
    return sum(m.param_counts()["matmul"] for m in moe_layers(model))


def moe_metrics(model: nn.Module) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Scalars `moe/<stat>` (mean over layers; load_max_over_mean and dropped_frac: max) and
    `moe/layer{i}/<stat>`, plus tokens per expert per layer (for a histogram). Syncs the device."""
    scalars, loads = {}, {}
    per_stat: dict[str, list[float]] = {}
    for j, m in enumerate(moe_layers(model)):
        i = j if m.layer_idx is None else m.layer_idx
        for k, v in m.stats.items():
            if k == "tokens_per_expert":
                loads[f"moe/layer{i}/tokens_per_expert"] = v.tolist()
                continue
            scalars[f"moe/layer{i}/{k}"] = float(v)
            per_stat.setdefault(k, []).append(float(v))
    for k, vs in per_stat.items():
        scalars[f"moe/{k}"] = max(vs) if k in ("load_max_over_mean", "dropped_frac") else sum(vs) / len(vs)
    return scalars, loads
