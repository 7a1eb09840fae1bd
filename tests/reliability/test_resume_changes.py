"""Resuming with a changed config: settings that cannot change in a running training fail before anything is
loaded, listing each key with both values; the others apply from the resumed step on and are listed. Another
number of ranks is not such a change: the data position is global, so the run continues with the same global
batches (2 ranks -> 1 rank, sharded: tests/test_resume_across_ranks.py)."""

from __future__ import annotations

import pytest

from scaletrain import records
from scaletrain.checkpoint import CheckpointIncompatible
from scaletrain.config import load_config
from scaletrain.optim import lr_at
from scaletrain.trainer import train

from ..conftest import compose_cfg, read_metrics, tiny_overrides
from ..test_distributed import _assert_same_losses, _losses, _overrides, _tokens_per_step, _torchrun


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
        pytest.param(  # the data position counts global batches: another size would change the sample order
            {"train.batch_size": 16},
            "train.batch_size: 16 (checkpoint: 8)",
            marks=_blocked("a different global batch size"),
        ),
        pytest.param(
            {"train.seed": 7}, "train.seed: 7 (checkpoint: 1337)", marks=_blocked("a different seed (the data order)")
        ),
    ],
)
def test_a_changed_shape_optimizer_tokenizer_or_data_order_fails_listing_each_key_before_loading(
    finished_run, tmp_path, tinystories_dir, data_cache, override, listed
):
    run_dir = _copy(finished_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != records.LEASE_FILE}
    cfg = compose_cfg(tiny_overrides(tinystories_dir, data_cache, **{"train.resume": "auto", **override}))
    with pytest.raises(CheckpointIncompatible, match="cannot resume from .*step_0000010.pt") as err:
        train(cfg, run_dir)
    assert listed in str(err.value)
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != records.LEASE_FILE}
    assert after == before  # not even status.json (the lease is no record: the refused run held it while it looked)


@pytest.mark.slow
@pytest.mark.fault(
    "resume on 2 ranks (DDP) from a checkpoint written by 1 rank",
    "continues with the same global batches: losses equal the uninterrupted 1-rank run's to summation rounding",
)
def test_a_changed_rank_count_continues_with_the_same_global_batches(tinystories_dir, data_cache, tmp_path):
    """The loader's state is a global position (no rank count in it): 2 ranks take rows r::2 of the same global
    batches. Same weights at the resume, so the losses differ only by the 1-vs-2-rank summation order, within
    test_distributed.py's parity_rtol counted from the resumed step."""
    one = tmp_path / "one"
    train(compose_cfg(_overrides(tinystories_dir, data_cache, **{"train.ckpt_every": 3})), one)
    step3 = one / "checkpoints" / "step_0000003.pt"  # full format: 1 rank, no FSDP2
    resume = _overrides(tinystories_dir, data_cache, **{"train.parallel": "ddp", "train.resume": step3})
    _torchrun(resume, tmp_path / "two")
    _assert_same_losses(_losses(tmp_path / "two"), _losses(one)[3:], _tokens_per_step(resume))
