"""Sizing (scaletrain/sizing.py, docs/sizing.md): the analytic activation memory equals the bytes autograd
really keeps (measured with saved-tensor hooks on CPU, fp32) for dense, Llama-shaped, dropout and MoE models;
the per-GPU figures follow their formulas; the llama_7b dry run allocates no weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from scaletrain.config import load_config
from scaletrain.model import Transformer
from scaletrain.muon import param_roles
from scaletrain.sizing import GB, USABLE, activation_bytes_per_token, meta_model, size

from .conftest import REPO, compose_cfg

T, V = 64, 512


def _cfg(*overrides: str):
    return load_config(compose_cfg([*overrides, "~local", f"data.seq_len={T}", f"data.tokenizer.vocab_size={V}"]))


def measured_bytes_per_token(cfg) -> float:
    """Bytes autograd keeps for backward per token: the saved tensors' distinct storages (parameters and
    buffers excluded), at batch 4 minus batch 2, so everything that does not scale with tokens cancels."""
    torch.manual_seed(0)
    model = Transformer(cfg.model, V, T, cfg.moe).train()
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def saved(batch: int) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in fixed:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randint(0, V, (batch, T))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.cross_entropy(model(x).logits.float().flatten(0, 1), x.flatten())
        return sum(seen.values())

    return (saved(4) - saved(2)) / (2 * T)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=baseline_10m", "model.dropout=0.1"],  # the seed: LayerNorm, ReLU, W_e, dropout masks
        ["model=tiny", "model.activation=gelu", "model.dropout=0.1"],
        ["model=tiny", "model.norm=rmsnorm", "model.activation=swiglu", "model.n_kv_heads=2", "model.embed_proj=false"],
        ["model=tiny", "moe=top2_8e"],
        ["model=tiny", "moe=fine_64e_top6_shared1"],
    ],
    ids=["baseline", "gelu", "llama_shaped", "moe_top2", "moe_fine_shared"],
)
def test_the_activation_formula_equals_what_autograd_keeps_on_cpu(overrides):
    cfg = _cfg(*overrides)
    # fp32 activations (4 bytes) and scaletrain's CPU dropout, which keeps a scaled fp32 mask (4 bytes)
    predicted = activation_bytes_per_token(cfg, meta_model(cfg), act_bytes=4, mask_bytes=4)
    assert predicted == measured_bytes_per_token(cfg)


@pytest.mark.parametrize("parallel,optim", [("fsdp", "adamw"), ("ddp", "adamw"), ("fsdp", "muon")])
def test_weight_gradient_and_optimizer_memory_follow_their_formulas(parallel, optim):
    cfg = _cfg("model=baseline_10m", f"train.parallel={parallel}", f"optim={optim}", "train.batch_size=16")
    s = size(cfg, gpus=4, gpu_mem_gb=80)
    model = meta_model(cfg)
    P = sum(p.numel() for p in model.parameters() if p is not model.W_ue.weight or not cfg.model.tie_embeddings)
    assert s.params_total == P
    shard = 4 if parallel == "fsdp" else 1
    muon = sum(r.param.numel() for r in param_roles(model) if r.group.startswith("muon")) if optim == "muon" else 0
    assert s.params_gb == pytest.approx(4 * P / shard / GB, rel=1e-12)
    assert s.grads_gb == pytest.approx(4 * P / shard * (1 if parallel == "fsdp" else 2) / GB, rel=1e-12)
    assert s.optimizer_gb == pytest.approx((4 * muon + 8 * (P - muon)) / shard / GB, rel=1e-12)
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    unit = max(block, model.W_ue.weight.numel())
    assert s.allgather_gb == pytest.approx((2 * unit * 4 / GB) if parallel == "fsdp" else 0.0, rel=1e-12)
    # the largest micro-batch: what fits in the usable memory beside the fixed part, per sequence
    fixed = (s.params_gb + s.grads_gb + s.optimizer_gb + s.allgather_gb) * GB
    per_seq = s.activations_gb["none"] * GB / s.micro_batch
    assert s.max_micro_batch["none"] == math.floor((80 * GB * USABLE - fixed) / per_seq)
    assert s.activations_gb["full"] < s.activations_gb["selective"] < s.activations_gb["none"]


def test_the_llama_7b_dry_run_sizes_it_without_allocating_weights(tmp_path):
    """Through the real command; the peak resident memory of that process (its parent here is a fresh
    interpreter, so RUSAGE_CHILDREN is that one process) stays far below the 27 GB of fp32 weights."""
    run = tmp_path / "dry"
    command = [
        sys.executable,
        "-m",
        "scaletrain.run",
        "model=llama_7b",
        "data.seq_len=4096",
        "train.precision=bf16",
        "train.parallel=fsdp",
        "train.batch_size=64",
        "train.dry_run=true",
        "train.dry_run_gpus=8",
        "~local",
        f"hydra.run.dir={run}",
    ]
    probe = (
        "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(done.stdout); "
        "print(done.stderr, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *command], cwd=REPO, capture_output=True, text=True)
    code, peak_kb = map(int, done.stdout.split("\n", 1)[0].split())
    assert code == 0, done.stderr[-2000:]
    assert peak_kb < 2 * 2**20  # KiB: under 2 GiB
    sizing = json.loads((run / "sizing.json").read_text())
    assert sizing["params_total"] == 6_738_415_616 and sizing["gpus"] == 8 and sizing["micro_batch"] == 8
    assert "sizing llama_7b: 6,738,415,616 parameters" in done.stdout
    assert sizing["optimizer_gb"] == pytest.approx(8 * 6_738_415_616 / 8 / GB, rel=1e-12)
