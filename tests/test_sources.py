"""Data sources beyond plain text: GSM8K (answer extraction on every non-plain answer, templates, calculator
annotations), generated reasoning problems as a source (train/validation disjoint, answers the independent
solver agrees with), mixtures (one tokenizer over the sources, weights honoured over batches within a derived
binomial bound, resumable and rank-sharded), and the data config's rules for all of them."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from scaletrain.config import ConfigError, DataConfig, SourceConfig, SyntheticConfig, TokenizerConfig, load_config
from scaletrain.data import DataError, MixtureLoader, prepare_data
from scaletrain.data import synthetic as syn
from scaletrain.data.sources import gsm8k_fields, open_corpus
from tests.synthetic_solver import solve

from .conftest import SHARED, compose_cfg, tiny_overrides

GSM8K = SHARED / "data" / "gsm8k"


def _records(split: str) -> list[dict]:
    return [json.loads(line) for line in (GSM8K / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def gsm8k_source(**kw) -> SourceConfig:
    return SourceConfig(kind="gsm8k", path=str(GSM8K), val_split="test", **kw)  # pyright: ignore[reportArgumentType]


# ----------------------------------------------------------------------------- GSM8K


def test_gsm8k_final_answers_are_extracted_on_all_98_non_plain_answers():
    """SOURCES.md: of 8,792 final answers 93 use thousands separators and 5 are negative. Checked against an
    independent reading: the text after the last '####', commas dropped, as an int."""
    odd = []
    for split in ("train", "test"):
        for record in _records(split):
            raw = record["answer"].rsplit("####", 1)[1].strip()
            if not re.fullmatch(r"\d+", raw):
                odd.append((record, raw))
    assert (
        len(odd) == 98 and sum("," in raw for _, raw in odd) == 93 and sum(raw.startswith("-") for _, raw in odd) == 5
    )
    for record, raw in odd:
        assert gsm8k_fields(record, "test", strip_calculator=True)["final"] == str(int(raw.replace(",", "")))


def test_gsm8k_documents_follow_the_template_without_calculator_annotations(tmp_path):
    cfg = DataConfig(sources={"gsm8k": gsm8k_source()}, cache_dir=str(tmp_path))
    corpus = open_corpus("gsm8k", cfg.sources["gsm8k"], cfg, tmp_path)
    train, val = corpus.load("train")["text"], corpus.load("val")["text"]
    assert (len(train), len(val), len(corpus.problems)) == (7473, 1319, 1319)
    first = _records("train")[0]
    assert train[0] == (
        f"Question: {first['question']}\nAnswer: Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
    )
    assert not any("<<" in t for t in train)
    assert corpus.problems[0].prompt == f"Question: {_records('test')[0]['question']}\nAnswer:"
    assert corpus.problems[0].answer == str(int(_records("test")[0]["answer"].rsplit("####", 1)[1].replace(",", "")))
    kept = open_corpus("gsm8k", gsm8k_source(strip_calculator=False), cfg, tmp_path).load("train")["text"]
    assert "<<48/2=24>>" in kept[0]


def test_a_gsm8k_file_without_question_and_answer_is_one_error_naming_it(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"problem": "1+1?", "solution": "2"}\n')
    (tmp_path / "test.jsonl").write_text('{"problem": "1+1?", "solution": "2"}\n')
    src = SourceConfig(kind="gsm8k", path=str(tmp_path), val_split="test")  # pyright: ignore[reportArgumentType]
    cfg = DataConfig(sources={"g": src}, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(
        DataError, match=rf"{re.escape(str(tmp_path))}/train.jsonl \(problem 1\): expected GSM8K records"
    ):
        open_corpus("g", src, cfg, tmp_path)


# ----------------------------------------------------------------------------- synthetic


def test_a_synthetic_source_gives_disjoint_splits_and_problems_the_solver_agrees_with(tmp_path):
    src = SourceConfig(kind="synthetic", synthetic=SyntheticConfig(n_train=300, n_val=50))  # pyright: ignore[reportArgumentType]
    cfg = DataConfig(sources={"r": src}, cache_dir=str(tmp_path))
    corpus = open_corpus("r", src, cfg, tmp_path)
    train, val = corpus.load("train")["text"], corpus.load("val")["text"]
    assert (len(train), len(val), len(corpus.problems)) == (4 * 300, 4 * 50, 4 * 50)
    questions = lambda texts: {t.split("\n", 1)[0] for t in texts}  # noqa: E731
    assert not questions(train) & questions(val)
    kinds = [syn.split_of(q.removeprefix("Question: ")) for q in questions(val)]
    assert set(kinds) == {"val"}
    for problem in corpus.problems:
        assert solve(problem.prompt.removeprefix("Question: ").removesuffix("\nAnswer:")).answer == problem.answer
    again = open_corpus("r", src, cfg, tmp_path)
    assert again.fingerprints == corpus.fingerprints and again.load("train")["text"] == train


# ----------------------------------------------------------------------------- mixtures


def test_a_mixture_trains_one_tokenizer_over_both_sources_and_packs_each(tmp_path, tinystories_dir):
    stories = SourceConfig(path=str(tinystories_dir), weight=0.9)
    reasoning = SourceConfig(
        kind="synthetic", weight=0.1, synthetic=SyntheticConfig(kinds=["arithmetic"], n_train=500, n_val=20)
    )  # pyright: ignore[reportArgumentType]
    cfg = DataConfig(
        sources={"stories": stories, "reasoning": reasoning},
        seq_len=32,
        cache_dir=str(tmp_path),
        tokenizer=TokenizerConfig(vocab_size=512, max_train_bytes=200_000),
    )
    data = prepare_data(cfg)
    assert list(data.sources) == ["stories", "reasoning"]
    assert [s.weight for s in data.sources.values()] == pytest.approx([0.9, 0.1])
    tok = data.tokenizer
    for name, source in data.sources.items():  # each source's stream decodes back to its own documents
        first = tok.decode(source.val.tokens[: list(source.val.tokens).index(tok.eot_id)].tolist())
        assert first.startswith("Question: ") == (name == "reasoning")
    assert len(tok.encode("Question: Alice has 3 apples.")) < len("Question: Alice has 3 apples.") / 2  # merged


def _mixture(rank=0, world=1, seed=7):
    streams = [np.arange(10_000, dtype=np.int64), np.arange(10_000, 20_000, dtype=np.int64), np.arange(20_000, 21_000)]
    return MixtureLoader(streams, [0.6, 0.3, 0.1], batch_size=16, seq_len=8, seed=seed, rank=rank, world_size=world)


def test_mixture_weights_are_honoured_over_batches_within_the_binomial_bound():
    """Rows are i.i.d. draws with probability w: over n rows the share has standard deviation sqrt(w(1-w)/n);
    5 sigma bounds a false failure at 6e-7 per source (this seed is fixed, so it is deterministic anyway)."""
    loader, n_batches = _mixture(), 400
    counts = np.zeros(3)
    for _ in range(n_batches):
        x, _ = loader.next_batch()
        counts += np.bincount(x[:, 0].numpy() // 10_000, minlength=3)  # the stream a row came from
    n = n_batches * 16
    for w, c in zip([0.6, 0.3, 0.1], counts):
        assert abs(c / n - w) < 5 * math.sqrt(w * (1 - w) / n)


def test_mixture_loader_resumes_exactly_and_any_rank_count_splits_the_same_global_batches():
    a = _mixture()
    for _ in range(7):
        a.next_batch()
    b = _mixture()
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert xa.equal(xb) and ya.equal(yb)
    whole = _mixture(world=1)
    for world in (2, 4):  # sources and windows follow each row's global index: rank r holds rows r::W
        ranks = [MixtureLoader(whole.streams, [0.6, 0.3, 0.1], 16 // world, 8, 7, r, world) for r in range(world)]
        for ld in ranks:
            ld.load_state_dict(b.state_dict())
        for _ in range(3):
            x_whole = b.next_batch()[0]
            parts = [ld.next_batch()[0] for ld in ranks]
            assert all(x_whole[r::world].equal(part) for r, part in enumerate(parts))
        assert all(ld.state_dict() == b.state_dict() for ld in ranks)  # and continue on any rank count
        b.load_state_dict(ranks[0].state_dict())
    with pytest.raises(ValueError, match="source weights"):
        MixtureLoader(whole.streams, [0.5, 0.4, 0.1], 16, 8, 7).load_state_dict(a.state_dict())


def test_a_mixture_state_of_older_versions_loads_from_one_rank_and_is_refused_by_name_from_several():
    """Before global positions a mixture kept each source's position per rank (saving rank 0's): from one rank
    that is the global position; from several it cannot be continued."""
    a = _mixture()
    for _ in range(7):
        a.next_batch()
    legacy = a.state_dict()
    legacy["sources"] = [{**sub, "world_size": 1} for sub in legacy["sources"]]
    b = _mixture(world=2)
    b.load_state_dict(legacy)
    assert b.state_dict() == a.state_dict()
    legacy["sources"] = [{**sub, "world_size": 2} for sub in legacy["sources"]]
    with pytest.raises(ValueError, match="saved on 2 ranks by a scaletrain older than global data positions"):
        b.load_state_dict(legacy)


# ----------------------------------------------------------------------------- config rules


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["data=mixture", "data.sources.tinystories.weight=0", "data.sources.reasoning.weight=0"],
            "data.sources: the weights sum to 0",
        ),
        (
            ["data=gsm8k", "data.sources.gsm8k.template='{question} {rationale}'"],
            "data.sources.gsm8k.template: refers to rationale",
        ),
        (["data=synthetic_reasoning", "data.sources.reasoning.synthetic.arithmetic.steps=99"], "steps=99: expected"),
        (["data=synthetic_reasoning", "data.sources.reasoning.synthetic.kinds=[arithmetic,riddles]"], "unknown kind"),
        (["data=mixture", "data.path=/somewhere"], "data.path: sets the folder of a single-source data config"),
    ],
)
def test_bad_data_configs_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(compose_cfg(overrides))


def test_the_command_line_names_a_misspelled_knob_and_an_unknown_source_kind(capsys):
    from scaletrain.run import preflight

    for override, expected in (
        ("data.sources.reasoning.synthetic.arithmetic.stepz=2", "did you mean 'steps'?"),
        ("data.sources.reasoning.kind=poetry", "Invalid value 'poetry', expected one of [text, gsm8k, synthetic]"),
    ):
        with pytest.raises(SystemExit):
            preflight(["data=synthetic_reasoning", "~local", override], multirun=False, will_run=False)
        assert expected in capsys.readouterr().err


def test_the_knob_blocks_of_the_config_match_the_generators_defaults():
    cfg = SyntheticConfig()
    for kind in syn.KINDS:
        assert cfg.difficulty(kind) == syn.KINDS[kind].defaults


def test_a_mixture_run_logs_each_sources_validation_and_their_weighted_mean(tmp_path, tinystories_dir, data_cache):
    from scaletrain.trainer import train

    from .conftest import read_metrics

    extra = {
        "data": "mixture",
        "data.sources.tinystories.path": tinystories_dir,
        "data.sources.reasoning.synthetic.n_train": 2000,
        "data.sources.reasoning.synthetic.n_val": 50,
        "train.max_steps": 4,
        "train.eval_every": 4,
    }
    overrides = [o for o in tiny_overrides(tinystories_dir, data_cache, **extra) if not o.startswith("data.path=")]
    train(compose_cfg(overrides), tmp_path / "run")
    [val] = [r for r in read_metrics(tmp_path / "run") if "val/loss" in r]
    for key in ("val/tinystories/loss", "val/tinystories/bpb", "val/reasoning/loss", "val/reasoning/bpb"):
        assert math.isfinite(val[key])
    assert val["val/loss"] == pytest.approx(
        0.9 * val["val/tinystories/loss"] + 0.1 * val["val/reasoning/loss"], rel=1e-12
    )


def test_gsm8k_from_the_hub_asks_for_config_main_and_the_train_and_test_splits(tmp_path, monkeypatch):
    from scaletrain.data import sources

    calls = []

    def fake_load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        return datasets_from(_records("train" if split == "train" else "test")[:5])

    monkeypatch.setattr(sources, "_check_hub_reachable", lambda timeout_s: None)
    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    cfg = load_config(compose_cfg(["data=gsm8k", "~local"]))
    corpus = open_corpus("gsm8k", cfg.data.sources["gsm8k"], cfg.data, tmp_path)
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert len(corpus.load("train")["text"]) == 5 and corpus.problems[0].answer.isdigit()


def datasets_from(records: list[dict]):
    import datasets

    return datasets.Dataset.from_list(records)


def test_a_text_source_can_build_each_document_from_record_fields_by_template(tmp_path):
    for split in ("train", "valid"):
        rows = [{"instruction": f"Say {i}.", "response": f"{i}!"} for i in range(3)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = SourceConfig(path=str(tmp_path), template="{instruction} => {response}")
    cfg = DataConfig(sources={"chat": src}, cache_dir=str(tmp_path / "cache"))
    corpus = open_corpus("chat", src, cfg, tmp_path / "cache")
    assert corpus.load("train")["text"] == ["Say 0. => 0!", "Say 1. => 1!", "Say 2. => 2!"]
    plain = open_corpus("chat", SourceConfig(path=str(tmp_path), text_column="response"), cfg, tmp_path / "cache")
    assert plain.fingerprints != corpus.fingerprints  # the template is part of what the cache is keyed by
    bad = SourceConfig(path=str(tmp_path), template="{instruction} => {answer}")
    with pytest.raises(DataError, match=r"data.sources.chat.template refers to answer, which its records lack"):
        open_corpus("chat", bad, cfg, tmp_path / "cache").load("train")
