"""Sizing a run before spending GPU hours: parameters, FLOPs per token and per-GPU memory (weights, gradients,
optimizer state, activations with and without activation checkpointing, FSDP2 all-gather buffers), and the
largest micro-batch that fits, from the config alone. The model is built on the meta device: no weights are
allocated, so `llama_7b` sizes on a laptop in seconds. `docs/sizing.md` derives every formula.

`python -m scaletrain.run model=llama_7b train.dry_run=true train.dry_run_gpus=8` prints the table and writes
sizing.json into the run folder instead of training. Written by hand: torchtitan removed its estimator, and
none of the libraries this project builds on estimates activations, activation checkpointing, Muon or MoE.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from scaletrain.config import (
    GPT2_VOCAB_SIZE,
    Activation,
    ActivationCheckpointing,
    AttentionConfig,
    Config,
    MLPConfig,
    Norm,
    ParallelMode,
    Precision,
    TokenizerKind,
)
from scaletrain.cost import step_flops
from scaletrain.model import Transformer
from scaletrain.moe import moe_layers
from scaletrain.records import write_json
from scaletrain.roles import param_roles

SIZING_FILE = "sizing.json"

GB = 1e9
USABLE = 0.9  # of a GPU's memory: the CUDA context, the allocator's fragmentation and NCCL buffers take the rest
AC_MODES = tuple(m.value for m in ActivationCheckpointing)  # none, selective, full: train.ac (parallelize.py)


def meta_model(cfg: Config) -> Transformer:
    """The configured model on the meta device (shapes only); the vocabulary: model.vocab_size, else the
    tokenizer's size (data.tokenizer: the BPE's vocab_size, or GPT-2's)."""
    tok = cfg.data.tokenizer
    vocab = cfg.model.vocab_size or (GPT2_VOCAB_SIZE if tok.kind == TokenizerKind.gpt2 else tok.vocab_size)
    with torch.device("meta"):
        return Transformer(cfg.model, vocab, cfg.model.max_seq_len or cfg.data.seq_len, cfg.moe)


def dry_run(cfg: Config, run_dir: Path) -> Sizing:
    """`train.dry_run=true`: size the run, print the table, write sizing.json into `run_dir`."""
    sizing = size(cfg, cfg.train.dry_run_gpus, cfg.train.dry_run_gpu_mem_gb)
    print(format_sizing(sizing, cfg.model.name))
    write_json(Path(run_dir) / SIZING_FILE, sizing.to_dict())
    return sizing


def formula_notes(cfg: Config, model: Transformer) -> list[str]:
    """What the activation formulas below cannot know: they model the built-in attention (SDPA) and MLP op by op,
    so a plugin's component (its own tensors kept for the backward) is counted as the built-in in its place.
    Weights, gradients and optimizer state come from the model's own parameters and stay exact."""
    m, notes = cfg.model, []
    estimate = "activation memory (and the largest micro-batch) counts the built-in"
    if m.attention._target_ != AttentionConfig._target_:
        notes.append(
            f"model.attention={m.attention.name} ({m.attention._target_}) is not the built-in attention: "
            f"{estimate} SDPA attention in its place, not what this one keeps"
        )
    if m.mlp._target_ != MLPConfig._target_ and len(moe_layers(model)) < m.n_layers:  # some layer is dense
        notes.append(
            f"model.mlp={m.mlp.name} ({m.mlp._target_}) is not the built-in MLP: {estimate} MLP "
            f"(model.activation={m.activation}, model.d_ff={m.d_ff}) in its place, not what this one keeps"
        )
    return notes


