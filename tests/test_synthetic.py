"""scaletrain.data.synthetic: determinism, every answer checked by the independent solver
(tests/synthetic_solver.py reads only the question text), difficulty knobs, the answer format,
train/val/test disjointness, and the frozen test sets."""

from __future__ import annotations

import hashlib
import itertools
import re
from functools import cache

import pytest

from scaletrain.data import synthetic as syn
from scaletrain.data.synthetic import FrozenSetError, Problem
from tests.synthetic_solver import solve

# Per kind: the defaults, an easy and a hard corner; 3 x 700 = 2,100 problems per kind are solved.
SETTINGS: dict[str, list[dict[str, int]]] = {
    "arithmetic": [
        {},
        {"steps": 1, "max_operand": 3, "max_value": 6},
        {"steps": 5, "max_operand": 20, "max_value": 500, "allow_negative": 1},
    ],
    "comparison": [{}, {"n_entities": 2}, {"n_entities": 8}],
    "boolean": [{}, {"depth": 1, "n_vars": 1}, {"depth": 4, "n_vars": 6}],
    "deduction": [{}, {"hops": 1, "n_distractors": 0}, {"hops": 6, "n_distractors": 8}],
}
# The smallest question spaces: a train sample repeats questions, so a leak between splits would show.
EASIEST = {kind: settings[1] for kind, settings in SETTINGS.items()}


@cache
def sample(kind: str, setting: int, n: int = 700) -> tuple[Problem, ...]:
    return tuple(itertools.islice(syn.problems(kind, "train", 7, SETTINGS[kind][setting]), n))


@pytest.mark.parametrize("kind", syn.KINDS)
def test_same_seed_kind_and_difficulty_give_identical_problems_and_other_seeds_differ(kind):
    first = list(itertools.islice(syn.problems(kind, "train", 1, {}), 50))
    assert first == list(itertools.islice(syn.problems(kind, "train", 1, {}), 50))
    other_seed = list(itertools.islice(syn.problems(kind, "train", 2, {}), 50))
    assert sum(a.question != b.question for a, b in zip(first, other_seed)) >= 45  # defaults: a large space
    # a stream is a pure function of the candidate index, so it resumes anywhere
    indexed = list(itertools.islice(syn.indexed_problems(kind, "val", 1, {}), 5))
    for index, problem in indexed:
        assert syn.generate(kind, 1, index, {}) == problem
    assert list(itertools.islice(syn.indexed_problems(kind, "val", 1, {}, start=indexed[2][0]), 3)) == indexed[2:]


@pytest.mark.parametrize("kind", syn.KINDS)
def test_the_independent_solver_agrees_with_every_generated_answer(kind):
    for setting in range(len(SETTINGS[kind])):
        for p in sample(kind, setting):
            assert solve(p.question).answer == p.answer, syn.render(p)


@pytest.mark.parametrize("kind", syn.KINDS)
def test_rendered_text_gives_back_the_answer_with_and_without_the_worked_steps(kind):
    for p in sample(kind, 2)[:200]:
        for with_solution in (True, False):
            text = syn.render(p, with_solution)
            assert text.startswith(f"Question: {p.question}\nAnswer: ")
            assert text.count(syn.ANSWER_MARKER) == 1
            assert syn.extract_answer(text) == p.answer == syn.canonical(p.answer)
        assert p.solution and all(step in syn.render(p, True) for step in p.solution)


def test_extract_answer_canonicalizes_and_reads_the_first_marker():
    assert syn.extract_answer("Answer: #### +7 ") == "7"
    assert syn.extract_answer("#### -0") == "0"
    assert syn.extract_answer("#### 1,000.") == "1000"
    assert syn.extract_answer("#### 007") == "7"
    assert syn.extract_answer("#### -12") == "-12"
    assert syn.extract_answer("####   Yes.") == "yes"
    assert syn.extract_answer("#### Alice") == "Alice"
    assert syn.extract_answer("#### 12\n\nQuestion: Bob has 2 pens. ... #### 5") == "12"
    assert syn.extract_answer("Answer: 12") is None
    assert syn.extract_answer("Answer: ####  \n") is None


def test_arithmetic_knobs_set_steps_operands_and_the_value_range():
    for setting, d in enumerate(SETTINGS["arithmetic"]):
        d = syn.resolve_difficulty("arithmetic", d)
        measures = [solve(p.question).measure for p in sample("arithmetic", setting)]
        for p, m in zip(sample("arithmetic", setting), measures):
            assert m["steps"] == len(p.solution) == d["steps"]
            assert max(map(int, re.findall(r"\d+", p.question))) <= d["max_operand"]
            assert m["largest"] <= d["max_value"] and m["smallest"] >= (-d["max_value"] if d["allow_negative"] else 0)
        # the knob does what it says: negatives occur only where allowed
        assert any(m["smallest"] < 0 for m in measures) == bool(d["allow_negative"])


def test_comparison_knob_sets_the_entities_and_pair_questions_need_transitivity():
    for setting, d in enumerate(SETTINGS["comparison"]):
        n = syn.resolve_difficulty("comparison", d)["n_entities"]
        for p in sample("comparison", setting):
            m = solve(p.question).measure
            assert m["n_entities"] == n
            assert m.get("stated", 0) == 0 or n == 2  # with 3+ people the asked pair is never a stated fact


def test_boolean_knobs_set_the_nesting_depth_and_the_variables():
    for setting, d in enumerate(SETTINGS["boolean"]):
        d = syn.resolve_difficulty("boolean", d)
        for p in sample("boolean", setting):
            assert solve(p.question).measure == d


