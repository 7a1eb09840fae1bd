"""Tests for scaletrain.data: text parsing, tokenizers, packed token cache, batch loader, errors.

Real data comes from ../shared (SCALETRAIN_SHARED overrides); small corpora are written to tmp_path
and tokenized with GPT-2's BPE so that expected streams are exact and need no training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import socket
import threading

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from scaletrain import data
from scaletrain.config import DataConfig, SourceConfig, TokenizerConfig
from scaletrain.data import BatchLoader, DataError, Tokenizer, eval_batches, iter_txt_documents, prepare_data
from scaletrain.data import cache as _cache  # noqa: F401 - loads data.cache for data.cache
from scaletrain.data import common as _common  # noqa: F401
from scaletrain.data import sources as _sources  # noqa: F401

SEPARATOR = "\n<|endoftext|>\n"  # what follows each story in the TinyStories text files
TRAIN_DOCS = [f"Story {i}: Tom saw a “big” dog. It was {'very ' * (i % 4)}café-good." for i in range(40)]
VAL_DOCS = [f"Val {i}: Sue ran — fast! ‘Yes’, she said." for i in range(12)]


SOURCE_KEYS = {f.name for f in dataclasses.fields(SourceConfig)} - {"path"}  # data.path: the shortcut users type


def data_cfg(cache, **kw):
    """A one-source data config (source "stories": the TinyStories hub dataset unless `path` is given); keys of
    SourceConfig go to the source, the rest to DataConfig."""
    tokenizer = kw.pop("tokenizer", {})
    source = SourceConfig(hub_id="roneneldan/TinyStories", **{k: kw.pop(k) for k in list(kw) if k in SOURCE_KEYS})
    return DataConfig(sources={"stories": source}, cache_dir=str(cache), tokenizer=TokenizerConfig(**tokenizer), **kw)


def gpt2_cfg(path, cache, tinystories_dir, **kw):
    gpt2 = {"kind": "gpt2", "gpt2_dir": str(tinystories_dir.parent / "gpt2_tokenizer")}
    return data_cfg(cache, path=str(path), tokenizer=gpt2, **{"seq_len": 8, **kw})


def write_txt(folder, name, docs):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("".join(d + SEPARATOR for d in docs), encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2(tinystories_dir):
    return Tokenizer.from_gpt2_files(tinystories_dir.parent / "gpt2_tokenizer")


@pytest.fixture(scope="module")
def stories(tinystories_dir, data_cache):
    """Real TinyStories with a 512-token BPE, in the session cache that the training tests share."""
    cfg = data_cfg(data_cache, path=str(tinystories_dir), seq_len=64, tokenizer={"vocab_size": 512})
    return cfg, prepare_data(cfg)


@pytest.fixture
def small_corpus(tmp_path):
    write_txt(tmp_path / "corpus", "train.txt", TRAIN_DOCS)
    write_txt(tmp_path / "corpus", "valid.txt", VAL_DOCS)
    return tmp_path / "corpus"


def expected_stream(tok, docs):
    return [i for d in docs for i in tok.encode(d) + [tok.eot_id]]


# ----------------------------------------------------------------------------- text and tokenizers


def test_txt_documents_are_split_on_endoftext_and_stripped(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("  One.\nTwo lines.\n<|endoftext|>\n\n<|endoftext|>\nMid<|endoftext|>line\nTail without end\n")
    assert list(iter_txt_documents(path)) == ["One.\nTwo lines.", "Mid", "line\nTail without end"]


def test_bpe_round_trips_real_stories_including_unicode_quotes(stories, tinystories_dir):
    tok = stories[1].tokenizer
    docs = list(iter_txt_documents(tinystories_dir / "valid.txt"))
    assert any("“" in d for d in docs) and any("’" in d for d in docs)
    assert all(tok.decode(tok.encode(d)) == d for d in docs)
    assert tok.vocab_size == 512 and tok.eot_id == 0


def test_tokenizer_save_and_load_keep_ids_and_fingerprint(stories, tmp_path):
    tok = stories[1].tokenizer
    tok.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    text = "Once upon a time, “Lily” said hi."
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.fingerprint, loaded.eot_id, loaded.vocab_size) == (tok.fingerprint, tok.eot_id, tok.vocab_size)


def test_gpt2_tokenizer_gives_the_original_gpt2_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.eot_id, gpt2.vocab_size) == (50256, 50257)
    assert gpt2.encode_batch(["Hello world", " world"]) == [[15496, 995], [995]]


def test_literal_endoftext_in_a_document_is_encoded_as_text(gpt2):
    ids = gpt2.encode("a<|endoftext|>b")
    assert gpt2.eot_id not in ids and gpt2.decode(ids) == "a<|endoftext|>b"
    assert gpt2.decode([15496, 50256]) == "Hello<|endoftext|>"


def test_missing_gpt2_files_error_names_the_path(tmp_path, small_corpus):
    cfg = data_cfg(tmp_path / "cache", path=str(small_corpus), tokenizer={"kind": "gpt2", "gpt2_dir": str(tmp_path)})
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path))}/vocab.json.*data.tokenizer.gpt2_dir"):
        prepare_data(cfg)


# ----------------------------------------------------------------------------- packing and cache


def test_packed_stream_is_each_document_followed_by_eot(small_corpus, tmp_path, tinystories_dir, gpt2):
    d = prepare_data(gpt2_cfg(small_corpus, tmp_path / "cache", tinystories_dir))
    assert d.train.tokens.dtype == np.uint16 and d.val.tokens.dtype == np.uint16
    assert d.train.tokens.tolist() == expected_stream(gpt2, TRAIN_DOCS)
    assert d.val.tokens.tolist() == expected_stream(gpt2, VAL_DOCS)
    assert (d.train.n_docs, d.val.n_docs) == (40, 12)
    assert int((d.train.tokens == 50256).sum()) == 40
    assert d.train.n_bytes == sum(len(doc.encode()) for doc in TRAIN_DOCS)
    assert d.val.bytes_per_token == sum(len(doc.encode()) for doc in VAL_DOCS) / len(d.val.tokens)
    meta = json.loads((d.cache_dir / "meta.json").read_text())
    sha256 = hashlib.sha256((d.cache_dir / "train.bin").read_bytes()).hexdigest()
    assert meta["train"] == {
        "n_tokens": len(d.train.tokens),
        "n_bytes": d.train.n_bytes,
        "n_docs": 40,
        "sha256": sha256,
        "max_token_id": int(d.train.tokens.max()),
    }
    assert d.cache_dir.name.endswith("-" + d.tokenizer.fingerprint)


def test_max_val_tokens_keeps_the_whole_documents_that_fit(small_corpus, tmp_path, tinystories_dir, gpt2):
    first_three = len(expected_stream(gpt2, VAL_DOCS[:3]))
    d = prepare_data(gpt2_cfg(small_corpus, tmp_path / "cache", tinystories_dir, max_val_tokens=first_three + 5))
    assert d.val.tokens.tolist() == expected_stream(gpt2, VAL_DOCS[:3])
    assert (d.val.n_docs, d.val.n_bytes) == (3, sum(len(doc.encode()) for doc in VAL_DOCS[:3]))
    assert d.train.n_docs == 40


def test_tinystories_counts_are_exact_and_bytes_per_token_plausible(stories, tinystories_dir):
    d = stories[1]
    for split, name, n_docs in ((d.train, "train.txt", 4709), (d.val, "valid.txt", 1000)):
        assert split.n_docs == n_docs
        assert int((split.tokens == d.tokenizer.eot_id).sum()) == n_docs
        # The files are stories each followed by "\n<|endoftext|>\n"; only story bytes count.
        assert split.n_bytes == (tinystories_dir / name).stat().st_size - n_docs * len(SEPARATOR)
        assert 2.0 < split.bytes_per_token < 4.0
        assert int(d.tokenizer.token_bytes()[split.tokens].sum()) == split.n_bytes


def test_token_bytes_count_the_utf8_bytes_each_gpt2_id_stands_for(gpt2):
    lengths = gpt2.token_bytes()
    text = "Hello “world” café"
    assert len(lengths) == 50257 and lengths[50256] == 0
    assert int(lengths[gpt2.encode(text)].sum()) == len(text.encode()) == 23


def test_second_prepare_reuses_tokenizer_and_tokens_without_recomputing(stories, monkeypatch):
    cfg, first = stories

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although the cache is warm")

    monkeypatch.setattr(Tokenizer, "train_bpe", fail)
    monkeypatch.setattr(data.cache, "_encode_split", fail)
    monkeypatch.setattr(data.sources, "_load_local_file", fail)
    second = prepare_data(cfg)
    assert second.cache_dir == first.cache_dir
    assert second.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert np.array_equal(second.train.tokens, first.train.tokens)
    assert np.array_equal(second.val.tokens, first.val.tokens)


def test_changed_text_gets_a_new_cache_entry(small_corpus, tmp_path, tinystories_dir, gpt2):
    cfg = gpt2_cfg(small_corpus, tmp_path / "cache", tinystories_dir)
    before = prepare_data(cfg)
    write_txt(small_corpus, "valid.txt", VAL_DOCS[:6])
    after = prepare_data(cfg)
    assert after.cache_dir != before.cache_dir
    assert after.val.tokens.tolist() == expected_stream(gpt2, VAL_DOCS[:6])


def test_interrupted_build_leaves_no_entry_that_looks_complete(small_corpus, tmp_path, tinystories_dir, monkeypatch):
    cfg = gpt2_cfg(small_corpus, tmp_path / "cache", tinystories_dir)
    write = data.cache._write_stream

    def crash_on_val(encoded, path, *args):
        if path.name == "val.bin":
            raise KeyboardInterrupt("crash while writing val.bin")
        return write(encoded, path, *args)

    monkeypatch.setattr(data.cache, "_write_stream", crash_on_val)
    with pytest.raises(KeyboardInterrupt, match="val.bin"):
        prepare_data(cfg)
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []
    monkeypatch.setattr(data.cache, "_write_stream", write)
    assert prepare_data(cfg).val.n_docs == 12


def test_jsonl_and_parquet_inputs_give_the_same_stream(tmp_path, tinystories_dir, gpt2):
    for fmt in ("jsonl", "parquet"):
        folder = tmp_path / fmt
        folder.mkdir()
        for name, docs in (("train", TRAIN_DOCS), ("validation", VAL_DOCS)):
            rows = {"id": list(range(len(docs))), "story": docs}
            if fmt == "jsonl":
                lines = [json.dumps({"id": i, "story": s}) for i, s in zip(rows["id"], rows["story"])]
                (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
            else:
                pq.write_table(pa.table(rows), folder / f"{name}.parquet")
        d = prepare_data(gpt2_cfg(folder, tmp_path / "cache", tinystories_dir, text_column="story"))
        assert d.train.tokens.tolist() == expected_stream(gpt2, TRAIN_DOCS)
        assert d.val.tokens.tolist() == expected_stream(gpt2, VAL_DOCS)
        assert d.val.n_bytes == sum(len(doc.encode()) for doc in VAL_DOCS)


def test_hub_splits_are_loaded_by_name_and_packed_like_local_files(tmp_path, tinystories_dir, gpt2, monkeypatch):
    calls = []

    def fake_load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        docs = TRAIN_DOCS if split == "train" else VAL_DOCS
        return datasets.Dataset.from_dict({"id": list(range(len(docs))), "story": docs})

    monkeypatch.setattr(data.sources, "_check_hub_reachable", lambda timeout_s: None)
    monkeypatch.setattr(data.sources.datasets, "load_dataset", fake_load_dataset)
    cfg = gpt2_cfg(tmp_path, tmp_path / "cache", tinystories_dir, text_column="story")
    cfg.sources["stories"].path = None
    d = prepare_data(cfg)
    assert calls == [("roneneldan/TinyStories", None, "train"), ("roneneldan/TinyStories", None, "validation")]
    assert d.train.tokens.tolist() == expected_stream(gpt2, TRAIN_DOCS)
    assert (d.val.n_docs, d.val.n_bytes) == (12, sum(len(doc.encode()) for doc in VAL_DOCS))


# ----------------------------------------------------------------------------- errors


def test_missing_folder_error_names_the_path(tmp_path):
    with pytest.raises(DataError, match=f"data.path=.*{re.escape(str(tmp_path))}/nope.*train.txt/valid.txt"):
        prepare_data(data_cfg(tmp_path / "cache", path=str(tmp_path / "nope")))


def test_folder_without_split_files_lists_the_accepted_names(tmp_path):
    write_txt(tmp_path, "train.txt", TRAIN_DOCS)
    accepted = (
        "validation.txt, validation.jsonl, validation.parquet, valid.txt, valid.jsonl, valid.parquet, "
        "val.txt, val.jsonl, val.parquet"
    )
    expected = f"{re.escape(str(tmp_path))}: no val file; expected exactly one of {accepted}$"
    with pytest.raises(DataError, match=expected):
        prepare_data(data_cfg(tmp_path / "cache", path=str(tmp_path)))


def test_two_train_files_are_rejected_as_ambiguous(small_corpus, tmp_path):
    (small_corpus / "train.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=r"more than one \(train.txt, train.jsonl\) train file"):
        prepare_data(data_cfg(tmp_path / "cache", path=str(small_corpus)))


def test_missing_column_error_names_the_key_and_the_file(tmp_path):
    for name in ("train.jsonl", "val.jsonl"):
        (tmp_path / name).write_text('{"story": "Once."}\n')
    with pytest.raises(
        DataError,
        match=f"{re.escape(str(tmp_path))}/train.jsonl has no column 'text' "
        r"\(data.sources.stories.text_column\); its columns: \['story'\]",
    ):
        prepare_data(data_cfg(tmp_path / "cache", path=str(tmp_path)))


def test_split_shorter_than_one_window_is_an_error(small_corpus, tmp_path, tinystories_dir):
    with pytest.raises(DataError, match=r"train split has \d+ tokens, fewer than data.seq_len \+ 1 = 10001"):
        prepare_data(gpt2_cfg(small_corpus, tmp_path / "cache", tinystories_dir, seq_len=10_000))


def _never_load_dataset(*args, **kwargs):
    raise AssertionError("datasets.load_dataset was called: it retries for ~23 s before failing offline")


def test_unreachable_hub_fails_before_datasets_retries_and_points_to_data_path(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(data.sources.datasets, "load_dataset", _never_load_dataset)
    with pytest.raises(
        DataError,
        match=r"cannot reach the Hugging Face hub at http://127.0.0.1:9 .*"
        r"data.path=../shared/data/tinystories.*HF_HUB_OFFLINE=1",
    ):
        prepare_data(data_cfg(tmp_path / "cache"))


def test_a_hub_connection_that_hangs_is_given_up_after_data_hub_timeout_s(tmp_path, monkeypatch):
    """Name resolution ignores socket timeouts; the probe thread is abandoned after hub_timeout_s instead.
    The fake connection hangs until the test ends: if the wait were not bounded, it would 'succeed' after
    60 s and datasets.load_dataset would be called (and fail the test)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    release = threading.Event()

    def hanging_connection(address, timeout=None):
        release.wait(60)
        return socket.socket()

    monkeypatch.setattr(data.common.socket, "create_connection", hanging_connection)
    monkeypatch.setattr(data.sources.datasets, "load_dataset", _never_load_dataset)
    try:
        with pytest.raises(DataError, match=r"hub.invalid \(timed out\) within data.hub_timeout_s=0.05"):
            prepare_data(data_cfg(tmp_path / "cache", hub_timeout_s=0.05))
    finally:
        release.set()


