"""Plots of a report: each metric's curve against tokens, training FLOPs and training time (each arm's mean over
seeds with a band of +- one standard error, each seed's own line faint), and MoE load balance.

matplotlib's Agg canvas through Figure directly: no pyplot, no global backend state.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from scaletrain.report.collect import Arm, JobStatus

if TYPE_CHECKING:
    from scaletrain.report import Report

FIG_SIZE_IN, FIG_DPI = (12, 8), 100  # every plot is 1200 x 800 pixels
AXES = {
    "tokens": "tokens seen",
    "flops": "training FLOPs (flops_per_token x tokens)",
    "seconds": "training time (s, sum of step times)",
}
LIVE = (JobStatus.finished, JobStatus.running, JobStatus.requeued)


def band(series: list[dict[int, tuple[float, float]]]) -> tuple[list[float], list[float], list[float]]:
    """Per step reached by any seed: mean x, mean y and the standard error of y over the seeds that reached it
    (0 with one seed)."""
    xs, mean, se = [], [], []
    for step in sorted({s for one in series for s in one}):
        points = [one[step] for one in series if step in one]
        ys = [y for _, y in points]
        xs.append(statistics.fmean(x for x, _ in points))
        mean.append(statistics.fmean(ys))
        se.append(statistics.stdev(ys) / math.sqrt(len(ys)) if len(ys) > 1 else 0.0)
    return xs, mean, se


def arm_series(arm: Arm, metric: str, axis: str) -> list[dict[int, tuple[float, float]]]:
    """One {step: (x, y)} per finished, running or requeued seed of `arm` with a `metric` curve; x is tokens,
    FLOPs or seconds. A seed without the x (no FLOPs per token yet, no step times) is left out."""
    fpts = [j.summary.flops_per_token for j in arm.finished if j.summary and j.summary.flops_per_token]
    series = []
    for job in arm.jobs:
        if job.status not in LIVE:
            continue
        fpt = (job.summary.flops_per_token if job.summary else None) or (fpts[0] if fpts else None)
        one = {}
        for p in job.curves.get(metric, []):
            x = {"tokens": p.tokens, "flops": None if fpt is None else p.tokens * fpt, "seconds": p.seconds}[axis]
            if x is not None:
                one[p.step] = (float(x), p.value)
        if one:
            series.append(one)
    return series


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_SIZE_IN, dpi=FIG_DPI)
    return fig, fig.add_subplot()


def plot_metric(report: Report, metric: str, axis: str, path: Path) -> Path | None:
    fig, ax = _figure()
    drawn = 0
    for arm in report.arms:
        series = arm_series(arm, metric, axis)
        if not series:
            continue
        xs, mean, se = band(series)
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=f"{arm.label} (n={len(series)})")
        color = line.get_color()
        lo, hi = [m - s for m, s in zip(mean, se, strict=True)], [m + s for m, s in zip(mean, se, strict=True)]
        ax.fill_between(xs, lo, hi, color=color, alpha=0.25, linewidth=0)
        for one in series:
            steps = sorted(one)
            ax.plot([one[s][0] for s in steps], [one[s][1] for s in steps], color=color, alpha=0.2, linewidth=1)
        drawn += 1
    if not drawn:
        return None
    if axis != "seconds" and not metric.endswith("exact_match"):
        ax.set_xscale("log")
    ax.set(
        xlabel=AXES[axis],
        ylabel=metric,
        title=f"{report.experiment or report.sweep_dir.name}: {metric} vs {AXES[axis].split(' (')[0]} "
        "(mean over seeds, +-1 standard error shaded, each seed faint)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path)  # no bbox_inches="tight": the file is exactly FIG_SIZE_IN * FIG_DPI pixels
    return path


def plot_moe(report: Report, path: Path) -> Path | None:
    fig, ax = _figure()
    drawn = 0
    for arm in report.arms:
        series = [{s: (float(s), v) for s, v in j.moe_load} for j in arm.jobs if j.status in LIVE and j.moe_load]
        if not series:
            continue
        xs, mean, se = band(series)
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=f"{arm.label} (n={len(series)})")
        lo, hi = [m - s for m, s in zip(mean, se, strict=True)], [m + s for m, s in zip(mean, se, strict=True)]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)
        drawn += 1
    if not drawn:
        return None
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="step", ylabel="max / mean tokens per expert (1 = balanced)", title="MoE load balance")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return path


def write_plots(report: Report, out: Path, metrics: list[str]) -> list[Path]:
    """`<metric>_vs_<axis>.png` for each metric and axis with data, train loss vs tokens, MoE balance."""
    written = []
    for metric in metrics:
        for axis in AXES:
            path = plot_metric(report, metric, axis, out / f"{metric.replace('/', '_')}_vs_{axis}.png")
            written += [path] if path else []
    path = plot_metric(report, "train/loss", "tokens", out / "train_loss_vs_tokens.png")
    written += [path] if path else []
    path = plot_moe(report, out / "moe_load_balance.png")
    return written + ([path] if path else [])
