"""Evaluate a finished run on any data config: `python -m scaletrain.eval RUN_DIR [data=<option>] [key=value ...]
[--checkpoint PATH] [--device cpu] [--split val|test]` (console script `scaletrain-eval`).

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scaletrain.eval", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder (holds config.json, tokenizer.json and model.pt)")
    parser.add_argument("overrides", nargs="*", help="data=<option>, data.<key>=..., train.eval_problems=...")
    parser.add_argument("--checkpoint", default=None, help="a step_*.pt file or sharded step_* folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--split", choices=("val", "test"), default="val", help="test: frozen synthetic test sets")
    parser.add_argument("--test-dir", default="test_sets", help="where the frozen test sets are (written once)")
    parser.add_argument("--test-problems", type=int, default=TEST_PROBLEMS, help="per synthetic kind (default 500)")
    args = parser.parse_args(argv)
    from scaletrain.data.synthetic import FrozenSetError

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


if __name__ == "__main__":
    raise SystemExit(main())
