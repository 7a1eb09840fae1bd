"""The record contracts of records.py, one test (or a few) per contract, each checked from the writer's side
to the reader's: run states -> the report's job status, Summary -> the report's tables, checkpoint names ->
checkpoint discovery, resume, rotation and the report, metric keys -> the report's curves, atomic_write."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from scaletrain import records
from scaletrain import report as rp
from scaletrain.records import RunState, Summary


def job_dir(sweep: Path, num: int = 0) -> Path:
    """A job directory as the trainer starts it: config.json is what makes the report find a job."""
    job = sweep / str(num)
    job.mkdir(parents=True)
    records.write_json(job / records.CONFIG_FILE, {"train": {"seed": num, "max_steps": 10}})
    return job


def a_summary(**changes) -> Summary:
    """The fields trainer.finish() reports."""
    s = Summary(
        step=10,
        tokens_seen=5120,
        val_loss=3.25,
        val_bpb=1.5,
        params_total=2_000_000,
        params_active=1_000_000,
        params_embedding=300_000,
        params_non_embedding=1_700_000,
        flops_per_token=6e6,
        flops=6e6 * 5120,
        wallclock_s=61.5,
        run_name="model=a",
        wandb_id="abc123",
        val={"val/loss": 3.25, "val/bpb": 1.5, "val/r/exact_match": 0.125},
        downstream={"downstream/t/acc": 0.25, "downstream/t/acc_stderr": 0.0125},
        optimizer_flops=2.5e8,
        cpu_s=118.75,
        residual_dtype="bfloat16",
    )
    return dataclasses.replace(s, **changes)


# ----------------------------------------------------------------------------------------------------
# Run states: every state the trainer writes has a status in the report


# What the report concludes from each state a live run (this process, on this host) writes last
REPORT_STATUS = {
    RunState.running: "running",
    RunState.finished: "finished",
    RunState.failed: "failed",
    RunState.interrupted: "stopped",
    RunState.requeued: "requeued",
}


def test_the_report_status_table_covers_every_run_state():
    assert set(REPORT_STATUS) == set(RunState)
    assert set(REPORT_STATUS.values()) <= set(rp.JobStatus)


@pytest.mark.parametrize("state", list(RunState))
def test_every_run_state_the_trainer_writes_gets_its_report_status(tmp_path, state):
    job = job_dir(tmp_path)
    if state == RunState.finished:  # the trainer writes summary.json, then the finished status
        records.write_summary(job, a_summary())
    records.write_status(job, state, 10, RuntimeError("loss is NaN") if state == RunState.failed else None)
    (j,) = rp.build_report(tmp_path, now=time.time()).jobs
    assert j.status == REPORT_STATUS[state]
    if state == RunState.failed:
        assert j.detail == "RuntimeError: loss is NaN"


def test_a_requeued_run_stays_requeued_however_long_it_waits_in_the_queue(tmp_path):
    job = job_dir(tmp_path)
    records.write_status(job, RunState.requeued, 10)
    (j,) = rp.build_report(tmp_path, now=time.time() + 7 * 24 * 3600, stale_after_s=1800).jobs
    assert j.status == "requeued" and j.detail.startswith("preempted at step 10 and requeued since ")


def test_finished_status_without_a_summary_is_failed_not_finished(tmp_path):
    records.write_status(job_dir(tmp_path), RunState.finished, 10)
    (j,) = rp.build_report(tmp_path, now=time.time()).jobs
    assert (j.status, j.detail) == ("failed", "status.json says finished at step 10, but there is no summary.json")


def test_an_interrupted_run_is_stopped_with_its_error_and_where_it_resumes(tmp_path):
    job = job_dir(tmp_path)
    (job / records.CKPT_DIR).mkdir()
    (job / records.CKPT_DIR / "step_0000020.pt").write_bytes(b"")
    records.write_status(job, RunState.interrupted, 20, KeyboardInterrupt())
    (j,) = rp.build_report(tmp_path, now=time.time()).jobs
    assert (j.status, j.detail) == (
        "stopped",
        "interrupted at step 20: KeyboardInterrupt; resume from step_0000020.pt with train.resume=auto",
    )


def test_a_written_status_reads_back_with_pid_host_error_and_traceback(tmp_path):
    try:
        raise ValueError("bad batch")
    except ValueError as err:
        written = records.write_status(tmp_path, "failed", 7, err)  # a plain string is accepted too
    status = records.read_status(tmp_path)
    assert status == written
    assert (status.state, status.step, status.pid, status.host) == (
        RunState.failed,
        7,
        os.getpid(),
        socket.gethostname(),
    )
    assert status.error == "ValueError: bad batch" and "raise ValueError" in status.traceback
    assert json.loads((tmp_path / records.STATUS_FILE).read_text())["state"] == "failed"


def test_a_state_the_report_does_not_know_cannot_be_written(tmp_path):
    with pytest.raises(ValueError, match="'paused' is not a valid RunState"):
        records.write_status(tmp_path, "paused", 3)
    assert not (tmp_path / records.STATUS_FILE).exists()


def test_reading_a_status_with_an_unknown_state_names_the_known_ones(tmp_path):
    (tmp_path / records.STATUS_FILE).write_text(json.dumps({"state": "paused"}))
    with pytest.raises(ValueError, match="unknown run state 'paused'; known: \\['running', 'finished'"):
        records.read_status(tmp_path)
    assert records.read_status(tmp_path / "nowhere") is None


# ----------------------------------------------------------------------------------------------------
# Summary: one definition for the trainer, W&B and the report


def test_summary_fields_are_the_documented_summary_json_keys():
    assert Summary.fields() == (
        "step",
        "tokens_seen",
        "val_loss",
        "val_bpb",
        "params_total",
        "params_active",
        "params_embedding",
        "params_non_embedding",
        "flops_per_token",
        "flops",
        "wallclock_s",
        "run_name",
        "wandb_id",
        "val",
        "downstream",
        "optimizer_flops",
        "cpu_s",
        "residual_dtype",
    )
    assert set(rp.SUMMARY_STATS) <= set(Summary.fields())


def test_every_summary_field_round_trips_through_summary_json(tmp_path):
    """Each field set to a value of its own (no default left), written, read back equal, under its own key."""
    summary = a_summary()
    assert all(getattr(summary, name) not in (None, {}) for name in Summary.fields())
    records.write_summary(tmp_path, summary)
    assert list(json.loads((tmp_path / records.SUMMARY_FILE).read_text())) == list(Summary.fields())
    assert records.read_summary(tmp_path) == summary


def test_the_summary_the_trainer_writes_round_trips_through_the_reports_reader(tmp_path):
    job = job_dir(tmp_path)
    summary = a_summary()
    records.write_summary(job, summary)
    assert records.read_summary(job) == summary
    r = rp.build_report(tmp_path, now=time.time())
    (j,) = r.jobs
    assert (j.status, j.summary) == ("finished", summary)
    for key in rp.SUMMARY_STATS:
        assert r.arms[0].stat(key).values == (float(getattr(summary, key)),), key


def test_a_summary_missing_a_field_is_an_error_naming_it_and_extra_keys_are_ignored():
    d = a_summary().to_dict()
    assert Summary.from_dict({**d, "added_by_a_newer_trainer": 1}) == a_summary()
    del d["val_bpb"], d["flops"]
    with pytest.raises(ValueError, match=r"summary lacks \['val_bpb', 'flops'\]"):
        Summary.from_dict(d)


def test_a_summary_written_before_the_later_fields_existed_reads_them_as_absent(tmp_path):
    """optimizer_flops and cpu_s came after study 003's runs: their summaries must still load (as None)."""
    d = a_summary().to_dict()
    for later in ("optimizer_flops", "cpu_s", "val", "downstream", "residual_dtype"):
        del d[later]
    records.write_json(tmp_path / records.SUMMARY_FILE, d)
    s = records.read_summary(tmp_path)
    assert s is not None and (s.optimizer_flops, s.cpu_s, s.val, s.downstream) == (None, None, {}, {})
    later = dict(optimizer_flops=None, cpu_s=None, val={}, downstream={}, residual_dtype=None)
    assert s == dataclasses.replace(a_summary(), **later)
    job = rp.Job(tmp_path, 0, [], rp.JobStatus.finished, summary=s)
    assert (job.value("val/loss"), job.value("optimizer_flops"), job.value("cpu_s")) == (3.25, None, None)