def test_deduction_knobs_set_the_hops_and_the_distractor_facts():
    for setting, d in enumerate(SETTINGS["deduction"]):
        d = syn.resolve_difficulty("deduction", d)
        answers = []
        for p in sample("deduction", setting):
            m = solve(p.question).measure
            assert m == {"hops": d["hops"], "facts": 1 + d["hops"] + d["n_distractors"]}
            answers.append(p.answer)
        assert 0.4 < answers.count("yes") / len(answers) < 0.6  # a yes/no-balanced task


def test_unknown_kinds_knobs_and_out_of_range_values_are_errors_naming_them():
    with pytest.raises(ValueError, match="'algebra'"):
        syn.resolve_difficulty("algebra")
    with pytest.raises(ValueError, match="'hop'.*'hops'"):
        syn.resolve_difficulty("deduction", {"hop": 3})
    with pytest.raises(ValueError, match=r"boolean.depth=9.*\[1, 5\]"):
        syn.resolve_difficulty("boolean", {"depth": 9})
    with pytest.raises(ValueError, match="max_value"):
        syn.resolve_difficulty("arithmetic", {"max_operand": 50, "max_value": 20})
    with pytest.raises(ValueError, match="'dev'"):
        next(syn.problems("boolean", "dev", 0))


@pytest.mark.parametrize("kind", syn.KINDS)
def test_train_val_and_test_streams_never_share_a_question(kind):
    d = EASIEST[kind]
    train = [p.question for p in itertools.islice(syn.problems(kind, "train", 0, d), 5_000)]  # 20k over the kinds
    val = [p.question for p in itertools.islice(syn.problems(kind, "val", 1, d), 150)]
    test = [p.question for p in itertools.islice(syn.problems(kind, "test", 2, d), 150)]
    assert len(set(train)) < len(train)  # the space is small enough that questions repeat: leaks would show
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    for split, questions in (("train", train), ("val", val), ("test", test)):
        assert {syn.split_of(q) for q in questions} == {split}


def test_the_split_is_a_pure_function_of_the_question_text():
    splits_of: dict[str, set[str]] = {}
    seeds_of: dict[str, set[int]] = {}
    for seed, split in itertools.product(range(3), syn.SPLITS):  # the same question from other seeds and streams
        for p in itertools.islice(syn.problems("comparison", split, seed, {"n_entities": 2}), 300):
            splits_of.setdefault(p.question, set()).add(split)
            seeds_of.setdefault(p.question, set()).add(seed)
    assert all(len(splits) == 1 for splits in splits_of.values())
    assert sum(len(seeds) > 1 for seeds in seeds_of.values()) > 100  # many questions came from several seeds
    q = "Given p = true, what is p or not p?"
    assert syn.split_of(q) == syn.split_of(str(q)) in syn.SPLITS
    buckets = [syn.split_of(f"question {i}") for i in range(20_000)]
    assert abs(buckets.count("val") / len(buckets) - 0.05) < 0.01  # the documented fractions, 90/5/5
    assert abs(buckets.count("test") / len(buckets) - 0.05) < 0.01


def test_a_frozen_test_set_is_written_once_fingerprinted_and_then_only_verified(tmp_path):
    path = tmp_path / syn.test_set_name("deduction", {"hops": 3})
    first = syn.frozen_test_set("deduction", {"hops": 3}, 40, path)
    sidecar = path.with_name(path.name + ".sha256")
    assert sidecar.read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"  # sha256sum -c
    assert len(first) == len({p.question for p in first}) == 40
    assert all(syn.split_of(p.question) == "test" for p in first)
    written = path.stat().st_mtime_ns
    assert syn.frozen_test_set("deduction", {"hops": 3}, 40, path) == first
    assert path.stat().st_mtime_ns == written
    assert [solve(p.question).answer for p in first] == [p.answer for p in first]


def test_a_tampered_or_mismatched_frozen_test_set_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "boolean.jsonl"
    syn.frozen_test_set("boolean", None, 20, path)
    sidecar = path.with_name(path.name + ".sha256")
    with pytest.raises(FrozenSetError, match=re.escape(str(path)) + ".*holds 20"):
        syn.frozen_test_set("boolean", None, 21, path)
    with pytest.raises(FrozenSetError, match=re.escape(str(path)) + ".*holds"):
        syn.frozen_test_set("boolean", {"depth": 3}, 20, path)
    original = path.read_text()
    path.write_text(original.replace('"answer": "true"', '"answer": "false"', 1))
    with pytest.raises(FrozenSetError, match=re.escape(str(path)) + " was changed"):
        syn.frozen_test_set("boolean", None, 20, path)
    path.write_text(original)
    sidecar.unlink()
    with pytest.raises(FrozenSetError, match=re.escape(str(path)) + ".*missing"):
        syn.frozen_test_set("boolean", None, 20, path)


def test_a_generator_change_that_alters_a_frozen_test_set_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "arithmetic.jsonl"
    syn.frozen_test_set("arithmetic", None, 10, path)
    kind = syn.KINDS["arithmetic"]

    def changed(rng, d):  # e.g. a new template wording
        question, answer, solution = kind.generate(rng, d)
        return question.replace("gets", "receives"), answer, solution

    monkeypatch.setitem(syn.KINDS, "arithmetic", syn.Kind(changed, kind.defaults, kind.bounds))
    with pytest.raises(FrozenSetError, match=re.escape(str(path)) + ".*generator changed"):
        syn.frozen_test_set("arithmetic", None, 10, path)


def test_a_difficulty_with_too_few_distinct_test_questions_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(syn, "MAX_REPEATS", 50)  # give up sooner than 1,000 repeats in a row, to keep the test short
    with pytest.raises(ValueError, match="distinct test questions"):
        syn.frozen_test_set("boolean", {"depth": 1, "n_vars": 1}, 1_000, tmp_path / "tiny.jsonl")
    assert not (tmp_path / "tiny.jsonl").exists()
