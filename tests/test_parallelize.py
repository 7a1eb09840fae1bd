"""parallelize.py: initialization from (seed, parameter name) that is bit-identical in one process, under DDP and
under FSDP2 on 2 gloo ranks; activation checkpointing (full, and selective: matmul and attention outputs kept,
the rest recomputed) that changes neither the loss nor the gradients; per-block torch.compile against eager;
FSDP2's bf16 MixedPrecisionPolicy; train.ac validation. The 2-rank parity of whole runs lives in
test_distributed.py, whose launcher and tolerance (`parity_rtol`) the slow tests below reuse.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from torch.utils._python_dispatch import TorchDispatchMode

from scaletrain.build import build
from scaletrain.config import ConfigError, TrainConfig, load_config
from scaletrain.evaluator import evaluate
from scaletrain.generate import complete
from scaletrain.model import Transformer, param_seed
from scaletrain.parallelize import SAVE_OPS, materialize
from scaletrain.trainer import forward_backward, optimizer_step, train

from .conftest import TORCHRUN_2, compose_cfg
from .test_distributed import _assert_same_losses, _losses, _overrides, _run, _tokens_per_step, _torchrun

TINY = ["debug=cpu_tiny", "~local"]
FP32_U = 2.0**-24  # fp32 unit roundoff


def _tokens(vocab: int = 512, n: int = 50_000) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, size=n).astype(np.uint16)


def _build(*overrides: str):
    return build(compose_cfg([*TINY, *overrides]), train_tokens=_tokens())


def _step(c) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward of the first batch -> (loss, gradients by name)."""
    x, y = c.loader.next_batch()
    lm, _ = forward_backward(c.dp_model, x, y, c.autocast, 1.0)
    return lm, {n: p.grad.detach().clone() for n, p in c.model.named_parameters()}


# --- initialization -------------------------------------------------------------------------------


def _materialized(seed: int, **model: object) -> Transformer:
    cfg = load_config(compose_cfg([*TINY, *(f"model.{k}={v}" for k, v in model.items())]))
    with torch.device("meta"):
        m = Transformer(cfg.model, 512, cfg.data.seq_len, cfg.moe)
    materialize(m, torch.device("cpu"), seed)
    return m


def test_each_initial_weight_is_drawn_from_its_own_generator_seeded_by_seed_and_name():
    model = _materialized(7, tie_embeddings=True)
    assert model.W_ue.weight is model.tok_emb.weight  # still tied after to_empty
    std = model.cfg.init_std
    gen = torch.Generator().manual_seed(param_seed(7, "blocks.1.attn.wq.weight"))
    want = torch.empty(model.blocks[1].attn.wq.weight.shape).normal_(0.0, std, generator=gen)
    assert torch.equal(model.blocks[1].attn.wq.weight, want)
    # a parameter's value depends on nothing else: one more layer leaves the shared names' values alone
    # (except the residual-stream projections, whose std is init_std / sqrt(2 * n_layers))
    deeper = dict(_materialized(7, n_layers=3, tie_embeddings=True).named_parameters())
    for name, p in model.named_parameters():
        if not name.endswith(("wo.weight", "w_out.weight")):
            assert torch.equal(p, deeper[name]), name
    other = _materialized(8, tie_embeddings=True)
    assert not torch.equal(other.blocks[1].attn.wq.weight, model.blocks[1].attn.wq.weight)


