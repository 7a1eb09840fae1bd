"""Hugging Face export and import (scaletrain/export_hf.py): an exported Llama-shaped model computes the same
next-token distributions in transformers, tied or untied, with or without grouped-query attention; every option
without a Llama equivalent is refused in one message; `model.init_from_hf` loads an export back exactly; a run
folder exports from another directory with its tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from scaletrain import export_hf
from scaletrain.build import build
from scaletrain.config import Activation, ConfigError, MLPConfig, ModelConfig, MoEConfig, Norm, load_config
from scaletrain.data.common import EOT
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.model import Transformer
from scaletrain.runs import load_run
from scaletrain.trainer import train

from .conftest import REPO, compose_cfg, tiny_overrides

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[dev]')")

VOCAB, T = 320, 64
TEXT = "Once upon a time, a little fox found a red ball in the garden. She was happy."


def llama_cfg(**overrides) -> ModelConfig:
    """A tiny Llama-shaped model. init_std 0.1 (not 0.02) so attention is sharp and depends on position: at
    0.02 the scores are nearly uniform and a wrong RoPE layout costs only ~5e-6 KL, which parity could miss.
    norm_eps and rope_theta differ from both codebases' defaults, so a value not carried over shows."""
    base: dict[str, Any] = dict(name="llama_tiny", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160)
    base |= dict(embed_proj=False, norm=Norm.rmsnorm, activation=Activation.swiglu)
    base |= dict(norm_eps=1e-4, rope_theta=1000.0, init_std=0.1)
    return ModelConfig(**(base | overrides))


def make_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg, VOCAB, T)
    with torch.no_grad():  # norm weights away from 1, so a norm mapped to the wrong place shows too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """The project's own byte-level BPE (as a run trains it), with <|endoftext|> as special id 0."""
    texts = [TEXT, "The dog ran to the park and played with a stick all day long."] * 20
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train_bpe(texts, VOCAB - 20).save(path)
    return path


def tokens(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(folder: Path, idx_BT: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hf.dtype == torch.float32
    with torch.no_grad():
        return hf(idx_BT).logits


def max_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """The largest KL(a || b) over positions between the next-token distributions, computed in fp64."""
    logp_a, logp_b = logits_a.double().log_softmax(-1), logits_b.double().log_softmax(-1)
    return float((logp_a.exp() * (logp_a - logp_b)).sum(-1).max())


def tolerance(logits: torch.Tensor) -> float:
    """Both sides compute in fp32 (unit roundoff u = 2^-24 = 6e-8) but round in different places: einsum vs
    nn.Linear projections, SDPA's GQA vs repeat_kv, RoPE tables built in fp64 vs angles t * inv_freq formed in
    fp32. The angles dominate: at position t < T = 64 an fp32 angle is off by up to ~2 * t * u = 8e-6 rad, a
    relative change of q and of k each; the ~10 roundings per layer, each a sum of at most d_ff = 160 terms, add
    ~L * 10 * sqrt(160) * u = 1.5e-5. About 3e-5 relative to the logits' scale; measured: ~6e-7."""
    return 4e-5 * float(logits.abs().max())


def export_model(model: Transformer, tokenizer_file: Path, out: Path, **kwargs) -> Path:
    return export_hf.export(model, tokenizer_file, out, **kwargs)


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_exported_model_gives_the_same_next_token_distributions_in_transformers(
    tied, n_kv_heads, tokenizer_file, tmp_path
):
    # dropout only acts in training: an exported model with it computes the same function in eval mode
    model = make_model(llama_cfg(tie_embeddings=tied, n_kv_heads=n_kv_heads, dropout=0.1, attn_dropout=0.1))
    out = export_model(model, tokenizer_file, tmp_path / "hf")
    saved = load_file(str(out / export_hf.WEIGHTS_FILE))
    assert ("lm_head.weight" in saved) is not tied  # tied: transformers re-ties lm_head to the embedding
    idx_BT = tokens()
    with torch.no_grad():
        ours_BTV = model(idx_BT).logits
    theirs_BTV = hf_logits(out, idx_BT)
    assert float((ours_BTV - theirs_BTV).abs().max()) <= tolerance(ours_BTV)
    assert max_kl(ours_BTV, theirs_BTV) < 1e-9


def test_without_the_qk_permutation_the_logits_differ_far_beyond_the_tolerance(tokenizer_file, tmp_path):
    """The guard on the parity test: the q/k rows left in scaletrain's interleaved-pair order (a forgotten
    permutation) must fail it by a wide margin, or that test could not tell."""
    model = make_model(llama_cfg())
    out = export_model(model, tokenizer_file, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    K = model.cfg.d_model // model.cfg.n_heads
    state = hf.state_dict()
    with torch.no_grad():
        for name, w in state.items():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                w.copy_(export_hf.halves_to_pairs(w.clone(), K))
    idx_BT = tokens()
    with torch.no_grad():
        ours_BTV, wrong_BTV = model(idx_BT).logits, hf(idx_BT).logits
    assert float((ours_BTV - wrong_BTV).abs().max()) > 100 * tolerance(ours_BTV)
    assert max_kl(ours_BTV, wrong_BTV) > 1e-4


def test_pairs_to_halves_moves_each_pair_to_row_i_and_i_plus_half_and_back():
    w_IJ = torch.arange(16.0)[:, None]  # two heads of K = 8 rows: head 0 rows 0..7, head 1 rows 8..15
    halves = export_hf.pairs_to_halves(w_IJ, 8)[:, 0].tolist()
    assert halves == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    assert torch.equal(export_hf.halves_to_pairs(export_hf.pairs_to_halves(w_IJ, 8), 8), w_IJ)


def test_exported_config_carries_the_shape_eps_theta_and_eos(tokenizer_file, tmp_path):
    model = make_model(llama_cfg(tie_embeddings=True))
    out = export_model(model, tokenizer_file, tmp_path / "hf")
    cfg = transformers.AutoConfig.from_pretrained(out)
    eot = Tokenizer.load(tokenizer_file).eot_id
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == ("llama", 64, 2, 160)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, VOCAB)
    assert cfg.rms_norm_eps == 1e-4 and cfg.rope_parameters["rope_theta"] == 1000.0
    assert cfg.tie_word_embeddings is True and cfg.eos_token_id == eot and cfg.max_position_embeddings == T


def test_bfloat16_export_stores_the_rounded_weights(tokenizer_file, tmp_path):
    model = make_model(llama_cfg())
    out = export_model(model, tokenizer_file, tmp_path / "hf", dtype=torch.bfloat16)
    saved, expected = load_file(str(out / export_hf.WEIGHTS_FILE)), export_hf.to_hf_state(model, torch.bfloat16)
    assert set(saved) == set(expected)
    assert all(saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], expected[k]) for k in saved)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_exported_tokenizer_loads_in_transformers_with_endoftext_as_eos(tokenizer_file, tmp_path):
    out = export_model(make_model(llama_cfg()), tokenizer_file, tmp_path / "hf")
    ours = Tokenizer.load(tokenizer_file)
    auto = transformers.AutoTokenizer.from_pretrained(out)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), eos_token=EOT)
    for tok in (auto, fast):
        assert tok.eos_token == EOT and tok.eos_token_id == ours.eot_id
        assert tok(TEXT).input_ids == ours.encode(TEXT)  # no BOS or other token added
        assert tok.decode(ours.encode(TEXT)) == TEXT


