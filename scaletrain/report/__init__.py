"""Sweep results -> per-arm table, verdicts with their statistics, per-seed raw results, plots, and the jobs that
did not finish.

Usage:
    python -m scaletrain.report multirun/2026-01-02/10-11-12        # one Hydra sweep directory
    python -m scaletrain.report --experiment dense_vs_moe [--root multirun]   # its latest sweep
    python -m scaletrain.report SWEEP --metric 'val/reasoning/exact_match>=0.3' --out experiments/003_x
    python -m scaletrain.report SWEEP --metric downstream/local_tinystories_cloze/acc   # an lm-eval task's metric
    python -m scaletrain.report experiments/003_x                    # rebuilt from committed runs.json
    python -m scaletrain.report --check experiments/003_x            # do report.md's verdicts match its data?

The package:
  collect.py  jobs of a sweep (status rules in its docstring), their summaries and curves, arms, metrics
  stats.py    paired / Welch t-tests, CIs, effect sizes, Holm, minimal detectable difference (scipy.stats)
  compare.py  arms against each other per metric, verdict sentences
  results.py  per-seed results a study commits (runs.json, runs.csv, curves.csv) and reading them back
  render.py   report.md
  plots.py    PNG plots
`build_report()` computes (no writes) and returns a `Report`; `write_report()` writes.
Not here: launching sweeps (Hydra), what a run logs (trainer.py / metrics.py), the names, states and fields of the
records (records.py, shared with their writers).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scaletrain import records
from scaletrain.report import render
from scaletrain.report.collect import (
    LOGGED,
    SEED_KEYS,
    SUMMARY_STATS,
    Arm,
    Job,
    JobStatus,
    Metric,
    MetricError,
    Point,
    Stat,
    check_metrics,
    check_residual_precision,
    collect_jobs,
    expected_overrides,
    find_latest_sweep,
    group_arms,
    judge,
    sweep_experiment,
    tokens_to_reach,
)
from scaletrain.report.compare import MAX_PAIRWISE_ARMS, Comparison, compare, comparisons
from scaletrain.report.plots import FIG_DPI, FIG_SIZE_IN, write_plots
from scaletrain.report.results import RUNS_JSON, read_results, write_results
from scaletrain.report.stats import TTest, holm, minimal_detectable, paired_test, welch_test

__all__ = [
    "FIG_DPI",
    "FIG_SIZE_IN",
    "MAX_PAIRWISE_ARMS",
    "SEED_KEYS",
    "SUMMARY_STATS",
    "Arm",
    "Comparison",
    "Job",
    "JobStatus",
    "Metric",
    "Point",
    "Report",
    "Stat",
    "TTest",
    "MetricError",
    "build_report",
    "check_metrics",
    "check_report",
    "collect_jobs",
    "compare",
    "comparisons",
    "expected_overrides",
    "find_latest_sweep",
    "group_arms",
    "holm",
    "judge",
    "main",
    "minimal_detectable",
    "paired_test",
    "tokens_to_reach",
    "welch_test",
    "write_report",
]

DEFAULT_METRIC = Metric(records.VAL_LOSS)


@dataclass
class Report:
    sweep_dir: Path
    experiment: str | None
    axes: list[str]  # override keys that differ between arms
    arms: list[Arm]
    metrics: list[Metric]  # compared, in this order
    comparisons: list[Comparison]
    jobs: list[Job]
    baseline: str | None = None
    from_results: bool = False  # read from runs.json / curves.csv rather than run folders

    @property
    def unfinished(self) -> list[Job]:
        return [j for j in self.jobs if j.status != JobStatus.finished]

    def arm(self, label: str) -> Arm:
        for a in self.arms:
            if a.label == label:
                return a
        raise KeyError(f"no arm {label!r}; arms: {[a.label for a in self.arms]}")

    def markdown(self, plots: list[str] | tuple[str, ...] = ()) -> str:
        return render.markdown(self, plots)


def _default_metrics(jobs: list[Job]) -> list[Metric]:
    """val/loss, then every exact-match metric some finished job reports."""
    keys = {k for j in jobs if j.summary for k in j.summary.val if k.endswith("exact_match")}
    return [DEFAULT_METRIC, *(Metric(k) for k in sorted(keys))]


MATCHED_AXES = ("flops", "seconds")  # besides tokens, the budgets each final metric is also compared at


def _budget_metrics(arms: list[Arm], metrics: list[Metric]) -> list[Metric]:
    """Each final metric again at equal FLOPs (model + optimizer) and at equal training time: read off each
    seed's curve at the smallest total any finished seed spent (so every seed has the point)."""
    jobs = [j for a in arms for j in a.finished]
    out = []
    for axis in MATCHED_AXES:
        totals = [j.total(axis) for j in jobs]
        if len(arms) < 2 or not jobs or any(t is None for t in totals):
            continue
        budget = min(t for t in totals if t is not None)
        out += [Metric(m.key, at=axis, budget=budget) for m in metrics if m.target is None and m.key.startswith(LOGGED)]
    return out


