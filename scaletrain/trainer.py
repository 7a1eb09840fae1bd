"""The training loop: build components from config, train, evaluate, sample, checkpoint, log.

`Trainer.fit()` is the one loop and reads top to bottom; `train(cfg, run_dir)` is the entry. Here: device choice, the optimizer
step with gradient accumulation / clipping / bf16 autocast / optional torch.compile, evaluation
(loss and bits per byte), sampling, checkpoint-resume and the final `summary.json`. Not here: model
code, data pipeline, metric sinks (see `model.py`, `data.py`, `metrics.py`).

Distributed (see `distributed.py`): every rank runs this loop on its shard of each global batch
(`train.batch_size` is global: each rank takes batch_size / world_size sequences), every rank
evaluates and samples (FSDP2 needs every rank in each forward), rank 0 alone prints and writes. After
each step the loop asks whether SLURM's warning signal (USR2) or SIGTERM arrived on any rank; if so it
checkpoints, requeues the job and exits; the requeued job resumes from that checkpoint.

Host-device syncs (`.item()`) happen only on logging, eval and checkpoint steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import platform
import random
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from omegaconf import DictConfig
from tqdm import tqdm

from scaletrain import checkpoint as ckpt
from scaletrain import distributed
from scaletrain.config import Precision, to_container, validate
from scaletrain.data import BatchLoader, PreparedData, eval_batches, prepare_data
from scaletrain.metrics import MetricsLogger, gpu_peak_flops, measure_matmul_peak, write_run_record, write_status
from scaletrain.model import Transformer
from scaletrain.moe import moe_aux_loss, moe_layers, moe_metrics, update_moe_biases
from scaletrain.muon import format_param_split
from scaletrain.optim import build_optimizer, build_scheduler


def pick_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is missing is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available here; use train.device=auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("train.device='mps' but MPS is not available here; use train.device=auto or cpu")
    return torch.device(name)


# <malloc.h> parameters and glibc's defaults (restored when the cache is switched off again)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_NO_TRIM = -1  # mallopt takes an int; glibc stores it as size_t, so -1 = SIZE_MAX: never trim


def configure_cpu_malloc(cache: bool) -> str:
    """`train.cpu_malloc_cache`: make glibc malloc keep freed memory for reuse; returns what was done.

    Written by hand because no library does it in-process: PyTorch's CPU allocator is plain malloc, and
    glibc serves every block above its mmap threshold (at most 32 MB) with a fresh mmap that free()
    returns to the kernel. Every training step then page-faults its activations in again and the kernel
    zeroes them: 15% of a baseline_10m step on the 2-core CI CPU. Two mallopt calls (no mmap, no heap
    trimming) keep the pages, like the caching allocator PyTorch uses on CUDA; RSS stays at its peak.
    jemalloc or tcmalloc through LD_PRELOAD (Intel's CPU tuning guide) work too but need a system package.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return (f"CPU malloc cache: not applied (needs glibc; this is {platform.system()} "
                f"{platform.libc_ver()[0] or 'without glibc'})")
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    values = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: _NO_TRIM} if cache else _GLIBC_DEFAULTS
    if not all(mallopt(param, value) == 1 for param, value in values.items()):
        return "CPU malloc cache: mallopt refused the settings; freed memory goes back to the kernel"
    return ("CPU malloc cache: on (glibc keeps freed memory; train.cpu_malloc_cache=false to return it)" if cache
            else "CPU malloc cache: off (glibc defaults)")


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX); otherwise bf16 matmuls
    take a scalar fallback that measured 100-1000x slower than fp32 on the 2-core AVX2 EPYC used for CI."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_flops(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """The FLOP/s that MFU divides by, and where it came from."""
    if cfg.train.matmul_peak_tflops:
        return cfg.train.matmul_peak_tflops * 1e12, "train.matmul_peak_tflops"
    if device.type == "cuda":
        peak = gpu_peak_flops(device)
        name = torch.cuda.get_device_name(device)
        return (peak, f"datasheet dense bf16 peak of {name}") if peak else (None, f"no peak known for {name}")
    if device.type == "cpu" and cfg.train.measure_cpu_peak:
        return measure_matmul_peak(device, dtype), f"measured {dtype} matmul on this CPU"
    return None, f"no peak known for {device.type} (set train.matmul_peak_tflops)"


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: PreparedData, cfg: DictConfig, device: torch.device, autocast,
             world_size: int = 1) -> dict:
    """Mean next-token loss over a fixed set of validation windows, and their exact bits per byte.
    With several ranks each one evaluates the same windows in per-rank micro-batches (same result)."""
    model.eval()
    nats, n_tokens, n_bytes = torch.zeros((), device=device), 0, 0
    token_bytes = data.tokenizer.token_bytes()  # UTF-8 bytes each id stands for (eot: 0)
    t = cfg.train
    for x, y in eval_batches(data.val.tokens, t.batch_size // world_size, cfg.data.seq_len,
                             t.eval_batches * world_size):
        n_tokens += y.numel()
        n_bytes += int(token_bytes[y.numpy()].sum())
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x)
        nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
    total = nats.item()
    # bpb: total nats of the predicted tokens -> bits, divided by the UTF-8 bytes those tokens encode.
    return {"val/loss": total / n_tokens, "val/bpb": total / math.log(2) / n_bytes}


def sample(model: Transformer, data: PreparedData, cfg: DictConfig, device: torch.device, step: int) -> list[str]:
    """A few stories from the prompt. Uses its own generator so training RNG is untouched."""
    t = cfg.train
    if t.sample_count == 0:
        return []
    gen = torch.Generator(device=device).manual_seed(t.seed + step)
    prompt = torch.tensor([data.tokenizer.encode(t.sample_prompt)] * t.sample_count, device=device)
    out = model.generate(prompt, t.sample_tokens, t.sample_temperature, t.sample_top_k,
                         stop_token=data.tokenizer.eot_id, generator=gen)
    texts = []
    for row in out.tolist():
        if data.tokenizer.eot_id in row[prompt.shape[1]:]:
            row = row[: prompt.shape[1] + row[prompt.shape[1]:].index(data.tokenizer.eot_id)]
        texts.append(data.tokenizer.decode(row))
    return texts


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB -> MiB (process peak RSS)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint so metrics.jsonl reads as one run."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def build_model(cfg: DictConfig, data: PreparedData) -> Transformer:
    vocab = cfg.model.vocab_size or data.tokenizer.vocab_size
    if vocab < data.tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's {data.tokenizer.vocab_size}")
    return Transformer(cfg.model, vocab, cfg.data.seq_len, cfg.moe)


def forward_backward(fwd, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss on one micro-batch, backward of scale * (LM loss + MoE aux losses) -> detached (LM, aux)."""
    with autocast():
        logits = fwd(x)
    lm = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    aux = moe_aux_loss(model)
    total = lm if aux is None else lm + aux
    (total * scale).backward()
    return lm.detach(), (aux.detach() if aux is not None else torch.zeros((), device=lm.device))


