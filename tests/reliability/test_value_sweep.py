"""A sweep of bad command-line values, key by key (issue 28). Every key of every schema (the leaves of the config
composed with each option set that brings a schema in: optim=muon, moe=top2_8e, cluster=slurm, synthetic and GSM8K
data, a study recipe, every option of the component groups, plugins' included) gets type-correct but extreme values:
0, -1, 2**32, 10**30 for an int; 0, -1, 1e300, nan, inf, -inf for a float; '', ' ' and 5000 characters for a string;
'' for an enum; [] and one bad item for a list; {} and one empty entry for a dict; nothing for a bool.

Every case ends accepted or in exactly the one line `preflight` prints (`<kind> error: <message>` naming the key;
then exit code 2), within CASE_TIMEOUT_S; and it must be refused where the value is invalid in itself: a non-finite
float, an int beyond 64 bits, an empty string, a name longer than NAME_MAX in a path, and any value the field's own
rule refuses (`config.value_rule`: seeds within numpy's range, sizes positive, probabilities in [0, 1], ...).

Two layers, for time (one `preflight` composes the whole config: ~0.5 s on a 2-core machine): every case is applied
to a config composed once per option set, as Hydra applies key=value after composing the defaults (its override
parser, then `OmegaConf.update(..., merge=True)` in struct mode), converted as `preflight` converts it
(`load_config`), and what that raises becomes `preflight`'s line (`run.error_line`); a seeded sample of the cases
then runs through `run.preflight` itself, which must agree: the same verdict, exit code 2, that line alone.

Sizes valid in themselves but absurd for a machine (model.d_model=2**32) are accepted here: refusing them is the
resource check's job (sizing against device and host memory, before data preparation). LEFT_TO_RESOURCE_CHECK names
those keys, HARMLESS_WHEN_HUGE the others whose huge values are legal; a key that accepts 2**32 must be in one."""

from __future__ import annotations

import copy
import dataclasses
import enum
import random
import signal
import time
import types
import typing
from dataclasses import dataclass

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scaletrain import run
from scaletrain.config import COMPONENT_BASES, component_schemas, load_config, value_rule

from ..conftest import NO_LOCAL, compose_cfg

