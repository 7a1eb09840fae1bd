"""lm-evaluation-harness in process (scaletrain/harness.py): each request type against a direct computation on the
model; batch size and MoE batch mates change nothing; scaletrain's numbers equal the harness's own Hugging Face
backend on the exported model, per request; exact match on GSM8K equals scaletrain's own exact match except where
the two definitions differ (named); the eval command writes eval.json and refuses bad input in one line; the loop
logs downstream metrics into metrics.jsonl and summary.json.

Tolerances. A continuation's score is a sum of log-probabilities that are all <= 0, so an fp32 rounding error of
each term relative to its own size bounds the sum's error relative to the sum: RTOL = 64 fp32 epsilons (a forward of
two layers of width 64 rounds each logit a few epsilons apart between two implementations; the log-softmax adds
one more). A wrong token, position or window moves a score by O(1) nats, ~1e5x more."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[dev]')")

from scaletrain import harness, records  # noqa: E402
from scaletrain.config import Activation, ModelConfig, MoEConfig, Norm  # noqa: E402
from scaletrain.data import EvalProblem, Tokenizer  # noqa: E402
from scaletrain.data.sources import gsm8k_fields  # noqa: E402
from scaletrain.evaluator import exact_match  # noqa: E402
from scaletrain.harness import ScaletrainLM, run_tasks  # noqa: E402
from scaletrain.model import Transformer  # noqa: E402

from .conftest import REPO, SHARED, TORCHRUN_2, compose_cfg, read_metrics, read_summary, tiny_overrides  # noqa: E402

RTOL = 64 * torch.finfo(torch.float32).eps
GSM8K = SHARED / "data" / "gsm8k"
TASK_DATA = {"gsm8k_dir": str(GSM8K), "tinystories_dir": str(SHARED / "data" / "tinystories")}


def assert_aggregates_close(got: dict[str, float], want: dict[str, float]) -> None:
    """The harness's aggregates of per-request scores that agree within RTOL: a mean (acc, exact match) or a sum
    over bytes (bits per byte) keeps RTOL; a perplexity is exp(x) with x = -(mean score), so its relative error
    is |x| * RTOL (d exp(x) / exp(x) = dx) with |x| = log(perplexity)."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        rel = RTOL * max(1.0, math.log(value)) if "perplexity" in key and value > 1 else RTOL
        assert got[key] == pytest.approx(value, rel=rel), key


class _Req:
    """The one attribute of the harness's Instance that a model reads."""

    def __init__(self, *args: Any):
        self.args = args


@pytest.fixture(scope="module")
def tok(tinystories_dir) -> Tokenizer:
    text = (tinystories_dir / "train.txt").read_text(encoding="utf-8")[:200_000]
    return Tokenizer.train_bpe(text.split("<|endoftext|>"), 400)


