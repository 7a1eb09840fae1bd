"""Typed configuration: one dataclass schema per Hydra config group, each rule next to its schema.

The path of a configuration: conf/*.yaml + command line -> Hydra composes them against these schemas in
struct mode (`register_configs`) -> `load_config()` converts the result ONCE into real dataclasses
(`OmegaConf.to_object`) -> builders and components receive `Config`, `ModelConfig`, ... objects, never a
`DictConfig`. No torch import here.

What fails, and where:
- an unknown key (`optim.lrr=1`) or a wrong type (`model.d_model=abc`) fails at compose time, naming the key;
  a key added with `+` (`+optim.lrr=1`, which Hydra itself suggests for unknown keys) fails in `load_config`,
  naming the key and the nearest valid one;
- a value invalid in itself fails by its field's `Rule` (a schema's `RULES`: sizes positive, probabilities in
  [0, 1], ...; and each type's own: every float finite, every int within 64 bits, every seed within numpy's range,
  no empty string, no path name longer than the system allows), checked by `check_values` first thing where each
  group starts; no rule sizes a run against memory (that is the resource check's, before data preparation);
- a rule relating values within one group fails in that schema's `__post_init__`, after those;
- rules spanning groups (moe.every <= model.n_layers, train.batch_size divisible by the cluster's ranks, ...) fail in
  `Config.__post_init__`.
Every error is a `ConfigError` whose message starts with the full key (and quotes a long value shortened).
`unwritable(path)` is the check behind the folders a config names (hydra.run.dir in run.py's preflight,
data.cache_dir in data.py).

Optimizers: `OptimConfig` holds what every optimizer has (lr, weight decay, schedule); each optimizer is a
subclass (`AdamWConfig`, `MuonOptimConfig`) registered as `<name>_schema` in the `optim` group, so the
resolved config of an AdamW run holds no Muon keys. A new optimizer = a schema subclass here + a builder in
optim.py + a YAML in conf/optim/. Closed sets of options are `StrEnum`s (OmegaConf rejects `Literal`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import string
import tempfile
import types
import typing
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf


class BadInput(Exception):
    """Base of every error that means bad input rather than a bug: a config value, a file, a device, a full disk.
    Its message names the key or file, what was expected and the fix; the commands print `<kind> error: <message>`
    in one line and exit with code 2 (run.py), where any other exception is a bug and keeps its traceback."""

    kind = "input"


class ConfigError(BadInput, ValueError):
    """A configuration value is inconsistent; the message names the key and what is allowed."""

    kind = "config"


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def check_batch_split(batch_size: int, ranks: int, whose: str) -> None:
    """The one rule for splitting the global batch: every rank takes an equal share. `whose` names the ranks
    (the cluster settings when configured, the job's launcher when running)."""
    _check(
        batch_size % ranks == 0,
        "train.batch_size",
        f"{batch_size} (global) must be divisible by the {ranks} ranks of {whose} (each takes an equal share)",
    )


# ---------------------------------------------------------------- what a value must be, in itself
INT64_MAX = 2**63 - 1  # torch and numpy hold integers in 64 bits: a larger one overflows deep inside them
SEED_MAX = 2**32 - 1  # numpy's seed range: the largest seed that every generator of a run accepts


def _fs_limit(name: str, fallback: int) -> int:
    try:
        return os.pathconf("/", name)
    except (OSError, ValueError, AttributeError):  # no such limit here (or no pathconf: Windows)
        return fallback


NAME_MAX = _fs_limit("PC_NAME_MAX", 255)  # bytes in one file or folder name
PATH_MAX = _fs_limit("PC_PATH_MAX", 4096)  # bytes in a whole path, its final NUL included


@dataclass(frozen=True)
class Rule:
    """What one field's value must be in itself, whatever the other fields say (rules relating fields stay in the
    schema's `__post_init__`). A schema declares its rules in `RULES` (field name -> Rule; a subclass's add to its
    base's), and `check_values` applies them, with each type's own rule for every value: a float is finite, an int
    fits in 64 bits, a string is neither empty nor blank (unless `empty`), a field named `seed`, `*_seed` or `seeds`
    is a seed (SEED). A list's or dict's rule is each item's; None passes where the type allows it. No rule here
    sizes a run against memory: values that are valid but too large for a machine are the resource check's."""

    lo: float | None = None  # the smallest value allowed (excluded when lo_open)
    hi: float | None = None  # the largest value allowed (excluded when hi_open)
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""  # said after what is expected: what a value means ("(0 = off)"), or the forms accepted
    empty: bool = False  # a string may be empty or blank
    path: bool = False  # a file or folder: no name longer than NAME_MAX bytes, the whole shorter than PATH_MAX

    def admits(self, value: float) -> bool:
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        return above and (self.hi is None or (value < self.hi if self.hi_open else value <= self.hi))

    def bounds(self) -> str:
        """'positive', '>= 1', 'in [0, 1)', or '' when the rule has no bound."""
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(lo)}, {_num(hi)}{')' if self.hi_open else ']'}"
        if lo == 0 and self.lo_open:
            return "positive"
        if lo is not None:
            return f">{'' if self.lo_open else '='} {_num(lo)}"
        return f"<{'' if self.hi_open else '='} {_num(hi)}" if hi is not None else ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


POSITIVE = Rule(lo=0, lo_open=True)
NON_NEGATIVE = Rule(lo=0)
FRACTION = Rule(lo=0, hi=1, hi_open=True)  # a probability that must leave something: dropout, momentum, beta
OFF_AT_0 = Rule(lo=0, note="(0 = off)")
SEED = Rule(lo=0, hi=SEED_MAX, note="(numpy's seed range)")
PATH = Rule(path=True)


def _show(value: Any) -> str:
    """A value as an error message quotes it: a long one shortened, with its length."""
    text = repr(value) if isinstance(value, str) else str(value)
    if len(text) <= 60:
        return text
    return f"{text[:40]}... ({len(value) if isinstance(value, str) else len(text)} characters)"


def path_problem(path: str | Path) -> str | None:
    """Why `path` cannot name a file or folder on this system whatever exists (None when it can): a name longer
    than NAME_MAX bytes, or the whole longer than PATH_MAX. The system would say ENAMETOOLONG, at first use."""
    raw = os.fsencode(str(path))
    long = next((name for name in raw.split(b"/") if len(name) > NAME_MAX), None)
    if long is not None:
        name = _show(os.fsdecode(long))
        return f"has a name of {len(long)} bytes, more than this system's limit of {NAME_MAX} (NAME_MAX): {name}"
    if len(raw) >= PATH_MAX:
        return f"is {len(raw)} bytes long, more than this system's limit of {PATH_MAX - 1} (PATH_MAX)"
    return None


def value_rule(cls: type, name: str) -> Rule:
    """The rule of field `name` of schema `cls`: its RULES entry (a subclass's wins over its bases'), else SEED for
    a seed (`seed`, `*_seed`, `seeds`), else the rule of no bounds (its type's own rule still applies)."""
    declared = next((c.__dict__["RULES"][name] for c in cls.__mro__ if name in c.__dict__.get("RULES", {})), None)
    seed = name == "seed" or name.endswith("_seed") or name == "seeds"
    return declared or (SEED if seed else Rule())


def _value_problem(value: Any, rule: Rule, optional: bool) -> str | None:
    """What is wrong with one scalar value under `rule` (None: nothing)."""
    if isinstance(value, bool | Enum):  # OmegaConf checked the type, or the option against the enum
        return None
    null = " or null" if optional else ""
    note = f" {rule.note}" if rule.note else ""
    if isinstance(value, float):
        bounds = rule.bounds()
        what = "a finite positive number" if bounds == "positive" else f"a finite number {bounds}".rstrip()
        ok = math.isfinite(value) and rule.admits(value)
        return None if ok else f"must be {what}{null}{note}, got {value}"
    if isinstance(value, int):
        if not rule.admits(value):
            return f"must be {rule.bounds()}{null}{note}, got {_show(value)}"
        ok = -INT64_MAX - 1 <= value <= INT64_MAX
        return None if ok else f"must fit in a 64-bit integer (at most {INT64_MAX}){note}, got {_show(value)}"
    if isinstance(value, str):
        if not rule.empty and not value.strip():
            if optional:
                return f"empty; use null or a non-empty string{note}"
            return f"empty; expected a non-empty string{note}, got {value!r}"
        return path_problem(value) if rule.path else None
    return None


