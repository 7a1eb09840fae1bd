"""Benchmark: `python -m scaletrain.bench [overrides ...] [--variants ...] [--precisions fp32 bf16] [--naive]`.

Composes the same conf/ as `scaletrain.run` (so `model=baseline_10m`, `train.batch_size=16`, ... work),
then for every (variant, precision) times real training steps of scaletrain's model and optimizer on
synthetic tokens: after warm-up, the median over steps of tokens/s, FLOP/s, MFU and the step split
into data, forward+backward and optimizer, plus peak memory. It measures the device's fp32 and bf16
matmul peaks at start, and samples the peak of the row's precision once per round of steps: MFU on CPU
is against that measured limit (on GPU also against the datasheet dense bf16 peak). FLOPs count attention
non-causal (every query against all T keys, the PaLM/nanoGPT convention of most published MFU figures); each
row also gives the MFU of the causal count (query t against t + 1 keys), what the kernels compute. With
`--naive` a plain PyTorch implementation of the same model is timed in the same rounds, step for step, as a
yardstick. Also: the batch loader's own tokens/s. Prints one table and the ratios, writes JSON to
`--out` (default: outputs/bench/<date>/<time>/bench.json, next to Hydra's run dirs and git-ignored, so a
benchmark never leaves the checkout dirty for the git SHA the next run records).

Not here: training-quality numbers (use `scaletrain.run`), MoE-layer micro-benchmarks (`bench_moe`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.build import build
from scaletrain.compose import compose
from scaletrain.config import AttentionConfig, Config, MLPConfig, Precision, load_config
from scaletrain.cost import step_flops, tokens_per_step
from scaletrain.data import BatchLoader, MixtureLoader
from scaletrain.hardware import (
    configure_cpu_malloc,
    gpu_peak_flops,
    hardware_info,
    matmul_flops,
    matmul_peak_size,
    measure_matmul_peak,
    memory_mb,
    pick_device,
    resolve_precision,
)
from scaletrain.metrics import versions
from scaletrain.model import LMOutput, Transformer
from scaletrain.optim import build_scheduler
from scaletrain.trainer import forward_backward, optimizer_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NaiveGPT(nn.Module):
    """The same model written the plain way (minGPT style): nn.Linear everywhere, attention as an
    explicit masked softmax(QK^T / sqrt(d)) V, rotate-half RoPE, nn.Dropout in the same places as
    scaletrain's model, for-loop AdamW. No tricks. Same function as `Transformer` up to the order of
    each head's q/k features (rotate-half pairs feature i with i + K/2, scaletrain pairs 2i with 2i+1)."""

    cos: torch.Tensor  # buffers, declared for the type checker
    sin: torch.Tensor
    mask: torch.Tensor

    def __init__(
        self,
        vocab: int,
        d: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        seq_len: int,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.tok = nn.Embedding(vocab, d)
        self.w_e = nn.Linear(d, d, bias=False)
        self.drop = nn.Dropout(dropout)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(d, bias=False),
                    "q": nn.Linear(d, d, bias=False),
                    "k": nn.Linear(d, d, bias=False),
                    "v": nn.Linear(d, d, bias=False),
                    "o": nn.Linear(d, d, bias=False),
                    "ln2": nn.LayerNorm(d, bias=False),
                    "fc1": nn.Linear(d, d_ff, bias=False),
                    "fc2": nn.Linear(d_ff, d, bias=False),
                }
            )
            for _ in range(n_layers)
        )
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
        x = self.drop(self.w_e(self.tok(idx)))
        for L in cast(list[nn.ModuleDict], list(self.layers)):
            h = L["ln1"](x)
            q, k, v = (L[n](h).view(B, T, self.n_heads, -1).transpose(1, 2) for n in "qkv")
            att = self._rope(q) @ self._rope(k).transpose(-2, -1) / math.sqrt(q.shape[-1])
            att = self.attn_drop(att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(-1))
            x = x + self.drop(L["o"]((att @ v).transpose(1, 2).reshape(B, T, -1)))
            x = x + self.drop(L["fc2"](F.relu(L["fc1"](L["ln2"](x)))))
        return self.w_ue(self.ln_f(x))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Contender:
    """One implementation under test: its model, optimizer and loader, and the phase times of its steps."""

    impl: str
    model: nn.Module
    fwd: Callable[[torch.Tensor], LMOutput]  # what forward runs through (train.compile: per-block compiled)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: BatchLoader | MixtureLoader
    flops_per_token: float
    phases: dict[str, list[float]] = field(default_factory=lambda: {"data": [], "fwd_bwd": [], "optim": []})
    cpu_s: list[float] = field(default_factory=list)  # process CPU time (all threads) of each timed step


