"""Sweep results -> per-arm table, significance of the differences, plots, and the jobs that did not finish.

Usage:
    python -m scaletrain.report multirun/2026-01-02/10-11-12        # one Hydra sweep directory
    python -m scaletrain.report --experiment dense_vs_moe [--root multirun]   # its latest sweep

Here: collecting a sweep's jobs (`.hydra/overrides.yaml`, `summary.json`, `status.json`, `metrics.jsonl`,
`config.json`, `checkpoints/`), judging each job finished / running / requeued / failed / died / stopped / pending
(`JobStatus`), grouping jobs into arms (the overrides
minus `train.seed`; seeds are replicates), mean and sample std over seeds, Welch's t-test with an exact
Student-t CDF (regularized incomplete beta, math only: scipy is not a dependency), `report.md` and the
PNG plots. `build_report()` computes (no writes) and returns a `Report`; `write_report()` writes.
Not here: launching sweeps (Hydra), what a run logs (trainer.py / metrics.py), the names, states and
fields of the records (records.py, shared with their writers).

How a job is judged, first match wins:
  finished  summary.json is there (a summary.json that is not a `records.Summary` makes the job failed);
  failed    `status.json` with state "failed" (its `error` is the detail), or a submitit result in
            `<sweep>/.submitit/` recording an error for that job number, or status.json says "finished"
            but summary.json is missing, or (Hydra's basic launcher, which runs jobs one at a time and
            writes no error anywhere on disk) a later job of the sweep has started;
  requeued  `status.json` says "requeued": preempted, checkpoint saved, the job waits in the scheduler's
            queue and resumes from its latest checkpoint;
  died      `status.json` says "running" for a pid on this host that is gone: killed without a chance to
            record it (kill -9, the out-of-memory killer, a node reboot);
  stopped   `status.json` says "interrupted", or nothing in the job directory was written for `stale_after_s`
            (default 30 min): killed, preempted, or failed under Hydra's basic launcher, which records failures
            nowhere on disk;
  running   something in the job directory (metrics.jsonl, checkpoints/, status.json, ...) was written
            within `stale_after_s`;
  pending   listed in the sweep grid of `multirun.yaml` (basic sweeper) but no job directory exists.
Tables and tests use finished seeds only; the curves also show running and requeued seeds (a live view).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pickle
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from scaletrain import records
from scaletrain.records import RunState, Status, Summary

SEED_KEYS = ("train.seed",)
# Summary fields an arm reports (mean and std over finished seeds)
SUMMARY_STATS = ("val_loss", "val_bpb", "tokens_seen", "flops", "wallclock_s", "params_total", "params_active")
FIG_SIZE_IN, FIG_DPI = (12, 8), 100  # every plot is 1200 x 800 pixels
MAX_PAIRWISE_ARMS = 4  # up to 4 arms: all 6 pairs; more: each arm vs the baseline only


# ----------------------------------------------------------------------------------------------------
# Student-t distribution and Welch's test


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), accurate when x < (a + 1) / (a + b + 2)."""
    tiny, f = 1e-300, 1.0
    c, d = 1.0, 0.0
    for i in range(1, 1000):
        m = i // 2
        if i % 2:  # odd terms d_{2m+1}
            coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # even terms d_{2m}
            coef = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coef * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + coef / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return 1.0 / f


def betainc_regularized(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) / a * _beta_continued_fraction(a, b, x)
    # The fraction converges slowly above the mean; use I_x(a, b) = 1 - I_{1-x}(b, a) there.
    return 1.0 - math.exp(log_front) / b * _beta_continued_fraction(b, a, 1.0 - x)


def t_sf2(t: float, dof: float) -> float:
    """Two-sided tail P(|T| >= |t|) of Student's t with `dof` (real, > 0) degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc_regularized(dof / 2.0, 0.5, dof / (dof + t * t))


def t_cdf(t: float, dof: float) -> float:
    half_tail = 0.5 * t_sf2(t, dof)
    return 1.0 - half_tail if t > 0 else half_tail


def t_ppf(q: float, dof: float) -> float:
    """Quantile of Student's t (bisection on the CDF; the CDF is monotone, so this cannot miss)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_ppf(1.0 - q, dof)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, dof) < q else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Welch:
    """Welch's unequal-variance t-test of mean(a) - mean(b)."""

    diff: float
    se: float
    t: float
    dof: float
    p: float  # two-sided
    ci95: float  # half-width of the 95% confidence interval of `diff`


