"""One process per run folder (lease.py): a second process is refused before it writes anything, naming the holder;
a lease left by a dead process is taken over; the lease is given back however a run ends; a torchrun worker whose
agent died stops. And the run folder's clean-ups at start: leftovers of writes killed midway, and
train.overwrite=true deleting every record of the previous run (model.pt included)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from scaletrain import distributed, records
from scaletrain.lease import Lease, RunFolderBusy
from scaletrain.records import RunDirInUse, RunState
from scaletrain.trainer import Trainer, train

from ..conftest import REPO, compose_cfg, tiny_overrides, train_losses
from ..test_distributed import _LAUNCH_VARS

SHORT = {"train.max_steps": 10, "train.ckpt_every": 5, "train.eval_every": 10}  # a checkpoint at 5 and at 10
# a helper process that takes a folder's lease through the API and keeps it until it is killed
HOLD = (
    "import sys, time; from scaletrain.lease import Lease; Lease(sys.argv[1]).acquire('torchrun'); "
    "print('held', flush=True); time.sleep(600)"
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tinystories_dir, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("finished")
    train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **SHORT)), run_dir)
    return run_dir


@contextlib.contextmanager
def held_by_another_process(run_dir: Path) -> Iterator[subprocess.Popen]:
    """A live process holding `run_dir`'s lease for the block (killed after it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _is_free(run_dir: Path) -> bool:
    """Whether a new holder could take the lease now. In-process is a real test: flock locks belong to open file
    descriptions, so a descriptor the run leaked (still locked) conflicts with this new one."""
    try:
        Lease(run_dir).acquire().release()
    except RunFolderBusy:
        return False
    return True


@pytest.mark.fault(
    "train.resume=auto in a folder whose run is still going (another live process holds its lease)",
    "refused before writing anything (every file unchanged), one message naming the holder's host, pid and start",
)
def test_a_second_process_is_refused_before_writing_anything_and_told_who_holds_the_folder(
    finished_run, tmp_path, tinystories_dir, data_cache
):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    cfg = compose_cfg(tiny_overrides(tinystories_dir, data_cache, **{**SHORT, "train.resume": "auto"}))
    with held_by_another_process(run_dir) as holder:
        before = _snapshot(run_dir)  # the holder's .lease included
        with pytest.raises(RunFolderBusy) as refused:
            train(cfg, run_dir)
        with pytest.raises(RunFolderBusy, match=f"is in use by pid {holder.pid} "):
            Lease(run_dir).check_free()  # the preflight's look, which writes nothing either
        assert _snapshot(run_dir) == before  # not status.json, config.json, metrics, checkpoints, nor the lease
        since = json.loads((run_dir / records.LEASE_FILE).read_text())["since"]
    message = str(refused.value)
    assert f"is in use by pid {holder.pid} on {socket.gethostname()} (since {since}, torchrun)" in message
    assert "\n" not in message and RunFolderBusy.kind == "run folder"


@pytest.mark.fault(
    "a lease file left by a process killed with SIGKILL (the file names it; nobody holds the lock)",
    "the next run takes the lease over (logging whose it was), trains, and the file names the new holder",
)
def test_a_lease_left_by_a_dead_process_is_taken_over(tmp_path, tinystories_dir, data_cache, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with held_by_another_process(run_dir) as dead:
        pass  # killed at the end of the block: the lock goes with it, the file stays
    assert json.loads((run_dir / records.LEASE_FILE).read_text())["pid"] == dead.pid
    Lease(run_dir).check_free()  # the file is there, its lock is not
    with caplog.at_level("INFO", logger="scaletrain"):
        summary = train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **{"train.max_steps": 2})), run_dir)
    assert summary.step == 2 and f"from pid {dead.pid} on {socket.gethostname()}" in caplog.text
    assert json.loads((run_dir / records.LEASE_FILE).read_text())["pid"] == os.getpid()
    assert _is_free(run_dir)


