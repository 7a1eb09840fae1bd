"""The packed token cache: every document of a source encoded once (`datasets.map`) and written as one stream with
an end-of-text token after each document to `cache_dir/tokens/<data_fp>-<tok_fp>/{train,val}.bin`, one entry per
source; `prepare_data` opens them memory-mapped.

Bits per byte: `TokenSplit.n_bytes` is the sum of the UTF-8 lengths of the split's documents as they are
tokenized (txt: the story with surrounding whitespace stripped; separators and the end-of-text tokens count 0
bytes), so `bpb = mean_loss_nats / ln 2 / bytes_per_token` where `bytes_per_token = n_bytes / n_tokens` over the
whole stream, end-of-text tokens included. For the exact bytes of the windows actually evaluated, sum
`Tokenizer.token_bytes()` over their targets.

Integrity: meta.json records, per split, the size in tokens, the sha256 of the .bin file and its largest token id,
all computed while the file is written. Opening an entry checks the size (a stat), then reads each .bin once: its
sha256 must equal the recorded one and every id must be below the tokenizer's vocabulary, so a changed or
out-of-range token is a `DataError` naming the entry, the file and the fix (delete the folder) at data preparation,
never an `IndexError` mid-training. The result is kept in `verified.json` (each file's size, mtime, ctime and inode
when it was read): while the files stay untouched a later open costs a few stats, and any write to a .bin (its
ctime moves; `touch -d` cannot set ctime) sends it through the full check again; as git does for its index, a file
changed in the same clock tick as the stamp was written counts as changed. Cost, measured on "AMD EPYC" (Zen 3,
family 25 model 1, SHA-NI, 2 shared cores) with the file in the page cache: the full check reads ~1.1 GB/s (sha256
is nearly all of it, the max ~5%; a cold disk may be slower), so 1B uint16 tokens (2 GB) take ~2 s, once per entry
and after each change. An entry written before these fields existed is verified and upgraded, never trusted as it
is: the same pass range-checks its ids, its sha256 and max id are recorded in meta.json from then on, and a warning
says that a change made before the upgrade cannot be detected and how to rebuild it."""

from __future__ import annotations

import hashlib
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
from scaletrain.records import atomic_write

MIN_DOCS_PER_PROCESS = 1000  # below this, map worker start-up costs more than it saves
SPLITS = ("train", "val")
STAMP = "verified.json"  # the last successful content check of an entry's .bin files (see the module docstring)
_READ = 1 << 20  # bytes per read of a content check: a multiple of every token size, small enough to stay in cache


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
    """Append the documents' ids to `path`; with `max_tokens`, only the whole documents that fit. Also returns the
    file's sha256 and largest id, for the check when the entry is opened."""
    n_tokens = n_bytes = n_docs = 0
    sha, max_id = hashlib.sha256(), -1
    with path.open("wb") as f:
        for table in encoded.with_format("arrow").iter(batch_size=8192):
            batch = cast(pa.Table, table)  # the arrow format yields tables (the stubs say dicts)
            # pyarrow.compute's functions are generated at import time: its stubs do not list them
            lengths = pc.list_value_length(batch["ids"]).to_numpy()  # pyright: ignore[reportAttributeAccessIssue]
            keep = len(lengths)
            if max_tokens is not None:
                keep = int(np.searchsorted(np.cumsum(lengths), max_tokens - n_tokens, side="right"))
            ids = pc.list_flatten(batch["ids"].slice(0, keep)).to_numpy()  # pyright: ignore[reportAttributeAccessIssue]
            ids = ids.astype(dtype)
            ids.tofile(f)
            sha.update(memoryview(ids))  # contiguous: the bytes just written
            max_id = max(max_id, int(ids.max())) if len(ids) else max_id
            n_tokens += len(ids)
            n_bytes += int(batch["n_bytes"].slice(0, keep).to_numpy().sum())
            n_docs += keep
            if keep < len(lengths):
                break
    return {
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_docs": n_docs,
        "sha256": sha.hexdigest(),
        "max_token_id": max_id,
    }


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
    """meta.json, every field the reader uses checked; an entry of an older version lacks sha256/max_token_id."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        for split in SPLITS:  # every field the reader uses, so that a damaged one fails here by name
            for field in ("n_tokens", "n_bytes", "n_docs"):
                meta[split][field] = int(meta[split][field])
            if "sha256" in meta[split]:  # written since content checks exist: both fields
                meta[split]["max_token_id"] = int(meta[split]["max_token_id"])
                if not isinstance(meta[split]["sha256"], str) or len(meta[split]["sha256"]) != 64:
                    raise ValueError(f"{split}.sha256 is not a sha256 hex digest")
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


def _scan(folder: Path, path: Path, dtype: np.dtype, vocab_size: int) -> tuple[str, int]:
    """One read of a token file: its sha256 and largest id; an id outside the vocabulary is refused by position."""
    sha, max_id, done = hashlib.sha256(), -1, 0
    buf = bytearray(_READ)
    with path.open("rb") as f:  # buffered: readinto fills the buffer up to the end of the file
        while n := f.readinto(buf):
            sha.update(memoryview(buf)[:n])
            ids = np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize)
            top = int(ids.max())
            if top >= vocab_size:
                i = int(np.argmax(ids >= vocab_size))
                raise _damaged_cache(
                    folder,
                    f"{path.name} holds token id {int(ids[i])} at token {done + i:,} "
                    f"(byte {(done + i) * dtype.itemsize:,}), outside the tokenizer's {vocab_size:,} ids",
                )
            max_id, done = max(max_id, top), done + len(ids)
    return sha.hexdigest(), max_id


def _file_state(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _still_verified(folder: Path, meta: dict) -> set[str]:
    """The splits whose last content check (the stamp) still holds: same recorded digest, same file state, and the
    file last changed before the stamp was written (a change in the same clock tick counts as a change)."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
        written_ns = (folder / STAMP).stat().st_mtime_ns
    except (OSError, ValueError):
        return set()
    held = set()
    for split in SPLITS:
        m, state = meta[split], _file_state(folder / f"{split}.bin")
        expected = {**state, "sha256": m.get("sha256"), "max_token_id": m.get("max_token_id")}
        if (
            isinstance(stamp, dict)
            and stamp.get(split) == expected
            and max(state["mtime_ns"], state["ctime_ns"]) < written_ns
        ):
            held.add(split)
    return held