def welch_test(a: list[float], b: list[float]) -> Welch:
    """Needs two or more values per sample and some variance; raises ValueError otherwise."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's test needs at least 2 values per sample")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        raise ValueError("both samples have zero variance")
    diff = statistics.fmean(a) - statistics.fmean(b)
    # Welch-Satterthwaite degrees of freedom (real-valued; the t CDF above accepts any dof > 0).
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = diff / se
    return Welch(diff, se, t, dof, t_sf2(t, dof), t_ppf(0.975, dof) * se)


# ----------------------------------------------------------------------------------------------------
# Collecting jobs


class JobStatus(StrEnum):
    """What the report concludes about a job from its records (rules in the module docstring)."""

    finished = "finished"
    running = "running"
    requeued = "requeued"
    failed = "failed"
    died = "died"
    stopped = "stopped"
    pending = "pending"


@dataclass
class Job:
    """One job of the sweep: its directory (None while pending), overrides, status and records."""

    dir: Path | None
    num: int | None
    overrides: list[str]
    status: JobStatus
    detail: str = ""
    summary: Summary | None = None
    config: dict[str, Any] = field(default_factory=dict)
    val_curve: list[tuple[int, int, float]] = field(default_factory=list)  # (step, tokens, val loss)
    moe_load: list[tuple[int, float]] = field(default_factory=list)  # (step, moe/load_max_over_mean)
    last_step: int | None = None

    @property
    def seed(self) -> str | None:
        for o in self.overrides:
            key, _, value = o.partition("=")
            if key.lstrip("+~") in SEED_KEYS:
                return value
        seed = self.config.get("train", {}).get("seed")
        return None if seed is None else str(seed)

    @property
    def arm_key(self) -> tuple[str, ...]:
        """The ablated axes: every override except the seed, order-insensitive."""
        return tuple(sorted(o for o in self.overrides if o.partition("=")[0].lstrip("+~") not in SEED_KEYS))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; a half-written last line of a running job is skipped, not an error."""
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _curves(metrics: list[dict[str, Any]], summary: Summary | None) -> tuple[list, list, int | None]:
    """Validation curve (step, tokens, loss), MoE load curve, last step. Validation records carry no token
    count, so tokens = step * tokens per step, taken from the summary or from any train record."""
    step, tokens = records.STEP, records.TRAIN_TOKENS
    per_step = summary.tokens_seen / summary.step if summary and summary.step else None
    for r in metrics:
        if per_step is None and r.get(tokens) and r.get(step):
            per_step = r[tokens] / r[step]
    val = [
        (r[step], round(r[step] * per_step), r[records.VAL_LOSS])
        for r in metrics
        if records.VAL_LOSS in r and per_step is not None
    ]
    moe = [(r[step], r[records.MOE_LOAD_MAX_OVER_MEAN]) for r in metrics if records.MOE_LOAD_MAX_OVER_MEAN in r]
    steps = [r[step] for r in metrics if isinstance(r.get(step), int)]
    return val, moe, max(steps) if steps else None


def _job_num(job_dir: Path) -> int | None:
    """hydra.job.num from .hydra/hydra.yaml, else the leading digits of the directory name."""
    try:
        num = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["num"]
        return int(num)
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        head = job_dir.name.split("_", 1)[0]
        return int(head) if head.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _last_write(job_dir: Path) -> float:
    """Newest mtime among the files a live run keeps writing (checkpoints land in checkpoints/; run.log is
    Hydra's log of `python -m scaletrain.run`)."""
    paths = [job_dir / n for n in (records.METRICS_FILE, records.STATUS_FILE, "run.log", records.CONFIG_FILE)]
    paths += list((job_dir / records.CKPT_DIR).glob("*"))
    return max((p.stat().st_mtime for p in paths if p.exists()), default=job_dir.stat().st_mtime)


def _latest_checkpoint(job_dir: Path) -> str | None:
    """Name of the checkpoint `train.resume=auto` would take (either format), if any."""
    ckpts = records.list_checkpoints(job_dir / records.CKPT_DIR)
    return ckpts[-1].name if ckpts else None


