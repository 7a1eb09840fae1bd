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
    ("full", "", "tensor_bytes_flipped", r"step_0000010\.pt: damaged: 1 value\(s\) differ from the digest"),
    ("sharded", "__0_0.distcp", "truncated", r"step_0000010: damaged: __0_0\.distcp bytes \d+\.\.\d+ changed"),
    ("sharded", "__0_0.distcp", "bytes_flipped", r"step_0000010: damaged: __0_0\.distcp bytes \d+\.\.\d+ changed"),
    ("sharded", "__0_0.distcp", "deleted", r"step_0000010: damaged: __0_0\.distcp missing"),
    ("sharded", ".metadata", "truncated", r"step_0000010: damaged: \.metadata changed"),
    ("sharded", ".metadata", "zeroed", r"step_0000010: damaged: \.metadata changed"),
    ("sharded", "extra.pt", "truncated", r"extra\.pt: unreadable"),
    ("sharded", "extra.pt", "tensor_bytes_flipped", r"extra\.pt: damaged: 1 value\(s\) differ from the digest"),
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
    load = ckpt.load_checkpoint if fmt == "full" else _load_sharded_whole(runs[fmt])  # shards: checked as read
    load(path)  # intact: loads and verifies
    damage(path / file if file else path, how)
    with pytest.raises(ckpt.CheckpointError, match=why):
        load(path)


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
    del extra[ckpt.DIGEST]
    torch.save(ckpt.seal(extra), path / "extra.pt")
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


# ------------------------------------------------------------------------------------------------ fuzz


def _zip_regions(path: Path) -> dict[str, list[range]]:
    """The byte ranges of a torch.save file by kind: each entry's local header, the pickle (data.pkl), the
    tensors' bytes, the small records (version, byteorder, ...), the central directory and the end records."""
    size = path.stat().st_size
    regions: dict[str, list[range]] = {"local header": [], "pickle": [], "tensor bytes": [], "small record": []}
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        directory = z.start_dir  # type: ignore[attr-defined]  # where the central directory begins
    with open(path, "rb") as f:
        for info in infos:
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
            start = info.header_offset + 30 + name_len + extra_len
            regions["local header"].append(range(info.header_offset, start))
            kind = (
                "pickle"
                if info.filename.endswith("data.pkl")
                else "tensor bytes"
                if "/data/" in info.filename
                else "small record"
            )
            if info.file_size:
                regions[kind].append(range(start, start + info.file_size))
    end = max(r.stop for r in regions["tensor bytes"] + regions["pickle"])  # the zip64 end records follow the directory
    regions["central directory"] = [range(directory, size - 22)] if directory < size - 22 else []
    regions["end records"] = [range(size - 22, size)]
    assert end <= directory <= size
    return regions


def _cloned(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _cloned(v) for k, v in obj.items()}
    return obj