def test_initial_weights_keep_the_gpt2_distributions_and_buffers_are_recomputed():
    model = _materialized(0, bias=True, norm="rmsnorm", qk_norm=True)
    cfg = model.cfg
    std, residual = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            want = residual if name.endswith(("wo.weight", "w_out.weight")) else std
            # the sample std of n N(0, s) draws has relative standard deviation 1 / sqrt(2n): 6 of them
            assert abs(p.std().item() / want - 1) < 6 / math.sqrt(2 * p.numel()), name
            assert abs(p.mean().item()) < 6 * want / math.sqrt(p.numel()), name
    fresh = Transformer(cfg, 512, model.max_seq_len)  # built on the CPU: tables computed in __init__
    assert torch.equal(model.rope.cos_TP, fresh.rope.cos_TP) and torch.equal(model.rope.sin_TP, fresh.rope.sin_TP)
    moe_cfg = load_config(compose_cfg([*TINY, "moe=top2_8e"]))
    with torch.device("meta"):
        m = Transformer(moe_cfg.model, 512, 64, moe_cfg.moe)
    materialize(m, torch.device("cpu"), 0)
    layer = m.blocks[-1].mlp
    assert torch.equal(layer.expert_bias_E, torch.zeros_like(layer.expert_bias_E))
    experts = layer.experts.w_out_EFD
    assert abs(experts.std().item() / residual - 1) < 6 / math.sqrt(2 * experts.numel())


def test_build_initializes_from_train_seed_whatever_train_ac_is():
    a = _build("train.seed=3")
    b = _build("train.seed=3", "train.ac=full")
    sd_a, sd_b = a.model.state_dict(), b.model.state_dict()
    assert sd_a.keys() == sd_b.keys()  # no wrapper module: the names (and checkpoints) stay the same
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


# --- activation checkpointing ---------------------------------------------------------------------


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_loss_gradients_and_rng_stream_as_none(ac):
    """Recomputation runs the same ops on the same inputs, with the RNG state restored (dropout draws the same
    masks), so the result is bit-identical, not merely close; the global stream after backward is untouched."""
    dropout = ["model.dropout=0.1"]  # exercises the RNG restore
    ref = _build(*dropout)
    loss_ref, grads_ref = _step(ref)
    after_ref = torch.rand(4)
    got = _build(*dropout, f"train.ac={ac}")
    loss, grads = _step(got)
    assert torch.equal(torch.rand(4), after_ref)
    assert torch.equal(loss, loss_ref)
    for name, g in grads.items():
        assert torch.equal(g, grads_ref[name]), name
    # generation takes the eager path (KV cache), and answers alike
    prompt = [[1, 2, 3], [4, 5]]
    ref.model.eval()
    got.model.eval()
    assert complete(got.model, prompt, 6) == complete(ref.model, prompt, 6)


def test_moe_with_bias_balancing_trains_alike_with_checkpointing():
    """An MoE forward has side effects: it adds its loads to the selection-bias accumulator, which a recompute
    does again. Every expert's count doubles, so the update's sign(mean load - load) is unchanged: the losses,
    weights and selection biases after 2 optimizer steps equal those without checkpointing, bit for bit."""
    moe = ["model=moe_8x", "model.d_model=64", "model.d_ff=128", "moe.bias_update_rate=0.01", "model.dropout=0"]
    runs = {}
    for ac in ("none", "full", "selective"):
        c = _build(*moe, f"train.ac={ac}")
        losses = []
        for _ in range(2):
            x, y = c.loader.next_batch()
            losses.append(forward_backward(c.dp_model, x, y, c.autocast, 1.0)[0])
            optimizer_step(c.model, c.optimizer, c.scheduler, c.cfg.train.grad_clip)
        runs[ac] = (torch.stack(losses), c.model.state_dict())
    (ref_losses, ref_state), biases = runs["none"], [k for k in runs["none"][1] if k.endswith("expert_bias_E")]
    assert biases and any(ref_state[k].abs().sum() > 0 for k in biases)  # the biases did move
    for ac in ("full", "selective"):
        losses, state = runs[ac]
        assert torch.equal(losses, ref_losses), ac
        for k, v in ref_state.items():
            assert torch.equal(state[k], v), f"{ac}: {k}"


