"""Synthetic reasoning problems: seeded, unlimited, exact answers, no download (`data=synthetic_reasoning`).

Four kinds, each a function of a seeded `random.Random` and its difficulty knobs (`KINDS`, defaults there):
- `arithmetic`: a multi-step word problem ("Alice has 5 apples. Alice gets 3 more apples. ..."):
  `steps` operations (+ - * /), operands 1..`max_operand`, every intermediate result within
  0..`max_value` (-`max_value`..`max_value` with `allow_negative=1`); division is always exact.
- `comparison`: `n_entities` people in a chain of "A is taller than B." facts (shuffled, either
  direction); asks for the extreme or a pairwise comparison that needs transitivity when n >= 3.
- `boolean`: a fully parenthesized and/or/not expression of binary nesting `depth` over `n_vars`
  assigned variables; the worked solution rewrites it one level at a time.
- `deduction`: "Alice is a wumpus. Every wumpus is a zumpus. ..." with `hops` rules to chain and
  `n_distractors` unrelated facts; "Is Alice a tumpus?" is yes or (through a "No X is a Y." rule) no.
Templates use fixed small word lists and always the plural, so the vocabulary stays small and regular.

Text format (`render`): "Question: <question>\\nAnswer: <worked steps, optional> #### <answer>";
`extract_answer` reads the canonical answer after the first `ANSWER_MARKER` (GSM8K's marker).

Splits: a problem's split is a pure function of its question text (`split_of`: blake2b of the
question -> bucket 0..99): buckets 0-89 train (90%), 90-94 val (5%), 95-99 test (5%). `problems()`
draws candidates `generate(kind, seed, i, difficulty)` for i = start, start+1, ... (each a pure
function of its index, so a stream resumes at any index) and keeps those of the asked split, so
train, val and test never share a question, whatever the seeds or difficulties.
`frozen_test_set` writes a test set once (JSONL plus a `sha256sum`-format fingerprint beside it)
and afterwards only verifies it. Determinism rests on CPython's Mersenne Twister methods (stable
across versions); the frozen set's check catches any drift.

Standard library only (no torch, no datasets). Not here: tokenization, batching, the Hydra config.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

ANSWER_MARKER = "####"
SPLITS = ("train", "val", "test")
SPLIT_BUCKETS = {"train": range(0, 90), "val": range(90, 95), "test": range(95, 100)}  # of 100
TEST_SEED = 0  # the frozen test sets' stream
TEST_CHECK = 64  # problems a frozen set regenerates on each load to catch generator drift
MAX_MISSES = 100_000  # consecutive candidates of other splits before a stream gives up
MAX_REPEATS = 1_000  # consecutive repeated test questions before a frozen set gives up

NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Henry", "Ivy", "Jack")
ITEMS = ("apples", "books", "cards", "coins", "marbles", "pens", "shells", "stamps")
RELATIONS = (  # (comparative, opposite, superlative, opposite superlative)
    ("taller", "shorter", "tallest", "shortest"),
    ("older", "younger", "oldest", "youngest"),
    ("faster", "slower", "fastest", "slowest"),
    ("heavier", "lighter", "heaviest", "lightest"),
)
VARIABLES = ("p", "q", "r", "s", "t", "u", "v", "w")
CATEGORIES = ("wumpus", "zumpus", "tumpus", "rompus", "dumpus", "yumpus", "numpus", "vumpus")
CATEGORIES += ("jompus", "lorpus", "gorpus", "sterpus", "brimpus", "lempus", "shumpus", "grimpus")


@dataclass
class Problem:
    """One problem; `answer` is canonical (`canonical(answer) == answer`), `solution` the worked steps."""

    kind: str
    question: str
    answer: str
    solution: tuple[str, ...] = ()
    difficulty: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**asdict(self), "solution": list(self.solution)}

    @classmethod
    def from_json(cls, d: dict) -> Problem:
        return cls(d["kind"], d["question"], d["answer"], tuple(d["solution"]), dict(d["difficulty"]))


def prompt(problem: Problem) -> str:
    """What a model continues to answer the problem: the start of `render`'s text."""
    return f"Question: {problem.question}\nAnswer:"


