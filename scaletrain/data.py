"""Data: text loading, tokenizer, packed token cache, and the resumable batch loader.

`prepare_data(cfg.data)` turns a corpus into two packed token streams on disk and memory-maps them:

1. text: the hub dataset `data.hub_id` (after a quick reachability probe), or a local folder
   `data.path` with `train`/`valid` files in TinyStories text format (`.txt`, documents separated
   by `<|endoftext|>`), `.jsonl` or `.parquet` (column `data.text_column`);
2. tokenizer: byte-level BPE trained on (a prefix of) the train split and cached under
   `cache_dir/tokenizers/<key>`, or GPT-2's BPE read from local vocab.json/merges.txt;
3. tokens: every document encoded once (`datasets.map`) and written as one stream with an
   end-of-text token after each document to `cache_dir/tokens/<data_fp>-<tok_fp>/{train,val}.bin`.

Bits per byte: `TokenSplit.n_bytes` is the sum of the UTF-8 lengths of the split's documents as
they are tokenized (txt: the story with surrounding whitespace stripped; separators and the
end-of-text tokens count 0 bytes), so `bpb = mean_loss_nats / ln 2 / bytes_per_token` where
`bytes_per_token = n_bytes / n_tokens` over the whole stream, end-of-text tokens included. For the
exact bytes of the windows actually evaluated, sum `Tokenizer.token_bytes()` over their targets.

Caches: local text is copied once into Arrow under `cache_dir/datasets`; hub data stays in the
Hugging Face cache (so `HF_HUB_OFFLINE=1` finds an earlier download).

Every way the data can be unusable (a missing, empty, non-UTF-8 or unparsable file, a damaged cache entry, a
tokenizer that cannot be read or would learn from no text) is a `DataError` naming the file or key, what was
expected and the fix; run.py prints it as one line. A damaged cache is reported, never rebuilt over.

`BatchLoader` draws training windows in a seeded, resumable, rank-sharded order; `eval_batches` is
the fixed validation set. Not here: model code, the training loop, checkpoint files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tokenizers
import torch
from datasets.exceptions import DatasetGenerationError
from tokenizers import decoders, models, pre_tokenizers, trainers

from scaletrain.config import TokenizerKind, unwritable
from scaletrain.records import atomic_write

EOT = "<|endoftext|>"
CACHE_VERSION = "1"  # bump when the cache layout or the text parsing changes
SPLIT_FILES = {"train": ("train",), "val": ("valid", "validation", "val")}
SUFFIXES = (".txt", ".jsonl", ".parquet")
FULL_HASH_BYTES = 256 << 20  # files up to this size are fingerprinted by their whole content
MIN_DOCS_PER_PROCESS = 1000  # below this, map worker start-up costs more than it saves


log = logging.getLogger("scaletrain.data")


class DataError(RuntimeError):
    """The data cannot be loaded as configured; the message names the path or key and the fix."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _digest(*parts: object) -> str:
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).hexdigest()


