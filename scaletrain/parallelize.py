"""Parallelism applied from outside the model, in torchtitan's order: the model arrives on the meta device
(shapes only), then per block activation checkpointing (`train.ac`), then per-block `torch.compile`
(`train.compile`), then FSDP2 `fully_shard` per block and on the root (with a bf16 `MixedPrecisionPolicy` under
`train.precision=bf16`) or DDP, and last the weights are materialized on the device and initialized.

Initialization is the same whatever the parallelism: every parameter draws its full tensor from its own
generator, seeded by (train.seed, its name) (`Transformer.init_weights`); a sharded (FSDP2) rank keeps its own
slice of that tensor. One process, DDP and FSDP2 on any number of ranks thus start from bit-identical weights,
and no seed checkpoint is needed (torchtitan's answer to sharded init differing from one-device init).

Activation checkpointing and compile replace each block's `forward` on the instance instead of wrapping the
block in another module (torchtitan's `checkpoint_wrapper` / `torch.compile(block)`): parameter names, state
dict keys, checkpoints and the init seeds stay the same whether they are on or off. The training forward
(`ctx is None`) goes through them; generation (a KV cache or padded prompts) runs the block eagerly.

Not here: process groups and launchers (distributed.py), DDP's `no_sync` and state-dict gathering
(distributed.py), the model itself (model.py), the optimizer (built afterwards on the sharded parameters).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from scaletrain.config import ActivationCheckpointing, ParallelMode, Precision, TrainConfig
from scaletrain.distributed import DistEnv
from scaletrain.model import Block, Transformer
from scaletrain.moe import MoE


def _ops(*names: str) -> list[Any]:
    """The aten/scaletrain OpOverloads of these names that this torch build has."""
    found = []
    for name in names:
        namespace, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is not None and hasattr(packet, overload):
            found.append(getattr(packet, overload))
    return found


# Selective checkpointing keeps the outputs of these ops and recomputes everything else (norms, RoPE,
# activation functions, dropout with its RNG state restored, residual adds): matmuls and attention are most
# of a block's FLOPs, the rest is cheap to redo and as large to keep (torchtitan's op policy, without its
# "recompute every other matmul"; docs/sizing.md's selective formula counts exactly these outputs). What
# model.py's ops become: nn.Linear -> mm/addmm, the einsum projections and a math-path SDPA -> bmm, CPU/CUDA
# SDPA kernels -> their own op, the MoE grouped GEMM -> scaletrain.grouped_mm.
SAVE_OPS = _ops(
    "aten.mm.default",
    "aten.addmm.default",
    "aten.bmm.default",
    "aten.baddbmm.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten._grouped_mm.default",
    "scaletrain.grouped_mm.default",
)
SELECTIVE = functools.partial(create_selective_checkpoint_contexts, SAVE_OPS)  # checkpoint's context_fn


def parallelize(
    model: Transformer, train: TrainConfig, device: torch.device, env: DistEnv, precision: Precision
) -> nn.Module:
    """Apply `train.ac`, `train.compile` and data parallelism to `model` (on the meta device, or anywhere: its
    weights are replaced), materialize it on `device` and initialize it from `train.seed`. Returns the module
    a training forward calls: DDP(model) with several DDP ranks, else `model` itself (FSDP2 shards it in place:
    build the optimizer afterwards). `precision` is train.precision resolved for the device (no `auto`)."""
    for block in model.blocks:
        apply_block_forward(block, train.ac, train.compile)
    sharded = env.world_size > 1 and train.parallel == ParallelMode.fsdp
    if sharded:
        apply_fsdp(model, device, env, precision)
    materialize(model, device, train.seed)
    if env.world_size > 1 and train.parallel == ParallelMode.ddp:
        return apply_ddp(model, device)  # DDP needs real tensors: it broadcasts rank 0's (identical anyway)
    return model


def apply_block_forward(block: nn.Module, ac: ActivationCheckpointing, compile: bool) -> None:
    """Replace `block.forward` (on the instance) by activation checkpointing and/or torch.compile around the
    class's forward. Checkpointing goes inside the compiled function, so that compile sees the checkpointed
    region and applies the selective policy to its own graph. Dense blocks compile with fullgraph=True (a graph
    break is an error); MoE blocks may break where the expert loop needs per-expert sizes on the host."""
    if ac == ActivationCheckpointing.none and not compile:
        return
    assert isinstance(block, Block), type(block)
    eager = block.forward  # the class's forward, bound to this block
    train_forward: Callable[[torch.Tensor], Any] = eager
    if ac == ActivationCheckpointing.full:
        train_forward = functools.partial(_checkpointed, eager, None)
    elif ac == ActivationCheckpointing.selective:
        train_forward = functools.partial(_checkpointed, eager, SELECTIVE)
    if compile:
        train_forward = torch.compile(train_forward, fullgraph=not isinstance(block.mlp, MoE))

    def forward(x_BTD: torch.Tensor, ctx: Any = None) -> Any:
        # ctx: generation (KV cache, per-row positions): eager, like before any of this
        return train_forward(x_BTD) if ctx is None else eager(x_BTD, ctx)

    block.forward = forward


def _checkpointed(fn: Callable, context_fn: Callable | None, x_BTD: torch.Tensor) -> Any:
    """fn(x) under non-reentrant checkpointing: the RNG state is restored for the recompute, so dropout draws
    the same masks and the global stream afterwards is the one without checkpointing. Full checkpointing
    (`context_fn` None) passes no context_fn at all: torch.compile traces checkpoint only with a policy it can
    inline, and `noop_context_fn` (the default) named explicitly made dynamo fail ("checkpoint not implemented
    for SkipFunctionVariable context_fn")."""
    if context_fn is None:
        return checkpoint(fn, x_BTD, use_reentrant=False, preserve_rng_state=True)
    return checkpoint(fn, x_BTD, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn)


def apply_fsdp(model: Transformer, device: torch.device, env: DistEnv, precision: Precision) -> None:
    """FSDP2 in place: `fully_shard` on every block, then on the root (embeddings, final norm, W_ue). Parameters
    become DTensors sharded on dim 0. bf16: gathered and computed in bf16, gradients reduced in fp32 into the
    fp32 sharded master weights the optimizer updates (bf16 autocast still runs around the forward, so norms,
    softmax and the loss stay fp32 as in one process)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (env.world_size,))
    mp = MixedPrecisionPolicy()
    if precision == Precision.bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def materialize(model: Transformer, device: torch.device, seed: int) -> None:
    """Allocate every parameter and buffer on `device` (uninitialized) and initialize them from `seed`.
    `to_empty` swaps tensors into the existing Parameter objects, so tied weights stay tied and FSDP2 keeps
    the parameters it manages (without the swap, each owner of a tied weight would get its own new tensor)."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    model.init_weights(seed, write=write_full)


def write_full(param: nn.Parameter, value: torch.Tensor) -> None:
    """Put the full-size `value` into `param`; a sharded parameter keeps its own slice of it (every rank computed
    the same full tensor, so no communication: src_data_rank=None)."""
    if isinstance(param, DTensor):
        value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """A DistributedDataParallel wrapper; the given module keeps its plain parameters."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    # MoE layers may leave an expert without tokens on a rank: its weights get no gradient there
    unused = any(isinstance(m, MoE) for m in model.modules())
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
