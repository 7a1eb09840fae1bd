"""Per-seed raw results as files a study folder commits, and reading them back, so a report can be rebuilt and
its verdicts re-checked without the (git-ignored) run folders.

  runs.json   one object per job: arm, seed, status, overrides, summary, sha256 of its config.json, git SHA,
              torch version, hardware (from run_info.json)
  runs.csv    the same, flat, one row per job (for spreadsheets; runs.json is what is read back)
  curves.csv  arm, seed, metric, step, tokens, seconds, value: every validation metric and train/loss per job
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from scaletrain import records
from scaletrain.records import Summary
from scaletrain.report.collect import Arm, Job, JobStatus, Point

RUNS_JSON, RUNS_CSV, CURVES_CSV = "runs.json", "runs.csv", "curves.csv"


def _config_sha(job: Job) -> str | None:
    if not job.config:
        return None
    return hashlib.sha256(json.dumps(job.config, sort_keys=True).encode()).hexdigest()[:16]


def _run_info(job: Job) -> dict[str, Any]:
    if job.dir is None:
        return {}
    try:
        info = json.loads((job.dir / records.RUN_INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def job_record(arm: Arm, job: Job) -> dict[str, Any]:
    info = _run_info(job)
    return {
        "arm": arm.label,
        "seed": job.seed,
        "job": job.num,
        "status": str(job.status),
        "overrides": job.overrides,
        "config_sha256_16": _config_sha(job),
        "git_sha": info.get("git_sha"),
        "torch": (info.get("versions") or {}).get("torch"),
        "cpu": (info.get("hardware") or {}).get("cpu"),
        "device": (info.get("hardware") or {}).get("device"),
        "summary": job.summary.to_dict() if job.summary else None,
    }


def write_results(arms: list[Arm], out: Path) -> list[Path]:
    """runs.json, runs.csv and curves.csv of every job that has a directory (pending ones have nothing)."""
    jobs = [(a, j) for a in arms for j in a.jobs if j.dir is not None]
    rows = [job_record(a, j) for a, j in jobs]
    records.atomic_write(out / RUNS_JSON, (json.dumps(rows, indent=1) + "\n").encode())
    flat = []
    for r, (_, job) in zip(rows, jobs, strict=True):
        row = {k: v for k, v in r.items() if k not in ("summary", "overrides")}
        row["overrides"] = " ".join(r["overrides"])
        row.update(job.summary.flat() if job.summary else {})
        flat.append(row)
    _write_csv(out / RUNS_CSV, flat)
    curve_rows = [
        {
            "arm": a.label,
            "seed": j.seed,
            "metric": key,
            "step": p.step,
            "tokens": p.tokens,
            "seconds": p.seconds,
            "value": p.value,
        }
        for a in arms
        for j in a.jobs
        if j.dir is not None
        for key, points in sorted(j.curves.items())
        for p in points
    ]
    _write_csv(out / CURVES_CSV, curve_rows)
    return [out / RUNS_JSON, out / RUNS_CSV, out / CURVES_CSV]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    records.atomic_write(path, text.getvalue())


def read_results(folder: Path) -> list[Job]:
    """The jobs of a results folder (runs.json + curves.csv), as collect_jobs would have read them."""
    try:
        rows = json.loads((folder / RUNS_JSON).read_text())
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{folder / RUNS_JSON}: cannot read per-seed results ({err})") from None
    curves: dict[tuple[str, str], dict[str, list[Point]]] = {}
    try:
        with (folder / CURVES_CSV).open(newline="") as f:
            for r in csv.DictReader(f):
                seconds = float(r["seconds"]) if r["seconds"] else None
                point = Point(int(r["step"]), int(r["tokens"]), seconds, float(r["value"]))
                curves.setdefault((r["arm"], r["seed"]), {}).setdefault(r["metric"], []).append(point)
    except OSError:
        pass  # final values only: targets (tokens to reach) need the curves and will be missing
    jobs = []
    for r in rows:
        summary = Summary.from_dict(r["summary"]) if r.get("summary") else None
        status = JobStatus(r["status"])
        job_curves = curves.get((r["arm"], str(r["seed"])), {})
        last = max((p.step for c in job_curves.values() for p in c), default=None)
        config = {"train": {"seed": r["seed"]}}
        job = Job(None, r["job"], list(r["overrides"]), status, "", summary, config, job_curves, [], last, r["arm"])
        jobs.append(job)
    return jobs