class Tokenizer:
    """A `tokenizers.Tokenizer` with the end-of-text id and a content fingerprint."""

    def __init__(self, inner: tokenizers.Tokenizer):
        # Documents are separated by the eot id that packing inserts; a literal "<|endoftext|>"
        # inside a document must not forge a boundary, so special tokens in text encode as text.
        inner.encode_special_tokens = True
        eot_id = inner.token_to_id(EOT)
        if eot_id is None:
            raise DataError(f"tokenizer has no {EOT!r} token")
        self._tok, self.eot_id = inner, eot_id
        self._token_bytes: np.ndarray | None = None
        self.fingerprint = hashlib.sha256(inner.to_str().encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """Bytes of text each id stands for (0 for `<|endoftext|>`): summed over a window's targets
        it gives that window's exact byte count for bits per byte. Byte-level BPE writes one byte
        as one vocabulary character, so a token's byte count is its length."""
        if self._token_bytes is None:  # computed once: a Python loop over the vocabulary (50K for GPT-2)
            special = {t.content for t in self._tok.get_added_tokens_decoder().values()}
            lengths = np.zeros(self.vocab_size, dtype=np.int64)
            for token, i in self._tok.get_vocab(with_added_tokens=True).items():
                lengths[i] = 0 if token in special else len(token)
            self._token_bytes = lengths
        return self._token_bytes

    def save(self, path: str | Path) -> None:
        atomic_write(path, self._tok.to_str())  # a concurrent job never reads half a tokenizer

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Byte-level BPE (GPT-2 pre-tokenization) with `<|endoftext|>` as special token id 0."""
        inner = tokenizers.Tokenizer(models.BPE())
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        inner.train_from_iterator(texts, trainer)
        return cls(inner)

    @classmethod
    def from_gpt2_files(cls, directory: str | Path) -> Tokenizer:
        """GPT-2's BPE from vocab.json + merges.txt: the original ids, eot = 50256."""
        files = [Path(directory).expanduser() / name for name in ("vocab.json", "merges.txt")]
        for f in files:
            if not f.is_file():
                raise DataError(
                    f"GPT-2 tokenizer file not found: {f} (data.tokenizer.gpt2_dir must hold vocab.json and merges.txt)"
                )
        try:  # tokenizers raises a bare Exception for a malformed file
            inner = tokenizers.Tokenizer(models.BPE.from_file(str(files[0]), str(files[1])))
        except Exception as err:
            raise DataError(
                f"GPT-2 tokenizer files in {files[0].parent} cannot be read ({_first_line(err)}); "
                "data.tokenizer.gpt2_dir must hold GPT-2's original vocab.json and merges.txt"
            ) from None
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        inner.add_special_tokens([EOT])  # already in vocab.json; this marks it special
        return cls(inner)


@dataclass
class TokenSplit:
    tokens: np.ndarray  # packed stream, eot after every document (memmap of uint16 or uint32)
    n_bytes: int  # UTF-8 bytes of the documents (see the module docstring for what counts)
    n_docs: int

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / len(self.tokens)


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: TokenSplit
    val: TokenSplit
    cache_dir: Path  # the folder of this (data, tokenizer) token cache entry


# ----------------------------------------------------------------------------- text sources


@dataclass
class _Corpus:
    """Per split ("train", "val"): a fingerprint, and `load(split)` giving a one-column Dataset."""

    fingerprints: dict[str, str]
    load: Callable[[str], datasets.Dataset]
    description: str


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")


def unreachable(endpoint: str, timeout_s: float) -> str | None:
    """Why a TCP connection to `endpoint` (a URL) failed within `timeout_s` (None when it succeeded): the
    quick probe before a client that would retry for a long time (datasets, W&B)."""
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    failure: list[str] = ["timed out"]

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout_s).close()
            failure.clear()
        except OSError as err:
            failure[0] = str(err)

    # A thread because name resolution ignores the socket timeout.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return failure[0] if failure else None