class _OpCounter(TorchDispatchMode):
    """How often each aten op runs (forward, recompute and backward alike)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_keeps_matmul_and_attention_outputs_and_recomputes_the_rest():
    """Counted op executions over one forward + backward: `full` runs every forward op of the blocks twice;
    `selective` recomputes the norms and activations but no matmul or attention (their outputs were kept)."""
    counts = {}
    for ac in ("none", "selective", "full"):
        c = _build(f"train.ac={ac}")
        x, y = c.loader.next_batch()
        with _OpCounter() as counter:
            forward_backward(c.dp_model, x, y, c.autocast, 1.0)
        counts[ac] = counter.counts
    aten = torch.ops.aten
    L = 2  # model=tiny
    attention = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert attention in SAVE_OPS and counts["none"][attention] == L
    assert counts["selective"][attention] == L and counts["full"][attention] == 2 * L
    saved = [op for op in SAVE_OPS if counts["none"][op]]
    assert {aten.mm.default, aten.bmm.default} <= set(saved)
    for op in saved:  # backward's own matmuls are the same in all three; only `full` reruns the forward's
        assert counts["selective"][op] == counts["none"][op], op
        assert counts["full"][op] > counts["none"][op], op
    norm = aten.native_layer_norm.default  # 2 per block + the final norm, and the blocks' again on recompute
    assert counts["none"][norm] == 2 * L + 1
    assert counts["selective"][norm] == counts["full"][norm] == 4 * L + 1
    relu = aten.relu.default
    assert counts["selective"][relu] == counts["full"][relu] == 2 * counts["none"][relu] == 2 * L


# --- per-block compile ----------------------------------------------------------------------------


@pytest.mark.parametrize("ac", ["none", "selective", "full"])
def test_compiled_blocks_under_every_checkpointing_mode_match_eager(ac):
    """Compiled (each block, fullgraph, the `train.ac` mode's checkpointing inside the graph: `full` crashed in
    dynamo before 2026-12-07, "checkpoint not implemented for SkipFunctionVariable context_fn") against eager
    without checkpointing, fp32. Matmuls and attention are the same ATen kernels either way; inductor generates the
    layer norms, residual adds and ReLU, and may sum a norm's D = 128 values in another order: each norm output
    moves by at most ~D * u relative (the worst-case bound of a length-D sum), 2 norms per block and a final one
    make 5 sites in forward, and backward's gradients pass each site again plus their own norm reductions:
    loss within 5 D u, each gradient within 10 D u of its largest entry (measured: loss equal, gradients
    ~1e-8 absolute)."""
    torch._dynamo.reset()
    eager_loss, eager_grads = _step(_build())
    compiled = _build("train.compile=true", f"train.ac={ac}")
    loss, grads = _step(compiled)
    D = compiled.cfg.model.d_model
    assert abs(loss.item() - eager_loss.item()) <= 5 * D * FP32_U * eager_loss.item()
    for name, g in grads.items():
        ref = eager_grads[name]
        assert (g - ref).abs().max().item() <= 10 * D * FP32_U * ref.abs().max().item(), name


# --- config ---------------------------------------------------------------------------------------


def test_an_unknown_ac_mode_fails_naming_train_ac():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg([*TINY, "train.ac=partial"])
    assert "train.ac" in str(err.value.__cause__) and "selective" in str(err.value.__cause__)
    with pytest.raises(ConfigError, match=r"train\.ac: expected none \| selective \| full, got 'ful'.*'full'"):
        TrainConfig(ac="ful")


# --- 2 gloo ranks ---------------------------------------------------------------------------------

# What every 2-rank script starts with: the process group, and random tokens to train on.
_PREAMBLE = """\
import json, os, sys
sys.path.insert(0, os.getcwd())
import numpy as np, torch
from tests.conftest import compose_cfg
from scaletrain import distributed
from scaletrain.build import build
from scaletrain.trainer import forward_backward

out, overrides = sys.argv[1], sys.argv[2:]
env = distributed.detect_env()
distributed.init_process_group(env, torch.device("cpu"))
tokens = np.random.default_rng(0).integers(0, 512, size=50_000).astype(np.uint16)
"""

# Each rank builds the components for DDP, then for FSDP2, and rank 0 saves the gathered full state dicts.
_INIT_SCRIPT = (
    _PREAMBLE
    + """\
states = {}
for parallel in ("ddp", "fsdp"):
    c = build(compose_cfg([*overrides, f"train.parallel={parallel}"]), env, torch.device("cpu"), tokens)
    states[parallel] = distributed.full_model_state(c.model)  # FSDP2: all ranks gather, rank 0 gets it
    with_optimizer = distributed.full_state(c.model, c.optimizer)[0]  # the checkpoint's gather: the same weights
    assert not env.is_main or all(torch.equal(with_optimizer[k], v) for k, v in states[parallel].items())