def activation_elements(cfg: Config, model: Transformer) -> dict[str, float]:
    """Elements saved for the backward pass per token: {"layer_<dtype>": ..., "layer_fp32": ..., "outside_fp32":
    ...} for one block (in the activation dtype, and the fp32 part: residual stream, norm statistics, softmax
    statistics) and outside the blocks (embedding, final norm, the loss's log-softmax over the vocabulary).
    What autograd keeps for each op of model.py (docs/sizing.md lists them)."""
    m = cfg.model
    D, H = m.d_model, m.n_heads
    G, K = m.n_kv_heads or H, D // H
    stats = 2 if m.norm == Norm.layernorm else 1  # mean and rstd, or rstd
    # torch's RMSNorm is a composite of ops: it also keeps the normalized input (x * rstd) before the gain
    rms_extra = D if m.norm == Norm.rmsnorm else 0
    # attention: the norm output (as the projections' input), q, k and v after RoPE (SDPA's inputs; RoPE
    # multiplies by a constant, so it keeps nothing per token), SDPA's output (the output projection's input)
    attn = D + D + 2 * G * K + D
    dense_mlp = D + _mlp_hidden(m.activation, m.d_ff)
    n_moe = len(moe_layers(model))
    moe_mlp, fp32_router = dense_mlp, 0.0
    if n_moe:  # routed experts: each token's top_k copies; shared experts: once (moe.py's grouped path)
        e = cfg.moe
        hidden = (e.top_k + e.n_shared) * (e.d_expert or m.d_ff)
        # + top_k dispatched copies of the token (expert inputs) and top_k expert outputs (for the gates' grad)
        moe_mlp = D + _mlp_hidden(m.activation, hidden) + 2 * e.top_k * D
        # router logits and probabilities (fp32), three int64 index tensors of top_k (2 units each), the gates
        # and their sums, the z-loss logsumexp; averaged over the layers
        fp32_router = (2 * e.n_experts + 8 * e.top_k + 3) * n_moe / m.n_layers
    mlp = (dense_mlp * (m.n_layers - n_moe) + moe_mlp * n_moe) / m.n_layers  # the average block
    layer = attn + mlp
    # norm inputs (the fp32 residual stream), their statistics, SDPA's logsumexp
    layer_fp32 = 2 * (D + stats + rms_extra) + H + fp32_router
    V = model.vocab_size
    C = m.n_embed or D
    # W_e's input (the embedding output), final norm input, its statistics and output (W_ue's input), the loss's
    # log-softmax over the vocabulary (fp32), and the int64 token ids (2 fp32 elements)
    outside_fp32 = (C if m.embed_proj else 0) + 2 * D + stats + rms_extra + V + 2
    # dropout keeps its mask: on the attention and MLP outputs of each block, and on the embedding output
    masks = (2 * D, D) if m.dropout > 0 else (0, 0)
    return {
        "layer": layer,
        "layer_fp32": layer_fp32,
        "layer_mask": masks[0],
        "outside_fp32": outside_fp32,
        "outside_mask": masks[1],
    }


def layer_and_outside_bytes(
    cfg: Config, model: Transformer, act_bytes: int, mask_bytes: int = 1
) -> tuple[float, float]:
    """Bytes kept for backward per token without checkpointing, (per block, outside the blocks): activations at
    `act_bytes` (2 under bf16 autocast, 4 in fp32), the fp32 parts, dropout masks at `mask_bytes` (1: CUDA's
    bool masks; scaletrain's CPU dropout keeps a scaled fp32 mask, 4)."""
    el = activation_elements(cfg, model)
    layer = act_bytes * el["layer"] + 4 * el["layer_fp32"] + mask_bytes * el["layer_mask"]
    return layer, 4 * el["outside_fp32"] + mask_bytes * el["outside_mask"]


def _mlp_hidden(activation: Activation, F: int) -> int:
    """Hidden-width tensors an MLP keeps: relu its output (also w_out's input); gelu its input and output;
    swiglu gate, silu(gate), up and their product."""
    return {Activation.relu: F, Activation.gelu: 2 * F, Activation.swiglu: 4 * F}[activation]