def _check_hub_reachable(timeout_s: float) -> None:
    """Fail fast: offline, `datasets` retries for 23 s before giving up (notes/torch-cpu.md §9)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        return  # datasets will read its local cache
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    failure = unreachable(endpoint, timeout_s)
    if failure:
        raise DataError(
            f"cannot reach the Hugging Face hub at {endpoint} ({failure}) within data.hub_timeout_s="
            f"{timeout_s}. Use local files with data.path=../shared/data/tinystories (a folder with "
            "train.txt/valid.txt, .jsonl or .parquet), or set HF_HUB_OFFLINE=1 to use a cached copy."
        )


def _select_text(ds: datasets.Dataset, column: str, where: str) -> datasets.Dataset:
    """Keep only the text column, named "text" from here on."""
    if column not in ds.column_names:
        raise DataError(f"{where} has no column {column!r} (data.text_column); its columns: {ds.column_names}")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def _hub_corpus(cfg) -> _Corpus:
    _check_hub_reachable(cfg.hub_timeout_s)
    splits = {"train": cfg.hub_train_split, "val": cfg.hub_val_split}
    loaded = {
        k: _select_text(datasets.load_dataset(cfg.hub_id, split=s), cfg.text_column, f"{cfg.hub_id}[{s}]")
        for k, s in splits.items()
    }
    # The datasets fingerprint identifies the cached Arrow data (dataset, revision, split).
    return _Corpus({k: ds._fingerprint for k, ds in loaded.items()}, loaded.__getitem__, f"hub {cfg.hub_id}")


def _find_split_file(folder: Path, split: str) -> Path:
    candidates = [folder / f"{stem}{suffix}" for stem in SPLIT_FILES[split] for suffix in SUFFIXES]
    found = [p for p in candidates if p.is_file()]
    if len(found) != 1:
        problem = "no" if not found else f"more than one ({', '.join(p.name for p in found)})"
        raise DataError(
            f"{folder}: {problem} {split} file; expected exactly one of {', '.join(p.name for p in candidates)}"
        )
    return found[0]


def _file_fingerprint(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.blake2b(f"{path.name}:{size}".encode(), digest_size=8)
    with path.open("rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            # Hashing GBs would cost seconds on every run; size + mtime + both ends catch
            # re-exports, appends and truncations (an in-place edit of the middle would not be).
            h.update(str(path.stat().st_mtime_ns).encode() + f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()


def _not_utf8(path: str | Path) -> DataError:
    """The error for a file that is not UTF-8, naming its first bad line (a second pass, on the error path only:
    text mode decodes ahead in blocks, so the line being read when decoding failed is not the bad one)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return DataError(
                    f"{path}: line {number} is not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                    "expected UTF-8 text: convert the file, e.g. iconv -f latin1 -t utf-8"
                )
    return DataError(f"{path}: not UTF-8 text; expected UTF-8: convert the file, e.g. iconv -f latin1 -t utf-8")


def iter_txt_documents(path: str | Path) -> Iterator[str]:
    """Documents of a TinyStories-style file, streamed: text between `<|endoftext|>` markers,
    surrounding whitespace stripped, empty documents skipped. DataError naming the line for text
    that is not UTF-8."""
    lines: list[str] = []
    with open(path, encoding="utf-8") as f:
        try:
            for line in f:
                *finished, rest = line.split(EOT)
                for piece in finished:
                    doc = ("".join(lines) + piece).strip()
                    if doc:
                        yield doc
                    lines = []
                lines.append(rest)
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    doc = "".join(lines).strip()
    if doc:
        yield doc


def _txt_examples(path: str, fingerprint: str) -> Iterator[dict]:
    del fingerprint  # only part of gen_kwargs so that datasets' cache key changes with the content
    n_docs = 0
    for doc in iter_txt_documents(path):
        n_docs += 1
        yield {"text": doc}
    if n_docs == 0:  # datasets would fail with 'Instruction "train" corresponds to no data!'
        raise DataError(
            f"{path}: no documents, only whitespace and {EOT} separators; expected text, documents separated by {EOT}"
        )


FILE_KINDS = {".txt": "text", ".jsonl": "JSON Lines (one JSON object per line)", ".parquet": "Parquet"}


def _data_error_in(err: BaseException) -> DataError | None:
    """A DataError that `datasets` wrapped (DatasetGenerationError) while running one of our generators."""
    seen: BaseException | None = err
    while seen is not None and not isinstance(seen, DataError):
        seen = seen.__cause__ or seen.__context__
    return seen


def _read_local_file(path: Path, fingerprint: str, column: str, cache: Path) -> datasets.Dataset:
    """`_load_local_file`, with every way a file can be unreadable as one DataError naming the file and the
    format expected (datasets and pyarrow raise their own types, several layers deep)."""
    try:
        ds = _load_local_file(path, fingerprint, column, cache)
    except DataError:
        raise
    except (DatasetGenerationError, pa.ArrowException, UnicodeDecodeError) as err:
        ours = _data_error_in(err)
        if ours is not None:
            raise ours from None
        cause = (err.__cause__ or err.__context__) if isinstance(err, DatasetGenerationError) else err
        raise DataError(
            f"{path}: cannot be read as {FILE_KINDS[path.suffix]} ({_first_line(cause or err)}); "
            f"expected a {path.suffix} file with a {column!r} column (data.text_column)"
        ) from None
    if len(ds) == 0:
        raise DataError(f"{path}: no rows; expected documents in its {column!r} column (data.text_column)")
    return ds


