"""A run folder as a self-contained artifact: its resolved config (config.json), its tokenizer (tokenizer.json)
and its final weights (model.pt) load from any working directory, with no data preparation. The `sample` and
`eval` commands start here.

`load_run(run_dir, checkpoint=None)` -> `LoadedRun` (typed Config, Transformer in eval mode with the weights,
Tokenizer, step). Weights come from the run's model.pt (written when the run finished), or from a given
checkpoint of either format (a step_*.pt file or a sharded step_* folder); all are verified against their
checksums. A run that has not finished names its checkpoints instead of guessing one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf, open_dict

from scaletrain import checkpoint as ckpt
from scaletrain import records
from scaletrain.compose import compose
from scaletrain.config import BadInput, Config, ConfigError, SourceConfig, load_config
from scaletrain.data import Tokenizer
from scaletrain.model import Transformer


class RunFolderError(BadInput, ValueError):
    """A folder that is not (or not yet) a usable run: the message names the file missing and what to do."""

    kind = "run folder"


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: Config
    model: Transformer
    tokenizer: Tokenizer
    step: int
    weights: Path  # the file or folder the weights came from


def config_of_run(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The run's config.json as a typed Config, with `overrides` applied: `data=<option>` replaces the run's
    data section by that option's (composed from conf/, as the run command would), `key=value` sets one key."""
    path = Path(run_dir) / records.CONFIG_FILE
    if not path.is_file():
        raise RunFolderError(f"{path} not found: {run_dir} is not a scaletrain run folder")
    saved: dict[str, Any] = json.loads(path.read_text())
    overrides = list(overrides or [])
    choice = [o for o in overrides if o.startswith("data=")]
    keys = [o for o in overrides if not o.startswith("data=")]
    # the run's component options (their schemas type the saved keys); a run from before model/attention or
    # model/mlp: the built-in sdpa / mlp
    attention = saved["model"].get("attention", {}).get("name", "sdpa")
    mlp = saved["model"].get("mlp", {}).get("name", "mlp")
    components = [f"optim={saved['optim']['name']}", f"model/attention={attention}", f"model/mlp={mlp}"]
    base = compose(["~local", *components, *choice])
    if choice:  # the chosen data option's section, as composed
        saved = {k: v for k, v in saved.items() if k != "data"}
    else:  # the run's own sources exactly: drop the default option's others, add the run's (typed) by name
        with open_dict(base):
            for name in [n for n in base.data.sources if n not in saved["data"]["sources"]]:
                del base.data.sources[name]
            for name in [n for n in saved["data"]["sources"] if n not in base.data.sources]:
                base.data.sources[name] = SourceConfig()  # a mixture's `reasoning`, a hub source's own name
    try:
        merged = OmegaConf.merge(base, saved, OmegaConf.from_dotlist(keys))
    except Exception as err:  # an unknown key or a wrong type: OmegaConf names the key
        raise ConfigError(str(err).split("\n")[0]) from None
    return load_config(merged)  # pyright: ignore[reportArgumentType]


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu") -> LoadedRun:
    run_dir = Path(run_dir)
    cfg = config_of_run(run_dir)
    tok_path = run_dir / records.TOKENIZER_FILE
    if not tok_path.is_file():
        raise RunFolderError(f"{tok_path} not found: the run folder lacks its tokenizer (written at the run's start)")
    tokenizer = Tokenizer.load(tok_path)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    model = Transformer(cfg.model, vocab, cfg.model.max_seq_len or cfg.data.seq_len, cfg.moe)
    weights = Path(checkpoint) if checkpoint else run_dir / records.MODEL_FILE
    if checkpoint is None and not weights.is_file():
        found = records.list_checkpoints(run_dir / records.CKPT_DIR)
        hint = f"; its newest checkpoint: --checkpoint {found[-1]}" if found else " and has no checkpoint"
        raise RunFolderError(f"{weights} not found: the run has not finished{hint}")
    if ckpt.is_sharded_checkpoint(weights):
        state = ckpt.load_checkpoint(weights)  # verifies every file
        optimizer = torch.optim.AdamW(model.parameters())  # DCP reads the optimizer part too; discarded
        ckpt.load_sharded_state(weights, model, optimizer)
    else:
        state = ckpt.load_checkpoint(weights)
        model.load_state_dict(state["model"])
    model.to(device).eval()
    return LoadedRun(run_dir, cfg, model, tokenizer, int(state.get("step", 0)), weights)
