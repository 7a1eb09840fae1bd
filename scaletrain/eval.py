"""Evaluate a finished run on any data config: `python -m scaletrain.eval RUN_DIR [data=<option>] [key=value ...]
[--checkpoint PATH] [--device cpu]` (console script `scaletrain-eval`).

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

from scaletrain import records
from scaletrain.checkpoint import CheckpointError
from scaletrain.config import ConfigError, to_dict
from scaletrain.runs import RunFolderError, config_of_run, load_run


def evaluate_run(run_dir: str | Path, overrides: list[str], checkpoint: str | None, device: str) -> dict:
    import torch

    from scaletrain import hardware
    from scaletrain.data import prepare_data
    from scaletrain.metrics import git_sha
    from scaletrain.trainer import evaluate, make_autocast

    cfg = config_of_run(Path(run_dir), overrides)  # checked before anything is loaded
    run = load_run(run_dir, checkpoint, device)
    data = prepare_data(cfg.data, tokenizer=run.tokenizer)  # the run's ids, whatever data.tokenizer says
    dev = torch.device(device)
    precision, _ = hardware.resolve_precision(cfg.train.precision, dev)
    metrics = evaluate(run.model, data, cfg, dev, make_autocast(precision, dev))
    weights = run.weights
    out = {
        "run_dir": str(Path(run_dir).resolve()),
        "weights": str(weights.resolve()),
        "step": run.step,
        "data": to_dict(cfg)["data"],
        "overrides": overrides,
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
    args = parser.parse_args(argv)
    from scaletrain.data import DataError

    try:
        out = evaluate_run(args.run_dir, args.overrides, args.checkpoint, args.device)
    except (RunFolderError, ConfigError, DataError, CheckpointError, OSError) as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    print(f"# {out['weights']} (step {out['step']}) on {out['data']['name']}")
    for key, value in out["metrics"].items():
        print(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