def test_export_refuses_a_folder_that_is_not_empty_and_leaves_nothing_behind(tokenizer_file, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(export_hf.ExportError, match="exists and is not an empty folder"):
        export_model(make_model(llama_cfg()), tokenizer_file, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and [p.name for p in out.iterdir()] == ["keep.txt"]


# ---------------------------------------------------------------- what is refused
NOT_LLAMA = {
    "embed_proj": ({"embed_proj": True}, "model.embed_proj=true (W_e projection)", "model.embed_proj=false"),
    "layernorm": ({"norm": Norm.layernorm}, "model.norm=layernorm", "model.norm=rmsnorm"),
    "relu": ({"activation": Activation.relu}, "model.activation=relu", "model.activation=swiglu"),
    "gelu": ({"activation": Activation.gelu}, "model.activation=gelu", "model.activation=swiglu"),
    "bias": ({"bias": True}, "model.bias=true", "model.bias=false"),
    "qk_norm": ({"qk_norm": True}, "model.qk_norm=true", "model.qk_norm=false"),
    # another MLP than the built-in (here nn.Identity, which takes any arguments: the block without an MLP), even
    # under the built-in's name and with model.activation=swiglu: one line, naming the target
    "mlp": ({"mlp": MLPConfig(_target_="torch.nn.Identity")}, "model.mlp=mlp (torch.nn.Identity)", "model/mlp=mlp"),
}


@pytest.mark.parametrize("case", list(NOT_LLAMA))
def test_an_option_without_a_llama_equivalent_fails_naming_it_and_the_value_needed(case, tokenizer_file, tmp_path):
    overrides, option, needed = NOT_LLAMA[case]
    with pytest.raises(export_hf.ExportError) as err:
        export_model(make_model(llama_cfg(**overrides)), tokenizer_file, tmp_path / "hf")
    message = str(err.value)
    assert message.startswith("cannot export to the Hugging Face Llama format")
    assert option in message and f"needs {needed}" in message and message.count("\n") == 1  # one line: this one
    assert not (tmp_path / "hf").exists()


def test_a_moe_model_and_several_options_at_once_fail_in_one_message(tokenizer_file, tmp_path):
    cfg = llama_cfg(embed_proj=True, norm=Norm.layernorm)
    model = Transformer(cfg, VOCAB, T, MoEConfig(name="moe", n_experts=4, top_k=2))
    with pytest.raises(export_hf.ExportError) as err:
        export_model(model, tokenizer_file, tmp_path / "hf")
    lines = str(err.value).splitlines()[1:]
    assert [line.split()[0] for line in lines] == [
        "model.embed_proj=true",
        "model.norm=layernorm",
        "moe.n_experts=4",
    ]
    assert "needs moe=none" in lines[2]


# ---------------------------------------------------------------- model.init_from_hf
def test_init_from_hf_round_trip_gives_identical_logits(tokenizer_file, tmp_path):
    for tied in (False, True):
        model = make_model(llama_cfg(tie_embeddings=tied))
        out = export_model(model, tokenizer_file, tmp_path / f"hf_{tied}")
        fresh = make_model(llama_cfg(tie_embeddings=tied), seed=1)
        export_hf.load_hf_into(fresh, out)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
        if tied:
            assert fresh.W_ue.weight is fresh.tok_emb.weight  # still one tensor after loading
        idx_BT = tokens()
        with torch.no_grad():
            assert torch.equal(model(idx_BT).logits, fresh.eval()(idx_BT).logits)


def test_init_from_hf_of_another_shape_lists_every_differing_field(tokenizer_file, tmp_path):
    out = export_model(make_model(llama_cfg()), tokenizer_file, tmp_path / "hf")
    other = make_model(llama_cfg(d_model=32, n_layers=3, n_kv_heads=None, tie_embeddings=True, rope_theta=1e4))
    with pytest.raises(export_hf.ExportError) as err:
        export_hf.load_hf_into(other, out)
    message = str(err.value)
    assert message.startswith(f"model.init_from_hf: {out / 'config.json'} does not match the configured model")
    assert [line.strip() for line in message.splitlines()[1:]] == [
        "hidden_size=64 (model.d_model=32 here): set model.d_model=64",
        "num_hidden_layers=2 (model.n_layers=3 here): set model.n_layers=2",
        "num_key_value_heads=2 (model.n_kv_heads=4 here): set model.n_kv_heads=2",
        "tie_word_embeddings=false (model.tie_embeddings=true here): set model.tie_embeddings=false",
        "rope_theta=1000.0 (model.rope_theta=10000.0 here): set model.rope_theta=1000.0",
        "head_dim=16: scaletrain's Llama shape needs 8",
    ]


# meta-llama/Llama-2-7b-hf's config.json (public), as transformers 4.31 wrote it: no rope_theta (10000 by default)
LLAMA_2_7B_HF = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "vocab_size": 32000,
}


def test_model_llama_7b_takes_llama_2_7b_hf_and_exports_its_config():
    cfg = load_config(compose_cfg(["model=llama_7b"]))
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = Transformer(cfg.model, 32000, 4096)
    assert export_hf.hf_mismatches(LLAMA_2_7B_HF, model) == []
    exported = export_hf.llama_config(model, eos_id=2)
    # all but what this export writes differently on purpose: no bos (documents only end), fp32, no legacy keys
    shared = [k for k in LLAMA_2_7B_HF if k not in ("bos_token_id", "torch_dtype", "pretraining_tp", "rope_scaling")]
    assert {k: exported[k] for k in shared} == {k: LLAMA_2_7B_HF[k] for k in shared}


def test_init_from_hf_refuses_another_architecture_and_a_non_llama_model(tokenizer_file, tmp_path):
    out = export_model(make_model(llama_cfg()), tokenizer_file, tmp_path / "hf")
    hf_cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(hf_cfg | {"model_type": "mistral", "hidden_act": "gelu"}))
    with pytest.raises(export_hf.ExportError) as err:
        export_hf.load_hf_into(make_model(llama_cfg()), out)
    assert [line.strip() for line in str(err.value).splitlines()[1:]] == [
        'model_type="mistral": scaletrain\'s Llama shape needs "llama"',
        'hidden_act="gelu": scaletrain\'s Llama shape needs "silu"',
    ]
    with pytest.raises(export_hf.ExportError, match=r"cannot hold a Hugging Face Llama checkpoint:\n  model.qk_norm"):
        export_hf.load_hf_into(make_model(llama_cfg(qk_norm=True)), out)


