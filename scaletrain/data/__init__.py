"""Data: sources of documents, the tokenizer, the packed token cache, and the batch loaders.

`prepare_data(cfg.data)` turns each configured source (`data.sources.<name>`) into two packed token streams on
disk and memory-maps them:

1. text (`sources.py`): a hub dataset or local files (TinyStories `.txt`, `.jsonl`, `.parquet`), GSM8K
   records formatted by a template, or generated reasoning problems (`synthetic.py`); sources with exact
   answers also give their validation problems for exact-match evaluation;
2. tokenizer (`tokenizer.py`): byte-level BPE trained over the sources (each source's share of the text
   follows its weight) and cached under `cache_dir/tokenizers/<key>`, or GPT-2's BPE from local files;
3. tokens (`cache.py`): every document encoded once and written as one stream with an end-of-text token after
   each document to `cache_dir/tokens/<data_fp>-<tok_fp>/{train,val}.bin`, one entry per source.

Batches (`loader.py`): `BatchLoader` (one stream) and `MixtureLoader` (each row's source drawn by weight) in a
seeded, resumable order that is global (each rank takes its rows of every global batch; the state is a global
position, so a run resumes on any number of ranks); `eval_batches` is a stream's fixed validation set.

Caches: local text is copied once into Arrow under `cache_dir/datasets`; hub data stays in the Hugging Face
cache (so `HF_HUB_OFFLINE=1` finds an earlier download). Every way the data can be unusable (a missing,
empty, non-UTF-8 or unparsable file, a damaged cache entry, a tokenizer that cannot be read or would learn from
no text) is a `DataError` naming the file or key, what was expected and the fix; run.py prints it as one line.
A damaged cache is reported, never rebuilt over.

The names below load their module on first use (PEP 562), so `scaletrain.data.synthetic` (standard library
only) imports without torch or datasets. Not here: model code, the training loop, checkpoint files.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scaletrain.data.cache import PreparedData, SourceData, TokenSplit, prepare_data
    from scaletrain.data.common import EOT, DataError, unreachable
    from scaletrain.data.loader import BatchLoader, MixtureLoader, eval_batches
    from scaletrain.data.sources import Corpus, EvalProblem, iter_txt_documents
    from scaletrain.data.tokenizer import Tokenizer

_WHERE = {
    "EOT": "common",
    "DataError": "common",
    "unreachable": "common",
    "Tokenizer": "tokenizer",
    "Corpus": "sources",
    "EvalProblem": "sources",
    "iter_txt_documents": "sources",
    "PreparedData": "cache",
    "SourceData": "cache",
    "TokenSplit": "cache",
    "prepare_data": "cache",
    "BatchLoader": "loader",
    "MixtureLoader": "loader",
    "eval_batches": "loader",
}
__all__ = [  # the names of _WHERE, spelled out for static analysis
    "BatchLoader",
    "Corpus",
    "DataError",
    "EOT",
    "EvalProblem",
    "MixtureLoader",
    "PreparedData",
    "SourceData",
    "TokenSplit",
    "Tokenizer",
    "eval_batches",
    "iter_txt_documents",
    "prepare_data",
    "unreachable",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'scaletrain.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"scaletrain.data.{_WHERE[name]}"), name)
