"""Resources checked before they are taken (issue 28, item 4): a run that cannot fit this machine is refused in one
line, `resources error: <keys and values>: ... need at least <bytes> per rank on <device>, which has <bytes> (<where
the figure comes from>); <the nearest fix>`, before data preparation and before any model is built, in the CLI's
preflight (before Hydra creates a run folder) and in `Trainer` (in-process callers, sweep jobs on their own
machines). The check is arithmetic on `sizing.model_shape` (one block of each kind on the meta device), so its time
does not grow with the config: before it, `train.batch_size=10**12` built epoch permutations until memory ran out,
`model.d_model=10**6` / `model.vocab_size=10**9` died in the allocator after data preparation, and
`model.n_layers=10**6` was still building on the meta device after 180 s.

The machine's memory is mocked (`machine`), so the verdicts do not depend on where the tests run."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from scaletrain import run, sizing
from scaletrain.config import load_config
from scaletrain.distributed import DistEnv
from scaletrain.sizing import GB, LOADER_BYTES_PER_TOKEN, ResourceError, check_resources, estimate_resources, size
from scaletrain.trainer import train

from ..conftest import NO_LOCAL, compose_cfg, tiny_overrides

fault = pytest.mark.fault
HOST = 16 * 10**9  # the mocked machine: 16 GB of host memory
GPU = 80 * 10**9  # and 80 GB GPUs
# The check is milliseconds of arithmetic (docs/sizing.md quotes the figures); the bound leaves room for a loaded
# 2-core CI machine and stays far below what the absurd settings took before (minutes, or until memory ran out).
CHECK_SECONDS = 2.0


@pytest.fixture
def machine(monkeypatch):
    """This machine as the checks see it: HOST bytes of host memory, GPU bytes on each CUDA device, nothing else
    running (MemAvailable unknown: no warning about other processes)."""
    monkeypatch.setattr(sizing, "host_memory", lambda: (HOST, "mocked host memory"))
    monkeypatch.setattr(sizing, "device_memory", lambda device: (GPU, "mocked GPU memory"))
    monkeypatch.setattr(sizing, "_mem_available", lambda: None)


def _cfg(**extra: object):
    return load_config(compose_cfg(["debug=cpu_tiny", NO_LOCAL, *(f"{k}={v}" for k, v in extra.items())]))


# (key, absurd value, what the message names, the fix it offers)
ABSURD = [
    (
        "train.batch_size",
        10**12,
        "train.batch_size=1000000000000 (1,000,000,000,000 sequences per rank) x data.seq_len=64",
        "largest micro-batch that fits: ",
    ),
    (
        "model.d_model",
        10**6,
        "model.n_layers=2 blocks of 4,001,026,000,000 parameters (model.d_model=1000000, model.d_ff=512)",
        "a smaller model: not one block fits here",
    ),
    (
        "model.vocab_size",
        10**9,
        "model.vocab_size=1000000000 x model.d_model=128: 256,000,016,512 embedding parameters",
        "a smaller vocabulary or embedding width",
    ),
    ("model.n_layers", 10**6, "model.n_layers=1000000 blocks of 196,864 parameters", "a smaller model: at most "),
]
FIX = {  # what the fault table says of each
    "train.batch_size": "the largest micro-batch that fits",
    "model.d_model": "the block's parameters",
    "model.vocab_size": "the embedding's parameters",
    "model.n_layers": "the most layers that fit",
}


def _cases(where: str, outcome: str) -> list:
    return [
        pytest.param(*case, marks=fault(f"`{case[0]}=10**{len(str(case[1])) - 1}` ({where})", outcome + FIX[case[0]]))
        for case in ABSURD
    ]


@pytest.mark.parametrize(
    "key,value,names,fix", _cases("CLI preflight", "exit 2 before Hydra starts, no run folder or cache: names it, ")
)
def test_an_absurd_size_is_refused_in_one_line_before_hydra_starts(key, value, names, fix, machine, tmp_path, capsys):
    args = ["debug=cpu_tiny", NO_LOCAL, f"{key}={value}", f"hydra.run.dir={tmp_path}/out"]
    with pytest.raises(SystemExit) as exit_:
        run.preflight([*args, f"data.cache_dir={tmp_path}/cache"], multirun=False)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"resources error: {names}") and fix in err, err
    assert "per rank on cpu, which has 16 GB (mocked host memory)" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # no run folder, no data work


@pytest.mark.parametrize(
    "key,value,names,fix", _cases("in-process train()", "ResourceError in milliseconds, before data: names it, ")
)
def test_an_in_process_run_refuses_an_absurd_size_quickly_before_data_preparation(
    key, value, names, fix, machine, tinystories_dir, tmp_path
):
    """What a sweep job or a script calling `train()` gets: the same refusal from `Trainer`, before any data or
    model work (the token cache folder is never created), in milliseconds whatever the value."""
    cfg = compose_cfg(tiny_overrides(tinystories_dir, tmp_path / "cache", **{key: value}))
    start = time.perf_counter()
    with pytest.raises(ResourceError) as err:
        train(cfg, tmp_path / "run")
    assert time.perf_counter() - start < 5 * CHECK_SECONDS  # with the run folder's records: still seconds at most
    assert str(err.value).startswith(names) and fix in str(err.value) and "\n" not in str(err.value)
    assert err.value.kind == "resources"
    assert not (tmp_path / "cache").exists()
    typed = load_config(cfg)
    start = time.perf_counter()
    with pytest.raises(ResourceError):
        check_resources(typed, torch.device("cpu"), DistEnv())
    assert time.perf_counter() - start < CHECK_SECONDS


# every size the schemas accept at 2**32 and leave to this check (test_value_sweep.py: LEFT_TO_RESOURCE_CHECK) that
# is a memory question, with the option that brings its rule in
HUGE_SIZES = [
    *((key, ()) for key in ("model.d_model", "model.n_layers", "model.d_ff", "model.n_embed", "model.max_seq_len")),
    *((key, ()) for key in ("model.vocab_size", "data.seq_len", "data.tokenizer.vocab_size")),
    *((key, ()) for key in ("train.batch_size", "train.sample_count")),
    *((key, ("moe=top2_8e",)) for key in ("moe.n_experts", "moe.d_expert", "moe.n_shared")),
]


@fault("each size left to this check at 2**32 (13 keys)", "refused in one line naming that key, in milliseconds each")
def test_every_size_left_to_the_resource_check_is_refused_at_2_to_the_32_naming_its_key(machine):
    slow, wrong = [], []
    for key, options in HUGE_SIZES:
        cfg = load_config(compose_cfg(["debug=cpu_tiny", NO_LOCAL, *options, f"{key}={2**32}"]))
        start = time.perf_counter()
        try:
            check_resources(cfg, torch.device("cpu"), DistEnv())
            wrong.append(f"{key}: accepted")
        except ResourceError as err:
            if f"{key}={2**32}" not in str(err) or "\n" in str(err):
                wrong.append(f"{key}: {err}")
        if time.perf_counter() - start > CHECK_SECONDS:
            slow.append(key)
    assert not wrong and not slow, (wrong, slow)


@fault("a tiny run (debug=cpu_tiny)", "passes the check: at least 12 bytes per parameter + activations, far below")
def test_a_tiny_run_passes_and_its_least_is_the_exact_formula(machine):
    cfg = _cfg()
    r = check_resources(cfg, torch.device("cpu"), DistEnv())
    s, b, T = r.shape, cfg.train.batch_size, cfg.data.seq_len
    kept = sizing.kept_bytes_per_token(cfg, s, "none", act_bytes=4, mask_bytes=4)  # fp32, CPU dropout masks
    # weights (4) + AdamW's two moments (8) per parameter, the RoPE tables, what the forward keeps, the batch (int64
    # inputs and targets): gradients are freed before each forward (zero_grad set_to_none)
    assert r.needed == pytest.approx(12 * s.params + s.buffers + b * T * (kept + 16), rel=1e-12)
    assert r.needed < r.peak < sizing.USABLE * HOST and r.max_micro_batch >= b


@fault("the loader's batches exceed host RAM on a GPU host", "exit 2: names the batch keys, host bytes, largest fit")
def test_a_gpu_run_whose_batches_exceed_host_memory_is_refused(monkeypatch, machine):
    """The GPU has room for 16,384 tiny sequences; the host's 10 MB cannot hold their int64 inputs and targets."""
    monkeypatch.setattr(sizing, "host_memory", lambda: (10**7, "mocked host memory"))
    cfg = _cfg(**{"train.batch_size": 16384})
    with pytest.raises(ResourceError) as err:
        check_resources(cfg, torch.device("cuda"), DistEnv())
    msg = str(err.value)
    assert msg.startswith("train.batch_size=16384 x data.seq_len=64: the loader's batches need at least 16.8 MB of")
    assert "host memory per rank" in msg and "this host has 10 MB per rank (mocked host memory)" in msg
    fits = int(sizing.USABLE * 10**7 // (65 * LOADER_BYTES_PER_TOKEN))  # 65 = seq_len + 1 tokens per window
    assert f"largest micro-batch that fits: {fits:,} sequences per rank" in msg


@fault("a run whose peak may exceed 90% of the memory", "a warning naming the largest micro-batch; it still runs")
def test_a_run_that_may_not_fit_is_warned_about_not_refused(monkeypatch, machine, caplog):
    """The least it needs fits, its peak (an upper bound) may not: warned, with the dry run's largest micro-batch."""
    cfg = _cfg(**{"train.batch_size": 64})
    r = estimate_resources(cfg, torch.device("cpu"))
    memory = int((r.needed + r.peak) / 2)  # between the least and the peak bound
    monkeypatch.setattr(sizing, "host_memory", lambda: (memory, "mocked host memory"))
    with caplog.at_level(logging.WARNING, logger="scaletrain.sizing"):
        checked = check_resources(cfg, torch.device("cpu"), DistEnv())
    assert checked.max_micro_batch < 64
    (warning,) = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert warning.startswith("this run may not fit: its peak may reach")
    assert f"largest micro-batch that fits: {checked.max_micro_batch:,} sequences per rank" in warning


@pytest.mark.parametrize(
    "ranks,parallel",
    [
        pytest.param(
            ranks, parallel, marks=fault(f"the check on {where} beside `train.dry_run=true`", "the same bytes")
        )
        for ranks, parallel, where in [(1, "ddp", "1 GPU"), (4, "fsdp", "4 GPUs, FSDP2"), (4, "ddp", "4 GPUs, DDP")]
    ],
)
def test_the_check_on_a_gpu_sizes_a_rank_as_the_dry_run_does(ranks, parallel, machine):
    cfg = _cfg(**{"model.dropout": 0.1, "train.precision": "bf16", "train.parallel": parallel, "train.ac": "selective"})
    r = estimate_resources(cfg, torch.device("cuda"), ranks, ranks)
    dry = size(cfg, gpus=ranks, gpu_mem_gb=GPU / GB)
    assert r.peak == pytest.approx(dry.total_gb["selective"] * GB, rel=1e-12)
    fixed = dry.params_gb + dry.grads_gb + dry.optimizer_gb + dry.allgather_gb + dry.buffers_gb
    assert r.state.total == pytest.approx(fixed * GB, rel=1e-12)
    assert r.max_micro_batch == dry.max_micro_batch["selective"]


@fault("the check's figures on CPU beside the dry run's", "the dry run's plus the loader's buffers (same memory)")
def test_the_check_on_cpu_adds_the_loaders_buffers_to_the_dry_runs_figure(machine):
    cfg = _cfg(**{"train.precision": "fp32", "model.dropout": 0.0})  # no dropout: CPU and CUDA masks differ in size
    r, dry = estimate_resources(cfg, torch.device("cpu")), size(cfg, gpus=1, gpu_mem_gb=GPU / GB)
    b, T = cfg.train.batch_size, cfg.data.seq_len
    assert r.peak == pytest.approx(dry.total_gb["none"] * GB + b * (T + 1) * LOADER_BYTES_PER_TOKEN, rel=1e-12)
