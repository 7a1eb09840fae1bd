"""Sweep report: the statistics, arms, verdicts, targets, per-seed results and their check, plots, unfinished jobs,
the CLI.

Synthetic sweeps are written by hand (the files a job writes, through records.py's writers, see
trainer.py) with known numbers; one slow test runs a real 2x2 multirun through `python -m scaletrain.run -m`
and reads it back. The contract between the trainer's records and the report is tested in test_records.py.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaletrain import records
from scaletrain import report as rp
from scaletrain.report import render

from .conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NOW = 1_800_000_000.0  # a fixed "now" so running / stopped do not depend on the wall clock


def write_job(
    sweep: Path,
    num: int,
    overrides: list[str],
    val_loss: float | None = None,
    *,
    curve: list[tuple[int, float]] = ((5, 6.0), (10, 5.5)),
    moe: list[tuple[int, float]] = (),
    mtime: float = NOW - 3600.0,
    experiment: str | None = None,
    val_curve: dict[str, list[float]] | None = None,
    **summary_extra,
) -> Path:
    """A job directory as Hydra + the trainer leave it; no summary.json when val_loss is None."""
    job = sweep / f"{num}_{','.join(o for o in overrides if '/' not in o)}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    seed = int(next(o.split("=")[1] for o in overrides if o.startswith("train.seed=")))
    (job / "config.json").write_text(json.dumps({"experiment": experiment, "train": {"seed": seed, "max_steps": 10}}))
    tokens_per_step = 512
    lines = [{"step": 0, "params/total": 1000}]
    for i, (step, loss) in enumerate(curve):
        lines.append(
            {"step": step, "train/loss": loss + 0.1, "train/tokens": step * tokens_per_step, "perf/step_s": 0.5}
        )
        extra = {key: values[i] for key, values in (val_curve or {}).items()}
        lines.append({"step": step, "val/loss": loss, "val/bpb": loss / 2, **extra})
        lines.append({"step": step, "samples": ["Once upon a time"]})
    lines += [{"step": step, "moe/load_max_over_mean": v} for step, v in moe]
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if val_loss is not None:
        last = curve[-1][0]
        records.write_summary(
            job,
            records.Summary(
                step=last,
                tokens_seen=last * tokens_per_step,
                val_loss=val_loss,
                val_bpb=val_loss / 2,
                params_total=2_000_000,
                params_active=1_000_000,
                params_embedding=500_000,
                params_non_embedding=1_500_000,
                flops_per_token=1e6,
                flops=1e6 * last * tokens_per_step,
                wallclock_s=60.0 + num,
                run_name=job.name,
                wandb_id=None,
                **summary_extra,
            ),
        )
    for path in [*job.rglob("*"), job]:
        os.utime(path, (mtime, mtime))
    return job


def two_arm_sweep(sweep: Path, losses: dict[str, list[float]]) -> Path:
    """Arms `model=<name>` x seeds 1..n, jobs numbered seed-major as Hydra's basic sweeper does."""
    names = list(losses)
    n_seeds = len(losses[names[0]])
    for seed in range(n_seeds):
        for i, name in enumerate(names):
            write_job(
                sweep,
                seed * len(names) + i,
                [f"model={name}", f"train.seed={seed + 1}", "train.max_steps=10"],
                losses[name][seed],
            )
    return sweep


def at_equal_tokens(r, key: str) -> list:
    """The comparisons of final `key` (the report also compares it at equal FLOPs and equal time)."""
    return [c for c in r.comparisons if c.metric == rp.Metric(key)]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which PNG requires to come right after the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    length, chunk = struct.unpack(">I4s", head[8:16])
    assert (length, chunk) == (13, b"IHDR")
    return struct.unpack(">II", head[16:24])


# ----------------------------------------------------------------------------------------------------
# Statistics (scipy.stats underneath; checked against closed forms and independent integrals)


# Tolerances below: scipy and the closed forms evaluate the same expressions in float64 from the same inputs, so
# they agree to a few ulps per operation (~1e-15 relative) times a few dozen operations, and the t quantile comes
# from an iterative inverse good to ~1e-12 relative; rel=1e-10 leaves a margin of 100 over that, on any CPU.


def test_paired_test_on_fixed_inputs_matches_the_hand_computation():
    a, b = [1.0, 2.1, 3.3], [0.5, 1.0, 2.0]
    t = rp.paired_test(a, b)
    d = [0.5, 1.1, 1.3]  # differences; mean 29/30, sd from the (n - 1) variance
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    se = sd / math.sqrt(3)
    assert (t.test, t.dof, t.n_a) == ("paired t", 2.0, 3)
    assert t.diff == pytest.approx(mean, abs=1e-15) and t.se == pytest.approx(se, rel=1e-12)
    assert t.t == pytest.approx(mean / se, rel=1e-12)
    # two dof: P(|T| > t) = 1 - t / sqrt(2 + t^2), and t_{0.975, 2} = 4.302652729749464 (closed form below)
    assert t.p == pytest.approx(1 - t.t / math.sqrt(2 + t.t**2), rel=1e-10)
    crit = math.sqrt(2 / (1 - 0.95**2) - 2)  # solves 1 - c / sqrt(2 + c^2) = 0.05
    assert t.ci == pytest.approx((mean - crit * se, mean + crit * se), rel=1e-10)
    assert t.effect == pytest.approx(mean / sd, rel=1e-12)  # Cohen's d_z


def test_welch_test_on_fixed_inputs_matches_the_hand_computation():
    w = rp.welch_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0])
    va, vb = 1.0 / 3, (5.0 / 3) / 4  # sample variances 1 and 5/3, over n
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    assert (w.test, w.diff) == ("Welch t", -3.5)
    assert w.se == pytest.approx(se, rel=1e-12) and w.dof == pytest.approx(dof, rel=1e-12)
    assert w.t == pytest.approx(-3.5 / se, rel=1e-12)
    pooled = math.sqrt((2 * 1.0 + 3 * 5.0 / 3) / 5)
    assert w.effect == pytest.approx(-3.5 / pooled, rel=1e-12)