def test_init_from_hf_refuses_weights_that_are_missing_or_of_another_shape(tokenizer_file, tmp_path):
    out = export_model(make_model(llama_cfg()), tokenizer_file, tmp_path / "hf")
    weights = load_file(str(out / export_hf.WEIGHTS_FILE))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(out / export_hf.WEIGHTS_FILE))
    with pytest.raises(export_hf.ExportError, match=r"lacks 1 tensor\(s\) .*'model.layers.1.mlp.up_proj.weight'"):
        export_hf.load_hf_into(make_model(llama_cfg()), out)
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(160, 32)
    save_file(weights, str(out / export_hf.WEIGHTS_FILE))
    with pytest.raises(
        export_hf.ExportError, match=r"1 tensor\(s\) .*blocks.1.mlp.w_in.weight \(160, 32\) \(model: \(160, 64\)\)"
    ):
        export_hf.load_hf_into(make_model(llama_cfg()), out)


def test_init_from_hf_folder_must_exist_and_hold_config_and_safetensors(tokenizer_file, tmp_path):
    with pytest.raises(ConfigError, match="model.init_from_hf: .*nowhere is not a folder"):
        export_hf.check_hf_dir(tmp_path / "nowhere")
    out = export_model(make_model(llama_cfg()), tokenizer_file, tmp_path / "hf")
    (out / "model.safetensors").rename(tmp_path / "weights.safetensors")
    with pytest.raises(ConfigError, match=r"model.init_from_hf: .*hf has no \*.safetensors weights"):
        export_hf.check_hf_dir(out)
    (out / "config.json").unlink()
    with pytest.raises(ConfigError, match="model.init_from_hf: .*hf has no config.json"):
        export_hf.check_hf_dir(out)
    with pytest.raises(ConfigError, match="model.init_from_hf: empty; use null"):
        llama_cfg(init_from_hf=" ")


