"""A checkpoint resumes on another number of ranks: the data loader's state is a global position, and DCP
reshards model and optimizer. A sharded checkpoint of 2 FSDP2 gloo ranks continues on the same 2 ranks bit for
bit and on 1 rank within the 1-vs-2-rank rounding of the parity tests; `scaletrain.checkpoint_convert` turns it
into one full file holding the same tensors, from which 1 rank continues exactly as from the folder.
(1 rank -> 2 ranks, full format: tests/reliability/test_resume_changes.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scaletrain import checkpoint as ckpt
from scaletrain.checkpoint_convert import main as convert_main
from scaletrain.config import load_config
from scaletrain.model import Transformer
from scaletrain.optim import build_optimizer
from scaletrain.trainer import train

from .conftest import compose_cfg
from .test_distributed import (
    STEPS,
    _assert_same_losses,
    _losses,
    _overrides,
    _tokens_per_step,
    _torchrun,
    _val_loss,
    parity_rtol,
)

FSDP = {"train.parallel": "fsdp"}  # sharded (DCP) checkpoints by default on several ranks
RESUME_AT = 3


@pytest.fixture(scope="module")
def two_ranks(tinystories_dir, data_cache, tmp_path_factory) -> Path:
    """The uninterrupted run: STEPS steps on 2 FSDP2 gloo ranks, a sharded checkpoint at step RESUME_AT."""
    run_dir = tmp_path_factory.mktemp("two_ranks")
    _torchrun(_overrides(tinystories_dir, data_cache, **FSDP, **{"train.ckpt_every": RESUME_AT}), run_dir)
    assert len(_losses(run_dir)) == STEPS
    return run_dir


def _sharded(run_dir: Path) -> Path:
    path = run_dir / "checkpoints" / f"step_{RESUME_AT:07d}"
    assert sorted(p.name for p in path.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    return path


def _resume_on_one_rank(checkpoint: Path, run_dir: Path, tinystories_dir: Path, data_cache: Path) -> None:
    train(compose_cfg(_overrides(tinystories_dir, data_cache, **FSDP, **{"train.resume": checkpoint})), run_dir)


@pytest.fixture(scope="module")
def one_rank_resumed(two_ranks, tinystories_dir, data_cache, tmp_path_factory) -> Path:
    """The 2-rank sharded checkpoint resumed in one plain process (FSDP2 needs several ranks: none here)."""
    run_dir = tmp_path_factory.mktemp("one_rank_resumed")
    _resume_on_one_rank(_sharded(two_ranks), run_dir, tinystories_dir, data_cache)
    return run_dir


@pytest.mark.slow
def test_a_sharded_checkpoint_of_two_ranks_resumes_on_the_same_two_ranks_bit_for_bit(
    two_ranks, tinystories_dir, data_cache, tmp_path
):
    """Same ranks, same data rows per rank, same arithmetic as the uninterrupted run: equal floats."""
    _torchrun(_overrides(tinystories_dir, data_cache, **FSDP, **{"train.resume": _sharded(two_ranks)}), tmp_path)
    assert _losses(tmp_path) == _losses(two_ranks)[RESUME_AT:]
    assert _val_loss(tmp_path) == _val_loss(two_ranks)


@pytest.mark.slow
def test_a_sharded_checkpoint_of_two_ranks_resumes_on_one_rank_like_the_uninterrupted_run(
    two_ranks, one_rank_resumed, tinystories_dir, data_cache
):
    """One process continues with the same global batches from bitwise the same weights and optimizer state (DCP
    reads back the fp32 bytes written). What differs is only the summation order of every loss mean and gradient
    entry (one sum over the 512 tokens instead of two half sums and the all-reduce), the case `parity_rtol` of
    test_distributed.py derives: ~sqrt(n) * u at the first resumed step, doubling per update. So resumed step k
    (k = 1 at step RESUME_AT + 1) gets parity_rtol(k), as a fresh 2-rank run's step k does against 1 process."""
    n = _tokens_per_step(_overrides(tinystories_dir, data_cache))
    got, want = _losses(one_rank_resumed), _losses(two_ranks)[RESUME_AT:]
    _assert_same_losses(got, want, n)
    diffs = [f"{abs(g - w):.1e} of {parity_rtol(k, n) * w:.1e}" for k, (g, w) in enumerate(zip(got, want), 1)]
    print(f"1-rank resume vs 2-rank run, |loss difference| of tolerance per resumed step: {diffs}")  # pytest -s
    # the final validation loss has seen STEPS - RESUME_AT updates since the resume: tolerance of that step + 1
    tol = parity_rtol(STEPS - RESUME_AT + 1, n) * _val_loss(two_ranks)
    assert abs(_val_loss(one_rank_resumed) - _val_loss(two_ranks)) <= tol