def llama(tok: Tokenizer, max_seq_len: int = 128, seed: int = 0, **extra) -> Transformer:
    """Llama-shaped (exportable): RMSNorm, SwiGLU, GQA, no W_e; init 0.1 so scores depend on every position."""
    cfg = ModelConfig(
        name="llama_tiny", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160, embed_proj=False,
        norm=Norm.rmsnorm, activation=Activation.swiglu, init_std=0.1, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Transformer(cfg, tok.vocab_size, max_seq_len).eval()


def reference_score(model: Transformer, ids: list[int], n_cont: int) -> tuple[float, bool]:
    """Sum of log p(token | everything before it) over the last n_cont tokens of `ids`, and whether each is the
    argmax: one forward of the whole sequence, no batching, no padding."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
    target = torch.tensor(ids[-n_cont:])
    picked = logp[-n_cont:].gather(-1, target[:, None])
    return float(picked.sum()), bool((logp[-n_cont:].argmax(-1) == target).all())


def test_loglikelihood_is_the_continuations_log_probability_given_its_context(tok):
    model = llama(tok, max_seq_len=32)
    lm = ScaletrainLM(model, tok, batch_size=3)
    long_story = " ".join(["the little dog ran to the park"] * 12)  # > max_seq_len tokens: left-truncated
    requests = [("Once upon a time", " there was"), ("", "Lily"), (long_story, " and played"), ("A cat ", "sat")]
    got = lm.loglikelihood([_Req(*r) for r in requests], disable_tqdm=True)
    for (ctx, cont), (score, greedy) in zip(requests, got):
        if ctx == "":
            ctx_ids, cont_ids = [tok.eot_id], tok.encode(cont)  # the end-of-text prefix
        else:
            ctx_ids, cont_ids = lm._encode_pair(ctx, cont)  # "A cat " -> ("A cat", " sat"): the harness's split
        ids = (ctx_ids + cont_ids)[-(model.max_seq_len + 1) :]
        want, want_greedy = reference_score(model, ids, len(cont_ids))
        assert score == pytest.approx(want, rel=RTOL), (ctx[:20], cont)
        assert greedy == want_greedy
    assert lm._encode_pair("A cat ", "sat")[1] == tok.encode(" sat")


def test_rolling_loglikelihood_of_a_short_document_is_its_whole_log_probability_after_end_of_text(tok):
    model = llama(tok)
    lm = ScaletrainLM(model, tok, batch_size=2)
    text = "Tom had a red ball. He threw it high and it landed in a tree."
    (got,) = lm.loglikelihood_rolling([_Req(text)])
    ids = tok.encode(text)
    want, _ = reference_score(model, [tok.eot_id, *ids], len(ids))
    assert got == pytest.approx(want, rel=RTOL)


def test_batch_size_and_batch_mates_do_not_change_any_score_dense_or_moe(tok):
    """MoE with a capacity factor would drop tokens depending on the whole batch: scoring routes dropless."""
    requests = [_Req("Once upon a time", " there was a girl"), _Req("The sun", " was hot"), _Req("Ben", " smiled")]
    for moe in (None, MoEConfig(n_experts=4, top_k=1, capacity_factor=1.0)):
        torch.manual_seed(0)
        cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, init_std=0.1)
        model = Transformer(cfg, tok.vocab_size, 64, moe).eval()
        alone = [ScaletrainLM(model, tok, batch_size=1).loglikelihood([r], disable_tqdm=True)[0] for r in requests]
        together = ScaletrainLM(model, tok, batch_size=8).loglikelihood(requests, disable_tqdm=True)
        for a, b in zip(alone, together):
            assert a[0] == pytest.approx(b[0], rel=RTOL) and a[1] == b[1]


def test_generate_until_is_greedy_decoding_cut_at_the_first_stop_string(tok):
    from scaletrain.generate import complete

    model = llama(tok, max_seq_len=64)
    lm = ScaletrainLM(model, tok, batch_size=4)
    prompts = ["Once upon a time", "The dog"]
    free = [tok.decode(ids) for ids in complete(model, [tok.encode(p) for p in prompts], 12, stop_token=tok.eot_id)]
    stop = free[0][3:6]  # a string the first continuation contains
    got = lm.generate_until(
        [_Req(p, {"until": [stop], "max_gen_toks": 12, "do_sample": False}) for p in prompts], disable_tqdm=True
    )
    assert got[0] == free[0].split(stop)[0] and len(got[0]) < len(free[0])
    assert got[1] == free[1].split(stop)[0]
    with pytest.raises(harness.BadInput, match="asks for 64 new tokens; the model's context is 64"):
        lm.generate_until([_Req("x", {"until": [], "max_gen_toks": 64})])


def test_flat_metric_names_and_directions():
    results = {
        "results": {
            "local_gsm8k": {"alias": "x", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1},
            "local_tinystories_ppl": {"bits_per_byte,none": 1.5, "bits_per_byte_stderr,none": "N/A"},
        }
    }
    assert harness.flatten(results) == {
        "downstream/local_gsm8k/exact_match/strict-match": 0.25,
        "downstream/local_gsm8k/exact_match/strict-match_stderr": 0.1,
        "downstream/local_tinystories_ppl/bits_per_byte": 1.5,
    }
    assert records.downstream_higher_is_better("downstream/local_gsm8k/exact_match/strict-match")
    assert records.downstream_higher_is_better("downstream/hellaswag/acc_norm")
    assert not records.downstream_higher_is_better("downstream/local_tinystories_cloze/perplexity")
    assert not records.downstream_higher_is_better("downstream/local_tinystories_ppl/bits_per_byte_stderr")


def test_local_tasks_without_their_data_folder_fail_naming_the_key():
    with pytest.raises(harness.TaskUnavailable, match="local_gsm8k: no data folder: give gsm8k_dir"):
        harness.load_tasks(["local_gsm8k"], {})


def test_scores_equal_the_harness_hugging_face_backend_on_the_export(tok, tmp_path):
    """The same three tasks through `--model hf` on scaletrain.export_hf's folder: every request's answer (score
    and greedy flag, a document's rolling score, a generated text) and every aggregate agree."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    from scaletrain import export_hf

    model = llama(tok, max_seq_len=128)
    tok.save(tmp_path / "tokenizer.json")
    export_hf.export(model, tmp_path / "tokenizer.json", tmp_path / "hf")
    tasks = ["local_tinystories_cloze", "local_tinystories_ppl", "local_gsm8k"]
    kw: dict[str, Any] = dict(limit=6, num_fewshot=1, metadata=TASK_DATA, bootstrap_iters=0, log_samples=True)
    kw["gen_kwargs"] = {"max_gen_toks": 24}
    ours, flat_ours = run_tasks(ScaletrainLM(model, tok, batch_size=4), tasks, **kw)
    hf = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=4, dtype="float32")
    theirs, flat_theirs = run_tasks(hf, tasks, **kw)
    assert ours is not None and theirs is not None
    for task in tasks:
        a, b = ours["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x["doc_id"] == y["doc_id"] and x["arguments"] == y["arguments"]
            for rx, ry in zip(x["resps"], y["resps"]):
                if task == "local_gsm8k":
                    assert rx == ry  # generated text, identical
                elif task == "local_tinystories_cloze":
                    assert rx[0][0] == pytest.approx(ry[0][0], rel=RTOL) and rx[0][1] == ry[0][1]
                else:
                    assert rx[0] == pytest.approx(ry[0], rel=RTOL)
    assert_aggregates_close(flat_ours, flat_theirs)


def test_gsm8k_exact_match_equals_scaletrains_own_except_where_the_definitions_differ(tok, monkeypatch):
    """The same 7 GSM8K test problems and prompts ("Question: ...\\nAnswer:", zero-shot) through scaletrain's
    exact match and the harness's local_gsm8k (strict-match), with fixed replies in place of decoding. They
    agree on a right answer, a wrong one, an unmarked one, a trailing '.', and a reply running on into a next
    question. They differ, by definition, on two: scaletrain reads numbers canonically ('018' is 18) and the
    harness compares strings; scaletrain stops only at end-of-text and takes the first '####', the harness
    cuts at its stop string 'Question:' first."""
    records = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()[:7]]
    fields = [gsm8k_fields(r, "test", True) for r in records]
    problems = [EvalProblem(f"Question: {f['question']}\nAnswer:", f["final"]) for f in fields]
    assert all(p.prompt == f"Question: {r['question']}\nAnswer:" for p, r in zip(problems, records))
    replies = [
        lambda a: f" Some steps. #### {a}\n",  # right
        lambda a: f" #### {a}0",  # wrong
        lambda a: f" {a}",  # no marker
        lambda a: f" So it is #### {a}.",  # trailing period
        lambda a: f" #### {a}\nQuestion: what next? #### 5",  # runs on into a next question
        lambda a: f" #### 0{a}",  # DIFFERS: a leading zero (scaletrain: canonical int; the harness: a string)
        lambda a: f" Hmm.\nQuestion: again? #### {a}",  # DIFFERS: the answer after the harness's stop string
    ]
    by_prompt = {p.prompt: replies[i](p.answer) for i, p in enumerate(problems)}

    def oracle(model, prompts, max_new_tokens, **kw):
        return [tok.encode(by_prompt[tok.decode(list(p))])[:max_new_tokens] for p in prompts]

    monkeypatch.setattr("scaletrain.evaluator.complete", oracle)
    monkeypatch.setattr("scaletrain.harness.complete", oracle)
    model = llama(tok, max_seq_len=512)
    ours = [exact_match(model, tok, [p], 96) for p in problems]
    results, _ = run_tasks(
        ScaletrainLM(model, tok, batch_size=4), ["local_gsm8k"], limit=7, num_fewshot=0, metadata=TASK_DATA,
        bootstrap_iters=0, log_samples=True, gen_kwargs={"max_gen_toks": 96},
    )  # fmt: skip
    assert results is not None
    strict = {s["doc_id"]: s["exact_match"] for s in results["samples"]["local_gsm8k"] if s["filter"] == "strict-match"}
    theirs = [strict[i] for i in range(7)]
    assert ours == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert theirs == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def _run_dir(tmp_path: Path, tok: Tokenizer, model: Transformer) -> Path:
    """A finished run folder as the trainer leaves it (config.json, tokenizer.json, model.pt)."""
    from scaletrain import checkpoint as ckpt
    from scaletrain import records
    from scaletrain.config import load_config, to_dict

    run = tmp_path / "run"
    run.mkdir()
    cfg = compose_cfg(["debug=cpu_tiny", "model.norm=rmsnorm", "model.activation=swiglu", "model.embed_proj=false"])
    d = to_dict(load_config(cfg))
    d["model"].update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160, max_seq_len=model.max_seq_len)
    d["model"]["vocab_size"] = None  # the tokenizer's size
    d["logging"]["wandb"]["mode"] = "disabled"
    (run / records.CONFIG_FILE).write_text(json.dumps(d))
    tok.save(run / records.TOKENIZER_FILE)
    ckpt.save_weights(run / records.MODEL_FILE, {"model": model.state_dict(), "step": 7, "config": d})
    return run