# ----------------------------------------------------------------------------- batches

TOKENS = np.arange(1000, dtype=np.uint16)  # token value = position, so windows are easy to read
N_WINDOWS = 99  # (1000 - 1) // 10 windows of 11 tokens at stride 10


def starts_of(x):
    return x[:, 0].tolist()


def test_batches_are_windows_with_targets_shifted_by_one():
    x, y = BatchLoader(TOKENS, batch_size=4, seq_len=10, seed=0).next_batch()
    assert x.shape == y.shape == (4, 10) and x.dtype == y.dtype == torch.int64
    assert all(s % 10 == 0 for s in starts_of(x))
    assert torch.equal(x, x[:, :1] + torch.arange(10)) and torch.equal(y, x + 1)


def test_same_seed_same_batches_different_seed_different_batches():
    def first_batches(seed):
        loader = BatchLoader(TOKENS, batch_size=4, seq_len=10, seed=seed)
        return torch.stack([loader.next_batch()[0] for _ in range(30)])

    assert torch.equal(first_batches(1), first_batches(1))
    assert not torch.equal(first_batches(1)[0], first_batches(2)[0])


def test_one_epoch_visits_every_window_once_and_the_next_reshuffles():
    loader = BatchLoader(TOKENS, batch_size=9, seq_len=10, seed=3)
    epochs = [[s for _ in range(11) for s in starts_of(loader.next_batch()[0])] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(0, 990, 10))
    assert epochs[0] != epochs[1]


