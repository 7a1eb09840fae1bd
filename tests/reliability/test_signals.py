"""Signals on a real training subprocess outside a scheduler: Ctrl-C (SIGINT) and SIGTERM each save a
checkpoint of the current step, record "interrupted" with that step, and stop with the shell's signal code
and one log line, no traceback. (Under a scheduler SIGTERM/USR2 also requeue: tests/test_slurm.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from scaletrain.records import RunState, read_status

from ..conftest import REPO, tiny_overrides


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig,code",
    [
        pytest.param(
            signal.SIGINT,
            130,
            marks=pytest.mark.fault(
                "Ctrl-C (SIGINT) during training",
                'checkpoint of the current step saved; status "interrupted"; exit 130, one line, no traceback',
            ),
        ),
        pytest.param(
            signal.SIGTERM,
            143,
            marks=pytest.mark.fault(
                "SIGTERM during training (outside a scheduler)",
                'checkpoint of the current step saved; status "interrupted"; exit 143, one line, no traceback',
            ),
        ),
    ],
)
def test_a_signal_during_training_saves_a_checkpoint_and_records_interrupted(
    tmp_path, tinystories_dir, data_cache, sig, code
):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        tinystories_dir, data_cache, **{"train.max_steps": 100000, "train.ckpt_every": 0, "train.eval_every": 0}
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "scaletrain.run", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and "train/loss" in metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)  # wait until training steps are being logged
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    status = read_status(run_dir)
    assert status is not None and status.state == RunState.interrupted and status.step > 0
    [saved] = (run_dir / "checkpoints").iterdir()  # ckpt_every=0: only the signal's checkpoint
    assert saved.name == f"step_{status.step:07d}.pt"
    assert "Traceback" not in err, err[-2000:]
    assert f"{sig.name}: checkpoint saved" in out  # one log line, not a traceback