def test_a_field_chosen_by_name_is_checked_against_the_summary_naming_the_nearest():
    assert Summary.check_field("optimizer_flops", numeric=True) == "optimizer_flops"
    with pytest.raises(ValueError, match=r"'optimiser_flops' is no numeric summary field \(did you mean 'optimizer_"):
        Summary.check_field("optimiser_flops", numeric=True)
    with pytest.raises(ValueError, match=r"'run_name' is no numeric summary field"):
        Summary.check_field("run_name", numeric=True)
    not_numbers = {"run_name", "wandb_id", "val", "downstream", "residual_dtype"}
    assert set(Summary.numeric_fields()) == set(Summary.fields()) - not_numbers


# ----------------------------------------------------------------------------------------------------
# Checkpoint names: one listing for resume, rotation and the report


def make_checkpoints(ckpt_dir: Path) -> None:
    """Both formats, plus what a crash or an older layout can leave beside them."""
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "step_0000005.pt").write_bytes(b"full")
    for step in (10, 9_999_999, 10_000_000):  # sharded DCP folders, complete
        folder = ckpt_dir / records.checkpoint_name(step, sharded=True)
        folder.mkdir()
        (folder / records.DCP_METADATA).write_bytes(b"")
        (folder / records.SHARDED_EXTRA).write_bytes(b"")
    (ckpt_dir / "step_0000020.pt").write_bytes(b"full")
    (ckpt_dir / ".step_0000030.tmp").mkdir()  # a sharded save that crashed before its rename
    (ckpt_dir / ".step_0000030.tmp" / records.DCP_METADATA).write_bytes(b"")
    (ckpt_dir / ".step_0000030.pt.123-abcd.tmp").write_bytes(b"part")  # a full save that crashed
    (ckpt_dir / "step_0000040").mkdir()  # no .metadata yet: incomplete
    (ckpt_dir / "notes.txt").write_text("not a checkpoint")