def _verify_content(folder: Path, meta: dict, vocab_size: int) -> None:
    """Every .bin of the entry holds what was written and only ids of the vocabulary (the module docstring: cost,
    stamp, entries of older versions); refused as a damaged cache naming the file otherwise."""
    dtype, held, stamp, upgraded = np.dtype(meta["dtype"]), _still_verified(folder, meta), {}, []
    for split in SPLITS:
        m, path = meta[split], folder / f"{split}.bin"
        if m.get("max_token_id", -1) >= vocab_size:
            raise _damaged_cache(
                folder,
                f"meta.json records token id {m['max_token_id']} in {path.name}, "
                f"outside the tokenizer's {vocab_size:,} ids",
            )
        state = _file_state(path)  # before the read: a write during it moves ctime past the stamp
        if split not in held:
            sha, max_id = _scan(folder, path, dtype, vocab_size)
            if "sha256" not in m:
                m["sha256"], m["max_token_id"] = sha, max_id
                upgraded.append(path.name)
            elif sha != m["sha256"]:
                raise _damaged_cache(
                    folder,
                    f"{path.name} does not hold what was written (its sha256 is {sha[:16]}..., meta.json records "
                    f"{m['sha256'][:16]}...)",
                )
        stamp[split] = {**state, "sha256": m["sha256"], "max_token_id": m["max_token_id"]}
    if upgraded:
        atomic_write(folder / "meta.json", json.dumps(meta, indent=2))
        log.warning(
            "data: token cache %s was written without content hashes (an older scaletrain): %s checked (every id below "
            "%d) and their sha256 recorded in meta.json now; a change made before today cannot be detected: delete "
            "that folder to rebuild it if in doubt",
            folder,
            " and ".join(upgraded),
            vocab_size,
        )
    if len(held) < len(SPLITS):
        try:
            atomic_write(folder / STAMP, json.dumps(stamp, indent=2))
        except OSError as err:  # a read-only entry: checked again at every open
            log.debug("data: cannot record the content check of %s (%s)", folder, first_line(err))


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
        train, val = (_open_split(folder, split, meta, cfg.seq_len) for split in SPLITS)
        _verify_content(folder, meta, tokenizer.vocab_size)  # before anything trains on it
        out[name] = SourceData(name, weights[name], train, val, folder, corpus.problems, corpus.sample_prompt)
    return PreparedData(tokenizer, out)
