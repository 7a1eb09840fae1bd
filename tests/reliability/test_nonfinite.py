"""NaN/Inf guard: a step whose loss or gradient norm is not finite is skipped (no optimizer or schedule step),
counted and logged; too many in a row stop the run as failed; a checkpoint is never written from non-finite
weights; JSON records hold null, never the non-standard NaN/Infinity."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scaletrain import records
from scaletrain.records import RunState, read_status
from scaletrain.trainer import NonFiniteError, Trainer, train

from ..conftest import compose_cfg, tiny_overrides


def _strict_json_lines(path):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _poison_gradients_at(trainer: Trainer, backward_calls: set[int]) -> None:
    """An Inf in one weight's gradient on the given backward passes (1-based), as a bad batch would give."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * math.inf if calls["n"] in backward_calls else grad

    trainer.model.W_ue.weight.register_hook(hook)


@pytest.mark.fault(
    "one Inf gradient (step 3)",
    "that update skipped (no optimizer or schedule step), counted and logged; training goes on",
)
def test_one_inf_gradient_skips_that_update_and_training_goes_on(tinystories_dir, data_cache, tmp_path):
    cfg = compose_cfg(tiny_overrides(tinystories_dir, data_cache, **{"train.max_steps": 10, "train.log_every": 1}))
    trainer = Trainer(cfg, tmp_path / "run")
    _poison_gradients_at(trainer, {3})
    with trainer.preempt:
        trainer.fit()
    assert trainer.step == 10 and trainer.skipped_steps == 1
    assert trainer.scheduler.last_epoch == 10  # the schedule did not advance on the skipped batch
    assert all(int(s["step"]) == 10 for s in trainer.optimizer.state.values())  # nor did AdamW
    rows = [r for r in _strict_json_lines(tmp_path / "run" / records.METRICS_FILE) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 11))  # every update logged once, none for the skip
    assert rows[1]["train/skipped_steps"] == 0 and rows[2]["train/skipped_steps"] == 1
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.fault(
    "a non-finite gradient on every step from step 13",
    "stops after train.max_nonfinite in a row with a clear error; only the finite checkpoint remains",
)
def test_max_nonfinite_steps_in_a_row_stop_the_run_as_failed_with_finite_checkpoints(
    tinystories_dir, data_cache, tmp_path
):
    cfg = compose_cfg(tiny_overrides(tinystories_dir, data_cache, **{"train.max_nonfinite": 3}))
    trainer = Trainer(cfg, tmp_path / "run")
    _poison_gradients_at(trainer, set(range(13, 100)))  # every backward from the 13th on (after the step-10 save)
    with pytest.raises(NonFiniteError, match=r"3 steps in a row .* after step 12 \(train.max_nonfinite=3\)"):
        with trainer.preempt:
            trainer.fit()
    [ckpt] = (tmp_path / "run" / records.CKPT_DIR).iterdir()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert ckpt.name == "step_0000010.pt" and all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.fault(
    "every loss Inf (as optim.lr=1e6 gives)", 'status "failed" naming NonFiniteError; metrics.jsonl is strict JSON'
)
def test_a_failed_run_records_failed_and_its_json_stays_strict(tinystories_dir, data_cache, tmp_path, monkeypatch):
    import scaletrain.trainer as T

    def always_inf(*args, **kwargs):  # every loss comes back Inf: the guard must stop the run
        lm, aux = real(*args, **kwargs)
        return lm * math.inf, aux

    real = T.forward_backward
    monkeypatch.setattr(T, "forward_backward", always_inf)
    cfg = compose_cfg(tiny_overrides(tinystories_dir, data_cache, **{"train.max_nonfinite": 2}))
    with pytest.raises(NonFiniteError):
        train(cfg, tmp_path / "run")
    status = read_status(tmp_path / "run")
    assert status is not None and status.state == RunState.failed and "NonFiniteError" in (status.error or "")
    _strict_json_lines(tmp_path / "run" / records.METRICS_FILE)


@pytest.mark.fault(
    "a NaN in the weights at a checkpoint", "no checkpoint written; the error says the last one holds finite weights"
)
def test_a_checkpoint_is_never_written_from_non_finite_weights(tinystories_dir, data_cache, tmp_path):
    trainer = Trainer(compose_cfg(tiny_overrides(tinystories_dir, data_cache)), tmp_path / "run")
    with torch.no_grad():
        trainer.model.W_e.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="weights are not finite at step 0: not checkpointing"):
        trainer.save()
    assert not list((tmp_path / "run" / records.CKPT_DIR).glob("step_*"))


@pytest.mark.fault("NaN/Inf values in metrics and summary", "written as null (strict JSON)")
def test_json_records_write_null_for_nan_and_inf():
    assert records.to_json({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}}) == (
        '{"a": null, "b": [null, 1.5], "c": {"d": null}}'
    )
