"""Damaged checkpoints: every kind of damage is detected when the file is read (CheckpointError naming the
file and why), and `train.resume=auto` skips a damaged newest checkpoint with a warning and continues from
the previous good one."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from scaletrain import checkpoint as ckpt
from scaletrain.trainer import train

from ..conftest import compose_cfg, read_metrics, tiny_overrides


def _largest_tensor_data(path: Path) -> tuple[int, int]:
    """(offset, size) in the file of the biggest tensor's bytes (torch.save writes them uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:  # the local header: 30 bytes + name + extra field, then the data
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[len(data) // 2 :]
    elif how == "zeroed":
        data[:] = bytes(len(data))
    elif how == "zip_directory_flipped":  # the central directory at the end of the zip
        for i in range(len(data) - 60, len(data) - 20):
            data[i] ^= 0xFF
    elif how == "tensor_bytes_flipped":  # 64 bytes inside the biggest tensor: loads fine, values wrong
        offset, size = _largest_tensor_data(path)
        for i in range(offset + size // 2, offset + size // 2 + 64):
            data[i] ^= 0x5A
    path.write_bytes(bytes(data))


DAMAGE = ["truncated", "zeroed", "zip_directory_flipped", "tensor_bytes_flipped"]
WHY = {
    "truncated": "unreadable",
    "zeroed": "unreadable",
    "zip_directory_flipped": "unreadable",
    "tensor_bytes_flipped": "damaged: the bytes of 1 tensor",
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tinystories_dir, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    overrides = tiny_overrides(tinystories_dir, data_cache, **{"train.max_steps": 10, "train.ckpt_every": 5})
    train(compose_cfg(overrides), run_dir)
    return run_dir


@pytest.mark.parametrize("how", DAMAGE)
def test_each_kind_of_damage_is_refused_naming_the_file_and_why(two_checkpoints, tmp_path, how):
    path = tmp_path / "step_0000010.pt"
    path.write_bytes((two_checkpoints / "checkpoints" / "step_0000010.pt").read_bytes())
    ckpt.load_checkpoint(path)  # intact: loads and verifies
    damage(path, how)
    with pytest.raises(ckpt.CheckpointError, match=rf"step_0000010\.pt: {WHY[how]}"):
        ckpt.load_checkpoint(path)


@pytest.mark.slow
def test_resume_skips_a_damaged_newest_checkpoint_and_continues_from_the_previous_one(
    two_checkpoints, tmp_path, tinystories_dir, data_cache, caplog
):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("step_0000005.pt", "step_0000010.pt"):
        (run_dir / "checkpoints" / name).write_bytes((two_checkpoints / "checkpoints" / name).read_bytes())
    (run_dir / "metrics.jsonl").write_bytes((two_checkpoints / "metrics.jsonl").read_bytes())
    damage(run_dir / "checkpoints" / "step_0000010.pt", "tensor_bytes_flipped")
    overrides = tiny_overrides(
        tinystories_dir, data_cache, **{"train.max_steps": 10, "train.ckpt_every": 5, "train.resume": "auto"}
    )
    with caplog.at_level("INFO", logger="scaletrain"):
        summary = train(compose_cfg(overrides), run_dir)
    assert "skipping checkpoint" in caplog.text and "step_0000010.pt: damaged" in caplog.text
    assert "resumed from" in caplog.text and "step_0000005.pt at step 5" in caplog.text
    assert summary["step"] == 10
    # the resumed run retrains steps 6..10 exactly as the first run did
    first = {r["step"]: r["train/loss"] for r in read_metrics(two_checkpoints) if "train/loss" in r}
    again = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert again == first
