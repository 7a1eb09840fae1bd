"""A full disk, for real: the run folder lives on a small tmpfs (mounted for the test; skipped with the
reason where this machine does not allow mounting). A save that cannot fit fails before writing, with need,
have and where; a disk that fills up during a save gives one clear error; either way the previous checkpoint
stays whole and no temporary file is left."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from scaletrain import checkpoint as ckpt
from scaletrain import records
from scaletrain.trainer import train

from ..conftest import compose_cfg, tiny_overrides

MiB = 1 << 20


def _mount_tmpfs(where: Path, size: int) -> None:
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root here (the CI machine and the development VMs run as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A function mounting a tmpfs of the given size in bytes; unmounted after the test."""
    mounted: list[Path] = []

    def make(size: int) -> Path:
        where = tmp_path / "disk"
        _mount_tmpfs(where, size)
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


@pytest.fixture(scope="module")
def ckpt_size(tmp_path_factory, tinystories_dir, data_cache) -> int:
    """Bytes of one checkpoint of the tiny run."""
    run_dir = tmp_path_factory.mktemp("sized")
    extra = {"train.max_steps": 5, "train.ckpt_every": 5}
    train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), run_dir)
    return (run_dir / records.CKPT_DIR / "step_0000005.pt").stat().st_size


def _failed_status(run_dir: Path) -> str:
    status = records.read_status(run_dir)
    assert status is not None and status.state == records.RunState.failed
    return status.error or ""


@pytest.mark.fault(
    "a disk with room for one checkpoint but not the next (tmpfs)",
    "stops before writing: need, have and where in one error; status failed; the previous checkpoint loads",
)
def test_a_save_that_cannot_fit_fails_before_writing_and_keeps_the_previous_checkpoint(
    small_disk, ckpt_size, tinystories_dir, data_cache
):
    # room for checkpoint 5 plus the check's margin (5% + 16 MiB), not for checkpoint 10 beside it
    disk = small_disk(int(ckpt_size * 1.55) + 17 * MiB)
    run_dir = disk / "run"
    extra = {"train.max_steps": 10, "train.ckpt_every": 5}
    with pytest.raises(ckpt.NoSpaceError, match=r"checkpoint step 10: need ~[\d,]+ MiB, have [\d,]+ MiB free in"):
        train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), run_dir)
    assert "NoSpaceError" in _failed_status(run_dir)
    ckpt_dir = run_dir / records.CKPT_DIR
    assert [p.name for p in ckpt_dir.iterdir()] == ["step_0000005.pt"]  # no temporary file either
    assert ckpt.load_checkpoint(ckpt_dir / "step_0000005.pt")["step"] == 5


@pytest.mark.fault(
    "the disk fills up in the middle of a checkpoint save (tmpfs)",
    "one clear 'disk ... is full' error instead of torch's 'unexpected pos'; no partial file; status failed",
)
def test_a_disk_that_fills_up_during_a_save_gives_one_clear_error_and_no_partial_file(
    small_disk, ckpt_size, tinystories_dir, data_cache, monkeypatch
):
    disk = small_disk(ckpt_size // 2 + MiB)
    monkeypatch.setattr(ckpt, "check_free_space", lambda *args: None)  # as if the estimate were too low
    run_dir = disk / "run"
    extra = {"train.max_steps": 5, "train.ckpt_every": 5}
    with pytest.raises(ckpt.NoSpaceError, match=r"the disk holding .* is full: checkpointing step 5 failed"):
        train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), run_dir)
    assert "is full" in _failed_status(run_dir)
    assert list((run_dir / records.CKPT_DIR).iterdir()) == []