def selective_bytes(cfg: Config, model: Transformer, act_bytes: int) -> float:
    """Bytes kept per token per layer (averaged over the layers) under selective checkpointing (torchtitan's op
    policy: keep matmul and attention outputs, recompute norms, activation functions and elementwise ops): the
    block input (fp32 residual stream), q, k, v, the attention output and its logsumexp (fp32), the output
    projection's output, the MLP's up (and gate) outputs and its down projection's output. An MoE layer keeps
    the up (and gate) outputs of its top_k routed and n_shared experts, one down projection output per routed
    choice and shared expert (the weighted combine is recomputed), and its fp32 router logits."""
    m = cfg.model
    D, H = m.d_model, m.n_heads
    G, K = m.n_kv_heads or H, D // H
    e, n_moe = cfg.moe, len(moe_layers(model))
    up_per_unit = 2 if m.activation == Activation.swiglu else 1  # swiglu: gate and up projections

    def mlp(width: int, downs: int) -> float:  # bytes the MLP keeps: up (and gate) outputs, down outputs
        return act_bytes * (up_per_unit * width + downs * D)

    dense_mlp = mlp(m.d_ff, 1)
    moe_mlp = mlp((e.top_k + e.n_shared) * (e.d_expert or m.d_ff), e.top_k + e.n_shared) + 4 * e.n_experts
    mlp_avg = (dense_mlp * (m.n_layers - n_moe) + moe_mlp * n_moe) / m.n_layers
    return act_bytes * (D + 2 * G * K + D + D) + mlp_avg + 4 * (D + H)


def backward_working_bytes(cfg: Config, model: Transformer) -> float:
    """Gradient tensors the backward pass holds at once per token, on top of what the forward kept, bounded by
    the larger of its two peaks: at the loss, the log-softmax's and the NLL's gradients over the vocabulary
    (2V, fp32); in an MLP's backward, the hidden gradient before and after the activation's backward (2U, U the
    widest hidden row: d_ff, x2 for SwiGLU's gate and up; an MoE's (top_k + n_shared) x d_expert) beside the
    residual gradient and its branch copy (2D). Counted at 4 bytes (bf16 hidden gradients take 2): an upper
    bound, checked against measured peaks in tests/test_sizing.py."""
    m, e = cfg.model, cfg.moe
    per_unit = 2 if m.activation == Activation.swiglu else 1
    hidden = m.d_ff
    if moe_layers(model):
        hidden = max(hidden, (e.top_k + e.n_shared) * (e.d_expert or m.d_ff))
    return 4 * max(2 * model.vocab_size, 2 * per_unit * hidden + 2 * m.d_model)


def _kept_and_block(
    cfg: Config, model: Transformer, ac: str, act_bytes: int, mask_bytes: int
) -> tuple[float, float, float]:
    """(bytes one block keeps under `ac`, one block's full set, bytes kept outside the blocks), per token."""
    layer, outside = layer_and_outside_bytes(cfg, model, act_bytes, mask_bytes)
    kept = {"none": layer, "selective": selective_bytes(cfg, model, act_bytes), "full": 4 * cfg.model.d_model}
    return kept[ac], layer, outside


def kept_bytes_per_token(cfg: Config, model: Transformer, ac: str, act_bytes: int, mask_bytes: int = 1) -> float:
    """What the forward pass leaves for the backward per token under `train.ac` = `ac`: every block's set (none),
    what the selective policy saves in each block, or each block's fp32 input (full); plus what lies outside
    the blocks."""
    kept, _, outside = _kept_and_block(cfg, model, ac, act_bytes, mask_bytes)
    return cfg.model.n_layers * kept + outside


def peak_bytes_per_token(cfg: Config, model: Transformer, ac: str, act_bytes: int, mask_bytes: int = 1) -> float:
    """Activation memory's peak per token (an upper bound): what the forward kept, the rest of one block rebuilt
    during its backward (checkpointing), and the backward's working gradients."""
    kept, layer, outside = _kept_and_block(cfg, model, ac, act_bytes, mask_bytes)
    rebuilt = max(0.0, layer - kept)
    return cfg.model.n_layers * kept + outside + rebuilt + backward_working_bytes(cfg, model)


@dataclass
class Sizing:
    params_total: int
    params_active: int
    flops_per_token: float
    gpus: int
    parallel: str
    precision: str
    micro_batch: int
    seq_len: int
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    allgather_gb: float
    activations_gb: dict[str, float]  # per AC mode, for micro_batch sequences
    total_gb: dict[str, float]
    max_micro_batch: dict[str, int]  # per AC mode, in gpu_mem_gb * USABLE
    gpu_mem_gb: float
    notes: list[str] = field(default_factory=list)  # what the formulas do not model (formula_notes)

    def to_dict(self) -> dict:
        return asdict(self)


