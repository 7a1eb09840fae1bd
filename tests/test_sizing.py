"""Sizing (scaletrain/sizing.py, docs/sizing.md): the analytic activation memory equals the bytes the forward pass
leaves for the backward (measured on CPU, fp32, by tracking every tensor the ops create and which of them are
still alive) for dense, Llama-shaped, dropout and MoE models under each activation-checkpointing mode; the peak
during the backward stays under its bound; the per-GPU figures follow their formulas; the llama_7b dry run
allocates no weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from scaletrain.config import ActivationCheckpointing, load_config
from scaletrain.model import Transformer
from scaletrain.muon import param_roles
from scaletrain.parallelize import apply_block_forward
from scaletrain.sizing import (
    GB,
    USABLE,
    dry_run,
    format_sizing,
    host_memory,
    kept_bytes_per_token,
    meta_model,
    model_shape,
    peak_bytes_per_token,
    size,
)

from .conftest import REPO, compose_cfg

T, V = 64, 512


def _cfg(*overrides: str):
    return load_config(compose_cfg([*overrides, "~local", f"data.seq_len={T}", f"data.tokenizer.vocab_size={V}"]))


class StorageTimeline(TorchDispatchMode):
    """Every storage an op creates (parameters, buffers and empty ones aside), with when it appears and when the
    last tensor on it dies (a weakref callback: torch keeps a tensor's Python object alive while autograd or
    checkpointing still holds it), as (bytes, storage id) events: +bytes at birth, -bytes at death."""

    def __init__(self, fixed: set[int]):
        super().__init__()
        self.fixed, self.events, self.refs = fixed, [], []
        self.live: dict[int, list[int]] = {}  # data_ptr -> [storage id, bytes, tensors alive]

    def _dead(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[2] -= 1
        if entry[2] == 0:
            self.events.append((-entry[1], entry[0]))
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.fixed or storage.nbytes() == 0:
                continue
            if ptr not in self.live:
                self.live[ptr] = [len(self.events), storage.nbytes(), 0]
                self.events.append((storage.nbytes(), len(self.events)))
            self.live[ptr][2] += 1
            self.refs.append(weakref.ref(t, lambda _, ptr=ptr: self._dead(ptr)))
        return out

    def live_bytes(self, exclude: set[int]) -> tuple[int, int]:
        """(bytes alive at the end of the events so far, their peak), storages in `exclude` left out."""
        live = peak = 0
        for nbytes, sid in self.events:
            if sid not in exclude:
                live += nbytes
                peak = max(peak, live)
        return live, peak


def measured_bytes_per_token(cfg, ac: ActivationCheckpointing) -> tuple[float, float]:
    """(bytes alive when the forward pass ends, peak bytes during forward + backward) per token: batch 4 minus
    batch 2, so everything that does not scale with tokens (the parameters' gradients among them) cancels; and the
    parameters' gradients are left out of the peak, which they would otherwise shift."""
    torch.manual_seed(0)
    model = Transformer(cfg.model, V, T, cfg.moe).train()
    for block in model.blocks:
        apply_block_forward(block, ac, compile=False)  # scaletrain/parallelize.py's checkpointing
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def measure(batch: int) -> tuple[int, int]:
        model.zero_grad(set_to_none=True)
        x = torch.randint(0, V, (batch, T))
        timeline = StorageTimeline(fixed)
        with timeline:
            loss = F.cross_entropy(model(x).logits.float().flatten(0, 1), x.flatten())
            kept, _ = timeline.live_bytes(set())
            loss.backward()
            del loss
        grads = [p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None]
        grad_ids = {timeline.live[ptr][0] for ptr in grads}
        return kept, timeline.live_bytes(grad_ids)[1]

    (kept4, peak4), (kept2, peak2) = measure(4), measure(2)
    return (kept4 - kept2) / (2 * T), (peak4 - peak2) / (2 * T)


MODELS = {
    "baseline": ["model=baseline_10m", "model.dropout=0.1"],  # the seed: LayerNorm, ReLU, W_e, dropout masks
    "gelu": ["model=tiny", "model.activation=gelu", "model.dropout=0.1"],
    "llama_shaped": [
        "model=tiny",
        "model.norm=rmsnorm",
        "model.activation=swiglu",
        "model.n_kv_heads=2",
        "model.embed_proj=false",
    ],
    "moe_top2": ["model=tiny", "moe=top2_8e"],
    "moe_fine_shared": ["model=tiny", "moe=fine_64e_top6_shared1"],
}


@pytest.mark.parametrize("ac", list(ActivationCheckpointing), ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_the_activation_formulas_equal_what_the_forward_keeps_and_bound_the_peak(model, ac):
    cfg = _cfg(*MODELS[model])
    shape = model_shape(cfg)
    kept, peak = measured_bytes_per_token(cfg, ac)
    # fp32 activations (4 bytes) and scaletrain's CPU dropout, which keeps a scaled fp32 mask (4 bytes): exact
    assert kept == kept_bytes_per_token(cfg, shape, str(ac), act_bytes=4, mask_bytes=4)
    # the peak: above what was kept (the backward's gradients come on top), at most the bound (kept + one
    # rebuilt block + the working gradients)
    assert kept < peak <= peak_bytes_per_token(cfg, shape, str(ac), act_bytes=4, mask_bytes=4)


SHAPES = {
    **MODELS,
    "tied_layernorm_bias": ["model=tiny", "model.tie_embeddings=true", "model.bias=true", "model.qk_norm=true"],
    "moe_every_2_of_5": ["model=tiny", "moe=top2_8e", "moe.every=2", "model.n_layers=5", "optim=muon"],
    "gpt2_vocab": ["model=tiny", "data.tokenizer.kind=gpt2"],
    "model_vocab": ["model=tiny", "model.vocab_size=1000", "model.n_embed=64"],
}


@pytest.mark.parametrize("model", SHAPES)
def test_the_shape_from_one_block_of_each_kind_counts_what_the_whole_model_holds(model):
    """`model_shape` (what the dry run and every run's resource check count with, in a time that does not grow
    with model.n_layers) against the configured model built whole on the meta device."""
    cfg = _cfg(*SHAPES[model])
    shape, meta = model_shape(cfg), meta_model(cfg)
    counts = meta.param_counts()
    assert (shape.params, shape.active) == (counts["total"], counts["active"])
    assert shape.muon == sum(r.param.numel() for r in param_roles(meta) if r.group.startswith("muon"))
    assert shape.n_moe == sum(1 for b in meta.blocks if hasattr(b.mlp, "w_router_ED"))
    assert shape.vocab_size == meta.vocab_size
    assert shape.unit == max([*(sum(p.numel() for p in b.parameters()) for b in meta.blocks), meta.W_ue.weight.numel()])
    assert shape.buffers == sum(b.numel() * b.element_size() for b in meta.buffers())


def test_host_memory_is_this_machines_ram_or_its_cgroups_lower_limit():
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    memory, source = host_memory()
    assert memory is not None and 0 < memory <= ram
    assert source == "physical RAM" if memory == ram else source.startswith("the cgroup's memory limit")


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
    # train.precision=auto is bf16 on the GPUs the dry run sizes: FSDP2 gathers bf16 copies (2 bytes)
    assert s.precision == "bf16"
    assert s.allgather_gb == pytest.approx((2 * unit * 2 / GB) if parallel == "fsdp" else 0.0, rel=1e-12)
    # the largest micro-batch: what fits in the usable memory beside the fixed part, per sequence
    fixed = (s.params_gb + s.grads_gb + s.optimizer_gb + s.allgather_gb) * GB
    per_seq = s.activations_gb["none"] * GB / s.micro_batch
    assert s.max_micro_batch["none"] == math.floor((80 * GB * USABLE - fixed) / per_seq)
    assert s.activations_gb["full"] < s.activations_gb["selective"] < s.activations_gb["none"]


def test_a_user_mlp_or_attention_is_named_in_a_note_of_the_table_and_of_sizing_json(tmp_path):
    """The activation formulas model the built-in components only: another target (nn.Identity here, which takes
    any constructor arguments; the meta model never runs forward) is said, not silently counted as the built-in."""
    assert size(_cfg("model=tiny"), gpus=1, gpu_mem_gb=80).notes == []
    user = "torch.nn.Identity"
    cfg = _cfg("model=tiny", f"model.mlp._target_={user}", f"model.attention._target_={user}")
    sizing = dry_run(cfg, tmp_path)
    attn, mlp = sizing.notes
    assert attn.startswith(f"model.attention=sdpa ({user}) is not the built-in attention: activation memory")
    assert mlp.startswith(f"model.mlp=mlp ({user}) is not the built-in MLP: activation memory")
    assert "model.d_ff=512" in mlp  # what it counts in the user MLP's place
    assert json.loads((tmp_path / "sizing.json").read_text())["notes"] == [attn, mlp]
    assert format_sizing(sizing, "tiny").splitlines()[-2:] == [f"  note: {attn}", f"  note: {mlp}"]
    # every layer MoE: the user MLP is built nowhere, so nothing to note about it
    moe = _cfg("model=tiny", f"model.mlp._target_={user}", "moe=top2_8e")
    assert size(moe, gpus=1, gpu_mem_gb=80).notes == []


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
