"""Typed configuration schemas for scaletrain (no torch import here).

Every Hydra config group (`model`, `moe`, `optim`, `data`, `cluster`, `train`, `logging`) has a
dataclass schema below. `register_configs()` stores the top-level `Config` in Hydra's ConfigStore as
`scaletrain_schema`; `conf/config.yaml` lists it first in its defaults, so every YAML file and every
command-line override is merged into the schema in struct mode:

- an unknown key (`optim.lrr=1`) fails at compose time naming the key,
- a wrong type (`model.d_model=abc`) fails at compose time naming the key and the expected type,
- an unknown option (`model=nope`) fails in Hydra, listing the available options.

Rules that involve more than one field (d_model divisible by n_heads, ...) live in `validate()`,
which `scaletrain.run` calls before any work is done. Enum-typed fields use `StrEnum` because
OmegaConf rejects `typing.Literal`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is inconsistent; the message names the key and what is allowed."""


class Norm(StrEnum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class Activation(StrEnum):
    relu = "relu"
    gelu = "gelu"
    swiglu = "swiglu"


class Decay(StrEnum):
    cosine = "cosine"
    linear = "linear"
    wsd = "wsd"  # warmup-stable-decay: constant LR, then a linear cooldown over the last fraction
    constant = "constant"


class TokenizerKind(StrEnum):
    bpe = "bpe"  # byte-level BPE trained on the training split with HF `tokenizers`
    gpt2 = "gpt2"  # GPT-2 BPE read from local vocab.json / merges.txt


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"  # bf16 autocast around forward; parameters and optimizer state stay fp32


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class ModelConfig:
    name: str = MISSING
    d_model: int = 512
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 2048
    n_embed: Optional[int] = None  # token-embedding width; None = d_model (then W_e is still a Linear)
    vocab_size: Optional[int] = None  # None = taken from the tokenizer
    norm: Norm = Norm.layernorm
    norm_eps: float = 1e-5
    activation: Activation = Activation.relu
    bias: bool = False
    tie_embeddings: bool = False  # tie W_ue to the token embedding (requires n_embed == d_model)
    dropout: float = 0.0  # on the embedding output, the attention output and the MLP output
    # On the attention probabilities (HF's attn_pdrop). Off by default, as in Llama/OLMo: SDPA's CPU flash
    # kernel has no dropout, so any p > 0 takes the math path (2x slower attention, T x T memory on CPU).
    attn_dropout: float = 0.0
    qk_norm: bool = False
    rope_theta: float = 10000.0
    init_std: float = 0.02


class BalanceScope(StrEnum):
    global_batch = "global_batch"  # token shares f_e summed over data-parallel ranks: the loss of the whole batch
    micro_batch = "micro_batch"  # each rank balances the micro-batch it sees (Switch / Mixtral as usually written)


class RouterScore(StrEnum):
    softmax = "softmax"  # probabilities over all experts (Switch, Mixtral, DeepSeekMoE)
    sigmoid = "sigmoid"  # independent per-expert affinities (DeepSeek-V3)


class MoEImpl(StrEnum):
    auto = "auto"  # grouped where the device/dtype/shape supports it, else loop (see moe.pick_impl)
    grouped = "grouped"  # tokens sorted by expert, one grouped GEMM per projection
    loop = "loop"  # reference: one matmul per expert


@dataclass
class MoEConfig:
    """Mixture-of-Experts layer settings (scaletrain/moe.py). `n_experts: 0` (option `moe=none`) = dense MLPs."""

    name: str = "none"
    n_experts: int = 0  # routed experts; 0 = dense MLP in every layer
    top_k: int = 0  # routed experts per token
    every: int = 1  # MoE replaces the MLP of layers i with (i + 1) % every == 0
    d_expert: Optional[int] = None  # expert hidden size; None = model.d_ff
    n_shared: int = 0  # always-on shared experts (DeepSeekMoE), each of hidden size d_expert
    score: RouterScore = RouterScore.softmax
    norm_topk: bool = True  # renormalize the top-k gates to sum to 1 (no effect when top_k = 1)
    capacity_factor: Optional[float] = None  # None = dropless; else capacity = ceil(tokens * top_k * cf / n_experts)
    aux_loss_coef: float = 0.01  # Switch balancing alpha*E*sum_e f_e*P_e (f_e: share of slots); = alpha if balanced
    # global_batch: f_e over all data-parallel ranks, so the loss and the run do not depend on how many GPUs
    # share the batch (Megatron's global_aux_loss, Qwen's global-batch balancing); micro_batch: per rank
    balance_scope: BalanceScope = BalanceScope.global_batch
    z_loss_coef: float = 0.001  # router z-loss coef * mean(logsumexp(logits)^2)
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3) gamma; 0 = off
    router_jitter: float = 0.0  # training only: router input scaled by U(1 - eps, 1 + eps) (Switch)
    impl: MoEImpl = MoEImpl.auto


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    decay: Decay = Decay.cosine
    min_lr_ratio: float = 0.1  # final LR = lr * min_lr_ratio
    decay_frac: float = 0.2  # wsd only: fraction of steps spent in the final decay


