"""The packed token cache: every document of a source encoded once (`datasets.map`) and written as one stream with
an end-of-text token after each document to `cache_dir/tokens/<data_fp>-<tok_fp>/{train,val}.bin`, one entry per
source; `prepare_data` opens them memory-mapped.

Bits per byte: `TokenSplit.n_bytes` is the sum of the UTF-8 lengths of the split's documents as they are
tokenized (txt: the story with surrounding whitespace stripped; separators and the end-of-text tokens count 0
bytes), so `bpb = mean_loss_nats / ln 2 / bytes_per_token` where `bytes_per_token = n_bytes / n_tokens` over the
whole stream, end-of-text tokens included. For the exact bytes of the windows actually evaluated, sum
`Tokenizer.token_bytes()` over their targets."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scaletrain.config import unwritable
from scaletrain.data.common import CACHE_VERSION, DataError, digest, first_line, log
from scaletrain.data.sources import Corpus, EvalProblem, open_corpus
from scaletrain.data.tokenizer import Tokenizer, get_tokenizer

MIN_DOCS_PER_PROCESS = 1000  # below this, map worker start-up costs more than it saves


@dataclass
class TokenSplit:
    tokens: np.ndarray  # packed stream, eot after every document (memmap of uint16 or uint32)
    n_bytes: int  # UTF-8 bytes of the documents (see the module docstring for what counts)
    n_docs: int

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / len(self.tokens)


@dataclass
class SourceData:
    """One source's packed token streams, its share of the training sequences, and its validation problems."""

    name: str
    weight: float  # normalized over the sources
    train: TokenSplit
    val: TokenSplit
    cache_dir: Path  # the folder of this (source, tokenizer) token cache entry
    problems: list[EvalProblem] = field(default_factory=list)
    sample_prompt: str | None = None


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    sources: dict[str, SourceData]

    def _only(self) -> SourceData:
        if len(self.sources) != 1:
            raise ValueError(f"several sources ({', '.join(self.sources)}): use .sources[name]")
        return next(iter(self.sources.values()))

    @property
    def train(self) -> TokenSplit:  # single-source data: its streams
        return self._only().train

    @property
    def val(self) -> TokenSplit:
        return self._only().val

    @property
    def cache_dir(self) -> Path:
        return self._only().cache_dir

    @property
    def sample_prompt(self) -> str | None:
        """The first source's configured prompt, else its first validation problem's."""
        return next((s.sample_prompt for s in self.sources.values() if s.sample_prompt), None)


class _EncodeDocuments:
    """`datasets.map` function: token ids + eot and UTF-8 byte count of each document."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict) -> dict:
        eot = [self.tokenizer.eot_id]
        return {
            "ids": [ids + eot for ids in self.tokenizer.encode_batch(batch["text"])],
            "n_bytes": [len(text.encode()) for text in batch["text"]],
        }


def token_split(tokenizer: Tokenizer, texts: list[str]) -> TokenSplit:
    """A small split held in memory (e.g. a frozen test set), packed as the cache packs one: ids + eot per
    document, and the documents' UTF-8 bytes for bits per byte."""
    encoded = _EncodeDocuments(tokenizer)({"text": texts})
    ids = np.fromiter((i for doc in encoded["ids"] for i in doc), dtype=np.int64)
    return TokenSplit(ids, sum(encoded["n_bytes"]), len(texts))


