"""Sizing a run before spending GPU hours: parameters, FLOPs per token and per-GPU memory (weights, gradients,
optimizer state, activations with and without activation checkpointing, FSDP2 all-gather buffers), and the
largest micro-batch that fits, from the config alone. `docs/sizing.md` derives every formula.

Two users: `python -m scaletrain.run model=llama_7b train.dry_run=true train.dry_run_gpus=8` prints the table and
writes sizing.json into the run folder instead of training (`dry_run`, `size`); and every run checks itself against
this machine before data preparation and before any model is built (`check_resources`: run.py's preflight and
`Trainer`), refusing in one line what cannot fit. Both count parameters with `model_shape`: one block of each kind
(dense, MoE) built on the meta device, times the layer counts, so the time is the same for 3 layers or 10^6.
Written by hand: torchtitan removed its estimator, and none of the libraries this project builds on estimates
activations, activation checkpointing, Muon or MoE.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from scaletrain import hardware
from scaletrain.config import (
    GPT2_VOCAB_SIZE,
    Activation,
    ActivationCheckpointing,
    AttentionConfig,
    BadInput,
    Config,
    MLPConfig,
    Norm,
    ParallelMode,
    Precision,
    TokenizerKind,
)
from scaletrain.cost import step_flops
from scaletrain.model import Block, RotaryEmbedding, Transformer
from scaletrain.moe import inactive_params, is_moe_layer
from scaletrain.records import write_json
from scaletrain.roles import param_roles

if TYPE_CHECKING:  # distributed.py is imported where a check runs (it sets up process groups)
    from scaletrain.distributed import DistEnv

SIZING_FILE = "sizing.json"
log = logging.getLogger(__name__)

GB = 1e9
# of a device's memory: the CUDA context, the allocator's fragmentation and NCCL buffers take the rest (on CPU:
# the system, the interpreter and its libraries, the page cache of the token data)
USABLE = 0.9
AC_MODES = tuple(m.value for m in ActivationCheckpointing)  # none, selective, full: train.ac (parallelize.py)


def vocab_size(cfg: Config) -> int:
    """The model's vocabulary: model.vocab_size, else the tokenizer's size (data.tokenizer: the BPE's vocab_size,
    or GPT-2's)."""
    tok = cfg.data.tokenizer
    return cfg.model.vocab_size or (GPT2_VOCAB_SIZE if tok.kind == TokenizerKind.gpt2 else tok.vocab_size)


def meta_model(cfg: Config) -> Transformer:
    """The configured model on the meta device (shapes only), with `vocab_size(cfg)`."""
    with torch.device("meta"):
        return Transformer(cfg.model, vocab_size(cfg), cfg.model.max_seq_len or cfg.data.seq_len, cfg.moe)


class BlockParams(NamedTuple):
    """The parameters of one transformer block."""

    total: int
    inactive: int  # of them, what one token does not use (routed experts it is not sent to)
    muon: int  # of them, in Muon's groups (hidden and expert matrices: roles.Role.group)
    built: bool = True  # False: too large to build, `total` is a lower bound (`_block`)


NO_BLOCK = BlockParams(0, 0, 0)


@dataclass(frozen=True)
class ModelShape:
    """What the memory formulas read of a model: its layer counts, vocabulary, and the parameters outside the blocks
    and of one block of each kind. The blocks of a kind are alike (moe.py: layer i is MoE when (i + 1) % moe.every
    == 0), so every total is a sum of products. Built by `model_shape` from the config, checked against the model
    itself in tests/test_sizing.py."""

    n_layers: int
    n_moe: int  # MoE blocks
    moe_every: int  # moe.every, 0 for a dense model
    vocab_size: int
    head_dim: int
    max_seq_len: int  # RoPE's table length: model.max_seq_len, else data.seq_len
    n_experts: int
    outside: int  # token embedding, W_e, final norm, W_ue (tied to the embedding: counted once)
    unembedding: int  # W_ue's V x D (FSDP2 gathers it whole)
    dense: BlockParams
    moe: BlockParams

    @property
    def n_dense(self) -> int:
        return self.n_layers - self.n_moe

    @property
    def blocks(self) -> int:
        """Parameters of all blocks."""
        return self.n_dense * self.dense.total + self.n_moe * self.moe.total

    @property
    def params(self) -> int:
        return self.outside + self.blocks

    @property
    def active(self) -> int:
        return self.params - self.n_moe * self.moe.inactive

    @property
    def muon(self) -> int:
        return self.n_dense * self.dense.muon + self.n_moe * self.moe.muon

    @property
    def unit(self) -> int:
        """FSDP2's largest all-gather unit: a block, or the (unsharded) output projection."""
        return max(self.dense.total if self.n_dense else 0, self.moe.total if self.n_moe else 0, self.unembedding)

    @property
    def buffers(self) -> int:
        """Bytes of the model's buffers on every rank: RoPE's cos and sin tables (fp32, head_dim / 2 pairs per
        position) and each MoE layer's selection bias and load accumulator (fp32, one per expert)."""
        return 4 * self.max_seq_len * self.head_dim + 8 * self.n_experts * self.n_moe

    def with_layers(self, n_layers: int) -> ModelShape:
        """The same model with `n_layers` blocks (the largest depth that fits: `check_resources`)."""
        return replace(self, n_layers=n_layers, n_moe=n_layers // self.moe_every if self.moe_every else 0)


def model_shape(cfg: Config) -> ModelShape:
    """The configured model's shape from the config and one block of each kind built on the meta device (no weights;
    a plugin's attention or MLP counts its own parameters). Its time does not depend on model.n_layers, and
    nothing it builds depends on the vocabulary or the sequence length."""
    m, e = cfg.model, cfg.moe
    every = e.every if e.n_experts > 0 else 0
    n_moe = m.n_layers // every if every else 0
    V, D, C = vocab_size(cfg), m.d_model, m.n_embed or m.d_model
    # RoPE holds no parameters: the blocks get a table of one position and one pair (a head_dim of 10^6 would
    # cost a 10^6-wide table here)
    rope = RotaryEmbedding(2, 1, m.rope_theta)
    dense = _block(cfg, rope, 0) if n_moe < m.n_layers else NO_BLOCK  # layer 0: dense if any layer is
    moe = _block(cfg, rope, every - 1) if n_moe else NO_BLOCK  # layer every - 1: MoE
    proj = C * D + (D if m.bias else 0) if m.embed_proj else 0  # W_e (embed_proj=false: none)
    norm = 2 * D if m.norm == Norm.layernorm and m.bias else D  # the final norm's gain (and LayerNorm's bias)
    return ModelShape(
        n_layers=m.n_layers,
        n_moe=n_moe,
        moe_every=every,
        vocab_size=V,
        head_dim=D // m.n_heads,
        max_seq_len=m.max_seq_len or cfg.data.seq_len,
        n_experts=e.n_experts,
        outside=V * C + proj + norm + (0 if m.tie_embeddings else V * D),
        unembedding=V * D,
        dense=dense,
        moe=moe,
    )


def _block(cfg: Config, rope: RotaryEmbedding, layer: int) -> BlockParams:
    """Block `layer` built on the meta device and counted; a block too large for torch to describe (a tensor's
    bytes beyond 64 bits: model.d_model=2**32) is not built but bounded (`_block_bound`)."""
    bound = _block_bound(cfg, layer)
    if 4 * bound >= 2**62:  # a quarter of the int64 range in bytes: such a block is absurd on any machine anyway
        return BlockParams(bound, 0, 0, built=False)
    with torch.device("meta"):
        block = Block(cfg.model, rope, cfg.moe, layer)
    total = sum(p.numel() for p in block.parameters())
    muon = sum(r.param.numel() for r in param_roles(block) if r.group.startswith("muon"))
    return BlockParams(total, inactive_params(block), muon)


def _block_bound(cfg: Config, layer: int) -> int:
    """At least the parameters of block `layer`: the matrices of the built-in attention (q, k, v, o) and MLP (up,
    down; SwiGLU's gate) or MoE layer (router, experts, shared experts), Python integers (no overflow); a plugin's
    attention or MLP counts 0."""
    m, e = cfg.model, cfg.moe
    D, G, K = m.d_model, m.n_kv_heads or m.n_heads, m.d_model // m.n_heads
    per_hidden = 3 if m.activation == Activation.swiglu else 2  # matrices of D x hidden
    attn = 2 * D * D + 2 * D * G * K if m.attention._target_ == AttentionConfig._target_ else 0
    if is_moe_layer(layer, e):
        hidden = e.d_expert or m.d_ff
        return attn + e.n_experts * D + per_hidden * D * hidden * (e.n_experts + e.n_shared)
    return attn + (per_hidden * D * m.d_ff if m.mlp._target_ == MLPConfig._target_ else 0)


def dry_run(cfg: Config, run_dir: Path) -> Sizing:
    """`train.dry_run=true`: size the run, print the table, write sizing.json into `run_dir`."""
    sizing = size(cfg, cfg.train.dry_run_gpus, cfg.train.dry_run_gpu_mem_gb)
    print(format_sizing(sizing, cfg.model.name))
    write_json(Path(run_dir) / SIZING_FILE, sizing.to_dict())
    return sizing


def formula_notes(cfg: Config, shape: ModelShape) -> list[str]:
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
    if m.mlp._target_ != MLPConfig._target_ and shape.n_dense:  # some layer is dense
        notes.append(
            f"model.mlp={m.mlp.name} ({m.mlp._target_}) is not the built-in MLP: {estimate} MLP "
            f"(model.activation={m.activation}, model.d_ff={m.d_ff}) in its place, not what this one keeps"
        )
    return notes


def activation_elements(cfg: Config, shape: ModelShape) -> dict[str, float]:
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
    n_moe, L = shape.n_moe, shape.n_layers
    moe_mlp, fp32_router = dense_mlp, 0.0
    if n_moe:  # routed experts: each token's top_k copies; shared experts: once (moe.py's grouped path)
        e = cfg.moe
        hidden = (e.top_k + e.n_shared) * (e.d_expert or m.d_ff)
        # + top_k dispatched copies of the token (expert inputs) and top_k expert outputs (for the gates' grad)
        moe_mlp = D + _mlp_hidden(m.activation, hidden) + 2 * e.top_k * D
        # router logits and probabilities (fp32), three int64 index tensors of top_k (2 units each), the gates
        # and their sums, the z-loss logsumexp; averaged over the layers
        fp32_router = (2 * e.n_experts + 8 * e.top_k + 3) * n_moe / L
    mlp = (dense_mlp * (L - n_moe) + moe_mlp * n_moe) / L  # the average block
    layer = attn + mlp
    # norm inputs (the fp32 residual stream), their statistics, SDPA's logsumexp
    layer_fp32 = 2 * (D + stats + rms_extra) + H + fp32_router
    V = shape.vocab_size
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


def layer_and_outside_bytes(cfg: Config, shape: ModelShape, act_bytes: int, mask_bytes: int = 1) -> tuple[float, float]:
    """Bytes kept for backward per token without checkpointing, (per block, outside the blocks): activations at
    `act_bytes` (2 under bf16 autocast, 4 in fp32), the fp32 parts, dropout masks at `mask_bytes` (1: CUDA's
    bool masks; scaletrain's CPU dropout keeps a scaled fp32 mask, 4)."""
    el = activation_elements(cfg, shape)
    layer = act_bytes * el["layer"] + 4 * el["layer_fp32"] + mask_bytes * el["layer_mask"]
    return layer, 4 * el["outside_fp32"] + mask_bytes * el["outside_mask"]


def _mlp_hidden(activation: Activation, F: int) -> int:
    """Hidden-width tensors an MLP keeps: relu its output (also w_out's input); gelu its input and output;
    swiglu gate, silu(gate), up and their product."""
    return {Activation.relu: F, Activation.gelu: 2 * F, Activation.swiglu: 4 * F}[activation]


def selective_bytes(cfg: Config, shape: ModelShape, act_bytes: int) -> float:
    """Bytes kept per token per layer (averaged over the layers) under selective checkpointing (torchtitan's op
    policy: keep matmul and attention outputs, recompute norms, activation functions and elementwise ops): the
    block input (fp32 residual stream), q, k, v, the attention output and its logsumexp (fp32), the output
    projection's output, the MLP's up (and gate) outputs and its down projection's output. An MoE layer keeps
    the up (and gate) outputs of its top_k routed and n_shared experts, one down projection output per routed
    choice and shared expert (the weighted combine is recomputed), and its fp32 router logits."""
    m = cfg.model
    D, H = m.d_model, m.n_heads
    G, K = m.n_kv_heads or H, D // H
    e, n_moe, L = cfg.moe, shape.n_moe, shape.n_layers
    up_per_unit = 2 if m.activation == Activation.swiglu else 1  # swiglu: gate and up projections

    def mlp(width: int, downs: int) -> float:  # bytes the MLP keeps: up (and gate) outputs, down outputs
        return act_bytes * (up_per_unit * width + downs * D)

    dense_mlp = mlp(m.d_ff, 1)
    moe_mlp = mlp((e.top_k + e.n_shared) * (e.d_expert or m.d_ff), e.top_k + e.n_shared) + 4 * e.n_experts
    mlp_avg = (dense_mlp * (L - n_moe) + moe_mlp * n_moe) / L
    return act_bytes * (D + 2 * G * K + D + D) + mlp_avg + 4 * (D + H)


def backward_working_bytes(cfg: Config, shape: ModelShape) -> float:
    """Gradient tensors the backward pass holds at once per token, on top of what the forward kept, bounded by
    the larger of its two peaks: at the loss, the log-softmax's and the NLL's gradients over the vocabulary
    (2V, fp32); in an MLP's backward, the hidden gradient before and after the activation's backward (2U, U the
    widest hidden row: d_ff, x2 for SwiGLU's gate and up; an MoE's (top_k + n_shared) x d_expert) beside the
    residual gradient and its branch copy (2D). Counted at 4 bytes (bf16 hidden gradients take 2): an upper
    bound, checked against measured peaks in tests/test_sizing.py."""
    m, e = cfg.model, cfg.moe
    per_unit = 2 if m.activation == Activation.swiglu else 1
    hidden = m.d_ff
    if shape.n_moe:
        hidden = max(hidden, (e.top_k + e.n_shared) * (e.d_expert or m.d_ff))
    return 4 * max(2 * shape.vocab_size, 2 * per_unit * hidden + 2 * m.d_model)


def _kept_and_block(
    cfg: Config, shape: ModelShape, ac: str, act_bytes: int, mask_bytes: int
) -> tuple[float, float, float]:
    """(bytes one block keeps under `ac`, one block's full set, bytes kept outside the blocks), per token."""
    layer, outside = layer_and_outside_bytes(cfg, shape, act_bytes, mask_bytes)
    kept = {"none": layer, "selective": selective_bytes(cfg, shape, act_bytes), "full": 4 * cfg.model.d_model}
    return kept[ac], layer, outside


def kept_bytes_per_token(cfg: Config, shape: ModelShape, ac: str, act_bytes: int, mask_bytes: int = 1) -> float:
    """What the forward pass leaves for the backward per token under `train.ac` = `ac`: every block's set (none),
    what the selective policy saves in each block, or each block's fp32 input (full); plus what lies outside
    the blocks."""
    kept, _, outside = _kept_and_block(cfg, shape, ac, act_bytes, mask_bytes)
    return shape.n_layers * kept + outside


def peak_bytes_per_token(cfg: Config, shape: ModelShape, ac: str, act_bytes: int, mask_bytes: int = 1) -> float:
    """Activation memory's peak per token (an upper bound): what the forward kept, the rest of one block rebuilt
    during its backward (checkpointing), and the backward's working gradients."""
    kept, layer, outside = _kept_and_block(cfg, shape, ac, act_bytes, mask_bytes)
    rebuilt = max(0.0, layer - kept)
    return shape.n_layers * kept + outside + rebuilt + backward_working_bytes(cfg, shape)


def activation_bytes(precision: Precision, device: torch.device) -> int:
    """Bytes of an activation: 2 under bf16 autocast, 4 in fp32 (train.precision=auto as it resolves on `device`)."""
    return 2 if hardware.resolve_precision(precision, device)[0] == Precision.bf16 else 4


class StateBytes(NamedTuple):
    """One rank's training state in bytes (docs/sizing.md, "Fixed memory per GPU")."""

    weights: float
    grads: float
    optimizer: float
    allgather: float
    buffers: float

    @property
    def total(self) -> float:
        return sum(self)


def state_bytes(cfg: Config, shape: ModelShape, ranks: int, act_bytes: int) -> StateBytes:
    """One rank's state when `ranks` ranks train `cfg` (train.parallel with several: fsdp (FSDP2) shards weights,
    gradients and optimizer state and gathers one unit at a time; ddp replicates them and keeps a second copy of
    the gradients in its buckets, gradient_as_bucket_view off; one process is neither: parallelize.py)."""
    P = shape.params
    fsdp = cfg.train.parallel == ParallelMode.fsdp and ranks > 1
    ddp = cfg.train.parallel == ParallelMode.ddp and ranks > 1
    shard = ranks if fsdp else 1
    muon = shape.muon if cfg.optim.name == "muon" else 0
    return StateBytes(
        weights=4 * P / shard,  # fp32 master weights
        grads=4 * P / shard * (2 if ddp else 1),  # fp32
        optimizer=(4 * muon + 8 * (P - muon)) / shard,  # Muon: momentum; AdamW: exp_avg, exp_avg_sq
        allgather=2 * shape.unit * act_bytes if fsdp else 0,  # the unit being used and the next (prefetch)
        buffers=shape.buffers,
    )


def largest_micro_batch(budget: float, state: float, per_sequence: float) -> int:
    """Sequences per rank whose peak fits in `budget` bytes beside `state`."""
    return max(0, math.floor((budget - state) / per_sequence))


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
    buffers_gb: float  # RoPE tables, MoE selection bias and load: on every GPU
    activations_gb: dict[str, float]  # per AC mode, for micro_batch sequences
    total_gb: dict[str, float]
    max_micro_batch: dict[str, int]  # per AC mode, in gpu_mem_gb * USABLE
    gpu_mem_gb: float
    notes: list[str] = field(default_factory=list)  # what the formulas do not model (formula_notes)

    def to_dict(self) -> dict:
        return asdict(self)


def size(cfg: Config, gpus: int, gpu_mem_gb: float, micro_batch: int | None = None) -> Sizing:
    """Per-GPU memory of training `cfg` on `gpus` GPUs (`state_bytes`; train.precision=auto as on a GPU: bf16)."""
    shape = model_shape(cfg)
    if not (shape.dense.built and shape.moe.built):
        block = max(shape.dense.total, shape.moe.total)
        raise ResourceError(
            f"{_block_keys(cfg, shape)}: a block of at least {block:,} parameters, beyond what torch can describe "
            "(a tensor's bytes overflow 64 bits); a smaller model"
        )
    T = cfg.data.seq_len
    b = micro_batch or max(1, cfg.train.batch_size // gpus)
    gpu = torch.device("cuda")  # what the table sizes (a name only: nothing touches CUDA)
    a = activation_bytes(cfg.train.precision, gpu)
    state = state_bytes(cfg, shape, gpus, a)
    per_token = {mode: peak_bytes_per_token(cfg, shape, mode, a) for mode in AC_MODES}
    acts = {mode: b * T * per_token[mode] for mode in AC_MODES}
    budget = gpu_mem_gb * GB * USABLE
    return Sizing(
        params_total=shape.params,
        params_active=shape.active,
        flops_per_token=step_flops(cfg).flops_per_token,
        gpus=gpus,
        parallel=str(cfg.train.parallel) if gpus > 1 else "single",
        precision=str(hardware.resolve_precision(cfg.train.precision, gpu)[0]),
        micro_batch=b,
        seq_len=T,
        params_gb=state.weights / GB,
        grads_gb=state.grads / GB,
        optimizer_gb=state.optimizer / GB,
        allgather_gb=state.allgather / GB,
        buffers_gb=state.buffers / GB,
        activations_gb={m: v / GB for m, v in acts.items()},
        total_gb={m: (state.total + v) / GB for m, v in acts.items()},
        max_micro_batch={m: largest_micro_batch(budget, state.total, T * per_token[m]) for m in AC_MODES},
        gpu_mem_gb=gpu_mem_gb,
        notes=formula_notes(cfg, shape),
    )


def format_sizing(s: Sizing, name: str) -> str:
    lines = [
        f"sizing {name}: {s.params_total:,} parameters ({s.params_active:,} active per token), "
        f"{s.flops_per_token / 1e9:.2f} GFLOP per token (training, seq_len {s.seq_len})",
        f"per GPU on {s.gpus} GPU(s), {s.parallel}, {s.precision}, micro-batch {s.micro_batch} x {s.seq_len}:",
        f"  weights {s.params_gb:8.2f} GB   gradients {s.grads_gb:8.2f} GB   optimizer {s.optimizer_gb:8.2f} GB"
        f"   all-gather buffers {s.allgather_gb:6.2f} GB   model buffers {s.buffers_gb:6.2f} GB",
        "  activation checkpointing   activations      total   largest micro-batch in "
        f"{s.gpu_mem_gb:g} GB x {USABLE:g}",
    ]
    for mode in AC_MODES:
        lines.append(
            f"  {mode:<24} {s.activations_gb[mode]:9.2f} GB {s.total_gb[mode]:8.2f} GB   {s.max_micro_batch[mode]}"
        )
    lines.extend(f"  note: {note}" for note in s.notes)
    return "\n".join(lines)


# ------------------------------------------------------------------------ the check every run makes before it starts

# Host bytes per token of a rank's micro-batch: its int64 inputs and targets, what the loader hands over (the least);
# and the most (data/loader.py): while a batch is made, at most four int64 copies at once (the gathered rows, x and
# y; on CUDA hosts x and y and their page-locked copies), beside the previous batch's x and y.
BATCH_BYTES_PER_TOKEN = 16
LOADER_BYTES_PER_TOKEN = 48


class ResourceError(BadInput, ValueError):
    """A run that cannot fit this machine: the message names the keys that drive the estimate, the estimate, the
    memory there is and the nearest fix."""

    kind = "resources"


@dataclass(frozen=True)
class Resources:
    """One rank's memory as `check_resources` estimated it, in bytes. `needed`: the least it uses (exact formulas),
    the larger of `training` (the state and what the forward keeps, from the second step on) and `sampling`;
    `peak`: the most a training step may use (the dry run's total: the activations' upper bound). On CPU the
    device is the host: its figures include the loader's."""

    where: str  # the device
    capacity: float | None  # what one rank has there (CPU: host memory / ranks on this host); None: unknown
    source: str  # where that figure comes from
    host_capacity: float | None  # host memory per rank on this host (for the loader's buffers)
    host_source: str
    ranks: int
    ranks_here: int  # ranks sharing this host's memory
    micro_batch: int  # sequences per rank per micro-batch
    shape: ModelShape
    state: StateBytes
    kept: float  # activations the forward keeps for the backward, for the micro-batch (+ the batch itself on CPU)
    training: float
    sampling: float  # at each evaluation: weights, optimizer state, buffers and train.sample_count rows
    needed: float
    peak: float
    host_needed: float  # the loader on a GPU host (0 on CPU: counted in `needed`)
    host_peak: float
    max_micro_batch: int  # the dry run's "largest micro-batch that fits" in USABLE of the memory here


def host_memory() -> tuple[int | None, str]:
    """This host's memory a process may use, and where the figure comes from: physical RAM (SC_PHYS_PAGES x
    SC_PAGE_SIZE), or its cgroup's limit where lower (a container's, a SLURM job's --mem). Not MemAvailable: that
    moves with other processes and the page cache, and a refusal must not depend on the moment (it is named in the
    warning instead)."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return None, "host memory unknown"
    limit = _cgroup_limit()
    if limit is not None and limit < ram:
        return limit, f"the cgroup's memory limit; physical RAM {_fmt_bytes(ram)}"
    return ram, "physical RAM"


def _cgroup_limit() -> int | None:
    """The lowest memory limit on this process's cgroup and its parents (v2 memory.max, v1 memory.limit_in_bytes)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:  # "hierarchy-id:controllers:path"; v2: "0::path"
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if not path:
            continue
        if controllers == "":
            base, name = Path("/sys/fs/cgroup"), "memory.max"
        elif "memory" in controllers.split(","):
            base, name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        else:
            continue
        here = Path(path.lstrip("/"))
        for folder in (here, *here.parents):
            try:
                text = (base / folder / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit():  # "max": no limit at this level
                limits.append(int(text))
    return min(limits) if limits else None


def _mem_available() -> int | None:
    """/proc/meminfo's MemAvailable (what can be had now without swapping), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_memory(device: torch.device) -> tuple[int | None, str]:
    """One rank's memory on `device`, and where the figure comes from: a GPU's total memory (its free memory would
    need a CUDA context, and moves with other processes), MPS's recommended maximum, host memory on CPU."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"{props.name}'s total memory"
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory()), "MPS's recommended maximum"
    return host_memory()


class RankBytes(NamedTuple):
    """One rank's bytes on its device (on CPU with its batches: the same memory)."""

    state: StateBytes
    kept: float  # what the forward keeps for the backward, for the micro-batch (CPU: and the batch itself)
    needed: float  # the least: weights, optimizer state, buffers, gradients still held, what the forward keeps
    peak: float  # the most: the state and the activations' peak bound (CPU: and the loader's buffers)
    per_sequence: float  # what one more sequence per micro-batch adds to the peak


def rank_bytes(cfg: Config, shape: ModelShape, ranks: int, device: torch.device, b: int) -> RankBytes:
    """One rank of `ranks` training `b` sequences per micro-batch of a model of `shape` on `device`."""
    T, ac = cfg.data.seq_len, str(cfg.train.ac)
    a, mask = activation_bytes(cfg.train.precision, device), 4 if device.type == "cpu" else 1  # CPU: fp32 masks
    state = state_bytes(cfg, shape, ranks, a)
    kept = b * T * kept_bytes_per_token(cfg, shape, ac, a, mask)
    per_sequence = T * peak_bytes_per_token(cfg, shape, ac, a, mask)
    ddp = cfg.train.parallel == ParallelMode.ddp and ranks > 1
    # gradients are freed before each step's first forward (zero_grad set_to_none); DDP's bucket copy stays, and
    # with train.grad_accum > 1 the later micro-batches' forwards run beside the accumulated gradients
    grads = state.grads if cfg.train.grad_accum > 1 else (state.grads / 2 if ddp else 0.0)
    if device.type == "cpu":  # the batches live in the same memory
        kept += b * T * BATCH_BYTES_PER_TOKEN
        per_sequence += (T + 1) * LOADER_BYTES_PER_TOKEN
    needed = state.weights + state.optimizer + state.buffers + grads + kept
    return RankBytes(state, kept, needed, state.total + b * per_sequence, per_sequence)


def sample_row_bytes(cfg: Config, shape: ModelShape) -> int:
    """The least one sampled row takes (evaluator.sample: train.sample_count rows in one batch): its last hidden
    state and its logits over the vocabulary, fp32 (the prompt's other positions, the KV cache and the tokens come
    on top)."""
    return 4 * (shape.vocab_size + cfg.model.d_model)


def _persistent(state: StateBytes) -> float:
    """What stays between steps: weights, optimizer state, buffers (gradients are freed: zero_grad set_to_none)."""
    return state.weights + state.optimizer + state.buffers


def estimate_resources(cfg: Config, device: torch.device, ranks: int = 1, ranks_here: int = 1) -> Resources:
    """One rank's memory when `ranks` ranks (`ranks_here` on this host) train `cfg` on devices like `device`."""
    shape = model_shape(cfg)
    b, T = max(1, cfg.train.batch_size // ranks), cfg.data.seq_len
    mine = rank_bytes(cfg, shape, ranks, device, b)
    host, host_source = host_memory()
    host_capacity = None if host is None else host / ranks_here
    on_host = device.type == "cpu"
    capacity, source = (host_capacity, host_source) if on_host else device_memory(device)
    if on_host and ranks_here > 1:
        source += f", shared by {ranks_here} ranks"
    fits = b if capacity is None else largest_micro_batch(USABLE * capacity, mine.state.total, mine.per_sequence)
    sampling = _persistent(mine.state) + cfg.train.sample_count * sample_row_bytes(cfg, shape)
    if not on_host and host_capacity is not None:  # the loader's buffers in host memory
        fits = min(fits, largest_micro_batch(USABLE * host_capacity, 0, (T + 1) * LOADER_BYTES_PER_TOKEN))
    return Resources(
        where=str(device),
        capacity=capacity,
        source=source,
        host_capacity=host_capacity,
        host_source=host_source,
        ranks=ranks,
        ranks_here=ranks_here,
        micro_batch=b,
        shape=shape,
        state=mine.state,
        kept=mine.kept,
        training=mine.needed,
        sampling=sampling,
        needed=max(mine.needed, sampling),
        peak=mine.peak,
        host_needed=0.0 if on_host else b * T * BATCH_BYTES_PER_TOKEN,
        host_peak=0.0 if on_host else b * (T + 1) * LOADER_BYTES_PER_TOKEN,
        max_micro_batch=fits,
    )


def check_resources(
    cfg: Config, device: torch.device | None = None, env: DistEnv | None = None, warn: bool = True
) -> Resources:
    """Refuse a run that cannot fit this machine, before data preparation and before any model is built: one
    ResourceError naming the keys that drive the estimate, the estimate, the memory there is and the nearest fix.
    Only the least a rank uses (`Resources.needed`, from exact formulas) above all of its memory refuses, so a run
    that fits is never refused and no switch is needed to get past it; a peak above USABLE of it (the dry run's
    bound) is a warning naming the largest micro-batch that fits. Arithmetic on `model_shape`: milliseconds for
    any config. `device`, `env`: this rank's (the trainer passes them); None: as the trainer will pick them."""
    from scaletrain import distributed

    device = device or hardware.pick_device(cfg.train.device)
    env = env or distributed.detect_env()
    r = estimate_resources(cfg, device, env.world_size, env.local_world_size)
    if r.capacity is not None and r.needed > r.capacity or r.host_needed > (r.host_capacity or math.inf):
        raise ResourceError(f"{_what_needs(cfg, r)}; {_fix(cfg, r)}")
    if warn:
        _warn(cfg, r)
    return r


def _warn(cfg: Config, r: Resources) -> None:
    log.info(
        "memory per rank on %s: %s to %s (docs/sizing.md) of %s (%s)",
        r.where,
        _fmt_bytes(r.needed),
        _fmt_bytes(r.peak),
        "?" if r.capacity is None else _fmt_bytes(r.capacity),
        r.source,
    )
    if r.max_micro_batch < r.micro_batch:  # the dry run's criterion: the peak bound within USABLE of the memory
        log.warning(
            "this run may not fit: its peak may reach %s per rank on %s, which has %s (%s; %g of it usable)%s; %s",
            _fmt_bytes(r.peak),
            r.where,
            _fmt_bytes(r.capacity or 0),
            r.source,
            USABLE,
            f" and {_fmt_bytes(r.host_peak)} of host memory, {_fmt_bytes(r.host_capacity or 0)}" if r.host_peak else "",
            _micro_batch_fix(cfg, r),
        )
    available = _mem_available()
    host_peak = r.peak if r.where == "cpu" else r.host_peak
    if available is not None and host_peak * r.ranks_here > available:
        log.warning(
            "the ranks on this host may need %s of host memory and %s is available now (MemAvailable): other "
            "processes hold the rest",
            _fmt_bytes(host_peak * r.ranks_here),
            _fmt_bytes(available),
        )


def _driver(r: Resources) -> str:
    """What to change for this rank to fit: "loader" (its batches in host memory on a GPU host), "samples" (the rows
    sampled at each evaluation), "activations" (the training state alone fits: the micro-batch or its sequence
    length does not), or the part of the model that makes its state too large: "rope" (RoPE's tables), "blocks",
    "embeddings"."""
    if r.capacity is None or r.needed <= r.capacity:
        return "loader"
    if r.sampling > r.training and _persistent(r.state) <= r.capacity:
        return "samples"
    state, s = r.training - r.kept, r.shape
    if state <= r.capacity:
        return "activations"
    if s.buffers > state / 2:
        return "rope"
    return "blocks" if s.blocks >= s.outside else "embeddings"


def _what_needs(cfg: Config, r: Resources) -> str:
    """The keys that drive the estimate with their values, the least this rank needs, and the memory there is."""
    m, t, s, driver = cfg.model, cfg.train, r.shape, _driver(r)
    if driver == "loader":
        return (
            f"train.batch_size={t.batch_size} x data.seq_len={cfg.data.seq_len}: the loader's batches need at least "
            f"{_fmt_bytes(r.host_needed)} of host memory per rank ({r.micro_batch:,} sequences of int64 inputs and "
            f"targets), this host has {_fmt_bytes(r.host_capacity or 0)} per rank ({r.host_source})"
        )
    where = f"need at least {_fmt_bytes(r.needed)} per rank on {r.where}, which has {_fmt_bytes(r.capacity or 0)} "
    where += f"({r.source})"
    state = f"the training state ({_fmt_bytes(r.training - r.kept)}: weights, optimizer state, buffers)"
    if driver == "samples":
        return (
            f"train.sample_count={t.sample_count}: the rows sampled at each evaluation (at least "
            f"{_fmt_bytes(r.sampling - _persistent(r.state))}: each row's logits over the vocabulary and last hidden "
            f"state) and the weights, optimizer state and buffers ({_fmt_bytes(_persistent(r.state))}) {where}"
        )
    if driver == "activations":
        return (
            f"train.batch_size={t.batch_size} ({r.micro_batch:,} sequences per rank) x data.seq_len={cfg.data.seq_len}"
            f": the activations a step keeps for its backward ({_fmt_bytes(r.kept)}, train.ac={t.ac}) and {state} "
            f"{where}"
        )
    if driver == "rope":
        return (
            f"{_context_key(cfg)}={s.max_seq_len}: RoPE's position tables ({_fmt_bytes(s.buffers)}) in {state} {where}"
        )
    if driver == "blocks":
        block = s.moe.total if s.n_moe > s.n_dense else s.dense.total
        return (
            f"model.n_layers={m.n_layers} blocks of {block:,} parameters ({_block_keys(cfg, s)}): {s.params:,} "
            f"parameters in {state} {where}"
        )
    vocab = "model.vocab_size" if m.vocab_size else "data.tokenizer.vocab_size"
    width = f"model.n_embed={m.n_embed}" if m.n_embed else f"model.d_model={m.d_model}"
    return f"{vocab}={s.vocab_size} x {width}: {s.outside:,} embedding parameters in {state} {where}"


def _context_key(cfg: Config) -> str:
    return "model.max_seq_len" if cfg.model.max_seq_len else "data.seq_len"


def _block_keys(cfg: Config, s: ModelShape, values: bool = True) -> str:
    """The keys that size a block (with their values)."""
    m, e = cfg.model, cfg.moe
    keys = [f"model.d_model={m.d_model}", f"model.d_ff={m.d_ff}"]
    if s.n_moe:
        keys.append(f"moe.n_experts={e.n_experts}")
        keys += [f"moe.{k}={getattr(e, k)}" for k in ("d_expert", "n_shared") if getattr(e, k)]
    return ", ".join(keys if values else [k.split("=")[0] for k in keys])


def _fix(cfg: Config, r: Resources) -> str:
    """The nearest setting that fits (the dry run's criterion: the peak within USABLE of the memory)."""
    driver = _driver(r)
    shard = " or shard the model over more GPUs (train.parallel=fsdp)" if r.where != "cpu" else ""
    if driver in ("loader", "activations"):
        return _micro_batch_fix(cfg, r)
    if driver == "samples":
        row = sample_row_bytes(cfg, r.shape)
        most = max(0, math.floor((USABLE * (r.capacity or 0) - _persistent(r.state)) / row))
        return f"fewer samples: train.sample_count={most:,} at most (0: none)"
    if driver == "rope":
        return f"a shorter context: {_context_key(cfg)} (RoPE's tables: 4 x head_dim bytes per position)"
    if driver == "blocks":
        depth = _largest_depth(cfg, r)
        if depth:
            return f"a smaller model: at most model.n_layers={depth} fit with these settings{shard}"
        return f"a smaller model: not one block fits here (lower {_block_keys(cfg, r.shape, values=False)}){shard}"
    return f"a smaller vocabulary or embedding width{shard}"


def _micro_batch_fix(cfg: Config, r: Resources) -> str:
    t = cfg.train
    n = r.max_micro_batch
    if n == 0:
        ac = "" if t.ac == ActivationCheckpointing.full else " or train.ac=full"
        return f"not one sequence of data.seq_len={cfg.data.seq_len} fits beside the training state: a shorter one{ac}"
    accum = math.ceil(t.batch_size * t.grad_accum / (n * r.ranks))
    return (
        f"largest micro-batch that fits: {n:,} sequences per rank (train.batch_size={n * r.ranks} "
        f"train.grad_accum={accum} keeps about the same tokens per optimizer step)"
    )


def _largest_depth(cfg: Config, r: Resources) -> int:
    """The most blocks whose peak fits in USABLE of the memory here, with everything else as configured (0: none)."""
    device, budget = torch.device(r.where), USABLE * (r.capacity or 0)
    lo, hi = 0, r.shape.n_layers - 1  # lo fits (0: trivially), hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if rank_bytes(cfg, r.shape.with_layers(mid), r.ranks, device, r.micro_batch).peak <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} bytes"
