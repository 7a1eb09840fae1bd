"""Arms against each other on each metric: paired over seeds when both arms ran the same seeds (a seed fixes
the data order in every arm), Welch otherwise; Holm's correction over the comparisons of one metric; a verdict
sentence generated from the numbers (stats.verdict)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scaletrain.report import stats
from scaletrain.report.collect import Arm, Metric

MAX_PAIRWISE_ARMS = 4  # up to 4 arms: all 6 pairs; more: each arm vs the baseline only


@dataclass
class Comparison:
    metric: Metric
    arm: str
    baseline: str
    test: stats.TTest | None  # None: no test possible (see sentence)
    sentence: str
    p_holm: float | None = None  # set when the metric has several comparisons
    missing: str = ""  # seeds left out (e.g. never reached a target)

    @property
    def diff(self) -> float | None:
        return None if self.test is None else self.test.diff

    @property
    def p(self) -> float | None:
        return None if self.test is None else self.test.p

    @property
    def significant(self) -> bool:
        p = self.p_holm if self.p_holm is not None else self.p
        return p is not None and p < stats.ALPHA


def _left_out(arm: Arm, metric: Metric) -> str:
    lost = [j.seed or f"job{j.num}" for j in arm.finished if j.value(metric) is None]
    if not lost:
        return ""
    why = "never reached the target" if metric.target is not None else f"have no {metric.key}"
    return f"{arm.label} seeds {', '.join(lost)} {why}"


def compare(arm: Arm, base: Arm, metric: Metric) -> Comparison:
    """`arm` minus `base` on `metric` (sentence without multiple-comparison correction; see `comparisons`)."""
    a, b = arm.by_seed(metric), base.by_seed(metric)
    head = f"{arm.label} vs {base.label}"
    missing = "; ".join(x for x in (_left_out(arm, metric), _left_out(base, metric)) if x)
    note = f" ({missing})" if missing else ""
    if not a or not b:
        empty = arm.label if not a else base.label
        return Comparison(
            metric,
            arm.label,
            base.label,
            None,
            f"{head}: no finished seed of {empty} has {metric.label}{note}; see Jobs not finished",
            missing=missing,
        )
    paired = set(a) == set(b) and len(a) >= 2
    try:
        if paired:
            seeds = sorted(a)
            test = stats.paired_test([a[s] for s in seeds], [b[s] for s in seeds])
        else:
            test = stats.welch_test(list(a.values()), list(b.values()))
    except ValueError as err:
        diff = sum(a.values()) / len(a) - sum(b.values()) / len(b)
        return Comparison(
            metric,
            arm.label,
            base.label,
            None,
            f"{head}: {metric.label} differs by {diff:+.4g} "
            f"({len(a)} vs {len(b)} seeds) but no test is possible: {err}{note}",
            missing=missing,
        )
    sentence = f"{head}: " + stats.verdict(arm.label, base.label, metric.label, metric.higher_is_better, test)
    return Comparison(metric, arm.label, base.label, test, sentence + note, missing=missing)


def comparisons(arms: Sequence[Arm], metric: Metric, baseline: str | None = None) -> list[Comparison]:
    """All pairs (later arm vs earlier arm) for a few arms; each arm vs the baseline for many, or when a baseline
    is named (default: the arm of the lowest job number). With several comparisons, p-values are Holm-adjusted
    over them and the sentences say so."""
    if baseline is not None and baseline not in {a.label for a in arms}:
        raise ValueError(f"baseline {baseline!r} is not an arm; arms: {[a.label for a in arms]}")
    if baseline is None and len(arms) <= MAX_PAIRWISE_ARMS:
        out = [compare(arms[j], arms[i], metric) for i in range(len(arms)) for j in range(i + 1, len(arms))]
    else:
        base = next(a for a in arms if a.label == baseline) if baseline else arms[0]
        out = [compare(a, base, metric) for a in arms if a is not base]
    tested = [(c, c.test) for c in out if c.test is not None]
    if len(tested) > 1:
        for (c, test), p in zip(tested, stats.holm([t.p for _, t in tested]), strict=True):
            c.p_holm = p
            note = f" ({c.missing})" if c.missing else ""
            verdict = stats.verdict(c.arm, c.baseline, c.metric.label, c.metric.higher_is_better, test, p)
            c.sentence = f"{c.arm} vs {c.baseline}: {verdict}{note}"
    return out
