"""Benchmark command: the naive yardstick has the same shape, and the table holds measured rows."""

from __future__ import annotations

import json

import pytest
import torch

from scaletrain.bench import NaiveGPT, main
from scaletrain.config import ModelConfig, Precision
from scaletrain.hardware import resolve_precision
from scaletrain.model import Transformer


def test_naive_yardstick_has_exactly_the_parameters_of_the_scaletrain_model():
    cfg = ModelConfig(name="t", d_model=64, n_layers=2, n_heads=4, d_ff=256)
    ours = Transformer(cfg, vocab_size=100, max_seq_len=32)
    naive = NaiveGPT(100, 64, 2, 4, 256, 32)
    assert sum(p.numel() for p in naive.parameters()) == ours.param_counts()["total"]


def test_naive_yardstick_computes_the_same_function_as_the_scaletrain_model():
    """Weights copied across (q/k features of each head reordered: scaletrain's RoPE pairs 2i with 2i+1,
    rotate-half pairs i with i + K/2) give the same logits: the benchmark compares like with like."""
    torch.manual_seed(0)
    V, D, L, H, Fh, T = 97, 64, 2, 4, 160, 24
    ours = Transformer(ModelConfig(name="t", d_model=D, n_layers=L, n_heads=H, d_ff=Fh), V, T).eval()
    naive = NaiveGPT(V, D, L, H, Fh, T).eval()
    K = D // H
    per_head = torch.cat([torch.arange(0, K, 2), torch.arange(1, K, 2)])
    rows = (torch.arange(H)[:, None] * K + per_head).flatten()
    with torch.no_grad():
        naive.tok.weight.copy_(ours.tok_emb.weight)
        naive.w_e.weight.copy_(ours.W_e.weight)
        for nl, block in zip(naive.layers, ours.blocks):
            nl["q"].weight.copy_(block.attn.wq.weight[rows])
            nl["k"].weight.copy_(block.attn.wk.weight[rows])
            nl["v"].weight.copy_(block.attn.wv.weight)
            nl["o"].weight.copy_(block.attn.wo.weight)
            nl["ln1"].weight.copy_(block.attn_norm.weight)
            nl["ln2"].weight.copy_(block.mlp_norm.weight)
            nl["fc1"].weight.copy_(block.mlp.w_in.weight)
            nl["fc2"].weight.copy_(block.mlp.w_out.weight)
        naive.ln_f.weight.copy_(ours.final_norm.weight)
        naive.w_ue.weight.copy_(ours.W_ue.weight)
    idx = torch.randint(0, V, (3, T))
    torch.testing.assert_close(naive(idx), ours(idx).logits, atol=2e-5, rtol=1e-4)


def test_naive_yardstick_refuses_configs_it_does_not_implement():
    with pytest.raises(SystemExit, match=r"model.activation=swiglu.*moe=top2_8e"):
        main(["model=moe_8x", "model.activation=swiglu", "--naive", "--steps", "1", "--warmup", "0"])
    user = "torch.nn.Identity"  # another component than the built-in (nn.Identity takes any constructor arguments)
    with pytest.raises(SystemExit, match=rf"model.attention=sdpa \({user}; .*model.mlp=mlp \({user}; naive has"):
        main([f"model.attention._target_={user}", f"model.mlp._target_={user}", "--naive", "--steps", "1"])


def test_naive_attention_is_causal():
    torch.manual_seed(0)
    naive = NaiveGPT(50, 32, 1, 2, 64, 16).eval()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 50
    torch.testing.assert_close(naive(idx)[:, :10], naive(changed)[:, :10])


def test_bench_times_both_implementations_and_writes_json_under_outputs_bench(tmp_path, monkeypatch, capsys):
    """Without --out the JSON goes to outputs/bench/<date>/<time>/ (git-ignored), never the working folder;
    `--precisions auto` says which precision it chose for this CPU."""
    monkeypatch.chdir(tmp_path)
    rows = main(
        [
            "model=tiny",
            "data.seq_len=32",
            "train.batch_size=4",
            "train.device=cpu",
            "--naive",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--precisions",
            "auto",
        ]
    )
    want, why = resolve_precision(Precision.auto, torch.device("cpu"))  # fp32 unless the CPU has AVX512-BF16/AMX
    [out] = tmp_path.glob("outputs/bench/*/*/bench.json")
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]
    printed = capsys.readouterr().out
    assert f"wrote {out.relative_to(tmp_path)}" in printed and f"precision auto -> {want} ({why})" in printed
    assert [(r["impl"], r["precision"]) for r in rows] == [("scaletrain", want), ("naive", want)]
    record = json.loads(out.read_text())
    assert record["device_peaks"]["fp32"] > 0 and record["device_peaks"]["bf16"] > 0
    assert record["versions"]["torch"] == torch.__version__
    assert record["ratios"][0] == (
        f"model=tiny {want}: scaletrain / naive tokens/s = {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x"
    )
    slow_bf16 = record["device_peaks"]["bf16"] < record["device_peaks"]["fp32"]
    assert any(n.startswith("note: bf16 matmuls") for n in record["ratios"]) == slow_bf16
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["steps"] == 2
        assert r["cpu_ms"] > 0  # process CPU time of a step, beside its wall time
        assert r["mfu_measured"] == pytest.approx(r["tflops"] * 1e12 / r["peak_flops"])
        # causal attention: the same tokens/s over fewer FLOPs (tiny: 2 layers of d 128, 32-token windows)
        assert r["mfu_causal"] / r["mfu_measured"] == pytest.approx(r["flops_per_token_causal"] / r["flops_per_token"])
        assert r["flops_per_token"] - r["flops_per_token_causal"] == 6 * 2 * (32 - 1) * 128
        assert abs(r["step_ms"] - (r["data_ms"] + r["fwd_bwd_ms"] + r["optim_ms"])) < 1e-6
        assert r["tokens_per_s"] == pytest.approx(4 * 32 * 1000 / r["step_ms"])
