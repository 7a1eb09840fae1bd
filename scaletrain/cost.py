"""What one optimizer step costs in FLOPs: the one formula the trainer (summary.json's `flops` and
`optimizer_flops`, MFU), the study's FLOPs budget (`study.match=flops`), sizing and the benchmark share.

  model      `Transformer.flops_per_token` (6 x the matmul weights a token passes through + attention) over the
             step's tokens (train.batch_size x data.seq_len x train.grad_accum, all ranks together)
  optimizer  Muon's Newton-Schulz iterations (`muon.newton_schulz_flops`); 0 for AdamW
Not here: the per-token count itself (model.py) and the Newton-Schulz count (muon.py), each next to what it counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config import Config
from scaletrain.model import Transformer
from scaletrain.muon import newton_schulz_flops


@dataclass(frozen=True)
class StepFlops:
    """Training FLOPs of one optimizer step."""

    flops_per_token: float  # the model's, per token (MoE: the active parameters only)
    tokens: int  # per optimizer step, all ranks
    optimizer: float  # the optimizer's own work per step (Muon's Newton-Schulz; 0 for AdamW)

    @property
    def model(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def total(self) -> float:
        """Model + optimizer: what `study.match=flops` equalizes across arms."""
        return self.model + self.optimizer


def tokens_per_step(cfg: Config) -> int:
    """Tokens of one optimizer step over every rank (train.batch_size is the global batch)."""
    return cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum


def step_flops(cfg: Config, model: Transformer | None = None) -> StepFlops:
    """FLOPs of one step of `cfg`, counted on `model` (built, sharded or on the meta device: the counts depend on
    shapes only); without one, on the configured model built on the meta device (`sizing.meta_model`)."""
    from scaletrain.sizing import meta_model  # sizing counts with this module

    model = meta_model(cfg) if model is None else model
    muon = getattr(cfg.optim, "muon", None)  # optim=muon: the Newton-Schulz FLOPs of each step
    optimizer = newton_schulz_flops(model, muon.ns_steps) if muon else 0.0
    return StepFlops(model.flops_per_token(cfg.data.seq_len), tokens_per_step(cfg), optimizer)
