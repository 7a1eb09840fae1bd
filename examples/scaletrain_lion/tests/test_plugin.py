"""The plugin as scaletrain sees it: schemas registered by import, the YAML options composed and validated on the
command line's path, the builder and the attention class built from them, and the sliding-window model against
the built-in attention and against its own cached decoding.

Model comparisons run in fp64 (eps 2.2e-16) with O(1) activations through 2 tiny layers: two attention kernels
summing in different orders differ by a few eps per op, so logits agree to ~1e-13; atol = rtol = 1e-10 keeps a
1000x margin and still fails on any masking error (one key in or out of the window moves logits by > 0.1 here).
"""

import pytest
import torch
from omegaconf import OmegaConf
from scaletrain.compose import compose
from scaletrain.config import AttentionConfig, ConfigError, OptimConfig, component_schemas, load_config
from scaletrain.generate import KVCache
from scaletrain.model import Transformer
from scaletrain.optim import build_optimizer

from scaletrain_lion.attention import SlidingWindowAttention
from scaletrain_lion.lion import Lion
from scaletrain_lion.schemas import LionConfig, SlidingWindowConfig

ATOL = RTOL = 1e-10
TINY = ["debug=cpu_tiny", "~local"]  # scaletrain's tiny CPU settings, without this machine's local file


def test_importing_the_plugin_registers_both_schemas_with_scaletrain():
    assert component_schemas(OptimConfig)["lion"] is LionConfig
    assert component_schemas(AttentionConfig)["sliding_window"] is SlidingWindowConfig


def test_out_of_range_values_fail_naming_their_key():
    with pytest.raises(ConfigError, match=r"^optim\.betas: "):
        LionConfig(betas=[0.9, 1.0])
    with pytest.raises(ConfigError, match=r"^model\.attention\.window: "):
        SlidingWindowConfig(window=0)


def test_command_line_options_compose_into_the_plugin_schemas(plugin_env):
    cfg = load_config(compose([*TINY, "optim=lion", "model/attention=sliding_window", "model.attention.window=32"]))
    assert isinstance(cfg.optim, LionConfig) and isinstance(cfg.model.attention, SlidingWindowConfig)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas) == (5.0e-3, 1.0, [0.9, 0.99])  # lr: cpu_tiny's
    assert cfg.model.attention.window == 32


def test_shipped_yaml_values_are_the_documented_defaults(plugin_env):
    lion = OmegaConf.to_container(compose(["~local", "optim=lion"]).optim)
    assert isinstance(lion, dict)
    assert (lion["lr"], lion["weight_decay"], lion["betas"]) == (1.0e-4, 1.0, [0.9, 0.99])
    assert compose(["~local", "model/attention=sliding_window"]).model.attention.window == 64


def tiny_models(window: int) -> tuple[Transformer, Transformer]:
    """The tiny model with sliding-window attention and, with the same weights, with scaletrain's SDPA."""
    cfg = load_config(compose([*TINY, "model/attention=sliding_window", f"model.attention.window={window}"]))
    base = load_config(compose(TINY))
    torch.manual_seed(0)
    sliding = Transformer(cfg.model, vocab_size=64, max_seq_len=32).double().eval()
    sdpa = Transformer(base.model, vocab_size=64, max_seq_len=32).double().eval()
    sdpa.load_state_dict(sliding.state_dict())  # the window adds no parameters: same keys
    return sliding, sdpa


def test_the_builder_returns_lion_over_scaletrain_decay_groups(plugin_env):
    cfg = load_config(compose([*TINY, "optim=lion"]))
    model = Transformer(cfg.model, vocab_size=64, max_seq_len=32)
    opt = build_optimizer(model, cfg.optim, "cpu")
    assert isinstance(opt, Lion) and [g["group"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]
    assert all(g["betas"] == (0.9, 0.99) and g["lr"] == cfg.optim.lr for g in opt.param_groups)


def test_a_window_covering_the_context_gives_the_builtin_attention_logits(plugin_env):
    sliding, sdpa = tiny_models(window=32)
    assert all(isinstance(b.attn, SlidingWindowAttention) for b in sliding.blocks)
    idx_BT = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sliding(idx_BT).logits, sdpa(idx_BT).logits, atol=ATOL, rtol=RTOL)


def test_a_short_window_changes_only_positions_past_it(plugin_env):
    sliding, sdpa = tiny_models(window=4)
    idx_BT = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    ours_BTV, full_BTV = sliding(idx_BT).logits, sdpa(idx_BT).logits
    # positions 0..3 see all their past; every later one sees less
    torch.testing.assert_close(ours_BTV[:, :4], full_BTV[:, :4], atol=ATOL, rtol=RTOL)
    assert (ours_BTV[:, 4:] - full_BTV[:, 4:]).abs().amax(dim=-1).min() > 1e-6


def test_cached_decoding_with_left_padding_equals_the_training_forward(plugin_env):
    """Row 0: 10 tokens; row 1: its last 7 behind 3 padding slots, so its window must count from its own first
    token. Each row's prefill (6 slots) and 4 cached steps give the logits its own unpadded forward gives."""
    sliding, _ = tiny_models(window=4)
    row = torch.randint(0, 64, (10,), generator=torch.Generator().manual_seed(2))
    ref0_TV, ref1_TV = sliding(row[None]).logits[0], sliding(row[None, 3:]).logits[0]
    idx_BT = torch.stack([row[:6], torch.cat([torch.zeros(3, dtype=row.dtype), row[3:6]])])
    G, K = sliding.cfg.n_kv_heads or sliding.cfg.n_heads, sliding.cfg.d_model // sliding.cfg.n_heads
    cache = KVCache(len(sliding.blocks), torch.tensor([0, 3]), G, 10, K, torch.float64)
    prefill_BTV = sliding(idx_BT, cache=cache).logits
    steps_BTV = torch.stack([sliding(row[t].repeat(2, 1), cache=cache).logits[:, 0] for t in range(6, 10)], dim=1)
    torch.testing.assert_close(torch.cat([prefill_BTV[0], steps_BTV[0]]), ref0_TV, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat([prefill_BTV[1, 3:], steps_BTV[1]]), ref1_TV, atol=ATOL, rtol=RTOL)
