"""Reading a sweep into jobs and arms: each job's overrides, status, summary and curves, and the arms they form.

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
Arms: jobs grouped by their overrides minus `train.seed` (seeds are replicates).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from scaletrain import records
from scaletrain.compose import sweep_jobs
from scaletrain.config import BadInput, suggest
from scaletrain.records import RunState, Status, Summary

SEED_KEYS = ("train.seed",)
# Summary fields a metric may name (mean and std over finished seeds): every one that holds a number
SUMMARY_STATS = Summary.numeric_fields()
# Summary fields that are also the final value of a validation metric (older summaries have no `val` copy)
_SUMMARY_OF_METRIC: dict[str, Callable[[Summary], float]] = {
    records.VAL_LOSS: lambda s: s.val_loss,
    records.VAL_BPB: lambda s: s.val_bpb,
}
# lm-evaluation-harness metrics (Summary.downstream): downstream/<task>/<metric>[/<filter>], each with <key>_stderr.
# Its direction is scaletrain.harness's rule, repeated here: the report must not import lm_eval (an optional extra)
DOWNSTREAM, STDERR = records.DOWNSTREAM, records.STDERR
LOGGED = ("val/", DOWNSTREAM)  # the prefixes of the final metrics a job records by name (summary dicts, curves)


class MetricError(BadInput, ValueError):
    """A metric named (report --metric, study.select, study.metrics) that cannot be read: no summary field or record
    holds it, or its target is not a number or points the way the metric gets worse."""

    kind = "metric"


# ----------------------------------------------------------------------------------------------------
# Metrics: what an arm is judged on


@dataclass(frozen=True)
class Metric:
    """A final value per job: a `records.Summary` field (val_loss, flops, ...), a validation or downstream metric
    as metrics.jsonl names it (val/loss, val/<source>/exact_match, downstream/<task>/acc), or, with `target`, the
    tokens a job took to first reach `target` of that metric (interpolated between evaluations; None if never)."""

    key: str
    target: float | None = None
    at: str | None = None  # "flops" | "seconds": the value on the curve at `budget` of that axis
    budget: float | None = None

    def __post_init__(self) -> None:
        """A key that is neither a numeric summary field nor a logged metric is a typo: one error naming the nearest
        valid name, rather than a column of '—' (whether a val/... or downstream/... key exists is known only from
        the jobs: `check_metrics`)."""
        if self.key in SUMMARY_STATS or self.key.startswith(LOGGED) or self.key == records.TRAIN_LOSS:
            return
        options = [*SUMMARY_STATS, *_SUMMARY_OF_METRIC]
        raise MetricError(
            f"metric {self.key!r}: no such summary field or metric{suggest(self.key, options)}; a metric is a "
            f"numeric summary field ({', '.join(SUMMARY_STATS)}) or a val/... or downstream/... key as metrics.jsonl "
            "names it"
        )

    @classmethod
    def parse(cls, text: str) -> Metric:
        """`val/loss`, `val_bpb`, `val/reasoning/exact_match>=0.3`, `val/loss<=3.5` (the comparison must point
        the way the metric improves)."""
        for op in (">=", "<="):
            if op in text:
                key, _, value = text.partition(op)
                try:
                    target = float(value)
                except ValueError:
                    raise MetricError(f"metric {text!r}: the target after {op} must be a number") from None
                metric = cls(key.strip(), target)
                if (op == ">=") != higher_is_better(metric.key):
                    good = ">=" if higher_is_better(metric.key) else "<="
                    raise MetricError(f"metric {text!r}: {metric.key} improves the other way; write {metric.key}{good}")
                return metric
        return cls(text.strip())

    @property
    def higher_is_better(self) -> bool:
        return False if self.target is not None else higher_is_better(self.key)

    @property
    def label(self) -> str:
        if self.at is not None and self.budget is not None:
            unit = "FLOPs" if self.at == "flops" else "s of training"
            return f"{self.key} at equal {self.at} ({self.budget:.4g} {unit})"
        if self.target is None:
            return self.key
        return f"tokens to {self.key} {'>=' if higher_is_better(self.key) else '<='} {self.target:g}"

    @property
    def text(self) -> str:
        """The form `parse` reads back (a metric at a budget is derived by the report, not parsed)."""
        if self.target is None:
            return self.key
        return f"{self.key}{'>=' if higher_is_better(self.key) else '<='}{self.target:g}"


def check_metrics(metrics: list[Metric], jobs: list[Job]) -> None:
    """MetricError for a metric whose key no job records, where some job has validation records to tell (a sweep
    that has evaluated nothing yet cannot): a misspelt val/... or downstream/... key names the nearest one the jobs
    have. Downstream tasks run less often than validation: a downstream key is checked once some job has recorded
    one or has finished (its summary holds every downstream metric it will have)."""
    known = {k for j in jobs for k in j.curves}
    summaries = [j.summary for j in jobs if j.summary is not None]
    known |= {k for s in summaries for k in (*s.val, *s.downstream, *_SUMMARY_OF_METRIC)}
    if not any(k.startswith("val/") for k in known):
        return
    downstream_known = bool(summaries) or any(k.startswith(DOWNSTREAM) for k in known)
    for m in metrics:
        if m.key in SUMMARY_STATS or m.key in known or (m.key.startswith(DOWNSTREAM) and not downstream_known):
            continue
        have = sorted(k for k in known if k.startswith(LOGGED) and not k.endswith(STDERR))
        raise MetricError(
            f"metric {m.text!r}: no job records {m.key}{suggest(m.key, have)}; the jobs have: {', '.join(have)}"
        )


def higher_is_better(key: str) -> bool:
    """Accuracies improve upwards; losses, bits per byte, tokens, FLOPs and time downwards. A downstream metric
    (downstream/<task>/<metric>[/<filter>][_stderr]) improves upwards unless it is a perplexity or bits per byte,
    as lm-eval's registry marks them."""
    if key.startswith(DOWNSTREAM):
        return records.downstream_higher_is_better(key)
    return key.endswith(("exact_match", "accuracy"))


