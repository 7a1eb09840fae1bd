"""Benchmark: `python -m scaletrain.bench [overrides ...] [--variants ...] [--precisions fp32 bf16]`.

Composes the same conf/ as `scaletrain.run` (so `model=baseline_10m`, `train.batch_size=16`, ... work),
then for every (variant, precision) times real training steps of scaletrain's model and optimizer on
synthetic tokens: after warm-up, the median over steps of tokens/s, FLOP/s, MFU and the step split
into data, forward+backward and optimizer, plus peak memory. In the same run it measures the device's
fp32 and bf16 matmul peaks (MFU on CPU is against the measured peak of the step's precision; on GPU
also against the datasheet dense bf16 peak), the batch loader's own tokens/s, and a plain PyTorch
implementation of the same shape (`--naive`) as a yardstick. Prints one table, writes JSON.

Not here: training-quality numbers (use `scaletrain.run`), MoE-layer micro-benchmarks (`bench_moe`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from scaletrain.config import register_configs, validate
from scaletrain.data import BatchLoader
from scaletrain.metrics import gpu_peak_flops, hardware_info, measure_matmul_peak, versions
from scaletrain.model import Transformer
from scaletrain.optim import build_optimizer, build_scheduler
from scaletrain.trainer import forward_backward, memory_mb, optimizer_step, pick_device

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NaiveGPT(nn.Module):
    """The same shape written the plain way (minGPT style): nn.Linear everywhere, attention as an
    explicit masked softmax(QK^T / sqrt(d)) V, rotate-half RoPE, for-loop AdamW. No tricks."""

    def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, d_ff: int, seq_len: int):
        super().__init__()
        self.n_heads = n_heads
        self.tok = nn.Embedding(vocab, d)
        self.w_e = nn.Linear(d, d, bias=False)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(d, bias=False), "q": nn.Linear(d, d, bias=False), "k": nn.Linear(d, d, bias=False),
            "v": nn.Linear(d, d, bias=False), "o": nn.Linear(d, d, bias=False), "ln2": nn.LayerNorm(d, bias=False),
            "fc1": nn.Linear(d, d_ff, bias=False), "fc2": nn.Linear(d_ff, d, bias=False)}) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.w_ue = nn.Linear(d, vocab, bias=False)
        hd = d // n_heads
        ang = torch.outer(torch.arange(seq_len).float(), 10000.0 ** (-torch.arange(0, hd, 2).float() / hd))
        self.register_buffer("cos", torch.cat([ang.cos(), ang.cos()], -1), persistent=False)
        self.register_buffer("sin", torch.cat([ang.sin(), ang.sin()], -1), persistent=False)
        self.register_buffer("mask", torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool)), persistent=False)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        T = x.shape[-2]
        return x * self.cos[:T] + rotated * self.sin[:T]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.w_e(self.tok(idx))
        for L in self.layers:
            h = L["ln1"](x)
            q, k, v = (L[n](h).view(B, T, self.n_heads, -1).transpose(1, 2) for n in "qkv")
            att = self._rope(q) @ self._rope(k).transpose(-2, -1) / math.sqrt(q.shape[-1])
            att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(-1)
            x = x + L["o"]((att @ v).transpose(1, 2).reshape(B, T, -1))
            x = x + L["fc2"](F.relu(L["fc1"](L["ln2"](x))))
        return self.w_ue(self.ln_f(x))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, optimizer, scheduler, loader, device, autocast, cfg, steps: int, warmup: int) -> dict:
    """Median seconds per phase over `steps` timed optimizer steps (after `warmup` untimed ones)."""
    phases: dict[str, list[float]] = {"data": [], "fwd_bwd": [], "optim": []}
    fwd = torch.compile(model) if cfg.train.compile else model
    accum = cfg.train.grad_accum
    for i in range(warmup + steps):
        t = {"data": 0.0, "fwd_bwd": 0.0}
        for _ in range(accum):
            t0 = time.perf_counter()
            x, y = loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            _sync(device)
            t1 = time.perf_counter()
            forward_backward(fwd, model, x, y, autocast, 1.0 / accum)
            _sync(device)
            t["data"] += t1 - t0
            t["fwd_bwd"] += time.perf_counter() - t1
        t0 = time.perf_counter()
        optimizer_step(model, optimizer, scheduler, cfg.train.grad_clip)
        _sync(device)
        t["optim"] = time.perf_counter() - t0
        if i >= warmup:
            for k, v in t.items():
                phases[k].append(v)
    med = {k: statistics.median(v) for k, v in phases.items()}
    med["step"] = sum(med.values())
    return med


def loader_tokens_per_s(tokens: np.ndarray, batch: int, seq_len: int, n: int = 50) -> float:
    loader = BatchLoader(tokens, batch, seq_len, seed=0)
    t0 = time.perf_counter()
    for _ in range(n):
        loader.next_batch()
    return n * batch * seq_len / (time.perf_counter() - t0)


def bench_one(cfg, precision: str, device: torch.device, peaks: dict, args, naive: bool) -> dict:
    torch.manual_seed(0)
    T, B = cfg.data.seq_len, cfg.train.batch_size
    vocab = cfg.model.vocab_size or cfg.data.tokenizer.vocab_size
    m = cfg.model
    if naive:
        model = NaiveGPT(vocab, m.d_model, m.n_layers, m.n_heads, m.d_ff, T).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        flops_per_token = Transformer(m, vocab, T, cfg.moe).flops_per_token(T)  # same shape, same count
    else:
        model = Transformer(m, vocab, T, cfg.moe).to(device)
        optimizer = build_optimizer(model, cfg.optim, device.type)
        flops_per_token = model.flops_per_token(T)
    scheduler = build_scheduler(optimizer, cfg.optim, 10**6)
    tokens = np.random.default_rng(0).integers(0, vocab, size=max(10 * B * (T + 1), 2_000_000), dtype=np.int64)
    tokens = tokens.astype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    loader = BatchLoader(tokens, B, T, seed=0)
    bf16 = precision == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    med = time_steps(model, optimizer, scheduler, loader, device, autocast, cfg, args.steps, args.warmup)
    tok_s = B * T * cfg.train.grad_accum / med["step"]
    row = {"config": args.label, "impl": "naive" if naive else "scaletrain", "precision": precision,
           "params_total": sum(p.numel() for p in model.parameters()), "tokens_per_s": tok_s,
           "flops_per_token": flops_per_token, "tflops": flops_per_token * tok_s / 1e12,
           "mfu_measured": flops_per_token * tok_s / peaks[precision],
           "step_ms": 1e3 * med["step"], "data_ms": 1e3 * med["data"], "fwd_bwd_ms": 1e3 * med["fwd_bwd"],
           "optim_ms": 1e3 * med["optim"], "peak_mem_mb": memory_mb(device),
           "loader_tokens_per_s": loader_tokens_per_s(tokens, B, T)}
    if peaks.get("datasheet"):
        row["mfu_datasheet"] = flops_per_token * tok_s / peaks["datasheet"]
    return row


def format_table(rows: list[dict], peaks: dict) -> str:
    head = (f"{'config':<28} {'impl':<10} {'prec':<5} {'params':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
            f"{'step ms':>8} {'data':>6} {'fwd+bwd':>8} {'optim':>7} {'mem MB':>7} {'loader x':>8}")
    measured = ", ".join(f"{k} {v / 1e12:.4f}" for k, v in peaks.items() if k in DTYPES)
    datasheet = f", datasheet dense bf16 {peaks['datasheet'] / 1e12:.0f}" if peaks.get("datasheet") else ""
    lines = [f"measured matmul peak (TFLOP/s): {measured}{datasheet}", head]
    for r in rows:
        lines.append(
            f"{r['config']:<28} {r['impl']:<10} {r['precision']:<5} {r['params_total'] / 1e6:>7.2f}M "
            f"{r['tokens_per_s']:>9.0f} {r['tflops']:>8.3f} {100 * r['mfu_measured']:>5.1f}% {r['step_ms']:>8.1f} "
            f"{r['data_ms']:>6.2f} {r['fwd_bwd_ms']:>8.1f} {r['optim_ms']:>7.1f} {r['peak_mem_mb']:>7.0f} "
            f"{r['loader_tokens_per_s'] / r['tokens_per_s']:>7.0f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every variant (model=..., train.*)")
    p.add_argument("--variants", nargs="*", default=[""],
                   help='extra override sets, one per variant, space-separated inside quotes: "model=moe_8x"')
    p.add_argument("--precisions", nargs="*", default=["fp32"], choices=sorted(DTYPES))
    p.add_argument("--naive", action="store_true", help="also time the plain PyTorch implementation")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="bench.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    register_configs()
    rows, peaks = [], {}
    for variant in args.variants:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*args.overrides, *variant.split()])
        validate(cfg)
        device = pick_device(cfg.train.device)
        if not peaks:
            peaks = {k: measure_matmul_peak(device, DTYPES[k]) for k in sorted({"fp32", *args.precisions})}
            peaks["datasheet"] = gpu_peak_flops(device) if device.type == "cuda" else None
        args.label = variant or " ".join(o for o in args.overrides if o.startswith("model=")) or cfg.model.name
        for precision in args.precisions:
            rows.append(bench_one(cfg, precision, device, peaks, args, naive=False))
            if args.naive:
                rows.append(bench_one(cfg, precision, device, peaks, args, naive=True))
            print(format_table(rows[-1 - args.naive:], peaks).splitlines()[-1], flush=True)
    print(format_table(rows, peaks))
    record = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "hardware": hardware_info(device),
              "peaks": peaks, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