fault = pytest.mark.fault
SEED = 2028  # the preflight sample's draw
CASE_TIMEOUT_S = 5.0  # a case slower than this hangs (the slowest takes ~0.2 s on a loaded 2-core machine)
PREFLIGHT_SAMPLE = 24  # cases also run through run.preflight: 3/4 refused ones, 1/4 accepted ones
BASE = ("debug=cpu_tiny", NO_LOCAL)
# (the keys it owns, the option set): each key is swept once, with the first set whose prefix it starts with
OPTION_SETS: list[tuple[str, tuple[str, ...]]] = [
    ("optim.", (*BASE, "optim=muon")),  # AdamW's keys and Muon's
    ("moe.", (*BASE, "moe=top2_8e")),  # the MoE rules apply with experts only
    ("cluster.", (*BASE, "cluster=slurm")),
    ("data.sources.reasoning.", (*BASE, "data=synthetic_reasoning")),  # knobs are checked for synthetic data only
    ("data.sources.gsm8k.", (*BASE, "data=gsm8k")),
    ("study.", (*BASE, "experiment=muon_vs_adamw")),
    *(  # every option of the component groups, plugins' too: their own keys
        (f"{base.GROUP.replace('/', '.')}.", (*BASE, f"{base.GROUP}={name}"))
        for base in COMPONENT_BASES
        for name in sorted(component_schemas(base))
    ),
    ("", BASE),
]
HUGE = 2**32  # within 64 bits, beyond numpy's seeds: absurd for a size, harmless for a cadence
# Keys whose huge values the schemas accept and the resource check must refuse (or size: a 2**32 vocabulary, a
# 2**32-long validation cap are memory, or time, questions of a machine, not invalid in themselves).
LEFT_TO_RESOURCE_CHECK = {
    "model.d_model", "model.n_layers", "model.n_heads", "model.d_ff", "model.n_embed", "model.n_kv_heads",
    "model.max_seq_len", "model.vocab_size", "moe.n_experts", "moe.d_expert", "moe.n_shared",
    "data.seq_len", "data.tokenizer.vocab_size", "data.num_proc", "data.max_val_tokens",
    "train.batch_size", "train.grad_accum", "train.eval_batches", "train.eval_problems", "train.eval_answer_tokens",
    "train.sample_count", "train.sample_tokens", "train.dry_run_gpus",
    "data.sources.*.synthetic.n_train", "data.sources.*.synthetic.n_val",
    "cluster.nodes", "cluster.gpus_per_node", "cluster.tasks_per_node", "cluster.cpus_per_task", "cluster.mem_gb",
    "cluster.parallel_jobs", "cluster.array_parallelism",
}  # fmt: skip
HARMLESS_WHEN_HUGE = {
    "train.max_steps",  # a long run: time, not memory (a signal or a time limit stops it, resumable)
    "train.eval_every", "train.ckpt_every", "train.ckpt_keep", "train.log_every", "train.max_nonfinite",  # never
    "train.sample_top_k",  # more than the vocabulary: every token
    "train.eval_tasks_every", "train.eval_tasks_limit",  # never / every document
    "train.eval_tasks_fewshot",  # more examples than fit: the harness's left-truncation keeps the question
    "train.eval_tasks_max_gen_toks",  # with train.eval_tasks, refused at the run's start against the model's context
    "optim.schedule.warmup_steps", "moe.every", "data.tokenizer.max_train_bytes",  # more than there is: all of it
    "cluster.timeout_min", "cluster.max_requeues", "cluster.signal_delay_s",  # the scheduler's own limits apply
    "study.max_widen", "study.min_grid", "study.pace_steps",  # a study's budget (its own rules relate them)
    "data.sources.*.synthetic.seed",  # within numpy's range: a seed like any other
    *(f"data.sources.*.synthetic.{knob}" for knob in (  # ignored by text sources (synthetic ones bound them:
        "arithmetic.steps", "arithmetic.max_operand", "arithmetic.max_value", "arithmetic.allow_negative",  # data/
        "comparison.n_entities", "boolean.depth", "boolean.n_vars", "deduction.hops", "deduction.n_distractors",
    )),  # synthetic.py)
}  # fmt: skip
PATH_KEYS = {  # files and folders: a name longer than NAME_MAX must be refused (ENAMETOOLONG at first use otherwise)
    "data.path", "data.cache_dir", "data.tokenizer.gpt2_dir", "data.sources.*.path", "model.init_from_hf",
    "train.resume", "logging.wandb.dir", "study.dir",
}  # fmt: skip
EMPTY_ALLOWED = {"cluster.setup", "cluster.additional_parameters"}  # a blank shell line; a flag without a value
# refusals by a rule relating keys, whose message names another key than the one swept
NAMED_INSTEAD = {
    # 2**32 ranks cannot share the batch of 8 (train.batch_size); under cluster=slurm tasks_per_node follows
    # gpus_per_node (${cluster.gpus_per_node}), so gpus_per_node=0 leaves it 0
    "cluster.gpus_per_node": ("train.batch_size", "cluster.tasks_per_node"),
    "cluster.tasks_per_node": ("train.batch_size",),
    "cluster.nodes": ("train.batch_size",),
    "data.sources.*.weight": ("data.sources: the weights sum to 0",),  # the only source's weight 0
    "study.arms.*.tune": ("study.arms.muon.inherit.optim.lr: arm 'adamw' does not tune optim.lr",),  # muon inherits
}
LONG = "x" * 5000
MAX_LINE = 500  # characters in a refusal's line
VALUES: dict[object, list[str]] = {
    int: ["0", "-1", str(HUGE), str(10**30)],
    float: ["0.0", "-1.0", "1e300", "nan", "inf", "-inf"],
    str: ["''", "' '", LONG],
}
ALWAYS_REFUSED = {"nan", "inf", "-inf", str(10**30), "''", "' '", "[nan]", "['']", "{x: ''}"}  # but EMPTY_ALLOWED


