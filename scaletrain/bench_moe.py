"""Benchmark of the MoE layer: forward+backward tokens/s of the grouped-GEMM path vs the per-expert loop.

Run `python -m scaletrain.bench_moe` (defaults: 8 experts, d_model 512, expert hidden 2048, top-2,
4096 tokens, fp32 and bf16 autocast, eager). `--compile` adds torch.compile'd rows. Not here: tests
(tests/test_moe.py checks that both paths agree).

Reading the numbers: torch's CPU grouped_mm runs one GEMM per group, so on CPU the two paths do the
same GEMMs (~80% of the time) and land within about 10% of each other; the grouped path's gains are
on GPUs (one kernel per projection, no host sync, no graph breaks under torch.compile). CPUs without
native bf16 instructions (AVX2-only) run bf16 matmuls ~30x slower than fp32 in both paths.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from scaletrain.config import ModelConfig, MoEConfig
from scaletrain.moe import MoE


def time_fwd_bwd(layer: MoE, x_BTD: torch.Tensor, dtype: torch.dtype, repeats: int, fn=None) -> float:
    """Median seconds of forward + backward (loss = mean(y^2) + aux), after one warm-up call."""
    fn = layer if fn is None else fn
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            y_BTD = fn(x_BTD)
        (y_BTD.float().pow(2).mean() + layer.aux_loss).backward()
        layer.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-expert", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--impls", default="loop,grouped")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd layers")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mc = ModelConfig(name="bench", d_model=args.d_model, d_ff=args.d_expert, n_layers=1)
    x_BTD = torch.randn(1, args.tokens, args.d_model, requires_grad=True)
    flops = 6 * args.tokens * args.top_k * 2 * args.d_model * args.d_expert  # expert matmuls, fwd + bwd
    print(
        f"MoE fwd+bwd: E={args.experts} top-{args.top_k} D={args.d_model} F={args.d_expert} "
        f"T={args.tokens}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'dtype':6} {'impl':9} {'compile':7} {'ms':>9} {'tokens/s':>10} {'GFLOP/s':>8} {'vs loop':>8}  dispatch")
    for dt_name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt_name]
        base = None
        for compiled in [False, True] if args.compile else [False]:
            for impl in args.impls.split(","):
                layer = MoE(mc, MoEConfig(name="bench", n_experts=args.experts, top_k=args.top_k, impl=impl))
                fn = torch.compile(layer) if compiled else layer
                s = time_fwd_bwd(layer, x_BTD, dtype, args.repeats, fn)
                base = s if (impl == "loop" and not compiled) else base
                ratio = f"{base / s:7.2f}x" if base else "      -"
                print(
                    f"{dt_name:6} {impl:9} {str(compiled):7} {s * 1e3:9.1f} {args.tokens / s:10.0f} "
                    f"{flops / s / 1e9:8.1f} {ratio}  {layer.dispatch}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
