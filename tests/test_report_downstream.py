"""Downstream (lm-evaluation-harness) metrics in the report and the study: summary.json's `downstream` dict and the
curves' downstream/... keys compare like val/... keys, each in its own direction, with the task's own stderr shown
beside the seed spread; a misspelt key fails naming the ones the jobs have; summaries from before still load.

Synthetic sweeps through test_report's `write_job`, with planted numbers."""

from __future__ import annotations

import csv
import json

import pytest

from scaletrain import records
from scaletrain import report as rp
from scaletrain import study as st
from scaletrain.config import load_config
from scaletrain.report.collect import higher_is_better

from .conftest import compose_cfg
from .test_report import NOW, write_job

ACC = "downstream/local_tinystories_cloze/acc"
PPL = "downstream/local_tinystories_cloze/perplexity"
GSM = "downstream/local_gsm8k/exact_match/strict-match"
# per arm, per seed 1..3: (acc, acc_stderr, perplexity, perplexity_stderr); "wide" is better in accuracy and worse
# in perplexity, so a direction read the wrong way names the wrong arm in one of the two
PLANTED = {
    "narrow": [(0.30, 0.020, 30.0, 0.4), (0.31, 0.021, 31.0, 0.5), (0.32, 0.022, 32.0, 0.6)],
    "wide": [(0.40, 0.025, 35.0, 0.7), (0.42, 0.026, 36.5, 0.8), (0.44, 0.027, 37.5, 0.9)],
}


def downstream_sweep(sweep, arms=PLANTED):
    """Arms `model=<name>` x seeds 1..3 (paired), each job with its downstream metrics in summary.json and on
    its curves (at steps 5 and 10, the last equal to the summary's)."""
    for seed in (1, 2, 3):
        for i, (name, per_seed) in enumerate(arms.items()):
            acc, acc_se, ppl, ppl_se = per_seed[seed - 1]
            downstream = {ACC: acc, f"{ACC}_stderr": acc_se, PPL: ppl, f"{PPL}_stderr": ppl_se, GSM: 0.05}
            write_job(
                sweep,
                2 * (seed - 1) + i,
                [f"model={name}", f"train.seed={seed}"],
                3.0 + i / 10 + seed / 100,
                val_curve={ACC: [acc - 0.1, acc], PPL: [ppl * 2, ppl]},
                downstream=downstream,
            )
    return sweep


def final(r, key):
    """The one comparison of `key`'s final value (the report also compares it at equal FLOPs and time)."""
    (c,) = [c for c in r.comparisons if c.metric == rp.Metric(key)]
    return c


def test_downstream_metrics_improve_in_lm_evals_direction():
    assert higher_is_better(ACC) and higher_is_better(f"{ACC}_stderr") and higher_is_better(GSM)
    assert higher_is_better(f"{GSM}_stderr")
    for metric in ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert not higher_is_better(f"downstream/t/{metric}") and not higher_is_better(f"downstream/t/{metric}_stderr")
    assert not higher_is_better("val/loss") and higher_is_better("val/r/exact_match")  # the rule for the rest stays


def test_the_better_arm_is_named_in_each_downstream_metrics_own_direction(tmp_path):
    r = rp.build_report(downstream_sweep(tmp_path), now=NOW, metrics=[ACC, PPL])
    acc, ppl = final(r, ACC), final(r, PPL)
    assert acc.test == rp.paired_test([0.40, 0.42, 0.44], [0.30, 0.31, 0.32])  # wide vs narrow, seeds paired
    assert acc.significant and acc.sentence.startswith(f"wide vs narrow: wide is better: {ACC} wide - narrow = +0.11")
    assert ppl.test == rp.paired_test([35.0, 36.5, 37.5], [30.0, 31.0, 32.0])
    assert ppl.significant and ppl.sentence.startswith(f"wide vs narrow: narrow is better: {PPL} wide - narrow")
    md = r.markdown()
    assert f"### {ACC} (higher is better)" in md and f"### {PPL} (lower is better)" in md
    # read off the curves too, as val/... keys are: at equal FLOPs and time, and tokens to a target
    assert {m.at for m in r.metrics if m.key == ACC} == {None, "flops", "seconds"}
    # wide's accuracy curves 0.30 -> 0.40, 0.32 -> 0.42, 0.34 -> 0.44 from step 5 to 10 (512 tokens a step)
    reach = r.arm("wide").stat(rp.Metric.parse(f"{ACC}>=0.35")).values
    assert reach == pytest.approx([2560 * (1 + f) for f in (0.5, 0.3, 0.1)], abs=1e-9)