def render(problem: Problem, with_solution: bool = True) -> str:
    """The training text: question, then the worked steps (optional), then the marked answer."""
    steps = " ".join(problem.solution) + " " if with_solution and problem.solution else ""
    return f"{prompt(problem)} {steps}{ANSWER_MARKER} {problem.answer}"


def canonical(answer: str) -> str:
    """One spelling per answer: spaces collapsed, final '.' dropped, integers as int() prints them
    ('+7', '007', '1,000', '-0', '3.0' -> '7', '7', '1000', '0', '3'), yes/no/true/false lower case."""
    s = " ".join(answer.split()).rstrip(".").strip()
    if re.fullmatch(r"[+-]?(\d+|\d{1,3}(,\d{3})+)(\.0*)?", s):
        return str(int(s.split(".")[0].replace(",", "")))
    return s.lower() if s.lower() in ("yes", "no", "true", "false") else s


def extract_answer(text: str) -> str | None:
    """The canonical answer on the line after the first marker (a completion may run on into a next
    problem, so the first one counts), or None when there is no marker or nothing after it."""
    _, marker, rest = text.partition(ANSWER_MARKER)
    answer = canonical(rest.split("\n", 1)[0]) if marker else ""
    return answer or None


# ---- arithmetic ---------------------------------------------------------------------------------


def _arithmetic_step(rng: random.Random, x: int, d: Mapping[str, int]) -> tuple[str, int]:
    """One operation whose operand is in range and whose result stays within the value bounds."""
    hi, lo, top = d["max_value"], -d["max_value"] if d["allow_negative"] else 0, d["max_operand"]
    options: dict[str, list[int]] = {
        "+": list(range(1, min(top, hi - x) + 1)),
        "-": list(range(1, min(top, x - lo) + 1)),
        "*": [n for n in range(2, top + 1) if lo <= x * n <= hi and x != 0],
        "/": [n for n in range(2, top + 1) if x != 0 and x % n == 0],
    }
    op = rng.choice([op for op, ns in options.items() if ns])
    return op, rng.choice(options[op])


