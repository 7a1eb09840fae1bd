"""The tokenizer: byte-level BPE trained on the training text (over a mixture: each source's share of the text
follows its weight) and cached by content, or GPT-2's BPE from local files. `<|endoftext|>` separates documents."""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import datasets
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from scaletrain.config import TokenizerKind
from scaletrain.data.common import CACHE_VERSION, EOT, DataError, digest, first_line, log
from scaletrain.records import atomic_write

if TYPE_CHECKING:
    from scaletrain.data.sources import Corpus


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
                f"GPT-2 tokenizer files in {files[0].parent} cannot be read ({first_line(err)}); "
                "data.tokenizer.gpt2_dir must hold GPT-2's original vocab.json and merges.txt"
            ) from None
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        inner.add_special_tokens([EOT])  # already in vocab.json; this marks it special
        return cls(inner)


def train_texts(ds: datasets.Dataset, max_bytes: int, where: str) -> Iterator[str]:
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


def get_tokenizer(cfg, corpora: dict[str, Corpus], cache_root: Path) -> Tokenizer:
    """The configured tokenizer. BPE: trained on whole documents from the start of each source's training
    split, the source's share of `data.tokenizer.max_train_bytes` following its weight, and cached under a key
    of those sources' fingerprints (a content hash for local files and generated problems, the datasets
    fingerprint on the hub), so that a warm start finds it without reading any text."""
    tc = cfg.tokenizer
    if tc.kind == TokenizerKind.gpt2:
        return Tokenizer.from_gpt2_files(tc.gpt2_dir)
    weights = cfg.weights()
    parts = [(name, corpora[name].fingerprints["train"], weights[name]) for name in sorted(corpora)]
    key = digest(CACHE_VERSION, parts, tc.vocab_size, tc.max_train_bytes)
    path = cache_root / "tokenizers" / key / "tokenizer.json"
    if path.is_file():
        try:  # tokenizers raises a bare Exception for a malformed file
            return Tokenizer.load(path)
        except DataError:
            raise
        except Exception as err:
            raise DataError(
                f"{path}: cached tokenizer cannot be read ({first_line(err)}); delete {path.parent} "
                "and run again to train it anew"
            ) from None
    t0 = time.perf_counter()
    texts = itertools.chain.from_iterable(
        train_texts(
            corpora[name].load("train"),
            max(1, int(tc.max_train_bytes * w)),
            f"train split of {corpora[name].description}",
        )
        for name, _, w in parts
        if w > 0
    )
    tok = Tokenizer.train_bpe(texts, tc.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    log.info("data: trained BPE tokenizer (vocab %d) in %.1f s -> %s", tok.vocab_size, time.perf_counter() - t0, path)
    return tok