class MuonAdjustLR(StrEnum):
    original = "original"  # K. Jordan: lr * sqrt(max(1, rows / cols)); his lr ~0.02
    match_rms_adamw = "match_rms_adamw"  # Moonlight: lr * 0.2 * sqrt(max(rows, cols)); reuses AdamW lr / wd


class NSDtype(StrEnum):
    auto = "auto"  # bf16 on CUDA, fp32 elsewhere (bf16 matmuls are slow on CPUs without AVX512-BF16)
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class MuonConfig:
    """The Muon part of optim=muon (hidden matrices, stacked experts); see scaletrain/muon.py."""

    lr: float = 1e-3
    weight_decay: float = 0.1  # decoupled: p *= 1 - lr * weight_decay (unadjusted lr, as torch.optim.Muon)
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: list[float] = field(default_factory=lambda: [3.4445, -4.7750, 2.0315])
    eps: float = 1e-7  # floor of the Frobenius norm that NS divides by
    adjust_lr: MuonAdjustLR = MuonAdjustLR.match_rms_adamw
    ns_dtype: NSDtype = NSDtype.auto


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    implementation: str = "auto"  # auto | fused | foreach | for_loop
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # optim=muon: the fields above configure the AdamW part (embeddings, W_e, W_ue, norms, biases, router)
    muon: MuonConfig = field(default_factory=MuonConfig)


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = TokenizerKind.bpe
    vocab_size: int = 4096  # bpe only
    gpt2_dir: str = "${oc.env:SCALETRAIN_SHARED,../shared}/data/gpt2_tokenizer"  # gpt2 only
    max_train_bytes: int = 200_000_000  # bpe: train on at most this much text (deterministic prefix)


@dataclass
class DataConfig:
    name: str = "tinystories"
    hub_id: str = "roneneldan/TinyStories"
    hub_train_split: str = "train"
    hub_val_split: str = "validation"
    path: Optional[str] = None  # local folder: train.txt/valid.txt, or *.jsonl / *.parquet with `text`
    text_column: str = "text"
    seq_len: int = 256
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache_dir: str = "${oc.env:SCALETRAIN_CACHE,${oc.env:HOME}/.cache/scaletrain}"
    num_proc: int = 2  # processes for datasets.map tokenization
    hub_timeout_s: float = 5.0  # give up on the hub after this many seconds
    max_val_tokens: Optional[int] = None  # cap the validation split (None = whole split)


