"""Distributed on CPU (gloo): launcher environments, preemption flags, local GPU slots, and the parity
that matters: 2-process DDP and FSDP2 runs, launched by torchrun and by submitit's local executor,
log the same losses as one process on the same global batch (to 1e-5), and an FSDP2 run resumed from
its checkpoint continues exactly. SLURM itself is in test_slurm.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaletrain import checkpoint as ckpt
from scaletrain import distributed as D
from scaletrain.config import ConfigError, validate
from scaletrain.model import Transformer
from scaletrain.optim import build_optimizer
from scaletrain.trainer import train

from .conftest import REPO, compose_cfg, tiny_overrides

STEPS = 6
_LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "SUBMITIT_EXECUTOR", "SLURM_STEP_ID", "SLURM_NTASKS", "SLURM_JOB_ID")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables from the outer environment (CI may itself run inside a SLURM job). detect_env
    exports RANK, WORLD_SIZE, MASTER_ADDR, ... itself, so the whole environment is restored afterwards:
    a leaked WORLD_SIZE would make every later test join a process group."""
    saved = dict(os.environ)
    for key in _LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_a_plain_process_is_a_single_rank(clean_env):
    env = D.detect_env()
    assert (env.rank, env.world_size, env.launcher, env.is_main) == (0, 1, "none", True)


def test_torchrun_variables_are_taken_as_they_are(clean_env):
    for k, v in {"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                 "LOCAL_WORLD_SIZE": "4"}.items():
        clean_env.setenv(k, v)
    assert D.detect_env() == D.DistEnv(5, 8, 1, 4, "torchrun")


def test_a_submitit_slurm_task_gets_its_rank_and_the_first_node_as_master(clean_env):
    for k, v in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
                 "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2",
                 "SLURM_JOB_NODELIST": "gpu[3-4]", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}.items():
        clean_env.setenv(k, v)
    env = D.detect_env()
    assert env == D.DistEnv(9, 16, 1, 8, "submitit-slurm")
    assert os.environ["MASTER_ADDR"] == "gpu3" and os.environ["RANK"] == "9"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"  # each rank picks cuda:<local rank>
    assert D.detect_env() == env  # idempotent: the exported variables do not change the answer


def test_run_records_carry_the_slurm_job_ids(clean_env):
    clean_env.setenv("SLURM_JOB_ID", "123")
    clean_env.setenv("SLURM_ARRAY_TASK_ID", "4")
    info = D.cluster_env(D.DistEnv(0, 2, 0, 2, "srun"))
    assert (info["SLURM_JOB_ID"], info["SLURM_ARRAY_TASK_ID"], info["world_size"]) == ("123", "4", 2)


def test_usr2_and_sigterm_only_raise_a_flag_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR2)
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        with D.Preemption(torch.device("cpu")) as p:
            assert not p.requested()
            os.kill(os.getpid(), sig)
            assert p.requested() and p.name == sig.name
    assert signal.getsignal(signal.SIGUSR2) is before


def test_outside_a_scheduler_a_preempted_run_stops_with_the_shells_signal_code(clean_env):
    assert D.requeue_or_stop(D.DistEnv(), max_requeues=3, signum=signal.SIGTERM) == ("stopped", 143)


def test_a_second_local_job_on_the_same_slot_waits_for_the_first(tmp_path):
    env = D.DistEnv(0, 1, 0, 1, "submitit-local")
    assert D.claim_local_slot(env, job_num=3, n_slots=2, lock_dir=tmp_path) == 1  # slot 1: device 1
    probe = ("import fcntl, sys; f = open(sys.argv[1], 'w')\n"
             "try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError: sys.exit(7)")
    held = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "slot1_rank0.lock")])
    free = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "slot0_rank0.lock")])
    assert (held.returncode, free.returncode) == (7, 0)


