"""report.md: header, the per-arm table, the verdicts per metric, the jobs not finished, the plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from scaletrain import records
from scaletrain.report import stats
from scaletrain.report.collect import DOWNSTREAM, SEED_KEYS, STDERR, Arm, JobStatus, Metric, Stat

if TYPE_CHECKING:
    from scaletrain.report import Report

OPTIONS_TAG = "<!-- scaletrain.report options: "
VERDICTS = "## Verdicts"


def fmt_si(x: float | None) -> str:
    if x is None:
        return "—"
    for div, unit in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def fmt_pm(stat: Stat, fmt: str = ".4f") -> str:
    if stat.mean is None:
        return "—"
    return f"{stat.mean:{fmt}}" + (f" ± {stat.std:{fmt}}" if stat.std is not None else "")


def options_line(r: Report) -> str:
    """What the report was built with, so `--check` can rebuild it from the committed results."""
    given = [m.text for m in r.metrics if m.at is None]  # budget metrics are derived again from the data
    return OPTIONS_TAG + json.dumps({"metrics": given, "baseline": r.baseline}) + " -->"


def read_options(markdown: str) -> dict | None:
    for line in markdown.splitlines():
        if line.startswith(OPTIONS_TAG):
            return json.loads(line[len(OPTIONS_TAG) : -len(" -->")])
    return None


def verdict_lines(markdown: str) -> list[str]:
    """The verdict bullets of a report.md (what --check compares)."""
    lines, inside = [], False
    for line in markdown.splitlines():
        if line.startswith("## "):
            inside = line == VERDICTS
        elif inside and line.startswith("- "):
            lines.append(line)
    return lines


def header(r: Report) -> str:
    counts = {s: sum(j.status == s for j in r.jobs) for s in JobStatus}
    lines = [f"# Report: {r.sweep_dir.name}", "", options_line(r), ""]
    if r.experiment:
        lines.append(f"Experiment: `{r.experiment}`  ")
    source = "per-seed results (runs.json, curves.csv)" if r.from_results else "run folders"
    lines.append(f"Read from {source} in `{r.sweep_dir}`  ")
    lines.append(f"Jobs: {len(r.jobs)} (" + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ")  ")
    lines.append(
        f"Arms differ in: {', '.join(f'`{k}`' for k in r.axes) or 'nothing (one arm)'}; "
        f"seeds (`{'`, `'.join(SEED_KEYS)}`) are replicates.  "
    )
    shared = sorted(set.intersection(*(set(a.overrides) for a in r.arms))) if r.arms else []
    if shared:
        lines.append("Shared overrides: " + " ".join(f"`{o}`" for o in shared))
    return "\n".join(lines) + "\n"


def task_stderr(arm: Arm, metric: Metric) -> Stat | None:
    """A downstream metric's own standard error as the harness computed it (over the task's examples), per finished
    seed that recorded it; None for other metrics and where no seed did. The seed spread beside it is another
    noise: the training's."""
    if metric.target is not None or metric.at is not None or not metric.key.startswith(DOWNSTREAM):
        return None
    stat = arm.stat(Metric(metric.key + STDERR))
    return stat if stat.n else None


def _cell(r: Report, arm: Arm, metric: Metric) -> str:
    stat = arm.stat(metric)
    if metric.target is not None:
        reached = f" ({stat.n}/{len(arm.finished)} reached)" if stat.n < len(arm.finished) else ""
        return (fmt_si(stat.mean) + (f" ± {fmt_si(stat.std)}" if stat.std is not None else "")) + reached
    stderr = task_stderr(arm, metric)
    return fmt_pm(stat) + (f" (task stderr {stderr.mean:.4f})" if stderr is not None else "")