def test_a_p_value_of_five_percent_puts_the_ci_bound_on_zero():
    # 2 dof paired: t = c exactly gives p = 0.05, and the CI's upper bound is then 0
    c = math.sqrt(2 / (1 - 0.95**2) - 2)
    d = [-1.0, 0.0, 1.0]  # sd 1, se 1/sqrt(3); shift so that mean / se = -c
    shift = -c / math.sqrt(3)
    t = rp.paired_test([x + shift for x in d], [0.0, 0.0, 0.0])
    assert t.p == pytest.approx(0.05, abs=1e-12) and t.ci[1] == pytest.approx(0.0, abs=1e-12)


def test_tests_refuse_what_cannot_be_tested():
    with pytest.raises(ValueError, match="at least 2"):
        rp.paired_test([1.0], [2.0])
    with pytest.raises(ValueError, match="one value per seed"):
        rp.paired_test([1.0, 2.0], [2.0])
    with pytest.raises(ValueError, match="same difference"):
        rp.paired_test([1.0, 2.0], [0.5, 1.5])
    with pytest.raises(ValueError, match="at least 2"):
        rp.welch_test([1.0], [2.0, 3.0])


def test_holm_on_fixed_p_values():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06
    assert rp.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06], abs=1e-15)
    assert rp.holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert rp.holm([0.2]) == [0.2]


def test_minimal_detectable_difference_is_z_sum_for_many_dof_and_has_80_percent_power_for_few():
    from scipy import integrate, stats

    assert rp.minimal_detectable(1.0, 1e7) == pytest.approx(stats.norm.ppf(0.975) + stats.norm.ppf(0.8), rel=1e-5)
    # 2 dof: power at the returned noncentrality, integrated independently of scipy's noncentral t:
    # T' = (Z + nc) / sqrt(V / dof), V ~ chi2(dof); reject when |T'| > crit
    dof, se = 2, 0.5
    nc = rp.minimal_detectable(se, dof) / se
    crit = stats.t.ppf(0.975, dof)

    def reject_given_v(v):
        s = crit * math.sqrt(v / dof)
        return (stats.norm.sf(s - nc) + stats.norm.cdf(-s - nc)) * stats.chi2.pdf(v, dof)

    power, err = integrate.quad(reject_given_v, 0, math.inf)
    # brentq solves the noncentrality to xtol 1e-12 (power moves ~0.3 per unit of it there) and quad reports
    # its own error estimate: 1e-7 is far above both
    assert err < 1e-8 and power == pytest.approx(0.8, abs=1e-7)


def test_verdicts_say_which_arm_is_better_or_what_is_excluded():
    clear = rp.paired_test([2.80, 2.83, 2.84], [3.10, 3.12, 3.15])
    text = rp.stats.verdict("moe", "dense", "val/loss", False, clear)
    assert text.startswith("moe is better: val/loss moe - dense = -0.3 (95% CI ")
    acc = rp.stats.verdict("moe", "dense", "val/x/exact_match", True, clear)  # lower value, higher is better
    assert acc.startswith("dense is better")
    noisy = rp.paired_test([3.10, 3.20, 3.00], [3.05, 3.25, 3.12])
    text = rp.stats.verdict("gelu", "relu", "val/loss", False, noisy)
    assert text.startswith("no difference detected: ") and "neither" not in text
    assert f"differences larger than {noisy.excluded_beyond:.3g} in either direction are excluded" in text
    assert f"detect a true difference of {noisy.mde:.3g} with 80% power" in text
    assert noisy.excluded_beyond == max(abs(noisy.ci[0]), abs(noisy.ci[1]))
    # Holm: the adjusted p decides
    assert rp.stats.verdict("moe", "dense", "val/loss", False, clear, p_adjusted=0.2).startswith("no difference")


# ----------------------------------------------------------------------------------------------------
# Arms, table and verdicts


def test_table_has_one_arm_per_ablated_value_with_exact_means_and_stds(tmp_path):
    two_arm_sweep(tmp_path, {"baseline_10m": [3.10, 3.12, 3.14], "moe_8x": [2.80, 2.85, 2.90]})
    r = rp.build_report(tmp_path, now=NOW)
    assert r.axes == ["model"]
    assert [a.label for a in r.arms] == ["baseline_10m", "moe_8x"]
    base, moe = r.arm("baseline_10m"), r.arm("moe_8x")
    assert [len(base.finished), len(moe.finished)] == [3, 3]
    assert base.stat("val_loss").mean == pytest.approx(3.12, abs=1e-12)
    assert base.stat("val_loss").std == pytest.approx(0.02, abs=1e-12)
    assert moe.stat("val_loss").mean == pytest.approx(2.85, abs=1e-12)
    assert moe.stat("val_loss").std == pytest.approx(0.05, abs=1e-12)
    assert moe.stat("val_bpb").mean == pytest.approx(1.425, abs=1e-12)
    assert moe.stat("wallclock_s").values == (61.0, 63.0, 65.0)  # 60 + job number 1, 3, 5
    assert (moe.stat("tokens_seen").mean, moe.stat("params_active").mean) == (5120, 1_000_000)
    md = r.markdown()
    assert "| baseline_10m | 3/3 | 3.1200 ± 0.0200 | 1.5600 ± 0.0100 | 5.12K | 5.12G |" in md
    assert "| moe_8x | 3/3 | 2.8500 ± 0.0500 |" in md