def _resume_hint(job_dir: Path) -> str:
    latest = _latest_checkpoint(job_dir)
    return f"; resume from {latest} with train.resume=auto" if latest else ""


def _read_status(job_dir: Path) -> Status | None:
    try:
        return records.read_status(job_dir)
    except ValueError:  # not a status this version knows: judged as if there were none
        return None


def _judge_status(job_dir: Path, status: Status) -> tuple[JobStatus, str] | None:
    """What status.json alone says about a job without a summary; None where only the write age can tell."""
    error = f": {status.error}" if status.error else ""
    if status.state == RunState.failed:
        return JobStatus.failed, status.error or f"{records.STATUS_FILE}: failed at step {status.step}"
    if status.state == RunState.finished:
        return JobStatus.failed, (
            f"{records.STATUS_FILE} says finished at step {status.step}, but there is no {records.SUMMARY_FILE}"
        )
    if status.state == RunState.requeued:
        since = f" since {status.updated_at}" if status.updated_at else ""
        latest = _latest_checkpoint(job_dir)
        return JobStatus.requeued, (
            f"preempted at step {status.step} and requeued{since}: waits in the scheduler's "
            f"queue" + (f", resumes from {latest}" if latest else "")
        )
    if status.state == RunState.interrupted:
        return JobStatus.stopped, f"interrupted at step {status.step}{error}{_resume_hint(job_dir)}"
    if status.host == socket.gethostname() and isinstance(status.pid, int) and not _pid_alive(status.pid):
        return JobStatus.died, (
            f"process {status.pid} on this host died at or after step {status.step} without a summary or an error "
            f"record (kill -9, out of memory?){_resume_hint(job_dir)}"
        )
    return None


def judge(
    job_dir: Path, summary: Summary | None, outside_error: str | None, now: float, stale_after_s: float
) -> tuple[JobStatus, str]:
    """(status, detail) of one job directory; the rules are listed in the module docstring. `outside_error`
    is an error recorded outside the job's own status (submitit, an unreadable summary.json)."""
    if summary is not None:
        return JobStatus.finished, ""
    status = _read_status(job_dir)
    if status is not None and status.state == RunState.failed:  # the job's own words first
        verdict = _judge_status(job_dir, status)
        if verdict is not None:
            return verdict
    if outside_error:
        return JobStatus.failed, outside_error
    if status is not None and (verdict := _judge_status(job_dir, status)):
        return verdict
    age = now - _last_write(job_dir)
    if age <= stale_after_s:
        return JobStatus.running, f"last write {_fmt_age(age)} ago"
    return JobStatus.stopped, (
        f"no write for {_fmt_age(age)} and no error record: killed, preempted, or failed "
        f"under a launcher that records nothing{_resume_hint(job_dir)}"
    )


