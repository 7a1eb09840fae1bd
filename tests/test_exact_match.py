"""Exact-match evaluation: an oracle that always answers right scores 100%, one that always answers wrong 0%,
a prompt longer than the model's context counts as wrong; and a training run on a source with answers logs
val/<source>/exact_match and writes the final one into summary.json."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config import ModelConfig
from scaletrain.data import EvalProblem, Tokenizer
from scaletrain.evaluator import exact_match
from scaletrain.model import Transformer

from .conftest import compose_cfg, read_summary, tiny_overrides

PROBLEMS = [
    EvalProblem("Question: Alice has 3 pens. Alice gets 4 more pens. How many pens does Alice have now?\nAnswer:", "7"),
    EvalProblem("Question: Is Bob a wumpus?\nAnswer:", "yes"),
    EvalProblem("Question: Given p = true, what is not p?\nAnswer:", "false"),
    EvalProblem("Question: Who is the tallest?\nAnswer:", "Carol"),
]


@pytest.fixture(scope="module")
def gpt2(tinystories_dir) -> Tokenizer:
    return Tokenizer.from_gpt2_files(tinystories_dir.parent / "gpt2_tokenizer")


def _oracle(monkeypatch, tokenizer: Tokenizer, replies: dict[str, str], max_seq_len: int = 64) -> Transformer:
    """A real (tiny) Transformer whose generation (`generate.complete`, as exact_match calls it) is replaced by
    fixed replies keyed by the prompt's text. One oracle at a time: the replacement answers for this model only."""
    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32), tokenizer.vocab_size, max_seq_len)

    def complete(decoded, prompts, max_new_tokens, stop_token=None, **kw):
        assert decoded is model
        return [tokenizer.encode(replies[tokenizer.decode(list(p))])[:max_new_tokens] for p in prompts]

    monkeypatch.setattr("scaletrain.evaluator.complete", complete)
    return model


def test_an_oracle_that_always_answers_right_scores_one_and_a_wrong_one_zero(gpt2, monkeypatch):
    right = {p.prompt: f" Some steps. #### {p.answer}\nQuestion: next" for p in PROBLEMS}
    wrong = {p.prompt: f" #### {p.answer}0" for p in PROBLEMS}
    unmarked = {p.prompt: f" {p.answer}" for p in PROBLEMS}  # the answer without the marker does not count
    assert exact_match(_oracle(monkeypatch, gpt2, right), gpt2, PROBLEMS, 64) == 1.0
    assert exact_match(_oracle(monkeypatch, gpt2, wrong), gpt2, PROBLEMS, 64) == 0.0
    assert exact_match(_oracle(monkeypatch, gpt2, unmarked), gpt2, PROBLEMS, 64) == 0.0
    half = {**right, **{p.prompt: wrong[p.prompt] for p in PROBLEMS[:2]}}
    assert exact_match(_oracle(monkeypatch, gpt2, half), gpt2, PROBLEMS, 64) == 0.5


def test_a_prompt_longer_than_the_context_counts_as_wrong_and_is_never_truncated(gpt2, monkeypatch):
    right = {p.prompt: f" #### {p.answer}" for p in PROBLEMS}
    short = min(len(gpt2.encode(p.prompt)) for p in PROBLEMS)
    model = _oracle(monkeypatch, gpt2, right, max_seq_len=short + 1)  # only the shortest prompt fits
    assert exact_match(model, gpt2, PROBLEMS, 64) == 0.25


@pytest.mark.slow
def test_a_run_on_reasoning_data_logs_exact_match_and_writes_it_into_the_summary(tmp_path, tinystories_dir, data_cache):
    from scaletrain.trainer import train

    extra = {
        "data": "synthetic_reasoning",
        "data.sources.reasoning.synthetic.kinds": "[arithmetic]",
        "data.sources.reasoning.synthetic.n_train": 3000,
        "data.sources.reasoning.synthetic.n_val": 40,
        "train.max_steps": 4,
        "train.eval_every": 2,
        "train.eval_problems": 8,
        "train.eval_answer_tokens": 16,
    }
    overrides = [o for o in tiny_overrides(tinystories_dir, data_cache, **extra) if not o.startswith("data.path=")]
    torch.manual_seed(0)
    train(compose_cfg(overrides), tmp_path / "run")
    summary = read_summary(tmp_path / "run")
    score = summary["val"]["val/reasoning/exact_match"]
    assert score in {i / 8 for i in range(9)}  # a share of the 8 problems
    assert summary["val"]["val/loss"] == summary["val_loss"]
