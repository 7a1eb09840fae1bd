"""Build a run's components from a `Config`, and the training loop that uses them.

`build(cfg) -> Components` (model, optimizer, schedule, data, loader, data-parallel wrapper, autocast) is the
one builder: the trainer, the benchmark and the tests all call it. `Trainer.fit()` is the one loop and reads
top to bottom: step, log, evaluate + sample, checkpoint, preemption check. `train(cfg, run_dir)` is the entry
that also writes status.json. Not here: model code, data pipeline, metric sinks, checkpoint formats,
hardware facts (`model.py`, `data.py`, `metrics.py`, `checkpoint.py`, `hardware.py`).

Distributed (see `distributed.py`): every rank runs this loop on its shard of each global batch
(`train.batch_size` is global: each rank takes batch_size / world_size sequences), every rank
evaluates and samples (FSDP2 needs every rank in each forward), rank 0 alone logs and writes. After
each step the loop asks whether SLURM's warning signal (USR2) or SIGTERM arrived on any rank; if so it
checkpoints, requeues the job and exits; the requeued job resumes from that checkpoint.

Console output goes through `logging` (logger "scaletrain"), so Hydra's `<job>.log` holds what the console
showed. Host-device syncs (`.item()`): one per step for the NaN/Inf guard (a non-finite loss or gradient
norm skips the update; `train.max_nonfinite=0` turns the guard and its sync off), the rest only on logging,
eval and checkpoint steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from scaletrain import checkpoint as ckpt
from scaletrain import distributed, export_hf, hardware, records
from scaletrain.config import CkptFormat, Config, ConfigError, Precision, load_config, to_dict
from scaletrain.data import (
    BatchLoader,
    EvalProblem,
    MixtureLoader,
    PreparedData,
    Tokenizer,
    eval_batches,
    prepare_data,
    synthetic,
)
from scaletrain.metrics import MetricsLogger, truncate_metrics, write_run_record
from scaletrain.model import Transformer
from scaletrain.moe import moe_layers, moe_metrics, update_moe_biases
from scaletrain.muon import format_param_split, newton_schulz_flops
from scaletrain.optim import build_optimizer, build_scheduler
from scaletrain.parallelize import parallelize
from scaletrain.records import RunState, Summary, write_status

log = logging.getLogger("scaletrain")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_autocast(precision: Precision, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context the forward pass runs in: bf16 autocast, or nothing for fp32."""
    if precision == Precision.bf16:
        if device.type == "cpu" and not hardware.cpu_has_native_bf16():
            log.warning(
                "train.precision=bf16 on a CPU without AVX512-BF16/AMX (%s): bf16 matmuls take a slow "
                "fallback here (1/5 to 1/100 of fp32). Use train.precision=fp32 on this machine.",
                hardware.describe(device),
            )
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_model(cfg: Config, tokenizer_vocab: int) -> Transformer:
    """The configured model on the meta device (shapes only): `parallelize` materializes and initializes it."""
    vocab = cfg.model.vocab_size or tokenizer_vocab
    if vocab < tokenizer_vocab:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}")
    with torch.device("meta"):
        return Transformer(cfg.model, vocab, cfg.model.max_seq_len or cfg.data.seq_len, cfg.moe)


def load_init_from_hf(model: Transformer, folder: str) -> None:
    """model.init_from_hf, after `parallelize` materialized the model: the checkpoint's weights replace the initial
    ones. Under FSDP2 it loads into a whole copy on the CPU first (as every rank did before sharding existed
    here), and each rank keeps its shard of it."""
    if not distributed.is_sharded(model):
        export_hf.load_hf_into(model, folder)
        return
    with torch.device("meta"):
        whole = Transformer(model.cfg, model.vocab_size, model.max_seq_len)  # Llama-shaped: no MoE
    whole.to_empty(device="cpu")  # every weight is then overwritten by the checkpoint (a strict load)
    export_hf.load_hf_into(whole, folder)
    distributed.load_full_model_state(model, whole.state_dict())


