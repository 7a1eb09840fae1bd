"""Evaluate a finished run on any data config: `python -m scaletrain.eval RUN_DIR [data=<option>] [key=value ...]
[--checkpoint PATH] [--device cpu] [--split val|test]` (console script `scaletrain-eval`); or on lm-evaluation-harness
tasks: `python -m scaletrain.eval RUN_DIR --tasks local_gsm8k,hellaswag,my_task.yaml [--num-fewshot K] [--limit N]
[--task-data gsm8k_dir=PATH ...] [--batch-size auto|B] [--gen-kwargs max_gen_toks=64]`.

`--tasks` runs the harness in process on the run's model and tokenizer (scaletrain.harness; no Hugging Face export):
the harness's task names and few-shot seeds, scaletrain's `local_*` tasks (their data folders from `--task-data`),
or task YAML paths. eval.json gets the harness's results as it writes them (`harness`: results with their stderrs,
n-shot, versions, configs, n-samples) and the flat `metrics` downstream/<task>/<metric>[/<filter>] (+ `_stderr`);
the run's W&B run (if it logged to one) gets them in its summary. A task whose data is on the unreachable hub fails
in one line (exit 2) naming the local alternative.

`--split test` scores each synthetic source on its frozen test set instead of its validation split: per kind and
difficulty, `--test-problems` problems (default 500) of the generator's test stream (never in train or val),
written once to `--test-dir` (default test_sets/, commit it with a study) with a sha256 fingerprint and only
verified afterwards (synthetic.frozen_test_set); loss and bits per byte over the rendered test problems, exact
match over all of them. GSM8K's validation split is already its test split; text sources have none and are
left out (listed in eval.json under `not_evaluated`).

The run's final weights (or `--checkpoint`) and its own tokenizer; the data is the run's, or `data=<option>` with
any `data.*` override (e.g. `data=gsm8k data.path=../shared/data/gsm8k`), tokenized with the run's tokenizer.
Measures what training logs at an evaluation: validation loss and bits per byte (per source and their
weighted mean) and exact match for sources with answers (`train.eval_problems`, `train.eval_answer_tokens`,
`train.eval_batches` apply). Prints a table and writes eval.json beside the weights (the run folder, or the
checkpoint's folder).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from scaletrain import records
from scaletrain.config import BadInput, to_dict
from scaletrain.data.common import DataError
from scaletrain.runs import config_of_run, load_run

if TYPE_CHECKING:
    from scaletrain.config import Config
    from scaletrain.data import PreparedData


TEST_PROBLEMS = 500  # per synthetic kind: exact match then moves in steps of 0.2%


def test_split(data: PreparedData, cfg: Config, test_dir: Path, n_problems: int) -> tuple[PreparedData, list[str]]:
    """`data` with each source's validation split replaced by its test split, and the sources that have none.
    Synthetic: the frozen test set of every kind at the source's difficulty (written once, then verified)."""
    import dataclasses

    from scaletrain.config import SourceKind
    from scaletrain.data import EvalProblem, synthetic
    from scaletrain.data.cache import token_split

    sources, skipped = {}, []
    for name, source in data.sources.items():
        src = cfg.data.sources[name]
        if src.kind == SourceKind.gsm8k:
            sources[name] = source  # its validation split is GSM8K's test split (data.sources.<name>.val_split)
            continue
        if src.kind != SourceKind.synthetic:
            skipped.append(name)
            continue
        s = src.synthetic
        problems = []
        for kind in s.kinds:
            level = synthetic.resolve_difficulty(kind, s.difficulty(kind))
            problems += synthetic.frozen_test_set(
                kind, level, n_problems, test_dir / synthetic.test_set_name(kind, level)
            )
        split = token_split(data.tokenizer, [synthetic.render(p, s.with_solution) for p in problems])
        eval_problems = [EvalProblem(synthetic.prompt(p), p.answer) for p in problems]
        sources[name] = dataclasses.replace(source, val=split, problems=eval_problems)
    if not sources:
        raise DataError(f"--split test: no source of data={cfg.data.name} has a test split (text sources have none)")
    total = sum(s.weight for s in sources.values())
    sources = {n: dataclasses.replace(s, weight=s.weight / total) for n, s in sources.items()}
    return dataclasses.replace(data, sources=sources), skipped


