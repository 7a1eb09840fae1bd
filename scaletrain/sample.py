"""Continuations from a finished run: `python -m scaletrain.sample RUN_DIR [--prompt ... --n 3 --max-new-tokens
200 --temperature 0.8 --top-k 50 --seed 0 --checkpoint PATH --device cpu]` (console script `scaletrain-sample`).

Works from any directory: the run folder holds its config, tokenizer and final weights (`runs.load_run`). The
prompt defaults to the data config's sample prompt (TinyStories: "Once upon a time"), else, for generated
reasoning data, a held-out validation problem; temperature 0 answers greedily.
"""

from __future__ import annotations

import argparse
import sys

import torch

from scaletrain.config import BadInput, SourceKind
from scaletrain.data import synthetic
from scaletrain.generate import complete
from scaletrain.runs import LoadedRun, RunFolderError, load_run


def default_prompt(run: LoadedRun) -> str:
    """The first source's sample prompt; else a validation problem of the first generated source."""
    for source in run.cfg.data.sources.values():
        if source.sample_prompt:
            return source.sample_prompt
    for source in run.cfg.data.sources.values():
        if source.kind == SourceKind.synthetic:
            s = source.synthetic
            kind = s.kinds[0]
            return synthetic.prompt(next(synthetic.problems(kind, "val", s.seed, s.difficulty(kind))))
    raise RunFolderError("this run's data config has no sample prompt: pass --prompt")


def continuations(
    run: LoadedRun, prompt: str, n: int, max_new_tokens: int, temperature: float, top_k: int | None, seed: int
) -> list[str]:
    """`n` continuations of `prompt` (the text after it, cut at end-of-text)."""
    ids = run.tokenizer.encode(prompt)
    gen = torch.Generator(device=next(run.model.parameters()).device).manual_seed(seed)
    new = complete(
        run.model, [ids] * n, max_new_tokens, temperature, top_k, stop_token=run.tokenizer.eot_id, generator=gen
    )
    return [run.tokenizer.decode(row) for row in new]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scaletrain.sample", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder (holds config.json, tokenizer.json and model.pt)")
    parser.add_argument("--prompt", default=None, help="text to continue (default: the data config's prompt)")
    parser.add_argument("--n", type=int, default=3, help="how many continuations")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="a step_*.pt file or sharded step_* folder")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run_dir, args.checkpoint, args.device)
        prompt = args.prompt if args.prompt is not None else default_prompt(run)
        texts = continuations(run, prompt, args.n, args.max_new_tokens, args.temperature, args.top_k or None, args.seed)
    except (BadInput, ValueError, OSError) as err:
        print(f"sample error: {err}", file=sys.stderr)
        return 2
    print(f"# {run.weights} (step {run.step}), prompt {prompt!r}")
    for i, text in enumerate(texts):
        print(f"--- {i}\n{prompt}{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