LLAMA_RUN = {  # model=tiny made Llama-shaped: d 128, 2 layers, 4 heads sharing 2 key/value heads, SwiGLU 512
    "model.embed_proj": "false",
    "model.norm": "rmsnorm",
    "model.activation": "swiglu",
    "model.n_kv_heads": 2,
}


def test_build_with_init_from_hf_starts_from_the_checkpoint_and_checks_the_folder_first(tokenizer_file, tmp_path):
    """trainer.build (the one builder) with model.init_from_hf: the weights are the export's, exactly. The
    benchmark path (given tokens) needs no data preparation, so this stays fast."""
    cfg = compose_cfg(
        tiny_overrides(tmp_path / "no_data", tmp_path / "cache", **LLAMA_RUN, **{"model.vocab_size": 512})
    )
    train_tokens = np.arange(4096, dtype=np.uint16) % 512  # the benchmark path: no data preparation
    source = build(cfg, train_tokens=train_tokens).model
    out = export_model(source, tokenizer_file, tmp_path / "hf")
    cfg.model.init_from_hf = str(out)
    cfg.train.seed = 7  # a different random init, replaced by the checkpoint's weights
    built = build(cfg, train_tokens=train_tokens).model
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), built.state_dict().values()))
    cfg.model.init_from_hf = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="model.init_from_hf: .*missing is not a folder"):
        build(cfg)  # before any data work: data.path does not exist either


# ---------------------------------------------------------------- from a run folder
@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tinystories_dir, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("llama_run") / "run"
    extra = {**LLAMA_RUN, "train.max_steps": 4, "train.eval_every": 4, "train.ckpt_every": 2}
    train(compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra)), run_dir)
    return run_dir


@pytest.mark.slow
def test_a_run_folder_exports_from_another_directory_and_matches_in_transformers(llama_run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "scaletrain.export_hf", str(llama_run), "hf"]
    done = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = elsewhere / "hf"
    run = load_run(llama_run)
    text = run.tokenizer.encode(TEXT)
    idx_BT = torch.tensor([text[:32], text[-32:]])
    with torch.no_grad():
        ours_BTV = run.model(idx_BT).logits
    theirs_BTV = hf_logits(out, idx_BT)
    assert float((ours_BTV - theirs_BTV).abs().max()) <= tolerance(ours_BTV)
    assert max_kl(ours_BTV, theirs_BTV) < 1e-9
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(TEXT).input_ids == text and tok.eos_token_id == run.tokenizer.eot_id


@pytest.mark.slow
def test_a_checkpoint_exports_its_own_weights_and_a_bad_source_fails_cleanly(llama_run, tmp_path, capsys):
    step2 = llama_run / "checkpoints" / "step_0000002.pt"
    assert export_hf.main([str(step2), str(tmp_path / "hf")]) == 0
    saved = load_file(str(tmp_path / "hf" / export_hf.WEIGHTS_FILE))
    expected = export_hf.to_hf_state(load_run(llama_run, step2).model)
    assert set(saved) == set(expected) and all(torch.equal(saved[k], expected[k]) for k in saved)
    assert export_hf.main([str(tmp_path), str(tmp_path / "hf2")]) == 2
    assert "export error: " in capsys.readouterr().err and not (tmp_path / "hf2").exists()