def _arithmetic(rng: random.Random, d: Mapping[str, int]) -> tuple[str, str, tuple[str, ...]]:
    who, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    x = rng.randint(1, d["max_operand"])
    sentences, work = [f"{who} has {x} {item}."], []
    for _ in range(d["steps"]):
        op, n = _arithmetic_step(rng, x, d)
        y = {"+": x + n, "-": x - n, "*": x * n, "/": x // n}[op]
        sentences.append(
            {
                "+": f"{who} gets {n} more {item}.",
                "-": f"{who} gives {n} {item} to {other}.",
                "*": f"{who} now has {n} times as many {item} as before.",
                "/": f"{who} splits the {item} into {n} equal piles and keeps one pile.",
            }[op]
        )
        work.append(f"{x} {op} {n} = {y}.")
        x = y
    sentences.append(f"How many {item} does {who} have now?")
    return " ".join(sentences), str(x), tuple(work)


# ---- comparison ---------------------------------------------------------------------------------


def _comparison(rng: random.Random, d: Mapping[str, int]) -> tuple[str, str, tuple[str, ...]]:
    n = d["n_entities"]
    more, less, most, least = rng.choice(RELATIONS)
    order = rng.sample(NAMES, n)  # order[0] has the most of the quality
    facts = [
        f"{a} is {more} than {b}." if rng.random() < 0.5 else f"{b} is {less} than {a}."
        for a, b in zip(order, order[1:])
    ]
    rng.shuffle(facts)
    ask = rng.randrange(3)
    if ask == 0:
        question, answer = f"Who is the {most}?", order[0]
    elif ask == 1:
        question, answer = f"Who is the {least}?", order[-1]
    else:  # a pair at least two links apart when there is one, so transitivity is needed
        gap = min(2, n - 1)
        i = rng.randrange(n - gap)
        j = rng.randrange(i + gap, n)
        a, b = (order[i], order[j]) if rng.random() < 0.5 else (order[j], order[i])
        word = rng.choice((more, less))
        holds = (order.index(a) < order.index(b)) == (word == more)
        question, answer = f"Is {a} {word} than {b}?", "yes" if holds else "no"
    solution = (f"From {most} to {least}: {', '.join(order)}.",)
    return " ".join(facts) + " " + question, answer, solution


# ---- boolean ------------------------------------------------------------------------------------


class _Expr(NamedTuple):  # a NamedTuple: generation builds many
    op: str  # "var", "lit", "not", "and", "or"
    name: str = ""
    value: bool = False
    args: tuple[_Expr, ...] = ()


def _expression(rng: random.Random, depth: int, names: Sequence[str], exact: bool) -> _Expr:
    """An expression whose binary nesting is `depth` (at most `depth` unless `exact`)."""
    if depth == 0:
        e = _Expr("var", name=rng.choice(names))
    else:
        deep = rng.randrange(2)  # which side carries the exact depth
        sides = [
            _expression(rng, depth - 1 if exact and k == deep else rng.randrange(depth), names, exact and k == deep)
            for k in range(2)
        ]
        e = _Expr(rng.choice(("and", "or")), args=tuple(sides))
    return _Expr("not", args=(e,)) if rng.random() < 0.25 else e


def _show(e: _Expr, top: bool = True) -> str:
    if e.op == "var":
        return e.name
    if e.op == "lit":
        return "true" if e.value else "false"
    if e.op == "not":
        return "not " + _show(e.args[0], top=False)
    text = f"{_show(e.args[0], False)} {e.op} {_show(e.args[1], False)}"
    return text if top else f"({text})"


def _rewrite(e: _Expr, env: Mapping[str, bool]) -> _Expr:
    """One solution step: variables become literals, else every operator over literals is evaluated."""
    if e.op == "var":
        return _Expr("lit", value=env[e.name])
    if e.op == "lit":
        return e
    if all(a.op == "lit" for a in e.args):
        values = [a.value for a in e.args]
        return _Expr("lit", value=not values[0] if e.op == "not" else all(values) if e.op == "and" else any(values))
    return _Expr(e.op, args=tuple(_rewrite(a, env) for a in e.args))


def _boolean(rng: random.Random, d: Mapping[str, int]) -> tuple[str, str, tuple[str, ...]]:
    names = list(VARIABLES[: d["n_vars"]])
    env = {v: rng.random() < 0.5 for v in names}
    e = _expression(rng, d["depth"], names, exact=True)
    given = ", ".join(f"{v} = {'true' if env[v] else 'false'}" for v in names)
    question, work = f"Given {given}, what is {_show(e)}?", []
    while e.op != "lit":
        after = _rewrite(e, env)
        work.append(f"{_show(e)} = {_show(after)}.")
        e = after
    return question, _show(e), tuple(work)


# ---- deduction ----------------------------------------------------------------------------------


def _distractors(rng: random.Random, d: Mapping[str, int], who: str, chain: Sequence[str]) -> set[str]:
    """Facts that cannot change the answer: rules about categories `who` never reaches (their objects
    may be chain categories, so the target is mentioned elsewhere too), and facts about other people."""
    others = [c for c in CATEGORIES if c not in chain]
    people = [p for p in NAMES if p != who]
    facts: set[str] = set()
    for _ in range(50 * d["n_distractors"]):
        if len(facts) == d["n_distractors"]:
            break
        obj = rng.choice(chain if rng.random() < 0.5 else others)
        if rng.random() < 0.3:
            facts.add(f"{rng.choice(people)} is a {obj}.")
        else:
            subject = rng.choice([c for c in others if c != obj])
            facts.add(f"Every {subject} is a {obj}." if rng.random() < 0.7 else f"No {subject} is a {obj}.")
    return facts


def _deduction(rng: random.Random, d: Mapping[str, int]) -> tuple[str, str, tuple[str, ...]]:
    hops = d["hops"]
    who = rng.choice(NAMES)
    chain = rng.sample(CATEGORIES, hops + 1)
    yes = rng.random() < 0.5
    rules = [f"Every {a} is a {b}." for a, b in zip(chain[:-1], chain[1:-1])]
    rules.append(f"Every {chain[-2]} is a {chain[-1]}." if yes else f"No {chain[-2]} is a {chain[-1]}.")
    facts = [f"{who} is a {chain[0]}.", *rules, *sorted(_distractors(rng, d, who, chain))]
    rng.shuffle(facts)
    work = [f"{who} is a {chain[0]}."]
    work += [f"{rule[:-1]}, so {who} is a {b}." for rule, b in zip(rules[:-1], chain[1:-1])]
    work.append(f"{rules[-1][:-1]}, so {who} is {'a' if yes else 'not a'} {chain[-1]}.")
    return " ".join(facts) + f" Is {who} a {chain[-1]}?", "yes" if yes else "no", tuple(work)


# ---- registry, difficulty -----------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A problem kind: its generator and its knobs (defaults and inclusive bounds)."""

    generate: Callable[[random.Random, Mapping[str, int]], tuple[str, str, tuple[str, ...]]]
    defaults: Mapping[str, int]
    bounds: Mapping[str, tuple[int, int]]


KINDS: dict[str, Kind] = {
    "arithmetic": Kind(
        _arithmetic,
        {"steps": 2, "max_operand": 10, "max_value": 100, "allow_negative": 0},
        {"steps": (1, 16), "max_operand": (2, 1000), "max_value": (2, 10**6), "allow_negative": (0, 1)},
    ),
    "comparison": Kind(_comparison, {"n_entities": 3}, {"n_entities": (2, len(NAMES))}),
    "boolean": Kind(_boolean, {"depth": 2, "n_vars": 3}, {"depth": (1, 5), "n_vars": (1, len(VARIABLES))}),
    "deduction": Kind(_deduction, {"hops": 2, "n_distractors": 2}, {"hops": (1, 8), "n_distractors": (0, 12)}),
}


def resolve_difficulty(kind: str, difficulty: Mapping[str, int] | None = None) -> dict[str, int]:
    """The kind's defaults updated by `difficulty`; an unknown kind or knob, or a value out of bounds,
    is a ValueError naming it and what is allowed."""
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; choose one of {sorted(KINDS)}")
    spec, resolved = KINDS[kind], dict(KINDS[kind].defaults)
    for knob, value in (difficulty or {}).items():
        if knob not in spec.defaults:
            raise ValueError(f"{kind} has no difficulty knob {knob!r}; its knobs: {sorted(spec.defaults)}")
        lo, hi = spec.bounds[knob]
        if not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{kind}.{knob}={value!r}: expected an integer in [{lo}, {hi}]")
        resolved[knob] = int(value)
    if kind == "arithmetic" and resolved["max_value"] < resolved["max_operand"]:
        raise ValueError(
            f"arithmetic.max_value={resolved['max_value']} must be >= max_operand={resolved['max_operand']}"
        )
    return resolved


# ---- streams and splits -------------------------------------------------------------------------


def split_of(question: str) -> str:
    """The split a question belongs to: a pure function of its text (see SPLIT_BUCKETS)."""
    bucket = int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big") % 100
    return next(name for name, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def _stream_key(kind: str, seed: int, difficulty: Mapping[str, int]) -> str:
    return f"{kind}|{seed}|{json.dumps(dict(difficulty), sort_keys=True)}"


def _candidate(key: str, kind: str, index: int, difficulty: dict[str, int]) -> Problem:
    digest = hashlib.blake2b(f"{key}|{index}".encode(), digest_size=16).digest()
    question, answer, solution = KINDS[kind].generate(random.Random(int.from_bytes(digest, "big")), difficulty)
    return Problem(kind, question, answer, solution, dict(difficulty))


def generate(kind: str, seed: int, index: int, difficulty: Mapping[str, int] | None = None) -> Problem:
    """Candidate `index` of the stream (kind, seed, difficulty): a pure function of its arguments."""
    d = resolve_difficulty(kind, difficulty)
    return _candidate(_stream_key(kind, seed, d), kind, index, d)


def indexed_problems(
    kind: str, split: str, seed: int, difficulty: Mapping[str, int] | None = None, start: int = 0
) -> Iterator[tuple[int, Problem]]:
    """(candidate index, problem) for the candidates from `start` on that belong to `split`; resume a
    stream at the index after the last one used. Unbounded; raises ValueError when the difficulty
    allows so few distinct questions that MAX_MISSES candidates in a row fall into other splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    d = resolve_difficulty(kind, difficulty)
    key, misses, index = _stream_key(kind, seed, d), 0, start
    while True:
        problem = _candidate(key, kind, index, d)
        if split_of(problem.question) == split:
            misses = 0
            yield index, problem
        else:
            misses += 1
            if misses >= MAX_MISSES:
                raise ValueError(f"{kind} at {d}: no {split} problem in {MAX_MISSES} candidates; raise the difficulty")
        index += 1


def problems(kind: str, split: str, seed: int, difficulty: Mapping[str, int] | None = None) -> Iterator[Problem]:
    """The unbounded, deterministic stream of `split` problems (see `indexed_problems`)."""
    return (problem for _, problem in indexed_problems(kind, split, seed, difficulty))


# ---- frozen test sets ---------------------------------------------------------------------------


class FrozenSetError(Exception):
    """A frozen test set that cannot be trusted; the message names the file and the way out."""


def test_set_name(kind: str, difficulty: Mapping[str, int] | None = None) -> str:
    """A file name that spells out the difficulty, e.g. 'boolean-depth2-n_vars3.jsonl'."""
    d = resolve_difficulty(kind, difficulty)
    return "-".join([kind, *(f"{k}{v}" for k, v in sorted(d.items()))]) + ".jsonl"


def _test_problems(kind: str, difficulty: dict[str, int], n: int) -> Iterator[Problem]:
    """The first n distinct test questions of the TEST_SEED stream (a repeat would weigh twice)."""
    seen: set[str] = set()
    repeats = 0
    for problem in problems(kind, "test", TEST_SEED, difficulty):
        if len(seen) == n:
            return
        if problem.question in seen:
            repeats += 1
            if repeats == MAX_REPEATS:
                raise ValueError(f"{kind} at {difficulty} has about {len(seen)} distinct test questions, asked for {n}")
            continue
        seen.add(problem.question)
        repeats = 0
        yield problem


def frozen_test_set(kind: str, difficulty: Mapping[str, int] | None, n: int, path: str | os.PathLike) -> list[Problem]:
    """The fixed test set of n problems at `path` (JSONL) with its fingerprint `<path>.sha256`.

    Written on the first call (atomically: data, then fingerprint); later calls read it, check the
    fingerprint, the kind, difficulty and size, and that the first TEST_CHECK problems are still what
    the generator produces. Any mismatch is a FrozenSetError naming the file: a changed set makes
    results incomparable, so it is never silently rewritten."""
    path, d = Path(path), resolve_difficulty(kind, difficulty)
    sidecar = path.with_name(path.name + ".sha256")
    if not path.exists() and not sidecar.exists():
        content = "".join(json.dumps(p.to_json(), sort_keys=True) + "\n" for p in _test_problems(kind, d, n))
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, content)
        _write_atomic(sidecar, f"{hashlib.sha256(content.encode()).hexdigest()}  {path.name}\n")
    return _verified(path, sidecar, kind, d, n)


def _verified(path: Path, sidecar: Path, kind: str, d: dict[str, int], n: int) -> list[Problem]:
    fix = f"restore it, or delete {path} and {sidecar.name} to write a new set (old results then do not compare)"
    if not path.exists() or not sidecar.exists():
        missing = sidecar if path.exists() else path
        raise FrozenSetError(f"frozen test set {path}: {missing} is missing; {fix}")
    content = path.read_bytes()
    expected, actual = sidecar.read_text().split()[0], hashlib.sha256(content).hexdigest()
    if actual != expected:
        raise FrozenSetError(f"frozen test set {path} was changed: sha256 {actual}, fingerprint {expected}; {fix}")
    stored = [Problem.from_json(json.loads(line)) for line in content.decode().splitlines()]
    if len(stored) != n or any(p.kind != kind or p.difficulty != d for p in stored):
        held = f"{len(stored)} problems of {sorted({p.kind for p in stored})}"
        raise FrozenSetError(f"frozen test set {path} holds {held}, asked for {n} {kind} at {d}; use another path")
    for i, fresh in enumerate(_test_problems(kind, d, min(n, TEST_CHECK))):
        if fresh != stored[i]:
            raise FrozenSetError(
                f"frozen test set {path}: problem {i} is no longer what the generator produces "
                f"(the generator changed); revert the change, or delete {path} and {sidecar.name} to write a new set"
            )
    return stored


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
