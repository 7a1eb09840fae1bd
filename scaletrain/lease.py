"""One process per run folder: the lease, an OS file lock on `<run_dir>/.lease` (records.LEASE_FILE) that rank 0
takes before it writes anything into the folder and holds until the job ends. A second process (train.resume=auto
while the first still runs, a relaunch beside orphaned workers) finds it held and stops with one line naming the
holder (host, pid, since, launcher and job), which the holder wrote into the file as JSON. Standard library only, so
a tool (or a test's helper process) can take or inspect a lease without importing torch.

Why an OS lock and not a pid file: the kernel drops the lock when its process ends, however it ends (kill -9, OOM
killer, a node's SLURM epilog), so a lease left by a dead process is simply free: the next process takes it over
(and says whose it was), with no pid-liveness guess that fails across hosts or after pid reuse. A preempted and
requeued SLURM job resumes in its folder that way: the old process is dead before the requeued one starts. The file
itself is never deleted or replaced (the holder rewrites its content in place): a lock lives on an inode, and an
unlink between another process's open and its lock would let two processes each hold "the" lease.

flock, not lockf/fcntl: a POSIX (lockf/fcntl) lock belongs to the process and is dropped by ANY close of the file in
that process (a library or a log reader opening `.lease` and closing it would silently free the folder), and two
opens in one process never conflict (an in-process second run would not see the first). A flock lock belongs to
the open file description: only our own descriptor releases it, and a second open in the same process conflicts.
The descriptor is close-on-exec, so programs the run starts do not inherit the lock; a child forked without exec
shares it until it exits (the folder then stays held by that leftover of the job, which is the truth).

NFS caveat: Linux's NFS client emulates flock with a whole-file POSIX byte-range lock on the server (since 2.6.12),
so the lease excludes processes on every client of an NFSv4 (or NFSv3 with lockd) mount, as lockf would (there
flock and fcntl locks on one file conflict with each other; scaletrain takes no fcntl lock on it). It does NOT
exclude across nodes where a mount has `local_lock=flock|all` or `nolock` (locks stay on each node) or a Lustre
mount has `localflock`; a Lustre mount without `flock` refuses flock (the run then warns that the folder is not
protected and goes on, as it did before leases). A node cut off from the server for longer than its NFSv4 lease
loses the lock while its process runs on. After a node crashes its lock stays on the server until recovery (NFSv4:
the client's lease, ~90 s; NFSv3: until the node restarts): inside a scheduler's job the run waits up to
`CLUSTER_WAIT_S` for the lease (`RunFolder.lease`), so a job requeued off a dead node still resumes.
Not here: what the run folder holds and who writes it (run_dir.py, records.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from scaletrain.config import BadInput
from scaletrain.records import LEASE_FILE

log = logging.getLogger("scaletrain")

CLUSTER_WAIT_S = 120.0  # inside a SLURM/submitit job: outlasts an NFSv4 server's lock recovery (~90 s)
POLL_S = 1.0


class RunFolderBusy(BadInput, RuntimeError):
    """Another live process holds the run folder's lease (or this one may not open it to take it)."""

    kind = "run folder"


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: what the lease file says."""

    host: str
    pid: int
    since: str
    launcher: str = "none"
    job: str | None = None  # the scheduler's job id (SLURM, with the array task) or torchrun's run id

    @classmethod
    def this_process(cls, launcher: str) -> Holder:
        e = os.environ
        job = e.get("SLURM_JOB_ID") or e.get("TORCHELASTIC_RUN_ID")
        if "SLURM_ARRAY_JOB_ID" in e:  # an array task: the id squeue shows
            job = f"{e['SLURM_ARRAY_JOB_ID']}_{e.get('SLURM_ARRAY_TASK_ID', '')}"
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return cls(socket.gethostname(), os.getpid(), now, launcher, job)

    def describe(self) -> str:
        launcher = "" if self.launcher == "none" else f", {self.launcher}"
        job = f" job {self.job}" if self.job else ""
        return f"pid {self.pid} on {self.host} (since {self.since}{launcher}{job})"


class Lease:
    """The lease of `run_dir`: `acquire()` or refuse, `release()`; a context manager (`with Lease(d).acquire():`)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LEASE_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, launcher: str = "none", wait_s: float = 0.0) -> Lease:
        """Take the lease (waiting up to `wait_s` seconds for a holder to go) and write this process into it;
        RunFolderBusy naming the holder when another live process keeps it."""
        deadline = time.monotonic() + wait_s
        while (fd := self._try_lock()) is None:
            if time.monotonic() >= deadline:
                raise RunFolderBusy(self._busy_message())
            time.sleep(POLL_S)
        self._fd = fd
        previous = self.holder()
        me = Holder.this_process(launcher)
        if previous is not None and (previous.host, previous.pid) != (me.host, me.pid):
            log.info(
                "run folder lease: taking over %s from %s, which no longer holds it", self.path, previous.describe()
            )
        try:  # in place: the lock lives on this inode (a rename would leave it behind)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            self.release()
            raise
        return self

    def check_free(self) -> None:
        """RunFolderBusy when a live process holds the lease; writes nothing (a preflight's look before Hydra
        writes its .hydra/ there). flock has no "test" operation, so the lock is taken and given back at once: a
        process acquiring it in that instant is refused as if the folder were busy (run it again)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # never leased
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(self._busy_message()) from None
        except OSError:
            pass  # a file system without locks: nothing to see (acquire warns)
        finally:
            os.close(fd)  # closing our descriptor gives back the probe's lock, if it took it

    def _try_lock(self) -> int | None:
        """An open descriptor of the lease file holding its lock; None while another one holds it."""
        while True:
            try:  # 0o666 less the umask, as any new file: a group-shared folder's lease stays takeable by the group
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except PermissionError as err:
                raise RunFolderBusy(
                    f"cannot open {self.path} to take the run folder's lease ({err.strerror}): the folder belongs to "
                    "someone else; use another folder (hydra.run.dir=...)"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # our own, unlocked descriptor: closing it frees nobody's flock
                return None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                log.warning(
                    "%s: this file system does not support file locks (%s): nothing stops a second process from "
                    "training in this folder at the same time",
                    self.path,
                    os.strerror(err.errno),
                )
                return fd
            try:  # the file we locked must still be the one at the path (not unlinked or replaced since our open)
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def holder(self) -> Holder | None:
        """The process the lease file names (the holder while the lock is held, else the last one); None if none."""
        try:
            d = json.loads(self.path.read_text())
            return Holder(**{k: d[k] for k in Holder.__dataclass_fields__ if k in d})
        except (OSError, ValueError, TypeError):
            return None

    def _busy_message(self) -> str:
        h = self.holder()
        who = h.describe() if h else "a process that has not written its name yet (it is starting)"
        stop = f"stop it (kill {h.pid} on {h.host})" if h else "stop it"
        return (
            f"{self.path.parent} is in use by {who}: two processes training in one folder overwrite each other's "
            f"records; wait for that run to end or {stop}, then resume with train.resume=auto, or use another "
            f"folder (hydra.run.dir=...); the lock is {self.path}"
        )

    def release(self) -> None:
        """Give the lease back (the file stays: see the module docstring). Safe to call twice."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass  # a file system without locks (warned at acquire); closing is what matters
        finally:
            os.close(fd)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
