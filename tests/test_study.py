"""The study command: recipe validation, the order arms tune in, the frozen record, and (slow) a whole study of
tiny CPU jobs: tune -> evaluate -> report, a second invocation that runs nothing, a killed job resumed by
re-issuing the command, and a re-issue with other settings refused."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from scaletrain import report as rp
from scaletrain import study as st
from scaletrain.config import ConfigError, StudyArmConfig, StudyConfig, load_config
from scaletrain.cost import step_flops
from scaletrain.records import Summary

from .conftest import REPO, compose_cfg, read_metrics, tiny_overrides


def arms(**extra) -> dict[str, StudyArmConfig]:
    base = {
        "adamw": StudyArmConfig(["optim=adamw"], "optim.lr", [1e-3, 2e-3, 4e-3, 8e-3]),
        "muon": StudyArmConfig(["optim=muon"], "optim.muon.lr", [1e-3, 2e-3, 4e-3, 8e-3], {"optim.lr": "adamw"}),
    }
    return {**base, **extra}


def test_a_valid_study_orders_arms_after_those_they_inherit_from():
    study = StudyConfig(arms={"muon": arms()["muon"], "adamw": arms()["adamw"]})
    assert st.arm_order(study) == ["adamw", "muon"]


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"tune_seed": 1}, "study.tune_seed", "also an evaluation seed"),
        ({"seeds": [1]}, "study.seeds", "at least 2 distinct seeds"),
        ({"arms": {"a": arms()["adamw"]}}, "study.arms", "at least 2 arms"),
        (
            {"arms": arms(adamw=StudyArmConfig(["optim=adamw"], "optim.lr", [1e-3, 2e-3, 4e-3]))},
            "study.arms.adamw.grid",
            "has 3 points; a tuned arm needs at least study.min_grid=4",
        ),
        (
            {"arms": arms(adamw=StudyArmConfig(["optim=adamw"], "optim.lr", [1e-3, 2e-3, 4e-3, 1e-2]))},
            "study.arms.adamw.grid",
            "more than study.max_spacing=2.0x apart",
        ),
        (
            {"arms": arms(muon=StudyArmConfig(["optim=muon"], None, [], {"optim.lr": "sgd"}))},
            "study.arms.muon.inherit.optim.lr",
            "names arm 'sgd'",
        ),
        (
            {"arms": arms(muon=StudyArmConfig(["optim=muon"], None, [], {"optim.muon.lr": "adamw"}))},
            "study.arms.muon.inherit.optim.muon.lr",
            "does not tune optim.muon.lr",
        ),
        ({"reference": "sgd"}, "study.reference", "names arm 'sgd'"),
        ({"pace_steps": 3}, "study.pace_steps", "must be >= 5"),
        (
            {"match": "flops", "arms": arms(adamw=StudyArmConfig(["optim=adamw", "train.max_steps=10"]))},
            "study.arms.adamw.overrides",
            "train.max_steps=10 sets the arm's length, which study.match=flops derives",
        ),
    ],
)
def test_a_study_that_cannot_give_a_fair_verdict_is_refused_naming_the_key(change, key, words):
    with pytest.raises(ConfigError, match=rf"^{key}: .*{words}"):
        StudyConfig(**{"arms": arms(), **change})


def test_the_job_folder_spells_grid_values_as_hydra_does():
    # the study finds a job at <sweep>/lr<fmt(v)>; Hydra names it from ${optim.lr}, OmegaConf's float text
    for v in (1e-3, 2.5e-4, 6.25e-05, 1.6e-2, 0.1):
        cfg = OmegaConf.create({"lr": v, "dir": "lr${lr}"})
        assert f"lr{st.fmt(v)}" == cfg.dir


def test_every_redo_recipe_is_a_valid_study():
    for recipe in ("muon_vs_adamw", "dense_vs_moe", "reasoning_mixture"):
        cfg = load_config(compose_cfg([f"experiment={recipe}"]))
        assert cfg.study is not None and cfg.study.tune_seed not in cfg.study.seeds, recipe
        assert all(a.tune is not None for a in cfg.study.arms.values()), recipe


def test_dry_run_prints_every_phase_and_writes_nothing(tmp_path, capsys):
    code = st.main(["experiment=muon_vs_adamw", "~local", f"study.dir={tmp_path / 's'}", "--dry-run"])
    assert code == 0
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert len(out) == 4  # tune adamw, tune muon (at the middle of adamw's grid until it ran), eval x 2
    assert "optim.lr=0.001,0.002,0.004,0.008" in out[0] and "train.seed=0" in out[0]
    assert "optim=muon optim.lr=0.004 train.seed=0 optim.muon.lr=0.002,0.004,0.008,0.016" in out[1]
    assert out[3].endswith(f"hydra.sweep.dir={tmp_path / 's' / 'eval'} hydra.sweep.subdir=muon_s${{train.seed}}")
    assert "train.seed=1,2,3" in out[2] and not (tmp_path / "s").exists()


def test_a_misspelt_selection_metric_is_refused_before_any_job_naming_the_nearest_field(tmp_path, capsys):
    code = st.main(["experiment=muon_vs_adamw", "~local", "study.select=val_los", f"study.dir={tmp_path / 's'}"])
    assert code == 2 and not (tmp_path / "s").exists()
    assert "study error: metric 'val_los': no such summary field or metric (did you mean 'val_loss'?)" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("recipe", ["muon_vs_adamw", "dense_vs_moe"])
def test_equal_flops_gives_each_arm_the_steps_of_the_reference_arms_flops(recipe, tmp_path, capsys):
    """study.match=flops: every arm but the first trains round(steps x F_first / F_arm) steps, F the model's
    FLOPs over a step's tokens plus Muon's Newton-Schulz FLOPs (cost.step_flops)."""
    base = [f"experiment={recipe}", "~local"]
    cfg = load_config(compose_cfg(base))
    assert cfg.study is not None
    first, other = list(cfg.study.arms)
    per_step = {  # checked against the trainer's own records below
        name: step_flops(load_config(compose_cfg([*base, *cfg.study.arms[name].overrides]))).total
        for name in (first, other)
    }
    expected = round(cfg.train.max_steps * per_step[first] / per_step[other])
    assert expected < cfg.train.max_steps  # Muon's Newton-Schulz, the MoE's router: the second arm costs more
    code = st.main([*base, "study.match=flops", f"study.dir={tmp_path / 's'}", "--dry-run"])
    assert code == 0
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert all("train.max_steps" not in line for line in out if f"{first}_s" in line or f"tune_{first}" in line)
    theirs = [line for line in out if f"{other}_s" in line or f"tune_{other}" in line]
    assert len(theirs) == 2 and all(f" train.max_steps={expected} " in line for line in theirs)


def test_flops_per_step_equals_what_the_trainer_recorded_for_study_002b():
    """The budget's FLOPs are the trainer's own accounting: study 002b's committed summaries (model FLOPs over the
    run's tokens, Newton-Schulz FLOPs) divided by its steps, per arm."""
    runs = json.loads((REPO / "experiments" / "002b_muon_vs_adamw" / "runs.json").read_text())
    for run in runs:
        s = Summary.from_dict(run["summary"])
        recorded = (s.flops + (s.optimizer_flops or 0.0)) / s.step
        cfg = load_config(compose_cfg(["experiment=muon_vs_adamw", f"optim={run['arm']}"]))
        # integer-valued floats below 2**53 on both sides (FLOP counts of integer shapes): exact on any CPU
        assert step_flops(cfg).total == recorded, run["arm"]


