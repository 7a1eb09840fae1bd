"""Run-folder ownership: a fresh run (train.resume=none) refuses a folder holding another run's records
before writing anything, train.overwrite=true deletes them first, train.resume=auto continues them; rotation
never deletes a checkpoint of a later step than the one it just wrote."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from scaletrain import checkpoint as ckpt
from scaletrain import records
from scaletrain.records import RunDirInUse
from scaletrain.run import preflight
from scaletrain.trainer import train

from ..conftest import compose_cfg, read_metrics, tiny_overrides, train_losses

# a constant lr after warmup: a step's lr does not depend on train.max_steps, so a run extended from 20 to 30 steps
# trains as one that was given 30 from the start
CONSTANT_LR = {"optim.schedule.decay": "constant"}


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, tinystories_dir, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("old")
    train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **CONSTANT_LR, **{"train.max_steps": 20})), run_dir)
    return run_dir


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file's bytes but the lease's (not a record: the refused run held the folder while it looked)."""
    files = [p for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != records.LEASE_FILE]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in files}


@pytest.mark.fault(
    "a fresh run (train.resume=none) in another run's folder",
    "refused before writing anything, naming the folder, its records and the three ways on",
)
def test_a_fresh_run_refuses_a_folder_with_another_runs_records(old_run, tmp_path, tinystories_dir, data_cache):
    run_dir = _copy(old_run, tmp_path / "run")
    before = _snapshot(run_dir)
    with pytest.raises(RunDirInUse, match=r"holds another run's records \(metrics.jsonl, summary.json, checkpoints/"):
        train(compose_cfg(tiny_overrides(tinystories_dir, data_cache)), run_dir)
    assert _snapshot(run_dir) == before  # not even status.json or config.json was touched


@pytest.mark.fault(
    "scaletrain-run into another run's folder (hydra.run.dir=<old run>)",
    "one line 'run folder error: ...' and exit 2 before Hydra writes anything there",
)
def test_the_command_line_refuses_another_runs_folder_before_hydra_touches_it(
    old_run, tmp_path, tinystories_dir, data_cache, capsys
):
    run_dir = _copy(old_run, tmp_path / "run")
    before = _snapshot(run_dir)
    with pytest.raises(SystemExit) as exit_:
        preflight(tiny_overrides(tinystories_dir, data_cache, **{"hydra.run.dir": run_dir}), multirun=False)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err
    assert err.startswith(f"run folder error: {run_dir} holds another run's records") and "train.resume=auto" in err
    assert _snapshot(run_dir) == before
    preflight(
        tiny_overrides(tinystories_dir, data_cache, **{"hydra.run.dir": run_dir, "train.overwrite": "true"}), False
    )


@pytest.mark.fault(
    "a fresh run in another run's folder with train.overwrite=true",
    "the old records are deleted first; the new run's checkpoints and metrics are its own",
)
def test_overwrite_deletes_the_old_records_and_the_new_run_keeps_its_own(
    old_run, tmp_path, tinystories_dir, data_cache, caplog
):
    run_dir = _copy(old_run, tmp_path / "run")
    extra = {"train.overwrite": "true", "train.max_steps": 10, "train.log_every": 1}
    with caplog.at_level("WARNING", logger="scaletrain"):
        train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), run_dir)
    assert "train.overwrite=true: deleted another run's records" in caplog.text
    assert [p.name for p in records.list_checkpoints(run_dir / records.CKPT_DIR)] == ["step_0000010.pt"]
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == list(range(1, 11))


@pytest.mark.fault(
    "resume=auto in a finished run's folder with a larger train.max_steps (20 -> 30)",
    "continues from its step-20 checkpoint; the records of steps 1-20 stay as written; losses equal an uninterrupted "
    "30-step run",
)
def test_resume_auto_continues_the_folders_run(old_run, tmp_path, tinystories_dir, data_cache, caplog):
    run_dir = _copy(old_run, tmp_path / "run")
    extra = {**CONSTANT_LR, "train.resume": "auto", "train.max_steps": 30}
    with caplog.at_level("INFO", logger="scaletrain"):
        summary = train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), run_dir)
    assert f"resumed from {run_dir / records.CKPT_DIR / 'step_0000020.pt'} at step 20" in caplog.text
    assert summary.step == 30
    before = read_metrics(old_run)
    assert read_metrics(run_dir)[: len(before)] == before  # what the run recorded up to step 20, untouched
    uninterrupted = tmp_path / "uninterrupted"
    extra = {**CONSTANT_LR, "train.max_steps": 30}
    train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), uninterrupted)
    assert list(train_losses(old_run)) == [5, 10, 15, 20] and list(train_losses(run_dir)) == [5, 10, 15, 20, 25, 30]
    assert train_losses(run_dir) == train_losses(uninterrupted)  # exactly: same seed, data order and lr per step
    assert _val_losses(run_dir) == _val_losses(uninterrupted)


def _val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r[records.VAL_LOSS] for r in read_metrics(run_dir) if records.VAL_LOSS in r}


@pytest.mark.fault(
    "rotation when the folder holds checkpoints of later steps (a run resumed from an earlier step)",
    "only checkpoints up to the step just written are rotated; later ones are never deleted",
)
def test_rotation_never_deletes_checkpoints_of_later_steps(tmp_path):
    for step in (30, 40):  # another lineage's (or the pre-resume) later checkpoints
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, keep=0)
    for step in (5, 10, 15):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.ones(1)}, keep=2)
    names = [p.name for p in records.list_checkpoints(tmp_path / records.CKPT_DIR)]
    assert names == ["step_0000010.pt", "step_0000015.pt", "step_0000030.pt", "step_0000040.pt"]


@pytest.mark.fault(
    "resume=auto after an attempt killed before its first checkpoint, W&B on",
    'says "starting fresh"; metrics.jsonl holds each step once; the same W&B run continues (one per folder)',
)
def test_an_attempt_without_a_checkpoint_reruns_into_the_same_wandb_run_and_metrics_hold_each_step_once(
    tmp_path, tinystories_dir, data_cache, caplog
):
    run_dir = tmp_path / "run"
    extra = {"train.max_steps": 6, "train.log_every": 1, "logging.wandb.mode": "offline", "train.resume": "auto"}
    cfg = compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra))
    first = train(cfg, run_dir)
    for path in (run_dir / records.CKPT_DIR, run_dir / records.SUMMARY_FILE):  # as if killed before saving
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with caplog.at_level("INFO", logger="scaletrain"):
        again = train(cfg, run_dir)
    assert "train.resume=auto: no checkpoint in" in caplog.text and "starting fresh" in caplog.text
    assert first.wandb_id and again.wandb_id == first.wandb_id
    assert (run_dir / records.WANDB_ID_FILE).read_text() == first.wandb_id
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(first.wandb_id) for name in offline)
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == list(range(1, 7))