@pytest.mark.slow
def test_a_converted_sharded_checkpoint_holds_the_same_tensors_and_one_rank_resumes_from_it_as_from_the_folder(
    two_ranks, one_rank_resumed, tinystories_dir, data_cache, tmp_path, capsys
):
    sharded, out = _sharded(two_ranks), tmp_path / "step_3.pt"
    assert convert_main([str(sharded), str(out)]) == 0
    assert "train.resume=" in capsys.readouterr().out
    whole = ckpt.load_checkpoint(out)  # verified against the checksums written with it: the full format
    extra = ckpt.load_checkpoint(sharded)
    assert whole["step"] == RESUME_AT and whole["loader"] == extra["loader"] and whole["config"] == extra["config"]
    # the shards, resharded by DCP into one plain model and optimizer, hold exactly the file's tensors
    cfg = load_config(compose_cfg(_overrides(tinystories_dir, data_cache)))
    model = Transformer(cfg.model, cfg.data.tokenizer.vocab_size, cfg.data.seq_len, cfg.moe)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    ckpt.load_sharded_state(sharded, model, optimizer)  # its files verified by load_checkpoint above
    assert model.state_dict().keys() == whole["model"].keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(whole["model"][name], tensor, rtol=0, atol=0)
    names = dict(zip(model.parameters(), (n for n, _ in model.named_parameters())))
    state = {names[p]: s for p, s in optimizer.state.items()}
    assert state.keys() == whole["optimizer"]["state"].keys()
    for name, entries in state.items():
        for key, value in entries.items():
            torch.testing.assert_close(whole["optimizer"]["state"][name][key], value, rtol=0, atol=0)

    _resume_on_one_rank(out, tmp_path / "resumed", tinystories_dir, data_cache)
    assert _losses(tmp_path / "resumed") == _losses(one_rank_resumed)  # same state, same arithmetic
    assert _val_loss(tmp_path / "resumed") == _val_loss(one_rank_resumed)

    assert convert_main([str(sharded), str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err


def test_checkpoint_convert_writes_a_folders_tensors_as_a_verified_full_file_and_refuses_other_input(tmp_path, capsys):
    """In one process (no torchrun): a sharded checkpoint of a model after one AdamW step, converted."""
    cfg = load_config(compose_cfg(["debug=cpu_tiny"]))  # the tiny model: its shapes only
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.data.tokenizer.vocab_size, cfg.data.seq_len, cfg.moe)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    model(torch.randint(0, 512, (2, 16))).logits.square().mean().backward()
    optimizer.step()
    extra = {"step": 1, "loader": {"epoch": 0, "pos": 8}, "config": {"train": {"seed": 1}}}
    sharded = ckpt.save_sharded_checkpoint(tmp_path, 1, model, optimizer, extra, keep=0, is_main=True)
    out = tmp_path / "one.pt"
    assert convert_main([str(sharded), str(out)]) == 0
    whole = ckpt.load_checkpoint(out)
    assert {k: whole[k] for k in extra} == extra
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(whole["model"][name], tensor, rtol=0, atol=0)
    fresh = build_optimizer(model, cfg.optim, "cpu")
    fresh.load_state_dict(whole["optimizer"])  # keyed by parameter name; a plain optimizer loads it in order
    for p, state in optimizer.state.items():
        for key, value in state.items():
            torch.testing.assert_close(fresh.state[p][key], value, rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # DCP's intermediate file is gone

    capsys.readouterr()
    assert convert_main([str(tmp_path / "checkpoints"), str(tmp_path / "x.pt")]) == 2
    assert "not a sharded checkpoint folder" in capsys.readouterr().err
    (sharded / "__0_0.distcp").write_bytes(b"damaged")
    assert convert_main([str(sharded), str(tmp_path / "y.pt")]) == 2
    assert "__0_0.distcp changed since it was saved" in capsys.readouterr().err
    assert not (tmp_path / "y.pt").exists()