def test_every_gpu_is_a_rank_or_the_config_says_why():
    with pytest.raises(ConfigError, match="cluster.tasks_per_node.*one rank per GPU"):
        validate(compose_cfg(["cluster=slurm", "cluster.gpus_per_node=4", "cluster.tasks_per_node=2"]))
    cfg = compose_cfg(["cluster=slurm", "cluster.gpus_per_node=4", "cluster.partition=gpu", "cluster.qos=high"])
    validate(cfg)
    assert (cfg.cluster.tasks_per_node, cfg.cluster.partition) == (4, "gpu")


# ----------------------------------------------------------------------------------------------------
# Parity: the real entry point under torchrun / submitit_local against one in-process run


def _overrides(tinystories_dir: Path, cache: Path, **extra: object) -> list[str]:
    base = {"train.max_steps": STEPS, "train.log_every": 1, "train.eval_every": 0, "train.ckpt_every": 0,
            "train.sample_count": 0, "train.ckpt_keep": 0}
    return tiny_overrides(tinystories_dir, cache, **{**base, **extra})


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def _val_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["val_loss"]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    for key in _LAUNCH_VARS:
        env.pop(key, None)
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def _torchrun(overrides: list[str], run_dir: Path) -> None:
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "-m", "scaletrain.run", *overrides, f"hydra.run.dir={run_dir}"])


@pytest.fixture(scope="module")
def reference(tinystories_dir, data_cache, tmp_path_factory) -> dict[str, Path]:
    """One-process runs (AdamW and Muon) that the 2-process runs must reproduce."""
    runs = {}
    for optim in ("adamw", "muon"):
        runs[optim] = tmp_path_factory.mktemp(f"ref_{optim}")
        train(compose_cfg(_overrides(tinystories_dir, data_cache, optim=optim)), runs[optim])
    return runs


@pytest.mark.slow
def test_two_ddp_ranks_under_torchrun_match_one_process(reference, tinystories_dir, data_cache, tmp_path):
    _torchrun(_overrides(tinystories_dir, data_cache, **{"train.parallel": "ddp"}), tmp_path)
    assert len(_losses(tmp_path)) == STEPS
    assert _losses(tmp_path) == pytest.approx(_losses(reference["adamw"]), abs=1e-5)
    assert _val_loss(tmp_path) == pytest.approx(_val_loss(reference["adamw"]), abs=1e-5)
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert (info["cluster"]["launcher"], info["cluster"]["world_size"]) == ("torchrun", 2)


@pytest.mark.slow
def test_ddp_gradient_accumulation_syncs_once_per_step_and_matches_one_process(tinystories_dir, data_cache,
                                                                               tmp_path):
    """Micro-batches before the last skip DDP's all-reduce (no_sync); the step still equals one process."""
    accum = {"train.grad_accum": 2, "train.batch_size": 4}
    train(compose_cfg(_overrides(tinystories_dir, data_cache, **accum)), tmp_path / "one")
    _torchrun(_overrides(tinystories_dir, data_cache, **accum, **{"train.parallel": "ddp"}), tmp_path / "ddp")
    assert len(_losses(tmp_path / "ddp")) == STEPS
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)