def _submitit_failures(sweep_dir: Path) -> dict[int, str]:
    """Job number -> error, from submitit's pickles in <sweep>/.submitit/ (hydra-submitit-launcher).

    A Python exception in the task is caught by Hydra's run_job and pickled as ("success", JobReturn with
    status FAILED); an exception escaping run_job (SystemExit) as ("error", traceback) whose job number
    is the third argument of the submitted call. These are the user's own files; unreadable ones are skipped.
    """
    failures: dict[int, str] = {}
    for result in sorted((sweep_dir / ".submitit").rglob("*_result.pkl")):
        try:
            with result.open("rb") as f:
                outcome, value = pickle.load(f)
            if outcome == "error":
                with next(result.parent.glob("*_submitted.pkl")).open("rb") as f:
                    num = int(pickle.load(f).args[2])
                lines = [ln for ln in str(value).splitlines() if ln.strip()]
                failures[num] = f"submitit: {lines[-1].strip() if lines else 'error'}"
            elif getattr(getattr(value, "status", None), "name", "") == "FAILED":
                num = int(value.hydra_cfg.hydra.job.num)
                failures[num] = f"submitit: {value._return_value!r}"
        except Exception:  # noqa: BLE001 - a corrupt or foreign pickle must not break the report
            continue
    return failures


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Directories holding a job (.hydra/overrides.yaml or config.json). A default Hydra subdir with a path
    in its overrides (data.path=/a/b) nests the job below several folders, so this walks the tree."""
    found = []
    for root, dirs, files in os.walk(sweep_dir):
        here = Path(root)
        if here != sweep_dir and ((here / ".hydra" / "overrides.yaml").exists() or records.CONFIG_FILE in files):
            found.append(here)
            dirs.clear()  # nothing below a job directory is another job
            continue
        dirs[:] = [d for d in dirs if d not in (".submitit", ".hydra")]
    return found


def read_job(job_dir: Path, now: float, stale_after_s: float, submitit: dict[int, str]) -> Job:
    overrides = []
    try:
        overrides = [str(o) for o in yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []]
    except (OSError, yaml.YAMLError):
        pass
    try:
        summary, summary_error = records.read_summary(job_dir), None
    except ValueError as err:
        summary, summary_error = None, f"{records.SUMMARY_FILE}: {err}"
    num = _job_num(job_dir)
    status, detail = judge(
        job_dir, summary, summary_error or (submitit.get(num) if num is not None else None), now, stale_after_s
    )
    val, moe, last = _curves(_read_metrics(job_dir / records.METRICS_FILE), summary)
    config = _read_json(job_dir / records.CONFIG_FILE)
    return Job(
        job_dir, num, overrides, status, detail, summary, config if isinstance(config, dict) else {}, val, moe, last
    )


def _multirun(sweep_dir: Path, key: str) -> Any:
    """A top-level section of the sweep's multirun.yaml (`hydra`: launcher, sweeper, command line), or None."""
    try:
        return yaml.safe_load((sweep_dir / "multirun.yaml").read_text()).get(key)
    except (OSError, AttributeError, yaml.YAMLError):
        return None


def _multirun_hydra(sweep_dir: Path) -> dict[str, Any]:
    section = _multirun(sweep_dir, "hydra")
    return section if isinstance(section, dict) else {}


def expected_overrides(sweep_dir: Path) -> list[list[str]] | None:
    """Every job's overrides in job-number order, expanded from multirun.yaml the way Hydra's basic sweeper
    does (sweeper params first, then the command line). None for other sweepers or an unreadable file."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        hydra_cfg = _multirun_hydra(sweep_dir)
        if not str(hydra_cfg["sweeper"]["_target_"]).endswith("BasicSweeper"):
            return None
        params = [f"{k}={v}" for k, v in (hydra_cfg["sweeper"].get("params") or {}).items()]
        parsed = OverridesParser.create().parse_overrides(params + list(hydra_cfg["overrides"]["task"]))
        return list(itertools.chain.from_iterable(BasicSweeper.split_arguments(parsed, None)))
    except Exception:  # noqa: BLE001 - without the grid the report still lists every job on disk
        return None


def _sequential_failures(sweep_dir: Path, jobs: list[Job]) -> None:
    """Hydra's basic launcher runs jobs one at a time and, on an exception, records it nowhere on disk but
    goes on to the next job: an unfinished job with a later job started has therefore failed."""
    launcher = str(_multirun_hydra(sweep_dir).get("launcher", {}).get("_target_", ""))
    if not launcher.endswith("BasicLauncher"):
        return
    started = max((j.num for j in jobs if j.dir is not None and j.num is not None), default=-1)
    for j in jobs:
        if (
            j.status in (JobStatus.running, JobStatus.stopped)
            and j.num is not None
            and j.num < started
            and j.dir is not None
            and not (j.dir / records.STATUS_FILE).exists()
        ):  # the job's own record wins
            j.status, j.detail = (
                JobStatus.failed,
                (
                    f"no {records.SUMMARY_FILE}, and job {started} of this sequential "
                    "(basic launcher) sweep started after it; the traceback went to "
                    "the sweep's console"
                ),
            )


def collect_jobs(sweep_dir: Path, now: float | None = None, stale_after_s: float = 1800.0) -> list[Job]:
    """Every job on disk plus the grid's jobs not started yet, in job-number order."""
    now = time.time() if now is None else now
    submitit = _submitit_failures(sweep_dir)
    jobs = [read_job(d, now, stale_after_s, submitit) for d in _job_dirs(sweep_dir)]
    _sequential_failures(sweep_dir, jobs)
    seen = {j.num for j in jobs}
    for num, overrides in enumerate(expected_overrides(sweep_dir) or []):
        if num not in seen:  # submitit may have recorded a failure before the job made its directory
            status = (
                (JobStatus.failed, submitit[num])
                if num in submitit
                else (JobStatus.pending, "not started: queued, or the sweep stopped before it")
            )
            jobs.append(Job(None, num, overrides, *status))
            seen.add(num)
    jobs += [Job(None, num, [], JobStatus.failed, error) for num, error in submitit.items() if num not in seen]
    return sorted(jobs, key=lambda j: (j.num is None, j.num if j.num is not None else 0, str(j.dir)))


