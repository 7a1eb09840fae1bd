"""Distributed runs: where the ranks come from, the process group, each rank's device, DDP's `no_sync` and
the full state of a sharded model, rank-0 helpers, cluster records, and preemption (signal -> flag ->
checkpoint -> requeue). Wrapping the model (FSDP2 / DDP) is parallelize.py's.

Launchers understood by `detect_env()`, first match wins:
- torchrun (`TORCHELASTIC_RUN_ID`): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT are already set;
- submitit (`SUBMITIT_EXECUTOR` = slurm | local; Hydra's submitit_slurm / submitit_local launchers, one
  task per rank): `submitit.helpers.TorchDistributedEnvironment` exports the same variables;
- plain `srun` inside an sbatch script (SLURM_STEP_ID and SLURM_NTASKS set, no submitit): the same
  variables derived from SLURM's, master = first node of the job, port derived from the job id;
- anything else: one process.
torch.distributed is the engine: NCCL on GPUs, gloo on CPU; nothing here moves tensors by hand.

Preemption: SLURM sends the job's `--signal` (USR2, `signal_delay_s` before the time limit, or at
preemption with `preempt_send_user_signal`) or SIGTERM (preemption without it, `scontrol requeue`,
`scancel`). `Preemption` only sets a flag; the loop asks `requested()` after each step (agreed across
ranks), saves a checkpoint, and `requeue_or_stop()` requeues the job (`scontrol requeue`, only while it
is still RUNNING, so that `scancel` is final) and exits without a result, so submitit's client keeps
waiting for the requeued run. Why not submitit's `Checkpointable` (hydra-submitit-launcher's
`checkpoint()`): it runs inside the signal handler in the middle of a step, only on rank 0, while a
sharded checkpoint needs every rank at a step boundary; and it only resubmits the same arguments,
which is what a requeue of the same sbatch script does anyway.

Not here: the training loop (trainer.py), wrapping and initializing the model (parallelize.py), checkpoint
files (checkpoint.py), launcher settings (conf/cluster/*.yaml).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scaletrain.config import BadInput

# submitit's LocalExecutor restarts the tasks of a job that exits with this code (its "requeue")
SUBMITIT_LOCAL_REQUEUE_CODE = 144
_SLURM_RECORD = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_RESTART_COUNT",
    "SLURM_JOB_NAME",
    "SLURM_JOB_PARTITION",
    "SLURM_JOB_ACCOUNT",
    "SLURM_JOB_QOS",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NTASKS",
    "SLURM_CPUS_PER_TASK",
    "SLURM_SUBMIT_DIR",
    "SUBMITIT_EXECUTOR",
    "CUDA_VISIBLE_DEVICES",
)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "none"  # torchrun | submitit-slurm | submitit-local | srun | env | none

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _from_env(launcher: str) -> DistEnv:
    e = os.environ
    world = int(e["WORLD_SIZE"])
    return DistEnv(int(e["RANK"]), world, int(e.get("LOCAL_RANK", 0)), int(e.get("LOCAL_WORLD_SIZE", world)), launcher)


def _export_srun_env() -> None:
    """An srun task without submitit: the env:// variables from SLURM's (as lingua does)."""
    e = os.environ
    nodes = subprocess.run(
        ["scontrol", "show", "hostnames", e["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
    ).stdout.split()
    ntasks, nnodes = int(e["SLURM_NTASKS"]), int(e.get("SLURM_JOB_NUM_NODES", 1))
    e.setdefault("MASTER_ADDR", nodes[0])
    e.setdefault("MASTER_PORT", str(20000 + int(e["SLURM_JOB_ID"]) % 40000))  # same on every task of the job
    e.update(
        RANK=e["SLURM_PROCID"],
        WORLD_SIZE=str(ntasks),
        LOCAL_RANK=e.get("SLURM_LOCALID", "0"),
        LOCAL_WORLD_SIZE=str(ntasks // nnodes),
    )


def detect_env() -> DistEnv:
    """This process's place in the job, from the launcher's environment (see the module docstring)."""
    e = os.environ
    if "TORCHELASTIC_RUN_ID" in e:
        return _from_env("torchrun")
    executor = e.get("SUBMITIT_EXECUTOR")
    if executor in ("slurm", "local"):
        from submitit.helpers import TorchDistributedEnvironment

        if executor == "local":
            _restore_visible_devices()

        # CUDA_VISIBLE_DEVICES is left alone: a local job may own a slice of the GPUs (claim_local_slot)
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return _from_env(f"submitit-{executor}")
    if "SLURM_STEP_ID" in e and int(e.get("SLURM_NTASKS", 1)) > 1:
        _export_srun_env()
        return _from_env("srun")
    if {"RANK", "WORLD_SIZE"} <= e.keys():
        return _from_env("env")
    return DistEnv()


def _restore_visible_devices() -> None:
    """submitit's local executor gives every job CUDA_VISIBLE_DEVICES=0..gpus_per_node-1; put back what the
    sweep's shell had (saved by scaletrain.run as SCALETRAIN_VISIBLE_DEVICES) so that each job can take
    its own slice (claim_local_slot). Must run before anything initializes CUDA."""
    saved = os.environ.get("SCALETRAIN_VISIBLE_DEVICES")
    if saved == "all":
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    elif saved is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = saved


def in_cluster_job() -> bool:
    """True inside a SLURM job or a submitit job (whose run directory belongs to one sweep point)."""
    return "SLURM_JOB_ID" in os.environ or "SUBMITIT_EXECUTOR" in os.environ


# torchrun's agent starts each worker as its child (torch.distributed.elastic: subprocess.Popen), so the parent a
# worker sees when it imports this module is its agent. An agent killed without a chance to stop its workers
# (SIGKILL, OOM killer) leaves them re-parented (to init or a subreaper): `check_supervised` sees the change.
TORCHRUN_AGENT_PID = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None


class AgentGone(BadInput, RuntimeError):
    """The torchrun agent of this worker died. Not a bug, so BadInput's one line (exit 2) rather than a traceback of
    the loop: like a lost device, the environment failed and the message says what to do."""

    kind = "launcher"


def check_supervised(env: DistEnv) -> None:
    """Under torchrun, AgentGone when the agent that started this worker is gone: an orphaned worker would train on
    unsupervised (no restart, no one collecting its exit), holding the run folder and its GPU. One getppid()
    system call: cheap enough for every step. Other launchers: nothing to check (SLURM's step and submitit's job
    end their tasks themselves). A worker started through a wrapper (torchrun --no-python bash -c ...) watches the
    wrapper, not the agent."""
    if env.launcher != "torchrun" or TORCHRUN_AGENT_PID is None:
        return
    parent = os.getppid()
    if parent != TORCHRUN_AGENT_PID:
        raise AgentGone(
            f"rank {env.rank}: the torchrun agent that started this worker (pid {TORCHRUN_AGENT_PID}) is gone (the "
            f"parent is now pid {parent}); stopping instead of training unsupervised: relaunch the job with "
            "train.resume=auto to continue from its last checkpoint"
        )


_SLOT_LOCKS: list[Any] = []  # open lock files, held until the process exits


def claim_local_slot(env: DistEnv, job_num: int, n_slots: int, lock_dir: Path) -> int:
    """submitit_local runs every job of a sweep at once; this makes job `job_num` wait for slot
    `job_num % n_slots` (one lock per slot and local rank) and returns its first device index, so that
    with G GPUs and g GPUs per job, G // g jobs run side by side and the rest queue behind them."""
    slot = job_num % n_slots
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = open(lock_dir / f"slot{slot}_rank{env.local_rank}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while an earlier job of this slot is running
    _SLOT_LOCKS.append(lock)
    return slot * env.local_world_size


def local_slots(parallel_jobs: int | None, ranks_per_job: int, device: torch.device) -> int:
    """How many jobs of a submitit_local sweep run at once: as set, else one per `ranks_per_job` GPUs
    (all GPUs busy), else (CPU) one at a time."""
    if parallel_jobs:
        return parallel_jobs
    if device.type == "cuda":
        return max(1, torch.cuda.device_count() // ranks_per_job)
    return 1


def rank_device(base: torch.device, env: DistEnv, first_index: int = 0) -> torch.device:
    """One GPU per rank: local rank r of a job whose GPUs start at `first_index` uses cuda:first+r."""
    if base.type != "cuda" or (env.world_size == 1 and first_index == 0):
        return base
    if torch.cuda.device_count() == 1 and env.local_world_size > 1:
        return torch.device("cuda", 0)  # the scheduler bound one GPU to each task (e.g. --gpus-per-task=1)
    index = first_index + env.local_rank
    if index >= torch.cuda.device_count():
        raise RuntimeError(
            f"rank {env.rank} needs cuda:{index} but this node shows {torch.cuda.device_count()} "
            "GPUs; lower cluster.parallel_jobs or the ranks per node"
        )
    return torch.device("cuda", index)


def _hydra_job_num() -> int:
    from hydra.core.hydra_config import HydraConfig

    return int(HydraConfig.get().job.num) if HydraConfig.initialized() else 0


def setup_rank(
    env: DistEnv, base: torch.device, run_dir: Path, parallel_jobs: int | None, timeout_s: float | None = None
) -> tuple[torch.device, Path]:
    """What a rank does before building anything: wait for its GPU slot (submitit_local sweeps), pick its
    device, join the process group (collectives time out after `timeout_s`: train.dist_timeout_s), go quiet
    unless rank 0. Returns (device, rank 0's run directory)."""
    first = 0
    if env.launcher == "submitit-local":
        slots = local_slots(parallel_jobs, env.local_world_size, base)
        first = claim_local_slot(env, _hydra_job_num(), slots, Path(run_dir).parent / ".slots")
    device = rank_device(base, env, first)
    init_process_group(env, device, timeout_s)
    quiet_non_main(env)
    return device, Path(broadcast_object(str(run_dir)))


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float | None = None) -> None:
    """NCCL on GPUs, gloo on CPU; nothing to do for one process. `timeout_s`: how long a collective may wait for
    a peer (a rank that died or hangs) before the job fails instead of hanging; None: torch's default."""
    if env.world_size == 1 or dist.is_initialized():
        return
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=env.rank, world_size=env.world_size, device_id=device, timeout=timeout)
    else:
        dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size, timeout=timeout)


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# How long `teardown` lets gloo's worker threads run before the process group is destroyed (see there).
TEARDOWN_GRACE_S = 0.25


def teardown() -> None:
    """End the process group after every rank finished its run; call it once the trainer (and DDP's reducer,
    which holds the group) is freed. Only on success: a rank that failed may leave peers inside a collective,
    and destroying the group then deadlocks (torchtitan#1342); such a process just exits.

    Why the barrier and the grace: gloo's destructor joins its worker threads while holding the GIL, and a worker
    that finished a collective on a Python-visible tensor needs the GIL to drop it. Seen here (2-rank CPU run
    under load, py-spy): the main thread in ~ProcessGroupGloo -> thread::join, the worker in ~AsyncWork ->
    gil_scoped_acquire, forever, after "done". The barrier makes every earlier collective complete, the sleep
    releases the GIL so the workers drop their finished work, and only then is the group destroyed."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    gc.collect()  # the trainer's reference cycles: DDP's reducer goes while the group is still registered
    time.sleep(TEARDOWN_GRACE_S)
    dist.destroy_process_group()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. the run directory: ranks may resolve `${now:}` a second apart)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def quiet_non_main(env: DistEnv) -> None:
    """Only rank 0 prints and logs progress; other ranks keep warnings, errors and tracebacks."""
    if not env.is_main:
        sys.stdout = open(os.devnull, "w")
        logging.getLogger("scaletrain").setLevel(logging.WARNING)


def grad_sync(dp_model: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """Around one micro-batch's forward+backward: DDP all-reduces gradients only on the last micro-batch
    of an optimizer step (`no_sync` on the others, as nanoGPT/torchtitan do). FSDP2 reduce-scatters on
    every micro-batch: skipping it would keep unsharded gradients, the memory FSDP exists to save."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(dp_model, DDP) and not last_micro_batch:
        return dp_model.no_sync()
    return contextlib.nullcontext()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as whole tensors. FSDP2: every rank takes part, rank 0 receives full
    CPU tensors (optimizer keyed by parameter name); otherwise the plain state dicts."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_model_state(model: nn.Module) -> dict:
    """The model's state as whole tensors, without the optimizer's (the final weights: gathering AdamW's two
    moments too would move and hold 2x the model's bytes for nothing). FSDP2: every rank takes part, rank 0
    receives full CPU tensors."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Inverse of `full_state`; under FSDP2 each rank keeps its shard of the full tensors."""
    if not is_sharded(model):
        model.load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=StateDictOptions(full_state_dict=True),
    )


def load_full_model_state(model: nn.Module, model_sd: dict) -> None:
    """Whole tensors into `model` (its parameters and persistent buffers); under FSDP2 each rank keeps its shard."""
    if not is_sharded(model):
        model.load_state_dict(model_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar over ranks (for logging; gloo has no AVG, so SUM / world)."""
    if not dist.is_initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()


def cluster_env(env: DistEnv | None = None) -> dict[str, Any]:
    """What run_info.json records about where the job ran: launcher, ranks, SLURM ids, log files."""
    env = env or DistEnv()
    info: dict[str, Any] = {"launcher": env.launcher, "world_size": env.world_size, "host": socket.gethostname()}
    info.update({k: os.environ[k] for k in _SLURM_RECORD if k in os.environ})
    if os.environ.get("SUBMITIT_EXECUTOR"):
        try:
            import submitit

            paths = submitit.JobEnvironment().paths
            info.update(
                submitit_job_id=submitit.JobEnvironment().job_id,
                log_stdout=str(paths.stdout),
                log_stderr=str(paths.stderr),
            )
        except Exception as err:  # noqa: BLE001 - a record must never stop a run
            info["submitit_error"] = repr(err)
    return info


class NullLogger:
    """Stands in for MetricsLogger on ranks > 0 (only rank 0 logs and writes): every method does nothing."""

    wandb_id = None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class Preempted(Exception):
    """Raised by the trainer after the preemption checkpoint: `outcome` is requeued | stopped, and the
    process should exit with `exit_code` (no result: submitit's client waits for the requeued run)."""

    def __init__(self, outcome: str, exit_code: int, signal_name: str):
        super().__init__(f"{signal_name}: checkpoint saved, job {outcome}")
        self.outcome, self.exit_code = outcome, exit_code


class Preemption:
    """USR2, SIGTERM and Ctrl-C (SIGINT) set a flag (nothing else happens inside the handler); `requested()`
    after each step tells every rank whether any rank got one, so all ranks stop at the same step and save.
    A second Ctrl-C aborts at once (KeyboardInterrupt), for a step that never ends."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

    def __init__(self, device: torch.device):
        self.device, self.signum = device, 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python takes signal handlers in the main thread only; leave the signals alone
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: stopping without a checkpoint")
        if signum == signal.SIGINT:
            print(
                "Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again aborts at once)",
                file=sys.stderr,
            )
        self.signum = self.signum or signum

    def requested(self) -> bool:
        if not dist.is_initialized():
            return self.signum != 0
        flag = torch.tensor([self.signum], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # the signal may reach the ranks a step apart
        self.signum = int(flag.item())
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def _requeue_slurm_job(job_id: str, max_requeues: int) -> bool:
    """`scontrol requeue` this job unless it was cancelled (state COMPLETING, not RUNNING: a requeue would
    bring it back) or has been requeued `max_requeues` times. Says why not on stderr."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    state = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    if restarts >= max_requeues:
        why = f"requeued {restarts} times already (cluster.max_requeues)"
    elif state != "RUNNING":
        why = f"its state is {state or 'unknown'} (cancelled or ending)"
    else:
        res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        if res.returncode == 0:
            return True
        why = f"scontrol requeue failed: {res.stderr.strip()}"
    print(f"not requeuing job {job_id}: {why}", file=sys.stderr)
    return False


def requeue_or_stop(env: DistEnv, max_requeues: int, signum: int) -> tuple[str, int]:
    """After the preemption checkpoint: requeue the job if a scheduler can, and say how to exit.

    Returns (what happened, exit code). SLURM: rank 0 runs `scontrol requeue` while the job is still
    RUNNING (a cancelled job is COMPLETING and stays cancelled) and at most `max_requeues` times.
    submitit's local executor restarts a job whose tasks exit with code 144. Elsewhere: just stop.
    """
    if signum == signal.SIGINT:  # a person pressed Ctrl-C: stop, never requeue
        return "stopped", 128 + signum
    if os.environ.get("SUBMITIT_EXECUTOR") == "local":
        return "requeued", SUBMITIT_LOCAL_REQUEUE_CODE
    job_id = os.environ.get("SLURM_JOB_ID")
    requeued = bool(job_id) and env.is_main and _requeue_slurm_job(job_id, max_requeues)
    outcome = broadcast_object("requeued" if requeued else "stopped")  # rank 0 decides for the job
    # 0 after a requeue: the run goes on (SLURM marks the attempt REQUEUED); else the shell's 128 + signal
    return outcome, 0 if outcome == "requeued" else 128 + signum