def test_the_table_shows_the_tasks_own_stderr_beside_the_seed_spread(tmp_path):
    r = rp.build_report(downstream_sweep(tmp_path), now=NOW, metrics=[ACC, PPL])
    md = r.markdown()
    header = next(line for line in md.splitlines() if line.startswith("| arm |"))
    assert f"| {ACC} | {PPL} |" in header
    # mean ± seed sd (n - 1), then the mean over seeds of the harness's stderr
    assert "| narrow | 3/3 | 3.0200 ± 0.0100 | 1.5100 ± 0.0050 | 0.3100 ± 0.0100 (task stderr 0.0210) | " in md
    assert "| 31.0000 ± 1.0000 (task stderr 0.5000) |" in md
    assert "| 0.4200 ± 0.0200 (task stderr 0.0260) | 36.3333 ± 1.2583 (task stderr 0.8000) |" in md
    assert "Task stderr: lm-evaluation-harness's own standard error" in md
    plain = rp.build_report(downstream_sweep(tmp_path / "plain"), now=NOW).markdown()
    assert "task stderr" not in plain.lower()  # val/... tables as before
    without = {a: [(acc, None, ppl, None) for acc, _, ppl, _ in seeds] for a, seeds in PLANTED.items()}
    no_stderr = rp.build_report(downstream_sweep(tmp_path / "no_se", without), now=NOW, metrics=[ACC]).markdown()
    assert "| 0.3100 ± 0.0100 |" in no_stderr and "task stderr" not in no_stderr.lower()


