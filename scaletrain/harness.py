"""EleutherAI's lm-evaluation-harness in process: a scaletrain model as an lm-eval `LM`, no Hugging Face export.

`ScaletrainLM` answers the harness's three request types on the model's own tokenizer: `loglikelihood`
(context + continuation -> summed log-probability of the continuation and whether greedy decoding gives it),
`loglikelihood_rolling` (a whole document's log-likelihood over disjoint windows of the model's context) and
`generate_until` (KV-cached batched decoding, generate.complete, cut at the task's stop strings). Tokenization,
left-truncation and rolling windows are the harness's own (`TemplateLM._encode_pair`, `get_rolling_token_windows`,
the Hugging Face backend's truncation rule), so a run and its `scaletrain.export_hf` export scored by `--model hf`
agree per request to fp32 rounding (tests/test_harness.py). Any model the platform trains works: dense, MoE
(routed dropless while scoring, as while generating: a token's score never depends on its batch mates), GQA,
plugin attention/MLP.

Several ranks (the in-loop evaluation under torchrun): the harness is told it runs in one process, so every rank
builds every request exactly as one process does (the harness draws few-shot examples in document order from one
seeded generator: split by the harness, each rank would draw other examples, and the score would depend on the
rank count); `ScaletrainLM` scores its share of each request type's requests (strided over the length-sorted
list) and all-gathers the answers. Every rank runs the same number of forward calls (one batch size, the most
batches of any rank, decoding in lockstep), which FSDP2's parameter gathering inside each forward needs.

`run_tasks(lm, tasks, ...)` is the one entry the eval command and the trainer use: it loads the tasks (the
harness's registry plus scaletrain's `local_*` tasks in scaletrain/tasks/), runs them, and returns the harness's
results and the flat metrics `downstream/<task>/<metric>` (`/<filter>` appended for a filter other than "none"),
each with `<key>_stderr`. Without network access a task whose data is on the hub fails in one line
(`TaskUnavailable`, naming the task and the local alternative).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn

from scaletrain import records
from scaletrain.config import BadInput
from scaletrain.data import Tokenizer
from scaletrain.generate import _dropless, agree, complete
from scaletrain.model import Transformer

if TYPE_CHECKING:
    from lm_eval.result_schema import EvalResults
    from lm_eval.tasks.manager import TaskDict

log = logging.getLogger("scaletrain")

TASKS_DIR = Path(__file__).parent / "tasks"  # the local_* task configs (their data folders come as metadata)
MAX_GEN_TOKS = 256  # the harness's default for a task that sets none (its Hugging Face backend's too)
AUTO_MAX_BATCH = 64  # the largest batch "auto" picks (the Hugging Face backend's default max_batch_size)
CPU_LOGITS_BUDGET = 2**27  # "auto" on a CPU: at most this many fp32 logits per forward (512 MiB, + log_softmax)


class TaskUnavailable(BadInput, RuntimeError):
    """A task that cannot be loaded here: unknown to the harness, or its data is on an unreachable hub."""

    kind = "eval task"


class ScaletrainLM(TemplateLM):
    """A scaletrain `Transformer` and its `Tokenizer` as an lm-eval language model.

    batch_size: requests per forward, or "auto" (per sequence length: one CUDA process, the largest power of two
    up to 64 whose longest batch runs without running out of memory; CPU or several ranks, the largest power of
    two up to 64 with at most 2^27 logits per forward). autocast: a context factory (the run's precision); None:
    fp32. Log-probabilities are taken in fp32 whatever the compute dtype. `model` may be wrapped by DDP (its
    module is used) or sharded in place by FSDP2 (called as is: its hooks gather the parameters).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        batch_size: int | str = "auto",
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        max_gen_toks: int = MAX_GEN_TOKS,
        seed: int = 1234,
    ):
        super().__init__()
        # DDP: its module (scoring needs no gradient sync); FSDP2 shards the module in place (called as is)
        wrapped = getattr(model, "module", None)
        inner = wrapped if isinstance(wrapped, nn.Module) else model
        if not isinstance(inner, Transformer):
            raise TypeError(f"ScaletrainLM needs a scaletrain Transformer, got {type(inner).__name__}")
        self.module: Transformer = inner
        self.tok = tokenizer
        self.autocast = autocast or contextlib.nullcontext
        self._max_gen_toks = max_gen_toks
        self._device = inner.tok_emb.weight.device
        self.generator = torch.Generator(device=self._device).manual_seed(seed)  # sampled generation only
        # the harness sees one process (rank 0 of 1: it builds every request, few-shot examples drawn in the
        # same order as in one process, and aggregates); the requests are split over the ranks here
        self.shard_rank, self.shard_world = 0, 1
        if dist.is_available() and dist.is_initialized():
            self.shard_rank, self.shard_world = dist.get_rank(), dist.get_world_size()
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise BadInput(f"batch_size: expected a positive integer or 'auto', got {batch_size!r}")
        self._batch: int | None = None if batch_size == "auto" else int(batch_size)
        self._auto: dict[int, int] = {}  # "auto": sequence length -> batch size

    # -- what the harness asks of a TemplateLM --------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.eot_id  # the export's tokenizer has <|endoftext|> as eos and no bos: the same id there

    @property
    def max_length(self) -> int:
        return self.module.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return f"scaletrain-{self.tok.fingerprint}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)  # scaletrain's tokenizers add no special tokens

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    # -- scoring --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _scoring(self) -> Iterator[None]:
        was_training = self.module.training
        self.module.eval()  # dropout off; MoE balancing loads untouched
        try:
            with torch.no_grad(), _dropless(self.module), self.autocast():
                yield
        finally:
            self.module.train(was_training)

    def _batch_for(self, longest: int) -> int:
        """The batch size for requests up to `longest` tokens: the given one, or "auto"'s for that length (found
        once per length; the same on every rank: `longest` is over all requests, which every rank holds)."""
        if self._batch is not None:
            return self._batch
        T = max(1, min(longest, self.max_length))
        if T not in self._auto:
            self._auto[T] = agree(self._auto_batch(T), dist.ReduceOp.MIN, self._device)
            log.info("lm-eval: batch size %d for %d tokens (auto, %s)", self._auto[T], T, self._device.type)
        return self._auto[T]

    def _auto_batch(self, T: int) -> int:
        """CPU, or several ranks (a trial forward that runs out of memory on one rank would leave the others in
        a collective): the largest power of two up to 64 with at most 2^27 logits per forward. One CUDA
        process: the largest power of two up to 64 whose [B, T] forward and log-softmax fit."""
        if self._device.type != "cuda" or self.shard_world > 1:
            fits = CPU_LOGITS_BUDGET // (T * self.module.vocab_size)
            return max(1, min(AUTO_MAX_BATCH, 2 ** int(math.log2(max(1, fits)))))
        B = AUTO_MAX_BATCH
        while B > 1:
            try:
                with self._scoring():
                    F.log_softmax(self.module(torch.zeros(B, T, dtype=torch.long, device=self._device)).logits, -1)
                return B
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                B //= 2
        return 1

    def _forward_logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        """Right-padded rows -> fp32 log-probabilities [B, T, V] (causal: padding on the right changes nothing
        before it)."""
        T = max(len(r) for r in rows)
        idx = torch.tensor([r + [0] * (T - len(r)) for r in rows], dtype=torch.long, device=self._device)
        return F.log_softmax(self.module(idx).logits.float(), dim=-1)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) pairs -> (sum of the continuation's log-probabilities, greedy?).
        A pair longer than the context window keeps its last max_length + 1 tokens (the harness's rule)."""
        if not requests:
            return []
        inputs = []
        for _, ctx, cont in requests:
            if not cont or len(cont) > self.max_length:
                raise BadInput(f"lm-eval: a continuation of {len(cont)} tokens (expected 1..{self.max_length})")
            inputs.append((ctx + cont)[-(self.max_length + 1) :][:-1])
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))  # longest first: one padding size
        mine = order[self.shard_rank :: self.shard_world]
        B = self._batch_for(len(inputs[order[0]]))
        n_batches = agree(-(-len(mine) // B), dist.ReduceOp.MAX, self._device)  # FSDP2: every rank in every forward
        out: dict[int, tuple[float, bool]] = {}
        with self._scoring():
            for b in range(n_batches):
                chunk = mine[b * B : (b + 1) * B]
                logp_BTV = self._forward_logprobs([inputs[i] for i in chunk or order[:1]])  # none left: a filler
                for row, i in enumerate(chunk):
                    cont = requests[i][2]
                    end = len(inputs[i])
                    logp_CV = logp_BTV[row, end - len(cont) : end]
                    target = torch.tensor(cont, device=self._device)
                    score = logp_CV.gather(-1, target[:, None]).sum()
                    out[i] = (float(score), bool((logp_CV.argmax(-1) == target).all()))
        return self._gather(out, len(requests))

    def _gather(self, mine: dict[int, Any], n: int) -> list[Any]:
        """Every rank's answers (request index -> answer) -> all n answers in request order, on every rank."""
        if self.shard_world > 1:
            parts: list[Any] = [None] * self.shard_world
            dist.all_gather_object(parts, mine)
            mine = {i: answer for part in parts for i, answer in part.items()}
        return [mine[i] for i in range(n)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A document's log-likelihood: disjoint windows of max_length tokens, each predicted token conditioned
        on the window before it; the first token on the end-of-text prefix (the harness's windows)."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(text)
            for ctx, cont in map(
                make_disjoint_window, get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, 1)
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (score, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += score
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations, cut at the first stop string; the context is
        left-truncated to max_length - max_gen_toks tokens (the Hugging Face backend's rule). Requests with the
        same generation arguments decode together, longest context first."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        out: dict[int, str] = {}
        eos = self.tok_decode([self.eot_token_id])
        for key in sorted(groups):
            members = groups[key]
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise BadInput(
                    f"lm-eval: the task asks for {max_gen} new tokens; the model's context is {self.max_length} "
                    "(pass a smaller max_gen_toks in the task's generation_kwargs)"
                )
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            contexts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen) :] for i in members}
            for i, ids in contexts.items():
                if not ids:
                    contexts[i] = [self.prefix_token_id]
            members.sort(key=lambda i: -len(contexts[i]))
            mine = members[self.shard_rank :: self.shard_world]
            B = self._batch_for(len(contexts[members[0]]) + max_gen)
            n_batches = agree(-(-len(mine) // B), dist.ReduceOp.MAX, self._device)
            with self._scoring():
                for b in range(n_batches):
                    chunk = mine[b * B : (b + 1) * B]
                    new = complete(
                        self.module,
                        [contexts[i] for i in chunk or members[:1]],  # none left: a filler, discarded
                        max_gen,
                        temperature=temperature,
                        top_k=kwargs.get("top_k"),
                        stop_token=self.eot_token_id,
                        generator=self.generator,
                        lockstep=self.shard_world > 1,
                    )
                    for i, ids in zip(chunk, new):
                        text = self.tok_decode(ids)
                        for stop in until:
                            if stop:
                                text = text.split(stop)[0]
                        out[i] = text
        return self._gather(out, len(requests))


register_model("scaletrain")(ScaletrainLM)  # simple_evaluate(model="scaletrain", ...) once this module is imported


def task_manager(metadata: dict[str, Any] | None = None, harness_tasks: bool = True):
    """The harness's task registry with scaletrain's `local_*` tasks added; `metadata` reaches every task
    (the local tasks read their data folders from it: gsm8k_dir, tinystories_dir). harness_tasks=False: the
    local tasks only (indexing the harness's ~10,000 task files takes ~15 s on a 2-core machine)."""
    from lm_eval.tasks import TaskManager

    with _quiet_harness():
        return TaskManager(include_path=str(TASKS_DIR), include_defaults=harness_tasks, metadata=dict(metadata or {}))


def load_tasks(tasks: list[str], metadata: dict[str, Any] | None = None) -> TaskDict:
    """Task names (the harness's, scaletrain's local_*, groups, tags) or paths to task YAMLs -> the harness's
    task dict (`{"tasks": {name: Task}, "groups": ...}`). An unknown name, a harness task while the hub is
    unreachable (checked first: `datasets` would retry for ~30 s), and any other failure to load fail as
    TaskUnavailable in one line. HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1: the hub is not asked (a task whose
    data is in the local datasets cache loads from there)."""
    from scaletrain.config import suggest
    from scaletrain.data.common import hub_offline

    manager = task_manager(metadata, harness_tasks=False)
    local = list(manager.all_tasks)
    paths = [t for t in tasks if t.endswith((".yaml", ".yml"))]
    for path in paths:
        if not Path(path).is_file():
            raise TaskUnavailable(f"task {path}: no such YAML file")
    remote = [t for t in tasks if t not in local and t not in paths]
    if remote:  # the harness's own registry too (a task YAML is read by path, its includes relative to it)
        manager = task_manager(metadata)
    for task in remote:
        if task not in manager.all_tasks:
            raise TaskUnavailable(
                f"task {task!r} is not an lm-eval task{suggest(task, manager.all_tasks)}; scaletrain's local tasks: "
                f"{', '.join(t for t in local if t.startswith('local_'))}; a task YAML: pass its path"
            )
    if remote:
        from scaletrain.data.common import hub_failure

        failure = hub_failure(3.0)
        if failure:
            raise TaskUnavailable(_offline_message(remote, f"the Hugging Face hub at {failure} is not reachable"))
    try:
        with _quiet_harness():
            return manager.load(list(tasks))
    except BadInput:
        raise
    except Exception as err:  # a dataset not in the offline cache, a missing local file: the harness's error
        first = str(err).strip().split("\n")[0][:300] or type(err).__name__
        if remote and (hub_offline() or "offline" in first.lower() or "reach" in first.lower()):
            raise TaskUnavailable(_offline_message(remote, f"{type(err).__name__}: {first}")) from None
        raise TaskUnavailable(f"tasks {', '.join(tasks)}: cannot load ({type(err).__name__}: {first})") from None


def _offline_message(tasks: list[str], why: str) -> str:
    return (
        f"task {', '.join(tasks)}: its data is on the Hugging Face hub and cannot be loaded ({why}). Use a local "
        "task (local_gsm8k, local_tinystories_cloze, local_tinystories_ppl), a task YAML whose dataset_path and "
        "dataset_kwargs.data_files name local files, or a datasets cache with HF_DATASETS_OFFLINE=1 (README: "
        "'Downstream evaluation')"
    )


def flatten(results: Mapping[str, Any]) -> dict[str, float]:
    """The harness's results (`results[task]["acc,none"]`, `"acc_stderr,none"`, ...) -> downstream/... keys.
    A stderr the harness could not compute ("N/A") is left out."""
    flat: dict[str, float] = {}
    for task, values in results.get("results", {}).items():
        for name, value in values.items():
            if "," not in name or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, filt = name.split(",", 1)
            if metric.endswith(records.STDERR):
                flat[records.downstream_metric(task, metric.removesuffix(records.STDERR), filt) + records.STDERR] = (
                    float(value)
                )
            else:
                flat[records.downstream_metric(task, metric, filt)] = float(value)
    return flat


def run_tasks(
    lm: ScaletrainLM,
    tasks: list[str] | TaskDict,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    metadata: dict[str, Any] | None = None,
    bootstrap_iters: int = 100_000,
    log_samples: bool = False,
    seed: int = 1234,
    gen_kwargs: dict[str, Any] | None = None,
    bootstrap_processes: bool = True,
) -> tuple[EvalResults, dict[str, float]]:
    """Run the harness on `lm` -> (its results dict, the flat downstream metrics), the same on every rank.
    `tasks`: names (loaded here) or a task dict from `load_tasks` (loaded once, run many times: the loop).
    Few-shot examples and sampling use the harness's seeds (`seed` for its Python RNG, its defaults else).
    gen_kwargs update every generative task's generation arguments (e.g. {"max_gen_toks": 64}), as the
    harness's --gen_kwargs. bootstrap_processes=False: the bootstrap of a stderr (perplexity and the like) runs
    in this process (the harness's DISABLE_MULTIPROC; the loop: no worker pool forked from a training process)."""
    from lm_eval import evaluator

    task_dict = load_tasks(tasks, metadata) if isinstance(tasks, list) else tasks
    if num_fewshot is not None:
        for task in _leaf_tasks(task_dict):
            if task.get_config("num_fewshot") != 0 or num_fewshot == 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
    for task in _leaf_tasks(task_dict):  # the harness's own seeds, as simple_evaluate sets them
        task.set_fewshot_seed(seed=seed)
        if gen_kwargs and task.get_config("output_type") == "generate_until":
            task.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    import os

    saved = os.environ.get("DISABLE_MULTIPROC")
    if not bootstrap_processes:
        os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with _quiet_harness():
            results = evaluator.evaluate(
                lm=lm,
                task_dict=task_dict,
                limit=limit,  # pyright: ignore[reportArgumentType]  (the harness takes a fraction too)
                bootstrap_iters=bootstrap_iters,
                log_samples=log_samples,
            )
    finally:
        if saved is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = saved
    assert results is not None  # the harness sees one process (ScaletrainLM splits the requests over ranks)
    return results, flatten(results)


def _leaf_tasks(task_dict: TaskDict) -> list:
    return list(task_dict["tasks"].values())


class _HarnessNoise(logging.Filter):
    """Drops the harness's advice to pass --metadata, which every custom_dataset task triggers at each load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """The harness logs every task's settings at INFO: only its warnings pass while it runs (the run's log keeps
    its own lines), less one advice line that does not apply to scaletrain's local tasks."""
    logger, task_logger, noise = logging.getLogger("lm_eval"), logging.getLogger("lm_eval.api.task"), _HarnessNoise()
    level = logger.level
    logger.setLevel(logging.WARNING)
    task_logger.addFilter(noise)
    try:
        yield
    finally:
        logger.setLevel(level)
        task_logger.removeFilter(noise)