def test_a_study_begun_before_a_setting_existed_or_was_removed_continues(tmp_path):
    cfg = load_config(compose_cfg(["experiment=muon_vs_adamw"]))
    st.Study(["experiment=muon_vs_adamw"], cfg, tmp_path).freeze()
    path = tmp_path / st.STUDY_FILE
    old = json.loads(path.read_text())
    for key in ("match", "reference", "pace_steps"):  # settings added after the first studies began
        del old["study"][key]
    old["study"]["expected_minutes"] = 75  # a setting removed since (it never shaped a job)
    path.write_text(json.dumps(old))
    st.Study(["experiment=muon_vs_adamw"], cfg, tmp_path).freeze()
    flops = load_config(compose_cfg(["experiment=muon_vs_adamw", "study.match=flops"]))
    with pytest.raises(st.StudyError, match="was started with other settings"):
        st.Study(["experiment=muon_vs_adamw", "study.match=flops"], flops, tmp_path).freeze()


def test_a_recipe_without_a_study_section_is_one_clear_error(capsys):
    assert st.main(["experiment=quickstart", "~local"]) == 2
    assert "study error: experiment=quickstart: the recipe has no study: section" in capsys.readouterr().err


def test_a_reissue_with_other_settings_is_refused(tmp_path):
    cfg = load_config(compose_cfg(["experiment=muon_vs_adamw"]))
    st.Study(["experiment=muon_vs_adamw"], cfg, tmp_path).freeze()
    other = load_config(compose_cfg(["experiment=muon_vs_adamw", "study.seeds=[1,2,4]"]))
    with pytest.raises(st.StudyError, match="was started with other settings"):
        st.Study(["experiment=muon_vs_adamw", "study.seeds=[1,2,4]"], other, tmp_path).freeze()
    st.Study(["experiment=muon_vs_adamw"], cfg, tmp_path).freeze()  # the same command continues


# ----------------------------------------------------------------------------------------------------
# A whole study of tiny jobs


def study_cmd(tinystories_dir, data_cache, root, *extra) -> list[str]:
    overrides = tiny_overrides(tinystories_dir, data_cache)
    return [
        sys.executable, "-m", "scaletrain.study", "experiment=muon_vs_adamw", *overrides,
        f"study.dir={root}", "train.max_steps=4", "train.eval_every=2", "train.ckpt_every=2",
        "study.seeds=[1,2]", "study.max_widen=0", "study.min_grid=2",
        "study.arms.adamw.grid=[0.004,0.008]", "study.arms.muon.grid=[0.002,0.004]", *extra,
    ]  # fmt: skip