def test_a_misspelt_downstream_key_fails_in_one_line_listing_the_downstream_keys(tmp_path, capsys):
    sweep = downstream_sweep(tmp_path)
    have = f"{GSM}, {ACC}, {PPL}, val/bpb, val/loss"  # stderr keys are recorded, but not metrics to compare on
    error = rf"no job records {ACC}c \(did you mean '{ACC}'\?\); the jobs have: {have}$"
    with pytest.raises(rp.MetricError, match=error):
        rp.build_report(sweep, now=NOW, metrics=[f"{ACC}c"])
    assert rp.main([str(sweep), "--no-plots", "--metric", "downstream/local_tinystories_cloze/perplexty"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("report: metric 'downstream/local_tinystories_cloze/perplexty'")
    assert f"did you mean '{PPL}'?" in err[0] and ACC in err[0]
    with pytest.raises(rp.MetricError, match="improves the other way; write .*perplexity<=$"):
        rp.Metric.parse(f"{PPL}>=40")
    with pytest.raises(rp.MetricError, match="a val/... or downstream/... key"):
        rp.Metric("downstrem/x/acc")


def test_a_downstream_key_is_known_from_curves_and_not_refused_before_any_task_ran(tmp_path):
    running = tmp_path / "running"  # no summary yet, validation recorded, the tasks not run yet
    write_job(running, 0, ["model=a", "train.seed=1"], mtime=NOW - 10)
    write_job(running, 1, ["model=b", "train.seed=1"], mtime=NOW - 10)
    rp.build_report(running, now=NOW, metrics=[ACC])
    later = tmp_path / "later"  # a running job whose tasks ran once: its keys are on its curve
    write_job(later, 0, ["model=a", "train.seed=1"], mtime=NOW - 10, val_curve={ACC: [0.2, 0.3]})
    rp.build_report(later, now=NOW, metrics=[ACC])
    with pytest.raises(rp.MetricError, match=f"did you mean '{ACC}'"):
        rp.build_report(later, now=NOW, metrics=[f"{ACC}_norm"])


def test_per_seed_results_keep_the_downstream_metrics_and_rebuild_the_same_verdicts(tmp_path):
    out = tmp_path / "study"
    r = rp.build_report(downstream_sweep(tmp_path / "sweep"), now=NOW, metrics=[ACC, f"{PPL}<=36"])
    rp.write_report(r, out, plots=False)
    assert rp.check_report(out) == []
    rebuilt = rp.build_report(out, metrics=[ACC])
    assert final(rebuilt, ACC).sentence == final(r, ACC).sentence
    assert "(task stderr 0.0210)" in rebuilt.markdown()
    with (out / "runs.csv").open(newline="") as f:
        row = next(csv.DictReader(f))
    assert (row[ACC], row[f"{ACC}_stderr"]) == ("0.3", "0.02")


def test_a_summary_written_before_downstream_existed_still_loads(tmp_path):
    job = write_job(tmp_path, 0, ["model=a", "train.seed=1"], 3.0, downstream={ACC: 0.3})
    d = json.loads((job / records.SUMMARY_FILE).read_text())
    del d["downstream"]
    (job / records.SUMMARY_FILE).write_text(json.dumps(d))
    s = records.read_summary(job)
    assert s is not None and s.downstream == {} and s.val_loss == 3.0
    assert "downstream" not in records.Summary.numeric_fields()
    (j,) = rp.collect_jobs(tmp_path, now=NOW)
    assert j.status == rp.JobStatus.finished and j.value(ACC) is None
    with pytest.raises(rp.MetricError, match=f"no job records {ACC}"):  # finished without it: no such metric
        rp.build_report(tmp_path, now=NOW, metrics=[ACC])


@pytest.mark.parametrize(("select", "best"), [(PPL, 2e-3), (ACC, 4e-3)])
def test_a_study_tunes_on_a_downstream_metric_in_its_direction(select, best, tmp_path, monkeypatch):
    """Perplexity lowest at lr 2e-3, accuracy highest at 4e-3 (both inside adamw's grid 1e-3..8e-3)."""
    cfg = load_config(compose_cfg(["experiment=muon_vs_adamw", f"study.select={select}"]))
    study = st.Study(["experiment=muon_vs_adamw"], cfg, tmp_path)
    scores = {1e-3: (0.30, 33.0), 2e-3: (0.35, 30.0), 4e-3: (0.40, 31.0), 8e-3: (0.20, 34.0)}

    def launch(phase: st.Phase) -> None:
        for value, folder in phase.folders.items():
            acc, ppl = scores[float(value)]
            write_job(folder.parent, 0, ["train.seed=0"], 3.0, downstream={ACC: acc, PPL: ppl})
            (folder.parent / "0_train.seed=0").rename(folder)

    monkeypatch.setattr(study, "launch", launch)
    tuning = study.tune("adamw", {}, [])
    assert (tuning.best, tuning.edge) == (best, False)
    assert tuning.results == {lr: scores[lr][0 if select == ACC else 1] for lr in scores}


def test_a_study_selecting_a_misspelt_downstream_key_names_the_nearest_after_tuning(tmp_path, monkeypatch):
    cfg = load_config(compose_cfg(["experiment=muon_vs_adamw", f"study.select={ACC}_nrom"]))
    study = st.Study(["experiment=muon_vs_adamw"], cfg, tmp_path)

    def launch(phase: st.Phase) -> None:
        for folder in phase.folders.values():
            write_job(folder.parent, 0, ["train.seed=0"], 3.0, downstream={ACC: 0.3, f"{ACC}_norm": 0.31})
            (folder.parent / "0_train.seed=0").rename(folder)

    monkeypatch.setattr(study, "launch", launch)
    with pytest.raises(rp.MetricError, match=rf"no job records {ACC}_nrom \(did you mean '{ACC}_norm'\?\)"):
        study.tune("adamw", {}, [])