def _encode_split(
    ds: datasets.Dataset, tokenizer: Tokenizer, num_proc: int, arrow_file: Path, fingerprint: str
) -> datasets.Dataset:
    features = datasets.Features(
        {"ids": datasets.Sequence(datasets.Value("int32")), "n_bytes": datasets.Value("int64")}
    )
    procs = min(num_proc, len(ds) // MIN_DOCS_PER_PROCESS)
    return ds.map(
        _EncodeDocuments(tokenizer),
        batched=True,
        remove_columns=ds.column_names,
        features=features,
        num_proc=procs if procs > 1 else None,
        cache_file_name=str(arrow_file),
        load_from_cache_file=False,
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )


def _write_stream(encoded: datasets.Dataset, path: Path, dtype: np.dtype, max_tokens: int | None) -> dict:
    """Append the documents' ids to `path`; with `max_tokens`, only the whole documents that fit."""
    n_tokens = n_bytes = n_docs = 0
    with path.open("wb") as f:
        for table in encoded.with_format("arrow").iter(batch_size=8192):
            batch = cast(pa.Table, table)  # the arrow format yields tables (the stubs say dicts)
            # pyarrow.compute's functions are generated at import time: its stubs do not list them
            lengths = pc.list_value_length(batch["ids"]).to_numpy()  # pyright: ignore[reportAttributeAccessIssue]
            keep = len(lengths)
            if max_tokens is not None:
                keep = int(np.searchsorted(np.cumsum(lengths), max_tokens - n_tokens, side="right"))
            ids = pc.list_flatten(batch["ids"].slice(0, keep)).to_numpy()  # pyright: ignore[reportAttributeAccessIssue]
            ids.astype(dtype).tofile(f)
            n_tokens += len(ids)
            n_bytes += int(batch["n_bytes"].slice(0, keep).to_numpy().sum())
            n_docs += keep
            if keep < len(lengths):
                break
    return {"n_tokens": n_tokens, "n_bytes": n_bytes, "n_docs": n_docs}


def _write_entry(cfg, corpus: Corpus, tokenizer: Tokenizer, folder: Path) -> None:
    """Encode both splits into `folder`: {train,val}.bin, tokenizer.json and, last, meta.json."""
    (folder / "encoded").mkdir(parents=True)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    meta = {
        "version": CACHE_VERSION,
        "source": corpus.description,
        "data_fingerprint": corpus.fingerprints,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.name,
        "max_val_tokens": cfg.max_val_tokens,
    }
    for split, cap in (("train", None), ("val", cfg.max_val_tokens)):
        encoded = _encode_split(
            corpus.load(split),
            tokenizer,
            cfg.num_proc,
            folder / "encoded" / f"{split}.arrow",
            digest(corpus.fingerprints[split], tokenizer.fingerprint),
        )
        meta[split] = _write_stream(encoded, folder / f"{split}.bin", dtype, cap)
        if meta[split]["n_docs"] == 0:
            raise DataError(
                f"{split} split of {corpus.description} gives no documents"
                + (f" within data.max_val_tokens={cap}" if cap is not None else "")
            )
    shutil.rmtree(folder / "encoded")  # the per-document Arrow copy is only a step towards the .bin
    tokenizer.save(folder / "tokenizer.json")  # a record of exactly what produced these ids
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def _build_token_cache(cfg, corpus: Corpus, tokenizer: Tokenizer, out: Path) -> None:
    """Build in a private folder and rename it into place when complete, so a crash never leaves
    a folder that looks finished and concurrent builders do not write into each other's files."""
    t0 = time.perf_counter()
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_entry(cfg, corpus, tokenizer, tmp)
        tmp.rename(out)
    except OSError:
        if not (out / "meta.json").is_file():
            raise
        # another process finished the same entry first; it holds the same bytes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("data: tokenized %s in %.1f s -> %s", corpus.description, time.perf_counter() - t0, out)


def _damaged_cache(folder: Path, what: str) -> DataError:
    return DataError(
        f"token cache {folder} is damaged: {what}; delete that folder and run again to rebuild it "
        "(it was changed after it was written: a complete entry is never left half-written)"
    )


def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        for split in ("train", "val"):  # every field the reader uses, so that a damaged one fails here by name
            for field in ("n_tokens", "n_bytes", "n_docs"):
                meta[split][field] = int(meta[split][field])
        np.dtype(meta["dtype"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise _damaged_cache(folder, f"meta.json cannot be read ({first_line(err)})") from None
    return meta


def _open_split(folder: Path, split: str, meta: dict, seq_len: int) -> TokenSplit:
    m, dtype, path = meta[split], np.dtype(meta["dtype"]), folder / f"{split}.bin"
    if m["n_tokens"] < seq_len + 1:
        raise DataError(
            f"{split} split has {m['n_tokens']} tokens, fewer than data.seq_len + 1 = {seq_len + 1} "
            f"({meta['source']}): add text to it or lower data.seq_len"
        )
    size = path.stat().st_size if path.is_file() else None
    if size != m["n_tokens"] * dtype.itemsize:  # a memmap past the end would fail, a longer file hides damage
        found = "missing" if size is None else f"{size:,} bytes"
        expected = f"{m['n_tokens'] * dtype.itemsize:,} bytes ({m['n_tokens']:,} {dtype.name} tokens per meta.json)"
        raise _damaged_cache(folder, f"{path.name} is {found}, expected {expected}")
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(m["n_tokens"],))
    return TokenSplit(tokens, m["n_bytes"], m["n_docs"])


def prepare_data(cfg, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Each source's text -> one tokenizer (trained over the sources, or cached; or `tokenizer`, e.g. a finished
    run's) -> each source's packed token streams (built or reused), memory-mapped."""
    cache_root = Path(cfg.cache_dir).expanduser()
    problem = unwritable(cache_root)
    if problem:
        raise DataError(f"data.cache_dir={cfg.cache_dir}: {problem}; set data.cache_dir to a folder you can write")
    corpora = {name: open_corpus(name, src, cfg, cache_root) for name, src in cfg.sources.items()}
    tokenizer = tokenizer or get_tokenizer(cfg, corpora, cache_root)
    weights = cfg.weights()
    out: dict[str, SourceData] = {}
    for name, corpus in corpora.items():
        data_fp = digest(CACHE_VERSION, corpus.fingerprints["train"], corpus.fingerprints["val"], cfg.max_val_tokens)
        folder = cache_root / "tokens" / f"{data_fp}-{tokenizer.fingerprint}"
        if not (folder / "meta.json").is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            _build_token_cache(cfg, corpus, tokenizer, folder)
        meta = _read_meta(folder)
        train, val = (_open_split(folder, split, meta, cfg.seq_len) for split in ("train", "val"))
        out[name] = SourceData(name, weights[name], train, val, folder, corpus.problems, corpus.sample_prompt)
    return PreparedData(tokenizer, out)