@dataclass
class TrainConfig:
    name: str = "default"
    seed: int = 1337
    max_steps: int = 2000
    batch_size: int = 32  # sequences per micro-batch over all ranks (each rank takes batch_size / world_size)
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # 0 disables clipping
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    parallel: str = "ddp"  # with several ranks: ddp | fsdp (FSDP2 fully_shard per block); see distributed.py
    precision: Precision = Precision.fp32  # bf16 = autocast around forward (CUDA and CPU)
    compile: bool = False
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 500
    ckpt_keep: int = 2  # keep this many most recent step checkpoints
    # auto | full | sharded: full = one .pt file (FSDP2 shards gathered to rank 0); sharded = one DCP folder,
    # each rank writes its shards, reshardable on load; auto = sharded under FSDP2 with several ranks, else full
    ckpt_format: str = "auto"
    resume: str = "none"  # none | auto | PATH to a checkpoint file or directory
    log_every: int = 10
    progress_bar: bool = True
    sample_prompt: str = "Once upon a time"
    sample_count: int = 2
    sample_tokens: int = 120
    sample_temperature: float = 0.8
    sample_top_k: int = 50
    matmul_peak_tflops: Optional[float] = None  # override the peak used for MFU
    measure_cpu_peak: bool = True  # on CPU, time a matmul at start-up to get a peak for MFU
    cpu_malloc_cache: bool = True  # on CPU, glibc malloc keeps freed memory (see trainer.configure_cpu_malloc)


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "scaletrain"
    entity: Optional[str] = None
    group: Optional[str] = None
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    name: Optional[str] = None  # None = derived from the overrides of the job
    dir: Optional[str] = None  # None = the run directory


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ClusterConfig:
    """Where the jobs of a sweep run and with what resources (conf/cluster/*.yaml). The launcher
    (`hydra.launcher`: submitit_local or submitit_slurm) reads these by interpolation, and only under
    `-m`; the trainer reads the rank/requeue fields. One rank per GPU: tasks_per_node = gpus_per_node."""

    name: str = "local"
    nodes: int = 1
    gpus_per_node: int = 0  # GPUs of each node per job (local: per job); every GPU is a rank
    tasks_per_node: int = 1  # ranks per node: = gpus_per_node on GPUs; on CPU, the gloo processes per job
    cpus_per_task: Optional[int] = None  # None = the scheduler's default
    mem_gb: Optional[int] = None  # per node; None = the scheduler's default
    timeout_min: int = 240  # time limit per job attempt (a requeued job gets it again)
    max_requeues: int = 20  # preemptions / time limits a job may be requeued after; then it stops
    signal_delay_s: int = 120  # SLURM sends USR2 this long before the time limit: time to checkpoint
    partition: Optional[str] = None  # SLURM only, from here on
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    array_parallelism: int = 256  # jobs of the sweep's array running at once
    additional_parameters: dict[str, str] = field(default_factory=dict)  # more sbatch flags: {mail-type: END}
    setup: list[str] = field(default_factory=list)  # shell lines in the sbatch script before srun
    parallel_jobs: Optional[int] = None  # local only: jobs at once; None = all GPUs busy (CPU: 1)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    experiment: Optional[str] = None  # name of the experiment recipe, set by conf/experiment/*.yaml


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="scaletrain_schema", node=Config)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: DictConfig | Config) -> None:
    """Cross-field rules, checked once before any work. Raises ConfigError naming the key."""
    m, t, o, d = cfg.model, cfg.train, cfg.optim, cfg.data
    for key in ("d_model", "n_layers", "n_heads", "d_ff"):
        _check(getattr(m, key) > 0, f"model.{key}", f"must be a positive integer, got {getattr(m, key)}")
    _check(
        m.d_model % m.n_heads == 0,
        "model.n_heads",
        f"d_model={m.d_model} must be divisible by n_heads={m.n_heads}; "
        f"allowed n_heads: {[h for h in range(1, m.d_model + 1) if m.d_model % h == 0 and h <= 64]}",
    )
    head_dim = m.d_model // m.n_heads
    _check(head_dim % 2 == 0, "model.n_heads", f"head_dim={head_dim} must be even for RoPE")
    _check(m.n_embed is None or m.n_embed > 0, "model.n_embed", "must be positive or null")
    if m.tie_embeddings:
        _check(
            m.n_embed is None or m.n_embed == m.d_model,
            "model.tie_embeddings",
            f"tying needs n_embed == d_model (got n_embed={m.n_embed}, d_model={m.d_model})",
        )
    _check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _check(cfg.train.ckpt_format in ("auto", "full", "sharded"), "train.ckpt_format",
           f"expected auto | full | sharded, got {cfg.train.ckpt_format!r}")
    _check(0.0 <= m.attn_dropout < 1.0, "model.attn_dropout", f"must be in [0, 1), got {m.attn_dropout}")
    _check(m.rope_theta > 0, "model.rope_theta", "must be positive")
    e = cfg.moe
    _check(e.n_experts >= 0, "moe.n_experts", f"must be >= 0 (0 = dense MLPs), got {e.n_experts}")
    if e.n_experts > 0:  # dense (moe=none) ignores the other MoE knobs
        _check(1 <= e.top_k <= e.n_experts, "moe.top_k", f"must be in [1, n_experts={e.n_experts}], got {e.top_k}")
        _check(1 <= e.every <= m.n_layers, "moe.every", f"must be in [1, model.n_layers={m.n_layers}], got {e.every}")
        _check(e.d_expert is None or e.d_expert > 0, "moe.d_expert", "must be positive or null (= model.d_ff)")
        _check(e.n_shared >= 0, "moe.n_shared", f"must be >= 0, got {e.n_shared}")
        _check(e.capacity_factor is None or e.capacity_factor > 0, "moe.capacity_factor",
               f"must be positive or null (dropless), got {e.capacity_factor}")
        for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            _check(getattr(e, key) >= 0, f"moe.{key}", f"must be >= 0, got {getattr(e, key)}")
        _check(0.0 <= e.router_jitter < 1.0, "moe.router_jitter", f"must be in [0, 1), got {e.router_jitter}")
    _check(t.max_steps > 0, "train.max_steps", "must be positive")
    _check(t.batch_size > 0, "train.batch_size", "must be positive")
    _check(t.grad_accum > 0, "train.grad_accum", "must be positive")
    _check(t.eval_every >= 0 and t.ckpt_every >= 0, "train.eval_every/ckpt_every", "must be >= 0 (0 = off)")
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    dev = t.device
    _check(
        dev in ("auto", "cpu", "mps", "cuda") or dev.startswith("cuda:"),
        "train.device",
        f"expected auto | cpu | cuda | cuda:N | mps, got {dev!r}",
    )
    _check(o.name in ("adamw", "muon"), "optim.name", f"expected adamw | muon, got {o.name!r}")
    _check(o.lr > 0, "optim.lr", "must be positive")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    mu = o.muon
    _check(mu.lr > 0, "optim.muon.lr", "must be positive")
    _check(mu.weight_decay >= 0, "optim.muon.weight_decay", "must be >= 0")
    _check(0.0 <= mu.momentum < 1.0, "optim.muon.momentum", f"must be in [0, 1), got {mu.momentum}")
    _check(1 <= mu.ns_steps < 100, "optim.muon.ns_steps", f"must be in [1, 99], got {mu.ns_steps}")
    _check(len(mu.ns_coefficients) == 3, "optim.muon.ns_coefficients", "expected [a, b, c] (quintic NS)")
    _check(mu.eps > 0, "optim.muon.eps", "must be positive")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "expected [beta1, beta2] in [0, 1)")
    _check(
        o.implementation in ("auto", "fused", "foreach", "for_loop"),
        "optim.implementation",
        f"expected auto | fused | foreach | for_loop, got {o.implementation!r}",
    )
    s = o.schedule
    _check(0 <= s.warmup_steps, "optim.schedule.warmup_steps", "must be >= 0")
    _check(0.0 <= s.min_lr_ratio <= 1.0, "optim.schedule.min_lr_ratio", "must be in [0, 1]")
    _check(0.0 < s.decay_frac <= 1.0, "optim.schedule.decay_frac", "must be in (0, 1]")
    _check(d.seq_len > 0, "data.seq_len", "must be positive")
    _check(d.tokenizer.vocab_size >= 260, "data.tokenizer.vocab_size", "must be >= 260 (256 bytes + specials)")
    _check(d.num_proc >= 1, "data.num_proc", "must be >= 1")
    _check(
        t.resume in ("none", "auto") or len(t.resume) > 0,
        "train.resume",
        "expected none | auto | PATH",
    )
    c = cfg.cluster
    _check(c.nodes >= 1, "cluster.nodes", f"must be >= 1, got {c.nodes}")
    _check(c.gpus_per_node >= 0, "cluster.gpus_per_node", f"must be >= 0, got {c.gpus_per_node}")
    _check(c.tasks_per_node >= 1, "cluster.tasks_per_node", f"must be >= 1 (ranks per node), got {c.tasks_per_node}")
    _check(c.gpus_per_node == 0 or c.tasks_per_node == c.gpus_per_node, "cluster.tasks_per_node",
           f"one rank per GPU: must equal cluster.gpus_per_node={c.gpus_per_node}, got {c.tasks_per_node}")
    _check(c.nodes == 1 or c.name != "local", "cluster.nodes", "cluster=local runs on this machine: nodes must be 1")
    _check(c.timeout_min >= 1 and c.max_requeues >= 0 and c.signal_delay_s >= 0, "cluster.timeout_min/max_requeues/"
           "signal_delay_s", "timeout_min >= 1, max_requeues >= 0, signal_delay_s >= 0")
    _check(c.parallel_jobs is None or c.parallel_jobs >= 1, "cluster.parallel_jobs", "must be >= 1 or null (auto)")
    _check(t.parallel in ("ddp", "fsdp"), "train.parallel", f"expected ddp | fsdp, got {t.parallel!r}")


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