def test_arms_on_the_same_seeds_are_compared_paired_and_the_better_arm_named(tmp_path):
    two_arm_sweep(tmp_path, {"baseline_10m": [3.10, 3.12, 3.15], "moe_8x": [2.80, 2.83, 2.84]})
    r = rp.build_report(tmp_path, now=NOW)
    (c,) = at_equal_tokens(r, "val/loss")
    assert (c.arm, c.baseline, c.metric) == ("moe_8x", "baseline_10m", rp.Metric("val/loss"))
    expected = rp.paired_test([2.80, 2.83, 2.84], [3.10, 3.12, 3.15])  # seeds 1, 2, 3 paired
    assert c.test == expected and c.p_holm is None
    assert c.diff == pytest.approx(-0.30, abs=1e-12)  # differences -0.30, -0.29, -0.31
    assert c.sentence == "moe_8x vs baseline_10m: " + rp.stats.verdict(
        "moe_8x", "baseline_10m", "val/loss", False, c.test
    )
    assert c.sentence.startswith("moe_8x vs baseline_10m: moe_8x is better")
    assert f"- {c.sentence}" in r.markdown()


def test_arms_of_different_lengths_are_said_to_compare_each_at_the_end_of_its_own_run(tmp_path):
    """A study matched in FLOPs or time gives the arms different steps: the final values are then not 'at equal
    tokens', and the report says what they are."""
    same = rp.build_report(two_arm_sweep(tmp_path / "same", {"a": [3.0, 3.1], "b": [2.9, 3.0]}), now=NOW)
    assert "Every arm sees the same tokens" in same.markdown()
    for seed in (1, 2):
        write_job(tmp_path / "diff", 2 * seed - 2, ["model=a", f"train.seed={seed}"], 3.0 + seed / 10)
        curve = [(5, 6.0), (8, 5.6)]  # the slower arm: 8 steps in the time the other takes 10
        write_job(tmp_path / "diff", 2 * seed - 1, ["model=b", f"train.seed={seed}"], 2.9 + seed / 10, curve=curve)
    text = rp.build_report(tmp_path / "diff", now=NOW).markdown()
    assert "Every arm sees the same tokens" not in text
    assert "the final values compare each arm at the end of its own fully decayed run" in text


def test_arms_on_different_seeds_fall_back_to_welch(tmp_path):
    for num, (name, seed, loss) in enumerate([("a", 1, 3.0), ("a", 2, 3.1), ("b", 3, 2.5), ("b", 4, 2.7)]):
        write_job(tmp_path, num, [f"model={name}", f"train.seed={seed}"], loss)
    (c,) = at_equal_tokens(rp.build_report(tmp_path, now=NOW), "val/loss")
    assert c.test == rp.welch_test([2.5, 2.7], [3.0, 3.1])


def test_overlapping_arms_state_what_is_excluded_and_what_could_be_detected(tmp_path):
    two_arm_sweep(tmp_path, {"relu": [3.10, 3.20, 3.00], "gelu": [3.05, 3.25, 3.12]})
    r = rp.build_report(tmp_path, now=NOW)
    (c,) = at_equal_tokens(r, "val/loss")
    assert c.p is not None and c.p > 0.05 and not c.significant
    assert "no difference detected" in c.sentence and "are excluded" in c.sentence
    assert c.sentence in r.markdown()


def test_one_seed_per_arm_says_no_test_is_possible(tmp_path):
    two_arm_sweep(tmp_path, {"relu": [3.10], "gelu": [3.00]})
    (c,) = at_equal_tokens(rp.build_report(tmp_path, now=NOW), "val/loss")
    assert c.test is None and c.diff is None
    assert "differs by -0.1 (1 vs 1 seeds) but no test is possible" in c.sentence


def test_several_comparisons_are_holm_adjusted(tmp_path):
    two_arm_sweep(tmp_path, {"a": [3.0, 3.1, 3.2], "b": [2.9, 3.05, 3.1], "c": [2.0, 2.2, 2.3]})
    r = rp.build_report(tmp_path, now=NOW)
    loss = at_equal_tokens(r, "val/loss")
    assert len(loss) == 3
    raw = [c.p for c in loss]
    assert [c.p_holm for c in loss] == pytest.approx(rp.holm(raw), abs=1e-15)  # within the metric's family
    assert all("Holm-adjusted" in c.sentence for c in loss)


def test_exact_match_is_compared_too_and_higher_is_better(tmp_path):
    for seed in (1, 2, 3):
        for i, (name, em) in enumerate([("adamw", 0.10 + seed / 100), ("muon", 0.30 + seed / 50)]):
            write_job(
                tmp_path,
                2 * (seed - 1) + i,
                [f"optim={name}", f"train.seed={seed}"],
                3.0 + i / 100 + seed / 1000,
                val={"val/loss": 3.0, "val/r/exact_match": em},
            )
    r = rp.build_report(tmp_path, now=NOW)
    assert [m.text for m in r.metrics if m.at is None] == ["val/loss", "val/r/exact_match"]
    budgets = [m.label.split(" (")[0] for m in r.metrics if m.at is not None]
    assert budgets == [
        f"{k} at equal {axis}" for axis in ("flops", "seconds") for k in ("val/loss", "val/r/exact_match")
    ]
    em = next(c for c in r.comparisons if c.metric.key == "val/r/exact_match")
    assert em.sentence.startswith("muon vs adamw: muon is better: val/r/exact_match")
    assert "| val/r/exact_match |" in r.markdown() and "### val/r/exact_match (higher is better)" in r.markdown()