def run(cmd) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


def launched(res) -> list[str]:
    return [line for line in res.stdout.splitlines() if line.startswith("$ ")]


@pytest.mark.slow
def test_a_study_tunes_evaluates_reports_and_resumes_where_it_stopped(tinystories_dir, data_cache, tmp_path):
    root = tmp_path / "study"
    cmd = study_cmd(tinystories_dir, data_cache, root)
    first = run(cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(launched(first)) == 4
    tuning = (root / "tuning.md").read_text()
    assert "## adamw: optim.lr" in tuning and "## muon: optim.muon.lr (with optim.lr=" in tuning
    frozen = json.loads((root / st.STUDY_FILE).read_text())
    assert len(frozen["jobs"]) == 8 and frozen["study"]["seeds"] == [1, 2]  # every job's expanded config
    adamw_lr = frozen["jobs"]["eval/adamw_s1"]["optim"]["lr"]
    assert frozen["jobs"]["eval/muon_s1"]["optim"]["lr"] == adamw_lr  # Muon's AdamW part at AdamW's best
    r = rp.build_report(root / "report")  # rebuilt from the per-seed results the study wrote
    assert r.from_results and [a.label for a in r.arms] == ["adamw", "muon"]
    assert [sorted(j.seed for j in a.finished) for a in r.arms] == [["1", "2"], ["1", "2"]]
    assert all(c.test is not None and c.test.test == "paired t" for c in r.comparisons)
    assert rp.check_report(root / "report") == []
    muon = r.arm("muon").finished[0].summary
    assert muon is not None and muon.optimizer_flops and muon.cpu_s and r.arm("adamw").stat("optimizer_flops").mean == 0

    again = run(cmd)  # everything finished: nothing runs again
    assert again.returncode == 0, again.stderr[-3000:]
    assert launched(again) == []
    dry = run([*cmd, "--dry-run"])
    assert dry.returncode == 0 and f"nothing to run: every job of {root} finished" in dry.stdout

    # a job killed after its step-2 checkpoint: no summary, no final weights, no later checkpoint
    job = root / "eval" / "muon_s2"
    expected = json.loads((job / "summary.json").read_text())["val_loss"]
    for name in ("summary.json", "model.pt"):
        (job / name).unlink()
    for later in (job / "checkpoints").glob("step_*4*"):
        shutil.rmtree(later) if later.is_dir() else later.unlink()
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (line,) = launched(resumed)
    assert "optim=muon" in line and "train.seed=2 " in line
    assert "at step 2" in (job / "run.log").read_text()
    assert json.loads((job / "summary.json").read_text())["val_loss"] == expected  # exact resume
    assert [r["step"] for r in read_metrics(job) if "val/loss" in r] == [2, 4]  # each evaluation once

    changed = run([*cmd, "study.tune_seed=7"])
    assert changed.returncode == 2 and "was started with other settings" in changed.stderr


@pytest.mark.slow
def test_a_study_matched_in_time_paces_each_arm_and_trains_it_for_the_reference_arms_seconds(
    tinystories_dir, data_cache, tmp_path
):
    root = tmp_path / "study"
    cmd = study_cmd(tinystories_dir, data_cache, root, "study.match=time", "study.pace_steps=6", "train.max_steps=6")
    first = run(cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    budget = json.loads((root / st.STUDY_FILE).read_text())["budget"]
    assert budget["match"] == "time" and budget["reference"] == "adamw"
    for arm in ("adamw", "muon"):  # the median seconds per step after the first, from each pace run's log
        steps = [r for r in read_metrics(root / "pace" / f"{arm}_s0") if "perf/step_s" in r]
        assert [r["step"] for r in steps] == list(range(1, 7))  # train.log_every=1
        assert budget["per_step"][arm] == statistics.median(r["perf/step_s"] for r in steps[1:])
    t = budget["per_step"]
    muon_steps = max(1, round(6 * t["adamw"] / t["muon"]))
    assert budget["steps"] == {"adamw": 6, "muon": muon_steps}
    for job in ("eval/adamw_s1", "tune_muon/lr0.002"):
        arm_steps = 6 if "adamw" in job else muon_steps
        assert json.loads((root / job / "summary.json").read_text())["step"] == arm_steps
    assert "## Budget: equal time (reference arm: adamw)" in (root / "tuning.md").read_text()
    report = (root / "report" / "report.md").read_text()
    same = "Every arm sees the same tokens" in report
    assert same == (muon_steps == 6) and same != ("trained different numbers of tokens" in report)
    again = run(cmd)  # the pace runs finished too: nothing runs again, the budget stays
    assert again.returncode == 0 and launched(again) == []
    assert json.loads((root / st.STUDY_FILE).read_text())["budget"] == budget


def test_a_study_recipe_that_also_sweeps_through_hydra_is_refused(capsys):
    assert st.main(["experiment=moe_x_muon", "~local", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "hydra.sweeper.params: the recipe also sweeps ['model', 'optim', 'train.seed']" in err
