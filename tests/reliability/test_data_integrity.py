"""Integrity of the token cache (issue 28, D5) and loader memory that does not grow with the batch by its own
structure: a cache whose ids leave the vocabulary, whose content changed, or that was cut short is refused when it
is opened (a `DataError` naming the entry and its file, and that deleting the folder rebuilds it), before any model
is built; a sound entry's check is recorded so that later opens only stat its files; an entry of an older version
(no recorded sha256) is verified and upgraded, never trusted as it is. `WindowOrder.take` keeps one epoch's
permutation at a time and a rank only its own rows, with the data order exactly that of the earlier
implementation (written out below)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from scaletrain import run
from scaletrain.build import build
from scaletrain.config import load_config
from scaletrain.data import BatchLoader, DataError, MixtureLoader, prepare_data
from scaletrain.data import cache as data_cache
from scaletrain.data.loader import WindowOrder

from ..conftest import compose_cfg, tiny_overrides, tinystories_head

fault = pytest.mark.fault
VOCAB = 512  # debug=cpu_tiny's BPE: uint16 tokens


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, tinystories_dir) -> Path:
    """The first stories of the TinyStories sample: quick to tokenize, enough windows for a tiny run."""
    return tinystories_head(tmp_path_factory.mktemp("small_data"), tinystories_dir, 20_000, 8_000)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, small_data) -> Path:
    """A complete cache of small_data (tokenizer + token entry); tests damage a copy of it."""
    cache = tmp_path_factory.mktemp("small_cache")
    prepare_data(_cfg(small_data, cache))
    return cache


def _cfg(small_data: Path, cache: Path):
    return load_config(compose_cfg(tiny_overrides(small_data, cache))).data


def _entry_of(small_cache: Path, to: Path) -> Path:
    """A copy of the cache (new files: no content check recorded for them yet) -> its one token entry."""
    shutil.copytree(small_cache, to)
    [entry] = to.glob("tokens/*")
    return entry


def _put(path: Path, index: int, token: int) -> None:
    """Overwrite token `index` of a uint16 .bin in place (same size)."""
    with path.open("r+b") as f:
        f.seek(2 * index)
        f.write(np.uint16(token).tobytes())


def _read_or_none(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _token(path: Path, index: int) -> int:
    return int(np.fromfile(path, dtype=np.uint16)[index])


def _past_the_clock_tick(entry: Path) -> None:
    """Wait until the filesystem's clock (coarse: a few ms, a second on some) has moved past the entry's files'
    last change, so that a check recorded now postdates them (one recorded in the same tick is not trusted)."""
    newest = max(p.stat().st_ctime_ns for p in entry.iterdir())
    probe = entry.parent / ".clock-probe"
    for _ in range(300):
        probe.write_bytes(b"")
        if probe.stat().st_mtime_ns > newest:
            break
        time.sleep(0.01)
    probe.unlink()


def _refusal(small_data: Path, cache: Path) -> str:
    with pytest.raises(DataError) as err:
        prepare_data(_cfg(small_data, cache))
    assert run._bad_input_kind(err.value) == "data"  # main() prints it as one line "data error: ..."
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.fixture
def scans(monkeypatch) -> list[str]:
    """The .bin files read by content checks, in order."""
    read: list[str] = []
    scan = data_cache._scan

    def counted(folder, path, *args):
        read.append(path.name)
        return scan(folder, path, *args)

    monkeypatch.setattr(data_cache, "_scan", counted)
    return read


# ------------------------------------------------------------------------------------ the token cache


@fault(
    "token cache with an out-of-range id written into train.bin (same size)",
    "DataError at data preparation, before the model is built: names the entry, the file, the id and its position, "
    "says to delete the folder",
)
def test_an_out_of_range_id_is_refused_when_the_cache_is_opened_before_any_model_is_built(
    small_data, small_cache, tmp_path
):
    entry = _entry_of(small_cache, tmp_path / "cache")
    _put(entry / "train.bin", 123, VOCAB)
    stamp = _read_or_none(entry / data_cache.STAMP)  # copied along, but for the original files
    with pytest.raises(DataError) as err:  # build: data first, then the model; the training never starts
        build(compose_cfg(tiny_overrides(small_data, tmp_path / "cache")))
    message = str(err.value)
    assert message.startswith(f"token cache {entry} is damaged: train.bin holds token id 512 at token 123 (byte 246), ")
    assert "outside the tokenizer's 512 ids; delete that folder and run again to rebuild it" in message
    assert _refusal(small_data, tmp_path / "cache") == message  # refused again: no check was recorded for it
    assert _read_or_none(entry / data_cache.STAMP) == stamp  # and no check was recorded


@pytest.mark.parametrize(
    "mtime",
    [
        pytest.param(
            "moved",
            marks=fault(
                "one in-range token of a checked token cache changed",
                "DataError: names the entry and file (its sha256 differs), says to delete the folder",
            ),
        ),
        pytest.param(
            "restored",
            marks=fault(
                "one token of a checked cache changed, the file's mtime set back",
                "DataError as well: the recorded check also holds the ctime, which cannot be set back",
            ),
        ),
    ],
)
def test_a_changed_in_range_token_is_refused_even_after_the_cache_was_checked(
    mtime, small_data, small_cache, tmp_path, scans
):
    entry = _entry_of(small_cache, tmp_path / "cache")
    _past_the_clock_tick(entry)
    prepare_data(_cfg(small_data, tmp_path / "cache"))  # checked and recorded
    assert scans == ["train.bin", "val.bin"] and (entry / data_cache.STAMP).is_file()
    path = entry / "val.bin"
    before = path.stat()
    _put(path, 7, (_token(path, 7) + 1) % VOCAB)
    if mtime == "restored":
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_size == before.st_size
    message = _refusal(small_data, tmp_path / "cache")
    assert message.startswith(f"token cache {entry} is damaged: val.bin does not hold what was written (its sha256 is ")
    assert "delete that folder and run again to rebuild it" in message
    assert scans == ["train.bin", "val.bin", "val.bin"]  # train.bin's recorded check still held


@fault(
    "token cache whose val.bin lost its last token", "DataError: names the entry and file, its size and the expected"
)
def test_a_truncated_cache_is_refused_by_its_size_before_any_read(small_data, small_cache, tmp_path, scans):
    entry = _entry_of(small_cache, tmp_path / "cache")
    path = entry / "val.bin"
    n_tokens = json.loads((entry / "meta.json").read_text())["val"]["n_tokens"]
    path.write_bytes(path.read_bytes()[:-2])
    message = _refusal(small_data, tmp_path / "cache")
    expected = f"val.bin is {2 * n_tokens - 2:,} bytes, expected {2 * n_tokens:,} bytes ({n_tokens:,} uint16 tokens"
    assert message.startswith(f"token cache {entry} is damaged: {expected}")
    assert scans == []


@fault(
    "a sound token cache opened twice, then copied",
    "the second open reads no .bin (its recorded check holds, a few stats); the copy (new files) is checked again",
)
def test_a_sound_cache_is_read_once_then_opens_on_its_recorded_check(small_data, small_cache, tmp_path, scans):
    entry = _entry_of(small_cache, tmp_path / "cache")
    meta = json.loads((entry / "meta.json").read_text())
    for split in ("train", "val"):
        tokens = np.fromfile(entry / f"{split}.bin", dtype=np.uint16)
        assert meta[split]["sha256"] == hashlib.sha256(tokens.tobytes()).hexdigest()
        assert meta[split]["max_token_id"] == int(tokens.max()) < VOCAB
    _past_the_clock_tick(entry)
    first = prepare_data(_cfg(small_data, tmp_path / "cache"))
    assert scans == ["train.bin", "val.bin"]
    second = prepare_data(_cfg(small_data, tmp_path / "cache"))
    assert scans == ["train.bin", "val.bin"], "the recorded check did not hold"
    assert np.array_equal(second.train.tokens, first.train.tokens)
    copied = _entry_of(tmp_path / "cache", tmp_path / "copy")
    prepare_data(_cfg(small_data, tmp_path / "copy"))
    assert scans == ["train.bin", "val.bin"] * 2 and copied != entry


def _make_old(entry: Path) -> None:
    """The entry as a scaletrain before content checks wrote it: no sha256/max_token_id, no recorded check."""
    meta = json.loads((entry / "meta.json").read_text())
    for split in ("train", "val"):
        del meta[split]["sha256"], meta[split]["max_token_id"]
    (entry / "meta.json").write_text(json.dumps(meta, indent=2))
    (entry / data_cache.STAMP).unlink(missing_ok=True)


@fault(
    "token cache written before content hashes (no sha256 in meta.json)",
    "verified and upgraded: ids range-checked, sha256 + max id recorded, a warning names the entry and the rebuild; "
    "a later change is refused",
)
def test_an_old_cache_is_verified_and_upgraded_with_a_warning_then_protected(small_data, small_cache, tmp_path, caplog):
    entry = _entry_of(small_cache, tmp_path / "cache")
    _make_old(entry)
    with caplog.at_level(logging.WARNING, logger="scaletrain.data"):
        prepare_data(_cfg(small_data, tmp_path / "cache"))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"data: token cache {entry} was written without content hashes")
    assert "train.bin and val.bin checked (every id below 512)" in warning
    assert "delete that folder to rebuild it if in doubt" in warning
    meta = json.loads((entry / "meta.json").read_text())
    for split in ("train", "val"):
        tokens = np.fromfile(entry / f"{split}.bin", dtype=np.uint16)
        assert meta[split]["sha256"] == hashlib.sha256(tokens.tobytes()).hexdigest()
        assert meta[split]["max_token_id"] == int(tokens.max())
    _put(entry / "train.bin", 5, (_token(entry / "train.bin", 5) + 1) % VOCAB)
    assert "train.bin does not hold what was written" in _refusal(small_data, tmp_path / "cache")


@fault(
    "old-format token cache (no sha256) with an out-of-range id",
    "DataError naming the entry, file and position; meta.json left as it was (not upgraded)",
)
def test_an_old_cache_with_an_out_of_range_id_is_refused_and_not_upgraded(small_data, small_cache, tmp_path):
    entry = _entry_of(small_cache, tmp_path / "cache")
    _make_old(entry)
    n_tokens = json.loads((entry / "meta.json").read_text())["train"]["n_tokens"]
    _put(entry / "train.bin", n_tokens - 1, 65535)
    meta_before = (entry / "meta.json").read_bytes()
    message = _refusal(small_data, tmp_path / "cache")
    assert message.startswith(
        f"token cache {entry} is damaged: train.bin holds token id 65535 at token {n_tokens - 1:,}"
    )
    assert (entry / "meta.json").read_bytes() == meta_before and not (entry / data_cache.STAMP).exists()


# ------------------------------------------------------------------------------------------------ loader


def _old_take(order: WindowOrder, n: int) -> np.ndarray:
    """`WindowOrder.take` as it was before issue 28 (a list of every epoch's slice, concatenated): the contract."""
    parts = [np.empty(0, dtype=np.int64)]
    while n:
        k = min(n, order.n_windows - order.pos)
        parts.append(order._starts()[order.pos : order.pos + k])
        order.pos, n = order.pos + k, n - k
        if order.pos == order.n_windows:
            order.epoch, order.pos = order.epoch + 1, 0
    return np.concatenate(parts)


def _old_batches(tokens, batch_size, seq_len, seed, rank, world_size, n_batches):
    """The earlier BatchLoader.next_batch: the global micro-batch's starts, then this rank's rows, gathered."""
    order, out = WindowOrder(len(tokens), seq_len, seed), []
    for _ in range(n_batches):
        starts = _old_take(order, batch_size * world_size)[rank::world_size]
        rows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
        out.append((rows[:, :-1], rows[:, 1:]))
    return out, (order.epoch, order.pos)


@fault(
    "loader order after the memory change (batch sizes within, at and far past an epoch; 1-3 ranks; mixtures)",
    "every batch and the final position equal the earlier implementation's",
)
def test_the_loader_keeps_the_earlier_data_order_exactly():
    tokens = np.random.default_rng(0).integers(0, VOCAB, 37 * 8 + 1).astype(np.uint16)  # 37 windows of 8
    for batch_size, world_size in [(3, 1), (5, 2), (7, 3), (37, 1), (100, 2), (450, 3)]:
        for rank in range(world_size):
            expected, position = _old_batches(tokens, batch_size, 8, 11, rank, world_size, n_batches=6)
            loader = BatchLoader(tokens, batch_size, 8, 11, rank=rank, world_size=world_size)
            for x_old, y_old in expected:
                x, y = loader.next_batch()
                assert np.array_equal(x.numpy(), x_old) and np.array_equal(y.numpy(), y_old), (batch_size, rank)
            assert (loader.epoch, loader.pos) == position
        # a mixture takes each source's rows through the same order
        streams = [tokens, tokens[: 11 * 8 + 1]]
        mix = MixtureLoader(streams, [0.7, 0.3], batch_size, 8, 5)
        orders = [WindowOrder(len(s), 8, 5 * 1_000_003 + i) for i, s in enumerate(streams)]
        for b in range(4):
            which = mix.sources_of_batch(b)
            x, _ = mix.next_batch()
            for i, (stream, order) in enumerate(zip(streams, orders)):
                rows = np.flatnonzero(which == i)
                starts = _old_take(order, len(rows))
                assert np.array_equal(x.numpy()[rows], stream[starts[:, None] + np.arange(8)].astype(np.int64))


def _peak(take, *args, **kwargs) -> tuple[np.ndarray, int]:
    """take(*args, **kwargs) and the peak of the memory it allocated (numpy's arrays included)."""
    tracemalloc.start()
    try:
        starts = take(*args, **kwargs)
        return starts, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@fault(
    "a batch of 1,000 epochs of a stream (rank 0 of 1 and of 1,000 ranks)",
    "peak memory: the rows this rank keeps and one epoch's permutation (the earlier structure: every epoch's)",
)
def test_taking_many_epochs_holds_one_permutation_and_this_ranks_rows():
    n_windows, epochs = 5_000, 1_000
    permutation = 8 * n_windows  # bytes of one epoch's start offsets
    WindowOrder(n_windows * 16 + 1, 16, seed=3).take(3 * n_windows)  # numpy's first-use allocations, not measured
    for world_size in (1, 1_000):
        order = WindowOrder(n_windows * 16 + 1, 16, seed=3)
        starts, peak = _peak(order.take, n_windows * epochs, rank=0, world_size=world_size)
        assert len(starts) == n_windows * epochs // world_size and (order.epoch, order.pos) == (epochs, 0)
        assert peak < starts.nbytes + 3 * permutation, (world_size, peak, starts.nbytes)
    # the bound fails the earlier structure: 1,000 permutations (40 MB) for a rank's 40 KB
    order = WindowOrder(n_windows * 16 + 1, 16, seed=3)
    _, old_peak = _peak(lambda: _old_take(order, n_windows * epochs)[::1_000])
    assert old_peak > 100 * (n_windows * epochs // 1_000 * 8 + 3 * permutation)


@fault("a train.txt the process may not read", "DataError names the file and the OS error, before any text is read")
def test_an_unreadable_train_file_is_named(small_data, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    shutil.copytree(small_data, folder)
    real_open = Path.open

    def denied(self, *args, **kwargs):  # chmod 000 does not stop root, so the OS error is simulated
        if self.name == "train.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(DataError, match=r"train\.txt: cannot be read \(PermissionError: Permission denied\)"):
        prepare_data(_cfg(folder, tmp_path / "cache"))
    assert not list((tmp_path / "cache").glob("tokens/*"))
