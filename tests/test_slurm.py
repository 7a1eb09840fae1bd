"""`-m cluster=slurm` against a real SLURM cluster: a sweep runs through sbatch and records its job ids,
a job preempted by SLURM's warning signal checkpoints, requeues and ends like an uninterrupted run,
and a failing job is reported with its log file.

Needs the single-node cluster of `.ci/slurm.sh` (bash .ci/slurm.sh up; export SLURM_CONF=...); every
test here is marked `slurm` and skipped when SLURM_CONF is unset or `sinfo` does not answer. The jobs
are tiny CPU runs: one or two gloo ranks, `cluster.gpus_per_node=0`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, TORCHRUN_2, read_metrics, read_summary, tiny_overrides, train_losses


def _cluster_answers() -> str | None:
    """None when a SLURM cluster answers, else why the tests are skipped."""
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF is unset: start a cluster with `bash .ci/slurm.sh up` and export what it prints"
    if shutil.which("sinfo") is None:
        return "no `sinfo` on PATH (SLURM client tools missing; `bash .ci/slurm.sh up` installs them)"
    try:
        res = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`sinfo` did not answer within 20 s"
    return None if res.returncode == 0 else f"`sinfo` failed: {res.stderr.strip()}"


_SKIP = _cluster_answers()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

CPU_JOB = [
    "cluster=slurm",
    "cluster.gpus_per_node=0",
    "cluster.cpus_per_task=1",
    "cluster.partition=debug",
    "cluster.timeout_min=30",
]


def _env() -> dict[str, str]:
    # jobs inherit the submitter's environment (sbatch --export=ALL): one thread per rank on 2 cores
    return {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def _sweep_cmd(*overrides: object) -> list[str]:
    return [sys.executable, "-m", "scaletrain.run", "-m", *CPU_JOB, *map(str, overrides)]


def _sacct_states(job_id: str, timeout_s: float = 60) -> dict[str, str]:
    """Final accounting states (the client returns once the results are written; the jobs end a bit later)."""
    deadline = time.time() + timeout_s
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        states = dict(line.split("|") for line in out.splitlines())  # "CANCELLED by 0" has spaces
        if time.time() > deadline or not {"PENDING", "RUNNING", "COMPLETING", "REQUEUED"} & set(states.values()):
            return states
        time.sleep(0.5)


def test_a_two_job_sweep_runs_through_sbatch_and_records_its_slurm_job_ids(tinystories_dir, data_cache, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = _sweep_cmd(
        "cluster.tasks_per_node=1",
        "train.seed=1,2",
        *tiny_overrides(tinystories_dir, data_cache),
        f"hydra.sweep.dir={sweep}",
    )
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=_env())
    assert res.returncode == 0, res.stderr[-4000:]
    records = [json.loads((sweep / str(n) / "run_info.json").read_text())["cluster"] for n in (0, 1)]
    array_id = records[0]["SLURM_ARRAY_JOB_ID"]
    assert [(r["launcher"], r["SLURM_ARRAY_JOB_ID"], r["SLURM_ARRAY_TASK_ID"]) for r in records] == [
        ("submitit-slurm", array_id, "0"),
        ("submitit-slurm", array_id, "1"),
    ]
    assert records[0]["SLURM_JOB_ID"] != records[1]["SLURM_JOB_ID"]
    for n in (0, 1):
        assert read_summary(sweep / str(n))["step"] == 20
        assert json.loads((sweep / str(n) / "status.json").read_text())["state"] == "finished"
        assert Path(records[n]["log_stdout"]).is_file()
    assert _sacct_states(array_id) == {f"{array_id}_0": "COMPLETED", f"{array_id}_1": "COMPLETED"}


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def _step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "status.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def test_a_preempted_job_checkpoints_requeues_and_ends_like_an_uninterrupted_run(tinystories_dir, data_cache, tmp_path):
    steps = {
        "train.max_steps": 60,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.ckpt_every": 0,
        "train.sample_count": 0,
    }
    overrides = tiny_overrides(tinystories_dir, data_cache, **steps, **{"train.parallel": "fsdp"})
    # the same two FSDP2 ranks, uninterrupted (over 60 steps, one process drifts away from two by float
    # summation order: ~1e-6 for a dozen steps, then growing; the sharded layout must match exactly)
    reference = tmp_path / "reference"
    res = subprocess.run(
        [
            *TORCHRUN_2,
            "-m",
            "scaletrain.run",
            *overrides,
            f"hydra.run.dir={reference}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert res.returncode == 0, res.stderr[-3000:]

    sweep = tmp_path / "sweep"
    job = sweep / "0"
    cmd = _sweep_cmd("cluster.tasks_per_node=2", *overrides, "logging.wandb.mode=offline", f"hydra.sweep.dir={sweep}")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(lambda: _step(job) >= 5, 300, "step 5 of the job", proc)
        job_id = json.loads((job / "run_info.json").read_text())["cluster"]["SLURM_JOB_ID"]
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)  # SLURM's warning signal
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-4000:]

    info = json.loads((job / "run_info.json").read_text())["cluster"]  # written again by the second attempt
    assert (info["SLURM_JOB_ID"], info["SLURM_RESTART_COUNT"], info["world_size"]) == (job_id, "1", 2)
    log = Path(info["log_stdout"]).read_text()
    assert "SIGUSR2: checkpoint saved, job requeued" in log
    stopped_at = int(log.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert 5 <= stopped_at < 60
    logged = [r["step"] for r in read_metrics(job) if "train/loss" in r]
    assert logged == list(range(1, 61))  # each step once, in order: records after the checkpoint were dropped
    losses = train_losses(job)
    assert [losses[s] for s in range(1, 61)] == pytest.approx(
        [train_losses(reference)[s] for s in range(1, 61)], abs=1e-6
    )
    summary = read_summary(job)
    assert summary["step"] == 60
    # FSDP2 checkpoints are sharded DCP folders: the one written on the signal, and the final one
    ckpts = sorted(p for p in (job / "checkpoints").iterdir() if not p.name.startswith("."))
    assert [p.name for p in ckpts] == [f"step_{stopped_at:07d}", "step_0000060"] and all(p.is_dir() for p in ckpts)
    attempts = sorted(p.name for p in (job / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(name.endswith(summary["wandb_id"]) for name in attempts)  # one W&B run
    assert _sacct_states(job_id)[job_id] == "COMPLETED"  # not resubmitted once max_steps is reached


def test_a_cancelled_job_saves_its_step_and_stays_cancelled(tinystories_dir, data_cache, tmp_path):
    """scancel sends SIGTERM too; requeueing then would resurrect the job (SLURM allows requeueing a job
    that is ending), so the trainer only requeues a job that is still RUNNING."""
    sweep = tmp_path / "sweep"
    job = sweep / "0"
    overrides = tiny_overrides(
        tinystories_dir,
        data_cache,
        **{"train.max_steps": 200, "train.log_every": 1, "train.eval_every": 0, "train.ckpt_every": 0},
    )
    proc = subprocess.Popen(
        _sweep_cmd("cluster.tasks_per_node=1", *overrides, f"hydra.sweep.dir={sweep}"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        _wait_for(lambda: _step(job) >= 3, 300, "step 3 of the job", proc)
        job_id = json.loads((job / "run_info.json").read_text())["cluster"]["SLURM_JOB_ID"]
        subprocess.run(["scancel", job_id], check=True, timeout=30)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "CANCELLED" in err
    status = json.loads((job / "status.json").read_text())
    assert status["state"] == "interrupted" and "SIGTERM" in status["error"]
    assert (job / "checkpoints" / f"step_{status['step']:07d}.pt").is_file()
    assert _sacct_states(job_id)[job_id].startswith("CANCELLED")
    assert "SLURM_RESTART_COUNT" not in json.loads((job / "run_info.json").read_text())["cluster"]


def test_a_job_that_raises_is_reported_as_failed_with_its_log_file(tinystories_dir, data_cache, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = tiny_overrides(tinystories_dir, data_cache, **{"data.path": tmp_path / "no_such_corpus"})
    res = subprocess.run(
        _sweep_cmd("cluster.tasks_per_node=1", *overrides, f"hydra.sweep.dir={sweep}"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert res.returncode != 0
    assert "job 0 (" in res.stderr and "failed: DataError" in res.stderr
    log = Path(res.stderr.split("log: ")[1].split()[0])
    assert log.is_relative_to(sweep / ".submitit") and "no_such_corpus" in log.read_text()
    assert json.loads((sweep / "0" / "status.json").read_text())["state"] == "failed"


def test_a_job_whose_command_dies_is_reported_failed_with_its_log_path(tinystories_dir, data_cache, tmp_path):
    sweep = tmp_path / "sweep"
    res = subprocess.run(
        _sweep_cmd(
            "cluster.tasks_per_node=1",
            "cluster.setup=[exit 3]",
            *tiny_overrides(tinystories_dir, data_cache),
            f"hydra.sweep.dir={sweep}",
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert res.returncode != 0
    assert "has not produced any output (state: FAILED)" in res.stderr
    assert str(sweep / ".submitit") in res.stderr  # submitit names the job's log files