def _load_local_file(path: Path, fingerprint: str, column: str, cache: Path) -> datasets.Dataset:
    if path.suffix == ".txt":
        return datasets.Dataset.from_generator(
            _txt_examples,
            gen_kwargs={"path": str(path), "fingerprint": fingerprint},
            cache_dir=str(cache),
            features=datasets.Features({"text": datasets.Value("string")}),
        )
    reader = datasets.Dataset.from_json if path.suffix == ".jsonl" else datasets.Dataset.from_parquet
    return _select_text(reader(str(path), cache_dir=str(cache)), column, str(path))


def _local_corpus(cfg, cache_root: Path) -> _Corpus:
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"data.path={cfg.path}: folder {folder.resolve()} not found; expected a folder with "
            f"train.txt/valid.txt (or .jsonl/.parquet with column {cfg.text_column!r})"
        )
    files = {split: _find_split_file(folder, split) for split in SPLIT_FILES}
    for f in files.values():
        if f.stat().st_size == 0:
            raise DataError(f"{f}: the file is empty; expected {FILE_KINDS[f.suffix]} with the {f.stem} documents")
    fps = {split: _file_fingerprint(f) for split, f in files.items()}

    def load(split: str) -> datasets.Dataset:
        return _read_local_file(files[split], fps[split], cfg.text_column, cache_root / "datasets")

    return _Corpus(fps, load, f"{folder.resolve()} ({files['train'].name}, {files['val'].name})")


# ----------------------------------------------------------------------------- tokenizer


def _train_texts(ds: datasets.Dataset, max_bytes: int, where: str) -> Iterator[str]:
    """Whole documents from the start of the split while their total stays within `max_bytes`. A first
    document larger than that is an error: the tokenizer would learn nothing beyond single bytes."""
    total = 0
    for batch in ds.iter(batch_size=1000):
        for text in cast(dict[str, list[str]], batch)["text"]:
            size = len(text.encode())
            if total == 0 and size > max_bytes:
                raise DataError(
                    f"{where}: its first document has {size:,} bytes, more than data.tokenizer.max_train_bytes="
                    f"{max_bytes:,}, so the tokenizer would train on no text; separate the documents with "
                    f"{EOT} (a .txt file without it is one document) or raise data.tokenizer.max_train_bytes"
                )
            total += size
            if total > max_bytes:
                return
            yield text