def test_ranks_take_disjoint_windows_that_together_cover_the_epoch():
    per_rank = []
    for r in range(3):
        loader = BatchLoader(TOKENS, batch_size=3, seq_len=10, seed=5, rank=r, world_size=3)
        per_rank.append([s for _ in range(11) for s in starts_of(loader.next_batch()[0])])
    assert all(len(set(p)) == 33 for p in per_rank)
    assert sorted(per_rank[0] + per_rank[1] + per_rank[2]) == list(range(0, 990, 10))


def _global_batches(loaders: list[BatchLoader], n: int) -> list[list[int]]:
    """The next n global batches read by these ranks' loaders, as window starts in global row order."""
    world, out = len(loaders), []
    for _ in range(n):
        rows = [starts_of(ld.next_batch()[0]) for ld in loaders]  # rank r holds rows r, r + W, ... of the batch
        out.append([rows[i % world][i // world] for i in range(sum(map(len, rows)))])
    return out


def _ranks(world: int, state: dict | None = None) -> list[BatchLoader]:
    """`world` ranks' loaders of global batches of 8 windows (seed 7), at `state` if given."""
    loaders = [BatchLoader(TOKENS, 8 // world, 10, seed=7, rank=r, world_size=world) for r in range(world)]
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(state)
    return loaders


def test_a_global_batch_straddling_an_epoch_boundary_drops_no_window_on_any_rank_count():
    """99 windows, global batches of 8: the 13th takes the epoch's last 3 windows and epoch 1's first 5, split
    over the ranks like any other batch (the order is global: no rank count trims an epoch)."""
    for world in (1, 2, 4):
        loaders = _ranks(world)
        seen = [s for batch in _global_batches(loaders, 13) for s in batch]
        assert sorted(seen[:99]) == list(range(0, 990, 10))
        assert [(ld.epoch, ld.pos) for ld in loaders] == [(1, 5)] * world


@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_ranks_rows_together_are_the_one_rank_global_batch_and_the_state_continues_on_any_rank_count(world):
    """At the start, mid-epoch and across the epoch boundary (batches 0, 5 and 12 of 99 windows), W ranks read
    exactly the 1-rank global batches, and a state saved by W ranks continues on 1, 2 or 4 ranks."""
    whole = _global_batches(_ranks(1), 16)
    assert _global_batches(_ranks(world), 16) == whole
    for done in (5, 12):
        saver = _ranks(world)
        _global_batches(saver, done)
        state = saver[0].state_dict()
        assert all(ld.state_dict() == state for ld in saver)  # every rank holds the same global position
        for resume_world in (1, 2, 4):
            resumed = _global_batches(_ranks(resume_world, state), 4)
            assert resumed == whole[done : done + 4], (world, done, resume_world)


def test_a_per_rank_state_of_older_versions_continues_at_its_global_position_on_any_rank_count():
    """Before global positions each of W ranks saved its own position p in its strided share of the epoch:
    together they had used the first p * W windows of the epoch's permutation."""
    legacy = {"epoch": 0, "pos": 20, "seed": 7, "seq_len": 10, "world_size": 2, "n_tokens": 1000}
    assert _global_batches(_ranks(1, legacy), 2) == _global_batches(_ranks(1), 7)[5:]
    assert _global_batches(_ranks(4, legacy), 2) == _global_batches(_ranks(1), 7)[5:]


def test_restored_state_gives_exactly_the_next_batch_also_across_an_epoch_boundary():
    loader = BatchLoader(TOKENS, batch_size=8, seq_len=10, seed=7)
    for _ in range(12):  # 96 of 99 windows used: the next batch straddles epochs 0 and 1
        loader.next_batch()
    state = loader.state_dict()
    assert state == {"epoch": 0, "pos": 96, "seed": 7, "seq_len": 10, "n_tokens": 1000}  # no rank count in it
    expected = [loader.next_batch() for _ in range(3)]
    restored = BatchLoader(TOKENS, batch_size=8, seq_len=10, seed=7)
    restored.load_state_dict(state)
    for x, y in expected:
        rx, ry = restored.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    assert restored.state_dict()["epoch"] == 1


def test_loading_state_saved_with_another_seq_len_is_refused():
    state = BatchLoader(TOKENS, 8, 10, seed=7).state_dict()
    with pytest.raises(ValueError, match="saved with seq_len=10, this loader has seq_len=20"):
        BatchLoader(TOKENS, 8, 20, seed=7).load_state_dict(state)


def test_eval_batches_are_the_first_windows_in_order_every_time():
    first = [x for x, _ in eval_batches(TOKENS, batch_size=4, seq_len=10, n_batches=3)]
    again = [x for x, _ in eval_batches(TOKENS, batch_size=4, seq_len=10, n_batches=3)]
    assert [starts_of(x) for x in first] == [[0, 10, 20, 30], [40, 50, 60, 70], [80, 90, 100, 110]]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_eval_batches_on_a_short_split_give_the_windows_there_are():
    sizes = [x.shape[0] for x, _ in eval_batches(TOKENS[:95], batch_size=4, seq_len=10, n_batches=5)]
    assert sizes == [4, 4, 1]  # (95 - 1) // 10 = 9 windows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked batches are for CUDA hosts")
def test_on_a_cuda_host_batches_are_pinned_and_equal_the_pageable_ones():
    pinned = BatchLoader(TOKENS, batch_size=4, seq_len=10, seed=0, pin_memory=True).next_batch()
    plain = BatchLoader(TOKENS, batch_size=4, seq_len=10, seed=0).next_batch()
    assert all(t.is_pinned() for t in pinned) and all(torch.equal(a, b) for a, b in zip(pinned, plain))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a host without CUDA")
def test_pinned_batches_without_cuda_are_refused_by_name():
    with pytest.raises(ValueError, match="pin_memory=True.*needs CUDA"):
        BatchLoader(TOKENS, batch_size=4, seq_len=10, seed=0, pin_memory=True)


def test_an_in_memory_split_is_packed_as_the_cache_packs_one():
    tok = Tokenizer.train_bpe(["the cat sat on the mat"] * 20, 300)
    texts = ["the cat", "sat <|endoftext|> on"]  # a literal end-of-text in a document stays text
    split = data.cache.token_split(tok, texts)
    expected = [*tok.encode(texts[0]), tok.eot_id, *tok.encode(texts[1]), tok.eot_id]
    assert split.tokens.tolist() == expected and int((split.tokens == tok.eot_id).sum()) == 2
    assert (split.n_docs, split.n_bytes) == (2, len("the cat") + len("sat <|endoftext|> on"))