def test_checkpoint_names_and_steps_round_trip_in_both_formats():
    assert records.checkpoint_name(20, sharded=False) == "step_0000020.pt"
    assert records.checkpoint_name(20, sharded=True) == "step_0000020"
    for name in ("step_0000020.pt", "step_0000020"):
        assert records.checkpoint_step(name) == 20
    for name in (".step_0000020.tmp", ".step_0000020.pt.1-ab.tmp", "step_20.pth", "extra.pt"):
        assert records.checkpoint_step(name) is None, name


def test_checkpoint_listing_finds_both_formats_in_step_order_and_ignores_temporaries(tmp_path):
    make_checkpoints(tmp_path / records.CKPT_DIR)
    names = [p.name for p in records.list_checkpoints(tmp_path / records.CKPT_DIR)]
    assert names == ["step_0000005.pt", "step_0000010", "step_0000020.pt", "step_9999999", "step_10000000"]
    assert records.list_checkpoints(tmp_path / "missing") == []


def test_resume_rotation_and_the_report_use_the_same_checkpoint_listing(tmp_path):
    from scaletrain import checkpoint as ckpt

    sweep = tmp_path / "sweep"
    job = job_dir(sweep)
    make_checkpoints(job / records.CKPT_DIR)
    os.utime(job / records.CONFIG_FILE, (0, 0))
    for p in (job / records.CKPT_DIR).iterdir():
        os.utime(p, (0, 0))
    (j,) = rp.build_report(sweep, now=3 * 3600, stale_after_s=1800).jobs
    assert j.status == "stopped" and j.detail.endswith("; resume from step_10000000 with train.resume=auto")
    assert ckpt.resume_candidates("auto", job)[0] == job / records.CKPT_DIR / "step_10000000"

    ckpt.save_checkpoint(job, 10_000_005, {"step": 10_000_005}, keep=2)
    left = sorted(p.name for p in (job / records.CKPT_DIR).iterdir())
    assert left == [
        ".step_0000030.pt.123-abcd.tmp",
        ".step_0000030.tmp",
        "notes.txt",
        "step_0000040",
        "step_10000000",
        "step_10000005.pt",
    ]


