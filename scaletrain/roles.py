"""Parameter roles, declared once by the module that owns the parameter.

A role says what a parameter is (a hidden matrix, an embedding table, a norm gain, ...). Everything that treats
parameters differently reads it from here: the initialization (`Role.init`), the optimizer split (Muon vs AdamW
and the weight-decay groups: `Role.group`), FLOPs per token and sizing (`Role.matmul`), and the audit table
printed at start. Nothing decides by parameter name anywhere else.

How a module declares: a method `param_roles(self) -> Mapping[str, Role]` naming its parameters relative to
itself (its own `w_router_ED`, or a child's `wq.weight`). torch's unambiguous leaf modules have defaults here
(`nn.Embedding`, `nn.LayerNorm`, `nn.RMSNorm`: `LEAF_ROLES`); an `nn.Linear` has none, because the same layer
is a hidden matrix in a block and the unembedding at the top: its owner says which. The nearest declaring
module wins (a block's declaration over the model's), a leaf default only fills what no owner declared. A
parameter nobody declares, or a declaration naming no parameter, is an error naming it: a user module that
forgets a role fails at build time instead of being silently decayed, orthogonalized or initialized wrongly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import cast

from torch import nn

from scaletrain.config import BadInput

# module names that wrappers insert (DDP's module, compile's _orig_mod, FSDP/AC wrappers): not part of a name
WRAPPERS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


class Role(StrEnum):
    embedding = "embedding"  # token lookup table [V, C]
    embedding_proj = "embedding_proj"  # W_e: embedding width -> d_model
    hidden = "hidden"  # a block's matrix that reads the residual stream (q, k, v, MLP up/gate)
    hidden_out = "hidden_out"  # a block's matrix that writes into the residual stream (attention / MLP output)
    expert = "expert"  # stacked MoE expert matrices [E, d_in, d_out] (x @ w), reading the stream
    expert_out = "expert_out"  # stacked expert output matrices, writing into the stream
    router = "router"  # MoE router [E, D]
    unembedding = "unembedding"  # W_ue: d_model -> vocabulary logits
    norm = "norm"  # norm gains
    bias = "bias"  # additive biases (Linear, LayerNorm, stacked expert biases)

    @property
    def group(self) -> str:
        """The optimizer group: Muon takes hidden (and per-expert) matrices; AdamW the rest, decaying the linear
        maps and not the lookup table, norms or biases (nanoGPT / OLMo), so adamw and muon runs decay alike."""
        return _GROUP[self]

    @property
    def decay(self) -> bool:
        return self.group != "adamw_no_decay"

    @property
    def matmul(self) -> bool:
        """Multiplies activations in every forward (6 FLOPs per weight per token in training)."""
        return self not in (Role.embedding, Role.norm, Role.bias)

    def init(self, std: float, n_layers: int) -> tuple[str, float]:
        """GPT-2's initialization: ("normal", std) for N(0, std), or ("fill", value). Matrices writing into the
        residual stream are scaled by 1/sqrt(2 * n_layers) (two residual writes per block)."""
        if self is Role.norm:
            return "fill", 1.0
        if self is Role.bias:
            return "fill", 0.0
        if self in (Role.hidden_out, Role.expert_out):
            return "normal", std / math.sqrt(2 * n_layers)
        return "normal", std


_GROUP = {
    Role.hidden: "muon",
    Role.hidden_out: "muon",
    Role.expert: "muon_experts",  # Newton-Schulz per expert
    Role.expert_out: "muon_experts",
    Role.embedding_proj: "adamw_decay",
    Role.unembedding: "adamw_decay",
    Role.router: "adamw_decay",
    Role.embedding: "adamw_no_decay",
    Role.norm: "adamw_no_decay",
    Role.bias: "adamw_no_decay",
}
GROUPS = ("muon", "muon_experts", "adamw_decay", "adamw_no_decay")

LEAF_ROLES: dict[type[nn.Module], dict[str, Role]] = {
    nn.Embedding: {"weight": Role.embedding},
    nn.LayerNorm: {"weight": Role.norm, "bias": Role.bias},
    nn.RMSNorm: {"weight": Role.norm},
}


@dataclass(frozen=True)
class ParamRole:
    name: str  # the parameter's name in the model, wrappers left out
    param: nn.Parameter
    role: Role

    @property
    def group(self) -> str:
        return self.role.group


class RoleError(BadInput, ValueError):
    """A parameter without a declared role, or a declaration that names no parameter."""

    kind = "model"


def plain_name(name: str) -> str:
    """A parameter or module name without the parts wrappers insert (`blocks.0._checkpoint_wrapped_module.attn`)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPERS)


