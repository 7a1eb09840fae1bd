"""Tests over seeds, through scipy.stats: paired and Welch t-tests with the 95% CI of the mean difference, effect
sizes, Holm's correction, the minimal detectable difference at a given power, and the sentence that states
what the numbers support.

Pure functions of lists of floats: nothing here knows about jobs or files (collect.py) or markdown (render.py).
Conventions: a difference is mean(a) - mean(b), "a" being the arm and "b" the baseline; tests are two-sided at
`alpha` (0.05); power is 0.8.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import optimize, stats

ALPHA, POWER = 0.05, 0.8


@dataclass(frozen=True)
class TTest:
    """One two-sample comparison. `se` and `dof` are those of the difference's t statistic, so that
    `ci = diff -+ t_{1-alpha/2, dof} * se` and the minimal detectable difference uses the same pair."""

    test: str  # "paired t" | "Welch t"
    n_a: int
    n_b: int
    diff: float  # mean(a) - mean(b)
    se: float
    dof: float
    t: float
    p: float  # two-sided
    ci: tuple[float, float]  # 95% confidence interval of diff
    effect: float  # paired: Cohen's d_z = mean(d) / sd(d); Welch: Cohen's d with the pooled sd
    mde: float  # smallest |true difference| detected with probability POWER at ALPHA, given se and dof

    @property
    def excluded_beyond(self) -> float:
        """Differences larger than this (either sign) lie outside the 95% CI: the equivalence statement."""
        return max(abs(self.ci[0]), abs(self.ci[1]))


def minimal_detectable(se: float, dof: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The true difference delta whose two-sided t-test rejects with probability `power`: the test statistic is
    noncentral t with noncentrality delta / se, so solve P(|T'| > t_crit) = power for delta (as statsmodels'
    TTestPower does with effect size delta / sd and nobs)."""
    crit = float(stats.t.ppf(1 - alpha / 2, dof))

    def shortfall(nc: float) -> float:
        lower = float(stats.nct.cdf(-crit, dof, nc))  # the far tail; scipy returns nan where it underflows
        return float(stats.nct.sf(crit, dof, nc)) + (0.0 if math.isnan(lower) else lower) - power

    hi = crit + 4.0
    while shortfall(hi) < 0:  # low dof need a large noncentrality: widen until bracketed
        hi *= 2
    root = optimize.brentq(shortfall, 0.0, hi, xtol=1e-12, full_output=False)
    return float(root) * se  # pyright: ignore[reportArgumentType]  # a float when full_output is False


def _from_scipy(test: str, res, a: Sequence[float], b: Sequence[float], diff: float, se: float, effect: float) -> TTest:
    """A TTest from scipy's TtestResult (statistic, p-value, dof and the CI all from scipy)."""
    t, dof = float(res.statistic), float(res.df)
    ci = res.confidence_interval(1 - ALPHA)
    return TTest(
        test,
        len(a),
        len(b),
        diff,
        se,
        dof,
        t,
        float(res.pvalue),
        (float(ci.low), float(ci.high)),
        effect,
        minimal_detectable(se, dof),
    )


def paired_test(a: Sequence[float], b: Sequence[float]) -> TTest:
    """Paired t-test over seeds (a[i] and b[i] share seed i, hence the data order). ValueError for fewer than 2
    pairs, unequal lengths, or identical differences (zero variance: nothing to test)."""
    if len(a) != len(b):
        raise ValueError(f"a paired test needs one value per seed in each arm, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError("a paired test needs at least 2 seeds")
    d = [x - y for x, y in zip(a, b, strict=True)]
    sd = statistics.stdev(d)
    if sd == 0.0:
        raise ValueError("every seed gave the same difference (zero variance)")
    mean = statistics.fmean(d)
    se = sd / math.sqrt(len(d))
    return _from_scipy("paired t", stats.ttest_rel(a, b), a, b, mean, se, mean / sd)


def welch_test(a: Sequence[float], b: Sequence[float]) -> TTest:
    """Welch's unequal-variance t-test (unpaired seeds). ValueError for fewer than 2 values in a sample or
    zero variance in both."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's test needs at least 2 values per sample")
    va, vb = statistics.variance(a), statistics.variance(b)
    if va == 0.0 and vb == 0.0:
        raise ValueError("both samples have zero variance")
    pooled = math.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2))
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va / len(a) + vb / len(b))
    return _from_scipy("Welch t", stats.ttest_ind(a, b, equal_var=False), a, b, diff, se, diff / pooled)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order: the i-th smallest p times (m - i), made monotone
    non-decreasing in that order and capped at 1 (reject where adjusted p < alpha)."""
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: pvalues[k])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def fmt_p(p: float) -> str:
    return "p<0.0001" if p < 1e-4 else f"p={p:.2g}"


def verdict(
    name_a: str, name_b: str, metric: str, higher_is_better: bool, test: TTest, p_adjusted: float | None = None
) -> str:
    """The sentence a reader takes away, generated from the numbers only: which arm is better when the
    (Holm-adjusted) p is below ALPHA, otherwise which differences the data exclude and which the study could
    have detected. Never "neither better nor worse" from a wide interval."""
    p = test.p if p_adjusted is None else p_adjusted
    lo, hi = test.ci
    stated = (
        f"{metric} {name_a} - {name_b} = {test.diff:+.4g} (95% CI {lo:+.4g} to {hi:+.4g}; {test.test} over "
        f"{test.n_a}"
        + ("" if test.test == "paired t" else f" vs {test.n_b}")
        + f" seeds, {fmt_p(test.p)}"
        + ("" if p_adjusted is None else f", Holm-adjusted {fmt_p(p_adjusted)}")
        + f"; effect size {test.effect:+.2g})"
    )
    if p < ALPHA:
        better = name_a if (test.diff > 0) == higher_is_better else name_b
        return f"{better} is better: {stated}."
    return (
        f"no difference detected: {stated}; differences larger than {test.excluded_beyond:.3g} in either direction "
        f"are excluded, and this many seeds detect a true difference of {test.mde:.3g} with {POWER:.0%} power."
    )