@dataclass
class Case:
    options: tuple[str, ...]  # the option set
    key: str
    value: str  # as the command line writes it
    must_refuse: bool
    line: str | None = None  # preflight's one line; None: accepted
    seconds: float = 0.0

    @property
    def override(self) -> str:
        return f"{self.key}={self.value}"

    @property
    def overrides(self) -> list[str]:
        return [*self.options, self.override]


def pattern(key: str) -> str:
    """The key with a source's or a study arm's name as `*`, as the lists above name keys."""
    parts = key.split(".")
    named = parts[:2] in (["data", "sources"], ["study", "arms"]) and len(parts) > 3
    return ".".join([*parts[:2], "*", *parts[3:]]) if named else key


# ------------------------------------------------------------------------------------------ the cases


def _leaves(node: DictConfig, prefix: str = "") -> list[tuple[str, type, str]]:
    """(key, schema, field name) of every leaf under a composed schema node: values, lists and plain dicts (a dict
    of schemas, data.sources or study.arms, is walked); a schema that is not set (study: null) has none."""
    schema = OmegaConf.get_type(node)
    out: list[tuple[str, type, str]] = []
    for name in map(str, node.keys()):
        key, child = f"{prefix}{name}", None if OmegaConf.is_interpolation(node, name) else node._get_node(name)
        if isinstance(child, DictConfig) and child._is_none():
            continue
        if isinstance(child, DictConfig) and _is_schema(OmegaConf.get_type(child)):
            out.extend(_leaves(child, f"{key}."))
        elif isinstance(child, DictConfig) and _is_schema(child._metadata.element_type):
            entries = {str(entry): child[entry] for entry in child.keys()}
            out.extend(kv for entry, item in entries.items() for kv in _leaves(item, f"{key}.{entry}."))
        else:
            out.append((key, schema, name))  # type: ignore[arg-type]
    return out


def _is_schema(tp: object) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_type(schema: type, name: str) -> typing.Any:
    tp = typing.get_type_hints(schema)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional: the value's type
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _values(tp: typing.Any) -> list[str]:
    """The extreme values of a field's type, as the command line writes them."""
    if typing.get_origin(tp) is list:
        return ["[]", f"[{ {int: '-1', float: 'nan', str: chr(39) * 2}[typing.get_args(tp)[0]] }]"]
    if typing.get_origin(tp) is dict:
        return ["{}", "{x: ''}"]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return ["''"]
    if tp is bool:
        return []  # no extreme value: true or false
    if tp not in VALUES:  # a schema field of a type the sweep does not know yet: give it extreme values here
        raise TypeError(f"no extreme values for {tp}")
    return VALUES[tp]


def _must_refuse(key: str, schema: type, name: str, value: str) -> bool:
    """Invalid in itself, whatever the other keys say (see the module docstring)."""
    if pattern(key) in EMPTY_ALLOWED:
        return False
    if value in ALWAYS_REFUSED:
        return True
    if value == LONG:
        return pattern(key) in PATH_KEYS
    number = value.strip("[]")
    try:
        return not value_rule(schema, name).admits(float(number))
    except ValueError:
        return False  # [], {}: the schema's rules relating keys decide


def all_cases() -> tuple[list[Case], dict[tuple[str, ...], DictConfig]]:
    """Every key, swept with the first option set that owns it, with every extreme value of its type; and the
    config each option set composes to."""
    cases: list[Case] = []
    swept: set[str] = set()
    composed = {options: compose_cfg(list(options)) for _, options in OPTION_SETS}
    for owned, options in OPTION_SETS:
        for key, schema, name in _leaves(composed[options]):
            if key.startswith(owned) and key not in swept:
                swept.add(key)
                values = _values(_field_type(schema, name))
                cases += [Case(options, key, v, _must_refuse(key, schema, name, v)) for v in values]
    return cases, composed


# ------------------------------------------------------------------------------------------ running a case


def _on_alarm(signum: int, frame: object) -> None:
    raise TimeoutError(f"a case took more than {CASE_TIMEOUT_S} s")


