"""Data loaders of scaletrain's local lm-eval tasks (named by `custom_dataset` in the YAMLs beside this file).

The harness calls a task's `custom_dataset(**metadata)`; the metadata carries the data folders, given by
`scaletrain.eval --task-data gsm8k_dir=... tinystories_dir=...`, the run key `train.eval_tasks_data`, or the
harness's own `lm_eval --include_path <this folder> --metadata '{"gsm8k_dir": ...}'`. A missing key or file is
one error naming it. Nothing here reaches the network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets

from scaletrain.data.common import EOT

# cloze stories: the last word is letters only, after at least this much story (the context must say something)
CLOZE_MIN_CHARS = 200
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]+)[.!?\"']*\s*$", re.DOTALL)


def _folder(metadata: dict, key: str, task: str, files: tuple[str, ...]) -> Path:
    if not metadata.get(key):
        raise ValueError(
            f"{task}: no data folder: give {key} (scaletrain.eval --task-data {key}=PATH, the run key "
            f'train.eval_tasks_data.{key}, or lm_eval --metadata \'{{"{key}": "PATH"}}\')'
        )
    folder = Path(str(metadata[key])).expanduser()
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{task}: {key}={folder} has no {', '.join(missing)}")
    return folder


def gsm8k(**metadata) -> datasets.DatasetDict:
    """GSM8K's train (few-shot examples) and test splits from `gsm8k_dir`/{train,test}.jsonl."""
    folder = _folder(metadata, "gsm8k_dir", "local_gsm8k", ("train.jsonl", "test.jsonl"))
    splits = {}
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        splits[split] = datasets.Dataset.from_list([{"question": r["question"], "answer": r["answer"]} for r in rows])
    return datasets.DatasetDict(splits)


def _stories(metadata: dict, task: str) -> list[str]:
    folder = _folder(metadata, "tinystories_dir", task, ("valid.txt",))
    text = (folder / "valid.txt").read_text(encoding="utf-8")
    return [s.strip() for s in text.split(EOT) if s.strip()]


def tinystories_cloze(**metadata) -> datasets.DatasetDict:
    """TinyStories validation stories as a LAMBADA-style cloze: the story up to its last word is the context,
    " <last word>" the target (trailing punctuation dropped). Stories whose last word is not letters only, or
    shorter than CLOZE_MIN_CHARS before it, are left out; the order is the file's."""
    docs = []
    for story in _stories(metadata, "local_tinystories_cloze"):
        m = _LAST_WORD.match(story)
        if m and len(m["context"]) >= CLOZE_MIN_CHARS:
            docs.append({"context": m["context"], "target": " " + m["word"]})
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


def tinystories_ppl(**metadata) -> datasets.DatasetDict:
    """TinyStories validation stories, whole, for perplexity (word, byte) and bits per byte."""
    stories = _stories(metadata, "local_tinystories_ppl")
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list([{"text": s} for s in stories])})


def ppl_results(doc: dict, results: list) -> dict:
    """The harness's per-document pairs for its weighted perplexity aggregations (as its wikitext task)."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