# ----------------------------------------------------------------------------------------------------
# Arms, statistics and comparisons


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1) over the finished seeds of an arm."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


@dataclass
class Arm:
    label: str  # the values of the axes that vary across the sweep, e.g. "gelu" or "model=moe_8x,optim=muon"
    overrides: tuple[str, ...]  # every override but the seed
    jobs: list[Job]

    @property
    def finished(self) -> list[Job]:
        return [j for j in self.jobs if j.status == JobStatus.finished]

    def stat(self, key: str) -> Stat:
        """Over the finished seeds; `key` is a `records.Summary` field."""
        return Stat(tuple(float(v) for j in self.finished if (v := getattr(j.summary, key)) is not None))


@dataclass
class Comparison:
    arm: str
    baseline: str
    diff: float | None  # mean val loss of arm minus that of baseline (negative: arm is better)
    ci95: float | None
    p: float | None
    sentence: str


def _key_value(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def _varying_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (or that only some jobs set), seed excluded."""
    per_job = [dict(_key_value(o) for o in j.arm_key) for j in jobs]
    keys = sorted({k for d in per_job for k in d})
    return [k for k in keys if len({d.get(k) for d in per_job}) > 1]


def group_arms(jobs: list[Job]) -> tuple[list[Arm], list[str]]:
    """Arms in order of their first job number, and the varying (ablated) keys that label them."""
    axes = _varying_keys([j for j in jobs if j.overrides])
    arms: dict[tuple[str, ...], Arm] = {}
    for job in jobs:
        if not job.overrides and job.dir is None:
            continue  # a submitit failure with no known overrides: listed under jobs not finished only
        if job.arm_key not in arms:
            values = dict(_key_value(o) for o in job.arm_key)
            if len(axes) == 1:
                label = values.get(axes[0], "(default)")
            else:
                label = ",".join(f"{k}={values.get(k, '(default)')}" for k in axes) or "all jobs"
            arms[job.arm_key] = Arm(label, job.arm_key, [])
        arms[job.arm_key].jobs.append(job)
    return list(arms.values()), axes


def compare(arm: Arm, base: Arm, alpha: float = 0.05) -> Comparison:
    """Val-loss difference of `arm` minus `base` with its 95% CI, Welch p-value and a plain verdict."""
    a, b = arm.stat("val_loss").values, base.stat("val_loss").values
    head = f"{arm.label} vs {base.label}"
    if not a or not b:
        missing = arm.label if not a else base.label
        return Comparison(
            arm.label, base.label, None, None, None, f"{head}: no finished seed in {missing}; see Jobs not finished"
        )
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Comparison(
            arm.label,
            base.label,
            diff,
            None,
            None,
            f"{head}: {diff:+.4f} ({len(a)} vs {len(b)} seeds) — no significance can be computed "
            f"with one seed in an arm; run more seeds",
        )
    try:
        w = welch_test(list(a), list(b))
    except ValueError:
        return Comparison(
            arm.label,
            base.label,
            diff,
            None,
            None,
            f"{head}: {diff:+.4f} — seeds gave identical losses (zero variance), so no test; "
            f"check that train.seed changes the run",
        )
    p_text = "p<0.0001" if w.p < 1e-4 else f"p={w.p:.2g}"
    verdict = f"{arm.label if diff < 0 else base.label} is better" if w.p < alpha else "within noise; more seeds needed"
    return Comparison(
        arm.label,
        base.label,
        diff,
        w.ci95,
        w.p,
        f"{head}: {diff:+.4f} ± {w.ci95:.4f} ({p_text}, {len(a)} vs {len(b)} seeds) — {verdict}",
    )


def comparisons(arms: list[Arm], baseline: str | None = None) -> list[Comparison]:
    """All pairs (later arm vs earlier arm) for a few arms; each arm vs the baseline for many, or when
    a baseline is named. The default baseline is the arm of the lowest job number."""
    if baseline is not None and baseline not in {a.label for a in arms}:
        raise ValueError(f"baseline {baseline!r} is not an arm; arms: {[a.label for a in arms]}")
    if baseline is None and len(arms) <= MAX_PAIRWISE_ARMS:
        return [compare(arms[j], arms[i]) for i in range(len(arms)) for j in range(i + 1, len(arms))]
    base = next(a for a in arms if a.label == baseline) if baseline else arms[0]
    return [compare(a, base) for a in arms if a is not base]


# ----------------------------------------------------------------------------------------------------
# The report


@dataclass
class Report:
    sweep_dir: Path
    experiment: str | None
    axes: list[str]  # override keys that differ between arms
    arms: list[Arm]
    comparisons: list[Comparison]
    jobs: list[Job]

    @property
    def unfinished(self) -> list[Job]:
        return [j for j in self.jobs if j.status != JobStatus.finished]

    def arm(self, label: str) -> Arm:
        for a in self.arms:
            if a.label == label:
                return a
        raise KeyError(f"no arm {label!r}; arms: {[a.label for a in self.arms]}")

    def markdown(self, plots: Sequence[str] = ()) -> str:
        parts = [_header(self), _arm_table(self), _comparison_section(self), _unfinished_section(self)]
        if plots:
            parts.append(
                "## Plots\n\nMean over the finished and running seeds of each arm at each evaluated step; "
                "the shaded band spans their min to max.\n\n"
                + "\n".join(f"![{Path(p).stem}]({p})" for p in plots)
                + "\n"
            )
        return "\n".join(parts)


def _sweep_experiment(sweep_dir: Path, jobs: list[Job] | None = None) -> str | None:
    """`experiment` from multirun.yaml (written at sweep start), else from any job's config.json."""
    if name := _multirun(sweep_dir, "experiment"):
        return str(name)
    configs = (
        [j.config for j in jobs]
        if jobs is not None
        else [_read_json(d / records.CONFIG_FILE) or {} for d in _job_dirs(sweep_dir)]
    )
    return next((str(c["experiment"]) for c in configs if c.get("experiment")), None)


def build_report(
    sweep_dir: str | Path, baseline: str | None = None, stale_after_s: float = 1800.0, now: float | None = None
) -> Report:
    """Read a sweep directory into a Report (writes nothing). `baseline` names an arm label."""
    sweep_dir = Path(sweep_dir).resolve()
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep directory at {sweep_dir}")
    jobs = collect_jobs(sweep_dir, now, stale_after_s)
    if not jobs:
        raise FileNotFoundError(f"no jobs in {sweep_dir} (no .hydra/overrides.yaml or config.json below it)")
    arms, axes = group_arms(jobs)
    return Report(sweep_dir, _sweep_experiment(sweep_dir, jobs), axes, arms, comparisons(arms, baseline), jobs)


def _fmt_si(x: float | None) -> str:
    if x is None:
        return "—"
    for div, unit in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _fmt_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _fmt_pm(stat: Stat, fmt: str = ".4f") -> str:
    if stat.mean is None:
        return "—"
    return f"{stat.mean:{fmt}}" + (f" ± {stat.std:{fmt}}" if stat.std is not None else "")


def _header(r: Report) -> str:
    counts = {s: sum(j.status == s for j in r.jobs) for s in JobStatus}
    lines = [f"# Sweep report: {r.sweep_dir}", ""]
    if r.experiment:
        lines.append(f"Experiment: `{r.experiment}`  ")
    lines.append(f"Jobs: {len(r.jobs)} (" + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ")  ")
    lines.append(
        f"Arms differ in: {', '.join(f'`{k}`' for k in r.axes) or 'nothing (one arm)'}; "
        f"seeds (`{'`, `'.join(SEED_KEYS)}`) are replicates.  "
    )
    shared = sorted(set.intersection(*(set(a.overrides) for a in r.arms))) if r.arms else []
    if shared:
        lines.append("Shared overrides: " + " ".join(f"`{o}`" for o in shared))
    return "\n".join(lines) + "\n"


def _arm_table(r: Report) -> str:
    rows = [
        "## Results per arm",
        "",
        "Finished seeds only: mean ± sample standard deviation (n - 1) over seeds; tokens, FLOPs and "
        "parameters are means.",
        "",
        "| arm | seeds finished | val loss | val bpb | tokens | FLOPs | wall time (s) | params total | params active |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in r.arms:
        rows.append(
            f"| {a.label} | {len(a.finished)}/{len(a.jobs)} | {_fmt_pm(a.stat('val_loss'))} "
            f"| {_fmt_pm(a.stat('val_bpb'))} | {_fmt_si(a.stat('tokens_seen').mean)} "
            f"| {_fmt_si(a.stat('flops').mean)} | {_fmt_pm(a.stat('wallclock_s'), '.1f')} "
            f"| {_fmt_si(a.stat('params_total').mean)} | {_fmt_si(a.stat('params_active').mean)} |"
        )
    return "\n".join(rows) + "\n"


def _comparison_section(r: Report) -> str:
    if not r.comparisons:
        return "## Differences in val loss\n\nOnly one arm: nothing to compare.\n"
    lines = [
        "## Differences in val loss",
        "",
        "Arm minus baseline (lower is better); ± is the half-width of the 95% confidence interval; "
        "p from Welch's two-sided t-test over seeds (exact Student-t)"
        + (f", not corrected for {len(r.comparisons)} comparisons." if len(r.comparisons) > 1 else "."),
        "",
    ]
    lines += [f"- {c.sentence}" for c in r.comparisons]
    return "\n".join(lines) + "\n"


def _unfinished_section(r: Report) -> str:
    if not r.unfinished:
        return f"## Jobs not finished\n\nNone: every job wrote {records.SUMMARY_FILE}.\n"
    arm_of = {id(j): a.label for a in r.arms for j in a.jobs}
    rows = [
        "## Jobs not finished",
        "",
        "failed: the job recorded an error (status.json, submitit), or a later job of a sequential "
        "basic-launcher sweep started; running: written to recently; requeued: preempted, waits in the "
        "scheduler's queue to resume from its checkpoint; died: its process on this host is gone without a record "
        "(kill -9, out of memory); stopped: interrupted, or silent for too long with "
        "no error record; pending: in the sweep grid, no directory yet.",
        "",
        "| job | status | arm | seed | last step | detail | directory |",
        "|---|---|---|---|---|---|---|",
    ]
    for j in r.unfinished:
        max_steps = j.config.get("train", {}).get("max_steps")
        step = "—" if j.last_step is None else f"{j.last_step}" + (f"/{max_steps}" if max_steps else "")
        detail = j.detail.replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| {'?' if j.num is None else j.num} | {j.status} | {arm_of.get(id(j), '—')} "
            f"| {j.seed or '—'} | {step} | {detail} | {j.dir or '—'} |"
        )
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas through Figure directly: no pyplot, no global backend state)