def test_the_eval_command_writes_the_harness_results_into_eval_json(tok, tmp_path, capsys):
    from scaletrain import eval as eval_cmd

    model = llama(tok, max_seq_len=128)
    run = _run_dir(tmp_path, tok, model)
    data = [f"--task-data=gsm8k_dir={GSM8K},tinystories_dir={TASK_DATA['tinystories_dir']}"]
    argv = [str(run), "--tasks", "local_tinystories_cloze,local_gsm8k", "--limit", "4", "--num-fewshot", "0", *data]
    assert eval_cmd.main([*argv, "--gen-kwargs", "max_gen_toks=8", "--batch-size", "2"]) == 0
    out = json.loads((run / "eval.json").read_text())
    assert out["step"] == 7 and out["tasks"] == ["local_tinystories_cloze", "local_gsm8k"]
    res = out["harness"]["results"]["local_tinystories_cloze"]
    assert out["metrics"]["downstream/local_tinystories_cloze/acc"] == res["acc,none"]
    assert out["metrics"]["downstream/local_tinystories_cloze/perplexity_stderr"] == res["perplexity_stderr,none"]
    assert out["harness"]["n-samples"]["local_gsm8k"]["effective"] == 4
    assert "local_tinystories_cloze" in capsys.readouterr().out  # the harness's table
    # the same model in process, no file in between: the same numbers
    _, flat = run_tasks(
        ScaletrainLM(model, tok, batch_size=2), ["local_tinystories_cloze"], limit=4, num_fewshot=0,
        metadata=TASK_DATA, bootstrap_iters=100_000,
    )  # fmt: skip
    assert flat["downstream/local_tinystories_cloze/acc"] == out["metrics"]["downstream/local_tinystories_cloze/acc"]
    # the same weights, batches and fp32 arithmetic as the command's: the same perplexity, bit for bit
    assert (
        flat["downstream/local_tinystories_cloze/perplexity"]
        == out["metrics"]["downstream/local_tinystories_cloze/perplexity"]
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "local_gsm8k"], "local_gsm8k: no data folder: give gsm8k_dir"),
        (["--tasks", "local_gsm8k", "--task-data", "gsm8k_dir"], "--task-data: expected KEY=VALUE, got 'gsm8k_dir'"),
        (["--tasks", "local_gsm8k", "--task-data", "gsm8k_dir=/nowhere"], "gsm8k_dir=/nowhere has no train.jsonl"),
        (["--tasks", "nope.yaml"], "task nope.yaml: no such YAML file"),
        (["--tasks", "local_gsm8k", "--batch-size", "big"], "--batch-size: expected a positive integer or auto"),
        (["data=gsm8k", "--tasks", "local_gsm8k"], "--tasks takes no data overrides"),
    ],
)
def test_the_eval_command_refuses_bad_task_input_in_one_line(tok, tmp_path, capsys, argv, message):
    from scaletrain import eval as eval_cmd

    run = _run_dir(tmp_path, tok, llama(tok))
    assert eval_cmd.main([str(run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval error: ") and message in err and "\n" not in err
    assert not (run / "eval.json").exists()


@pytest.mark.slow
def test_a_hub_task_while_offline_fails_in_one_line_with_exit_2(tok, tmp_path):
    """The hub is unreachable from this machine (and from CI): HF_HUB_OFFLINE makes that so anywhere."""
    run = _run_dir(tmp_path, tok, llama(tok))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "scaletrain.eval", str(run), "--tasks", "lambada_openai"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("eval error: task lambada_openai: its data is on the Hugging Face hub")
    assert "local_gsm8k" in last and "HF_DATASETS_OFFLINE" in last
    assert "Traceback" not in proc.stderr
    with pytest.raises(harness.TaskUnavailable, match="'local_gsm8kk' is not an lm-eval task.*'local_gsm8k'"):
        harness.load_tasks(["local_gsm8kk"], TASK_DATA)  # not a local name: the harness's whole index (~15 s)


def test_the_loop_logs_downstream_metrics_on_its_cadence_and_into_the_summary(tmp_path, tinystories_dir, data_cache):
    from scaletrain.trainer import train

    extra = {
        "train.max_steps": 6,
        "train.eval_every": 100,
        "train.eval_tasks": "[local_tinystories_cloze]",
        "train.eval_tasks_every": 4,
        "train.eval_tasks_limit": 3,
        "train.eval_tasks_data.tinystories_dir": TASK_DATA["tinystories_dir"],
    }
    cfg = compose_cfg(tiny_overrides(tinystories_dir, data_cache, **extra))
    train(cfg, tmp_path)
    logged = [r for r in read_metrics(tmp_path) if any(k.startswith("downstream/") for k in r)]
    assert [r["step"] for r in logged] == [4, 6]  # its cadence, and the last step
    keys = {"acc", "acc_stderr", "perplexity", "perplexity_stderr"}
    assert {k.removeprefix("downstream/local_tinystories_cloze/") for k in logged[-1] if k != "step"} == keys
    summary = read_summary(tmp_path)
    assert summary["downstream"] == {k: v for k, v in logged[-1].items() if k != "step"}
    assert math.isfinite(summary["downstream"]["downstream/local_tinystories_cloze/perplexity"])


_TWO_RANKS = """\
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch
from scaletrain import distributed, harness
from scaletrain.data import Tokenizer
from tests.test_harness import llama, TASK_DATA

out, shard = sys.argv[1], sys.argv[2] == "fsdp"
env = distributed.detect_env()
distributed.init_process_group(env, torch.device("cpu"))
tok = Tokenizer.load(sys.argv[3])
model = llama(tok, max_seq_len=128)
if shard:
    from scaletrain.config import Precision
    from scaletrain.parallelize import apply_fsdp
    apply_fsdp(model, torch.device("cpu"), env, Precision.fp32)
tasks = ["local_tinystories_cloze", "local_tinystories_ppl", "local_gsm8k"]
lm = harness.ScaletrainLM(model, tok, batch_size=2)
results, flat = harness.run_tasks(lm, tasks, limit=7, num_fewshot=1, metadata=TASK_DATA, bootstrap_iters=0,
                                  log_samples=True, gen_kwargs={"max_gen_toks": 12})
if env.is_main:
    docs = {t: {s["doc_id"]: s["resps"] for s in results["samples"][t]} for t in tasks}
    json.dump({"flat": flat, "docs": docs}, open(out, "w"))
else:
    assert flat  # every rank gets the numbers
distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_split_the_documents_and_score_what_one_process_scores(tok, tmp_path, parallel):
    """7 documents, 1-shot, over 2 ranks (4 + 3 requests of each type, and the ranks decode different prompts),
    the model whole on each rank (as DDP's module) or sharded by FSDP2 (every forward gathers: the ranks stay in
    lockstep, generation included): the same prompts (few-shot examples drawn as in one process) and answers."""
    tok.save(tmp_path / "tok.json")
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    cmd = [*TORCHRUN_2, str(script), str(tmp_path / "out.json"), parallel, str(tmp_path / "tok.json")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "out.json").read_text())
    tasks = ["local_tinystories_cloze", "local_tinystories_ppl", "local_gsm8k"]
    one, flat = run_tasks(
        ScaletrainLM(llama(tok, max_seq_len=128), tok, batch_size=2), tasks, limit=7, num_fewshot=1,
        metadata=TASK_DATA, bootstrap_iters=0, log_samples=True, gen_kwargs={"max_gen_toks": 12},
    )  # fmt: skip
    assert one is not None
    for task in tasks:
        docs = {str(s["doc_id"]): s["resps"] for s in one["samples"][task]}
        assert sorted(two["docs"][task]) == sorted(docs) and len(docs) == 7
        for doc_id, resps in docs.items():
            if task == "local_gsm8k":
                assert two["docs"][task][doc_id] == resps
            else:
                a = json.dumps(two["docs"][task][doc_id])
                first = lambda r: r[0][0] if isinstance(r[0][0], float) else r[0][0][0]  # noqa: E731
                assert first(json.loads(a)) == pytest.approx(first(resps), rel=RTOL), (task, doc_id)
    assert_aggregates_close(two["flat"], flat)


def test_a_task_yaml_of_local_files_runs_by_path(tok, tmp_path):
    """The README's recipe for a standard task offline: its YAML fields with dataset_path json and local
    data_files (here LAMBADA's fields over three stories)."""
    stories = ["Tom saw a big red ball in the park", "The cat sat on the warm mat", "Lily liked to sing songs"]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    yaml = tmp_path / "my_lambada.yaml"
    yaml.write_text(
        "task: my_lambada\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'test.jsonl'}\n"
        "output_type: loglikelihood\n"
        "test_split: test\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    model = llama(tok, max_seq_len=64)
    lm = ScaletrainLM(model, tok, batch_size=2)
    _, flat = run_tasks(lm, [str(yaml)], bootstrap_iters=0)
    scores = [
        reference_score(model, ids, len(cont))
        for s in stories
        for ctx, cont in [lm._encode_pair(s.rsplit(" ", 1)[0], " " + s.rsplit(" ", 1)[1])]
        for ids in [ctx + cont]
    ]
    assert flat["downstream/my_lambada/acc"] == sum(g for _, g in scores) / 3
    x = -sum(s for s, _ in scores) / 3  # perplexity = exp(x): relative error |x| * RTOL (assert_aggregates_close)
    assert flat["downstream/my_lambada/perplexity"] == pytest.approx(math.exp(x), rel=RTOL * max(1.0, x))


def test_the_speed_benchmark_times_both_backends_on_the_same_requests(tok, tmp_path, capsys):
    pytest.importorskip("accelerate")
    from scaletrain import bench_harness

    run = _run_dir(tmp_path, tok, llama(tok, max_seq_len=128))
    argv = [str(run), "--tasks", "local_tinystories_cloze", "--limit", "3", "--batch-size", "2"]
    assert bench_harness.main([*argv, "--task-data", f"tinystories_dir={TASK_DATA['tinystories_dir']}"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if "| loglikelihood " in line]
    assert [(r[1].strip(), int(r[3])) for r in rows] == [("scaletrain (in process)", 3), ("hf (export)", 3)]


def test_auto_batch_size_on_cpu_keeps_a_forwards_logits_under_the_budget(tok):
    """2^27 fp32 logits (512 MiB) per forward at most, a power of two, 1..64; found per sequence length."""
    lm = ScaletrainLM(llama(tok, max_seq_len=4096), tok, batch_size="auto")
    V = lm.module.vocab_size = 50_257  # the rule reads the vocabulary size only: GPT-2's
    for T in (16, 1024, 4096):
        B = lm._batch_for(T)
        assert B & (B - 1) == 0 and 1 <= B <= harness.AUTO_MAX_BATCH
        assert B * T * V <= harness.CPU_LOGITS_BUDGET or B == 1
        assert B == harness.AUTO_MAX_BATCH or 2 * B * T * V > harness.CPU_LOGITS_BUDGET  # the largest that fits
    assert [lm._batch_for(T) for T in (16, 1024, 4096)] == [64, 2, 1]


def test_the_eval_command_puts_the_downstream_metrics_into_the_runs_own_wandb_run(tok, tmp_path, monkeypatch):
    """Same id, same mode (offline here), resumed: the run's W&B summary gains the downstream keys."""
    import wandb

    from scaletrain import eval as eval_cmd
    from scaletrain import records as rec

    run = _run_dir(tmp_path, tok, llama(tok))
    config = json.loads((run / rec.CONFIG_FILE).read_text())
    config["logging"]["wandb"]["mode"] = "offline"
    (run / rec.CONFIG_FILE).write_text(json.dumps(config))
    (run / rec.WANDB_ID_FILE).write_text("abc123")
    calls: list[dict] = []

    class FakeRun:
        summary: dict = {}

        def finish(self):
            calls.append({"finished": True})

    def init(**kw):
        calls.append(kw)
        return FakeRun()

    monkeypatch.setattr(wandb, "init", init)
    argv = [str(run), "--tasks", "local_tinystories_cloze", "--limit", "2", "--num-fewshot", "0"]
    assert eval_cmd.main([*argv, f"--task-data=tinystories_dir={TASK_DATA['tinystories_dir']}"]) == 0
    assert calls[0]["id"] == "abc123" and calls[0]["mode"] == "offline" and calls[0]["resume"] == "allow"
    assert calls[-1] == {"finished": True}
    metrics = json.loads((run / "eval.json").read_text())["metrics"]
    assert FakeRun.summary == metrics and "downstream/local_tinystories_cloze/acc" in metrics
