"""Sweep report: the Student-t maths, arms and their statistics, verdicts, plots, unfinished jobs, the CLI.

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
    for step, loss in curve:
        lines.append({"step": step, "train/loss": loss + 0.1, "train/tokens": step * tokens_per_step})
        lines.append({"step": step, "val/loss": loss, "val/bpb": loss / 2})
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


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which PNG requires to come right after the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    length, chunk = struct.unpack(">I4s", head[8:16])
    assert (length, chunk) == (13, b"IHDR")
    return struct.unpack(">II", head[16:24])


def t_density(x: float, dof: float) -> float:
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    return math.exp(log_c - (dof + 1) / 2 * math.log1p(x * x / dof))


def simpson(f, a: float, b: float, n: int = 20000) -> float:
    h = (b - a) / n
    return h / 3 * (f(a) + f(b) + sum((4 if i % 2 else 2) * f(a + i * h) for i in range(1, n)))


# ----------------------------------------------------------------------------------------------------
# Student-t and Welch


@pytest.mark.parametrize("t", [-7.5, -1.0, -0.3, 0.0, 0.4, 2.0, 12.7])
def test_t_cdf_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert rp.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
    assert rp.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)


@pytest.mark.parametrize(
    "q,dof,table",
    [
        (0.975, 1, 12.706),
        (0.975, 4, 2.776),
        (0.975, 10, 2.228),
        (0.975, 30, 2.042),
        (0.95, 2, 2.920),
        (0.995, 5, 4.032),
    ],
)
def test_t_quantiles_match_the_printed_table(q, dof, table):
    assert rp.t_ppf(q, dof) == pytest.approx(table, abs=5e-4)
    assert rp.t_ppf(1 - q, dof) == pytest.approx(-table, abs=5e-4)


@pytest.mark.parametrize("t,dof", [(-4.0415, 4.959), (1.3, 2.5), (0.7, 17.3)])
def test_t_cdf_matches_numerical_integration_of_the_density_for_fractional_dof(t, dof):
    integral = simpson(lambda x: t_density(x, dof), min(t, 0.0), max(t, 0.0))
    expected = 0.5 + integral if t > 0 else 0.5 - integral
    assert rp.t_cdf(t, dof) == pytest.approx(expected, abs=1e-9)


def test_welch_on_fixed_samples_matches_the_hand_computation():
    w = rp.welch_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0])
    # var 1 and 5/3; se^2 = 1/3 + 5/12 = 3/4; dof = (3/4)^2 / ((1/3)^2 / 2 + (5/12)^2 / 3)
    assert w.diff == pytest.approx(-3.5, abs=1e-12)
    assert w.se == pytest.approx(math.sqrt(0.75), abs=1e-12)
    assert w.t == pytest.approx(-3.5 / math.sqrt(0.75), abs=1e-12)
    assert w.dof == pytest.approx(0.5625 / (1 / 18 + (25 / 144) / 3), abs=1e-12)
    tail = simpson(lambda x: t_density(x, w.dof), abs(w.t), 60.0) + simpson(lambda x: t_density(x, w.dof), 60.0, 1e4)
    assert w.p == pytest.approx(2 * tail, rel=1e-5)
    assert w.ci95 == pytest.approx(rp.t_ppf(0.975, w.dof) * w.se, abs=1e-12)


def test_welch_p_value_is_five_percent_at_the_tabulated_critical_value():
    t_crit = 2.7764451051977987  # t_{0.975, 4}; equal n = 3 and equal variances give dof = 4
    se = math.sqrt(1 / 3 + 1 / 3)
    shift = t_crit * se
    w = rp.welch_test([shift, shift + 1, shift + 2], [0.0, 1.0, 2.0])
    assert w.dof == pytest.approx(4.0, abs=1e-12)
    assert w.p == pytest.approx(0.05, abs=1e-9)
    assert w.ci95 == pytest.approx(shift, abs=1e-9)  # at p = 0.05 the CI just touches zero


def test_welch_with_two_seeds_each_matches_the_two_dof_closed_form():
    w = rp.welch_test([0.0, 2.0], [1.0, 3.0])
    t = -1 / math.sqrt(2)
    assert (w.t, w.dof) == (pytest.approx(t, abs=1e-12), pytest.approx(2.0, abs=1e-12))
    assert w.p == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), abs=1e-12)


def test_welch_refuses_one_value_per_sample():
    with pytest.raises(ValueError, match="at least 2"):
        rp.welch_test([1.0], [2.0, 3.0])


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


def test_a_clear_difference_names_the_better_arm_with_its_welch_numbers(tmp_path):
    two_arm_sweep(tmp_path, {"baseline_10m": [3.10, 3.12, 3.14], "moe_8x": [2.80, 2.82, 2.84]})
    (c,) = rp.build_report(tmp_path, now=NOW).comparisons
    se = math.sqrt(2 * 0.02**2 / 3)  # equal variances, n = 3 each: dof = 4
    assert (c.arm, c.baseline) == ("moe_8x", "baseline_10m")
    assert c.diff == pytest.approx(-0.30, abs=1e-12)
    assert c.ci95 == pytest.approx(2.7764451051977987 * se, rel=1e-9)
    assert c.p == pytest.approx(rp.t_sf2(0.30 / se, 4.0), rel=1e-9) and c.p < 1e-4
    assert c.sentence == (f"moe_8x vs baseline_10m: -0.3000 ± {c.ci95:.4f} (p<0.0001, 3 vs 3 seeds) — moe_8x is better")


def test_overlapping_arms_are_reported_within_noise(tmp_path):
    two_arm_sweep(tmp_path, {"relu": [3.10, 3.20, 3.00], "gelu": [3.05, 3.25, 3.12]})
    r = rp.build_report(tmp_path, now=NOW)
    (c,) = r.comparisons
    assert c.p > 0.05
    assert c.sentence.endswith(f"(p={c.p:.2g}, 3 vs 3 seeds) — within noise; more seeds needed")
    assert c.sentence in r.markdown()


def test_one_seed_per_arm_says_no_significance_can_be_computed(tmp_path):
    two_arm_sweep(tmp_path, {"relu": [3.10], "gelu": [3.00]})
    (c,) = rp.build_report(tmp_path, now=NOW).comparisons
    assert (c.p, c.ci95) == (None, None) and c.diff == pytest.approx(-0.10, abs=1e-12)
    assert "no significance can be computed with one seed" in c.sentence


def test_many_arms_are_compared_with_the_baseline_only(tmp_path):
    two_arm_sweep(tmp_path, {name: [3.0 + i / 10, 3.05 + i / 10] for i, name in enumerate("abcde")})
    r = rp.build_report(tmp_path, now=NOW)
    assert [(c.arm, c.baseline) for c in r.comparisons] == [(x, "a") for x in "bcde"]
    named = rp.build_report(tmp_path, baseline="c", now=NOW)
    assert [(c.arm, c.baseline) for c in named.comparisons] == [(x, "c") for x in "abde"]
    with pytest.raises(ValueError, match="not an arm"):
        rp.build_report(tmp_path, baseline="zzz", now=NOW)


def test_few_arms_are_compared_pairwise(tmp_path):
    two_arm_sweep(tmp_path, {name: [3.0, 3.1] for name in "abc"})
    pairs = [(c.arm, c.baseline) for c in rp.build_report(tmp_path, now=NOW).comparisons]
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
    paths = rp.write_report(rp.build_report(sweep, now=NOW))
    assert [p.name for p in paths] == [
        "report.md",
        "val_loss_vs_tokens.png",
        "val_loss_vs_flops.png",
        "moe_load_balance.png",
    ]
    for png in paths[1:]:
        assert png_size(png) == (rp.FIG_SIZE_IN[0] * rp.FIG_DPI, rp.FIG_SIZE_IN[1] * rp.FIG_DPI) == (1200, 800)
    assert "![val_loss_vs_flops](val_loss_vs_flops.png)" in (sweep / "report.md").read_text()


def test_dense_sweep_has_no_moe_plot_and_band_is_mean_min_max_over_seeds(tmp_path):
    write_job(tmp_path, 0, ["model=a", "train.seed=1"], 5.0, curve=[(5, 6.0), (10, 5.0)])
    write_job(tmp_path, 1, ["model=a", "train.seed=2"], 5.4, curve=[(5, 6.4), (10, 5.4)])
    r = rp.build_report(tmp_path, now=NOW)
    assert [a.label for a in r.arms] == ["all jobs"]  # nothing varies but the seed: one arm
    xs, mean, lo, hi = rp._band(rp._arm_series(r.arms[0], "tokens"))
    assert xs == [2560, 5120]
    assert mean == pytest.approx([6.2, 5.2], abs=1e-12) and (lo, hi) == ([6.0, 5.0], [6.4, 5.4])
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
        assert [j.val_curve[-1] for j in arm.finished] == [(10, 5120, s["val_loss"]) for s in summaries]
    (c,) = r.comparisons
    assert c.diff == pytest.approx(r.arm("gelu").stat("val_loss").mean - r.arm("relu").stat("val_loss").mean)
    assert 0.0 <= c.p <= 1.0 and r.unfinished == []
    paths = rp.write_report(r)
    assert [png_size(p) for p in paths[1:]] == [(1200, 800), (1200, 800)]