def _band(series: list[dict[int, tuple[float, float]]]) -> tuple[list[float], ...]:
    """Per step: mean x, and mean / min / max of y over the seeds that reached that step."""
    xs, mean, lo, hi = [], [], [], []
    for step in sorted({s for one in series for s in one}):
        points = [one[step] for one in series if step in one]
        ys = [y for _, y in points]
        xs.append(statistics.fmean(x for x, _ in points))
        mean.append(statistics.fmean(ys))
        lo.append(min(ys))
        hi.append(max(ys))
    return xs, mean, lo, hi


def _arm_series(arm: Arm, kind: str) -> list[dict[int, tuple[float, float]]]:
    """One {step: (x, y)} per finished, running or requeued seed; kind is tokens, flops or moe."""
    fpts = [j.summary.flops_per_token for j in arm.finished if j.summary and j.summary.flops_per_token]
    series = []
    for job in arm.jobs:
        if job.status not in (JobStatus.finished, JobStatus.running, JobStatus.requeued):
            continue
        if kind == "moe":
            series.append({s: (s, v) for s, v in job.moe_load})
            continue
        fpt = (job.summary.flops_per_token if job.summary else None) or (fpts[0] if fpts else None)
        if kind == "flops" and fpt is None:
            continue  # a running seed of an arm with no summary yet has no FLOPs per token to scale by
        scale = fpt if kind == "flops" and fpt is not None else 1.0  # x: FLOPs, or tokens
        series.append({s: (tok * scale, loss) for s, tok, loss in job.val_curve})
    return [s for s in series if s]