if env.is_main:
    torch.save(states, out)
distributed.destroy_process_group()
"""
)


@pytest.mark.slow
def test_initial_weights_are_bit_identical_in_one_process_under_ddp_and_under_fsdp2(tmp_path):
    """vocab 515: FSDP2 shards the embedding and W_ue unevenly (258 + 257 rows), each rank keeps its slice of
    the full tensor it drew; gathered, the weights equal one process's exactly (and DDP's, which broadcasts
    rank 0's)."""
    overrides = [*TINY, "model.vocab_size=515", "train.seed=11", "train.ac=selective"]
    script = tmp_path / "init_states.py"
    script.write_text(_INIT_SCRIPT)
    _run([*TORCHRUN_2, str(script), str(tmp_path / "states.pt"), *overrides])
    states = torch.load(tmp_path / "states.pt")
    one = build(compose_cfg(overrides), train_tokens=_tokens()).model.state_dict()
    for parallel, sd in states.items():
        assert sd.keys() == one.keys(), parallel
        for name, tensor in one.items():
            assert torch.equal(sd[name], tensor), f"{parallel}: {name}"


@pytest.mark.slow
def test_two_fsdp2_ranks_match_one_process_for_the_first_five_losses(tinystories_dir, data_cache, tmp_path):
    """The tolerance is test_distributed.py's `parity_rtol` (derived there): the two runs start from the same
    weights (test above) and differ only in the order of the fp32 sums over the step's tokens."""
    five = {"train.max_steps": 5}
    train(compose_cfg(_overrides(tinystories_dir, data_cache, **five)), tmp_path / "one")
    overrides = _overrides(tinystories_dir, data_cache, **five, **{"train.parallel": "fsdp"})
    _torchrun(overrides, tmp_path / "fsdp")
    assert len(_losses(tmp_path / "fsdp")) == 5
    _assert_same_losses(_losses(tmp_path / "fsdp"), _losses(tmp_path / "one"), _tokens_per_step(overrides))


@pytest.mark.slow
def test_fsdp2_with_full_or_selective_checkpointing_matches_ddp(tinystories_dir, data_cache, tmp_path):
    """Both runs do the same arithmetic on each rank: the same weights, forward and backward (checkpointing is
    bit-exact, test above), the gradient sum of the same two halves (an all-reduce for DDP, a reduce-scatter for
    FSDP2: a + b either way; the halving is exact). They differ in one place: the gradient norm's sum of squares
    runs per shard and then across ranks under FSDP2, per tensor under DDP, so the clipping factor differs by
    ~sqrt(#params) u. Step 1 comes before any update: its losses are equal bit for bit. After that the
    difference grows as in any 2-rank run, from a smaller start than test_distributed's one-process parity
    (which starts from the loss's split sum at step 1), so `parity_rtol` bounds it. (Measured on an AVX-512
    Xeon: all 5 losses equal bit for bit: AdamW's update m / sqrt(v) hardly sees the clipping factor.)"""
    dropout = {"model.dropout": 0.1}  # recompute must redraw the same masks
    ddp = _overrides(tinystories_dir, data_cache, **dropout, **{"train.max_steps": 5, "train.parallel": "ddp"})
    _torchrun(ddp, tmp_path / "ddp")
    want = _losses(tmp_path / "ddp")
    for ac in ("full", "selective"):
        fsdp = _overrides(
            tinystories_dir, data_cache, **dropout, **{"train.max_steps": 5, "train.parallel": "fsdp", "train.ac": ac}
        )
        _torchrun(fsdp, tmp_path / ac)
        got = _losses(tmp_path / ac)
        assert len(got) == 5 and got[0] == want[0], (ac, got, want)
        _assert_same_losses(got, want, _tokens_per_step(fsdp))


