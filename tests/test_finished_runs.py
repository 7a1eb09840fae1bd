"""A finished run folder is self-contained: tokenizer.json and model.pt are written, and the sample and eval
commands work on it from another directory, reproducing what the run itself measured."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaletrain import checkpoint as ckpt
from scaletrain import records
from scaletrain.runs import RunFolderError, load_run
from scaletrain.sample import continuations
from scaletrain.trainer import train

from .conftest import REPO, compose_cfg, read_summary, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tinystories_dir, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    extra = {"train.max_steps": 10, "train.eval_every": 10, "train.ckpt_every": 5}
    train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), run_dir)
    return run_dir


def _command(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_run_folder_holds_its_tokenizer_and_final_weights(finished):
    assert (finished / records.TOKENIZER_FILE).is_file()
    final = ckpt.load_checkpoint(finished / records.MODEL_FILE)  # checksummed like a checkpoint
    last = ckpt.load_checkpoint(finished / records.CKPT_DIR / "step_0000010.pt")
    assert final["step"] == 10 and set(final["model"]) == set(last["model"])
    assert all(torch.equal(final["model"][k], last["model"][k]) for k in final["model"])


def test_sample_from_another_directory_prints_the_greedy_continuation(finished, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _command(
        "scaletrain.sample", str(finished), "--n", "2", "--max-new-tokens", "12", "--temperature", "0", cwd=elsewhere
    )
    assert done.returncode == 0, done.stderr
    expected = continuations(load_run(finished), "Once upon a time", 2, 12, 0.0, None, 0)
    assert done.stdout.count("--- ") == 2 and f"Once upon a time{expected[0]}" in done.stdout
    assert "(step 10), prompt 'Once upon a time'" in done.stdout


def test_eval_from_another_directory_reproduces_the_runs_final_validation(finished, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _command("scaletrain.eval", str(finished), cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    out = json.loads((finished / records.EVAL_FILE).read_text())
    # same weights, windows, batch shapes and kernels as the run's last evaluation; only the process differs
    assert out["metrics"]["val/loss"] == pytest.approx(read_summary(finished)["val_loss"], rel=1e-6)
    assert out["step"] == 10 and "val/loss" in done.stdout


def test_eval_on_other_data_uses_the_runs_tokenizer_and_scores_exact_match(finished, tmp_path):
    done = _command(
        "scaletrain.eval",
        str(finished),
        "data=synthetic_reasoning",
        "data.sources.reasoning.synthetic.kinds=[arithmetic]",
        "data.sources.reasoning.synthetic.n_train=200",
        "data.sources.reasoning.synthetic.n_val=20",
        "data.seq_len=64",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.eval_problems=6",
        "train.eval_answer_tokens=8",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((finished / records.EVAL_FILE).read_text())["metrics"]
    assert math.isfinite(metrics["val/loss"]) and metrics["val/reasoning/exact_match"] in {i / 6 for i in range(7)}


def test_a_run_without_final_weights_names_its_newest_checkpoint(finished, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in (records.CONFIG_FILE, records.TOKENIZER_FILE):
        (unfinished / name).write_bytes((finished / name).read_bytes())
    (unfinished / records.CKPT_DIR).mkdir()
    src = finished / records.CKPT_DIR / "step_0000010.pt"
    (unfinished / records.CKPT_DIR / src.name).write_bytes(src.read_bytes())
    with pytest.raises(RunFolderError, match=r"model.pt not found: the run has not finished; its newest checkpoint: "):
        load_run(unfinished)
    assert load_run(unfinished, unfinished / records.CKPT_DIR / src.name).step == 10
    done = _command("scaletrain.eval", str(unfinished), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("eval error: ") and "--checkpoint" in done.stderr


def test_eval_on_the_frozen_synthetic_test_sets_writes_them_once_and_scores_every_problem(
    finished, tmp_path, tinystories_dir, data_cache
):
    from scaletrain.data import synthetic
    from scaletrain.data.synthetic import FrozenSetError
    from scaletrain.eval import evaluate_run

    overrides = [
        "data=mixture",
        f"data.sources.tinystories.path={tinystories_dir}",  # prepared, but text sources have no test split
        "data.sources.reasoning.synthetic.kinds=[arithmetic,comparison]",
        "data.sources.reasoning.synthetic.n_train=200",
        "data.sources.reasoning.synthetic.n_val=20",
        "data.seq_len=64",
        f"data.cache_dir={data_cache}",
        "train.eval_answer_tokens=8",
    ]
    sets = tmp_path / "test_sets"
    out = evaluate_run(finished, overrides, None, "cpu", "test", sets, 12)
    assert out["split"] == "test" and out["not_evaluated"] == ["tinystories"]
    files = sorted(p.name for p in sets.iterdir())
    assert files == [
        "arithmetic-allow_negative0-max_operand10-max_value100-steps2.jsonl",
        "arithmetic-allow_negative0-max_operand10-max_value100-steps2.jsonl.sha256",
        "comparison-n_entities3.jsonl",
        "comparison-n_entities3.jsonl.sha256",
    ]
    stored = [json.loads(line) for f in sorted(sets.glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert len(stored) == 24 and all(synthetic.split_of(p["question"]) == "test" for p in stored)
    m = out["metrics"]
    assert set(m) == {"test/loss", "test/bpb", "test/reasoning/exact_match"}  # one source left: no per-source loss
    assert m["test/reasoning/exact_match"] in {i / 24 for i in range(25)} and math.isfinite(m["test/loss"])
    again = evaluate_run(finished, overrides, None, "cpu", "test", sets, 12)  # the sets are read, not rewritten
    assert again["metrics"] == m
    first = sorted(sets.glob("comparison*.jsonl"))[0]
    first.write_text(first.read_text().replace("?", "!", 1))
    with pytest.raises(FrozenSetError, match="was changed"):
        evaluate_run(finished, overrides, None, "cpu", "test", sets, 12)
