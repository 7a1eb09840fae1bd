"""Hugging Face Llama format, both ways: export a run's weights, and start a training from a Llama checkpoint.

`python -m scaletrain.export_hf RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype bfloat16]` (console script
`scaletrain-export-hf`) writes `model.safetensors`, `config.json` (a LlamaConfig) and the run's tokenizer
(`tokenizer.json` + `tokenizer_config.json`, `<|endoftext|>` as eos), so that
`transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)` load it.
`model.init_from_hf=DIR` is the reverse: `load_hf_into(model, DIR)` (called by `trainer.build` once `parallelize`
has materialized the model; a sharded parameter keeps its own slice) replaces the initial weights with a Llama
checkpoint of the configured shape, after comparing its config.json with the configured model field by field.

Only the Llama shape maps: `unsupported()` lists every option that has no Llama equivalent (W_e projection,
LayerNorm, ReLU/GELU MLP, MoE, biases, qk-norm, a plugin's attention or MLP) with the value the format needs.
Dropout is a training-time setting and does not change the exported function. What makes the two models compute
the same function:
- RoPE. scaletrain rotates interleaved pairs (x0, x1), (x2, x3), ... of each head; Hugging Face's Llama rotates
  the halves (x_i, x_{i+K/2}) by the same frequency i. Permuting the rows of wq and wk within each head, pair
  element 0 of pair i to row i and element 1 to row i + K/2, makes the two rotations the same; attention scores
  are dot products of q and k, so permuting both the same way changes nothing else. v and wo are not permuted.
- Everything else matches one to one: RMSNorm (eps = model.norm_eps, fp32 math, weight after normalising),
  silu(gate) * up, scores scaled by 1/sqrt(K), key/value head g serving query heads g*H/G .. (g+1)*H/G - 1
  (SDPA's enable_gqa and HF's repeat_kv), no embedding scale, rope theta, tied or untied W_ue.
Not here: other HF architectures (Mistral's sliding window, Llama 3's rope scaling, ...) are refused, not mapped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from scaletrain import records
from scaletrain.config import (
    Activation,
    AttentionConfig,
    BadInput,
    ConfigError,
    MLPConfig,
    ModelConfig,
    MoEConfig,
    Norm,
)
from scaletrain.data.common import EOT
from scaletrain.model import Transformer
from scaletrain.moe import moe_layers
from scaletrain.parallelize import write_full

WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"
_EXPORT = "cannot export to the Hugging Face Llama format"
_NOT_LLAMA = "model.init_from_hf: the configured model cannot hold a Hugging Face Llama checkpoint"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(BadInput, ValueError):
    """The model or folder cannot be mapped to or from the Llama format; the message says what to change."""

    kind = "export"


# ---------------------------------------------------------------- what maps
def unsupported(cfg: ModelConfig, moe: MoEConfig | None = None) -> list[str]:
    """One line per option without a Llama equivalent, naming the value the format needs ([] = it maps).
    Every ModelConfig field not named here maps (sizes, n_kv_heads, norm_eps, rope_theta, tie_embeddings,
    max_seq_len, vocab_size, init_std) or does not change the function at inference (dropout, attn_dropout)."""
    no = "has no Llama equivalent; needs"
    problems = []
    if cfg.embed_proj:
        problems.append(f"model.embed_proj=true (W_e projection) {no} model.embed_proj=false")
    if cfg.norm != Norm.rmsnorm:
        problems.append(f"model.norm={cfg.norm} {no} model.norm=rmsnorm")
    builtin_mlp = cfg.mlp._target_ == MLPConfig._target_  # model.activation is the built-in MLP's setting
    if builtin_mlp and cfg.activation != Activation.swiglu:
        problems.append(f"model.activation={cfg.activation} (a 2-layer MLP) {no} model.activation=swiglu")
    if cfg.bias:
        problems.append(f"model.bias=true (biases in every projection) {no} model.bias=false")
    if cfg.qk_norm:
        problems.append(f"model.qk_norm=true (RMSNorm on q and k) {no} model.qk_norm=false")
    if moe is not None and moe.n_experts > 0:
        problems.append(f"moe.n_experts={moe.n_experts} (MoE layers) {no} moe=none (moe.n_experts=0)")
    if cfg.attention._target_ != AttentionConfig._target_:  # a plugin's attention computes something else
        problems.append(
            f"model.attention={cfg.attention.name} ({cfg.attention._target_}) {no} model/attention=sdpa "
            "(Llama's causal softmax attention)"
        )
    if not builtin_mlp:  # a plugin's MLP: other parameters, another function
        problems.append(
            f"model.mlp={cfg.mlp.name} ({cfg.mlp._target_}) {no} model/mlp=mlp (Llama's SwiGLU MLP, with "
            "model.activation=swiglu)"
        )
    return problems


def check_supported(model: Transformer | ModelConfig, moe: MoEConfig | None = None, doing: str = _EXPORT) -> None:
    """ExportError listing every problem at once. For a built model the MoE layers are found in the model."""
    if isinstance(model, Transformer):
        layers = moe_layers(model)
        moe = MoEConfig(n_experts=layers[0].n_experts, top_k=layers[0].top_k) if layers else None
    problems = unsupported(model.cfg if isinstance(model, Transformer) else model, moe)
    if problems:
        raise ExportError(f"{doing}:\n  " + "\n  ".join(problems))


def llama_config(model: Transformer, eos_id: int | None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json of `model` as a LlamaConfig. The rope theta is written both as transformers 5 reads it
    (rope_parameters) and as 4.x does (rope_theta); each version ignores the other's key."""
    cfg = model.cfg
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.attn_dropout,
        "initializer_range": cfg.init_std,
        "bos_token_id": None,  # documents are separated by <|endoftext|> only; nothing marks a start
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": dtype_name,  # transformers >= 4.56
        "torch_dtype": dtype_name,  # older readers
    }