# Rank 0 records, inside a forward of 2-rank FSDP2 with train.precision=bf16, the dtype of a block's weights
# (a forward pre-hook on its attention), and after backward the dtypes of the sharded weights and gradients.
_MP_SCRIPT = (
    _PREAMBLE
    + """\
c = build(compose_cfg(overrides), env, torch.device("cpu"), tokens)
seen = {}
attn = c.model.blocks[0].attn


def record(module, args):  # returns None: the inputs go on unchanged
    seen.setdefault("in_forward", str(module.wq.weight.dtype))


attn.register_forward_pre_hook(record)
x, y = c.loader.next_batch()
forward_backward(c.dp_model, x, y, c.autocast, 1.0)
seen["sharded"] = sorted({str(p.dtype) for p in c.model.parameters()})
seen["grads"] = sorted({str(p.grad.dtype) for p in c.model.parameters()})
seen["precision"] = str(c.precision)
if env.is_main:
    json.dump(seen, open(out, "w"))
distributed.destroy_process_group()
"""
)


def _bf16_matmul_works() -> bool:
    try:
        torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _bf16_matmul_works(), reason="this CPU build of torch has no bf16 matmul")
def test_fsdp2_under_bf16_computes_with_bf16_weights_and_keeps_fp32_master_weights_and_gradients(tmp_path):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): gathered weights are bf16 inside the forward;
    the sharded parameters the optimizer steps, and their gradients, stay fp32. (Checks dtypes only, so a CPU
    without native bf16, where bf16 matmuls are slow, still runs it: the model is tiny.)"""
    script = tmp_path / "mp.py"
    script.write_text(_MP_SCRIPT)
    _run([*TORCHRUN_2, str(script), str(tmp_path / "mp.json"), *TINY, "train.parallel=fsdp", "train.precision=bf16"])
    seen = json.loads((tmp_path / "mp.json").read_text())
    assert seen == {
        "in_forward": "torch.bfloat16",
        "sharded": ["torch.float32"],
        "grads": ["torch.float32"],
        "precision": "bf16",
    }


_EVAL_SCRIPT = """\
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch
from tests.conftest import compose_cfg
from scaletrain import distributed
from scaletrain.build import build
from scaletrain.evaluator import evaluate

out, overrides = sys.argv[1], sys.argv[2:]
env = distributed.detect_env()
distributed.init_process_group(env, torch.device("cpu"))
cfg = compose_cfg(overrides)
c = build(cfg, env, torch.device("cpu"))
val = evaluate(c.model, c.data, cfg, torch.device("cpu"), c.autocast, env.world_size)
if env.is_main:
    json.dump(val, open(out, "w"))
distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_split_the_evaluation_and_get_one_processes_numbers(tmp_path, data_cache, parallel):
    """Each rank evaluates every other micro-batch of the same windows (all 11 of the split, 3 batches of 4: rank 1
    runs a filler forward) and answers every other problem (7: 4 and 3 prompts, decoding in lockstep); the fp64
    sums are all-reduced. Only the grouping of the fp32 per-batch sums differs from one process (batches of
    4 windows instead of 8): relative error <= a few fp32 roundoffs of a per-batch sum."""
    overrides = [
        *TINY, "data=synthetic_reasoning", f"data.cache_dir={data_cache}", "data.seq_len=64",
        "data.sources.reasoning.synthetic.n_val=10", "data.max_val_tokens=769",  # 11 windows: 3 batches of 4
        "train.batch_size=8", "train.eval_batches=1000",
        "train.eval_problems=7", "train.eval_answer_tokens=8", f"train.parallel={parallel}",
    ]  # fmt: skip
    cfg = compose_cfg(overrides)
    c = build(cfg)
    one = evaluate(c.model, c.data, cfg, torch.device("cpu"), c.autocast)
    script = tmp_path / "evaluate.py"
    script.write_text(_EVAL_SCRIPT)
    _run([*TORCHRUN_2, str(script), str(tmp_path / "val.json"), *overrides])
    two = json.loads((tmp_path / "val.json").read_text())
    assert two.keys() == one.keys() and "val/loss" in one
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=64 * FP32_U), key
