"""Study 003, start to end: tune each arm's learning rate on a tuning seed, then train both arms on paired
evaluation seeds, then write the report. Re-running it skips finished jobs and resumes interrupted ones
(train.resume=auto), so the study survives being stopped.

    python experiments/003_reasoning_mixture/run.py [--root multirun/003_reasoning_mixture] [--dry-run]

Phases (each job is one `python -m scaletrain.run experiment=reasoning_mixture ...`):
  tune_adamw  seed 0, optim.lr on a 2x grid; widened by one point while the best is at an edge
  tune_muon   seed 0, the AdamW part of optim=muon at AdamW's best lr, optim.muon.lr on a 2x grid (widened alike)
  eval        seeds 1, 2, 3 for both tuned arms (a seed fixes the data order, so the arms are paired)
Chosen by the final val/reasoning/loss of the fully decayed run (exact match on 200 problems moves in steps of
0.005 and is noisier at the same budget). Written before any evaluation seed ran.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = "data.sources.tinystories.path=../shared/data/tinystories"
TUNE_SEED, EVAL_SEEDS = 0, (1, 2, 3)
ADAMW_GRID = [2e-3, 4e-3, 8e-3]
MUON_GRID = [4e-3, 8e-3, 1.6e-2]
MAX_WIDEN = 2
SELECT = "val/reasoning/loss"


def run_job(folder: Path, overrides: list[str], dry_run: bool) -> dict | None:
    """Train one job into `folder` unless it finished; the final validation metrics (summary.json's `val`)."""
    summary = folder / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())["val"]
    cmd = [sys.executable, "-m", "scaletrain.run", "experiment=reasoning_mixture", DATA, *overrides]
    cmd += [f"hydra.run.dir={folder}", "train.resume=auto"]  # a new folder starts fresh; a stopped one resumes
    print("$", " ".join(cmd[1:]), flush=True)
    if dry_run:
        return None
    subprocess.run(cmd, cwd=REPO, check=True)
    return json.loads(summary.read_text())["val"]


def tune(root: Path, name: str, key: str, grid: list[float], fixed: list[str], dry_run: bool) -> float | None:
    """The grid value with the lowest SELECT; the grid grows by 2x past an edge that wins (MAX_WIDEN times)."""
    results: dict[float, float] = {}
    grid = sorted(grid)
    for _ in range(MAX_WIDEN + 1):
        for lr in grid:
            if lr not in results:
                val = run_job(root / name / f"lr{lr:g}", [*fixed, f"{key}={lr:g}", f"train.seed={TUNE_SEED}"], dry_run)
                if val is None:
                    return None
                results[lr] = val[SELECT]
        best = min(results, key=results.__getitem__)
        if best == grid[0]:
            grid.insert(0, grid[0] / 2)
        elif best == grid[-1]:
            grid.append(grid[-1] * 2)
        else:
            break
    print(f"{name}: " + ", ".join(f"{key} {lr:g} -> {results[lr]:.4f}" for lr in sorted(results)) + f"; best {best:g}")
    (root / name / "choice.json").write_text(json.dumps({"key": key, "results": results, "best": best, "by": SELECT}))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO / "multirun" / "003_reasoning_mixture")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the next phase, run nothing")
    args = parser.parse_args()
    root = args.root.resolve()
    adamw_lr = tune(root, "tune_adamw", "optim.lr", ADAMW_GRID, ["optim=adamw"], args.dry_run)
    if adamw_lr is None:
        return 0
    muon_fixed = ["optim=muon", f"optim.lr={adamw_lr:g}"]
    muon_lr = tune(root, "tune_muon", "optim.muon.lr", MUON_GRID, muon_fixed, args.dry_run)
    if muon_lr is None:
        return 0
    arms = {"adamw": ["optim=adamw", f"optim.lr={adamw_lr:g}"], "muon": [*muon_fixed, f"optim.muon.lr={muon_lr:g}"]}
    for seed in EVAL_SEEDS:  # seed-major: an interrupted study still has paired seeds
        for arm, overrides in arms.items():
            run_job(root / "eval" / f"{arm}_s{seed}", [*overrides, f"train.seed={seed}"], args.dry_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
