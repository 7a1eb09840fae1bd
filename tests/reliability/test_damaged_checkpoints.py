"""Damaged and malicious checkpoints, in both formats: every kind of damage is detected when the checkpoint is
read (CheckpointError naming the file and why), a file that would run code while it loads is refused without
running it, and `train.resume=auto` skips a damaged newest checkpoint with a warning and continues from the
previous good one, retraining exactly what the first run trained."""

from __future__ import annotations

import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from scaletrain import checkpoint as ckpt
from scaletrain import records
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
    if how == "deleted":
        path.unlink()
        return
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
    elif how == "bytes_flipped":  # 64 bytes in the middle of a file
        for i in range(len(data) // 2, len(data) // 2 + 64):
            data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _fault(what: str, outcome: str):
    return pytest.mark.fault(what, outcome)


# (checkpoint format, file inside the checkpoint, damage, what the error says)
FULL = "step_0000010.pt"
SHARDED = "step_0000010"
CASES = [
    ("full", "", "truncated", r"step_0000010\.pt: unreadable"),
    ("full", "", "zeroed", r"step_0000010\.pt: unreadable"),
    ("full", "", "zip_directory_flipped", r"step_0000010\.pt: unreadable"),
    ("full", "", "tensor_bytes_flipped", r"step_0000010\.pt: damaged: the bytes of 1 tensor"),
    ("sharded", "__0_0.distcp", "truncated", r"step_0000010: damaged: __0_0\.distcp changed"),
    ("sharded", "__0_0.distcp", "bytes_flipped", r"step_0000010: damaged: __0_0\.distcp changed"),
    ("sharded", "__0_0.distcp", "deleted", r"step_0000010: damaged: __0_0\.distcp missing"),
    ("sharded", ".metadata", "truncated", r"step_0000010: damaged: \.metadata changed"),
    ("sharded", ".metadata", "zeroed", r"step_0000010: damaged: \.metadata changed"),
    ("sharded", "extra.pt", "truncated", r"extra\.pt: unreadable"),
    ("sharded", "extra.pt", "tensor_bytes_flipped", r"extra\.pt: damaged: the bytes of 1 tensor"),
]


def _case(fmt: str, file: str, how: str, why: str):
    where = f"a {fmt} checkpoint" + (f"'s {file}" if file else "")
    what = f"{where}: {how.replace('_', ' ')}"
    return pytest.param(
        fmt, file, how, why, marks=_fault(what, "refused on load: CheckpointError names the file and why")
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tinystories_dir, data_cache) -> dict[str, Path]:
    """One run per format, 10 steps, checkpoints at steps 5 and 10."""
    out = {}
    for fmt in ("full", "sharded"):
        run_dir = tmp_path_factory.mktemp(f"run_{fmt}")
        extra = {"train.max_steps": 10, "train.ckpt_every": 5, "train.ckpt_format": fmt}
        train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), run_dir)
        out[fmt] = run_dir
    return out


def _copy(run: Path, name: str, dest: Path) -> Path:
    src = run / records.CKPT_DIR / name
    if src.is_dir():
        shutil.copytree(src, dest / name)
    else:
        shutil.copyfile(src, dest / name)
    return dest / name


@pytest.mark.parametrize("fmt,file,how,why", [_case(*c) for c in CASES])
def test_each_kind_of_damage_is_refused_naming_the_file_and_why(runs, tmp_path, fmt, file, how, why):
    path = _copy(runs[fmt], FULL if fmt == "full" else SHARDED, tmp_path)
    ckpt.load_checkpoint(path)  # intact: loads and verifies
    damage(path / file if file else path, how)
    with pytest.raises(ckpt.CheckpointError, match=why):
        ckpt.load_checkpoint(path)


class RunsCode:
    """Unpickling this runs `Path.touch(marker)`: what a malicious checkpoint would do with a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@_fault("a full checkpoint carrying a pickled object that runs code", "refused (weights_only); the code never runs")
def test_a_checkpoint_that_needs_arbitrary_unpickling_is_refused_without_running_its_code(runs, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / FULL
    state = torch.load(runs["full"] / records.CKPT_DIR / FULL, weights_only=True)
    torch.save({**state, "payload": RunsCode(marker)}, path)
    with pytest.raises(ckpt.CheckpointError, match=r"step_0000010\.pt: refused: .*Unsupported global"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


@_fault(
    "a sharded checkpoint whose .metadata pickle runs code (manifest forged to match)",
    "refused by the metadata allowlist; the code never runs",
)
def test_a_sharded_checkpoint_whose_metadata_would_run_code_is_refused_without_running_it(runs, tmp_path):
    """DCP unpickles `.metadata` with plain pickle; a forged folder (its manifest recomputed, as an attacker
    would) must still be refused before DCP reads it."""
    marker = tmp_path / "marker"
    path = _copy(runs["sharded"], SHARDED, tmp_path)
    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # the test's own, trusted file
    metadata.storage_meta = RunsCode(marker)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    extra = torch.load(path / "extra.pt", weights_only=True)
    extra[ckpt.FILES] = ckpt.file_checksums(path)
    del extra[ckpt.CHECKSUMS]
    torch.save({**extra, ckpt.CHECKSUMS: ckpt.tensor_checksums(extra)}, path / "extra.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: refused: pathlib\.Path\.touch is not allowed"):
        ckpt.load_checkpoint(path)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: refused"):
        ckpt.load_sharded_state(path, model, torch.optim.AdamW(model.parameters()))
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt,file,how",
    [
        pytest.param(
            "full",
            "",
            "tensor_bytes_flipped",
            marks=_fault(
                "train.resume=auto, newest full checkpoint has flipped tensor bytes",
                "warning names it; resumes from the previous one and retrains the same losses",
            ),
        ),
        pytest.param(
            "sharded",
            "__0_0.distcp",
            "truncated",
            marks=_fault(
                "train.resume=auto, newest sharded checkpoint has a truncated shard",
                "warning names it; resumes from the previous one and retrains the same losses",
            ),
        ),
    ],
)
def test_resume_skips_a_damaged_newest_checkpoint_and_continues_from_the_previous_one(
    runs, tmp_path, tinystories_dir, data_cache, caplog, fmt, file, how
):
    run_dir = tmp_path / "run"
    (run_dir / records.CKPT_DIR).mkdir(parents=True)
    names = ("step_0000005.pt", FULL) if fmt == "full" else ("step_0000005", SHARDED)
    for name in names:
        _copy(runs[fmt], name, run_dir / records.CKPT_DIR)
    shutil.copyfile(runs[fmt] / records.METRICS_FILE, run_dir / records.METRICS_FILE)
    newest = run_dir / records.CKPT_DIR / names[1]
    damage(newest / file if file else newest, how)
    extra = {"train.max_steps": 10, "train.ckpt_every": 5, "train.resume": "auto", "train.ckpt_format": fmt}
    with caplog.at_level("INFO", logger="scaletrain"):
        summary = train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), run_dir)
    assert "skipping checkpoint" in caplog.text and f"{names[1]}: damaged" in caplog.text
    assert "resumed from" in caplog.text and f"{names[0]} at step 5" in caplog.text
    assert summary.step == 10
    # the resumed run retrains steps 6..10 exactly as the first run did
    first = {r["step"]: r["train/loss"] for r in read_metrics(runs[fmt]) if "train/loss" in r}
    again = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert again == first