# ---------------------------------------------------------------- weights
def pairs_to_halves(w_IJ: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q or k projection, head by head, from interleaved pairs (x0, x1, x2, x3, ...) to halves
    (x0, x2, ..., x1, x3, ...): row i of a head takes pair i's first element, row i + K/2 its second."""
    return w_IJ.unflatten(0, (-1, head_dim // 2, 2)).transpose(1, 2).flatten(0, 2)


def halves_to_pairs(w_IJ: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `pairs_to_halves`."""
    return w_IJ.unflatten(0, (-1, 2, head_dim // 2)).transpose(1, 2).flatten(0, 2)


def _names(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(scaletrain name, Hugging Face name, rotated by RoPE) of every tensor; W_ue only when untied."""
    names = [("tok_emb.weight", "model.embed_tokens.weight", False)]
    for i in range(cfg.n_layers):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        names += [
            (ours + "attn_norm.weight", hf + "input_layernorm.weight", False),
            (ours + "attn.wq.weight", hf + "self_attn.q_proj.weight", True),
            (ours + "attn.wk.weight", hf + "self_attn.k_proj.weight", True),
            (ours + "attn.wv.weight", hf + "self_attn.v_proj.weight", False),
            (ours + "attn.wo.weight", hf + "self_attn.o_proj.weight", False),
            (ours + "mlp_norm.weight", hf + "post_attention_layernorm.weight", False),
            (ours + "mlp.w_gate.weight", hf + "mlp.gate_proj.weight", False),  # silu(gate) * up
            (ours + "mlp.w_in.weight", hf + "mlp.up_proj.weight", False),
            (ours + "mlp.w_out.weight", hf + "mlp.down_proj.weight", False),
        ]
    names.append(("final_norm.weight", "model.norm.weight", False))
    if not cfg.tie_embeddings:  # tied: Hugging Face re-ties lm_head to the embedding when it loads
        names.append(("W_ue.weight", "lm_head.weight", False))
    return names


def to_hf_state(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's weights under Llama names, q/k rows permuted to the halves layout, as `dtype`."""
    check_supported(model)
    ours, K = model.state_dict(), model.cfg.d_model // model.cfg.n_heads
    out = {}
    for name, hf_name, rotated in _names(model.cfg):
        w = ours[name].detach().cpu()
        out[hf_name] = (pairs_to_halves(w, K) if rotated else w).to(dtype).contiguous()
    return out


def from_hf_state(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A Llama state dict -> scaletrain names and layout (the inverse of `to_hf_state`)."""
    K, names = cfg.d_model // cfg.n_heads, _names(cfg)
    missing = [hf_name for _, hf_name, _ in names if hf_name not in hf]
    if missing:
        raise ExportError(f"the checkpoint lacks {len(missing)} tensor(s) of the configured shape: {missing[:3]}")
    state = {name: halves_to_pairs(hf[h], K) if rotated else hf[h] for name, h, rotated in names}
    if cfg.tie_embeddings:
        state["W_ue.weight"] = state["tok_emb.weight"]
    return state


# ---------------------------------------------------------------- export
def export(model: Transformer, tokenizer_file: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the Hugging Face folder `out_dir` (absent or empty) for `model` and its tokenizer file. The files
    are written into a temporary sibling folder that is renamed at the end: a failed export leaves nothing."""
    check_supported(model)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty folder: export into a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        tok = json.loads(Path(tokenizer_file).read_text())
        eos_id = next((t["id"] for t in tok.get("added_tokens", []) if t["content"] == EOT), None)
        if eos_id is None:
            raise ExportError(f"{tokenizer_file} has no {EOT!r} token (the end-of-text every scaletrain run uses)")
        save_file(to_hf_state(model, dtype), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(llama_config(model, eos_id, dtype), indent=2) + "\n")
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        tok_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": EOT,
            "model_max_length": model.max_seq_len,
            "clean_up_tokenization_spaces": False,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def run_dir_of(source: Path) -> tuple[Path, Path | None]:
    """(run folder, checkpoint or None) for a run folder, a checkpoint inside one (checkpoints/step_*.pt or a
    sharded step_* folder) or a run's model.pt."""
    source = Path(source)
    if source.is_dir() and (source / records.CONFIG_FILE).is_file():
        return source, None
    for parent in source.parents[:2]:
        if (parent / records.CONFIG_FILE).is_file():
            return parent, source
    raise ExportError(f"{source}: neither a run folder (with {records.CONFIG_FILE}) nor a checkpoint inside one")


def export_run(source: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Export a run's final weights (a run folder) or a given checkpoint of it, with the run's tokenizer."""
    from scaletrain.runs import config_of_run, load_run  # hydra: only the command needs it

    run_dir, checkpoint = run_dir_of(source)
    cfg = config_of_run(run_dir)
    check_supported(cfg.model, cfg.moe)  # before reading any weights
    run = load_run(run_dir, checkpoint)
    return export(run.model, run_dir / records.TOKENIZER_FILE, out_dir, dtype)


# ---------------------------------------------------------------- import (model.init_from_hf)
def check_hf_dir(folder: str | Path) -> Path:
    """`model.init_from_hf`: the folder must exist and hold config.json and safetensors weights."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model.init_from_hf: {path} is not a folder (a Hugging Face checkpoint folder expected)")
    if not (path / HF_CONFIG_FILE).is_file():
        raise ConfigError(f"model.init_from_hf: {path} has no {HF_CONFIG_FILE}")
    if not sorted(path.glob("*.safetensors")):
        raise ConfigError(f"model.init_from_hf: {path} has no *.safetensors weights (only safetensors are read)")
    return path


def check_init_from_hf(cfg: ModelConfig, moe: MoEConfig | None = None) -> None:
    """What `trainer.build` checks before any data work: the folder, and that the configured model maps."""
    if cfg.init_from_hf:
        check_hf_dir(cfg.init_from_hf)
        check_supported(cfg, moe, doing=_NOT_LLAMA)


def hf_mismatches(hf: dict[str, Any], model: Transformer) -> list[str]:
    """One line per Llama config field whose value differs from what the configured model needs; for a field
    that maps to a scaletrain option, the line names the option and the value to set."""
    cfg = model.cfg
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    got = {  # transformers' defaults stand in for absent fields
        "model_type": hf.get("model_type"),
        "hidden_size": hf.get("hidden_size"),
        "num_hidden_layers": hf.get("num_hidden_layers"),
        "num_attention_heads": hf.get("num_attention_heads"),
        "num_key_value_heads": hf.get("num_key_value_heads") or hf.get("num_attention_heads"),
        "intermediate_size": hf.get("intermediate_size"),
        "vocab_size": hf.get("vocab_size"),
        "tie_word_embeddings": hf.get("tie_word_embeddings", False),
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        "rope_type": rope.get("rope_type", rope.get("type", "default")),
        "head_dim": hf.get("head_dim") or (hf.get("hidden_size") or 0) // (hf.get("num_attention_heads") or 1),
        "hidden_act": hf.get("hidden_act", "silu"),
        "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
    }
    need = {
        "model_type": ("llama", None),
        "hidden_size": (cfg.d_model, "model.d_model"),
        "num_hidden_layers": (cfg.n_layers, "model.n_layers"),
        "num_attention_heads": (cfg.n_heads, "model.n_heads"),
        "num_key_value_heads": (cfg.n_kv_heads or cfg.n_heads, "model.n_kv_heads"),
        "intermediate_size": (cfg.d_ff, "model.d_ff"),
        "vocab_size": (model.vocab_size, "model.vocab_size"),
        "tie_word_embeddings": (cfg.tie_embeddings, "model.tie_embeddings"),
        "rms_norm_eps": (cfg.norm_eps, "model.norm_eps"),
        "rope_theta": (cfg.rope_theta, "model.rope_theta"),
        "rope_type": ("default", None),
        "head_dim": (cfg.d_model // cfg.n_heads, None),
        "hidden_act": ("silu", None),
        "attention_bias": (False, None),
        "mlp_bias": (False, None),
    }
    lines, js = [], json.dumps  # values as config.json and the command line write them (false, 1e-05, "llama")
    for field, (value, option) in need.items():
        if got[field] != value:
            fix = f"set {option}={js(got[field])}" if option else f"scaletrain's Llama shape needs {js(value)}"
            now = f" ({option}={js(value)} here)" if option else ""
            lines.append(f"{field}={js(got[field])}{now}: {fix}")
    return lines


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (one file, or the shards of a sharded checkpoint)."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def load_hf_into(model: Transformer, folder: str | Path) -> Transformer:
    """Replace `model`'s weights with the Llama checkpoint in `folder` (model.init_from_hf). The model must be
    Llama-shaped and the checkpoint's config must match it; otherwise one error lists every difference."""
    path = check_hf_dir(folder)
    check_supported(model, doing=_NOT_LLAMA)
    hf_cfg = json.loads((path / HF_CONFIG_FILE).read_text())
    lines = hf_mismatches(hf_cfg, model)
    if lines:
        raise ExportError(
            f"model.init_from_hf: {path / HF_CONFIG_FILE} does not match the configured model:\n  " + "\n  ".join(lines)
        )
    state = from_hf_state(read_hf_weights(path), model.cfg)
    params = dict(model.named_parameters())  # a tied W_ue is the embedding's tensor: listed (and written) once
    wrong = [
        f"{n} {tuple(state[n].shape)} (model: {tuple(p.shape)})" for n, p in params.items() if state[n].shape != p.shape
    ]
    if wrong:
        raise ExportError(f"model.init_from_hf: {len(wrong)} tensor(s) in {path} do not fit the model: {wrong[:3]}")
    with torch.no_grad():  # into the existing parameters (materialized, maybe sharded): device and dtype stay
        for name, param in params.items():
            write_full(param, state[name].to(device=param.device, dtype=param.dtype))
    return model


# ---------------------------------------------------------------- command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scaletrain.export_hf", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("source", help="a run folder (its model.pt), or a step_*.pt / sharded step_* checkpoint")
    parser.add_argument("out_dir", help="the Hugging Face folder to write (must not exist, or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="of the saved weights")
    args = parser.parse_args(argv)
    try:
        out = export_run(Path(args.source), Path(args.out_dir), DTYPES[args.dtype])
    except (BadInput, ValueError, OSError) as err:
        print(f"export error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