def _some_names(module: nn.Module, most: int = 8) -> str:
    names = [n for n, _ in module.named_parameters()]
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "") or "none"


def _resolve(module: nn.Module, rel: str, mpath: str) -> nn.Parameter | None:
    """The parameter `rel` (dotted, relative to `module`) names; None where an optional part is absent (a Linear
    built without bias, a q_norm that is None); an error where the name does not exist at all (a typo)."""
    obj: object = module
    for part in rel.split("."):
        if not hasattr(obj, part):
            raise RoleError(
                f"{type(module).__name__}.param_roles() at {mpath or '<model>'} names {rel!r}, which is not one of "
                f"its parameters ({_some_names(module)})"
            )
        obj = getattr(obj, part)
        if obj is None:
            return None
    if not isinstance(obj, nn.Parameter):
        raise RoleError(f"{type(module).__name__}.param_roles() at {mpath or '<model>'}: {rel!r} is not a parameter")
    return obj


def _declared(model: nn.Module) -> dict[str, Role]:
    """Plain parameter name -> role, from every module's declaration (nearest owner wins) and the leaf defaults."""
    own: dict[str, Role] = {}
    leaf: dict[str, Role] = {}
    for mpath, module in model.named_modules():  # pre-order: an owner before its children
        prefix = f"{plain_name(mpath)}." if plain_name(mpath) else ""
        declare = getattr(module, "param_roles", None)
        table = cast("Mapping[str, Role] | None", declare() if callable(declare) else None)
        target = own
        if table is None:
            table, target = LEAF_ROLES.get(type(module)), leaf
        for rel, role in (table or {}).items():
            if _resolve(module, rel, mpath) is not None:  # None: an optional parameter this module was built without
                target[prefix + plain_name(rel)] = Role(role)
    return {**leaf, **own}


def param_roles(model: nn.Module, tied: bool = False) -> list[ParamRole]:
    """Every trainable parameter with its role, in the model's parameter order. `tied=False`: a tensor shared by
    two names (tied embeddings) once, under its first name; `tied=True`: under every name (FLOPs count each use)."""
    declared = _declared(model)
    out = []
    for name, p in model.named_parameters(remove_duplicate=not tied):
        if not p.requires_grad:
            continue
        plain = plain_name(name)
        role = declared.get(plain)
        if role is None:
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            raise RoleError(
                f"parameter {plain} (shape {list(p.shape)}, in {type(owner).__name__}) has no role: declare it in "
                f"the owning module's param_roles() (roles: {', '.join(Role)}; see scaletrain/roles.py)"
            )
        out.append(ParamRole(plain, p, role))
    return out


def format_param_split(model: nn.Module) -> str:
    """The audit table printed at start: one line per parameter (group, name, shape, role), then totals."""
    roles = param_roles(model)
    width = max(len(r.name) for r in roles)
    lines = ["optimizer split (group  parameter  shape  role):"]
    lines += [f"  {r.group:<14} {r.name:<{width}}  {str(list(r.param.shape)):<14} {r.role}" for r in roles]
    for g in GROUPS:
        members = [r.param for r in roles if r.group == g]
        lines.append(f"  total {g}: {len(members)} tensors, {sum(p.numel() for p in members) / 1e6:.3f}M parameters")
    return "\n".join(lines)