@pytest.mark.slow
def test_two_fsdp2_ranks_with_muon_match_one_process_and_resume_exactly(reference, tinystories_dir, data_cache,
                                                                        tmp_path):
    """FSDP2 writes sharded (DCP) checkpoints by default: each rank its own shards. They resume on the
    same 2 ranks and, resharded, in one plain process; the gathered single-file format resumes too."""
    fsdp = {"optim": "muon", "train.parallel": "fsdp"}
    _torchrun(_overrides(tinystories_dir, data_cache, **fsdp, **{"train.ckpt_every": 3}), tmp_path / "a")
    assert _losses(tmp_path / "a") == pytest.approx(_losses(reference["muon"]), abs=1e-5)
    assert _val_loss(tmp_path / "a") == pytest.approx(_val_loss(reference["muon"]), abs=1e-5)
    step3 = tmp_path / "a" / "checkpoints" / "step_0000003"
    assert sorted(p.name for p in step3.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    _torchrun(_overrides(tinystories_dir, data_cache, **fsdp, **{"train.resume": step3}), tmp_path / "b")
    assert _losses(tmp_path / "b") == pytest.approx(_losses(tmp_path / "a")[3:], abs=1e-5)

    full = {**fsdp, "train.ckpt_format": "full"}
    _torchrun(_overrides(tinystories_dir, data_cache, **full, **{"train.ckpt_every": 3}), tmp_path / "d")
    gathered = tmp_path / "d" / "checkpoints" / "step_0000003.pt"  # gathered to rank 0, one file
    _torchrun(_overrides(tinystories_dir, data_cache, **full, **{"train.resume": gathered}), tmp_path / "e")
    assert _losses(tmp_path / "e") == pytest.approx(_losses(tmp_path / "a")[3:], abs=1e-5)

    # resharded onto one plain process, the 2-rank shards hold exactly what the gathered file holds
    cfg = compose_cfg(_overrides(tinystories_dir, data_cache, optim="muon"))
    model = Transformer(cfg.model, cfg.data.tokenizer.vocab_size, cfg.data.seq_len, cfg.moe)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    assert ckpt.load_sharded_checkpoint(step3, model, optimizer)["step"] == 3
    whole = ckpt.load_checkpoint(gathered)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, whole["model"][name], rtol=0, atol=1e-6)
    momenta = {n: optimizer.state[p]["momentum_buffer"] for n, p in model.named_parameters()
               if "momentum_buffer" in optimizer.state[p]}
    assert momenta and all(torch.allclose(m, whole["optimizer"]["state"][n]["momentum_buffer"], atol=1e-6)
                           for n, m in momenta.items())


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_of_a_submitit_local_job_match_one_process(parallel, reference, tinystories_dir, data_cache,
                                                             tmp_path):
    sweep = tmp_path / "sweep"
    _run([sys.executable, "-m", "scaletrain.run", "-m", "cluster=local", "cluster.gpus_per_node=0",
          "cluster.tasks_per_node=2", f"train.parallel={parallel}", *_overrides(tinystories_dir, data_cache),
          f"hydra.sweep.dir={sweep}"])
    assert _losses(sweep / "0") == pytest.approx(_losses(reference["adamw"]), abs=1e-5)
    info = json.loads((sweep / "0" / "run_info.json").read_text())
    assert (info["cluster"]["launcher"], info["cluster"]["world_size"]) == ("submitit-local", 2)
    assert Path(info["cluster"]["log_stdout"]).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_moe_with_balancing_on_two_ranks_matches_one_process(parallel, tinystories_dir, data_cache, tmp_path):
    """The balancing loss (balance_scope=global_batch) and the selection-bias update count the tokens of
    every rank, so 2 ranks train like 1 process. init_std 0.1 keeps the router away from near-ties, where
    float noise alone would flip top-k choices; with micro_batch scope the losses part by ~1e-3."""
    moe = {"model": "moe_8x", "model.d_model": 64, "model.n_heads": 4, "model.d_ff": 128, "model.dropout": 0.0,
           "model.init_std": 0.1, "moe.aux_loss_coef": 0.01, "moe.bias_update_rate": 0.01}
    train(compose_cfg(_overrides(tinystories_dir, data_cache, **moe)), tmp_path / "one")
    _torchrun(_overrides(tinystories_dir, data_cache, **moe, **{"train.parallel": parallel}), tmp_path / "two")
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)
    assert _val_loss(tmp_path / "two") == pytest.approx(_val_loss(tmp_path / "one"), abs=1e-5)
    if parallel == "ddp":  # the scope is what makes the difference
        _torchrun(_overrides(tinystories_dir, data_cache, **moe, **{"train.parallel": parallel,
                                                                    "moe.balance_scope": "micro_batch"}),
                  tmp_path / "local")
        assert max(abs(a - b) for a, b in zip(_losses(tmp_path / "local"), _losses(tmp_path / "one"))) > 1e-4