def build_report(
    sweep_dir: str | Path,
    baseline: str | None = None,
    stale_after_s: float = 1800.0,
    now: float | None = None,
    metrics: list[Metric | str] | None = None,
    label_of: Callable[[Job], str | None] | None = None,
) -> Report:
    """Read a sweep directory (or a folder of committed per-seed results: runs.json) into a Report; writes
    nothing. `baseline` names an arm label; `metrics` adds to val/loss and the exact-match metrics (each is also
    compared at equal FLOPs and equal training time); `label_of` names a job's arm (default: the overrides that
    differ between arms)."""
    sweep_dir = Path(sweep_dir).resolve()
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep directory at {sweep_dir}")
    from_results = (sweep_dir / RUNS_JSON).exists() and not (sweep_dir / "multirun.yaml").exists()
    jobs = read_results(sweep_dir) if from_results else collect_jobs(sweep_dir, now, stale_after_s)
    if not jobs:
        raise FileNotFoundError(f"no jobs in {sweep_dir} (no .hydra/overrides.yaml or config.json below it)")
    if label_of is not None:
        for job in jobs:
            job.label = label_of(job)
    arms, axes = group_arms(jobs)
    check_residual_precision(arms)  # runs in different numerics are different experiments
    chosen = _default_metrics(jobs)
    given = [Metric.parse(m) if isinstance(m, str) else m for m in metrics or []]
    check_metrics(given, jobs)  # a misspelt name fails here, naming the nearest, rather than rendering '—'
    chosen += [m for m in dict.fromkeys(given) if m not in chosen]
    chosen += _budget_metrics(arms, chosen)
    comps = [c for m in chosen for c in comparisons(arms, m, baseline)] if len(arms) > 1 else []
    experiment = None if from_results else sweep_experiment(sweep_dir, jobs)
    return Report(sweep_dir, experiment, axes, arms, chosen, comps, jobs, baseline, from_results)


def write_report(
    report: Report, out_dir: str | Path | None = None, plots: bool = True, results: bool = True
) -> list[Path]:
    """Write the plots, the per-seed results (unless read from them) and report.md (into the sweep directory by
    default); returns the paths written, report.md first."""
    out = Path(out_dir) if out_dir is not None else report.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(m.key for m in report.metrics if m.target is None and m.at is None))
    written = write_plots(report, out, keys) if plots else []
    data = write_results(report.arms, out) if results and not report.from_results else []
    md = out / "report.md"
    md.write_text(report.markdown([p.name for p in written]))
    return [md, *written, *data]


def recorded_options(folder: Path) -> dict | None:
    """The options a folder's report.md was built with, where the folder holds per-seed results and a report
    written by this version (a run sweep's report is rebuilt from the command line alone)."""
    report = folder / "report.md"
    if not ((folder / RUNS_JSON).is_file() and report.is_file()):
        return None
    return render.read_options(report.read_text())


def check_report(folder: str | Path) -> list[str]:
    """Problems found rebuilding `folder/report.md`'s verdicts from the per-seed results beside it (empty: the
    verdicts match the data)."""
    folder = Path(folder)
    try:
        text = (folder / "report.md").read_text()
    except OSError as err:
        return [f"{folder / 'report.md'}: {err.strerror}"]
    options = render.read_options(text)
    if options is None:
        return [f"{folder / 'report.md'} has no '{render.OPTIONS_TAG.strip()}' line: not written by this version"]
    fresh = build_report(folder, options.get("baseline"), metrics=options.get("metrics"))
    if not fresh.from_results:
        return [f"{folder} holds no {RUNS_JSON}: nothing to check the verdicts against"]
    committed, rebuilt = render.verdict_lines(text), render.verdict_lines(fresh.markdown())
    problems = [f"not supported by the data: {line}" for line in committed if line not in rebuilt]
    problems += [f"missing from report.md: {line}" for line in rebuilt if line not in committed]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scaletrain.report", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("sweep_dir", nargs="?", help="a Hydra multirun directory, or a folder with runs.json")
    parser.add_argument("--experiment", help="report the latest sweep under --root whose jobs ran this experiment")
    parser.add_argument("--root", default="multirun", help="where --experiment looks (default: multirun)")
    parser.add_argument(
        "--baseline",
        help="arm label every other arm is compared with (default: all pairs "
        f"up to {MAX_PAIRWISE_ARMS} arms, else the arm of job 0)",
    )
    parser.add_argument(
        "--metric",
        action="append",
        default=[],
        help="also compare on this metric (repeatable): a summary field, a val/... or downstream/... key (a "
        "downstream metric's table cell adds the task's own stderr), or a target such as "
        "'val/reasoning/exact_match>=0.3' (tokens to reach it). val/loss and exact-match metrics always are",
    )
    parser.add_argument("--out", help="write report.md, plots and per-seed results here (default: the sweep)")
    parser.add_argument(
        "--stale-after-min",
        type=float,
        default=30.0,
        help="a job silent this long without summary or error is 'stopped' (default: 30)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write report.md (and per-seed results) only")
    parser.add_argument("--check", metavar="FOLDER", help="check FOLDER/report.md's verdicts against its runs.json")
    args = parser.parse_args(argv)
    if args.check:
        try:
            problems = check_report(args.check)
        except (FileNotFoundError, ValueError) as err:
            problems = [str(err)]
        for p in problems:
            print(f"report check: {p}", file=sys.stderr)
        print(f"{args.check}: verdicts {'match' if not problems else 'DO NOT match'} the per-seed results")
        return 1 if problems else 0
    if (args.sweep_dir is None) == (args.experiment is None):
        parser.error("give a sweep directory or --experiment NAME (one of the two)")
    try:
        sweep = Path(args.sweep_dir) if args.sweep_dir else find_latest_sweep(args.root, args.experiment)
        baseline, metrics = args.baseline, list(args.metric)
        recorded = recorded_options(sweep)
        if recorded:  # a committed study folder: rebuilt with what it was built with, plus anything asked now
            baseline = baseline or recorded.get("baseline")
            metrics = [*recorded.get("metrics", []), *(m for m in metrics if m not in recorded.get("metrics", []))]
        report = build_report(sweep, baseline, args.stale_after_min * 60, metrics=metrics)
    except (FileNotFoundError, ValueError) as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    paths = write_report(report, args.out, plots=not args.no_plots)
    print(report.markdown([p.name for p in paths[1:] if p.suffix == ".png"]))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