def _timed(case: Case, fn: typing.Callable[[], typing.Any]) -> typing.Any:
    """fn(), stopped after CASE_TIMEOUT_S (SIGALRM: pytest runs tests in the main thread); its time in the case."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
    start = time.perf_counter()
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        case.seconds = time.perf_counter() - start


def apply_and_check(composed: DictConfig, case: Case) -> str | None:
    """The case on a copy of its option set's composed config, as Hydra applies key=value, then load_config:
    preflight's line for what was raised (None: accepted). Anything but bad input is a bug: it propagates."""
    cfg = copy.deepcopy(composed)
    try:
        [override] = OverridesParser.create().parse_overrides([case.override])
        try:
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
        except OmegaConfBaseException as err:  # as Hydra's config loader wraps it (_apply_overrides_to_config)
            raise ConfigCompositionException(f"Error merging override {case.override}") from err
        load_config(cfg)
    except Exception as err:
        line = run.error_line(err, case.overrides)
        if line is None:
            raise
        return line
    return None


@pytest.fixture(scope="module")
def swept() -> list[Case]:
    """Every case, each on its option set's config composed once; the size and time are printed (pytest -s)."""
    start = time.perf_counter()
    cases, composed = all_cases()
    load_config(composed[BASE])  # once untimed: the first conversion imports each _target_'s module (torch)
    for case in cases:
        case.line = _timed(case, lambda case=case: apply_and_check(composed[case.options], case))
    refused, slowest = sum(c.line is not None for c in cases), max(cases, key=lambda c: c.seconds)
    print(
        f"\nvalue sweep: {len(cases)} cases over {len({c.key for c in cases})} keys, {refused} refused, "
        f"{time.perf_counter() - start:.1f} s (slowest: {slowest.override[:60]}, {slowest.seconds:.2f} s)"
    )
    return cases


@fault(
    "a sweep of extreme values (0, -1, 2**32, 10**30, nan, inf, '', 5000 characters, []) for every key of every schema",
    "each accepted, or refused in one short line naming the key (exit 2), within 5 s; refused where invalid in itself",
)
def test_every_key_accepts_an_extreme_value_or_refuses_it_in_one_line_naming_the_key(swept):
    wrong = []
    for case in swept:
        if case.line is None:
            wrong += [f"{case.override[:80]} ({case.options[-1]}): accepted"] if case.must_refuse else []
            continue
        kind, _, message = case.line.partition(" error: ")
        named = case.key in message or any(other in message for other in NAMED_INSTEAD.get(pattern(case.key), ()))
        short = len(case.line) <= MAX_LINE  # a 5000-character value is quoted shortened
        if not (kind == "config" and "\n" not in case.line and named and short):
            wrong.append(f"{case.override[:80]} ({case.options[-1]}): {case.line[:300]}")
    assert not wrong, "\n".join(wrong)
    huge = {pattern(c.key) for c in swept if c.value == str(HUGE) and c.line is None}
    assert not huge - LEFT_TO_RESOURCE_CHECK - HARMLESS_WHEN_HUGE, f"keys accepting {HUGE} that no list names"


@fault(
    "a seeded sample of that sweep through `preflight` (what the command runs before Hydra starts)",
    "the same verdict; a refusal: SystemExit(2) and exactly that one line on stderr",
)
def test_preflight_agrees_with_the_sweep_on_a_seeded_sample(swept, capsys):
    rng = random.Random(SEED)
    refused, accepted = [c for c in swept if c.line is not None], [c for c in swept if c.line is None]
    sample = rng.sample(refused, PREFLIGHT_SAMPLE * 3 // 4) + rng.sample(accepted, PREFLIGHT_SAMPLE // 4)
    for case in sample:
        try:
            _timed(case, lambda case=case: run.preflight(case.overrides, multirun=False, will_run=False))
        except SystemExit as exit_:
            err = capsys.readouterr().err
            assert exit_.code == 2 and err == f"{case.line}\n", (case.override[:80], err[-500:])
        else:
            assert case.line is None, f"{case.override[:80]}: preflight accepted what the sweep refused ({case.line})"
            assert capsys.readouterr().err == ""