def _same(a, b) -> bool:
    """Deep equality of two loaded states: tensors by dtype, shape and bytes; other values by type and value."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b


def _fuzz(path: Path, target: Path, positions: list[int], rng, load) -> dict[str, int]:
    """Change one byte at each position of `target` (a file of checkpoint `path`), load `path` each time: every
    change must be refused (CheckpointError) or harmless (the loaded state equals the undamaged one). Any other
    exception fails the test: it is what `train.resume=auto` could not fall back from."""
    original_bytes = target.read_bytes()
    reference = load(path)
    outcome = {"refused": 0, "harmless": 0}
    try:
        for pos in positions:
            data = bytearray(original_bytes)
            data[pos] ^= rng.randrange(1, 256)
            target.write_bytes(bytes(data))
            try:
                got = load(path)
            except ckpt.CheckpointError as err:
                assert str(path) in str(err) or target.name in str(err), err
                outcome["refused"] += 1
                continue
            assert _same(reference, got), f"byte {pos} of {target.name} changed: loaded silently with other values"
            outcome["harmless"] += 1
    finally:
        target.write_bytes(original_bytes)
    return outcome


def _positions(regions: dict[str, list[range]], per_region: int, rng) -> list[int]:
    out = []
    for ranges in regions.values():
        pool = [i for r in ranges for i in r]
        out += rng.sample(pool, min(per_region, len(pool)))
    return out


@_fault(
    "single-byte changes in every region of a full checkpoint (headers, pickle, tensors, zip directory; ~150, seeded)",
    "each refused naming the file, or provably harmless (the loaded state equals the saved one)",
)
def test_every_single_byte_change_in_a_full_checkpoint_is_refused_or_harmless(runs, tmp_path):
    import random

    rng = random.Random(2812)
    path = _copy(runs["full"], FULL, tmp_path)
    regions = _zip_regions(path)
    assert all(regions[k] for k in ("pickle", "tensor bytes", "local header", "central directory")), regions
    outcome = _fuzz(path, path, _positions(regions, 25, rng), rng, ckpt.load_checkpoint)
    assert outcome["refused"] + outcome["harmless"] >= 140, outcome
    assert outcome["refused"] > 0


def _load_sharded_whole(run: Path):
    """A loader for the fuzz: extra state, model and optimizer of a sharded checkpoint, as the trainer reads them
    (the shards' bytes are checked item by item while DCP reads them)."""
    from scaletrain.model import Transformer
    from scaletrain.optim import build_optimizer
    from scaletrain.runs import config_of_run

    cfg = config_of_run(run)
    model = Transformer(cfg.model, cfg.model.vocab_size or 512, cfg.data.seq_len, cfg.moe)
    optimizer = build_optimizer(model, cfg.optim, "cpu")

    def load(path: Path) -> dict:  # every load overwrites every tensor of model and optimizer
        extra = ckpt.load_checkpoint(path)
        ckpt.load_sharded_state(path, model, optimizer)
        state = {"extra": extra, "model": model.state_dict(), "optimizer": optimizer.state_dict()["state"]}
        return {k: _cloned(v) for k, v in state.items()}

    return load


@_fault(
    "single-byte changes in each file of a sharded checkpoint (shards, .metadata, extra.pt; ~150, seeded)",
    "each refused naming the file, or provably harmless (the loaded state equals the saved one)",
)
def test_every_single_byte_change_in_a_sharded_checkpoint_is_refused_or_harmless(runs, tmp_path):
    import random

    rng = random.Random(2813)
    path = _copy(runs["sharded"], SHARDED, tmp_path)
    load = _load_sharded_whole(runs["sharded"])
    total = {"refused": 0, "harmless": 0}
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.name == records.SHARDED_EXTRA:
            positions = _positions(_zip_regions(file), 15, rng)
        else:
            positions = rng.sample(range(file.stat().st_size), min(30, file.stat().st_size))
        outcome = _fuzz(path, file, positions, rng, load)
        if file.name == records.DCP_METADATA:  # checked whole (CRC): every change is refused
            assert outcome["harmless"] == 0, (file.name, outcome)
        total = {k: total[k] + outcome[k] for k in total}
    assert sum(total.values()) >= 120 and total["refused"] > 0, total


@_fault(
    "a full checkpoint whose saved step is changed from 10 to 7 (a valid pickle, other value)",
    "refused: the digest names `step`; train.resume=auto falls back to the previous checkpoint",
)
def test_a_changed_step_in_the_pickled_state_is_refused(runs, tmp_path):
    path = _copy(runs["full"], FULL, tmp_path)
    state = torch.load(path, weights_only=True)
    assert state["step"] == 10
    torch.save({**state, "step": 7}, path)  # the digest inside is the one saved with step 10
    with pytest.raises(ckpt.CheckpointError, match=r"step_0000010\.pt: damaged: 1 value\(s\) differ .*\(step\)"):
        ckpt.load_checkpoint(path)


# ------------------------------------------------------------------------------------------------ no silent fresh start


def _run_with(runs, tmp_path, fmt: str, names: tuple[str, ...]) -> Path:
    """A run folder holding copies of the named checkpoints of runs[fmt] and its metrics."""
    run_dir = tmp_path / "run"
    (run_dir / records.CKPT_DIR).mkdir(parents=True)
    for name in names:
        _copy(runs[fmt], name, run_dir / records.CKPT_DIR)
    shutil.copyfile(runs[fmt] / records.METRICS_FILE, run_dir / records.METRICS_FILE)
    return run_dir


def _resume_cfg(tinystories_dir, data_cache, fmt: str, **extra):
    keys = {"train.max_steps": 10, "train.ckpt_every": 5, "train.resume": "auto", "train.ckpt_format": fmt, **extra}
    return compose_cfg(tiny_overrides(tinystories_dir, data_cache, **keys))


@pytest.mark.parametrize(
    "missing",
    [
        pytest.param(
            "extra.pt",
            marks=_fault(
                "train.resume=auto, the only checkpoint is a sharded folder without extra.pt",
                "refused before anything is written, naming the folder and what it lacks (never a fresh start)",
            ),
        ),
        pytest.param(
            ".metadata",
            marks=_fault(
                "train.resume=auto, the only checkpoint is a sharded folder without .metadata",
                "refused before anything is written, naming the folder and what it lacks (never a fresh start)",
            ),
        ),
    ],
)
def test_an_unusable_only_checkpoint_is_refused_not_a_fresh_start(runs, tmp_path, tinystories_dir, data_cache, missing):
    run_dir = _run_with(runs, tmp_path, "sharded", (SHARDED,))
    (run_dir / records.CKPT_DIR / SHARDED / missing).unlink()
    records_now = lambda: {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name[0] != "."}  # noqa: E731
    before = records_now()
    with pytest.raises(
        ckpt.CheckpointError, match=rf"no usable checkpoint.*{SHARDED}: an incomplete sharded checkpoint: no {missing}"
    ):
        train(_resume_cfg(tinystories_dir, data_cache, "sharded"), run_dir)
    assert records_now() == before  # metrics.jsonl kept, nothing written (the run folder's lease aside)


@_fault(
    "train.resume=auto train.overwrite=true, the only checkpoint is unusable",
    "warning; it is removed and the run starts over (the documented way out)",
)
def test_overwrite_starts_over_when_no_checkpoint_is_usable(runs, tmp_path, tinystories_dir, data_cache, caplog):
    run_dir = _run_with(runs, tmp_path, "sharded", (SHARDED,))
    (run_dir / records.CKPT_DIR / SHARDED / "extra.pt").unlink()
    with caplog.at_level("WARNING", logger="scaletrain"):
        summary = train(_resume_cfg(tinystories_dir, data_cache, "sharded", **{"train.overwrite": True}), run_dir)
    assert "removed 1 unusable checkpoint(s); starting fresh" in caplog.text
    assert summary.step == 10
    first = {r["step"]: r["train/loss"] for r in read_metrics(runs["sharded"]) if "train/loss" in r}
    assert {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r} == first


@_fault(
    "train.resume=auto, the newest sharded folder lacks .metadata, an older one is good",
    "warning names the skipped folder and what it lacks; resumes from the older one",
)
def test_an_incomplete_newest_folder_is_skipped_with_a_warning(runs, tmp_path, tinystories_dir, data_cache, caplog):
    run_dir = _run_with(runs, tmp_path, "sharded", ("step_0000005", SHARDED))
    (run_dir / records.CKPT_DIR / SHARDED / ".metadata").unlink()
    with caplog.at_level("INFO", logger="scaletrain"):
        summary = train(_resume_cfg(tinystories_dir, data_cache, "sharded"), run_dir)
    assert f"skipping checkpoint {run_dir / records.CKPT_DIR / SHARDED}: " in caplog.text
    assert "incomplete sharded checkpoint: no .metadata" in caplog.text
    assert "step_0000005 at step 5" in caplog.text and summary.step == 10


@_fault(
    "train.resume=auto, the newest full checkpoint verifies but lacks a part (no scheduler state)",
    "warning names it and what is missing; resumes from the previous one (any exception falls back)",
)
def test_a_sound_checkpoint_missing_a_part_falls_back(runs, tmp_path, tinystories_dir, data_cache, caplog):
    run_dir = _run_with(runs, tmp_path, "full", ("step_0000005.pt", FULL))
    newest = run_dir / records.CKPT_DIR / FULL
    state = ckpt.load_checkpoint(newest)
    del state["scheduler"]
    torch.save(ckpt.seal(state), newest)  # verifies: the digest is recomputed without it
    with caplog.at_level("INFO", logger="scaletrain"):
        summary = train(_resume_cfg(tinystories_dir, data_cache, "full"), run_dir)
    assert f"{FULL}: not this trainer's state: no scheduler in it" in caplog.text
    assert "step_0000005.pt at step 5" in caplog.text and summary.step == 10


@_fault(
    "train.resume=<run>/model.pt (the final weights file)",
    "refused before anything is built: a weights file, not a training checkpoint (names the file)",
)
def test_resuming_from_the_final_weights_file_is_refused(runs):
    model_pt = runs["full"] / records.MODEL_FILE
    with pytest.raises(ckpt.CheckpointError, match=r"model\.pt: a weights file .*not a training checkpoint"):
        ckpt.check_resumable(str(model_pt), runs["full"], {})


@_fault(
    "a checkpoint file of random bytes",
    "refused: 'unreadable: damaged or not a torch.save file'; no advice to load it unsafely",
)
def test_random_bytes_are_described_as_what_they_are(tmp_path):
    import random

    path = tmp_path / FULL
    path.write_bytes(random.Random(5).randbytes(4096))
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(path)
    assert "unreadable: damaged or not a torch.save file" in str(err.value)
    assert "weights_only" not in str(err.value) and "arbitrary" not in str(err.value)


@_fault(
    "the run folder's checkpoints/ is not a folder that takes files",
    "refused at the start, before training (NotWritable names it), not at the first save",
)
def test_an_unwritable_checkpoints_folder_is_found_at_the_start(tmp_path, tinystories_dir, data_cache):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / records.CKPT_DIR).write_text("a file where the folder goes")
    cfg = compose_cfg(tiny_overrides(tinystories_dir, data_cache, **{"train.max_steps": 2}))
    with pytest.raises(ckpt.NotWritable, match=rf"{records.CKPT_DIR}: cannot write there"):
        train(cfg, run_dir)
    assert not (run_dir / records.STATUS_FILE).exists()


@_fault(
    "checksum I/O of a sharded checkpoint on N ranks (4 shard files, 2 ranks, simulated)",
    "each rank checksums only its share of the files at save; together exactly the one-process manifest",
)
def test_each_rank_checksums_only_its_share_of_the_items(tmp_path):
    import random
    from types import SimpleNamespace

    rng = random.Random(7)
    storage = {}
    for f in range(4):
        data = rng.randbytes(1000 + 100 * f)
        (tmp_path / f"__{f}_0.distcp").write_bytes(data)
        for k, (offset, length) in enumerate(((0, 400), (400, len(data) - 400))):
            storage[(f, k)] = SimpleNamespace(relative_path=f"__{f}_0.distcp", offset=offset, length=length)
    whole = ckpt.item_checksums(tmp_path, storage, 0, 1)
    shares = [ckpt.item_checksums(tmp_path, storage, rank, 2) for rank in range(2)]
    assert len(whole) == 8 and {**shares[0], **shares[1]} == whole
    files = [{key.split("@")[0] for key in share} for share in shares]
    assert files == [{"__0_0.distcp", "__2_0.distcp"}, {"__1_0.distcp", "__3_0.distcp"}]
