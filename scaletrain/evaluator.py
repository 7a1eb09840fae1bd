"""Evaluation during and after training: validation loss and bits per byte of every source, exact match of the
sources with answers, and the sample stories. `Evaluator` is what the loop asks at an evaluation step (it runs
both in eval mode and logs them); `evaluate`, `exact_match` and `sample` are also what `scaletrain.eval` and the
tests call. Not here: decoding itself (generate.py), the metric sinks (metrics.py).

Evaluation and sampling run in eval mode with their own generator, so they never touch the training RNG stream or
the MoE balancing loads (exact resume). With several ranks the validation windows and exact-match problems are
split over the ranks and the sums all-reduced (every rank runs the same number of forwards: FSDP2 needs every rank
in each); samples are drawn on every rank alike.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scaletrain import records
from scaletrain.config import Config, ConfigError
from scaletrain.data import EvalProblem, PreparedData, Tokenizer, eval_batches, synthetic
from scaletrain.data.loader import eval_batch_count
from scaletrain.generate import complete, generate
from scaletrain.model import Transformer

log = logging.getLogger("scaletrain")


@torch.no_grad()
def _evaluate_stream(
    model: nn.Module, tokens: np.ndarray, token_bytes: np.ndarray, cfg: Config, device: torch.device, autocast, world
) -> tuple[float, float]:
    """(mean next-token loss, bits per byte) over a fixed set of windows of one validation stream. With several
    ranks each one takes every world-th micro-batch of the same set and the sums are all-reduced: the result of
    one process, up to the order of the fp64 sums. Ranks with one micro-batch fewer run one more forward whose
    result is dropped (FSDP2 needs every rank in every forward)."""
    t, rank = cfg.train, _rank(world)
    args = (tokens, t.batch_size // world, cfg.data.seq_len, t.eval_batches * world)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    first, done = None, 0
    for j, (x, y) in enumerate(eval_batches(*args)):
        first = first or (x, y)
        if j % world != rank:
            continue
        with autocast():
            logits = model(x.to(device)).logits
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum")
        counts = [float(y.numel()), float(token_bytes[y.numpy()].sum())]
        sums += torch.cat([nats.double()[None], torch.tensor(counts, dtype=torch.float64, device=device)])
        done += 1
    assert first is not None  # eval_batches yields at least one batch or raises
    for _ in range(-(-eval_batch_count(*args) // world) - done):  # this rank's share ran out: a filler forward
        with autocast():
            model(first[0].to(device))
    if world > 1:
        torch.distributed.all_reduce(sums)
    total, n_tokens, n_bytes = sums.tolist()
    # bpb: total nats of the predicted tokens -> bits, divided by the UTF-8 bytes those tokens encode.
    return total / n_tokens, total / math.log(2) / n_bytes


def _rank(world: int) -> int:
    return torch.distributed.get_rank() if world > 1 else 0


def evaluate(
    model: nn.Module, data: PreparedData, cfg: Config, device: torch.device, autocast, world_size: int = 1
) -> dict:
    """Mean next-token loss over a fixed set of validation windows of each source, and their exact bits per
    byte. Several sources: each one's as val/<source>/loss and val/<source>/bpb, and val/loss, val/bpb the
    means weighted by the sources' training shares (the mixture's loss). With several ranks the windows and the
    exact-match problems are split over the ranks (the same numbers as one process)."""
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
                    model, data.tokenizer, problems, cfg.train.eval_answer_tokens, world_size
                )
    return out


@torch.no_grad()
def exact_match(
    model: nn.Module, tokenizer: Tokenizer, problems: list[EvalProblem], max_new_tokens: int, world: int = 1
) -> float:
    """The share of `problems` whose greedy continuation (batched, KV-cached, stopped at end-of-text) states
    the exact answer: `synthetic.extract_answer` (the text after '####', canonical) equals the problem's.
    A prompt longer than the model's context counts as wrong, never truncated. With several ranks each answers
    every world-th problem, decoding in lockstep (a rank with none left decodes a one-token filler), and the
    counts are all-reduced."""
    inner = model.module if hasattr(model, "module") else model  # DDP wraps; FSDP2 shards the module itself
    assert isinstance(inner, Transformer)
    prompts = [tokenizer.encode(p.prompt) for p in problems]
    fits = [i for i in range(_rank(world), len(problems), world) if len(prompts[i]) < inner.max_seq_len]
    right = 0
    if fits or world > 1:
        batch = [prompts[i] for i in fits] or [[tokenizer.eot_id]]
        answers = complete(inner, batch, max_new_tokens, stop_token=tokenizer.eot_id, lockstep=world > 1)
        right = sum(
            synthetic.extract_answer(tokenizer.decode(new)) == problems[i].answer for i, new in zip(fits, answers)
        )
    if world > 1:
        count = torch.tensor(right, device=inner.tok_emb.weight.device)
        torch.distributed.all_reduce(count)
        right = int(count)
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
    out = generate(
        model,
        prompt,
        t.sample_tokens,
        t.sample_temperature,
        t.sample_top_k,
        stop_token=data.tokenizer.eot_id,
        generator=gen,
    )
    texts = []
    for row in out.tolist():
        if data.tokenizer.eot_id in row[prompt.shape[1] :]:
            row = row[: prompt.shape[1] + row[prompt.shape[1] :].index(data.tokenizer.eot_id)]
        texts.append(data.tokenizer.decode(row))
    return texts


class Downstream:
    """lm-evaluation-harness tasks in the loop (`train.eval_tasks`): loaded once (a task that cannot load stops
    the run at its start), run on their cadence and at the last step, each rank scoring its share of the
    documents (the harness splits them; rank 0 aggregates, every rank gets the numbers). Logged as
    downstream/<task>/<metric> (+ `_stderr`); the last result goes into summary.json."""

    BOOTSTRAP_ITERS = 1000  # perplexity-type stderrs: 1000 resamples in process (the harness's CLI: 100,000)

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, cfg: Config, autocast):
        from scaletrain import harness

        t = cfg.train
        self.every, self.limit, self.fewshot = t.eval_tasks_every, t.eval_tasks_limit, t.eval_tasks_fewshot
        self.gen_kwargs = {"max_gen_toks": t.eval_tasks_max_gen_toks} if t.eval_tasks_max_gen_toks else None
        self.tasks = harness.load_tasks(list(t.eval_tasks), {k: v for k, v in t.eval_tasks_data.items() if v})
        self.lm = harness.ScaletrainLM(model, tokenizer, "auto", autocast, seed=t.seed)
        if t.eval_tasks_max_gen_toks and t.eval_tasks_max_gen_toks >= self.lm.max_length:
            raise ConfigError(
                f"train.eval_tasks_max_gen_toks: {t.eval_tasks_max_gen_toks} new tokens leave no room for a prompt in "
                f"the model's context of {self.lm.max_length} tokens"
            )
        self.seed = t.seed

    def due(self, step: int, last: bool) -> bool:
        return last or bool(self.every and step % self.every == 0)

    def __call__(self, step: int, logger) -> dict[str, float]:
        from scaletrain import harness

        _, flat = harness.run_tasks(
            self.lm,
            self.tasks,
            self.limit,
            self.fewshot,
            seed=self.seed,
            gen_kwargs=self.gen_kwargs,
            bootstrap_iters=self.BOOTSTRAP_ITERS,
            bootstrap_processes=False,
        )
        logger.log(step, flat)
        shown = ", ".join(
            f"{k.removeprefix(records.DOWNSTREAM)} {v:.4g}" for k, v in flat.items() if not k.endswith(records.STDERR)
        )
        log.info("step %d: downstream %s", step, shown)
        return flat


class Evaluator:
    """The loop's evaluation step: validation of every source (+ exact match) and samples, logged."""

    def __init__(self, model: Transformer, data: PreparedData, cfg: Config, device: torch.device, autocast, world: int):
        self.model, self.data, self.cfg, self.device, self.autocast, self.world = (
            model,
            data,
            cfg,
            device,
            autocast,
            world,
        )

    def __call__(self, step: int, logger) -> dict:
        """-> the validation metrics of `step`, logged with the samples; the model is back in train mode after."""
        # eval mode for both: dropout off (it would draw from the training RNG stream and break exact
        # resume), and MoE layers do not count these tokens towards their balancing-bias update
        val = evaluate(self.model, self.data, self.cfg, self.device, self.autocast, self.world)
        texts = sample(self.model, self.data, self.cfg, self.device, step)
        self.model.train()
        logger.log(step, val)
        logger.log_samples(step, texts)
        log.info("step %d: val loss %.4f, val bpb %.4f", step, val[records.VAL_LOSS], val[records.VAL_BPB])
        for i, text in enumerate(texts):
            log.info("  sample %d: %r", i, text)
        return val