def _check_value(value: Any, tp: Any, rule: Rule, key: str) -> None:
    if value is None:
        return
    if is_dataclass(value) and not isinstance(value, type):
        check_values(value, f"{key}.")
        return
    item_tp = (typing.get_args(_unwrap_optional(tp)) or (Any,))[-1]
    if isinstance(value, Mapping):
        for k, item in value.items():
            _check_value(item, item_tp, rule, f"{key}.{k}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_value(item, item_tp, rule, f"{key}[{i}]")
    else:
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
        problem = _value_problem(value, rule, optional)
        if problem:
            raise ConfigError(f"{key}: {problem}")


_VALUE_TYPES: weakref.WeakKeyDictionary[type, dict[str, Any]] = weakref.WeakKeyDictionary()


def _value_types(cls: type) -> dict[str, Any]:
    """`_field_types`, cached without keeping a schema alive (a class defined in a test or a notebook goes away)."""
    if cls not in _VALUE_TYPES:
        _VALUE_TYPES[cls] = _field_types.__wrapped__(cls)
    return _VALUE_TYPES[cls]


def check_values(obj: Any, prefix: str) -> None:
    """Every value's own rule (`Rule`) under the schema object `obj`, whose key is `prefix` (`"model."`); nested
    schemas, dicts and lists are walked. Raises a ConfigError naming the first key that breaks one. Each schema
    that has rules relating its fields calls this first, so that those rules only ever see valid values."""
    hints = _value_types(type(obj))
    for f in fields(obj):
        _check_value(getattr(obj, f.name), hints[f.name], value_rule(type(obj), f.name), f"{prefix}{f.name}")


def suggest(word: str, options: list[str]) -> str:
    """' (did you mean X?)' for the nearest option, or '' when nothing is close."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------- what each key is to a resumed run
class Resume(StrEnum):
    """The role of a config key for a run that continues (checkpoint.config_changes) and for the commands that group
    runs by their settings (run names, Hydra's override_dirname). Declared on the schema's field with `identity(...)`,
    `hyperparameter(...)` or `placement(...)`; a field that declares none has the role of the field it sits in, and
    Config's fields give each group's (`resume_role`). Not roles.Role (a parameter's role in the model)."""

    identity = "identity"  # what the checkpoint's state is: shapes, tokenizer, optimizer kind, data order; refuses
    hyperparameter = "hyperparameter"  # how training goes on (lr, schedule, steps, cadences); applies, logged
    placement = "placement"  # where or how a run executes (paths, device, launcher, W&B); free, never reported


RESUME_ROLE = "scaletrain.resume"  # the key of a field's Resume role in its dataclass metadata


def _declare(role: Resume, default: Any, factory: Any) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={RESUME_ROLE: role})
    return field(default=default, metadata={RESUME_ROLE: role})


def identity(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A schema field whose change refuses a resume (`name: str = identity("x")`, `identity(factory=Node)`)."""
    return _declare(Resume.identity, default, factory)


def hyperparameter(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A schema field whose change applies from the resumed step on, and is logged."""
    return _declare(Resume.hyperparameter, default, factory)


def placement(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A schema field that says where or how a run executes: free to change, never reported, not in run names."""
    return _declare(Resume.placement, default, factory)


def resume_role(key: str, config: Mapping[str, Any] | None = None) -> Resume:
    """The role of a full key (`model.d_model`, `optim.betas[1]`, `data.sources.<name>.path`, a group as an override
    names it: `model/attention`): the role declared by the deepest field along the key that declares one (a subclass
    that redefines a field keeps its base's role), else hyperparameter. A component's fields are looked up in its
    actual schema (`MuonOptimConfig`'s, a plugin's): the one `config` (a plain dict, as `to_dict` writes it) names at
    that node, else the first schema of the kind that has the field. A key the schemas do not know (removed since a
    checkpoint was written) has the role of its known part."""
    role: Resume = Resume.hyperparameter
    tp: Any = Config
    node: Any = config
    for part in [p for p in re.split(r"[./\[\]]", key.lstrip("+~")) if p]:
        tp = _unwrap_optional(tp)
        if typing.get_origin(tp) in (dict, list):  # a dict's entry or a list's item: the value's schema
            args = typing.get_args(tp)
            tp, node = (args[-1] if args else Any), _child(node, part)
            continue
        if not (isinstance(tp, type) and is_dataclass(tp)):
            break
        cls = _actual_schema(tp, part, node)
        if part not in _field_types(cls):
            break
        role = _declared_role(cls, part) or role
        tp, node = _field_types(cls)[part], _child(node, part)
    return role


def placement_keys(cls: type | None = None, prefix: str = "", role: Resume = Resume.hyperparameter) -> list[str]:
    """Every key of the schemas that a command line sets as one value (a group, a node, a leaf; a dict's entries
    and list items not apart) whose role is placement, in schema order; a component's over all its schemas."""
    out: list[str] = []
    cls = cls or Config
    for schema in list(component_schemas(component_base(cls)).values()) if _is_component(cls) else [cls]:
        for f in fields(schema):
            key, tp = f"{prefix}{f.name}", _unwrap_optional(_field_types(schema)[f.name])
            own = _declared_role(schema, f.name) or role
            if own == Resume.placement:
                out.append(key)
            if isinstance(tp, type) and is_dataclass(tp):
                out.extend(placement_keys(tp, f"{key}.", own))
    return list(dict.fromkeys(out))


# overrides that name no schema key and stay out of a run's name as well: the test settings and this machine's
# settings (groups of the defaults list only), the folders Hydra puts a run or a sweep in
UNNAMED_OVERRIDES = ("debug", "local", "hydra.run.dir", "hydra.sweep.dir")


def override_dirname_exclude() -> list[str]:
    """Hydra's `hydra.job.config.override_dirname.exclude_keys` (stored by `register_configs` as the config
    `scaletrain_hydra`, which conf/config.yaml's defaults list names): every placement key, and UNNAMED_OVERRIDES.
    A run is named by what it trains, not by where it runs."""
    return [*placement_keys(), *UNNAMED_OVERRIDES]


def _is_component(cls: type) -> bool:
    return issubclass(cls, ComponentConfig) and cls is not ComponentConfig


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if a is not type(None)), Any)
    return tp


def _child(node: Any, part: str) -> Any:
    if isinstance(node, Mapping):
        return node.get(part)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return None


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Each field's type, resolved (annotations are strings here: `from __future__ import annotations`)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not resolve: its fields are leaves
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in fields(cls)}


def _declared_role(cls: type, name: str) -> Resume | None:
    for c in cls.__mro__:
        declared = c.__dict__.get("__dataclass_fields__", {}).get(name)
        if declared is not None and RESUME_ROLE in declared.metadata:
            return Resume(declared.metadata[RESUME_ROLE])
    return None


def _actual_schema(tp: type, part: str, node: Any) -> type:
    """The schema of a node: a component's by the name the config gives it, else the first that has `part`."""
    if not _is_component(tp):
        return tp
    schemas = component_schemas(component_base(tp))
    name = node.get("name") if isinstance(node, Mapping) else None
    if name in schemas:
        return schemas[name]
    if part in _field_types(tp):
        return tp
    return next((c for c in schemas.values() if part in _field_types(c)), tp)


# ---------------------------------------------------------------- components
@dataclass
class ComponentConfig:
    """A config node for a component built by code it names: `_target_`, the dotted path of the class or builder
    (built-ins and plugins alike: scaletrain/plugins.py). Each kind of component has one base schema (below:
    `AttentionConfig`, `MLPConfig`, `OptimConfig`) whose subclasses are the options of its Hydra group (`GROUP`),
    registered as `<name>_schema` by `register_configs`; a subclass adds its own typed fields and rules. The schema
    keeps typed validation (a wrong key or type fails at compose time, naming it), the `_target_` is checked when the
    config is loaded (importable, callable; else one error naming the key and the nearest valid name). Why not
    `hydra.utils.instantiate`: a component needs run-time arguments (the model, the typed model config, the
    device), so the target receives the typed node rather than its fields as keywords."""

    GROUP: ClassVar[str] = ""  # the Hydra group of this kind's options (the node's key: dots for slashes)
    name: str = identity(MISSING)  # which component: its subclasses' redefinitions keep the role
    _target_: str = identity(MISSING)

    def __post_init__(self) -> None:
        key = self.GROUP.replace("/", ".")
        base = component_base(type(self))
        own = _schema_name(type(self))
        _check(
            self.name == own,
            f"{key}.name",
            f"is {_show(self.name)} but the schema is {own!r}: pick an option with `{self.GROUP}=<name>` "
            f"(available: {', '.join(sorted(component_schemas(base)))}), not {key}.name",
        )
        resolve_target(self._target_, f"{key}._target_")


def component_base(cls: type) -> type:
    """The base schema of a component kind (the direct subclass of ComponentConfig that `cls` derives from)."""
    return next(c for c in reversed(cls.__mro__) if ComponentConfig in c.__bases__)


def resolve_target(path: str, key: str) -> Any:
    """The object a `_target_` names, imported; a ConfigError naming `key` and the nearest importable name when
    the module or the attribute does not exist. Imports the module (a plugin's, or torch-importing built-ins)."""
    import importlib

    _check(path != MISSING, key, "is not set: the schema's _target_ must name the code that builds it")
    module_name, _, attr = path.rpartition(".")
    _check(bool(module_name and attr), key, f"{_show(path)} is not a dotted path (module.attribute)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"{key}: cannot import module {_show(module_name)} of {_show(path)} ({err})") from None
    obj = getattr(module, attr, None)
    if obj is None:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(f"{key}: module {module_name!r} has no {_show(attr)}{suggest(attr, names)}")
    _check(callable(obj), key, f"{_show(path)} is not callable")
    return obj


# ---------------------------------------------------------------- model
@dataclass
class AttentionConfig(ComponentConfig):
    """The block's attention (`model/attention` group). The target is an nn.Module class built as
    `cls(model_cfg, attention_cfg, rope)`; the built-in is causal SDPA (model.Attention). A variant subclasses
    model.Attention (overriding `attend`) and this schema (adding its own fields); see examples/scaletrain_lion."""

    GROUP: ClassVar[str] = "model/attention"
    name: str = "sdpa"
    _target_: str = "scaletrain.model.Attention"


@dataclass
class MLPConfig(ComponentConfig):
    """The block's MLP in dense layers (`model/mlp` group; MoE layers stay MoE). The target is an nn.Module class
    built as `cls(model_cfg, mlp_cfg)`, [B, T, D] -> [B, T, D]; the built-in (model.MLP: relu/gelu/swiglu) reads
    model.activation, model.d_ff, model.bias and model.dropout. A variant subclasses this schema (adding its own
    fields) and declares its parameters' roles (`param_roles`, scaletrain/roles.py)."""

    GROUP: ClassVar[str] = "model/mlp"
    name: str = "mlp"
    _target_: str = "scaletrain.model.MLP"


class Norm(StrEnum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class Activation(StrEnum):
    relu = "relu"
    gelu = "gelu"
    swiglu = "swiglu"


@dataclass
class ModelConfig:
    """The network (scaletrain/model.py); under `Config.model`, every field is identity unless it says otherwise."""

    RULES: ClassVar[dict[str, Rule]] = {
        **dict.fromkeys(("d_model", "n_layers", "n_heads", "d_ff", "n_embed", "n_kv_heads"), POSITIVE),
        **dict.fromkeys(("max_seq_len", "vocab_size", "norm_eps", "rope_theta", "init_std"), POSITIVE),
        "dropout": FRACTION,
        "attn_dropout": FRACTION,
        "init_from_hf": PATH,
    }
    name: str = hyperparameter(MISSING)  # a label: the shape is in the fields
    d_model: int = 512
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 2048
    n_embed: int | None = None  # token-embedding width; None = d_model (then W_e is still a Linear)
    # false: no W_e projection, the token embedding (d_model wide) feeds the blocks directly (Llama's shape)
    embed_proj: bool = True
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads
    max_seq_len: int | None = None  # the model's context (RoPE table); None = data.seq_len
    vocab_size: int | None = None  # None = taken from the tokenizer
    norm: Norm = Norm.layernorm
    norm_eps: float = 1e-5
    activation: Activation = Activation.relu
    bias: bool = False
    tie_embeddings: bool = False  # tie W_ue to the token embedding (requires n_embed == d_model)
    dropout: float = hyperparameter(0.0)  # on the embedding output, the attention output and the MLP output
    # On the attention probabilities (HF's attn_pdrop). Off by default, as in Llama/OLMo: SDPA's CPU flash
    # kernel has no dropout, so any p > 0 takes the math path (2x slower attention, T x T memory on CPU).
    attn_dropout: float = hyperparameter(0.0)
    qk_norm: bool = False
    rope_theta: float = 10000.0
    init_std: float = 0.02
    attention: AttentionConfig = field(default_factory=AttentionConfig)  # the `model/attention` group picks it
    mlp: MLPConfig = field(default_factory=MLPConfig)  # the `model/mlp` group picks it (dense layers)
    # A Hugging Face Llama checkpoint folder (config.json + *.safetensors) whose weights replace the initial ones
    # (scaletrain/export_hf.py::load_hf_into, checked when the trainer builds, before any data work); null = init_std.
    # Read at build time only: a finished run loads without it (sample, eval, export).
    init_from_hf: str | None = None

    def __post_init__(self) -> None:
        check_values(self, "model.")
        D, H = self.d_model, self.n_heads
        _check(
            D % H == 0,
            "model.n_heads",
            f"d_model={D} must be divisible by n_heads={H}; "
            f"allowed n_heads: {[h for h in range(1, min(D, 64) + 1) if D % h == 0]}",
        )
        _check((D // H) % 2 == 0, "model.n_heads", f"head_dim={D // H} must be even for RoPE")
        _check(
            self.embed_proj or self.n_embed in (None, D),
            "model.embed_proj",
            f"false needs n_embed null or = d_model ({D}): without W_e the embedding feeds the blocks directly",
        )
        G = self.n_kv_heads or H
        _check(
            H % G == 0,
            "model.n_kv_heads",
            f"must divide n_heads={H} (each key/value head serves n_heads/n_kv_heads query heads); "
            f"allowed: {[g for g in range(1, min(H, 64) + 1) if H % g == 0]}",
        )
        if self.tie_embeddings:
            _check(
                self.n_embed is None or self.n_embed == D,
                "model.tie_embeddings",
                f"tying needs n_embed == d_model (got n_embed={self.n_embed}, d_model={D})",
            )


# ---------------------------------------------------------------- moe
class BalanceScope(StrEnum):
    global_batch = "global_batch"  # token shares f_e summed over data-parallel ranks: the loss of the whole batch
    micro_batch = "micro_batch"  # each rank balances the micro-batch it sees (Switch / Mixtral as usually written)


class RouterScore(StrEnum):
    softmax = "softmax"  # probabilities over all experts (Switch, Mixtral, DeepSeekMoE)
    sigmoid = "sigmoid"  # independent per-expert affinities (DeepSeek-V3)


class MoEImpl(StrEnum):
    auto = "auto"  # grouped where the device/dtype/shape supports it, else loop (see moe.pick_impl)
    grouped = "grouped"  # tokens sorted by expert, one grouped GEMM per projection
    loop = "loop"  # reference: one matmul per expert


@dataclass
class MoEConfig:
    """Mixture-of-Experts layer settings (scaletrain/moe.py). `n_experts: 0` (option `moe=none`) = dense MLPs."""

    RULES: ClassVar[dict[str, Rule]] = {
        "n_experts": Rule(lo=0, note="(0 = dense MLPs)"),
        "top_k": NON_NEGATIVE,  # at least 1 when n_experts > 0 (below)
        "every": Rule(lo=1),
        "d_expert": Rule(lo=0, lo_open=True, note="(null = model.d_ff)"),
        "n_shared": NON_NEGATIVE,
        "capacity_factor": Rule(lo=0, lo_open=True, note="(null = dropless)"),
        **dict.fromkeys(("aux_loss_coef", "z_loss_coef", "bias_update_rate"), NON_NEGATIVE),
        "router_jitter": FRACTION,
    }
    name: str = hyperparameter("none")  # a label: the shape is in the fields
    n_experts: int = 0  # routed experts; 0 = dense MLP in every layer
    top_k: int = 0  # routed experts per token
    every: int = 1  # MoE replaces the MLP of layers i with (i + 1) % every == 0
    d_expert: int | None = None  # expert hidden size; None = model.d_ff
    n_shared: int = 0  # always-on shared experts (DeepSeekMoE), each of hidden size d_expert
    score: RouterScore = RouterScore.softmax
    norm_topk: bool = True  # renormalize the top-k gates to sum to 1 (no effect when top_k = 1)
    # None = dropless. Else capacity = ceil(tokens * top_k * cf / n_experts) per expert, decided per rank's
    # micro-batch: a capacity run depends on how the batch is split over ranks (balance_scope cannot change
    # that; only dropless runs are rank-count independent). With top_k >= 2 capacity is not causal within a
    # sequence: every token's first choice is served before any token's second choice, so a later token can
    # take the slot an earlier token's second choice needed.
    capacity_factor: float | None = None
    # Switch balancing alpha * E/k * sum_e f_e P_e (f_e: share of routed slots): = alpha when balanced,
    # alpha * E/k at full collapse onto k experts
    aux_loss_coef: float = 0.01
    # global_batch: f_e over all data-parallel ranks, so the loss and the run do not depend on how many GPUs
    # share the batch (Megatron's global_aux_loss, Qwen's global-batch balancing); micro_batch: per rank
    balance_scope: BalanceScope = BalanceScope.global_batch
    z_loss_coef: float = 0.001  # router z-loss coef * mean(logsumexp(logits)^2)
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3) gamma; 0 = off
    router_jitter: float = hyperparameter(0.0)  # training only: router input scaled by U(1 - eps, 1 + eps) (Switch)
    impl: MoEImpl = hyperparameter(MoEImpl.auto)  # how, not what: grouped and loop compute the same layer

    def __post_init__(self) -> None:
        check_values(self, "moe.")
        if self.n_experts == 0:  # dense (moe=none) ignores the other MoE knobs
            return
        _check(
            1 <= self.top_k <= self.n_experts,
            "moe.top_k",
            f"must be in [1, n_experts={self.n_experts}], got {self.top_k}",
        )


# ---------------------------------------------------------------- optim
class Decay(StrEnum):
    cosine = "cosine"
    linear = "linear"
    wsd = "wsd"  # warmup-stable-decay: constant LR, then a linear cooldown over the last fraction
    constant = "constant"


class OptimImpl(StrEnum):
    auto = "auto"  # fused on CUDA and CPU, foreach elsewhere
    fused = "fused"
    foreach = "foreach"
    for_loop = "for_loop"


class MuonAdjustLR(StrEnum):
    original = "original"  # K. Jordan: lr * sqrt(max(1, rows / cols)); his lr ~0.02
    match_rms_adamw = "match_rms_adamw"  # Moonlight: lr * 0.2 * sqrt(max(rows, cols)); reuses AdamW lr / wd


class NSDtype(StrEnum):
    auto = "auto"  # bf16 on CUDA, fp32 elsewhere (bf16 matmuls are slow on CPUs without AVX512-BF16)
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class ScheduleConfig:
    """optim.schedule. Its values' rules are checked by the optimizer's schema (a node's rules are checked where
    the group starts: `check_values` walks the group in key order, so an error names the first bad key typed)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "warmup_steps": NON_NEGATIVE,
        "min_lr_ratio": Rule(lo=0, hi=1),
        "decay_frac": Rule(lo=0, hi=1, lo_open=True),
    }
    warmup_steps: int = 100
    decay: Decay = Decay.cosine
    min_lr_ratio: float = 0.1  # final LR = lr * min_lr_ratio
    decay_frac: float = 0.2  # wsd only: fraction of steps spent in the final decay


@dataclass
class OptimConfig(ComponentConfig):
    """What every optimizer has. Subclasses are the `optim` group's schemas; `name` says which one. The target is
    a builder `fn(model, cfg, device_type) -> torch.optim.Optimizer` (optim.py's, or a plugin's); the LR schedule
    (one LambdaLR over every parameter group) is applied by the trainer to whatever it returns."""

    GROUP: ClassVar[str] = "optim"
    RULES: ClassVar[dict[str, Rule]] = {"lr": POSITIVE, "weight_decay": NON_NEGATIVE}
    lr: float = 1e-3
    weight_decay: float = 0.1
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        check_values(self, "optim.")  # a subclass's fields too (its RULES add to these)
        super().__post_init__()


@dataclass
class AdamWConfig(OptimConfig):
    """torch AdamW on decay / no-decay groups (optim.py)."""

    RULES: ClassVar[dict[str, Rule]] = {"betas": FRACTION, "eps": POSITIVE}
    name: str = "adamw"
    _target_: str = "scaletrain.optim.build_adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    implementation: OptimImpl = OptimImpl.auto

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(len(self.betas) == 2, "optim.betas", f"expected [beta1, beta2] in [0, 1), got {list(self.betas)}")


@dataclass
class MuonConfig:
    """The Muon part of optim=muon (hidden matrices, stacked experts); see scaletrain/muon.py."""

    RULES: ClassVar[dict[str, Rule]] = {
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "momentum": FRACTION,
        "ns_steps": Rule(lo=1, hi=99),
        "eps": POSITIVE,
    }
    lr: float = 1e-3
    weight_decay: float = 0.1  # decoupled: p *= 1 - lr * weight_decay (unadjusted lr, as torch.optim.Muon)
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: list[float] = field(default_factory=lambda: [3.4445, -4.7750, 2.0315])
    eps: float = 1e-7  # floor of the Frobenius norm that NS divides by
    adjust_lr: MuonAdjustLR = MuonAdjustLR.match_rms_adamw
    ns_dtype: NSDtype = NSDtype.auto

    def __post_init__(self) -> None:  # each value's own rule: OptimConfig's, which walks `optim` in key order
        _check(len(self.ns_coefficients) == 3, "optim.muon.ns_coefficients", "expected [a, b, c] (quintic NS)")


@dataclass
class MuonOptimConfig(AdamWConfig):
    """Muon for hidden matrices; the inherited AdamW fields configure the AdamW part (embeddings, W_e, W_ue,
    norms, biases, router)."""

    name: str = "muon"
    _target_: str = "scaletrain.optim.build_muon_with_adamw"
    muon: MuonConfig = field(default_factory=MuonConfig)


def _schema_name(cls: type) -> Any:
    return next(f.default for f in fields(cls) if f.name == "name")


def component_schemas(base: type) -> dict[str, type]:
    """Every schema of a component kind, by name: `base` (when it names an option itself) and all its subclasses
    (defining one registers it: built-ins here, plugins when imported)."""
    found, todo = {}, [base]
    while todo:
        cls = todo.pop()
        if _schema_name(cls) is not MISSING:
            found[_schema_name(cls)] = cls
        todo.extend(cls.__subclasses__())
    return found


def optimizer_schemas() -> dict[str, type[OptimConfig]]:
    """Every optimizer schema, by name."""
    return component_schemas(OptimConfig)


# ---------------------------------------------------------------- data
class TokenizerKind(StrEnum):
    bpe = "bpe"  # byte-level BPE trained on the training split with HF `tokenizers`
    gpt2 = "gpt2"  # GPT-2 BPE read from local vocab.json / merges.txt


GPT2_VOCAB_SIZE = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>


@dataclass
class TokenizerConfig:
    """data.tokenizer (its values' rules are checked by DataConfig's `check_values`)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "vocab_size": Rule(lo=260, note="(256 bytes + specials)"),
        "gpt2_dir": PATH,
        "max_train_bytes": POSITIVE,
    }
    kind: TokenizerKind = TokenizerKind.bpe
    vocab_size: int = 4096  # bpe only
    gpt2_dir: str = "${oc.env:SCALETRAIN_SHARED,../shared}/data/gpt2_tokenizer"  # gpt2 only
    max_train_bytes: int = 200_000_000  # bpe: train on at most this much text (deterministic prefix)


class SourceKind(StrEnum):
    text = "text"  # documents: hub dataset or local .txt (<|endoftext|>-separated) / .jsonl / .parquet files
    gsm8k = "gsm8k"  # grade-school math word problems (question, worked answer, final answer after "#### ")
    synthetic = "synthetic"  # procedurally generated reasoning problems with exact answers (data/synthetic.py)


GSM8K_FIELDS = ("question", "answer", "solution", "final")  # what a gsm8k template may use
GSM8K_TEMPLATE = "Question: {question}\nAnswer: {solution}\n#### {final}"


# The difficulty knobs of each generated kind (data/synthetic.py KINDS: the same names, defaults and ranges; a
# test keeps them equal), as typed blocks so that a misspelled knob fails with the nearest name.
@dataclass
class ArithmeticKnobs:
    steps: int = 2  # operations in the word problem
    max_operand: int = 10
    max_value: int = 100  # every intermediate result stays within it
    allow_negative: int = 0  # 1: results may go below zero


@dataclass
class ComparisonKnobs:
    n_entities: int = 3  # people in the ordering


@dataclass
class BooleanKnobs:
    depth: int = 2  # nesting depth of and/or
    n_vars: int = 3


@dataclass
class DeductionKnobs:
    hops: int = 2  # rules chained from the fact to the answer
    n_distractors: int = 2


@dataclass
class SyntheticConfig:
    RULES: ClassVar[dict[str, Rule]] = {"n_train": POSITIVE, "n_val": POSITIVE}  # seed: a seed, as every seed
    kinds: list[str] = field(default_factory=lambda: ["arithmetic", "comparison", "boolean", "deduction"])
    arithmetic: ArithmeticKnobs = field(default_factory=ArithmeticKnobs)
    comparison: ComparisonKnobs = field(default_factory=ComparisonKnobs)
    boolean: BooleanKnobs = field(default_factory=BooleanKnobs)
    deduction: DeductionKnobs = field(default_factory=DeductionKnobs)
    seed: int = 0
    n_train: int = 20_000  # problems per kind packed into the training split (train and val never share one)
    n_val: int = 200  # problems per kind in the validation split
    with_solution: bool = True  # worked steps before the final answer in the training text

    def difficulty(self, kind: str) -> dict[str, int]:
        """The knobs of `kind` as data/synthetic.py takes them."""
        return dataclasses.asdict(getattr(self, kind))


@dataclass
class SourceConfig:
    """One source of documents (a data config has one, or several mixed by weight)."""

    RULES: ClassVar[dict[str, Rule]] = {"weight": NON_NEGATIVE, "path": PATH}
    kind: SourceKind = SourceKind.text
    weight: float = 1.0  # share of training sequences drawn from this source (normalized over the sources)
    hub_id: str | None = None  # Hugging Face dataset, used when `path` is null
    hub_config: str | None = None  # its config name (GSM8K: "main")
    train_split: str = "train"  # hub split name; local files: train.* / <train_split>.*
    val_split: str = "validation"  # hub split name; local files: <val_split>.*, valid.*, validation.* or val.*
    path: str | None = placement(None)  # local folder with the split files (where, not what: the cache keys contents)
    text_column: str = "text"  # text: the column holding documents (.jsonl / .parquet / hub)
    # the document made from each record. text: null = the `text_column` as it is, else a format string over
    # the record's fields ("{instruction}\n{response}"). gsm8k (null = GSM8K_TEMPLATE): from {question},
    # {answer} (as in the file), {solution} (the worked steps) and {final} (the final answer, commas removed);
    # prompt_template is what exact-match generation starts from
    template: str | None = None
    prompt_template: str = hyperparameter("Question: {question}\nAnswer:")  # evaluation's start, not training
    strip_calculator: bool = True  # gsm8k: drop the <<48/2=24>> calculator annotations
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    sample_prompt: str | None = hyperparameter(None)  # samples during training start here (null: 1st val problem)
    path_key: str | None = placement(None)  # set by DataConfig: "data.path" when that shortcut gave `path` (errors)

    def check(self, key: str) -> None:
        """The source's rules, errors naming `key` (data.sources.<name>)."""
        check_values(self, f"{key}.")
        if self.kind == SourceKind.gsm8k:
            for name in ("template", "prompt_template"):
                try:
                    used = {f for _, f, _, _ in string.Formatter().parse(getattr(self, name) or GSM8K_TEMPLATE) if f}
                except ValueError as err:  # "Single '}' encountered in format string"
                    raise ConfigError(
                        f"{key}.{name}: not a format string ({err}); write {{{{ and }}}} for braces"
                    ) from None
                unknown = sorted(used - set(GSM8K_FIELDS))
                _check(
                    not unknown,
                    f"{key}.{name}",
                    f"refers to {', '.join(unknown)}, which a GSM8K problem does not have; fields: "
                    + ", ".join(GSM8K_FIELDS),
                )
        if self.kind == SourceKind.synthetic:
            from scaletrain.data import synthetic  # the standard library only: no torch here

            s = self.synthetic
            _check(bool(s.kinds), f"{key}.synthetic.kinds", "must name at least one kind")
            for kind in s.kinds:
                _check(
                    kind in synthetic.KINDS,
                    f"{key}.synthetic.kinds",
                    f"unknown kind {_show(kind)}{suggest(kind, list(synthetic.KINDS))}; "
                    f"kinds: {', '.join(synthetic.KINDS)}",
                )
                try:
                    synthetic.resolve_difficulty(kind, s.difficulty(kind))
                except ValueError as err:
                    raise ConfigError(f"{key}.synthetic.{err}") from None  # err: "<kind>.<knob>=<value>: ..."
        if self.kind != SourceKind.synthetic:
            _check(
                self.path is not None or self.hub_id is not None,
                key,
                "needs a local folder (path) or a Hugging Face dataset (hub_id)",
            )


@dataclass
class DataConfig:
    RULES: ClassVar[dict[str, Rule]] = {
        "path": PATH,
        "seq_len": POSITIVE,
        "cache_dir": PATH,
        "num_proc": Rule(lo=1),
        "hub_timeout_s": POSITIVE,
        "max_val_tokens": Rule(lo=0, lo_open=True, note="(null = the whole split)"),
    }
    name: str = "tinystories"
    # name -> source; the name keys the per-source metrics (val/<name>/loss, ...). Set by each data/*.yaml.
    # identity: what the training text is, and each source's share (the data order)
    sources: dict[str, SourceConfig] = identity(factory=dict)
    path: str | None = placement(None)  # shortcut: the local folder of the only source (= data.sources.<name>.path)
    seq_len: int = identity(256)
    tokenizer: TokenizerConfig = identity(factory=TokenizerConfig)
    cache_dir: str = placement("${oc.env:SCALETRAIN_CACHE,${oc.env:HOME}/.cache/scaletrain}")
    num_proc: int = placement(2)  # processes for datasets.map tokenization
    hub_timeout_s: float = 5.0  # give up on the hub after this many seconds
    max_val_tokens: int | None = None  # cap each source's validation split (None = whole split)

    def __post_init__(self) -> None:
        check_values(self, "data.")
        # an empty `sources` is the schema's default (each data/*.yaml sets its own); Config requires one
        if self.path is not None and self.sources:
            _check(
                len(self.sources) == 1,
                "data.path",
                f"sets the folder of a single-source data config; this one has {', '.join(self.sources)}: set "
                "data.sources.<name>.path instead",
            )
            only = next(iter(self.sources.values()))
            only.path, only.path_key = self.path, "data.path"
        for name, source in self.sources.items():
            source.check(f"data.sources.{name}")
        _check(
            not self.sources or sum(s.weight for s in self.sources.values()) > 0,
            "data.sources",
            "the weights sum to 0; expected a positive total (each weight >= 0)",
        )

    def weights(self) -> dict[str, float]:
        """Each source's share of the training sequences (the weights normalized to sum 1)."""
        total = sum(s.weight for s in self.sources.values())
        return {name: s.weight / total for name, s in self.sources.items()}


# ---------------------------------------------------------------- train
class Precision(StrEnum):
    auto = "auto"  # bf16 where it is fast (CUDA; CPUs with AVX512-BF16 or AMX), else fp32 (hardware.resolve_precision)
    fp32 = "fp32"
    bf16 = "bf16"  # bf16 autocast around forward (FSDP2: bf16 all-gathers too); weights and optimizer state stay fp32


class ParallelMode(StrEnum):
    ddp = "ddp"  # DistributedDataParallel: every rank holds the whole model
    fsdp = "fsdp"  # FSDP2 fully_shard per block (parallelize.py)


class ActivationCheckpointing(StrEnum):
    """train.ac: what each transformer block keeps for the backward pass (parallelize.py; sizing.py sizes each)."""

    none = "none"  # everything autograd saves
    selective = "selective"  # matmul and attention outputs; norms, activations, elementwise ops are recomputed
    full = "full"  # only the block's input; the whole block is recomputed during its backward


class CkptFormat(StrEnum):
    auto = "auto"  # sharded under FSDP2 with several ranks, else full
    full = "full"  # one .pt file (FSDP2 shards gathered to rank 0)
    sharded = "sharded"  # one DCP folder, each rank writes its shards, reshardable on load


RESUME_KEYWORDS = ("none", "auto")  # train.resume: none | auto | a checkpoint file or folder


@dataclass
class TrainConfig:
    RULES: ClassVar[dict[str, Rule]] = {
        **dict.fromkeys(("max_steps", "batch_size", "grad_accum", "log_every", "eval_batches"), POSITIVE),
        **dict.fromkeys(("eval_answer_tokens", "dry_run_gpus", "dry_run_gpu_mem_gb", "matmul_peak_tflops"), POSITIVE),
        "dist_timeout_s": POSITIVE,
        **dict.fromkeys(("eval_every", "ckpt_every", "sample_count", "eval_problems", "sample_tokens"), OFF_AT_0),
        "ckpt_keep": Rule(lo=0, note="(0 = keep all)"),
        "sample_top_k": Rule(lo=0, note="(0 = every token)"),
        "max_nonfinite": Rule(lo=0, note="(0 = no guard)"),
        "grad_clip": Rule(lo=0, note="(0 disables clipping)"),
        "sample_temperature": Rule(lo=0, note="(0 = greedy)"),
        "resume": Rule(path=True, note="(none | auto | PATH)"),
        "eval_tasks_every": Rule(lo=0, note="(0 = at the end only)"),
        **dict.fromkeys(("eval_tasks_limit", "eval_tasks_max_gen_toks"), POSITIVE),
        "eval_tasks_fewshot": NON_NEGATIVE,
        "eval_tasks_data": PATH,
    }
    name: str = "default"
    seed: int = identity(1337)  # the data order (and the initial weights)
    max_steps: int = 2000
    batch_size: int = identity(32)  # sequences per micro-batch over all ranks (each rank: batch_size / world_size)
    grad_accum: int = identity(1)  # micro-batches per optimizer step (with batch_size: what a data position counts)
    grad_clip: float = 1.0  # 0 disables clipping
    device: str = placement("auto")  # auto | cpu | cuda | cuda:N | mps (not a closed set: cuda:N)
    parallel: ParallelMode = ParallelMode.ddp  # with several ranks
    precision: Precision = Precision.auto  # bf16 = autocast around forward (CUDA and CPU); auto: bf16 where fast
    compile: bool = False  # torch.compile each transformer block (fullgraph for dense blocks), not the whole model
    ac: ActivationCheckpointing = ActivationCheckpointing.none  # activation checkpointing: none | selective | full
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 500
    ckpt_keep: int = 2  # keep this many most recent step checkpoints; 0 = keep all
    ckpt_format: CkptFormat = CkptFormat.auto
    resume: str = placement("none")  # none | auto | PATH to a checkpoint file or directory
    # a fresh run (resume=none) refuses a run folder holding another run's checkpoints or metrics; true deletes
    # them first (the folder's checkpoints/, metrics.jsonl, summary.json)
    overwrite: bool = False
    log_every: int = 10
    progress_bar: bool = placement(True)  # shown only when stderr is a terminal (never in SLURM/submitit logs)
    sample_count: int = 2
    # exact-match evaluation, at every evaluation, of each source with answers (gsm8k, synthetic): its first
    # eval_problems validation problems, answered greedily in at most eval_answer_tokens tokens. 0 = off
    eval_problems: int = 64
    eval_answer_tokens: int = 96
    # lm-evaluation-harness tasks in the loop (scaletrain.harness; pip install 'scaletrain[eval]'): harness task
    # names, scaletrain's local_* tasks or task YAML paths, every eval_tasks_every steps (0: at the end only) and
    # at the end, on the first eval_tasks_limit documents of each (null: all), split over the ranks; logged as
    # downstream/<task>/<metric> (+ _stderr) and kept in summary.json. eval_tasks_data: the local tasks' data
    # folders (gsm8k_dir, tinystories_dir; +train.eval_tasks_data.<key>=... adds one for a task YAML of your own);
    # eval_tasks_max_gen_toks: caps a generative task's new tokens
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_every: int = 0
    eval_tasks_limit: int | None = 100
    eval_tasks_fewshot: int | None = None
    eval_tasks_max_gen_toks: int | None = None
    eval_tasks_data: dict[str, str | None] = placement(factory=lambda: {"gsm8k_dir": None, "tinystories_dir": None})
    sample_tokens: int = 120
    sample_temperature: float = 0.8
    sample_top_k: int = 50
    matmul_peak_tflops: float | None = None  # override the peak used for MFU
    measure_cpu_peak: bool = placement(True)  # on CPU, time a matmul at start-up to get a peak for MFU
    cpu_malloc_cache: bool = placement(True)  # on CPU, glibc malloc keeps freed memory (hardware.configure_cpu_malloc)
    # with several ranks: how long a collective waits for a peer (one that died or hangs) before the job fails
    # instead of hanging; longer than any checkpoint save (each rank writes and checksums only its share)
    dist_timeout_s: float = placement(1800.0)
    # size the run instead of training it (scaletrain/sizing.py, docs/sizing.md): parameters, FLOPs, per-GPU
    # memory on dry_run_gpus GPUs of dry_run_gpu_mem_gb each; no weights are allocated, no data is read
    dry_run: bool = False
    dry_run_gpus: int = 8
    dry_run_gpu_mem_gb: float = 80.0
    # a step whose loss or gradient norm is NaN/Inf is skipped (no optimizer or schedule step); after this many
    # in a row the run stops as failed. 0 = no guard (and no per-step host sync for it)
    max_nonfinite: int = 5

    def __post_init__(self) -> None:
        check_values(self, "train.")
        dev = self.device
        _check(
            dev in ("auto", "cpu", "mps", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
            "train.device",
            f"expected auto | cpu | cuda | cuda:N | mps, got {_show(dev)}"
            + suggest(dev, ["auto", "cpu", "cuda", "mps"]),
        )
        if self.eval_tasks:
            import importlib.util

            _check(
                importlib.util.find_spec("lm_eval") is not None,
                "train.eval_tasks",
                "needs lm-evaluation-harness, which is not installed: pip install 'scaletrain[eval]'",
            )
        modes = [m.value for m in ActivationCheckpointing]
        _check(
            self.ac in modes,  # OmegaConf checks this at compose time; a TrainConfig built in Python is checked here
            "train.ac",
            f"expected {' | '.join(modes)}, got {self.ac!r}" + suggest(str(self.ac), modes),
        )


# ---------------------------------------------------------------- logging
class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class WandbConfig:
    RULES: ClassVar[dict[str, Rule]] = {"dir": PATH}
    mode: WandbMode = WandbMode.offline
    project: str = "scaletrain"
    entity: str | None = None
    group: str | None = None
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    name: str | None = None  # None = the swept keys of a sweep job, or model-optim for a single run
    dir: str | None = None  # None = the run directory


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ---------------------------------------------------------------- cluster
@dataclass
class ClusterConfig:
    """Where the jobs of a sweep run and with what resources (conf/cluster/*.yaml). The launcher
    (`hydra.launcher`: submitit_local or submitit_slurm) reads these by interpolation, and only under
    `-m`; the trainer reads the rank/requeue fields. One rank per GPU: tasks_per_node = gpus_per_node."""

    RULES: ClassVar[dict[str, Rule]] = {
        **dict.fromkeys(("nodes", "timeout_min", "array_parallelism"), Rule(lo=1)),
        "tasks_per_node": Rule(lo=1, note="(ranks per node)"),
        **dict.fromkeys(("gpus_per_node", "max_requeues", "signal_delay_s"), NON_NEGATIVE),
        "cpus_per_task": Rule(lo=1, note="(null = the scheduler's default)"),
        "mem_gb": Rule(lo=1, note="(null = the scheduler's default)"),
        "parallel_jobs": Rule(lo=1, note="(null = auto)"),
        "additional_parameters": Rule(empty=True),  # a flag without a value: {exclusive: ""}
        "setup": Rule(empty=True),  # shell lines: an empty one is harmless
    }
    name: str = "local"
    nodes: int = 1
    gpus_per_node: int = 0  # GPUs of each node per job (local: per job); every GPU is a rank
    tasks_per_node: int = 1  # ranks per node: = gpus_per_node on GPUs; on CPU, the gloo processes per job
    cpus_per_task: int | None = None  # None = the scheduler's default
    mem_gb: int | None = None  # per node; None = the scheduler's default
    timeout_min: int = 240  # time limit per job attempt (a requeued job gets it again)
    max_requeues: int = 20  # preemptions / time limits a job may be requeued after; then it stops
    signal_delay_s: int = 120  # SLURM sends USR2 this long before the time limit: time to checkpoint
    partition: str | None = None  # SLURM only, from here on
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = 256  # jobs of the sweep's array running at once
    additional_parameters: dict[str, str] = field(default_factory=dict)  # more sbatch flags: {mail-type: END}
    setup: list[str] = field(default_factory=list)  # shell lines in the sbatch script before srun
    parallel_jobs: int | None = None  # local only: jobs at once; None = all GPUs busy (CPU: 1)

    def __post_init__(self) -> None:
        check_values(self, "cluster.")
        c = self
        _check(
            c.gpus_per_node == 0 or c.tasks_per_node == c.gpus_per_node,
            "cluster.tasks_per_node",
            f"one rank per GPU: must equal cluster.gpus_per_node={c.gpus_per_node}, got {c.tasks_per_node}",
        )
        _check(
            c.nodes == 1 or c.name != "local", "cluster.nodes", "cluster=local runs on this machine: nodes must be 1"
        )


# ---------------------------------------------------------------- study (python -m scaletrain.study)
class StudyMatch(StrEnum):
    """study.match: the budget every arm gets, as train.max_steps per arm (each run fully decayed at its length)."""

    tokens = "tokens"  # the recipe's train.max_steps for every arm: the same tokens in the same order
    flops = "flops"  # each arm's steps x (model + optimizer FLOPs per step) = the reference arm's
    time = "time"  # each arm's steps x (its measured seconds per step) = the reference arm's (a short pace run)


@dataclass
class StudyArmConfig:
    """One arm of a study: the overrides that make it, and optionally the key tuned on the study's grid."""

    RULES: ClassVar[dict[str, Rule]] = {"grid": POSITIVE}
    overrides: list[str] = field(default_factory=list)  # e.g. [optim=muon]
    tune: str | None = None  # the swept key, e.g. optim.lr or optim.muon.lr; null: not tuned
    grid: list[float] = field(default_factory=list)  # values of `tune` (widened past a winning edge)
    inherit: dict[str, str] = field(default_factory=dict)  # key -> arm whose tuned value of that key this arm takes


@dataclass
class StudyConfig:
    """What `python -m scaletrain.study experiment=<recipe>` runs: each arm tuned on `tune_seed` (never an evaluation
    seed), then every arm at its tuned values on the paired `seeds`, then the report. Arms see the same tokens
    (same steps, batch and sequence length) in the same order for a seed; FLOPs and time are accounted."""

    RULES: ClassVar[dict[str, Rule]] = {  # tune_seed and seeds: seeds, as every seed
        "max_widen": NON_NEGATIVE,
        "min_grid": NON_NEGATIVE,
        "max_spacing": Rule(lo=1, lo_open=True),
        "dir": PATH,
        "pace_steps": Rule(lo=5, note="(a median over steps)"),
    }
    arms: dict[str, StudyArmConfig] = field(default_factory=dict)
    tune_seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    select: str = "val/loss"  # tuning criterion: the final value of this metric (lower is better, unless accuracy)
    metrics: list[str] = field(default_factory=list)  # also compared in the report, e.g. 'val/x/exact_match>=0.3'
    max_widen: int = 2  # grid points added past a winning edge, at most
    min_grid: int = 4  # a tuned arm's grid has at least this many points ...
    max_spacing: float = 2.0  # ... at most this ratio apart
    dir: str = "studies/${experiment}"  # the study folder (resolved against the working directory)
    match: StudyMatch = StudyMatch.tokens  # what the arms are given equally (the others are reported beside it)
    reference: str | None = None  # the arm that trains the recipe's train.max_steps (default: the first arm)
    pace_steps: int = 30  # match=time: steps of each arm's pace run (seconds per step: the median after the first)

    def __post_init__(self) -> None:
        check_values(self, "study.")
        _check(bool(self.arms) and len(self.arms) >= 2, "study.arms", "a study needs at least 2 arms")
        _check(
            self.tune_seed not in self.seeds,
            "study.tune_seed",
            f"{self.tune_seed} is also an evaluation seed "
            f"(study.seeds={self.seeds}): tuning and evaluation must not share a seed",
        )
        _check(
            len(set(self.seeds)) == len(self.seeds) and len(self.seeds) >= 2,
            "study.seeds",
            f"needs at least 2 distinct seeds, got {self.seeds}",
        )
        _check(
            self.reference is None or self.reference in self.arms,
            "study.reference",
            f"names arm {_show(self.reference)}; expected one of {sorted(self.arms)}",
        )
        for name, arm in self.arms.items():
            key = f"study.arms.{name}"
            budget = [o for o in arm.overrides if o.partition("=")[0].lstrip("+~") == "train.max_steps"]
            _check(
                not budget or self.match == StudyMatch.tokens,
                f"{key}.overrides",
                f"{budget[0] if budget else ''} sets the arm's length, which study.match={self.match} derives; "
                "remove it or use study.match=tokens",
            )
            if arm.tune is None:
                _check(not arm.grid, f"{key}.grid", "given without study.arms.<arm>.tune (the key it sweeps)")
            else:
                grid = sorted(arm.grid)
                _check(all(v > 0 for v in grid), f"{key}.grid", f"values must be positive, got {arm.grid}")
                _check(
                    len(grid) >= self.min_grid,
                    f"{key}.grid",
                    f"has {len(grid)} points; a tuned arm needs at least study.min_grid={self.min_grid}",
                )
                ratios = [b / a for a, b in zip(grid, grid[1:], strict=False)]
                _check(
                    all(r <= self.max_spacing * (1 + 1e-9) for r in ratios),
                    f"{key}.grid",
                    f"points more than study.max_spacing={self.max_spacing}x apart: {grid}",
                )
            for inherited, source in arm.inherit.items():
                _check(
                    source in self.arms and source != name,
                    f"{key}.inherit.{inherited}",
                    f"names arm {_show(source)}; expected another arm of {sorted(self.arms)}",
                )
                _check(
                    self.arms[source].tune == inherited,
                    f"{key}.inherit.{inherited}",
                    f"arm {source!r} does not tune {inherited} (it tunes {_show(self.arms[source].tune)})",
                )


# ---------------------------------------------------------------- root
@dataclass
class Config:
    """The root. Each field's Resume role is its group's: a field inside says otherwise where it differs."""

    model: ModelConfig = identity(factory=ModelConfig)
    moe: MoEConfig = identity(factory=MoEConfig)
    optim: OptimConfig = hyperparameter(MISSING)  # the `optim` group picks the schema (adamw_schema, muon_schema, ...)
    data: DataConfig = hyperparameter(factory=DataConfig)
    cluster: ClusterConfig = placement(factory=ClusterConfig)
    train: TrainConfig = hyperparameter(factory=TrainConfig)
    logging: LoggingConfig = placement(factory=LoggingConfig)
    experiment: str | None = placement(None)  # name of the experiment recipe, set by conf/experiment/*.yaml
    study: StudyConfig | None = hyperparameter(None)  # set by study recipes (python -m scaletrain.study)

    def __post_init__(self) -> None:
        """Rules spanning groups (each group's own rules ran in its __post_init__), after every value's own rule
        (`check_values`: the groups without rules of their own, logging and experiment, are checked here)."""
        check_values(self, "")
        _check(bool(self.data.sources), "data.sources", "no source; expected at least one (see conf/data/*.yaml)")
        _check(
            self.model.max_seq_len is None or self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            f"{self.data.seq_len} is longer than the model's context model.max_seq_len={self.model.max_seq_len}; "
            "train on windows of at most that length (or raise model.max_seq_len)",
        )
        c = self.cluster
        whose = f"cluster.nodes={c.nodes} x cluster.tasks_per_node={c.tasks_per_node}"
        check_batch_split(self.train.batch_size, c.nodes * c.tasks_per_node, whose)
        tok = self.data.tokenizer
        ids, which = (GPT2_VOCAB_SIZE, "GPT-2's") if tok.kind == TokenizerKind.gpt2 else (tok.vocab_size, "the BPE's")
        _check(
            self.model.vocab_size is None or self.model.vocab_size >= ids,
            "model.vocab_size",
            f"{self.model.vocab_size} cannot hold {which} {ids} token ids (data.tokenizer); use null (= the "
            f"tokenizer's size) or at least {ids}",
        )
        if self.moe.n_experts > 0:
            _check(
                self.moe.every <= self.model.n_layers,
                "moe.every",
                f"must be in [1, model.n_layers={self.model.n_layers}], got {self.moe.every}",
            )


def _extension_node(cls: type, parent: type) -> DictConfig:
    """`cls`'s schema with the fields it inherits from `parent` left MISSING, so that a YAML can stack it on
    its parent's options (`defaults: [adamw, muon_schema]`): merging it adds cls's type and new fields and
    keeps the values already composed (OmegaConf does not overwrite a value with MISSING)."""
    node = OmegaConf.structured(cls)
    for f in fields(parent):
        if f.name not in ("name", "_target_"):  # the option's own identity replaces its parent's
            node[f.name] = MISSING
    return node


COMPONENT_BASES: tuple[type[ComponentConfig], ...] = ()  # set below, once the bases are defined


def register_configs() -> None:
    """Import the plugins (plugins.py), then store the root schema (`scaletrain_schema`) and every component
    schema in its group (`optim/<name>_schema`, `model/attention/<name>_schema`, `model/mlp/<name>_schema`),
    built-ins and plugins alike; and `scaletrain_hydra`, Hydra's settings computed from the schemas (the keys
    override_dirname leaves out: `override_dirname_exclude`)."""
    from hydra.core.config_store import ConfigStore

    from scaletrain.plugins import load_plugins

    load_plugins()
    cs = ConfigStore.instance()
    cs.store(name="scaletrain_schema", node=Config)
    exclude = {"exclude_keys": override_dirname_exclude()}
    cs.store(name="scaletrain_hydra", node={"hydra": {"job": {"config": {"override_dirname": exclude}}}})
    for base in COMPONENT_BASES:
        for name, cls in component_schemas(base).items():
            parent = cls.__mro__[1]
            # a schema stacked on a concrete option (muon on adamw) keeps the values composed before it
            node = _extension_node(cls, parent) if parent is not base and parent is not ComponentConfig else cls
            cs.store(group=base.GROUP, name=f"{name}_schema", node=node)


COMPONENT_BASES = (AttentionConfig, MLPConfig, OptimConfig)


def _unknown_keys(node: Any, path: str) -> list[str]:
    """Keys present in a composed config that its schema does not define (Hydra's `+key=value` force-adds
    them even in struct mode; `to_object` would then drop them without a word). Walks the nodes as composed:
    interpolations and MISSING values are not resolved here (`to_object` reports those, naming the key)."""
    if isinstance(node, ListConfig):
        return [e for i in range(len(node)) if _plain(node, i) for e in _unknown_keys(node[i], f"{path}[{i}]")]
    if not isinstance(node, DictConfig):
        return []
    schema = OmegaConf.get_type(node)
    errors = []
    known = [f.name for f in fields(schema)] if schema is not None and is_dataclass(schema) else None
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if known is not None and key not in known:
            kind = schema.__name__ if schema else "dict"
            errors.append(f"{full}: not a key of {kind}{suggest(str(key), known)}; valid keys: {', '.join(known)}")
            continue
        if _plain(node, key):
            errors.extend(_unknown_keys(node[key], full))  # a container comes back as its node, unresolved
    return errors


def _plain(node: DictConfig | ListConfig, key: Any) -> bool:
    """Whether `node[key]` reads a value as written: neither MISSING nor an interpolation (which it would resolve)."""
    return not OmegaConf.is_missing(node, key) and not OmegaConf.is_interpolation(node, key)


def load_config(cfg: DictConfig | Config) -> Config:
    """The one conversion: composed DictConfig -> `Config` dataclasses, every rule checked. Raises
    ConfigError naming the key. A `Config` passes through (its rules ran when it was built)."""
    if isinstance(cfg, Config):
        return cfg
    unknown = _unknown_keys(cfg, "")
    if unknown:
        raise ConfigError(unknown[0] if len(unknown) == 1 else "unknown keys:\n  " + "\n  ".join(unknown))
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:  # a MISSING value or a failed interpolation: OmegaConf names the key
        raise ConfigError(str(err).split("\n")[0]) from err
    if not isinstance(obj, Config):
        raise ConfigError(f"expected the scaletrain schema at the root, got {type(obj).__name__}")
    return obj


def unwritable(path: str | Path) -> str | None:
    """Why a run could not create files in folder `path` (None when it can), found without leaving anything
    behind: the folder itself when it exists, else the nearest existing folder above it, must take a new
    entry. Run before the work that would fail there later (hydra.run.dir, data.cache_dir)."""
    path = Path(path).expanduser().absolute()
    too_long = path_problem(path)
    if too_long:
        return f"the path {too_long}"
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as err:  # a folder above it that cannot be searched (EACCES), a loop of links (ELOOP), ...
        return f"cannot check {err.filename or path} ({err.strerror})"
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".scaletrain-probe-").cleanup()
    except OSError as err:
        return f"cannot create {'files in' if existing == path else 'folders under'} {existing} ({err.strerror})"
    return None


def to_dict(cfg: Config | DictConfig) -> dict:
    """Plain JSON-able dict (enums as strings) for run records, checkpoints and W&B."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[return-value]