def _plot(report: Report, kind: str, path: Path) -> Path | None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_SIZE_IN, dpi=FIG_DPI)
    ax = fig.add_subplot()
    drawn = 0
    for arm in report.arms:
        series = _arm_series(arm, kind)
        if not series:
            continue
        xs, mean, lo, hi = _band(series)
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=f"{arm.label} (n={len(series)})")
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn += 1
    if not drawn:
        return None
    xlabel = {"tokens": "tokens seen", "flops": "training FLOPs (flops_per_token x tokens)", "moe": "step"}[kind]
    ylabel = "max / mean tokens per expert (1 = balanced)" if kind == "moe" else "validation loss"
    if kind == "moe":
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    else:
        ax.set_xscale("log")
    ax.set(
        xlabel=xlabel,
        ylabel=ylabel,
        title=f"{report.experiment or report.sweep_dir.name}: "
        f"{ylabel} vs {xlabel.split(' (')[0]} (mean over seeds, min-max shaded)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path)  # no bbox_inches="tight": the file is exactly FIG_SIZE_IN * FIG_DPI pixels
    return path


def write_report(report: Report, out_dir: str | Path | None = None, plots: bool = True) -> list[Path]:
    """Write the plots and report.md (into the sweep directory by default); returns the paths written."""
    out = Path(out_dir) if out_dir is not None else report.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if plots:
        for kind, name in (
            ("tokens", "val_loss_vs_tokens.png"),
            ("flops", "val_loss_vs_flops.png"),
            ("moe", "moe_load_balance.png"),
        ):
            path = _plot(report, kind, out / name)
            written += [path] if path else []
    md = out / "report.md"
    md.write_text(report.markdown([p.name for p in written]))
    return [md, *written]


# ----------------------------------------------------------------------------------------------------
# Command line


def find_latest_sweep(root: str | Path, experiment: str) -> Path:
    """The most recently started sweep (multirun.yaml mtime) under `root` that ran `experiment`."""
    root = Path(root)
    sweeps = sorted(
        (p.parent for p in root.rglob("multirun.yaml")),
        key=lambda d: (d / "multirun.yaml").stat().st_mtime,
        reverse=True,
    )
    seen = []
    for sweep in sweeps:
        name = _sweep_experiment(sweep)
        if name == experiment:
            return sweep
        seen.append(name)
    known = sorted({s for s in seen if s})
    raise FileNotFoundError(
        f"no sweep of experiment {experiment!r} under {root.resolve()} "
        f"({len(sweeps)} sweeps; experiments found: {known or 'none'})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scaletrain.report", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("sweep_dir", nargs="?", help="a Hydra multirun directory (holds multirun.yaml)")
    parser.add_argument("--experiment", help="report the latest sweep under --root whose jobs ran this experiment")
    parser.add_argument("--root", default="multirun", help="where --experiment looks (default: multirun)")
    parser.add_argument(
        "--baseline",
        help="arm label every other arm is compared with (default: all pairs "
        f"up to {MAX_PAIRWISE_ARMS} arms, else the arm of job 0)",
    )
    parser.add_argument(
        "--stale-after-min",
        type=float,
        default=30.0,
        help="a job silent this long without summary or error is 'stopped' (default: 30)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write report.md only")
    args = parser.parse_args(argv)
    if (args.sweep_dir is None) == (args.experiment is None):
        parser.error("give a sweep directory or --experiment NAME (one of the two)")
    try:
        sweep = Path(args.sweep_dir) if args.sweep_dir else find_latest_sweep(args.root, args.experiment)
        report = build_report(sweep, args.baseline, args.stale_after_min * 60)
    except (FileNotFoundError, ValueError) as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    paths = write_report(report, plots=not args.no_plots)
    print(report.markdown([p.name for p in paths[1:]]))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
