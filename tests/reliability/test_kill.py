"""kill -9 trials on real training subprocesses (`python -m scaletrain.run`): at random steps, and in the
middle of a checkpoint save (full file half written; sharded folder with every shard but a half-written
extra.pt). After each kill the report calls the run "died"; `train.resume=auto` then removes what the
killed save left, resumes from the last complete checkpoint, and the run's losses equal an uninterrupted
run's exactly, each step logged once. The random steps come from a seeded generator, so a failure
reproduces."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaletrain import records
from scaletrain import report as rp

from ..conftest import REPO, read_metrics, tiny_overrides, train_losses

pytestmark = pytest.mark.slow
FAULTY_RUN = Path(__file__).with_name("faulty_run.py")
STEPS = 20
_rng = random.Random(20261127)
RANDOM_STEPS = {"full": _rng.sample(range(2, STEPS), 1), "sharded": _rng.sample(range(2, STEPS), 1)}


def _command(run_dir: Path, data: Path, cache: Path, fmt: str, resume: str = "none", script: Path | None = None):
    extra = {
        "train.max_steps": STEPS,
        "train.log_every": 1,
        "train.ckpt_every": 5,
        "train.ckpt_format": fmt,
        "train.resume": resume,
        "hydra.run.dir": run_dir,
    }
    head = [sys.executable, str(script)] if script else [sys.executable, "-m", "scaletrain.run"]
    return head + tiny_overrides(data, cache, **extra)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tinystories_dir, data_cache) -> dict[int, float]:
    """Losses of every step of an uninterrupted run (both formats train the same numbers)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    done = _run(_command(run_dir, tinystories_dir, data_cache, "full"))
    assert done.returncode == 0, done.stderr
    return train_losses(run_dir)


def _last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / records.METRICS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.endswith("}")]
    return max(steps, default=0)


def _kill_at_step(cmd: list[str], run_dir: Path, step: int) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while _last_step(run_dir) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, (
        f"the run ended before step {step}: {proc.stderr.read().decode() if proc.stderr else ''}"
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _resume_and_check(run_dir: Path, data: Path, cache: Path, fmt: str, reference: dict[int, float]) -> str:
    died = rp.judge(run_dir, None, None, time.time(), stale_after_s=1800)
    assert died[0] == rp.JobStatus.died, died
    done = _run(_command(run_dir, data, cache, fmt, resume="auto"))
    assert done.returncode == 0, done.stderr
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1))  # each step once: the killed attempt's extra steps were dropped
    assert train_losses(run_dir) == reference  # exactly
    assert records.read_status(run_dir).state == records.RunState.finished  # type: ignore[union-attr]
    assert not [p for p in (run_dir / records.CKPT_DIR).iterdir() if p.name.startswith(".")]  # no leftovers
    return done.stdout + done.stderr


@pytest.mark.parametrize(
    "fmt,step",
    [
        pytest.param(
            fmt,
            step,
            marks=pytest.mark.fault(
                f"kill -9 at a random step ({fmt} checkpoints, step {step} of {STEPS})",
                'report: "died"; resume=auto continues from the last checkpoint; losses equal an uninterrupted run',
            ),
        )
        for fmt in ("full", "sharded")
        for step in RANDOM_STEPS[fmt]
    ],
)
def test_kill_9_at_a_random_step_then_resume_matches_an_uninterrupted_run(
    tmp_path, tinystories_dir, data_cache, reference, fmt, step
):
    run_dir = tmp_path / "run"
    _kill_at_step(_command(run_dir, tinystories_dir, data_cache, fmt), run_dir, step)
    _resume_and_check(run_dir, tinystories_dir, data_cache, fmt, reference)


@pytest.mark.parametrize(
    "fmt",
    [
        pytest.param(
            fmt,
            marks=pytest.mark.fault(
                f"kill -9 in the middle of a {fmt} checkpoint save (step 10)",
                "the half-written save is never listed; resume=auto removes it, resumes from step 5, same losses",
            ),
        )
        for fmt in ("full", "sharded")
    ],
)
def test_kill_9_in_the_middle_of_a_save_leaves_the_previous_checkpoint_and_resume_cleans_up(
    tmp_path, tinystories_dir, data_cache, reference, fmt
):
    run_dir = tmp_path / "run"
    killed = _run(_command(run_dir, tinystories_dir, data_cache, fmt, script=FAULTY_RUN), env={"KILL_AT_SAVE": "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ckpt_dir = run_dir / records.CKPT_DIR
    leftovers = [p.name for p in ckpt_dir.iterdir() if p.name.startswith(".step_0000010")]
    assert leftovers, "the fault did not leave a half-written save"
    assert [p.name for p in records.list_checkpoints(ckpt_dir)] == [records.checkpoint_name(5, fmt == "sharded")]
    log = _resume_and_check(run_dir, tinystories_dir, data_cache, fmt, reference)
    assert "left by a checkpoint save that did not finish" in log
    assert f"resumed from {ckpt_dir / records.checkpoint_name(5, fmt == 'sharded')} at step 5" in log