@pytest.mark.fault(
    "a run that fails at step 10 (an exception in the loop), then train.resume=auto in its folder",
    "the failed run gave its lease back; the resume takes it, continues from the step-5 checkpoint and finishes",
)
def test_the_lease_is_given_back_after_a_failed_run_so_it_can_be_resumed(
    tmp_path, tinystories_dir, data_cache, monkeypatch
):
    run_dir = tmp_path / "run"
    log_train = Trainer.log_train

    def fail_at_step_10(self, *args, **kwargs):
        if self.step == 10:  # logged before step 10's checkpoint: the newest is step 5's
            raise RuntimeError("injected failure")
        return log_train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "log_train", fail_at_step_10)
    with pytest.raises(RuntimeError, match="injected failure"):
        train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **SHORT)), run_dir)
    status = records.read_status(run_dir)
    assert status is not None and status.state == RunState.failed and _is_free(run_dir)
    monkeypatch.setattr(Trainer, "log_train", log_train)
    summary = train(
        compose_cfg(tiny_overrides(tinystories_dir, data_cache, **{**SHORT, "train.resume": "auto"})), run_dir
    )
    assert summary.step == 10 and _is_free(run_dir)


@pytest.mark.fault("a run that finished", "its lease is given back: another process may take the folder")
def test_the_lease_is_given_back_after_a_finished_run(finished_run):
    assert records.read_summary(finished_run) is not None and _is_free(finished_run)


@pytest.mark.fault(
    "a torchrun worker whose agent died (its parent pid changed since start)",
    "check_supervised raises AgentGone naming both pids; same parent, or another launcher: nothing",
)
def test_the_orphan_check_fires_when_the_torchrun_agent_is_gone(monkeypatch):
    torchrun = distributed.DistEnv(rank=1, world_size=2, launcher="torchrun")
    monkeypatch.setattr(distributed, "TORCHRUN_AGENT_PID", 4242)
    monkeypatch.setattr(distributed.os, "getppid", lambda: 4242)
    distributed.check_supervised(torchrun)  # the agent is still the parent
    monkeypatch.setattr(distributed.os, "getppid", lambda: 1)  # re-parented to init
    with pytest.raises(distributed.AgentGone) as gone:
        distributed.check_supervised(torchrun)
    assert str(gone.value).startswith("rank 1: the torchrun agent that started this worker (pid 4242) is gone")
    assert "(the parent is now pid 1)" in str(gone.value) and gone.value.kind == "launcher"
    distributed.check_supervised(distributed.DistEnv(launcher="srun"))  # only torchrun's workers are checked


@pytest.mark.fault(
    "train() in a torchrun worker (1 rank) whose agent is already gone",
    "stops before its first step with AgentGone; status.json says failed; the lease is given back",
)
def test_an_orphaned_torchrun_worker_stops_before_training(tmp_path, tinystories_dir, data_cache, monkeypatch):
    for key, value in {"TORCHELASTIC_RUN_ID": "t1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "TORCHRUN_AGENT_PID", os.getppid() + 1)  # not this process's parent
    run_dir = tmp_path / "run"
    with pytest.raises(distributed.AgentGone):
        train(compose_cfg(tiny_overrides(tinystories_dir, data_cache)), run_dir)
    status = records.read_status(run_dir)
    assert status is not None and status.state == RunState.failed and status.step == 0
    assert status.error is not None and status.error.startswith("AgentGone: rank 0: the torchrun agent")
    assert train_losses(run_dir) == {}  # not one step trained
    assert _is_free(run_dir)


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s  # a bound against hanging, not a timing assertion
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.fault(
    "torchrun's agent killed with SIGKILL while its worker trains (the worker lives on, re-parented)",
    "the worker stops at its next step: status.json failed with AgentGone; its lease is given back",
)
def test_the_worker_of_a_killed_torchrun_agent_stops_at_its_next_step(tmp_path, tinystories_dir, data_cache):
    run_dir = tmp_path / "run"
    extra = {"train.max_steps": 100_000, "train.log_every": 1, "train.eval_every": 0, "train.ckpt_every": 0}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "scaletrain.run"]
    cmd += [*tiny_overrides(tinystories_dir, data_cache, **extra), f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("SLURM_")}
    agent = subprocess.Popen(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    worker = None
    try:
        _wait_for(lambda: (run_dir / records.METRICS_FILE).is_file() and train_losses(run_dir), 180, "training step")
        worker = json.loads((run_dir / records.LEASE_FILE).read_text())["pid"]
        assert worker != agent.pid
        agent.kill()  # SIGKILL: the agent cannot stop its worker (a new session: the kill does not reach it)
        agent.wait()
        _wait_for(lambda: _is_free(run_dir), 60, "lease given back")
    finally:
        agent.kill()
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
    status = records.read_status(run_dir)
    assert status is not None and status.state == RunState.failed and status.pid == worker
    assert status.error is not None and status.error.startswith("AgentGone: rank 0: the torchrun agent that started")


@pytest.mark.fault(
    "temporary files of writes killed midway (.status.json.*.tmp, .model.pt.*.tmp, checkpoints/.step_*.pt.*.tmp)",
    "removed at the next start with a warning naming each; other hidden files stay",
)
def test_leftovers_of_killed_writes_are_removed_at_start(finished_run, tmp_path, tinystories_dir, data_cache, caplog):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    leftovers = [
        run_dir / f".{records.STATUS_FILE}.123-0123abcd.tmp",
        run_dir / f".{records.MODEL_FILE}.456-89abcdef.tmp",
        run_dir / records.CKPT_DIR / ".step_0000010.pt.789-deadbeef.tmp",
    ]
    others = [run_dir / ".notes.tmp", run_dir / ".keep"]  # not atomic_write's names
    for path in leftovers + others:
        path.write_bytes(b"partial")
    extra = {**SHORT, "train.resume": "auto", "train.max_steps": 12}
    with caplog.at_level("WARNING", logger="scaletrain"):
        train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), run_dir)
    assert [p for p in leftovers if p.exists()] == [] and all(p.exists() for p in others)
    for path in leftovers[:2]:
        assert f"removed {path}: left by a write that did not finish" in caplog.text
    assert f"removed {leftovers[2]}: left by a checkpoint save that did not finish" in caplog.text