def evaluate_run(
    run_dir: str | Path,
    overrides: list[str],
    checkpoint: str | None,
    device: str,
    split: str = "val",
    test_dir: str | Path = "test_sets",
    test_problems: int = TEST_PROBLEMS,
) -> dict:
    import dataclasses

    import torch

    from scaletrain import hardware
    from scaletrain.build import make_autocast
    from scaletrain.data import prepare_data
    from scaletrain.evaluator import evaluate
    from scaletrain.metrics import git_sha

    cfg = config_of_run(Path(run_dir), overrides)  # checked before anything is loaded
    run = load_run(run_dir, checkpoint, device)
    data = prepare_data(cfg.data, tokenizer=run.tokenizer)  # the run's ids, whatever data.tokenizer says
    skipped: list[str] = []
    if split == "test":
        data, skipped = test_split(data, cfg, Path(test_dir), test_problems)
        # every test problem is scored, and the loss covers every rendered test problem
        n_problems = max(len(s.problems) for s in data.sources.values())
        windows = max(len(s.val.tokens) - 1 for s in data.sources.values()) // cfg.data.seq_len
        batches = max(1, -(-windows // cfg.train.batch_size))
        train = dataclasses.replace(cfg.train, eval_problems=max(n_problems, 1), eval_batches=batches)
        cfg = dataclasses.replace(cfg, train=train)
    dev = torch.device(device)
    precision, _ = hardware.resolve_precision(cfg.train.precision, dev)
    metrics = evaluate(run.model, data, cfg, dev, make_autocast(precision, dev))
    if split == "test":
        metrics = {k.replace("val/", "test/", 1): v for k, v in metrics.items()}
    weights = run.weights
    out = {
        "run_dir": str(Path(run_dir).resolve()),
        "weights": str(weights.resolve()),
        "step": run.step,
        "data": to_dict(cfg)["data"],
        "overrides": overrides,
        "split": split,
        "not_evaluated": skipped,
        "metrics": metrics,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": git_sha(),
        "torch": torch.__version__,
        "hardware": hardware.describe(dev),
    }
    folder = weights.parent if weights.name != records.MODEL_FILE else Path(run_dir)
    records.write_json(folder / records.EVAL_FILE, out)
    return out


def parse_pairs(pairs: list[str], flag: str) -> dict[str, str]:
    """KEY=VALUE strings (comma-separated or repeated) -> a dict; anything else is one error naming the flag."""
    out = {}
    for pair in (p for item in pairs for p in item.split(",") if p):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInput(f"{flag}: expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _gen_value(value: str):
    """A --gen-kwargs value as the harness's parser reads it: int, float, true/false, else the string."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def harness_run(
    run_dir: str | Path,
    tasks: list[str],
    checkpoint: str | None = None,
    device: str = "cpu",
    num_fewshot: int | None = None,
    limit: float | None = None,
    task_data: dict[str, str] | None = None,
    batch_size: int | str = "auto",
    gen_kwargs: dict | None = None,
    seed: int = 1234,
) -> dict:
    """lm-evaluation-harness tasks on a run's weights -> what eval.json holds (written beside the weights)."""
    import torch

    from scaletrain import hardware, harness
    from scaletrain.build import make_autocast
    from scaletrain.metrics import git_sha

    run = load_run(run_dir, checkpoint, device)
    task_dict = harness.load_tasks(tasks, task_data)  # before any scoring: a task that cannot load stops here
    dev = torch.device(device)
    precision, _ = hardware.resolve_precision(run.cfg.train.precision, dev)
    lm = harness.ScaletrainLM(run.model, run.tokenizer, batch_size, make_autocast(precision, dev), seed=seed)
    started = time.perf_counter()
    results, flat = harness.run_tasks(lm, task_dict, limit, num_fewshot, task_data, seed=seed, gen_kwargs=gen_kwargs)
    harness_out = dict(results)
    out = {
        "run_dir": str(Path(run_dir).resolve()),
        "weights": str(run.weights.resolve()),
        "step": run.step,
        "tasks": tasks,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "task_data": task_data or {},
        "metrics": flat,
        "harness": {
            k: harness_out[k]
            for k in ("results", "groups", "n-shot", "versions", "n-samples", "configs")
            if k in harness_out
        },
        "seconds": time.perf_counter() - started,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": git_sha(),
        "torch": torch.__version__,
        "lm_eval": _version("lm_eval"),
        "hardware": hardware.describe(dev),
    }
    folder = run.weights.parent if run.weights.name != records.MODEL_FILE else Path(run_dir)
    records.write_json(folder / records.EVAL_FILE, out)
    _to_wandb(run.run_dir, run.cfg, flat)
    return out


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package.replace("_", "-"))


def _to_wandb(run_dir: Path, cfg: Config, flat: dict[str, float]) -> None:
    """The downstream metrics into the run's own W&B run summary (same id, same mode), if it logged to one."""
    run_id = records.read_wandb_id(run_dir)
    mode = str(cfg.logging.wandb.mode)
    if run_id is None or mode == "disabled":
        return
    import wandb

    w = cfg.logging.wandb
    run = wandb.init(
        id=run_id,
        resume="allow",
        mode=mode,  # pyright: ignore[reportArgumentType]
        project=w.project,
        entity=w.entity,
        dir=str(w.dir or run_dir),
        reinit="finish_previous",
    )
    run.summary.update(flat)
    run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scaletrain.eval", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder (holds config.json, tokenizer.json and model.pt)")
    parser.add_argument("overrides", nargs="*", help="data=<option>, data.<key>=..., train.eval_problems=...")
    parser.add_argument("--checkpoint", default=None, help="a step_*.pt file or sharded step_* folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--split", choices=("val", "test"), default="val", help="test: frozen synthetic test sets")
    parser.add_argument("--test-dir", default="test_sets", help="where the frozen test sets are (written once)")
    parser.add_argument("--test-problems", type=int, default=TEST_PROBLEMS, help="per synthetic kind (default 500)")
    harness = parser.add_argument_group("lm-evaluation-harness (scaletrain.harness)")
    harness.add_argument("--tasks", default=None, help="comma-separated task names or YAML paths (local_gsm8k, ...)")
    harness.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    harness.add_argument("--limit", type=float, default=None, help="documents per task (<1: a fraction)")
    harness.add_argument("--task-data", action="append", default=[], help="KEY=PATH for local tasks: gsm8k_dir, ...")
    harness.add_argument("--batch-size", default="auto", help="requests per forward, or auto")
    harness.add_argument("--gen-kwargs", default="", help="generation arguments for generative tasks: k=v,k=v")
    harness.add_argument("--seed", type=int, default=1234, help="the harness's random seed (few-shot: its own)")
    args = parser.parse_args(argv)
    from scaletrain.data.synthetic import FrozenSetError

    if args.tasks is not None:
        return _main_harness(args)

    try:
        out = evaluate_run(
            args.run_dir, args.overrides, args.checkpoint, args.device, args.split, args.test_dir, args.test_problems
        )
    except (BadInput, FrozenSetError, OSError) as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    print(f"# {out['weights']} (step {out['step']}) on {out['data']['name']}, {args.split} split")
    if out["not_evaluated"]:
        print(f"# not evaluated (no test split): {', '.join(out['not_evaluated'])}")
    for key, value in out["metrics"].items():
        print(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
    return 0


def _main_harness(args: argparse.Namespace) -> int:
    if args.overrides or args.split != "val":
        print(
            "eval error: --tasks takes no data overrides or --split (the tasks bring their own data)", file=sys.stderr
        )
        return 2
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("eval error: --tasks needs lm-evaluation-harness: pip install 'scaletrain[eval]'", file=sys.stderr)
        return 2
    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise BadInput("--tasks: no task named")
        if args.batch_size != "auto" and not args.batch_size.isdigit():
            raise BadInput(f"--batch-size: expected a positive integer or auto, got {args.batch_size!r}")
        batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        gen = {k: _gen_value(v) for k, v in parse_pairs([args.gen_kwargs], "--gen-kwargs").items()}
        out = harness_run(
            args.run_dir,
            tasks,
            args.checkpoint,
            args.device,
            args.num_fewshot,
            limit,
            parse_pairs(args.task_data, "--task-data"),
            batch,
            gen or None,
            args.seed,
        )
    except (BadInput, OSError) as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    print(f"# {out['weights']} (step {out['step']}): lm-evaluation-harness {out['lm_eval']}, {out['seconds']:.1f} s")
    from lm_eval.utils import make_table

    print(make_table(out["harness"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