def arm_table(r: Report) -> str:
    extra = [
        m
        for m in r.metrics
        if m.at is None and (m.key not in (records.VAL_LOSS, records.VAL_BPB) or m.target is not None)
    ]
    head = ["arm", "seeds finished", "val loss", "val bpb", *(m.label for m in extra)]
    head += ["tokens", "model FLOPs", "optimizer FLOPs", "train time (s)", "CPU time (s)", "params total"]
    head += ["params active"]
    stderr = any(task_stderr(a, m) is not None for a in r.arms for m in extra)
    rows = [
        "## Results per arm",
        "",
        "Finished seeds only: mean ± sample standard deviation (n - 1) over seeds; tokens, FLOPs and parameters are "
        "means. Model FLOPs: 6 x active parameters + attention, per token; optimizer FLOPs: Muon's Newton-Schulz "
        "iterations (0 for AdamW); train time: the training loop's wall clock, CPU time: the training process's "
        "(rank 0, all threads), both over every attempt."
        + (
            " Task stderr: lm-evaluation-harness's own standard error of a downstream metric over the task's "
            "examples, mean over the seeds (the ± beside it is the spread over seeds)."
            if stderr
            else ""
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for a in r.arms:
        s = a.summary_stat
        cells = [a.label, f"{len(a.finished)}/{len(a.jobs)}"]
        cells += [fmt_pm(s(lambda x: x.val_loss)), fmt_pm(s(lambda x: x.val_bpb))]
        cells += [_cell(r, a, m) for m in extra]
        cells += [fmt_si(s(lambda x: x.tokens_seen).mean), fmt_si(s(lambda x: x.flops).mean)]
        cells += [fmt_si(s(lambda x: x.optimizer_flops).mean), fmt_pm(s(lambda x: x.wallclock_s), ".1f")]
        cells += [fmt_pm(s(lambda x: x.cpu_s), ".1f"), fmt_si(s(lambda x: x.params_total).mean)]
        cells += [fmt_si(s(lambda x: x.params_active).mean)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _budget_note(r: Report) -> str:
    """What the final values compare: equal tokens, or each arm at the end of its own budget."""
    tokens = {a.summary_stat(lambda s: s.tokens_seen).mean for a in r.arms if a.finished}
    readings = (
        "'at equal flops' (model + optimizer) and 'at equal seconds' (training time) read each seed's curve at the "
        "smallest total any seed spent"
    )
    if len(tokens) <= 1:
        check = "so the verdict at equal tokens can be checked against them."
        return f"Every arm sees the same tokens; {readings}, {check}"
    return (
        "The arms trained different numbers of tokens (a study matched in FLOPs or time: its tuning.md gives each "
        "arm's steps), so the final values compare each arm at the end of its own fully decayed run; "
        f"{readings} (mid-schedule for the longer arm, which favours the shorter one)."
    )


def verdict_section(r: Report) -> str:
    lines = [
        VERDICTS,
        "",
        f"Arm minus baseline. Paired t-test over seeds when both arms ran the same seeds (a seed fixes the data "
        f"order), Welch's t-test otherwise (scipy.stats); 95% confidence intervals; Holm-adjusted p-values where a "
        f"metric has several comparisons; significant at {stats.ALPHA}. The detectable difference is the true "
        f"difference the same number of seeds would detect with {stats.POWER:.0%} power at this spread. "
        + _budget_note(r),
        "",
    ]
    if len(r.arms) < 2:
        return "\n".join([*lines, "Only one arm: nothing to compare."]) + "\n"
    for metric in r.metrics:
        lines += [f"### {metric.label} ({'higher' if metric.higher_is_better else 'lower'} is better)", ""]
        lines += [f"- {c.sentence}" for c in r.comparisons if c.metric == metric]
        lines.append("")
    return "\n".join(lines)


def unfinished_section(r: Report) -> str:
    if not r.unfinished:
        return f"## Jobs not finished\n\nNone: every job wrote {records.SUMMARY_FILE}.\n"
    arm_of = {id(j): a.label for a in r.arms for j in a.jobs}
    rows = [
        "## Jobs not finished",
        "",
        "failed: the job recorded an error (status.json, submitit), or a later job of a sequential "
        "basic-launcher sweep started; running: written to recently; requeued: preempted, waits in the "
        "scheduler's queue to resume from its checkpoint; died: its process on this host is gone without a record "
        "(kill -9, out of memory); stopped: interrupted, or silent for too long with "
        "no error record; pending: in the sweep grid, no directory yet.",
        "",
        "| job | status | arm | seed | last step | detail | directory |",
        "|---|---|---|---|---|---|---|",
    ]
    for j in r.unfinished:
        max_steps = j.config.get("train", {}).get("max_steps")
        step = "—" if j.last_step is None else f"{j.last_step}" + (f"/{max_steps}" if max_steps else "")
        detail = j.detail.replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| {'?' if j.num is None else j.num} | {j.status} | {arm_of.get(id(j), '—')} "
            f"| {j.seed or '—'} | {step} | {detail} | {j.dir or '—'} |"
        )
    return "\n".join(rows) + "\n"


def markdown(r: Report, plots: Sequence[str] = ()) -> str:
    parts = [header(r), arm_table(r), verdict_section(r), unfinished_section(r)]
    if plots:
        parts.append(
            "## Plots\n\nEach arm's mean over its finished and running seeds at each evaluated step, ± one standard "
            "error shaded, each seed's own curve faint.\n\n"
            + "\n".join(f"![{Path(p).stem}]({p})" for p in plots)
            + "\n"
        )
    return "\n".join(parts)