def build_contender(
    cfg: Config, impl: str, device: torch.device, tokens: np.ndarray, flops_per_token: float
) -> Contender:
    """scaletrain's components come from the trainer's own `build`; the naive one is built here."""
    if impl == "scaletrain":
        c = build(cfg, device=device, train_tokens=tokens)
        return Contender(impl, c.model, c.dp_model, c.optimizer, c.scheduler, c.loader, flops_per_token)
    torch.manual_seed(cfg.train.seed)
    T, B, m = cfg.data.seq_len, cfg.train.batch_size, cfg.model
    vocab = m.vocab_size or cfg.data.tokenizer.vocab_size
    model = NaiveGPT(vocab, m.d_model, m.n_layers, m.n_heads, m.d_ff, T, m.dropout, m.attn_dropout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    scheduler = build_scheduler(optimizer, cfg.optim, 10**6)
    loader = BatchLoader(tokens, B, T, seed=cfg.train.seed, pin_memory=device.type == "cuda")  # as the trainer's
    naive_fwd = lambda x: LMOutput(model(x), None)  # noqa: E731 - the step reads .logits / .aux_loss
    return Contender(impl, model, naive_fwd, optimizer, scheduler, loader, flops_per_token)


def time_step(c: Contender, device: torch.device, autocast, cfg) -> dict[str, float]:
    """Seconds per phase of one optimizer step (grad_accum micro-batches, then the optimizer), and the process
    CPU time of the whole step under "cpu" (a busy neighbour stretches wall time, hardly this)."""
    t = {"data": 0.0, "fwd_bwd": 0.0}
    cpu0 = time.process_time()
    accum = cfg.train.grad_accum
    for _ in range(accum):
        t0 = time.perf_counter()
        x, y = c.loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _sync(device)
        t1 = time.perf_counter()
        forward_backward(c.fwd, x, y, autocast, 1.0 / accum)
        _sync(device)
        t["data"] += t1 - t0
        t["fwd_bwd"] += time.perf_counter() - t1
    t0 = time.perf_counter()
    optimizer_step(c.model, c.optimizer, c.scheduler, cfg.train.grad_clip)
    _sync(device)
    t["optim"] = time.perf_counter() - t0
    t["cpu"] = time.process_time() - cpu0
    return t


def loader_tokens_per_s(tokens: np.ndarray, batch: int, seq_len: int, n: int = 50) -> float:
    loader = BatchLoader(tokens, batch, seq_len, seed=0)
    t0 = time.perf_counter()
    for _ in range(n):
        loader.next_batch()
    return n * batch * seq_len / (time.perf_counter() - t0)


def check_naive_supports(cfg) -> None:
    """The yardstick is written for the seed baseline's layer types only; anything else would time a
    different model, so say which key differs instead."""
    m, want = (
        cfg.model,
        {
            "norm": "layernorm",
            "activation": "relu",
            "bias": False,
            "qk_norm": False,
            "tie_embeddings": False,
            "rope_theta": 10000.0,
        },
    )
    bad = [f"model.{k}={getattr(m, k)} (naive has {v})" for k, v in want.items() if getattr(m, k) != v]
    if m.n_embed not in (None, m.d_model):
        bad.append(f"model.n_embed={m.n_embed} (naive has d_model)")
    if cfg.moe.n_experts:
        bad.append(f"moe={cfg.moe.name} (naive is dense)")
    if m.attention._target_ != AttentionConfig._target_:  # a plugin's attention: naive has softmax(QK^T) V only
        bad.append(f"model.attention={m.attention.name} ({m.attention._target_}; naive has the built-in sdpa)")
    if m.mlp._target_ != MLPConfig._target_:  # a plugin's MLP: naive has fc2(relu(fc1(x))) only
        bad.append(f"model.mlp={m.mlp.name} ({m.mlp._target_}; naive has the built-in mlp)")
    if bad:
        raise SystemExit("--naive times the seed baseline's layer types only; this config has " + ", ".join(bad))


def bench_config(cfg, precision: str, device: torch.device, peak_n: int, args) -> list[dict]:
    """Rows for scaletrain (and the naive yardstick with --naive) at one precision. Their steps are
    interleaved, with one peak matmul before each round: a machine whose speed drifts (shared or
    throttled) slows every contender and the peak alike, so ratios and MFU stay comparable."""
    T, B = cfg.data.seq_len, cfg.train.batch_size
    vocab = cfg.model.vocab_size or cfg.data.tokenizer.vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab, size=max(10 * B * (T + 1), 2_000_000), dtype=np.int64)
    tokens = tokens.astype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    with torch.device("meta"):  # the naive model has the same shape, so the same count
        meta = Transformer(cfg.model, vocab, T, cfg.moe)
        flops_per_token = step_flops(cfg, meta).flops_per_token
        causal_per_token = meta.flops_per_token(T, causal=True)  # what a causal kernel computes (README: FLOPs)
    contenders = [
        build_contender(cfg, impl, device, tokens, flops_per_token)
        for impl in ("scaletrain", "naive")[: 1 + args.naive]
    ]
    bf16 = precision == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    for _ in range(args.warmup):
        for c in contenders:
            time_step(c, device, autocast, cfg)
    peak_samples: list[float] = []
    for _ in range(args.steps):
        peak_samples += matmul_flops(device, DTYPES[precision], peak_n, 1)
        for c in contenders:
            times = time_step(c, device, autocast, cfg)
            c.cpu_s.append(times.pop("cpu"))
            for k, v in times.items():
                c.phases[k].append(v)
    peak = statistics.median(peak_samples)
    datasheet = gpu_peak_flops(device) if device.type == "cuda" else None
    loader_speed = loader_tokens_per_s(tokens, B, T)
    rows = []
    for c in contenders:
        med = {k: statistics.median(v) for k, v in c.phases.items()}
        step = sum(med.values())
        tok_s = tokens_per_step(cfg) / step
        row = {
            "config": args.label,
            "impl": c.impl,
            "precision": precision,
            "params_total": sum(p.numel() for p in c.model.parameters()),
            "tokens_per_s": tok_s,
            "flops_per_token": c.flops_per_token,
            "tflops": c.flops_per_token * tok_s / 1e12,
            "peak_flops": peak,
            "mfu_measured": c.flops_per_token * tok_s / peak,
            "flops_per_token_causal": causal_per_token,
            "mfu_causal": causal_per_token * tok_s / peak,
            "step_ms": 1e3 * step,
            "cpu_ms": 1e3 * statistics.median(c.cpu_s),
            "data_ms": 1e3 * med["data"],
            "fwd_bwd_ms": 1e3 * med["fwd_bwd"],
            "optim_ms": 1e3 * med["optim"],
            "peak_mem_mb": memory_mb(device),
            "loader_tokens_per_s": loader_speed,
            "steps": args.steps,
            "compile": cfg.train.compile and c.impl == "scaletrain",
            "cpu_malloc_cache": device.type == "cpu" and cfg.train.cpu_malloc_cache,
        }
        if datasheet:
            row["mfu_datasheet"] = c.flops_per_token * tok_s / datasheet
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'config':<28} {'impl':<10} {'prec':<5} {'params':>8} {'tok/s':>9} {'TFLOP/s':>8} {'peak':>7} "
        f"{'MFU':>6} {'step ms':>8} {'cpu ms':>7} {'data':>6} {'fwd+bwd':>8} {'optim':>7} {'mem MB':>7} {'loader x':>8}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['config']:<28} {r['impl']:<10} {r['precision']:<5} {r['params_total'] / 1e6:>7.2f}M "
            f"{r['tokens_per_s']:>9.0f} {r['tflops']:>8.3f} {r['peak_flops'] / 1e12:>7.3f} "
            f"{100 * r['mfu_measured']:>5.1f}% {r['step_ms']:>8.1f} {r['cpu_ms']:>7.0f} {r['data_ms']:>6.2f} "
            f"{r['fwd_bwd_ms']:>8.1f} "
            f"{r['optim_ms']:>7.1f} {r['peak_mem_mb']:>7.0f} {r['loader_tokens_per_s'] / r['tokens_per_s']:>7.0f}x"
            + f"  (causal attention: MFU {100 * r['mfu_causal']:.1f}%)"
            + (f"  (datasheet MFU {100 * r['mfu_datasheet']:.1f}%)" if "mfu_datasheet" in r else "")
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    """The comparisons the targets are about: scaletrain / naive and bf16 / fp32 tokens/s, per config."""
    by = {(r["config"], r["impl"], r["precision"]): r["tokens_per_s"] for r in rows}
    out = []
    for (config, impl, prec), tok_s in by.items():
        if impl == "scaletrain" and (config, "naive", prec) in by:
            out.append(f"{config} {prec}: scaletrain / naive tokens/s = {tok_s / by[config, 'naive', prec]:.2f}x")
        if impl == "scaletrain" and prec == "bf16" and (config, impl, "fp32") in by:
            out.append(f"{config}: bf16 / fp32 tokens/s = {tok_s / by[config, impl, 'fp32']:.2f}x")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every variant (model=..., train.*)")
    p.add_argument(
        "--variants",
        nargs="*",
        default=[""],
        help='extra override sets, one per variant, space-separated inside quotes: "model=moe_8x"',
    )
    p.add_argument(
        "--precisions",
        nargs="*",
        default=["fp32"],
        choices=[*sorted(DTYPES), "auto"],
        help="auto: bf16 where it is fast here (CUDA; CPUs with AVX512-BF16/AMX), else fp32",
    )
    p.add_argument("--naive", action="store_true", help="also time the plain PyTorch implementation")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--out", type=Path, default=None, help="JSON file to write (default: outputs/bench/<date>/<time>/bench.json)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows, sizes, device_peaks = [], {}, {}
    for variant in args.variants:
        cfg = load_config(compose([*args.overrides, *variant.split()]))
        device = pick_device(cfg.train.device)
        if args.naive:
            check_naive_supports(cfg)
        if not device_peaks:
            device_peaks = {k: measure_matmul_peak(device, dtype) for k, dtype in DTYPES.items()}
            print(
                "device matmul peak (TFLOP/s): "
                + ", ".join(f"{k} {v / 1e12:.4f}" for k, v in device_peaks.items())
                + (
                    f"; datasheet dense bf16 {(gpu_peak_flops(device) or 0) / 1e12:.0f}"
                    if device.type == "cuda"
                    else ""
                )
            )
        if device.type == "cpu":  # as the trainer does; a variant may switch it off
            print(configure_cpu_malloc(cfg.train.cpu_malloc_cache))
        args.label = variant or " ".join(o for o in args.overrides if o.startswith("model=")) or cfg.model.name
        for requested in args.precisions:
            chosen, why = resolve_precision(Precision(requested), device)
            precision = str(chosen)
            if requested == "auto":
                print(f"precision auto -> {precision} ({why})")
            if precision not in sizes:  # the matmul size for the peak samples, once per precision
                sizes[precision] = matmul_peak_size(device, DTYPES[precision])
            new = bench_config(cfg, precision, device, sizes[precision], args)
            rows += new
            print("\n".join(format_table(new).splitlines()[1:]), flush=True)
    notes = ratios(rows)
    if device_peaks["bf16"] < device_peaks["fp32"]:
        notes.append(
            f"note: bf16 matmuls run at {device_peaks['bf16'] / 1e9:.1f} GFLOP/s here, below fp32's "
            f"{device_peaks['fp32'] / 1e9:.0f} (no bf16 fast path on this device): bf16 cannot beat fp32, "
            "and bf16 MFU is against that slow peak"
        )
    print(format_table(rows))
    print("\n".join(notes))
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
        "hardware": hardware_info(device),
        "device_peaks": device_peaks,
        "matmul_peak_n": sizes,
        "rows": rows,
        "ratios": notes,
    }
    out = args.out or Path("outputs", "bench", *time.strftime("%Y-%m-%d %H-%M-%S").split(), "bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return rows


def cli() -> None:
    """The console script (`scaletrain-bench`): the table and JSON are the output, not the return value."""
    main()


if __name__ == "__main__":
    cli()