def build_loader(
    streams: list[np.ndarray], weights: list[float], cfg: Config, dist: distributed.DistEnv, device: torch.device
) -> BatchLoader | MixtureLoader:
    """This rank's shard of every global batch: batch_size / world_size sequences, from one token stream, or
    from several with each row's source drawn by weight."""
    world, bs = dist.world_size, cfg.train.batch_size
    if bs % world:
        raise ConfigError(f"train.batch_size: {bs} (global) must be divisible by the {world} ranks")
    common = dict(seed=cfg.train.seed, rank=dist.rank, world_size=world, pin_memory=device.type == "cuda")
    if len(streams) == 1:
        return BatchLoader(streams[0], bs // world, cfg.data.seq_len, **common)  # pyright: ignore[reportArgumentType]
    return MixtureLoader(streams, weights, bs // world, cfg.data.seq_len, **common)  # pyright: ignore[reportArgumentType]


@dataclass
class Components:
    """Everything a training step needs, built from one Config."""

    cfg: Config
    dist: distributed.DistEnv
    device: torch.device
    data: PreparedData | None  # None when built on given tokens (benchmark)
    model: Transformer  # the module itself: parameters, state dicts, MoE statistics (FSDP2 shards it in place)
    dp_model: nn.Module  # what a training forward calls: DDP(model), or model itself (FSDP2, one process)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # lambdas from the config, so a resumed run follows its own
    loader: BatchLoader | MixtureLoader
    precision: Precision  # train.precision resolved for this device (auto -> fp32 or bf16)
    autocast: Callable[[], contextlib.AbstractContextManager]


def build(
    cfg: Config | DictConfig,
    dist: distributed.DistEnv | None = None,
    device: torch.device | None = None,
    train_tokens: np.ndarray | None = None,
) -> Components:
    """Config -> components, in the order that parallelism needs: seed, data, model on the meta device,
    `parallelize` (activation checkpointing, per-block compile, FSDP2 or DDP, then weights materialized on the
    device and initialized from train.seed, identically for any number of ranks), optimizer (after FSDP2
    sharded the parameters), schedule, loader. `train_tokens` (benchmark): train on these instead of the
    configured data, with vocabulary model.vocab_size or data.tokenizer.vocab_size."""
    cfg = load_config(cfg)
    dist = dist or distributed.DistEnv(0, 1, 0, 1, "none")
    device = device or hardware.pick_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    export_hf.check_init_from_hf(cfg.model, cfg.moe)  # model.init_from_hf: a wrong folder fails before data work
    data = prepare_data(cfg.data) if train_tokens is None else None
    if data is not None:
        streams = [s.train.tokens for s in data.sources.values()]
        weights = [s.weight for s in data.sources.values()]
    else:
        assert train_tokens is not None
        streams, weights = [train_tokens], [1.0]
    precision, why = hardware.resolve_precision(cfg.train.precision, device)
    log.info("precision %s (%s)", precision, why)
    model = build_model(cfg, data.tokenizer.vocab_size if data is not None else cfg.data.tokenizer.vocab_size)
    dp_model = parallelize(model, cfg.train, device, dist, precision)
    if cfg.model.init_from_hf:  # the weights of a Hugging Face Llama checkpoint (shape checked against the config)
        load_init_from_hf(model, cfg.model.init_from_hf)
    optimizer = build_optimizer(model, cfg.optim, device.type)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    return Components(
        cfg,
        dist,
        device,
        data,
        model,
        dp_model,
        optimizer,
        scheduler,
        build_loader(streams, weights, cfg, dist, device),
        precision,
        make_autocast(precision, device),
    )


def forward_backward(
    fwd: Callable[..., Any], x: torch.Tensor, y: torch.Tensor, autocast, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch: backward of scale * (LM loss + MoE aux loss) -> detached (LM loss, aux loss)."""
    with autocast():  # bf16 matmuls where configured; the loss below is computed in fp32 either way
        out = fwd(x)
    lm = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
    total = lm if out.aux_loss is None else lm + out.aux_loss  # aux losses came back with the output
    (total * scale).backward()  # scale = 1 / grad_accum: the step's gradient is the mean over micro-batches
    aux = out.aux_loss.detach() if out.aux_loss is not None else torch.zeros((), device=lm.device)
    return lm.detach(), aux


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf: too many skipped steps in a row, or weights that must not be checkpointed."""


def all_ranks_agree(ok: torch.Tensor) -> bool:
    """True when `ok` (a bool scalar on the device) holds on every rank: one host sync (+ one all-reduce)."""
    if torch.distributed.is_initialized():
        flag = ok.to(torch.int32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())
    return bool(ok.item())


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, grad_clip: float, loss: torch.Tensor | None = None
) -> tuple[torch.Tensor, bool]:
    """Clip, step, advance the schedule, update MoE selection biases, zero grads -> (pre-clip grad norm, stepped).
    With `loss` given (the NaN/Inf guard), a step whose loss or gradient norm is not finite on any rank is
    skipped: gradients dropped, no optimizer or schedule step. That check is the step's one host sync."""
    clip = grad_clip if grad_clip > 0 else math.inf  # inf: measure the norm, clip nothing
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # a device tensor: no sync here
    if loss is not None:
        norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # FSDP2: over all shards
        if not all_ranks_agree(torch.isfinite(norm) & torch.isfinite(loss)):
            optimizer.zero_grad(set_to_none=True)
            return grad_norm, False
    optimizer.step()
    scheduler.step()  # LambdaLR: the lr of the next step
    update_moe_biases(model)  # aux-loss-free balancing: once per optimizer step, outside the gradient path
    optimizer.zero_grad(set_to_none=True)  # frees gradient memory until the next backward
    return grad_norm, True


@torch.no_grad()
def _evaluate_stream(
    model: nn.Module, tokens: np.ndarray, token_bytes: np.ndarray, cfg: Config, device: torch.device, autocast, world
) -> tuple[float, float]:
    """(mean next-token loss, bits per byte) over a fixed set of windows of one validation stream."""
    nats, n_tokens, n_bytes = torch.zeros((), device=device), 0, 0
    t = cfg.train
    for x, y in eval_batches(tokens, t.batch_size // world, cfg.data.seq_len, t.eval_batches * world):
        n_tokens += y.numel()
        n_bytes += int(token_bytes[y.numpy()].sum())
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x).logits
        nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
    total = nats.item()
    # bpb: total nats of the predicted tokens -> bits, divided by the UTF-8 bytes those tokens encode.
    return total / n_tokens, total / math.log(2) / n_bytes


def evaluate(
    model: nn.Module, data: PreparedData, cfg: Config, device: torch.device, autocast, world_size: int = 1
) -> dict:
    """Mean next-token loss over a fixed set of validation windows of each source, and their exact bits per
    byte. Several sources: each one's as val/<source>/loss and val/<source>/bpb, and val/loss, val/bpb the
    means weighted by the sources' training shares (the mixture's loss). With several ranks each one
    evaluates the same windows in per-rank micro-batches (same result)."""
    model.eval()
    token_bytes = data.tokenizer.token_bytes()  # UTF-8 bytes each id stands for (eot: 0)
    out: dict[str, float] = {records.VAL_LOSS: 0.0, records.VAL_BPB: 0.0}
    for name, source in data.sources.items():
        loss, bpb = _evaluate_stream(model, source.val.tokens, token_bytes, cfg, device, autocast, world_size)
        out[records.VAL_LOSS] += source.weight * loss
        out[records.VAL_BPB] += source.weight * bpb
        if len(data.sources) > 1:
            out[records.source_metric(name, "loss")] = loss
            out[records.source_metric(name, "bpb")] = bpb
        problems = source.problems[: cfg.train.eval_problems]
        if problems:
            with autocast():
                out[records.source_metric(name, "exact_match")] = exact_match(
                    model, data.tokenizer, problems, cfg.train.eval_answer_tokens
                )
    return out


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer: Tokenizer, problems: list[EvalProblem], max_new_tokens: int) -> float:
    """The share of `problems` whose greedy continuation (batched, KV-cached, stopped at end-of-text) states
    the exact answer: `synthetic.extract_answer` (the text after '####', canonical) equals the problem's.
    A prompt longer than the model's context counts as wrong, never truncated."""
    inner = model.module if hasattr(model, "module") else model  # DDP wraps; FSDP2 shards the module itself
    assert isinstance(inner, Transformer)
    prompts = [tokenizer.encode(p.prompt) for p in problems]
    fits = [i for i, ids in enumerate(prompts) if len(ids) < inner.max_seq_len]
    if not fits:
        return 0.0
    answers = inner.complete([prompts[i] for i in fits], max_new_tokens, stop_token=tokenizer.eot_id)
    right = sum(synthetic.extract_answer(tokenizer.decode(new)) == problems[i].answer for i, new in zip(fits, answers))
    return right / len(problems)


def sample(model: Transformer, data: PreparedData, cfg: Config, device: torch.device, step: int) -> list[str]:
    """A few stories from the prompt. Uses its own generator so training RNG is untouched."""
    t = cfg.train
    if t.sample_count == 0:
        return []
    gen = torch.Generator(device=device).manual_seed(t.seed + step)
    text = data.sample_prompt  # the data config's prompt, else a validation problem; none: from end-of-text
    ids = data.tokenizer.encode(text) if text else [data.tokenizer.eot_id]
    prompt = torch.tensor([ids] * t.sample_count, device=device)
    out = model.generate(
        prompt, t.sample_tokens, t.sample_temperature, t.sample_top_k, stop_token=data.tokenizer.eot_id, generator=gen
    )
    texts = []
    for row in out.tolist():
        if data.tokenizer.eot_id in row[prompt.shape[1] :]:
            row = row[: prompt.shape[1] + row[prompt.shape[1] :].index(data.tokenizer.eot_id)]
        texts.append(data.tokenizer.decode(row))
    return texts


class Trainer:
    """Owns the components of one run on one rank; `fit()` is the loop."""

    def __init__(self, cfg: Config | DictConfig, run_dir: Path, run_name: str = "run"):
        cfg = load_config(cfg)
        self.cfg, self.tc, self.run_name = cfg, cfg.train, run_name
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.dist = distributed.detect_env()  # before pick_device: a submitit_local job may re-expose its GPUs
        device, self.run_dir = distributed.setup_rank(
            self.dist, hardware.pick_device(self.tc.device), Path(run_dir), cfg.cluster.parallel_jobs
        )
        # the run's clocks start once it holds its slot: a sweep job queued behind others has not begun training
        self.t_start, self.cpu_start = time.perf_counter(), time.process_time()
        if device.type == "cpu":
            log.info(hardware.configure_cpu_malloc(self.tc.cpu_malloc_cache))
        if self.dist.is_main:
            write_run_record(self.run_dir, to_dict(cfg), device, distributed.cluster_env(self.dist))
        self.c = build(cfg, self.dist, device)
        assert self.c.data is not None  # built from the configured data, which evaluation needs
        self.data: PreparedData = self.c.data
        if self.dist.is_main:  # the run folder holds what sampling and evaluation need (scaletrain.runs)
            self.data.tokenizer.save(self.run_dir / records.TOKENIZER_FILE)
        c = self.c
        self.device, self.model, self.optimizer = c.device, c.model, c.optimizer
        self.scheduler, self.loader, self.autocast = c.scheduler, c.loader, c.autocast
        self.counts = self.model.param_counts()
        n = self.counts
        log.info(
            "model %s: %.2fM parameters (%.2fM embedding, %.2fM non-embedding, %.2fM active per token)",
            cfg.model.name,
            n["total"] / 1e6,
            n["embedding"] / 1e6,
            n["non_embedding"] / 1e6,
            n["active"] / 1e6,
        )
        if cfg.optim.name == "muon":  # the audit trail of which optimizer updates which parameter
            log.info(format_param_split(self.model))
        self.step, self.tokens_seen, self.elapsed_before, wandb_id = 0, 0, 0.0, None
        self.cpu_before = 0.0
        self.skipped_steps, self.nonfinite_in_a_row = 0, 0  # NaN/Inf guard (train.max_nonfinite)
        # A cluster job's run directory belongs to one sweep point: a checkpoint there comes from an
        # earlier attempt of this job (preempted and requeued), so continue from it
        resume = "auto" if self.tc.resume == "none" and distributed.in_cluster_job() else self.tc.resume
        candidates = ckpt.resume_candidates(resume, self.run_dir)
        if self.dist.is_main:
            for path in ckpt.remove_leftovers(self.run_dir / records.CKPT_DIR):
                log.warning("removed %s: left by a checkpoint save that did not finish", path)
        if candidates:
            wandb_id = self.restore_newest_good(candidates)
        elif resume == "auto":
            log.info("train.resume=auto: no checkpoint in %s, starting fresh", self.run_dir / records.CKPT_DIR)
            if self.dist.is_main:  # records of an attempt killed before its first checkpoint: its steps rerun
                truncate_metrics(self.run_dir, -1)
        if resume != "none":  # one W&B run per run folder, whichever attempt logs
            wandb_id = wandb_id or records.read_wandb_id(self.run_dir)

        self.logger = (
            MetricsLogger(self.run_dir, cfg.logging.wandb, to_dict(cfg), run_name, wandb_id)
            if self.dist.is_main
            else distributed.NullLogger()
        )
        if self.dist.is_main and self.logger.wandb_id:
            records.atomic_write(self.run_dir / records.WANDB_ID_FILE, self.logger.wandb_id)
        self.logger.log(self.step, {f"params/{k}": v for k, v in n.items()})
        bf16 = c.precision == Precision.bf16
        peak, peak_source = hardware.peak_flops(
            self.device, torch.bfloat16 if bf16 else torch.float32, self.tc.matmul_peak_tflops, self.tc.measure_cpu_peak
        )
        self.peak = peak * self.dist.world_size if peak else None  # tokens/s counts every rank
        log.info(
            "device %s (%s), precision %s, compile %s; MFU against %s (%s)",
            self.device,
            hardware.describe(self.device),
            c.precision,
            self.tc.compile,
            f"{self.peak / 1e12:.1f} TFLOP/s" if self.peak else "nothing",
            peak_source,
        )
        self.is_moe = bool(moe_layers(self.model))
        if self.is_moe:
            log.info(
                "MoE: %d layers of %d experts, top-%d, %d shared; the dispatch path is logged after the first step",
                len(moe_layers(self.model)),
                cfg.moe.n_experts,
                cfg.moe.top_k,
                cfg.moe.n_shared,
            )
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        muon_cfg = getattr(cfg.optim, "muon", None)  # optim=muon: the Newton-Schulz FLOPs of each step
        self.optimizer_flops_per_step = newton_schulz_flops(self.model, muon_cfg.ns_steps) if muon_cfg else 0.0
        self.preempt = distributed.Preemption(self.device)  # handlers are installed around fit() by train()
        self.tokens_per_step = self.tc.batch_size * cfg.data.seq_len * self.tc.grad_accum

    def restore_newest_good(self, candidates: list[Path]) -> str | None:
        """Restore the newest checkpoint that loads and verifies; each damaged one is skipped with a warning
        naming it and why. Fails when none is usable."""
        for path in candidates:
            try:
                return self.restore(path)
            except ckpt.CheckpointError as err:
                log.warning("WARNING: skipping checkpoint %s: %s", path, err)
        raise ckpt.CheckpointError(f"no usable checkpoint among {[str(p) for p in candidates]} (see the warnings)")

    def check_resume_config(self, path: Path, saved: dict[str, Any] | None) -> None:
        """Compare the checkpoint's config with this run's before loading anything: changes that cannot load
        or continue (shapes, tokenizer, optimizer kind, data order) fail listing each key with both values;
        the others (lr, schedule, max_steps, cadences, ...) are applied, and listed one line each."""
        for line in ckpt.check_compatible(path, saved, to_dict(self.cfg)):
            log.info("resume: %s -> applied from here on", line)

    def apply_configured_hyperparameters(self, fresh: list[dict[str, Any]]) -> None:
        """After loading: the optimizer's hyperparameters come from this run's config, not the checkpoint's
        param_groups (which load_state_dict restores), and the lr is re-derived for the current step."""
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(settings)
        self.scheduler.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        for group, lr_lambda, base in zip(
            self.optimizer.param_groups, self.scheduler.lr_lambdas, self.scheduler.base_lrs
        ):
            group["lr"] = base * lr_lambda(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # what get_last_lr() reports

    def restore(self, path: Path) -> str | None:
        """Load a checkpoint (either format) into every component; returns the W&B run id to continue."""
        sharded = ckpt.is_sharded_checkpoint(path)
        state = ckpt.load_checkpoint(path)  # verified (a sharded folder: every file), the config inside
        self.check_resume_config(path, state.get("config"))
        # first: the data order must continue (same seed and windows), or nothing is loaded. Its state is a
        # global position, so any number of ranks continues it (the global batch is checked with the config)
        try:
            self.loader.load_state_dict(state["loader"])
        except ValueError as err:
            raise ckpt.CheckpointIncompatible(f"cannot resume from {path}: {err}") from None
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if sharded:  # each rank reads the shards it holds now (DCP reshards)
            ckpt.load_sharded_state(path, self.model, self.optimizer)
        else:  # every rank read the file; FSDP2 ranks keep their shards
            distributed.load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.apply_configured_hyperparameters(fresh)
        ckpt.set_rng_state(state["rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.elapsed_before = state.get("wallclock_s", 0.0)
        self.cpu_before = state.get("cpu_s", 0.0)
        self.skipped_steps = state.get("skipped_steps", 0)
        if self.dist.is_main:
            truncate_metrics(self.run_dir, self.step)
        log.info("resumed from %s at step %d", path, self.step)
        return state.get("wandb_id")

    def wallclock(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def cpu_time(self) -> float:
        return self.cpu_before + time.process_time() - self.cpu_start

    def save(self) -> None:
        """Checkpoint this step in `train.ckpt_format` (every rank calls this); never from non-finite weights,
        so the newest checkpoint is always one a run can continue from."""
        local = [p.to_local() if isinstance(p, DTensor) else p for p in self.model.parameters()]  # FSDP2: own shard
        if not all_ranks_agree(torch.stack([torch.isfinite(t.detach()).all() for t in local]).all()):
            raise NonFiniteError(
                f"weights are not finite at step {self.step}: not checkpointing them; the last "
                "checkpoint holds finite weights: lower optim.lr or check the data"
            )
        extra = {
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": ckpt.rng_state(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "wandb_id": self.logger.wandb_id,
            "wallclock_s": self.wallclock(),
            "cpu_s": self.cpu_time(),
            "skipped_steps": self.skipped_steps,
            "config": to_dict(self.cfg),
        }
        fmt = self.tc.ckpt_format
        if fmt == CkptFormat.sharded or (fmt == CkptFormat.auto and distributed.is_sharded(self.model)):
            ckpt.save_sharded_checkpoint(
                self.run_dir, self.step, self.model, self.optimizer, extra, self.tc.ckpt_keep, self.dist.is_main
            )
            return
        model_sd, optim_sd = distributed.full_state(self.model, self.optimizer)  # FSDP2: all ranks gather
        if self.dist.is_main:
            ckpt.save_checkpoint(
                self.run_dir, self.step, {"model": model_sd, "optimizer": optim_sd, **extra}, self.tc.ckpt_keep
            )

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """One optimizer step over grad_accum micro-batches -> (LM loss, aux loss, grad norm, stepped): device
        tensors, and False when the NaN/Inf guard skipped the update (then `step` does not advance)."""
        accum = self.tc.grad_accum
        lm_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.loader.next_batch()  # this rank's shard of the global batch (pinned on CUDA hosts)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # DDP all-reduces gradients only on the last micro-batch (no_sync before it)
            with distributed.grad_sync(self.c.dp_model, last_micro_batch=micro == accum - 1):
                lm, aux = forward_backward(self.c.dp_model, x, y, self.autocast, 1.0 / accum)
            lm_sum += lm / accum  # stays on the device: no host sync until a logging step
            aux_sum += aux / accum
        guard = lm_sum if self.tc.max_nonfinite > 0 else None
        grad_norm, stepped = optimizer_step(self.model, self.optimizer, self.scheduler, self.tc.grad_clip, guard)
        self.tokens_seen += self.tokens_per_step  # the batch was consumed either way
        if stepped:
            self.step += 1
        return lm_sum, aux_sum, grad_norm, stepped

    def skipped(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """The guard skipped an update: count it, say so, and stop after train.max_nonfinite in a row."""
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        log.warning(
            "after step %d: loss %s, gradient norm %s: update skipped (%d in a row, %d in all)",
            self.step,
            loss.item(),
            norm.item(),
            self.nonfinite_in_a_row,
            self.skipped_steps,
        )
        if self.nonfinite_in_a_row >= self.tc.max_nonfinite:
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} steps in a row with a non-finite loss or gradient norm "
                f"after step {self.step} (train.max_nonfinite={self.tc.max_nonfinite}); the last "
                "checkpoint holds finite weights: lower optim.lr or check the data"
            )

    def log_train(
        self, loss: torch.Tensor, aux: torch.Tensor, grad_norm: torch.Tensor, steps: int, seconds: float
    ) -> dict:
        tok_s = steps * self.tokens_per_step / seconds
        loss, aux = distributed.mean_over_ranks(loss), distributed.mean_over_ranks(aux)  # every rank takes part
        if isinstance(grad_norm, DTensor):  # FSDP2: the norm over all shards
            grad_norm = grad_norm.full_tensor()
        m = {
            "train/skipped_steps": self.skipped_steps,
            records.TRAIN_LOSS: loss.item(),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm.item(),
            records.TRAIN_TOKENS: self.tokens_seen,
            records.PERF_TOKENS_PER_S: tok_s,
            records.PERF_STEP_S: seconds / steps,
            "perf/memory_mb": hardware.memory_mb(self.device),
        }
        if self.peak:
            m[records.PERF_MFU] = self.flops_per_token * tok_s / self.peak
        if self.is_moe:
            scalars, loads = moe_metrics(self.model)
            m.update(scalars, **{"train/aux_loss": aux.item()})
            self.logger.log_histograms(self.step, loads)
        self.logger.log(self.step, m)
        if self.dist.is_main:
            write_status(self.run_dir, RunState.running, self.step)
        return m

    def eval_and_sample(self) -> dict:
        # eval mode for both: dropout off (it would draw from the training RNG stream and break exact
        # resume), and MoE layers do not count these tokens towards their balancing-bias update
        val = evaluate(self.model, self.data, self.cfg, self.device, self.autocast, self.dist.world_size)
        texts = sample(self.model, self.data, self.cfg, self.device, self.step)
        self.model.train()
        self.logger.log(self.step, val)
        self.logger.log_samples(self.step, texts)
        log.info("step %d: val loss %.4f, val bpb %.4f", self.step, val[records.VAL_LOSS], val[records.VAL_BPB])
        for i, text in enumerate(texts):
            log.info("  sample %d: %r", i, text)
        return val

    def progress_bar(self) -> tqdm:
        """A bar only for a person watching: rank 0, train.progress_bar, and stderr a terminal (SLURM and
        submitit logs would otherwise fill with carriage returns)."""
        show = self.tc.progress_bar and self.dist.is_main and sys.stderr.isatty()
        return tqdm(total=self.tc.max_steps, initial=self.step, disable=not show, dynamic_ncols=True)

    def fit(self) -> dict[str, Any]:
        tc, val = self.tc, {}
        self.model.train()
        bar = self.progress_bar()
        t_window, steps_in_window = time.perf_counter(), 0
        # with a bar, console log lines print above it instead of through it (the log file is untouched)
        with logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext():
            while self.step < tc.max_steps:
                loss, aux, grad_norm, stepped = self.train_step()
                if not stepped:  # no update: nothing to log, evaluate or save for this batch
                    self.skipped(loss, grad_norm)
                    if self.preempt.requested():
                        self.stop_for_preemption(saved=False)
                    continue
                self.nonfinite_in_a_row = 0
                if self.is_moe and self.step == 1:
                    log.info("MoE dispatch: %s", "; ".join(sorted({m.dispatch for m in moe_layers(self.model)})))
                steps_in_window += 1
                bar.update(1)
                last = self.step == tc.max_steps
                if self.step % tc.log_every == 0 or last:
                    m = self.log_train(loss, aux, grad_norm, steps_in_window, time.perf_counter() - t_window)
                    bar.set_postfix(loss=f"{m[records.TRAIN_LOSS]:.3f}", tok_s=f"{m[records.PERF_TOKENS_PER_S]:.0f}")
                    if bar.disable:  # without a bar, the log is the progress report
                        log.info(
                            "step %d/%d: loss %.4f, %.0f tok/s",
                            self.step,
                            tc.max_steps,
                            m[records.TRAIN_LOSS],
                            m[records.PERF_TOKENS_PER_S],
                        )
                    t_window, steps_in_window = time.perf_counter(), 0
                if (tc.eval_every and self.step % tc.eval_every == 0) or last:
                    val = self.eval_and_sample()
                    t_window, steps_in_window = time.perf_counter(), 0  # eval time is not training throughput
                saved = bool(tc.ckpt_every and self.step % tc.ckpt_every == 0) or last
                if saved:
                    self.save()
                if not last and self.preempt.requested():  # a run that reached max_steps is never requeued
                    self.stop_for_preemption(saved)
        bar.close()
        if not val:  # resumed a run that had already finished: evaluate once more for the summary
            val = self.eval_and_sample()
        return self.finish(val)

    def stop_for_preemption(self, saved: bool) -> None:
        """SLURM's warning signal (USR2) or SIGTERM reached a rank: checkpoint this step (unless just done),
        requeue the job (or stop), and leave without a result; the requeued job resumes from here."""
        if not saved:
            self.save()
        # close W&B first: a requeue makes SLURM signal every process of the job, W&B's service included
        self.logger.finish(exit_code=0)
        outcome, code = distributed.requeue_or_stop(self.dist, self.cfg.cluster.max_requeues, self.preempt.signum)
        raise distributed.Preempted(outcome, code, self.preempt.name)

    def save_final_weights(self) -> None:
        """model.pt: the final weights with step and config, checksummed (every rank calls this: FSDP2 gathers)."""
        model_sd, _ = distributed.full_state(self.model, self.optimizer)
        if self.dist.is_main:
            state = {"model": model_sd, "step": self.step, "config": to_dict(self.cfg)}
            ckpt.save_weights(self.run_dir / records.MODEL_FILE, state)

    def finish(self, val: dict) -> dict[str, Any]:
        self.save_final_weights()
        n = self.counts
        summary = Summary(
            step=self.step,
            tokens_seen=self.tokens_seen,
            val_loss=val[records.VAL_LOSS],
            val_bpb=val[records.VAL_BPB],
            params_total=n["total"],
            params_active=n["active"],
            params_embedding=n["embedding"],
            params_non_embedding=n["non_embedding"],
            flops_per_token=self.flops_per_token,
            flops=self.flops_per_token * self.tokens_seen,
            wallclock_s=self.wallclock(),
            run_name=self.run_name,
            wandb_id=self.logger.wandb_id,
            val={k: v for k, v in val.items() if k.startswith("val/")},
            optimizer_flops=self.optimizer_flops_per_step * self.step,
            cpu_s=self.cpu_time(),
        )
        if self.dist.is_main:
            records.write_summary(self.run_dir, summary)
        self.logger.finish(summary.to_dict())
        log.info(
            "done: step %d, %s tokens, val loss %.4f, val bpb %.4f, %.1f s; run dir %s",
            self.step,
            f"{self.tokens_seen:,}",
            summary.val_loss,
            summary.val_bpb,
            summary.wallclock_s,
            self.run_dir,
        )
        return summary.to_dict()


def claim_run_dir(run_dir: Path, cfg: Config, is_main: bool) -> None:
    """A fresh run (train.resume=none, outside a scheduler's job) must not mix with another run's records in
    its folder: refuse (records.RunDirInUse, before anything is written) unless train.overwrite=true, which
    deletes them."""
    if cfg.train.resume != "none" or distributed.in_cluster_job():
        return
    found = records.check_run_dir_free(run_dir, cfg.train.overwrite)
    if found and is_main:
        for path in [*found, run_dir / records.CKPT_DIR, run_dir / records.WANDB_ID_FILE]:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        names = ", ".join(str(p.relative_to(run_dir)) for p in found)
        log.warning("train.overwrite=true: deleted another run's records in %s (%s)", run_dir, names)


def train(cfg: Config | DictConfig, run_dir: Path, run_name: str = "run") -> dict[str, Any]:
    """Train per `cfg`, writing records, metrics, checkpoints, status.json and summary.json into `run_dir`.
    A preempted run (USR2 / SIGTERM) exits with SystemExit after its checkpoint (and requeue)."""
    cfg = load_config(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = distributed.detect_env().is_main
    claim_run_dir(run_dir, cfg, is_main)  # before status.json or config.json is written
    ckpt.check_resumable(cfg.train.resume, run_dir, to_dict(cfg))  # before anything is written or built
    trainer = None
    if is_main:
        write_status(run_dir, RunState.running, 0)
    try:
        trainer = Trainer(cfg, run_dir, run_name)
        with trainer.preempt:
            summary = trainer.fit()
    except distributed.Preempted as err:
        log.warning(str(err))
        if is_main:
            state = RunState.requeued if err.outcome == "requeued" else RunState.interrupted
            write_status(run_dir, state, trainer.step if trainer else 0, err)
        raise SystemExit(err.exit_code) from None  # no result: submitit's client waits for the requeued run
    except BaseException as err:
        state = RunState.interrupted if isinstance(err, KeyboardInterrupt) else RunState.failed
        write_status(run_dir, state, trainer.step if trainer else 0, err)  # any rank: the error is news
        if trainer is not None:
            trainer.logger.finish(exit_code=1)
        raise
    finally:
        distributed.destroy_process_group()
    if is_main:
        write_status(run_dir, RunState.finished, summary["step"])
    return summary
