"""The training loop: `Trainer.fit()` reads top to bottom (step, log, evaluate + sample, checkpoint, preemption
check), the step (`forward_backward`, `optimizer_step`) and `train(cfg, run_dir) -> Summary`, the entry.

The trainer is made of parts, each in its own module: `build.build(cfg) -> Components` (model, optimizer,
schedule, data, loader, data-parallel wrapper, autocast: the one builder, also the benchmark's and the tests'),
`checkpoint.Checkpointer` (saves and restores every Stateful: model, optimizer, scheduler, loader, RNG, and the
loop's `TrainProgress`), `evaluator.Evaluator` (validation, exact match, samples), `run_dir.RunFolder` (ownership,
records, every status transition). Not here: model code, data pipeline, metric sinks, checkpoint formats,
hardware facts (`model.py`, `data/`, `metrics.py`, `checkpoint.py`, `hardware.py`).

Distributed (see `distributed.py`): every rank runs this loop on its shard of each global batch
(`train.batch_size` is global: each rank takes batch_size / world_size sequences), every rank
evaluates and samples (FSDP2 needs every rank in each forward), rank 0 alone logs and writes. After
each step the loop asks whether SLURM's warning signal (USR2) or SIGTERM arrived on any rank; if so it
checkpoints, requeues the job and exits; the requeued job resumes from that checkpoint.

Console output goes through `logging` (logger "scaletrain"), so Hydra's `<job>.log` holds what the console
showed.

Host-device syncs (the host waits for the device to read a value back) of a step that does not log, evaluate or
checkpoint (tests/test_train.py counts these reads on CPU):
- 1: the NaN/Inf guard, `.item()` in `all_ranks_agree` (after an all-reduce under torch.distributed): a non-finite
  loss or gradient norm skips the update. `train.max_nonfinite=0` turns the guard and its sync off.
- 1 more under torch.distributed: the preemption check after the step (`Preemption.requested`: all-reduce +
  `.item()`); in one process it reads a flag the signal handler set, without a sync.
- MoE on the per-expert loop path (`moe.impl=loop`, or auto where grouped_mm cannot run, e.g. CUDA fp32): one
  `.tolist()` of the expert counts per MoE layer per forward (micro-batch, and again in a checkpointing
  recompute). The grouped path reads nothing back.
So one per step in one process with a dense or grouped-MoE model. On top of that, a skipped step: 2 (`.item()`
of the loss and norm it warns about); a logging step (`train.log_every`, the last): 2 (`.item()` of the loss and
grad norm), with MoE 1 more (aux loss) and per MoE layer 1 `.tolist()` (tokens per expert) and 2 `float()` per
scalar statistic (`moe_metrics`); evaluation, sampling and checkpoint steps: many (the save's weight check is one).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from scaletrain import checkpoint as ckpt
from scaletrain import distributed, hardware, records
from scaletrain.build import build
from scaletrain.config import BadInput, CkptFormat, Config, Precision, TrainConfig, load_config, to_dict
from scaletrain.cost import step_flops
from scaletrain.evaluator import Downstream, Evaluator
from scaletrain.metrics import MetricsLogger
from scaletrain.moe import moe_layers, moe_metrics, update_moe_biases
from scaletrain.records import RunState, Summary
from scaletrain.roles import format_param_split
from scaletrain.run_dir import RunFolder
from scaletrain.sizing import check_resources

log = logging.getLogger("scaletrain")


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


class NonFiniteError(BadInput, RuntimeError):
    """Training produced NaN/Inf: too many skipped steps in a row, or weights that must not be checkpointed."""

    kind = "training"


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
    skipped: gradients dropped, no optimizer or schedule step. That check is one host sync (the step's only one in
    one process with a dense or grouped-MoE model: the module docstring lists the others)."""
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