# ----------------------------------------------------------------------------------------------------
# Metric keys: what a run logs is what the report reads


def test_the_metric_records_a_run_logs_are_the_ones_the_report_reads(tmp_path):
    import torch

    from scaletrain.config import ModelConfig, MoEConfig
    from scaletrain.metrics import MetricsLogger
    from scaletrain.moe import MoE, moe_metrics

    torch.manual_seed(0)
    layer = MoE(ModelConfig(name="t", d_model=16, d_ff=32, n_layers=1), MoEConfig(name="t", n_experts=4, top_k=1))
    layer(torch.randn(2, 8, 16))
    moe_scalars, _ = moe_metrics(layer)  # the MoE layer names its own keys

    job = job_dir(tmp_path)
    logger = MetricsLogger(job, SimpleNamespace(mode="disabled"), {}, "run", None)
    logger.log(5, {records.TRAIN_LOSS: 6.1, records.TRAIN_TOKENS: 5 * 512, **moe_scalars})
    logger.log(5, {records.VAL_LOSS: 6.0, records.VAL_BPB: 3.0})
    logger.finish()
    (j,) = rp.build_report(tmp_path, now=time.time()).jobs
    assert j.curves[records.VAL_LOSS] == [rp.Point(5, 2560, None, 6.0)] and j.last_step == 5  # no step time logged
    assert j.moe_load == [(5, moe_scalars[records.MOE_LOAD_MAX_OVER_MEAN])]


def test_truncating_metrics_on_resume_keeps_records_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    from scaletrain.metrics import truncate_metrics

    lines = [json.dumps({records.STEP: s, records.TRAIN_LOSS: 1.0}) for s in (0, 10, 20, 30)]
    (tmp_path / records.METRICS_FILE).write_text("\n".join(lines) + '\n{"step": 40, "train/lo')
    truncate_metrics(tmp_path, 20)
    assert (tmp_path / records.METRICS_FILE).read_text() == "\n".join(lines[:3]) + "\n"
    assert os.listdir(tmp_path) == [records.METRICS_FILE]


# ----------------------------------------------------------------------------------------------------
# atomic_write


def test_atomic_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    records.atomic_write(path, "old text")
    records.atomic_write(path, b"\x00new bytes")
    assert path.read_bytes() == b"\x00new bytes"
    records.atomic_write(path, lambda f: f.write(b"from a writer function"))
    assert path.read_bytes() == b"from a writer function"
    assert os.listdir(tmp_path) == ["record.json"]


def test_a_write_that_fails_midway_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "state.pt"
    records.atomic_write(path, b"old")

    def half_then_disk_full(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        records.atomic_write(path, half_then_disk_full)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.pt"]


def test_a_status_whose_rename_fails_leaves_the_previous_status(tmp_path, monkeypatch):
    records.write_status(tmp_path, RunState.running, 10)

    def no_rename(src, dst):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(PermissionError, match="read-only file system"):
        records.write_status(tmp_path, RunState.failed, 11, RuntimeError("boom"))
    monkeypatch.undo()
    assert (records.read_status(tmp_path).state, records.read_status(tmp_path).step) == (RunState.running, 10)
    assert os.listdir(tmp_path) == [records.STATUS_FILE]


def test_the_report_reads_records_without_importing_torch():
    code = "import sys, scaletrain.report; assert 'torch' not in sys.modules, 'torch imported'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