def _get_tokenizer(cfg, corpus: _Corpus, cache_root: Path) -> Tokenizer:
    tc = cfg.tokenizer
    if tc.kind == TokenizerKind.gpt2:
        return Tokenizer.from_gpt2_files(tc.gpt2_dir)
    # Keyed by the train split's fingerprint (a content hash for local files, the datasets
    # fingerprint on the hub) so that a warm start finds it without reading any text.
    key = _digest(CACHE_VERSION, corpus.fingerprints["train"], cfg.text_column, tc.vocab_size, tc.max_train_bytes)
    path = cache_root / "tokenizers" / key / "tokenizer.json"
    if path.is_file():
        try:  # tokenizers raises a bare Exception for a malformed file
            return Tokenizer.load(path)
        except DataError:
            raise
        except Exception as err:
            raise DataError(
                f"{path}: cached tokenizer cannot be read ({_first_line(err)}); delete {path.parent} "
                "and run again to train it anew"
            ) from None
    t0 = time.perf_counter()
    texts = _train_texts(corpus.load("train"), tc.max_train_bytes, f"train split of {corpus.description}")
    tok = Tokenizer.train_bpe(texts, tc.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    log.info("data: trained BPE tokenizer (vocab %d) in %.1f s -> %s", tok.vocab_size, time.perf_counter() - t0, path)
    return tok


# ----------------------------------------------------------------------------- packed token cache


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


def _write_entry(cfg, corpus: _Corpus, tokenizer: Tokenizer, folder: Path) -> None:
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
            _digest(corpus.fingerprints[split], tokenizer.fingerprint),
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


def _build_token_cache(cfg, corpus: _Corpus, tokenizer: Tokenizer, out: Path) -> None:
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
        raise _damaged_cache(folder, f"meta.json cannot be read ({_first_line(err)})") from None
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


def prepare_data(cfg) -> PreparedData:
    """Text -> tokenizer (trained or cached) -> packed token streams (built or reused), memory-mapped."""
    cache_root = Path(cfg.cache_dir).expanduser()
    problem = unwritable(cache_root)
    if problem:
        raise DataError(f"data.cache_dir={cfg.cache_dir}: {problem}; set data.cache_dir to a folder you can write")
    corpus = _local_corpus(cfg, cache_root) if cfg.path else _hub_corpus(cfg)
    tokenizer = _get_tokenizer(cfg, corpus, cache_root)
    data_fp = _digest(
        CACHE_VERSION, corpus.fingerprints["train"], corpus.fingerprints["val"], cfg.text_column, cfg.max_val_tokens
    )
    out = cache_root / "tokens" / f"{data_fp}-{tokenizer.fingerprint}"
    if not (out / "meta.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _build_token_cache(cfg, corpus, tokenizer, out)
    meta = _read_meta(out)
    train, val = (_open_split(out, split, meta, cfg.seq_len) for split in ("train", "val"))
    return PreparedData(tokenizer, train, val, out)


# ----------------------------------------------------------------------------- batches


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows tokens[s : s + seq_len + 1] for each start s, as int64 (x, y) with y = x shifted by one."""
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


class BatchLoader:
    """Random non-overlapping windows of seq_len + 1 tokens (stride seq_len), deterministic in
    (seed, epoch), sharded by rank, and resumable: `state_dict()` pins the exact next batch.

    Each epoch permutes all windows with `default_rng([seed, epoch])`; rank r takes every
    world_size-th window of that order. The last `n_windows % world_size` windows of the order are
    dropped so that every rank has equally many per epoch (ranks stay in step across epochs).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..world_size-1 = {world_size - 1}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("BatchLoader(pin_memory=True) needs CUDA (page-locked memory is for host-to-GPU copies)")
        # pinned batches let `.to("cuda", non_blocking=True)` return at once: the copy and the next batch's
        # gather overlap the GPU's work on the current step (the loop never syncs outside log steps)
        self.pin_memory = pin_memory
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_windows = (len(tokens) - 1) // seq_len
        self.per_rank = self.n_windows // world_size
        if self.per_rank == 0:
            raise ValueError(
                f"{len(tokens)} tokens hold {self.n_windows} windows of seq_len + 1 = {seq_len + 1}; "
                f"need at least world_size = {world_size}"
            )
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _rank_starts(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            self._order = perm[: self.per_rank * self.world_size][self.rank :: self.world_size] * self.seq_len
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        need = self.batch_size
        while need:  # a batch may straddle one or more epoch boundaries
            take = min(need, self.per_rank - self.pos)
            parts.append(self._rank_starts()[self.pos : self.pos + take])
            self.pos += take
            need -= take
            if self.pos == self.per_rank:
                self.epoch, self.pos = self.epoch + 1, 0
        x, y = _windows(self.tokens, np.concatenate(parts), self.seq_len)
        return (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "n_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "world_size", "n_tokens"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]}, this loader has "
                    f"{key}={mine[key]}; the data order would not continue where it stopped"
                )
        self.epoch, self.pos = state["epoch"], state["pos"]


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first n_batches * batch_size non-overlapping windows, in order (fewer if the split is
    short; the last batch may then be smaller). The same set on every call."""
    n = min(n_batches * batch_size, (len(tokens) - 1) // seq_len)
    if n <= 0:
        raise ValueError(f"{len(tokens)} tokens hold no window of seq_len + 1 = {seq_len + 1}")
    for first in range(0, n, batch_size):
        yield _windows(tokens, np.arange(first, min(first + batch_size, n)) * seq_len, seq_len)
