"""Resuming with a changed config: settings that cannot change in a running training fail before anything is
loaded, listing each key with both values; the others apply from the resumed step on and are listed."""

from __future__ import annotations

import pytest
import torch

from scaletrain.checkpoint import CheckpointIncompatible
from scaletrain.config import load_config
from scaletrain.optim import lr_at
from scaletrain.trainer import train

from ..conftest import compose_cfg, read_metrics, tiny_overrides


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tinystories_dir, data_cache):
    run_dir = tmp_path_factory.mktemp("run")
    train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **{"train.max_steps": 10})), run_dir)
    return run_dir


def _copy(run_dir, to):
    to.mkdir()
    (to / "checkpoints").mkdir()
    for f in (run_dir / "checkpoints").iterdir():
        (to / "checkpoints" / f.name).write_bytes(f.read_bytes())
    (to / "metrics.jsonl").write_bytes((run_dir / "metrics.jsonl").read_bytes())
    return to


@pytest.mark.fault(
    "resume with a changed optim.lr and train.max_steps",
    "applied from the resumed step (schedule re-derived), one line each",
)
def test_a_changed_lr_and_max_steps_apply_from_the_resumed_step_and_are_listed(
    finished_run, tmp_path, tinystories_dir, data_cache, caplog
):
    run_dir = _copy(finished_run, tmp_path / "run")
    extra = {"train.max_steps": 14, "optim.lr": 1e-2, "train.log_every": 1, "train.resume": "auto"}
    cfg = load_config(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)))
    with caplog.at_level("INFO", logger="scaletrain"):
        train(cfg, run_dir)
    assert "resume: optim.lr: 0.01 (checkpoint: 0.005) -> applied from here on" in caplog.text
    assert "resume: train.max_steps: 14 (checkpoint: 10) -> applied from here on" in caplog.text
    lrs = {r["step"]: r["train/lr"] for r in read_metrics(run_dir) if "train/lr" in r}
    # the schedule re-derived from the new lr and max_steps; LambdaLR logs base * (lr_at / base): two float64
    # roundings away from lr_at, <= 2 * 2^-53 relative, so 1e-12 leaves room and still catches the old lr
    for step in (11, 12, 13):
        assert lrs[step] == pytest.approx(lr_at(step, 14, 1e-2, cfg.optim.schedule), rel=1e-12)


def _blocked(what: str):
    return pytest.mark.fault(
        f"resume with {what}", "fails before loading, listing each key with both values; nothing written"
    )


@pytest.mark.parametrize(
    "override,listed",
    [
        pytest.param(
            {"model.d_model": 64}, "model.d_model: 64 (checkpoint: 128)", marks=_blocked("a different model shape")
        ),
        pytest.param(
            {"optim": "muon"}, "optim.name: muon (checkpoint: adamw)", marks=_blocked("a different optimizer")
        ),
        pytest.param(
            {"data.tokenizer.vocab_size": 600},
            "data.tokenizer.vocab_size: 600 (checkpoint: 512)",
            marks=_blocked("a different tokenizer vocabulary"),
        ),
    ],
)
def test_a_changed_shape_optimizer_or_tokenizer_fails_listing_each_key_before_loading(
    finished_run, tmp_path, tinystories_dir, data_cache, override, listed
):
    run_dir = _copy(finished_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    cfg = compose_cfg(tiny_overrides(tinystories_dir, data_cache, **{"train.resume": "auto", **override}))
    with pytest.raises(CheckpointIncompatible, match="cannot resume from .*step_0000010.pt") as err:
        train(cfg, run_dir)
    assert listed in str(err.value)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # not even status.json


@pytest.mark.fault(
    "resume with a different number of ranks than the checkpoint was saved with",
    "fails before loading any weights: names both rank counts and the way on; metrics.jsonl untouched",
)
def test_a_changed_rank_count_fails_before_loading_naming_both(finished_run, tmp_path, tinystories_dir, data_cache):
    run_dir = _copy(finished_run, tmp_path / "run")
    path = run_dir / "checkpoints" / "step_0000010.pt"
    state = torch.load(path, weights_only=True)
    state["loader"]["world_size"] = 2  # as a 2-rank run would have saved it (plain ints: no checksum changes)
    torch.save(state, path)
    before = (run_dir / "metrics.jsonl").read_text()
    cfg = compose_cfg(tiny_overrides(tinystories_dir, data_cache, **{"train.resume": "auto"}))
    with pytest.raises(CheckpointIncompatible, match=r"step_0000010\.pt: loader state was saved with world_size=2, "):
        train(cfg, run_dir)
    assert (run_dir / "metrics.jsonl").read_text() == before