@dataclass
class TrainProgress:
    """The loop's counters, a Stateful saved at the checkpoint's top level (where every checkpoint has kept them).
    The clocks start when the run holds its slot: a sweep job queued behind others has not begun training."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # NaN/Inf guard: updates skipped in all
    wandb_id: str | None = None
    wallclock_before: float = 0.0  # seconds of earlier attempts (a resumed run)
    cpu_before: float = 0.0
    t_start: float = field(default_factory=time.perf_counter)
    cpu_start: float = field(default_factory=time.process_time)

    def wallclock(self) -> float:
        return self.wallclock_before + time.perf_counter() - self.t_start

    def cpu_time(self) -> float:
        return self.cpu_before + time.process_time() - self.cpu_start

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "wandb_id": self.wandb_id,
            "wallclock_s": self.wallclock(),
            "cpu_s": self.cpu_time(),
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        s = state_dict
        self.step, self.tokens_seen, self.wandb_id = s["step"], s["tokens_seen"], s.get("wandb_id")
        self.wallclock_before = s.get("wallclock_s", 0.0)  # checkpoints from before a field existed: 0
        self.cpu_before = s.get("cpu_s", 0.0)
        self.skipped_steps = s.get("skipped_steps", 0)


class Trainer:
    """Owns the components of one run on one rank; `fit()` is the loop. Built from parts: `build` (components),
    `Checkpointer` (save/restore), `Evaluator` (validation, exact match, samples), `RunFolder` (records, status)."""

    def __init__(self, cfg: Config | DictConfig, run_dir: Path, run_name: str = "run"):
        cfg = load_config(cfg)
        self.cfg, self.tc, self.run_name = cfg, cfg.train, run_name
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.dist = distributed.detect_env()  # before pick_device: a submitit_local job may re-expose its GPUs
        device, run_dir = distributed.setup_rank(
            self.dist,
            hardware.pick_device(self.tc.device),
            Path(run_dir),
            cfg.cluster.parallel_jobs,
            self.tc.dist_timeout_s,
        )
        check_resources(cfg, device, self.dist)  # one line if it cannot fit here, before data and model setup
        self.progress = TrainProgress()  # the clocks start here, once the run holds its slot
        self.folder = RunFolder(run_dir, self.dist.is_main)
        if device.type == "cpu":
            log.info(hardware.configure_cpu_malloc(self.tc.cpu_malloc_cache))
        self.folder.start_records(to_dict(cfg), device, distributed.cluster_env(self.dist))
        self.c = build(cfg, self.dist, device)
        data = self.c.data
        assert data is not None  # built from the configured data, which evaluation needs
        self.folder.save_tokenizer(data.tokenizer)
        c = self.c
        self.device, self.model, self.optimizer = c.device, c.model, c.optimizer
        self.scheduler, self.loader, self.autocast = c.scheduler, c.loader, c.autocast
        self.evaluator = Evaluator(self.model, data, cfg, self.device, self.autocast, self.dist.world_size)
        # lm-evaluation-harness tasks (train.eval_tasks): loaded here, so a task that cannot load stops the start
        self.downstream = Downstream(self.model, data.tokenizer, cfg, self.autocast) if self.tc.eval_tasks else None
        self.downstream_last: dict[str, float] = {}
        self.checkpointer = ckpt.Checkpointer(
            self.folder.path,
            self.model,
            self.optimizer,
            {"scheduler": self.scheduler, "loader": self.loader, "rng": ckpt.RNGState()},
            self.progress,
            to_dict(cfg),
            self.dist.is_main,
        )
        self.counts = self.model.param_counts()
        self.log_model()
        self.residual_dtype: str | None = None  # read off the first forward (summary.json: the report compares it)
        self._watch_residual()
        self.nonfinite_in_a_row = 0  # NaN/Inf guard (train.max_nonfinite)
        self.resume()
        self.logger = (
            MetricsLogger(self.folder.path, cfg.logging.wandb, to_dict(cfg), run_name, self.progress.wandb_id)
            if self.dist.is_main
            else distributed.NullLogger()
        )
        self.progress.wandb_id = self.logger.wandb_id
        self.folder.save_wandb_id(self.logger.wandb_id)
        self.logger.log(self.step, {f"params/{k}": v for k, v in self.counts.items()})
        self.setup_accounting(c.precision)
        self.preempt = distributed.Preemption(self.device)  # handlers are installed around fit() by train()

    # the counters tests and callers read
    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def skipped_steps(self) -> int:
        return self.progress.skipped_steps

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    def log_model(self) -> None:
        n = self.counts
        log.info(
            "model %s: %.2fM parameters (%.2fM embedding, %.2fM non-embedding, %.2fM active per token)",
            self.cfg.model.name,
            n["total"] / 1e6,
            n["embedding"] / 1e6,
            n["non_embedding"] / 1e6,
            n["active"] / 1e6,
        )
        if self.cfg.optim.name == "muon":  # the audit trail of which optimizer updates which parameter
            log.info(format_param_split(self.model))
        self.is_moe = bool(moe_layers(self.model))
        if self.is_moe:
            log.info(
                "MoE: %d layers of %d experts, top-%d, %d shared; the dispatch path is logged after the first step",
                len(moe_layers(self.model)),
                self.cfg.moe.n_experts,
                self.cfg.moe.top_k,
                self.cfg.moe.n_shared,
            )

    def resume(self) -> None:
        """Continue from the newest good checkpoint when asked (train.resume) or inside a scheduler's job: a cluster
        job's folder belongs to one sweep point, so a checkpoint there is an earlier attempt of this job (preempted
        and requeued). One W&B run per run folder, whichever attempt logs."""
        resume = resume_mode(self.tc)
        candidates = ckpt.resume_candidates(resume, self.run_dir)
        self.folder.remove_save_leftovers()
        if candidates:
            self.checkpointer.restore_newest_good(candidates)
            self.folder.truncate_metrics(self.step)
        elif resume == "auto":
            log.info("train.resume=auto: no checkpoint in %s, starting fresh", self.run_dir / records.CKPT_DIR)
            self.folder.truncate_metrics(-1)  # records of an attempt killed before its first checkpoint: rerun
        if resume != "none":
            self.progress.wandb_id = self.progress.wandb_id or self.folder.wandb_id()

    def setup_accounting(self, precision: Precision) -> None:
        """MFU's peak, FLOPs per token and per optimizer step, tokens per step."""
        bf16 = precision == Precision.bf16
        peak, peak_source = hardware.peak_flops(
            self.device, torch.bfloat16 if bf16 else torch.float32, self.tc.matmul_peak_tflops, self.tc.measure_cpu_peak
        )
        self.peak = peak * self.dist.world_size if peak else None  # tokens/s counts every rank
        log.info(
            "device %s (%s), precision %s, compile %s; MFU against %s (%s)",
            self.device,
            hardware.describe(self.device),
            precision,
            self.tc.compile,
            f"{self.peak / 1e12:.1f} TFLOP/s" if self.peak else "nothing",
            peak_source,
        )
        self.step_cost = step_flops(self.cfg, self.model)  # model + optimizer FLOPs per step (cost.py)
        self.flops_per_token, self.tokens_per_step = self.step_cost.flops_per_token, self.step_cost.tokens

    def last_good(self) -> str:
        """What is left to continue from, for the message of a run stopped by non-finite values."""
        done = records.list_checkpoints(self.run_dir / records.CKPT_DIR)
        if done:
            return f"the last checkpoint, {done[-1]}, holds finite weights (train.resume=auto continues from it)"
        return "no checkpoint was written before it (nothing to resume from)"

    def save(self) -> None:
        """Checkpoint this step in `train.ckpt_format` (every rank calls this); never from non-finite weights,
        so the newest checkpoint is always one a run can continue from."""
        local = [p.to_local() if isinstance(p, DTensor) else p for p in self.model.parameters()]  # FSDP2: own shard
        if not all_ranks_agree(torch.stack([torch.isfinite(t.detach()).all() for t in local]).all()):
            raise NonFiniteError(
                f"weights are not finite at step {self.step}: not checkpointing them; {self.last_good()}: "
                "lower optim.lr or check the data"
            )
        fmt = self.tc.ckpt_format
        sharded = fmt == CkptFormat.sharded or (fmt == CkptFormat.auto and distributed.is_sharded(self.model))
        self.checkpointer.save(self.step, sharded, self.tc.ckpt_keep)

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
            lm_sum += lm / accum  # stays on the device: read back on logging steps (the guard reads only isfinite)
            aux_sum += aux / accum
        guard = lm_sum if self.tc.max_nonfinite > 0 else None
        grad_norm, stepped = optimizer_step(self.model, self.optimizer, self.scheduler, self.tc.grad_clip, guard)
        self.progress.tokens_seen += self.tokens_per_step  # the batch was consumed either way
        if stepped:
            self.progress.step += 1
        return lm_sum, aux_sum, grad_norm, stepped

    def skipped(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """The guard skipped an update: count it, say so, and stop after train.max_nonfinite in a row."""
        self.progress.skipped_steps += 1
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
                f"after step {self.step} (train.max_nonfinite={self.tc.max_nonfinite}); {self.last_good()}: "
                "lower optim.lr or check the data"
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
            "train/lr": self.optimizer.param_groups[0]["lr"],  # the lr of the next step (the scheduler set it)
            "train/grad_norm": grad_norm.item(),
            records.TRAIN_TOKENS: self.progress.tokens_seen,
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
        self.folder.status(RunState.running, self.step)
        return m

    def _watch_residual(self) -> None:
        """Record the dtype the first block receives in the first forward (after FSDP2's own input cast: the
        precision the residual stream is added in), then stop watching."""

        def seen(module: nn.Module, args: tuple) -> None:
            self.residual_dtype = str(args[0].dtype).removeprefix("torch.")
            handle.remove()
            log.info("residual stream: %s", self.residual_dtype)

        handle = self.model.blocks[0].register_forward_pre_hook(seen)

    def evaluate(self) -> dict:
        return self.evaluator(self.step, self.logger)

    def progress_bar(self) -> tqdm:
        """A bar only for a person watching: rank 0, train.progress_bar, and stderr a terminal (SLURM and
        submitit logs would otherwise fill with carriage returns)."""
        show = self.tc.progress_bar and self.dist.is_main and sys.stderr.isatty()
        return tqdm(total=self.tc.max_steps, initial=self.step, disable=not show, dynamic_ncols=True)

    def fit(self) -> Summary:
        """The loop: step; log, evaluate and checkpoint on their cadences; leave at a preemption signal."""
        tc, val = self.tc, {}
        self.model.train()
        bar = self.progress_bar()
        t_window, steps_in_window = time.perf_counter(), 0
        # with a bar, console log lines print above it instead of through it (the log file is untouched)
        with logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext():
            while self.step < tc.max_steps:
                distributed.check_supervised(self.dist)  # a torchrun worker whose agent died stops here
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
                    self.report_progress(bar, m)
                    t_window, steps_in_window = time.perf_counter(), 0
                if (tc.eval_every and self.step % tc.eval_every == 0) or last:
                    val = self.evaluate()
                    t_window, steps_in_window = time.perf_counter(), 0  # eval time is not training throughput
                if self.downstream is not None and self.downstream.due(self.step, last):
                    self.downstream_last = self.downstream(self.step, self.logger)
                    t_window, steps_in_window = time.perf_counter(), 0
                saved = bool(tc.ckpt_every and self.step % tc.ckpt_every == 0) or last
                if saved:
                    self.save()
                if not last and self.preempt.requested():  # a run that reached max_steps is never requeued
                    self.stop_for_preemption(saved)
        bar.close()
        if not val:  # resumed a run that had already finished: evaluate once more for the summary
            val = self.evaluate()
            if self.downstream is not None:
                self.downstream_last = self.downstream(self.step, self.logger)
        return self.finish(val)

    def report_progress(self, bar: tqdm, m: dict) -> None:
        bar.set_postfix(loss=f"{m[records.TRAIN_LOSS]:.3f}", tok_s=f"{m[records.PERF_TOKENS_PER_S]:.0f}")
        if bar.disable:  # without a bar, the log is the progress report
            log.info(
                "step %d/%d: loss %.4f, %.0f tok/s",
                self.step,
                self.tc.max_steps,
                m[records.TRAIN_LOSS],
                m[records.PERF_TOKENS_PER_S],
            )

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
        model_sd = distributed.full_model_state(self.model)  # no optimizer: model.pt does not keep it
        if self.dist.is_main:
            state = {"model": model_sd, "step": self.step, "config": to_dict(self.cfg)}
            ckpt.save_weights(self.run_dir / records.MODEL_FILE, state)

    def finish(self, val: dict) -> Summary:
        self.save_final_weights()
        n, p = self.counts, self.progress
        summary = Summary(
            step=p.step,
            tokens_seen=p.tokens_seen,
            val_loss=val[records.VAL_LOSS],
            val_bpb=val[records.VAL_BPB],
            params_total=n["total"],
            params_active=n["active"],
            params_embedding=n["embedding"],
            params_non_embedding=n["non_embedding"],
            flops_per_token=self.flops_per_token,
            flops=self.flops_per_token * p.tokens_seen,
            wallclock_s=p.wallclock(),
            run_name=self.run_name,
            wandb_id=self.logger.wandb_id,
            val={k: v for k, v in val.items() if k.startswith("val/")},
            downstream=dict(self.downstream_last),
            optimizer_flops=self.step_cost.optimizer * p.step,
            cpu_s=p.cpu_time(),
            residual_dtype=self.residual_dtype,
        )
        self.folder.finish(summary)
        self.logger.finish(summary.to_dict())
        log.info(
            "done: step %d, %s tokens, val loss %.4f, val bpb %.4f, %.1f s; run dir %s",
            p.step,
            f"{p.tokens_seen:,}",
            summary.val_loss,
            summary.val_bpb,
            summary.wallclock_s,
            self.run_dir,
        )
        return summary


def resume_mode(tc: TrainConfig) -> str:
    """train.resume as it applies: inside a scheduler's job `none` means `auto` (Trainer.resume says why)."""
    return "auto" if tc.resume == "none" and distributed.in_cluster_job() else tc.resume


def train(cfg: Config | DictConfig, run_dir: Path, run_name: str = "run") -> Summary:
    """Train per `cfg`, writing records, metrics, checkpoints, status.json and summary.json into `run_dir`
    -> the run's summary. A preempted run (USR2 / SIGTERM) exits with SystemExit after its checkpoint (and
    requeue)."""
    cfg = load_config(cfg)
    env = distributed.detect_env()
    folder = RunFolder(Path(run_dir), env.is_main)
    with folder.lease(env.launcher):  # one process per run folder (lease.py): first, before anything is written
        return _train_in(folder, cfg, run_name)


def _train_in(folder: RunFolder, cfg: Config, run_name: str) -> Summary:
    """`train` in a folder this process's job holds the lease of (rank 0 holds it, released on every way out)."""
    folder.claim(cfg)  # before status.json or config.json is written
    # before anything is written or built
    ckpt.check_resumable(resume_mode(cfg.train), folder.path, to_dict(cfg), overwrite=cfg.train.overwrite)
    if folder.is_main:
        ckpt.check_writable(folder.path)
    trainer = None
    folder.status(RunState.running, 0)
    try:
        trainer = Trainer(cfg, folder.path, run_name)
        with trainer.preempt:
            summary = trainer.fit()
    except distributed.Preempted as err:
        log.warning(str(err))
        state = RunState.requeued if err.outcome == "requeued" else RunState.interrupted
        folder.status(state, trainer.step if trainer else 0, err)
        trainer = None  # every rank stops here together (the flag is agreed collectively): a clean teardown
        distributed.teardown()
        raise SystemExit(err.exit_code) from None  # no result: submitit's client waits for the requeued run
    except BaseException as err:
        state = RunState.interrupted if isinstance(err, KeyboardInterrupt) else RunState.failed
        folder.status(state, trainer.step if trainer else 0, err, any_rank=True)  # the error is news
        if trainer is not None:
            trainer.logger.finish(exit_code=1)
        raise  # no teardown: peers may be inside a collective (distributed.teardown)
    trainer = None  # DDP's reducer holds the process group: free it first
    distributed.teardown()
    return summary