def optimizer_step(model: torch.nn.Module, optimizer, scheduler, grad_clip: float) -> torch.Tensor:
    """Clip, step, advance the schedule, update MoE selection biases (once per optimizer step, outside
    the gradient path), zero grads. Returns the pre-clip gradient norm (device tensor, no sync)."""
    clip = grad_clip if grad_clip > 0 else math.inf  # inf: measure the norm, clip nothing
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    update_moe_biases(model)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class Trainer:
    """Owns the components of one run on one rank; `fit()` is the loop."""

    def __init__(self, cfg: DictConfig, run_dir: Path, run_name: str = "run"):
        validate(cfg)
        self.t_start = time.perf_counter()
        self.cfg, self.tc, self.run_dir, self.run_name = cfg, cfg.train, Path(run_dir), run_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dist = distributed.detect_env()  # before pick_device: a submitit_local job may re-expose its GPUs
        self.device, self.run_dir = distributed.setup_rank(self.dist, pick_device(self.tc.device), self.run_dir,
                                                           cfg.cluster.parallel_jobs)
        seed_everything(self.tc.seed)
        if self.device.type == "cpu":
            print(configure_cpu_malloc(self.tc.cpu_malloc_cache))
        if self.dist.is_main:
            write_run_record(self.run_dir, to_container(cfg), self.device, distributed.cluster_env(self.dist))

        self.data = prepare_data(cfg.data)
        self.model = build_model(cfg, self.data).to(self.device)
        self.counts = self.model.param_counts()
        c = self.counts
        print(f"model {cfg.model.name}: {c['total'] / 1e6:.2f}M parameters ({c['embedding'] / 1e6:.2f}M embedding, "
              f"{c['non_embedding'] / 1e6:.2f}M non-embedding, {c['active'] / 1e6:.2f}M active per token)")
        # DDP wraps (self.model keeps plain parameters); FSDP2 shards self.model in place, so the
        # optimizer is built afterwards, on the sharded parameters
        self.dp_model = distributed.parallelize(self.model, self.tc.parallel, self.device, self.dist)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device.type)
        if cfg.optim.name == "muon":  # the audit trail of which optimizer updates which parameter
            print(format_param_split(self.model))
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.tc.max_steps)
        self.loader = self.build_loader()
        self.step, self.tokens_seen, self.elapsed_before, wandb_id = 0, 0, 0.0, None
        # A cluster job's run directory belongs to one sweep point: a checkpoint there comes from an
        # earlier attempt of this job (preempted and requeued), so continue from it
        resume = "auto" if self.tc.resume == "none" and distributed.in_cluster_job() else self.tc.resume
        resume_from = ckpt.resolve_resume(resume, self.run_dir)
        if resume_from is not None:
            wandb_id = self.restore(resume_from)

        self.logger = MetricsLogger(self.run_dir, cfg.logging.wandb, to_container(cfg), run_name, wandb_id) \
            if self.dist.is_main else distributed.NullLogger()
        self.logger.log(self.step, {f"params/{k}": v for k, v in c.items()})
        bf16 = self.tc.precision == Precision.bf16
        if bf16 and self.device.type == "cpu" and not cpu_has_native_bf16():
            print("WARNING: train.precision=bf16 on a CPU without AVX512-BF16/AMX: bf16 matmuls fall back to a "
                  "slow path here (measured 100-1000x slower than fp32). Use train.precision=fp32 on this machine.")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 \
            else contextlib.nullcontext
        self.peak, peak_source = peak_flops(cfg, self.device, torch.bfloat16 if bf16 else torch.float32)
        self.peak = self.peak * self.dist.world_size if self.peak else None  # tokens/s counts every rank
        print(f"device {self.device}, precision {self.tc.precision}, compile {self.tc.compile}; MFU against "
              f"{'%.1f TFLOP/s' % (self.peak / 1e12) if self.peak else 'nothing'} ({peak_source})")
        self.fwd = torch.compile(self.dp_model) if self.tc.compile else self.dp_model
        self.is_moe = bool(moe_layers(self.model))
        if self.is_moe:
            print(f"MoE: {len(moe_layers(self.model))} layers of {cfg.moe.n_experts} experts, top-{cfg.moe.top_k}, "
                  f"{cfg.moe.n_shared} shared; the dispatch path is printed after the first step")
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        self.preempt = distributed.Preemption(self.device)  # handlers are installed around fit() by train()
        self.tokens_per_step = self.tc.batch_size * cfg.data.seq_len * self.tc.grad_accum

    def build_loader(self) -> BatchLoader:
        """This rank's shard of every global batch: batch_size / world_size sequences."""
        world, bs = self.dist.world_size, self.tc.batch_size
        if bs % world:
            raise ValueError(f"train.batch_size={bs} (global) must be divisible by the {world} ranks")
        return BatchLoader(self.data.train.tokens, bs // world, self.cfg.data.seq_len, seed=self.tc.seed,
                           rank=self.dist.rank, world_size=world, pin_memory=self.device.type == "cuda")

    def restore(self, path: Path) -> str | None:
        """Load a checkpoint (either format) into every component; returns the W&B run id to continue."""
        if ckpt.is_sharded_checkpoint(path):  # each rank reads the shards it holds now (DCP reshards)
            state = ckpt.load_sharded_checkpoint(path, self.model, self.optimizer)
        else:
            state = ckpt.load_checkpoint(path)  # every rank reads the file; FSDP2 ranks keep their shards
            distributed.load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.elapsed_before = state.get("wallclock_s", 0.0)
        if self.dist.is_main:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        print(f"resumed from {path} at step {self.step}")
        return state.get("wandb_id")

    def wallclock(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def save(self) -> None:
        """Checkpoint this step in `train.ckpt_format` (every rank calls this)."""
        extra = {"scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
                 "rng": ckpt.rng_state(), "step": self.step, "tokens_seen": self.tokens_seen,
                 "wandb_id": self.logger.wandb_id,
                 "wallclock_s": self.wallclock(), "config": to_container(self.cfg)}
        fmt = self.tc.ckpt_format
        if fmt == "sharded" or (fmt == "auto" and distributed.is_sharded(self.model)):
            ckpt.save_sharded_checkpoint(self.run_dir, self.step, self.model, self.optimizer, extra,
                                         self.tc.ckpt_keep, self.dist.is_main)
            return
        model_sd, optim_sd = distributed.full_state(self.model, self.optimizer)  # FSDP2: all ranks gather
        if self.dist.is_main:
            ckpt.save_checkpoint(self.run_dir, self.step, {"model": model_sd, "optimizer": optim_sd, **extra},
                                 self.tc.ckpt_keep)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches -> (LM loss, aux loss, grad norm), device tensors."""
        lm_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for micro in range(self.tc.grad_accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with distributed.grad_sync(self.dp_model, last_micro_batch=micro == self.tc.grad_accum - 1):
                lm, aux = forward_backward(self.fwd, self.model, x, y, self.autocast, 1.0 / self.tc.grad_accum)
            lm_sum += lm / self.tc.grad_accum
            aux_sum += aux / self.tc.grad_accum
        grad_norm = optimizer_step(self.model, self.optimizer, self.scheduler, self.tc.grad_clip)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return lm_sum, aux_sum, grad_norm

    def log_train(self, loss: torch.Tensor, aux: torch.Tensor, grad_norm: torch.Tensor, steps: int,
                  seconds: float) -> dict:
        tok_s = steps * self.tokens_per_step / seconds
        loss, aux = distributed.mean_over_ranks(loss), distributed.mean_over_ranks(aux)  # every rank takes part
        if isinstance(grad_norm, DTensor):  # FSDP2: the norm over all shards
            grad_norm = grad_norm.full_tensor()
        m = {"train/loss": loss.item(), "train/lr": self.scheduler.get_last_lr()[0],
             "train/grad_norm": grad_norm.item(), "train/tokens": self.tokens_seen, "perf/tokens_per_s": tok_s,
             "perf/step_s": seconds / steps, "perf/memory_mb": memory_mb(self.device)}
        if self.peak:
            m["perf/mfu"] = self.flops_per_token * tok_s / self.peak
        if self.is_moe:
            scalars, loads = moe_metrics(self.model)
            m.update(scalars, **{"train/aux_loss": aux.item()})
            self.logger.log_histograms(self.step, loads)
        self.logger.log(self.step, m)
        if self.dist.is_main:
            write_status(self.run_dir, "running", self.step)
        return m

    def eval_and_sample(self) -> dict:
        # eval mode for both: dropout off (it would draw from the training RNG stream and break exact
        # resume), and MoE layers do not count these tokens towards their balancing-bias update
        val = evaluate(self.model, self.data, self.cfg, self.device, self.autocast, self.dist.world_size)
        texts = sample(self.model, self.data, self.cfg, self.device, self.step)
        self.model.train()
        self.logger.log(self.step, val)
        self.logger.log_samples(self.step, texts)
        tqdm.write(f"step {self.step}: val loss {val['val/loss']:.4f}, val bpb {val['val/bpb']:.4f}")
        for i, text in enumerate(texts):
            tqdm.write(f"  sample {i}: {text!r}")
        return val

    def fit(self) -> dict[str, Any]:
        tc, val = self.tc, {}
        self.model.train()
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not (tc.progress_bar and self.dist.is_main),
                   dynamic_ncols=True)
        t_window, steps_in_window = time.perf_counter(), 0
        while self.step < tc.max_steps:
            loss, aux, grad_norm = self.train_step()
            if self.is_moe and steps_in_window == 0 and self.step == 1:
                print("MoE dispatch: " + "; ".join(sorted({m.dispatch for m in moe_layers(self.model)})))
            steps_in_window += 1
            bar.update(1)
            last = self.step == tc.max_steps
            if self.step % tc.log_every == 0 or last:
                m = self.log_train(loss, aux, grad_norm, steps_in_window, time.perf_counter() - t_window)
                bar.set_postfix(loss=f"{m['train/loss']:.3f}", tok_s=f"{m['perf/tokens_per_s']:.0f}")
                t_window, steps_in_window = time.perf_counter(), 0
            if (tc.eval_every and self.step % tc.eval_every == 0) or last:
                val = self.eval_and_sample()
                t_window, steps_in_window = time.perf_counter(), 0  # eval time is not training throughput
            saved = (tc.ckpt_every and self.step % tc.ckpt_every == 0) or last
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

    def finish(self, val: dict) -> dict[str, Any]:
        c = self.counts
        summary = {"step": self.step, "tokens_seen": self.tokens_seen, "val_loss": val["val/loss"],
                   "val_bpb": val["val/bpb"], "params_total": c["total"], "params_active": c["active"],
                   "params_embedding": c["embedding"], "params_non_embedding": c["non_embedding"],
                   "flops_per_token": self.flops_per_token, "flops": self.flops_per_token * self.tokens_seen,
                   "wallclock_s": self.wallclock(), "run_name": self.run_name, "wandb_id": self.logger.wandb_id}
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.logger.finish(summary)
        print(f"done: step {self.step}, {self.tokens_seen:,} tokens, val loss {summary['val_loss']:.4f}, "
              f"val bpb {summary['val_bpb']:.4f}, {summary['wallclock_s']:.1f} s; run dir {self.run_dir}")
        return summary


def train(cfg: DictConfig, run_dir: Path, run_name: str = "run") -> dict[str, Any]:
    """Train per `cfg`, writing records, metrics, checkpoints, status.json and summary.json into `run_dir`.
    A preempted run (USR2 / SIGTERM) exits with SystemExit after its checkpoint (and requeue)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = distributed.detect_env().is_main
    trainer = None
    if is_main:
        write_status(run_dir, "running", 0)
    try:
        trainer = Trainer(cfg, run_dir, run_name)
        with trainer.preempt:
            summary = trainer.fit()
    except distributed.Preempted as err:
        print(err)
        if is_main:
            write_status(run_dir, "requeued" if err.outcome == "requeued" else "interrupted", trainer.step, err)
        raise SystemExit(err.exit_code) from None  # no result: submitit's client waits for the requeued run
    except BaseException as err:
        state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        write_status(run_dir, state, trainer.step if trainer else 0, err)  # any rank: the error is news
        if trainer is not None:
            trainer.logger.finish(exit_code=1)
        raise
    finally:
        distributed.destroy_process_group()
    if is_main:
        write_status(run_dir, "finished", summary["step"])
    return summary