@dataclass(frozen=True)
class Point:
    """One logged value of a curve: at `step`, after `tokens` and `seconds` of training (the sum of the logged
    step times up to there: evaluation, checkpointing and start-up excluded; None where not logged)."""

    step: int
    tokens: int
    seconds: float | None
    value: float


def tokens_to_reach(curve: list[Point], target: float, higher: bool) -> float | None:
    """Tokens at which `curve` first reaches `target`, linear between the evaluation before and the first one at
    or past it (the value is only known at evaluations); the first evaluation itself if it already does."""
    previous = None
    for point in curve:
        if (point.value >= target) if higher else (point.value <= target):
            if previous is None or previous.value == point.value:
                return float(point.tokens)
            frac = (target - previous.value) / (point.value - previous.value)
            return previous.tokens + frac * (point.tokens - previous.tokens)
        previous = point
    return None


def value_at(curve: list[tuple[float, float]], x: float) -> float | None:
    """The curve's value at x (linear between the points around it; None outside the curve's range)."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    if curve and math.isclose(curve[-1][0], x, rel_tol=1e-9):
        return curve[-1][1]
    return None


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
    curves: dict[str, list[Point]] = field(default_factory=dict)  # every val/* and downstream/* metric, train/loss
    moe_load: list[tuple[int, float]] = field(default_factory=list)  # (step, moe/load_max_over_mean)
    last_step: int | None = None
    label: str | None = None  # the arm's name where something names it (a study's arm, runs.json)

    def x_of(self, point: Point, axis: str) -> float | None:
        """A curve point's position on `axis`: tokens, flops (model FLOPs + the optimizer's, per step, from the
        summary) or seconds (training time)."""
        if axis == "tokens":
            return float(point.tokens)
        if axis == "seconds":
            return point.seconds
        s = self.summary
        if s is None or not s.flops_per_token:
            return None
        per_step = (s.optimizer_flops or 0.0) / s.step if s.step else 0.0
        return point.tokens * s.flops_per_token + point.step * per_step

    def total(self, axis: str) -> float | None:
        """What the finished run spent on `axis` (tokens, flops incl. the optimizer's, training seconds)."""
        curve = self.curves.get(records.VAL_LOSS) or []
        return self.x_of(curve[-1], axis) if curve and self.summary else None

    def value(self, metric: Metric | str) -> float | None:
        """The job's final `metric` (None when it has none, or never reached the target)."""
        m = Metric.parse(metric) if isinstance(metric, str) else metric
        if m.at is not None and m.budget is not None:
            pts = [(x, p.value) for p in self.curves.get(m.key, []) if (x := self.x_of(p, m.at)) is not None]
            return value_at(pts, m.budget)
        if m.target is not None:
            return tokens_to_reach(self.curves.get(m.key, []), m.target, higher_is_better(m.key))
        if self.summary is None:
            return None
        if m.key in _SUMMARY_OF_METRIC:
            value = _SUMMARY_OF_METRIC[m.key](self.summary)
        elif m.key in SUMMARY_STATS:  # validated by Metric: a numeric field's name
            value = getattr(self.summary, m.key)
        elif m.key.startswith(DOWNSTREAM):
            value = self.summary.downstream.get(m.key)
        else:
            value = self.summary.val.get(m.key)
        return None if value is None else float(value)

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


def read_metrics(path: Path) -> list[dict[str, Any]]:
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


def _curves(metrics: list[dict[str, Any]], summary: Summary | None) -> tuple[dict, list, int | None]:
    """Curves of every val/* and downstream/* metric and train/loss, the MoE load curve, the last step. Evaluation
    records carry no token count, so tokens = step * tokens per step, taken from the summary or from any train
    record; the seconds at a step add up the logged `perf/step_s` of the train records (each covers the steps since
    the previous one)."""
    step, tokens = records.STEP, records.TRAIN_TOKENS
    per_step = summary.tokens_seen / summary.step if summary and summary.step else None
    for r in metrics:
        if per_step is None and r.get(tokens) and r.get(step):
            per_step = r[tokens] / r[step]
    curves: dict[str, list[Point]] = {}
    elapsed, last_train_step, timed = 0.0, 0, True
    for r in metrics:
        at = r.get(step)
        if not isinstance(at, int) or per_step is None:
            continue
        if records.TRAIN_LOSS in r:
            step_s = r.get(records.PERF_STEP_S)
            if isinstance(step_s, int | float):
                elapsed += float(step_s) * (at - last_train_step)
            else:
                timed = False  # an older run without step times: no time axis
            last_train_step = at
        for key, value in r.items():
            if (key.startswith(LOGGED) or key == records.TRAIN_LOSS) and isinstance(value, int | float):
                point = Point(at, round(at * per_step), elapsed if timed else None, float(value))
                curves.setdefault(key, []).append(point)
    moe = [(r[step], r[records.MOE_LOAD_MAX_OVER_MEAN]) for r in metrics if records.MOE_LOAD_MAX_OVER_MEAN in r]
    steps = [r[step] for r in metrics if isinstance(r.get(step), int)]
    return curves, moe, max(steps) if steps else None


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
    curves, moe, last = _curves(read_metrics(job_dir / records.METRICS_FILE), summary)
    config = _read_json(job_dir / records.CONFIG_FILE)
    return Job(
        job_dir, num, overrides, status, detail, summary, config if isinstance(config, dict) else {}, curves, moe, last
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
    """Every job's overrides in job-number order, expanded from multirun.yaml as Hydra's basic sweeper does
    (`compose.sweep_jobs`: sweeper params first, then the command line). None for other sweepers or an unreadable
    file."""
    try:
        hydra_cfg = _multirun_hydra(sweep_dir)
        if not str(hydra_cfg["sweeper"]["_target_"]).endswith("BasicSweeper"):
            return None
        return sweep_jobs(list(hydra_cfg["overrides"]["task"]), hydra_cfg["sweeper"].get("params") or {})
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
# Arms


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

    def stat(self, metric: Metric | str) -> Stat:
        """Over the finished seeds that have the metric (see `Metric`)."""
        return Stat(tuple(v for j in self.finished if (v := j.value(metric)) is not None))

    def summary_stat(self, get: Callable[[Summary], float | None]) -> Stat:
        """A summary field over the finished seeds that have it, read by attribute: `arm.summary_stat(lambda s:
        s.flops)` (a misspelt field fails the type check, not silently)."""
        values = (get(j.summary) for j in self.finished if j.summary is not None)
        return Stat(tuple(float(v) for v in values if v is not None))

    def by_seed(self, metric: Metric | str) -> dict[str, float]:
        """Finished seeds -> the metric (seeds without it left out): what a paired test pairs on."""
        return {j.seed or f"job{j.num}": v for j in self.finished if (v := j.value(metric)) is not None}


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
            if job.label is not None:
                label = job.label
            elif len(axes) == 1:
                label = values.get(axes[0], "(default)")
            else:
                label = ",".join(f"{k}={values.get(k, '(default)')}" for k in axes) or "all jobs"
            arms[job.arm_key] = Arm(label, job.arm_key, [])
        arms[job.arm_key].jobs.append(job)
    return list(arms.values()), axes


def sweep_experiment(sweep_dir: Path, jobs: list[Job] | None = None) -> str | None:
    """`experiment` from multirun.yaml (written at sweep start), else from any job's config.json."""
    if name := _multirun(sweep_dir, "experiment"):
        return str(name)
    configs = (
        [j.config for j in jobs]
        if jobs is not None
        else [_read_json(d / records.CONFIG_FILE) or {} for d in _job_dirs(sweep_dir)]
    )
    return next((str(c["experiment"]) for c in configs if c.get("experiment")), None)


def _fmt_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


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
        name = sweep_experiment(sweep)
        if name == experiment:
            return sweep
        seen.append(name)
    known = sorted({s for s in seen if s})
    raise FileNotFoundError(
        f"no sweep of experiment {experiment!r} under {root.resolve()} "
        f"({len(sweeps)} sweeps; experiments found: {known or 'none'})"
    )


class PrecisionMismatch(BadInput, ValueError):
    """Arms (or seeds of one arm) whose residual streams ran in different precisions: not one experiment."""

    kind = "report"


def check_residual_precision(arms: list[Arm]) -> None:
    """Refuse to compare runs whose residual stream had different dtypes (summary.json `residual_dtype`: under bf16,
    FSDP2 and a W_e projection keep it in bf16, one process or DDP without W_e in fp32), naming each arm's. Runs
    from before the field was recorded (None) are not checked."""
    seen = {a.label: sorted({j.summary.residual_dtype for j in a.jobs if j.summary and j.summary.residual_dtype})
            for a in arms}  # fmt: skip
    if len(set().union(*seen.values())) > 1:
        listed = "; ".join(f"{label}: {', '.join(v)}" for label, v in seen.items() if v)
        raise PrecisionMismatch(
            f"the runs' residual streams ran in different precisions ({listed}): under train.precision=bf16 FSDP2 "
            "and a W_e projection keep it in bf16, one process or DDP without W_e in fp32; run every arm and seed "
            "with the same train.parallel and train.precision"
        )
