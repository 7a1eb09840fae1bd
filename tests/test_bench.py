"""Benchmark command: the naive yardstick has the same shape, and the table holds measured rows."""

from __future__ import annotations

import json

import pytest
import torch

from scaletrain.bench import NaiveGPT, main
from scaletrain.config import ModelConfig
from scaletrain.model import Transformer


def test_naive_yardstick_has_exactly_the_parameters_of_the_scaletrain_model():
    cfg = ModelConfig(name="t", d_model=64, n_layers=2, n_heads=4, d_ff=256)
    ours = Transformer(cfg, vocab_size=100, max_seq_len=32)
    naive = NaiveGPT(100, 64, 2, 4, 256, 32)
    assert sum(p.numel() for p in naive.parameters()) == ours.param_counts()["total"]


def test_naive_attention_is_causal():
    torch.manual_seed(0)
    naive = NaiveGPT(50, 32, 1, 2, 64, 16).eval()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 50
    torch.testing.assert_close(naive(idx)[:, :10], naive(changed)[:, :10])


def test_bench_times_both_implementations_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    rows = main(["model=tiny", "data.seq_len=32", "train.batch_size=4", "train.device=cpu",
                 "--naive", "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert [(r["impl"], r["precision"]) for r in rows] == [("scaletrain", "fp32"), ("naive", "fp32")]
    record = json.loads(out.read_text())
    assert record["peaks"]["fp32"] > 0 and record["versions"]["torch"] == torch.__version__
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0
        assert abs(r["step_ms"] - (r["data_ms"] + r["fwd_bwd_ms"] + r["optim_ms"])) < 1e-6
        assert r["tokens_per_s"] == pytest.approx(4 * 32 * 1000 / r["step_ms"])
