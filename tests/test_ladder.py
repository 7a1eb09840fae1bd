"""The model ladder: every preset composes and builds (on the meta device: no weights allocated), llama_7b has
Llama 2 7B's exact parameter count, grouped-query attention equals multi-head attention with each key/value
head repeated, `embed_proj=false` removes W_e, and the model owns its context length."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config import ConfigError, ModelConfig, load_config
from scaletrain.generate import complete
from scaletrain.model import Transformer

from .conftest import compose_cfg

# parameters of each preset, embeddings included (tied ones once). llama_7b and dense_1b are Llama 2 7B's and
# TinyLlama 1.1B's published counts; the GPT-2 small/medium shapes count as scaletrain builds them (RoPE, no
# biases, a W_e projection, the vocabulary padded to 50304)
LADDER = {
    "tiny": None,
    "small_5m": None,
    "baseline_10m": None,
    "dense_124m": 124_177_152,
    "dense_350m": 354_599_936,
    "dense_1b": 1_100_048_384,
    "llama_7b": 6_738_415_616,
    "moe_8x": None,
    "moe_124m_8x": None,
    "moe_1b_fine": None,
}


def build_on_meta(model: str) -> Transformer:
    cfg = load_config(compose_cfg([f"model={model}", "~local"]))
    with torch.device("meta"):
        return Transformer(cfg.model, cfg.model.vocab_size or 4096, cfg.model.max_seq_len or cfg.data.seq_len, cfg.moe)


@pytest.mark.parametrize("model", list(LADDER))
def test_every_preset_builds_on_the_meta_device_with_its_documented_size(model):
    m = build_on_meta(model)
    assert all(p.is_meta for p in m.parameters())
    counts = m.param_counts()
    if LADDER[model] is not None:
        assert counts["total"] == LADDER[model]
    if model.startswith("moe"):
        assert counts["active"] < counts["total"]


def test_llama_7b_is_llama_2_7b_shape_with_no_w_e_and_its_own_context():
    m = build_on_meta("llama_7b")
    assert isinstance(m.W_e, torch.nn.Identity) and m.max_seq_len == 4096
    assert m.param_counts()["total"] == 6_738_415_616
    attn = m.blocks[0].attn
    assert (attn.wq.weight.shape, attn.wk.weight.shape) == ((4096, 4096), (4096, 4096))


def test_dense_1b_shares_each_key_value_head_among_eight_query_heads():
    attn = build_on_meta("dense_1b").blocks[0].attn
    assert (attn.n_heads, attn.n_kv_heads) == (32, 4)
    assert attn.wk.weight.shape == attn.wv.weight.shape == (4 * 64, 2048)


def _pair(n_kv_heads: int):
    """A GQA model and the multi-head model equal to it: each key/value head's rows repeated for its queries."""
    base = dict(name="t", d_model=32, n_layers=2, n_heads=4, d_ff=64, norm="rmsnorm", activation="swiglu")
    torch.manual_seed(0)
    gqa = Transformer(ModelConfig(**base, n_kv_heads=n_kv_heads), 50, 16)  # pyright: ignore[reportArgumentType]
    mha = Transformer(ModelConfig(**base), 50, 16)  # pyright: ignore[reportArgumentType]
    state = gqa.state_dict()
    rep = 4 // n_kv_heads
    for key, value in list(state.items()):
        if key.endswith(("attn.wk.weight", "attn.wv.weight")):
            state[key] = value.view(n_kv_heads, 8, 32).repeat_interleave(rep, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    return gqa.eval(), mha.eval()


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_grouped_query_attention_equals_multi_head_attention_with_repeated_key_value_heads(n_kv_heads):
    gqa, mha = _pair(n_kv_heads)
    assert sum(p.numel() for p in gqa.parameters()) < sum(p.numel() for p in mha.parameters())
    x = torch.randint(0, 50, (3, 16))
    # the same products in both; SDPA may take another kernel for enable_gqa, so only the order of the
    # length-8 (head_dim) and length-16 (keys) fp32 sums can differ: ~sqrt(16) * 2^-24 relative per logit
    torch.testing.assert_close(gqa(x).logits, mha(x).logits, rtol=1e-5, atol=1e-5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    cached = complete(gqa, prompts, 6)
    assert cached == complete(gqa, prompts, 6, use_cache=False) == complete(mha, prompts, 6)


def test_without_embed_proj_the_embedding_feeds_the_blocks_and_w_e_has_no_parameters():
    cfg = ModelConfig(name="t", d_model=16, n_layers=1, n_heads=2, d_ff=32, embed_proj=False)
    with_proj = ModelConfig(name="t", d_model=16, n_layers=1, n_heads=2, d_ff=32)
    a, b = Transformer(cfg, 20, 8), Transformer(with_proj, 20, 8)
    assert a.param_counts()["total"] == b.param_counts()["total"] - 16 * 16
    assert "W_e.weight" not in a.state_dict()
    with pytest.raises(ConfigError, match="model.embed_proj: false needs n_embed null or = d_model"):
        ModelConfig(name="t", d_model=16, n_layers=1, n_heads=2, d_ff=32, embed_proj=False, n_embed=8)


def test_the_model_owns_its_context_and_data_windows_may_not_exceed_it():
    with pytest.raises(
        ConfigError, match=r"data.seq_len: 512 is longer than the model's context model.max_seq_len=256"
    ):
        load_config(compose_cfg(["model=tiny", "model.max_seq_len=256", "data.seq_len=512", "~local"]))
    with pytest.raises(ConfigError, match=r"model.n_kv_heads: must divide n_heads=4"):
        load_config(compose_cfg(["model=tiny", "model.n_kv_heads=3", "~local"]))
    cfg = load_config(compose_cfg(["model=tiny", "model.max_seq_len=512", "data.seq_len=128", "~local"]))
    assert cfg.model.max_seq_len == 512 and cfg.data.seq_len == 128


def test_a_llama_shaped_tiny_model_trains_and_resumes_exactly(tmp_path, tinystories_dir, data_cache):
    """GQA, no W_e, RMSNorm, SwiGLU and its own context through the trainer: a run resumed from its step-4
    checkpoint in another folder trains steps 5..8 exactly as the uninterrupted run did."""
    from scaletrain.trainer import train

    from .conftest import tiny_overrides, train_losses

    shape = {
        "model.n_kv_heads": 1,
        "model.embed_proj": "false",
        "model.norm": "rmsnorm",
        "model.activation": "swiglu",
        "model.max_seq_len": 128,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.ckpt_every": 4,
        "train.max_steps": 8,
    }
    train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **shape)), tmp_path / "a")
    step4 = tmp_path / "a" / "checkpoints" / "step_0000004.pt"
    train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **shape, **{"train.resume": step4})), tmp_path / "b")
    first, resumed = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(first) == 8 and resumed == {step: first[step] for step in (5, 6, 7, 8)}