def size(cfg: Config, gpus: int, gpu_mem_gb: float, micro_batch: int | None = None) -> Sizing:
    """Per-GPU memory of training `cfg` on `gpus` GPUs (train.parallel: fsdp (FSDP2) shards weights, gradients and
    optimizer state; ddp replicates them and keeps a second copy of the gradients in its buckets)."""
    model = meta_model(cfg)
    counts = model.param_counts()
    P = counts["total"]
    T = cfg.data.seq_len
    b = micro_batch or max(1, cfg.train.batch_size // gpus)
    fsdp = cfg.train.parallel == ParallelMode.fsdp and gpus > 1
    shard = gpus if fsdp else 1
    a = 2 if cfg.train.precision == Precision.bf16 else 4  # activation bytes under autocast
    roles = param_roles(model)
    muon_params = sum(r.param.numel() for r in roles if r.group.startswith("muon")) if cfg.optim.name == "muon" else 0
    params = 4 * P / shard  # fp32 master weights
    grads = 4 * P / shard * (1 if fsdp else 2)  # fp32; DDP's buckets copy them (gradient_as_bucket_view off)
    optimizer = (4 * muon_params + 8 * (P - muon_params)) / shard  # Muon: momentum; AdamW: exp_avg, exp_avg_sq
    unit = max(sum(p.numel() for p in blk.parameters()) for blk in model.blocks)
    unit = max(unit, model.W_ue.weight.numel())  # the unsharded output projection is gathered whole too
    allgather = 2 * unit * (2 if a == 2 else 4) if fsdp else 0  # the unit being used and the next (prefetch)
    per_token = {mode: peak_bytes_per_token(cfg, model, mode, a) for mode in AC_MODES}
    fixed = params + grads + optimizer + allgather
    acts = {mode: b * T * per_token[mode] for mode in AC_MODES}
    budget = gpu_mem_gb * GB * USABLE
    fits = {mode: max(0, math.floor((budget - fixed) / (T * per_token[mode]))) for mode in AC_MODES}
    return Sizing(
        params_total=P,
        params_active=counts["active"],
        flops_per_token=step_flops(cfg, model).flops_per_token,
        gpus=gpus,
        parallel=str(cfg.train.parallel) if gpus > 1 else "single",
        precision=str(cfg.train.precision),
        micro_batch=b,
        seq_len=T,
        params_gb=params / GB,
        grads_gb=grads / GB,
        optimizer_gb=optimizer / GB,
        allgather_gb=allgather / GB,
        activations_gb={m: v / GB for m, v in acts.items()},
        total_gb={m: (fixed + v) / GB for m, v in acts.items()},
        max_micro_batch=fits,
        gpu_mem_gb=gpu_mem_gb,
        notes=formula_notes(cfg, model),
    )


def format_sizing(s: Sizing, name: str) -> str:
    lines = [
        f"sizing {name}: {s.params_total:,} parameters ({s.params_active:,} active per token), "
        f"{s.flops_per_token / 1e9:.2f} GFLOP per token (training, seq_len {s.seq_len})",
        f"per GPU on {s.gpus} GPU(s), {s.parallel}, {s.precision}, micro-batch {s.micro_batch} x {s.seq_len}:",
        f"  weights {s.params_gb:8.2f} GB   gradients {s.grads_gb:8.2f} GB   optimizer {s.optimizer_gb:8.2f} GB"
        f"   all-gather buffers {s.allgather_gb:6.2f} GB",
        "  activation checkpointing   activations      total   largest micro-batch in "
        f"{s.gpu_mem_gb:g} GB x {USABLE:g}",
    ]
    for mode in AC_MODES:
        lines.append(
            f"  {mode:<24} {s.activations_gb[mode]:9.2f} GB {s.total_gb[mode]:8.2f} GB   {s.max_micro_batch[mode]}"
        )
    lines.extend(f"  note: {note}" for note in s.notes)
    return "\n".join(lines)
