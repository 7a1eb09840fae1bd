"""Speed of the in-process lm-eval backend against the harness's Hugging Face backend on the same weights:
`python -m scaletrain.bench_harness RUN_DIR --tasks local_tinystories_cloze,local_tinystories_ppl,local_gsm8k
--limit 100 --task-data gsm8k_dir=...,tinystories_dir=... [--batch-size auto|B] [--gen-kwargs max_gen_toks=64]`.

The run's final weights are exported (scaletrain.export_hf, fp32) into a temporary folder for `--model hf`; both
backends then answer the same requests of the same tasks in this process, one after the other (ours first), and
a table prints requests per second per request type and the whole time. Time is the harness's call into the
model per request type (tokenization included, task loading and metric aggregation not). CPU threads: torch's
default. Name the machine next to any figure (`lscpu`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from scaletrain.eval import _gen_value, parse_pairs

REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def timed(lm: Any) -> dict[str, list[float]]:
    """Wrap `lm`'s request methods to record [requests, seconds] per request type."""
    stats: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name in REQUEST_TYPES:
        method = getattr(lm, name)

        def wrapper(requests, *args, _method=method, _name=name, **kwargs):
            start = time.perf_counter()
            out = _method(requests, *args, **kwargs)
            stats[_name][0] += len(requests)
            stats[_name][1] += time.perf_counter() - start
            return out

        setattr(lm, name, wrapper)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scaletrain.bench_harness", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--task-data", action="append", default=[])
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--gen-kwargs", default="")
    args = parser.parse_args(argv)

    import torch
    from lm_eval.models.huggingface import HFLM

    from scaletrain import export_hf, hardware, harness
    from scaletrain.runs import load_run

    run = load_run(args.run_dir)
    tasks = [t for t in args.tasks.split(",") if t]
    data = parse_pairs(args.task_data, "--task-data")
    gen = {k: _gen_value(v) for k, v in parse_pairs([args.gen_kwargs], "--gen-kwargs").items()} or None
    batch: int | str = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_hf.export_run(Path(args.run_dir), Path(tmp) / "hf")
        backends = {
            "scaletrain (in process)": lambda: harness.ScaletrainLM(run.model, run.tokenizer, batch),
            "hf (export)": lambda: HFLM.create_from_arg_obj(
                {"pretrained": str(folder), "device": "cpu", "batch_size": batch, "dtype": "float32"}
            ),
        }
        for name, make in backends.items():
            lm = make()
            stats = timed(lm)
            kw: dict[str, Any] = dict(limit=args.limit, num_fewshot=args.num_fewshot, metadata=data, gen_kwargs=gen)
            harness.run_tasks(lm, tasks, bootstrap_iters=0, **kw)
            for kind, (n, seconds) in stats.items():
                rows.append((name, kind, int(n), seconds))
    n_params = sum(p.numel() for p in run.model.parameters())
    machine = hardware.describe(torch.device("cpu"))
    print(f"# {run.run_dir} ({n_params:,} parameters), tasks {args.tasks}, limit {args.limit}, ")
    print(f"# batch size {args.batch_size}, torch {torch.__version__}, {machine}")
    print(f"| {'backend':24s} | {'request type':22s} | requests | seconds | requests/s |")
    print(f"|{'-' * 26}|{'-' * 24}|---------:|--------:|-----------:|")
    for name, kind, n, seconds in rows:
        print(f"| {name:24s} | {kind:22s} | {n:8d} | {seconds:7.2f} | {n / seconds:10.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
