"""Config schemas of the plugin: `optim=lion` and `model/attention=sliding_window`.

Defining a subclass of scaletrain's component bases is the registration: scaletrain imports the plugin, finds
these classes among the subclasses of `OptimConfig` / `AttentionConfig`, and stores them in Hydra's ConfigStore
as `optim/lion_schema` and `model/attention/sliding_window_schema`, which the YAML files under `conf/` name in
their defaults lists. `_target_` says which builder (optimizer) or module class (attention) scaletrain calls.

Here: fields, defaults and each value's own rule (errors start with the full key, as in scaletrain/config.py).
Not here: the components (lion.py, attention.py); scaletrain's base `__post_init__` imports a schema's
`_target_` to check that it exists, so validating a config does import them, and torch with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scaletrain.config import AttentionConfig, ConfigError, OptimConfig


@dataclass
class LionConfig(OptimConfig):
    """Lion (lion.py) on scaletrain's decay / no-decay groups; lr, weight_decay and schedule are inherited."""

    name: str = "lion"
    _target_: str = "scaletrain_lion.lion.build_lion"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: expected [beta1, beta2], each in [0, 1), got {list(self.betas)}")


@dataclass
class SlidingWindowConfig(AttentionConfig):
    """Causal attention limited to the last `window` positions (attention.py)."""

    name: str = "sliding_window"
    _target_: str = "scaletrain_lion.attention.SlidingWindowAttention"
    window: int = 64  # positions each query sees, itself included

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:  # window 0 would leave a query nothing to attend to (softmax over no keys: NaN)
            raise ConfigError(f"model.attention.window: must be >= 1 (the query itself), got {self.window}")
