"""Config -> components: the one builder. `build(cfg) -> Components` (model, optimizer, schedule, data, loader,
data-parallel wrapper, autocast) is called by the trainer, the benchmark and the tests alike; built-in and user
components (a `_target_` in their config node: config.ComponentConfig) go through the same door: the model's
attention and MLP in model.py, the optimizer in optim.build_optimizer.

Order (what parallelism needs): seed, data, model on the meta device, `parallelize` (activation checkpointing,
per-block compile, FSDP2 or DDP, then weights materialized on the device and initialized from train.seed,
identically for any number of ranks), the Hugging Face weights if asked, optimizer (after FSDP2 sharded the
parameters), schedule, loader. Not here: the loop (trainer.py), evaluation (evaluator.py), the run folder
(run_dir.py).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from scaletrain import distributed, export_hf, hardware
from scaletrain.config import Config, Precision, check_batch_split, load_config
from scaletrain.data import BatchLoader, MixtureLoader, PreparedData, prepare_data
from scaletrain.model import Transformer
from scaletrain.optim import build_optimizer, build_scheduler
from scaletrain.parallelize import parallelize

log = logging.getLogger("scaletrain")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_autocast(precision: Precision, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context the forward pass runs in: bf16 autocast, or nothing for fp32."""
    if precision == Precision.bf16:
        if device.type == "cpu" and not hardware.cpu_has_native_bf16():
            log.warning(
                "train.precision=bf16 on a CPU without AVX512-BF16/AMX (%s): bf16 matmuls take a slow "
                "fallback here (1/5 to 1/100 of fp32). Use train.precision=fp32 on this machine.",
                hardware.describe(device),
            )
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_model(cfg: Config, tokenizer_vocab: int) -> Transformer:
    """The configured model on the meta device (shapes only): `parallelize` materializes and initializes it."""
    vocab = cfg.model.vocab_size or tokenizer_vocab
    if vocab < tokenizer_vocab:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}")
    with torch.device("meta"):
        return Transformer(cfg.model, vocab, cfg.model.max_seq_len or cfg.data.seq_len, cfg.moe)


def load_init_from_hf(model: Transformer, folder: str) -> None:
    """model.init_from_hf, after `parallelize` materialized the model: the checkpoint's weights replace the initial
    ones. Under FSDP2 it loads into a whole copy on the CPU first (as every rank did before sharding existed
    here), and each rank keeps its shard of it."""
    if not distributed.is_sharded(model):
        export_hf.load_hf_into(model, folder)
        return
    with torch.device("meta"):
        whole = Transformer(model.cfg, model.vocab_size, model.max_seq_len)  # Llama-shaped: no MoE
    whole.to_empty(device="cpu")  # every weight is then overwritten by the checkpoint (a strict load)
    export_hf.load_hf_into(whole, folder)
    distributed.load_full_model_state(model, whole.state_dict())


def build_loader(
    streams: list[np.ndarray], weights: list[float], cfg: Config, dist: distributed.DistEnv, device: torch.device
) -> BatchLoader | MixtureLoader:
    """This rank's shard of every global batch: batch_size / world_size sequences, from one token stream, or
    from several with each row's source drawn by weight."""
    world, bs = dist.world_size, cfg.train.batch_size
    check_batch_split(bs, world, f"this process group ({dist.launcher})")
    common = dict(seed=cfg.train.seed, rank=dist.rank, world_size=world, pin_memory=device.type == "cuda")
    if len(streams) == 1:
        return BatchLoader(streams[0], bs // world, cfg.data.seq_len, **common)  # pyright: ignore[reportArgumentType]
    return MixtureLoader(streams, weights, bs // world, cfg.data.seq_len, **common)  # pyright: ignore[reportArgumentType]


@dataclass
class Components:
    """Everything a training step needs, built from one Config."""

    cfg: Config
    dist: distributed.DistEnv
    device: torch.device
    data: PreparedData | None  # None when built on given tokens (benchmark)
    model: Transformer  # the module itself: parameters, state dicts, MoE statistics (FSDP2 shards it in place)
    dp_model: nn.Module  # what a training forward calls: DDP(model), or model itself (FSDP2, one process)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # lambdas from the config, so a resumed run follows its own
    loader: BatchLoader | MixtureLoader
    precision: Precision  # train.precision resolved for this device (auto -> fp32 or bf16)
    autocast: Callable[[], contextlib.AbstractContextManager]


def build(
    cfg: Config | DictConfig,
    dist: distributed.DistEnv | None = None,
    device: torch.device | None = None,
    train_tokens: np.ndarray | None = None,
) -> Components:
    """Config -> components, in the order that parallelism needs: seed, data, model on the meta device,
    `parallelize` (activation checkpointing, per-block compile, FSDP2 or DDP, then weights materialized on the
    device and initialized from train.seed, identically for any number of ranks), optimizer (after FSDP2
    sharded the parameters), schedule, loader. `train_tokens` (benchmark): train on these instead of the
    configured data, with vocabulary model.vocab_size or data.tokenizer.vocab_size."""
    cfg = load_config(cfg)
    dist = dist or distributed.DistEnv(0, 1, 0, 1, "none")
    device = device or hardware.pick_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    export_hf.check_init_from_hf(cfg.model, cfg.moe)  # model.init_from_hf: a wrong folder fails before data work
    data = prepare_data(cfg.data) if train_tokens is None else None
    if data is not None:
        streams = [s.train.tokens for s in data.sources.values()]
        weights = [s.weight for s in data.sources.values()]
    else:
        assert train_tokens is not None
        streams, weights = [train_tokens], [1.0]
    precision, why = hardware.resolve_precision(cfg.train.precision, device)
    log.info("precision %s (%s)", precision, why)
    model = build_model(cfg, data.tokenizer.vocab_size if data is not None else cfg.data.tokenizer.vocab_size)
    dp_model = parallelize(model, cfg.train, device, dist, precision)
    if cfg.model.init_from_hf:  # the weights of a Hugging Face Llama checkpoint (shape checked against the config)
        load_init_from_hf(model, cfg.model.init_from_hf)
    optimizer = build_optimizer(model, cfg.optim, device.type)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    return Components(
        cfg,
        dist,
        device,
        data,
        model,
        dp_model,
        optimizer,
        scheduler,
        build_loader(streams, weights, cfg, dist, device),
        precision,
        make_autocast(precision, device),
    )