@pytest.mark.fault(
    "the name atomic_write gives its temporary file (what a kill mid-write leaves)",
    "matches the pattern the clean-up at start removes (records.ATOMIC_TMP)",
)
def test_atomic_writes_name_their_temporary_files_as_the_clean_up_expects(tmp_path):
    seen = []
    records.atomic_write(tmp_path / records.STATUS_FILE, lambda f: seen.append(Path(f.name).name))
    assert records.ATOMIC_TMP.match(seen[0]) and seen[0].startswith(f".{records.STATUS_FILE}.{os.getpid()}-")


@pytest.mark.fault(
    "train.overwrite=true in a finished run's folder that also holds model.pt and eval.json",
    "every record of the old run is deleted first (model.pt and eval.json included); the new run's model.pt is its own",
)
def test_overwrite_deletes_every_record_of_the_old_run_model_pt_included(
    finished_run, tmp_path, tinystories_dir, data_cache, caplog
):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    (run_dir / records.EVAL_FILE).write_text("{}\n")
    assert torch.load(run_dir / records.MODEL_FILE, weights_only=True)["step"] == 10
    extra = {"train.overwrite": "true", "train.max_steps": 3, "train.eval_every": 0, "train.ckpt_every": 0}
    with caplog.at_level("WARNING", logger="scaletrain"):
        train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), run_dir)
    assert f"deleted another run's records in {run_dir} (" in caplog.text
    deleted = caplog.text.split(f"deleted another run's records in {run_dir} (", 1)[1].split(")", 1)[0].split(", ")
    assert {records.MODEL_FILE, records.EVAL_FILE, records.CKPT_DIR, records.METRICS_FILE} <= set(deleted)
    assert not (run_dir / records.EVAL_FILE).exists()
    assert torch.load(run_dir / records.MODEL_FILE, weights_only=True)["step"] == 3  # written by the new run


@pytest.mark.fault(
    "a fresh run in a folder holding only another run's model.pt",
    "refused (RunDirInUse naming model.pt) unless train.overwrite=true",
)
def test_a_folder_holding_only_a_model_pt_is_another_runs(tmp_path):
    (tmp_path / records.MODEL_FILE).write_bytes(b"weights")
    with pytest.raises(RunDirInUse, match=r"holds another run's records \(model.pt\)"):
        records.check_run_dir_free(tmp_path, overwrite=False)
    assert records.check_run_dir_free(tmp_path, overwrite=True) == [tmp_path / records.MODEL_FILE]
