"""An independent solver for scaletrain.synthetic's problems, written apart from the generator.

It reads only the question TEXT (regexes over the sentence templates, a small recursive-descent
parser for boolean expressions) and derives the answer with its own reasoning: replaying the
arithmetic, ordering people by transitive closure, evaluating the expression with the usual
precedence (not > and > or), and forward-chaining the deduction rules. It imports nothing from
scaletrain, so a bug in the generator's bookkeeping cannot be mirrored here.

`solve(question) -> Solved(answer, measure)`: `measure` is what the question's difficulty claims
(operations, entities, binary depth, variables, hops), measured from the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class Solved:
    answer: str
    measure: dict[str, int] = field(default_factory=dict)


class Unsolvable(ValueError):
    """The text does not follow any template, or its facts do not determine the answer."""


def solve(question: str) -> Solved:
    for solver in (solve_arithmetic, solve_comparison, solve_boolean, solve_deduction):
        result = solver(question)
        if result is not None:
            return result
    raise Unsolvable(f"no template matches: {question!r}")


# ---- arithmetic: replay each sentence on the running count ---------------------------------------

_START = re.compile(r"(\w+) has (\d+) (\w+)\.")
_QUESTION = re.compile(r"How many (\w+) does (\w+) have now\?")
_OPS = [
    (re.compile(r"(\w+) gets (\d+) more (\w+)\."), lambda x, n: x + n),
    (re.compile(r"(\w+) gives (\d+) (\w+) to \w+\."), lambda x, n: x - n),
    (re.compile(r"(\w+) now has (\d+) times as many (\w+) as before\."), lambda x, n: x * n),
    (re.compile(r"(\w+) splits the (\w+) into (\d+) equal piles and keeps one pile\."), None),
]


def solve_arithmetic(question: str) -> Solved | None:
    sentences = re.findall(r"[^.?]+[.?]", question)
    sentences = [s.strip() for s in sentences]
    start, ask = _START.fullmatch(sentences[0]), _QUESTION.fullmatch(sentences[-1])
    if not start or not ask:
        return None
    person, count, item = start.group(1), int(start.group(2)), start.group(3)
    if ask.groups() != (item, person):
        raise Unsolvable(f"asks about another person or item: {question!r}")
    seen = [count]
    for sentence in sentences[1:-1]:
        count = _apply(sentence, person, item, count)
        seen.append(count)
    return Solved(str(count), {"steps": len(seen) - 1, "largest": max(seen), "smallest": min(seen)})


def _apply(sentence: str, person: str, item: str, count: int) -> int:
    for pattern, fn in _OPS:
        m = pattern.fullmatch(sentence)
        if not m:
            continue
        if fn is None:  # division: groups are (person, item, piles)
            who, what, piles = m.group(1), m.group(2), int(m.group(3))
            if count % piles:
                raise Unsolvable(f"{count} {item} do not split into {piles} equal piles")
            new = count // piles
        else:
            who, n, what = m.group(1), int(m.group(2)), m.group(3)
            new = fn(count, n)
        if (who, what) != (person, item):
            raise Unsolvable(f"sentence about someone else: {sentence!r}")
        return new
    raise Unsolvable(f"unknown sentence {sentence!r}")


# ---- comparison: order people by the transitive closure of "more than" ---------------------------

_ADJECTIVES = {  # comparative -> (the quality, +1 if it means "more of it")
    "taller": ("height", 1),
    "shorter": ("height", -1),
    "older": ("age", 1),
    "younger": ("age", -1),
    "faster": ("speed", 1),
    "slower": ("speed", -1),
    "heavier": ("weight", 1),
    "lighter": ("weight", -1),
}
_SUPERLATIVES = {  # superlative -> the comparative it is the extreme of
    "tallest": "taller",
    "shortest": "shorter",
    "oldest": "older",
    "youngest": "younger",
    "fastest": "faster",
    "slowest": "slower",
    "heaviest": "heavier",
    "lightest": "lighter",
}


def solve_comparison(question: str) -> Solved | None:
    facts = re.findall(r"(\w+) is (\w+) than (\w+)\.", question)
    who = re.search(r"Who is the (\w+)\?$", question)
    pair = re.search(r"Is (\w+) (\w+) than (\w+)\?$", question)
    if not facts or not (who or pair):
        return None
    above: dict[str, set[str]] = {}  # person -> everyone with less of the quality
    qualities = set()
    for a, word, b in facts:
        quality, sign = _ADJECTIVES[word]
        qualities.add(quality)
        hi, lo = (a, b) if sign > 0 else (b, a)
        above.setdefault(hi, set()).add(lo)
        above.setdefault(lo, set())
    closure = {p: _reachable(above, p) for p in above}
    measure = {"n_entities": len(above)}
    if who:
        word = _SUPERLATIVES[who.group(1)]
        qualities.add(_ADJECTIVES[word][0])
        beaten = len(above) - 1
        # the most: has everyone below; the least: is below everyone
        if _ADJECTIVES[word][1] > 0:
            winners = [p for p in above if len(closure[p]) == beaten]
        else:
            winners = [p for p in above if all(p in closure[q] for q in above if q != p)]
        if len(qualities) != 1 or len(winners) != 1:
            raise Unsolvable(f"no unique answer: {question!r}")
        return Solved(winners[0], measure)
    assert pair is not None
    a, word, b = pair.groups()
    quality, sign = _ADJECTIVES[word]
    if qualities != {quality}:
        raise Unsolvable(f"mixed qualities: {question!r}")
    measure["stated"] = int(any({x, y} == {a, b} for x, _, y in facts))  # 0: needs transitivity
    more_a = b in closure[a]
    if not more_a and a not in closure[b]:
        raise Unsolvable(f"{a} and {b} are not comparable: {question!r}")
    return Solved("yes" if more_a == (sign > 0) else "no", measure)


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# ---- boolean: tokenize, parse with precedence, evaluate ------------------------------------------


def solve_boolean(question: str) -> Solved | None:
    m = re.fullmatch(r"Given (.*), what is (.*)\?", question)
    if not m:
        return None
    env = {}
    for assignment in m.group(1).split(", "):
        a = re.fullmatch(r"(\w+) = (true|false)", assignment)
        if not a:
            raise Unsolvable(f"unknown assignment {assignment!r}")
        env[a.group(1)] = a.group(2) == "true"
    parser = _Parser(re.findall(r"\(|\)|\w+", m.group(2)), env)
    value, depth = parser.parse_or()
    if parser.pos != len(parser.tokens):
        raise Unsolvable(f"trailing tokens in {m.group(2)!r}")
    return Solved("true" if value else "false", {"depth": depth, "n_vars": len(env)})


class _Parser:
    """or_expr := and_expr ('or' and_expr)*; and_expr := unary ('and' unary)*; unary := 'not' unary |
    '(' or_expr ')' | variable. Each method returns (value, binary nesting depth)."""

    def __init__(self, tokens: list[str], env: dict[str, bool]):
        self.tokens, self.env, self.pos = tokens, env, 0

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _binary(self, word: str, operand) -> tuple[bool, int]:
        value, depth = operand()
        while self._peek() == word:
            self.pos += 1
            right, right_depth = operand()
            value = (value and right) if word == "and" else (value or right)
            depth = max(depth, right_depth) + 1
        return value, depth

    def parse_or(self) -> tuple[bool, int]:
        return self._binary("or", self.parse_and)

    def parse_and(self) -> tuple[bool, int]:
        return self._binary("and", self.parse_unary)

    def parse_unary(self) -> tuple[bool, int]:
        token = self._peek()
        self.pos += 1
        if token == "not":
            value, depth = self.parse_unary()
            return not value, depth
        if token == "(":
            value, depth = self.parse_or()
            if self._peek() != ")":
                raise Unsolvable("unbalanced parentheses")
            self.pos += 1
            return value, depth
        if token in self.env:
            return self.env[token], 0
        raise Unsolvable(f"unexpected token {token!r}")


# ---- deduction: forward chaining from the person's stated category ------------------------------


def solve_deduction(question: str) -> Solved | None:
    ask = re.search(r"Is (\w+) a (\w+)\?$", question)
    if not ask:
        return None
    person, target = ask.groups()
    rules: dict[str, set[str]] = {}  # category -> categories it is inside
    never: set[tuple[str, str]] = set()
    stated: list[tuple[str, str]] = []
    for sentence in re.findall(r"[^.?]+\.", question):
        m = re.fullmatch(r"(Every|No) (\w+) is a (\w+)\.", sentence.strip())
        if m and m.group(1) == "Every":
            rules.setdefault(m.group(2), set()).add(m.group(3))
        elif m:
            never.add((m.group(2), m.group(3)))
        elif m := re.fullmatch(r"([A-Z]\w+) is a (\w+)\.", sentence.strip()):
            stated.append((m.group(1), m.group(2)))
        else:
            raise Unsolvable(f"unknown sentence {sentence!r}")
    # breadth-first: distance = rules applied to reach a category
    distance = {c: 0 for p, c in stated if p == person}
    frontier = list(distance)
    while frontier:
        nxt = []
        for c in frontier:
            for b in sorted(rules.get(c, ())):
                if b not in distance:
                    distance[b] = distance[c] + 1
                    nxt.append(b)
        frontier = nxt
    refuted = [distance[a] + 1 for a, b in never if b == target and a in distance]
    if target in distance and refuted:
        raise Unsolvable(f"contradictory facts: {question!r}")
    n_facts = len(stated) + sum(map(len, rules.values())) + len(never)
    if target in distance:
        return Solved("yes", {"hops": distance[target], "facts": n_facts})
    if refuted:
        return Solved("no", {"hops": min(refuted), "facts": n_facts})
    raise Unsolvable(f"facts do not decide: {question!r}")