def test_tokens_to_reach_a_target_interpolates_between_evaluations():
    curve = [rp.Point(5, 100, None, 0.1), rp.Point(10, 200, None, 0.3), rp.Point(15, 300, None, 0.5)]
    assert rp.tokens_to_reach(curve, 0.2, higher=True) == pytest.approx(150.0, abs=1e-12)
    assert rp.tokens_to_reach(curve, 0.05, higher=True) == 100.0  # already at the first evaluation
    assert rp.tokens_to_reach(curve, 0.6, higher=True) is None
    falling = [rp.Point(5, 100, None, 5.0), rp.Point(10, 200, None, 4.0)]
    assert rp.tokens_to_reach(falling, 4.5, higher=False) == pytest.approx(150.0, abs=1e-12)
    assert rp.Metric.parse("val/r/exact_match>=0.2") == rp.Metric("val/r/exact_match", 0.2)
    with pytest.raises(ValueError, match="improves the other way"):
        rp.Metric.parse("val/loss>=3")
    with pytest.raises(ValueError, match="must be a number"):
        rp.Metric.parse("val/loss<=abc")


def test_a_misspelt_metric_fails_with_one_error_naming_the_nearest_name_instead_of_a_column_of_dashes(tmp_path, capsys):
    sweep = two_arm_sweep(tmp_path, {"a": [3.1, 3.2], "b": [3.0, 3.05]})
    # a summary field: known without reading any job
    with pytest.raises(rp.MetricError, match=r"metric 'wallclock': no such summary field .*did you mean 'wallclock_s'"):
        rp.build_report(sweep, now=NOW, metrics=["wallclock"])
    assert rp.main([str(sweep), "--no-plots", "--metric", "val_los"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("report: metric 'val_los'") and "did you mean 'val_loss'?" in err[0]
    # a val/... key: checked against what the jobs recorded (curves and summaries)
    with pytest.raises(rp.MetricError, match=r"no job records val/bpd .*did you mean 'val/bpb'.*jobs have: val/bpb"):
        rp.build_report(sweep, now=NOW, metrics=["val/bpd<=3"])
    # the numeric fields and the recorded keys are accepted and give every finished seed a value
    r = rp.build_report(sweep, now=NOW, metrics=["wallclock_s", "cpu_s", "val/bpb"])
    assert r.arm("a").stat("wallclock_s").values == (60.0, 62.0)  # write_job: 60 + job number
    assert r.arm("a").stat("cpu_s").values == ()  # absent from these summaries: no value, not a typo


def test_a_target_metric_compares_tokens_and_names_seeds_that_never_reached_it(tmp_path):
    # tokens per step 512; exact match at steps 5 and 10
    for seed in (1, 2, 3):
        write_job(
            tmp_path,
            2 * seed - 2,
            ["optim=a", f"train.seed={seed}"],
            3.0,
            curve=[(5, 6.0), (10, 5.0)],
            val_curve={"val/r/exact_match": [0.1, 0.2 + seed / 100]},
        )
        write_job(
            tmp_path,
            2 * seed - 1,
            ["optim=b", f"train.seed={seed}"],
            3.0,
            curve=[(5, 6.0), (10, 5.0)],
            val_curve={"val/r/exact_match": [0.1 + seed / 20, 0.4]},
        )
    r = rp.build_report(tmp_path, metrics=["val/r/exact_match>=0.2"], now=NOW)
    (target,) = [m for m in r.metrics if m.target is not None]
    assert target.label == "tokens to val/r/exact_match >= 0.2" and not target.higher_is_better
    a, b = r.arm("a"), r.arm("b")
    # a: 0.1 at 2560 tokens -> 0.2 + seed / 100 at 5120: crosses 0.2 at 2560 + 0.1 / (0.1 + seed / 100) * 2560
    expected_a = {str(s): 2560 + 0.1 / (0.1 + s / 100) * 2560 for s in (1, 2, 3)}
    assert a.by_seed(target) == pytest.approx(expected_a, abs=1e-9)
    # b: 0.15 -> 0.4 (seed 1: 2560 + (0.05 / 0.25) * 2560), seed 2: 0.2 at step 5, seed 3: 0.25 at step 5
    assert b.by_seed(target) == pytest.approx({"1": 3072.0, "2": 2560.0, "3": 2560.0}, abs=1e-9)
    (c,) = [c for c in r.comparisons if c.metric == target]
    assert c.sentence.startswith("b vs a: b is better: tokens to val/r/exact_match >= 0.2")
    write_job(
        tmp_path,
        6,
        ["optim=a", "train.seed=4"],
        3.0,
        curve=[(5, 6.0), (10, 5.0)],
        val_curve={"val/r/exact_match": [0.1, 0.15]},
    )
    r = rp.build_report(tmp_path, metrics=["val/r/exact_match>=0.2"], now=NOW)
    (c,) = [c for c in r.comparisons if c.metric.target is not None]
    # seed 4 of a never reached the target: left out, the seeds both arms have are still paired
    assert c.test is not None and (c.test.test, c.test.n_a) == ("paired t", 3)
    assert c.sentence.endswith("(a seeds 4 never reached the target)")
    assert "(3/4 reached) |" in r.markdown()


# ----------------------------------------------------------------------------------------------------
# Per-seed results and the verdict check


def test_per_seed_results_rebuild_the_same_verdicts_and_a_doctored_report_fails_the_check(tmp_path):
    sweep = two_arm_sweep(tmp_path / "sweep", {"adamw": [3.10, 3.12, 3.15], "muon": [2.80, 2.83, 2.84]})
    out = tmp_path / "study"
    paths = rp.write_report(rp.build_report(sweep, now=NOW, metrics=["val/loss<=5.6"]), out, plots=False)
    assert [p.name for p in paths] == ["report.md", "runs.json", "runs.csv", "curves.csv"]
    rows = json.loads((out / "runs.json").read_text())
    assert [(r["arm"], r["seed"], r["summary"]["val_loss"]) for r in rows][:2] == [
        ("adamw", "1", 3.10),
        ("adamw", "2", 3.12),
    ]
    rebuilt = rp.build_report(out)
    assert rebuilt.from_results and [a.label for a in rebuilt.arms] == ["adamw", "muon"]
    assert rp.check_report(out) == []
    assert rp.main(["--check", str(out)]) == 0
    text = (out / "report.md").read_text()
    (out / "report.md").write_text(text.replace("muon is better", "adamw is better", 1))
    problems = rp.check_report(out)
    assert problems and problems[0].startswith("not supported by the data: - muon vs adamw: adamw is better")
    assert rp.main(["--check", str(out)]) == 1
    (out / "report.md").write_text(text)
    rows[3]["summary"]["val_loss"] = 3.5  # a doctored number changes the rebuilt verdict
    (out / "runs.json").write_text(json.dumps(rows))
    assert rp.check_report(out) != []


def test_many_arms_are_compared_with_the_baseline_only(tmp_path):
    two_arm_sweep(tmp_path, {name: [3.0 + i / 10, 3.05 + i / 10] for i, name in enumerate("abcde")})
    r = rp.build_report(tmp_path, now=NOW)
    assert [(c.arm, c.baseline) for c in at_equal_tokens(r, "val/loss")] == [(x, "a") for x in "bcde"]
    named = rp.build_report(tmp_path, baseline="c", now=NOW)
    assert [(c.arm, c.baseline) for c in at_equal_tokens(named, "val/loss")] == [(x, "c") for x in "abde"]
    with pytest.raises(ValueError, match="not an arm"):
        rp.build_report(tmp_path, baseline="zzz", now=NOW)


def test_few_arms_are_compared_pairwise(tmp_path):
    two_arm_sweep(tmp_path, {name: [3.0, 3.1] for name in "abc"})
    pairs = [(c.arm, c.baseline) for c in at_equal_tokens(rp.build_report(tmp_path, now=NOW), "val/loss")]
    assert pairs == [("b", "a"), ("c", "a"), ("c", "b")]


def test_two_ablated_axes_label_arms_with_both_values(tmp_path):
    for num, (act, norm, seed) in enumerate([("relu", "rms", 1), ("gelu", "rms", 1), ("relu", "ln", 1)]):
        write_job(tmp_path, num, [f"model.activation={act}", f"model.norm={norm}", f"train.seed={seed}"], 3.0)
    r = rp.build_report(tmp_path, now=NOW)
    assert r.axes == ["model.activation", "model.norm"]
    assert [a.label for a in r.arms] == [
        "model.activation=relu,model.norm=rms",
        "model.activation=gelu,model.norm=rms",
        "model.activation=relu,model.norm=ln",
    ]


# ----------------------------------------------------------------------------------------------------
# Plots


def test_plots_are_pngs_of_the_configured_size(tmp_path):
    sweep = tmp_path / "sweep"
    for seed in (1, 2):
        write_job(sweep, 2 * seed - 2, ["model=baseline_10m", f"train.seed={seed}"], 5.5)
        write_job(
            sweep, 2 * seed - 1, ["model=moe_8x", f"train.seed={seed}"], 5.4, moe=[(5, 1.8 + seed / 10), (10, 1.3)]
        )
    paths = rp.write_report(rp.build_report(sweep, now=NOW), results=False)
    assert [p.name for p in paths] == [
        "report.md",
        "val_loss_vs_tokens.png",
        "val_loss_vs_flops.png",
        "val_loss_vs_seconds.png",
        "train_loss_vs_tokens.png",
        "moe_load_balance.png",
    ]
    for png in paths[1:]:
        assert png_size(png) == (rp.FIG_SIZE_IN[0] * rp.FIG_DPI, rp.FIG_SIZE_IN[1] * rp.FIG_DPI) == (1200, 800)
    assert "![val_loss_vs_flops](val_loss_vs_flops.png)" in (sweep / "report.md").read_text()


def test_dense_sweep_has_no_moe_plot_and_band_is_mean_and_standard_error_over_seeds(tmp_path):
    write_job(tmp_path, 0, ["model=a", "train.seed=1"], 5.0, curve=[(5, 6.0), (10, 5.0)])
    write_job(tmp_path, 1, ["model=a", "train.seed=2"], 5.4, curve=[(5, 6.4), (10, 5.4)])
    r = rp.build_report(tmp_path, now=NOW)
    assert [a.label for a in r.arms] == ["all jobs"]  # nothing varies but the seed: one arm
    xs, mean, se = rp.plots.band(rp.plots.arm_series(r.arms[0], "val/loss", "tokens"))
    assert xs == [2560, 5120]
    assert mean == pytest.approx([6.2, 5.2], abs=1e-12) and se == pytest.approx([0.2, 0.2], abs=1e-12)
    seconds, _, _ = rp.plots.band(rp.plots.arm_series(r.arms[0], "val/loss", "seconds"))
    assert seconds == [2.5, 5.0]  # 0.5 s per step, logged at steps 5 and 10
    names = [p.name for p in rp.write_report(r)]
    assert "moe_load_balance.png" not in names and "val_loss_vs_tokens.png" in names


# ----------------------------------------------------------------------------------------------------
# Jobs that did not finish


def test_a_failed_job_is_listed_as_failed_and_the_rest_still_reported(tmp_path):
    two_arm_sweep(tmp_path, {"relu": [3.10, 3.20], "gelu": [3.00, 3.05]})
    failed = next(tmp_path.glob("3_*"))  # gelu, seed 2
    (failed / "summary.json").unlink()
    (failed / "status.json").write_text(json.dumps({"state": "failed", "error": "RuntimeError: loss is NaN"}))
    r = rp.build_report(tmp_path, now=NOW)
    assert [(j.num, j.status, j.detail) for j in r.unfinished] == [(3, "failed", "RuntimeError: loss is NaN")]
    assert len(r.arm("gelu").finished) == 1 and r.arm("gelu").stat("val_loss").mean == pytest.approx(3.00)
    md = r.markdown()
    assert "| gelu | 1/2 |" in md
    assert f"| 3 | failed | gelu | 2 | 10/10 | RuntimeError: loss is NaN | {failed} |" in md


def test_a_requeued_job_waiting_in_the_queue_is_requeued_not_stopped(tmp_path):
    """Silent for hours while it waits for a node: the status it wrote, not the write age, decides."""
    job = write_job(tmp_path, 0, ["model=a", "train.seed=1"], None, mtime=NOW - 3 * 3600)
    (job / "checkpoints" / "step_0000010").mkdir(parents=True)  # a sharded (DCP) checkpoint folder
    (job / "checkpoints" / "step_0000010" / ".metadata").write_bytes(b"")
    (job / "checkpoints" / "step_0000010" / "extra.pt").write_bytes(b"")
    (job / "status.json").write_text(
        json.dumps(
            {"state": "requeued", "step": 10, "pid": 1, "host": "node-7", "updated_at": "2027-01-15T08:00:00+0000"}
        )
    )
    r = rp.build_report(tmp_path, now=NOW)
    (j,) = r.jobs
    assert (j.status, j.detail) == (
        "requeued",
        "preempted at step 10 and requeued since 2027-01-15T08:00:00+0000: "
        "waits in the scheduler's queue, resumes from step_0000010",
    )
    assert "Jobs: 1 (1 requeued)" in r.markdown() and "| 0 | requeued |" in r.markdown()


def test_an_unreadable_summary_marks_the_job_failed_naming_the_missing_fields(tmp_path):
    job = write_job(tmp_path, 0, ["model=a", "train.seed=1"], 3.0)
    (job / "summary.json").write_text(json.dumps({"step": 10, "val_loss": 3.0}))
    (j,) = rp.build_report(tmp_path, now=NOW).jobs
    assert j.status == "failed" and j.detail.startswith("summary.json: summary lacks ['tokens_seen', 'val_bpb'")


def test_submitit_errors_mark_their_jobs_failed(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf
    from submitit.helpers import DelayedSubmission

    for num in range(3):
        write_job(tmp_path, num, ["model=a", f"train.seed={num + 1}"], None, mtime=NOW)
    # job 0 raised past Hydra's run_job (an "error" outcome); job 1 failed inside it (a FAILED JobReturn)
    err = tmp_path / ".submitit" / "77_0"
    err.mkdir(parents=True)
    traceback = "Traceback (most recent call last):\nSystemExit: 2"
    (err / "77_0_0_result.pkl").write_bytes(pickle.dumps(("error", traceback)))
    (err / "77_0_submitted.pkl").write_bytes(pickle.dumps(DelayedSubmission(json.dumps, [], "hydra.sweep.dir", 0)))
    ok = tmp_path / ".submitit" / "77_1"
    ok.mkdir()
    ret = JobReturn(
        hydra_cfg=OmegaConf.create({"hydra": {"job": {"num": 1}}}),
        status=JobStatus.FAILED,
        _return_value=RuntimeError("CUDA out of memory"),
    )
    (ok / "77_1_0_result.pkl").write_bytes(pickle.dumps(("success", ret)))
    jobs = rp.build_report(tmp_path, now=NOW).jobs
    assert [(j.status, j.detail) for j in jobs] == [
        ("failed", "submitit: SystemExit: 2"),
        ("failed", "submitit: RuntimeError('CUDA out of memory')"),
        ("running", "last write 0 s ago"),
    ]


def test_a_job_writing_metrics_is_running_and_a_silent_one_is_stopped(tmp_path):
    write_job(tmp_path, 0, ["model=a", "train.seed=1"], None, curve=[(5, 6.0)], mtime=NOW - 60)
    silent = write_job(tmp_path, 1, ["model=a", "train.seed=2"], None, curve=[(5, 6.0)], mtime=NOW - 3 * 3600)
    (silent / "checkpoints").mkdir()
    for step in (5, 10):
        (silent / "checkpoints" / f"step_{step:07d}.pt").write_bytes(b"")
        os.utime(silent / "checkpoints" / f"step_{step:07d}.pt", (NOW - 4 * 3600, NOW - 4 * 3600))
    r = rp.build_report(tmp_path, now=NOW, stale_after_s=1800)
    assert [(j.status, j.detail) for j in r.jobs] == [
        ("running", "last write 60 s ago"),
        (
            "stopped",
            "no write for 3.0 h and no error record: killed, preempted, or failed under a launcher "
            "that records nothing; resume from step_0000010.pt with train.resume=auto",
        ),
    ]
    assert "| 0 | running | all jobs | 1 | 5/10 |" in r.markdown()
    assert r.arm("all jobs").stat("val_loss").n == 0 and "| all jobs | 0/2 | — |" in r.markdown()


def test_an_unfinished_job_followed_by_a_later_one_under_the_basic_launcher_has_failed(tmp_path):
    (tmp_path / "multirun.yaml").write_text(
        yaml.safe_dump(
            {"hydra": {"launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}}}
        )
    )
    write_job(tmp_path, 0, ["model=a", "train.seed=1"], None, mtime=NOW)
    write_job(tmp_path, 1, ["model=a", "train.seed=2"], 3.0, mtime=NOW)
    write_job(tmp_path, 2, ["model=a", "train.seed=3"], None, mtime=NOW)  # the job running now
    jobs = rp.build_report(tmp_path, now=NOW).jobs
    assert [j.status for j in jobs] == ["failed", "finished", "running"]
    assert jobs[0].detail.startswith("no summary.json, and job 2 of this sequential (basic launcher) sweep started")


def test_status_json_naming_a_dead_process_on_this_host_is_died(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    job = write_job(tmp_path, 0, ["model=a", "train.seed=1"], None, mtime=NOW)
    status = {"state": "running", "step": 7, "pid": gone.pid, "host": socket.gethostname()}
    (job / "status.json").write_text(json.dumps(status))
    (j,) = rp.build_report(tmp_path, now=NOW).jobs
    assert (j.status, j.detail) == (
        "died",
        f"process {gone.pid} on this host died at or after step 7 without a summary or an error record "
        "(kill -9, out of memory?)",
    )


def test_jobs_in_the_sweep_grid_without_a_directory_are_pending(tmp_path):
    (tmp_path / "multirun.yaml").write_text(
        yaml.safe_dump(
            {
                "experiment": "act",
                "hydra": {
                    "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
                    "overrides": {"task": ["train.seed=1,2", "model.activation=relu,gelu", "data.path=/x/y"]},
                },
            }
        )
    )
    write_job(tmp_path, 0, ["train.seed=1", "model.activation=relu", "data.path=/x/y"], 3.0)
    write_job(tmp_path, 1, ["train.seed=1", "model.activation=gelu", "data.path=/x/y"], None, mtime=NOW)
    r = rp.build_report(tmp_path, now=NOW)
    assert [(j.num, j.status) for j in r.jobs] == [(0, "finished"), (1, "running"), (2, "pending"), (3, "pending")]
    assert r.jobs[3].overrides == ["train.seed=2", "model.activation=gelu", "data.path=/x/y"]
    assert [(a.label, len(a.jobs)) for a in r.arms] == [("relu", 2), ("gelu", 2)]
    assert r.experiment == "act"
    pending = "| 3 | pending | gelu | 2 | — | not started: queued, or the sweep stopped before it | — |"
    assert pending in r.markdown()


def test_sweeper_params_of_an_experiment_expand_before_the_command_line_like_hydra(tmp_path):
    (tmp_path / "multirun.yaml").write_text(
        yaml.safe_dump(
            {
                "hydra": {
                    "sweeper": {
                        "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                        "params": {"model": "baseline_10m,moe_8x"},
                    },
                    "overrides": {"task": ["experiment=dense_vs_moe", "train.seed=1,2"]},
                }
            }
        )
    )
    assert rp.expected_overrides(tmp_path) == [
        ["model=baseline_10m", "experiment=dense_vs_moe", "train.seed=1"],
        ["model=baseline_10m", "experiment=dense_vs_moe", "train.seed=2"],
        ["model=moe_8x", "experiment=dense_vs_moe", "train.seed=1"],
        ["model=moe_8x", "experiment=dense_vs_moe", "train.seed=2"],
    ]


def test_a_job_nested_by_a_path_in_its_directory_name_is_found(tmp_path):
    job = write_job(tmp_path, 0, ["model=a", "train.seed=1"], 3.0)
    nested = tmp_path / "0_data.cache_dir=" / "tmp" / "cache,model=a"
    nested.parent.mkdir(parents=True)
    job.rename(nested)
    (j,) = rp.build_report(tmp_path, now=NOW).jobs
    assert (j.dir, j.status) == (nested, "finished")


# ----------------------------------------------------------------------------------------------------
# Command line


def test_latest_sweep_of_an_experiment_is_found_by_name(tmp_path):
    for i, (day, name) in enumerate([("d1", "muon_vs_adamw"), ("d2", "muon_vs_adamw"), ("d3", "dense_vs_moe")]):
        sweep = tmp_path / day / "10-00-00"
        write_job(sweep, 0, ["optim=muon", "train.seed=1"], 3.0, experiment=name)
        (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {}}))  # name only in config.json
        os.utime(sweep / "multirun.yaml", (NOW + i, NOW + i))
    assert rp.find_latest_sweep(tmp_path, "muon_vs_adamw") == tmp_path / "d2" / "10-00-00"
    with pytest.raises(FileNotFoundError, match="experiments found: \\['dense_vs_moe', 'muon_vs_adamw'\\]"):
        rp.find_latest_sweep(tmp_path, "nope")


def test_cli_prints_the_report_and_writes_report_md(tmp_path, capsys):
    two_arm_sweep(tmp_path / "multirun" / "d" / "t", {"relu": [3.1, 3.2], "gelu": [3.0, 3.05]})
    (tmp_path / "multirun" / "d" / "t" / "multirun.yaml").write_text(yaml.safe_dump({"experiment": "act"}))
    assert rp.main(["--experiment", "act", "--root", str(tmp_path / "multirun"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "## Results per arm" in out and "gelu vs relu:" in out
    assert (tmp_path / "multirun" / "d" / "t" / "report.md").read_text() in out
    assert rp.main([str(tmp_path / "missing")]) == 2
    assert "no sweep directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# A real sweep


@pytest.mark.slow
def test_real_two_by_two_multirun_reports_two_arms_of_two_seeds(tinystories_dir, data_cache, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "scaletrain.run",
        "-m",
        "model=tiny",
        "train.seed=1,2",
        "model.activation=relu,gelu",
        f"data.path={tinystories_dir}",
        f"data.cache_dir={data_cache}",
        "data.seq_len=64",
        "data.tokenizer.vocab_size=512",
        "train.batch_size=8",
        "train.max_steps=10",
        "train.eval_every=5",
        "train.eval_batches=2",
        "train.ckpt_every=0",
        "train.progress_bar=false",
        "train.measure_cpu_peak=false",
        "train.sample_count=1",
        "train.sample_tokens=8",
        "train.device=cpu",
        "logging.wandb.mode=disabled",
        f"hydra.sweep.dir={sweep}",
        # The default subdir `<num>_<override_dirname>` exceeds the 255-byte file-name limit with this many
        # overrides (and data.cache_dir's slashes nest it), so number the job directories only.
        "hydra.sweep.subdir=${hydra.job.num}",
    ]
    res = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_SILENT": "true"}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r = rp.build_report(sweep)
    assert r.axes == ["model.activation"]
    seeds = [(a.label, sorted(j.seed for j in a.finished)) for a in r.arms]
    assert seeds == [("relu", ["1", "2"]), ("gelu", ["1", "2"])]
    for arm in r.arms:
        summaries = [json.loads((j.dir / "summary.json").read_text()) for j in arm.finished]
        for key in rp.SUMMARY_STATS:
            assert arm.stat(key).values == tuple(float(s[key]) for s in summaries)
        assert arm.stat("tokens_seen").mean == 10 * 8 * 64
        last = [j.curves["val/loss"][-1] for j in arm.finished]
        assert [(p.step, p.tokens, p.value) for p in last] == [(10, 5120, s["val_loss"]) for s in summaries]
        assert all(p.seconds is not None and p.seconds > 0 for p in last)
    (c,) = at_equal_tokens(r, "val/loss")
    assert c.diff == pytest.approx(r.arm("gelu").stat("val_loss").mean - r.arm("relu").stat("val_loss").mean)
    assert 0.0 <= c.p <= 1.0 and r.unfinished == []
    paths = rp.write_report(r)
    assert [png_size(p) for p in paths if p.suffix == ".png"] == [(1200, 800)] * 4


def test_equal_flops_reads_each_curve_at_the_cheapest_arms_total_including_optimizer_flops(tmp_path):
    # model FLOPs 1e6 per token, 512 tokens per step: 5.12e9 at step 10; arm b's optimizer adds as much again
    for seed in (1, 2):
        write_job(
            tmp_path,
            2 * seed - 2,
            ["optim=a", f"train.seed={seed}"],
            5.5 + seed / 100,
            curve=[(5, 6.0), (10, 5.5 + seed / 100)],
        )
        write_job(
            tmp_path,
            2 * seed - 1,
            ["optim=b", f"train.seed={seed}"],
            5.0 + seed / 300,
            curve=[(5, 5.8 - seed / 50), (10, 5.0 + seed / 300)],
            optimizer_flops=5.12e9,
        )
    r = rp.build_report(tmp_path, now=NOW)
    flops = next(m for m in r.metrics if m.at == "flops")
    assert flops.budget == pytest.approx(5.12e9) and flops.key == "val/loss"
    assert r.arm("a").by_seed(flops) == pytest.approx({"1": 5.51, "2": 5.52})  # its last evaluation
    assert r.arm("b").by_seed(flops) == pytest.approx({"1": 5.78, "2": 5.76})  # half-way: step 5
    seconds = next(m for m in r.metrics if m.at == "seconds")
    assert seconds.budget == pytest.approx(5.0)  # 0.5 s per step for 10 steps, both arms
    assert r.arm("b").by_seed(seconds) == pytest.approx({"1": 5.0 + 1 / 300, "2": 5.0 + 2 / 300})
    (c,) = [c for c in r.comparisons if c.metric == flops]
    assert c.sentence.startswith("b vs a: a is better: val/loss at equal flops (5.12e+09 FLOPs)")
    (tokens,) = at_equal_tokens(r, "val/loss")
    assert tokens.sentence.startswith("b vs a: b is better")  # the verdict flips once the optimizer's FLOPs count


def test_rebuilding_a_committed_study_folder_uses_the_options_its_report_was_built_with(tmp_path):
    """`python -m scaletrain.report <study folder>` with no options gives the committed verdicts back, the
    target metric included; an extra --metric is added to them."""
    sweep = two_arm_sweep(tmp_path / "sweep", {"adamw": [3.10, 3.12, 3.15], "muon": [2.80, 2.83, 2.84]})
    out = tmp_path / "study"
    rp.write_report(rp.build_report(sweep, now=NOW, metrics=["val/loss<=5.6"]), out, plots=False)
    committed = render.verdict_lines((out / "report.md").read_text())
    assert any(line.startswith("- muon vs adamw:") and "tokens to val/loss <= 5.6" in line for line in committed)
    again = tmp_path / "again"
    assert rp.main([str(out), "--out", str(again), "--no-plots"]) == 0
    assert render.verdict_lines((again / "report.md").read_text()) == committed
    assert rp.main([str(out), "--out", str(again), "--no-plots", "--metric", "val_bpb"]) == 0
    extra = render.verdict_lines((again / "report.md").read_text())
    assert set(committed) < set(extra) and any("val_bpb" in line for line in extra)


def test_arms_whose_residual_streams_ran_in_different_precisions_are_not_compared(tmp_path):
    """FSDP2 under bf16 adds the residual stream in bf16, one process without W_e in fp32: a comparison across them
    measures the precision too. Runs from before the field existed (None) are not checked."""
    for name, dtypes in {"same": ("float32", "float32"), "legacy": (None, "bfloat16")}.items():
        sweep = tmp_path / name
        for num, (act, dtype) in enumerate([(a, d) for a in ("relu", "gelu") for d in [dtypes[a == "gelu"]]]):
            for seed in (0, 1):
                write_job(sweep, 2 * num + seed, [f"model.activation={act}", f"train.seed={seed}"], 3.0 + seed,
                          residual_dtype=dtype)  # fmt: skip
        assert len(rp.build_report(sweep, now=NOW).arms) == 2
    sweep = tmp_path / "mixed"
    for num, (act, dtype) in enumerate([("relu", "float32"), ("gelu", "bfloat16")]):
        write_job(sweep, num, [f"model.activation={act}", "train.seed=0"], 3.0, residual_dtype=dtype)
    with pytest.raises(rp.collect.PrecisionMismatch, match=r"different precisions \(.*float32.*bfloat16.*\)") as err:
        rp.build_report(sweep, now=NOW)
    assert "\n" not in str(err.value)
