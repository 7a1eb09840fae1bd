"""A whole study in one command: tune each arm, evaluate the tuned arms on paired seeds, account for compute,
report — and pick up where it stopped when the same command is issued again.

    python -m scaletrain.study experiment=<recipe> [key=value ...] [--dry-run] [--out DIR]

The recipe (conf/experiment/<recipe>.yaml) holds a `study:` section (schema: config.StudyConfig): the arms (the
overrides that make each), the key each arm tunes and its grid, which tuned values an arm takes from another
(Muon's AdamW part at the AdamW arm's best lr), the tuning seed, the evaluation seeds, the selection metric and the
report's extra metrics. Phases, each a Hydra multirun of `python -m scaletrain.run` (so any launcher works:
`cluster=slurm` etc. pass through):
  0. budget `study.match`: tokens gives every arm the recipe's train.max_steps; flops gives each arm the steps whose
            model + optimizer FLOPs equal the reference arm's (`study.reference`, default the first arm); time
            first runs each arm for `study.pace_steps` on the launcher's hardware and gives each arm the steps
            whose measured seconds equal the reference arm's. Every arm is then tuned and evaluated at its own
            length, each run fully decayed (the budget is frozen into study.json);
  1. tune   per arm (in inheritance order): its grid on `study.tune_seed`, every run fully decayed, chosen by the
            final value of `study.select` (a summary field, a val/... or a downstream/... key, in its own direction:
            report.collect.higher_is_better); a best point at an edge of the grid adds the next point past it
            (`study.max_widen` times at most);
  2. eval   every arm at its tuned values on `study.seeds` (a seed fixes the data order in every arm: paired);
  3. report tuning.md (each arm's grid and choice, plot) and the report of the evaluation runs (per-seed results,
            verdicts; compute per arm: tokens, model FLOPs, Newton-Schulz FLOPs, wall-clock and CPU time).
Re-issuing the command skips finished jobs (summary.json), resumes interrupted ones (`train.resume=auto` from their
newest checkpoint) and reruns failed ones. The first invocation freezes the study (study.json: the command line's
overrides, the study section, the expanded config of every job); a later one with other settings is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from scaletrain import records
from scaletrain.config import BadInput, Config, ConfigError, StudyConfig, StudyMatch, to_dict

STUDY_FILE = "study.json"
# study settings removed since the first studies began, that never shaped a job: an older study.json's value is ignored
REMOVED_SETTINGS = ("expected_minutes",)  # a wall-time estimate; the recipes keep it as a comment
TUNING_MD = "tuning.md"


class StudyError(BadInput, Exception):
    """A study that cannot go on; the message names the file or setting and the way out."""

    kind = "study"


@dataclass
class Phase:
    """Jobs of one multirun: the fixed overrides, the swept key and its values, and where the jobs live."""

    sweep_dir: Path
    subdir: str  # hydra.sweep.subdir, an interpolation of the swept key (e.g. lr${optim.lr})
    fixed: list[str]
    key: str
    values: list[str]
    folders: dict[str, Path] = field(default_factory=dict)  # value -> job folder

    def unfinished(self) -> list[str]:
        return [v for v in self.values if not (self.folders[v] / records.SUMMARY_FILE).exists()]


def compose(overrides: list[str], check_grid: bool = False) -> Config:
    """The typed config of the command line (the recipe and its study section). `check_grid`: refuse a recipe
    that also sweeps keys through hydra.sweeper.params (each phase's multirun would multiply its jobs by them)."""
    from omegaconf import OmegaConf, open_dict

    from scaletrain.compose import compose as compose_tree
    from scaletrain.config import load_config

    composed = compose_tree(overrides, return_hydra_config=check_grid)
    if check_grid:
        params = OmegaConf.select(composed, "hydra.sweeper.params") or {}
        if params:
            raise ConfigError(
                f"hydra.sweeper.params: the recipe also sweeps {sorted(params)}; a study declares its arms in "
                "study.arms and its seeds in study.seeds (remove the sweep grid from the recipe)"
            )
        with open_dict(composed):
            del composed["hydra"]
    return load_config(composed)


def fmt(value: float) -> str:
    """A grid value as the command line and the job folder spell it (OmegaConf prints floats with repr)."""
    return repr(float(value))


def _study_defaults() -> dict[str, object]:
    """StudyConfig's settings that have a plain default, as study.json spells them."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(StudyConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = str(f.default) if isinstance(f.default, enum.Enum) else f.default
    return out


def arm_order(study: StudyConfig) -> list[str]:
    """Arms so that an arm comes after the arms it inherits tuned values from."""
    done: list[str] = []
    while len(done) < len(study.arms):
        ready = [a for a, arm in study.arms.items() if a not in done and set(arm.inherit.values()) <= set(done)]
        if not ready:
            raise ConfigError(f"study.arms: inherit forms a cycle among {sorted(set(study.arms) - set(done))}")
        done.append(ready[0])
    return done


@dataclass
class Tuning:
    key: str
    best: float
    results: dict[float, float | None]  # grid value -> final selection metric (None: the run has none)
    edge: bool  # the best is still at an edge of the grid after study.max_widen widenings


class Study:
    def __init__(self, overrides: list[str], cfg: Config, root: Path, dry_run: bool = False):
        assert cfg.study is not None
        self.overrides, self.cfg, self.study, self.root, self.dry_run = overrides, cfg, cfg.study, root, dry_run
        self.launched: list[list[str]] = []  # the multirun commands run (tests count them)

    # ---- the frozen record

    def freeze(self) -> None:
        """Write study.json on the first invocation; refuse a re-issue with other settings."""
        record = {"overrides": self.overrides, "study": to_dict(self.cfg)["study"], "experiment": self.cfg.experiment}
        path = self.root / STUDY_FILE
        if path.exists():
            old = json.loads(path.read_text())
            old_study = old.get("study")
            if isinstance(old_study, dict):  # a setting added since that study began counts at its default
                old_study = {**{k: v for k, v in _study_defaults().items() if k not in old_study}, **old_study}
                old_study = {k: v for k, v in old_study.items() if k not in REMOVED_SETTINGS}
            if {**{k: old.get(k) for k in record}, "study": old_study} != record:
                raise StudyError(
                    f"{path} was started with other settings (overrides {old.get('overrides')}, its study section); "
                    f"re-issue that command to continue it, or set study.dir to a new folder"
                )
            return
        if not self.dry_run:
            self.root.mkdir(parents=True, exist_ok=True)
            records.write_json(path, {**record, "jobs": {}})

    def record_job_configs(self, phase: Phase) -> None:
        """The expanded config of every job of `phase`, frozen into study.json (first seen wins)."""
        path = self.root / STUDY_FILE
        if self.dry_run or not path.exists():
            return
        data = json.loads(path.read_text())
        for value, folder in phase.folders.items():
            name = str(folder.relative_to(self.root))
            if name not in data["jobs"]:
                data["jobs"][name] = to_dict(compose([*self.base(), *phase.fixed, f"{phase.key}={value}"]))
        records.write_json(path, data)

    # ---- the budget (study.match)

    def reference(self) -> str:
        return self.study.reference or next(iter(self.study.arms))

    def budget(self) -> dict | None:
        """The budget under study.match (None for tokens: the recipe's train.max_steps for every arm): train.max_steps
        per arm and the per-step cost it came from. Computed once and frozen into study.json; a re-issue takes the
        frozen one (the jobs were trained at those lengths). match=time runs the pace jobs first."""
        if self.study.match == StudyMatch.tokens:
            return None
        path = self.root / STUDY_FILE
        frozen = json.loads(path.read_text()).get("budget") if path.exists() else None
        if frozen is not None:
            return frozen
        if self.study.match == StudyMatch.flops:
            from scaletrain.cost import step_flops  # model + optimizer FLOPs per step, as the trainer counts them

            arms = self.study.arms.items()
            cost = {name: step_flops(compose([*self.base(), *arm.overrides])).total for name, arm in arms}
            unit = "FLOPs"
        else:
            cost = self.pace()
            if cost is None:  # --dry-run before the pace jobs ran
                return None
            unit = "s"
        ref = self.reference()
        ref_steps = compose([*self.base(), *self.study.arms[ref].overrides]).train.max_steps
        steps = {name: max(1, round(ref_steps * cost[ref] / c)) for name, c in cost.items()}
        budget = {"match": str(self.study.match), "reference": ref, "unit": f"{unit} per step", "per_step": cost,
                  "steps": steps}  # fmt: skip
        if not self.dry_run:
            data = json.loads(path.read_text())
            records.write_json(path, {**data, "budget": budget})
        return budget

    def pace(self) -> dict[str, float] | None:
        """Seconds per optimizer step of each arm: a `study.pace_steps` run on the tuning seed through the same
        launcher as the study's jobs, logging every step; the median step after the first (which pays for
        start-up and compilation)."""
        from scaletrain.report.collect import read_metrics

        out: dict[str, float] = {}
        for name, arm in self.study.arms.items():
            fixed = [*arm.overrides, f"train.max_steps={self.study.pace_steps}", "train.log_every=1"]
            phase = self.phase("pace", "train.seed", [str(self.study.tune_seed)], fixed, f"{name}_s")
            self.launch(phase)
            if self.dry_run and phase.unfinished():
                return None
            folder = phase.folders[str(self.study.tune_seed)]
            times = [
                r[records.PERF_STEP_S]
                for r in read_metrics(folder / records.METRICS_FILE)
                if isinstance(r.get(records.PERF_STEP_S), int | float) and r.get(records.STEP, 0) > 1
            ]
            if not times:
                raise StudyError(f"{folder / records.METRICS_FILE}: no step times after step 1 to pace arm {name}")
            out[name] = statistics.median(times)
        return out

    def arm_overrides(self, name: str, budget: dict | None) -> list[str]:
        """The arm's overrides, with its budget (train.max_steps) unless it is the reference arm."""
        own = list(self.study.arms[name].overrides)
        if budget is not None and name != budget["reference"]:
            own.append(f"train.max_steps={budget['steps'][name]}")
        return own

    # ---- phases

    def base(self) -> list[str]:
        return [*self.overrides]

    def launch(self, phase: Phase) -> None:
        todo = phase.unfinished()
        if not todo:
            return
        cmd = [
            sys.executable, "-m", "scaletrain.run", "-m", *self.base(), *phase.fixed,
            f"{phase.key}={','.join(todo)}", "train.resume=auto",
            f"hydra.sweep.dir={phase.sweep_dir}", f"hydra.sweep.subdir={phase.subdir}",
        ]  # fmt: skip
        self.launched.append(cmd)
        print("$ " + " ".join(cmd[1:]), flush=True)
        if self.dry_run:
            return
        self.record_job_configs(phase)
        done = subprocess.run(cmd, check=False)
        failed = [v for v in todo if not (phase.folders[v] / records.SUMMARY_FILE).exists()]
        if failed:
            raise StudyError(
                f"{len(failed)} job(s) of {phase.sweep_dir} did not finish ({phase.key}={','.join(failed)}; exit code "
                f"{done.returncode}): see their run.log and `python -m scaletrain.report {phase.sweep_dir}`; re-issue "
                "the command to resume them"
            )

    def final(self, folder: Path, metric: str) -> float | None:
        from scaletrain.report.collect import Job, JobStatus

        try:
            summary = records.read_summary(folder)
        except (OSError, ValueError):
            return None
        return Job(folder, None, [], JobStatus.finished, summary=summary).value(metric) if summary else None

    def tune(self, name: str, inherited: dict[str, float], own: list[str]) -> Tuning:
        """The arm's best value of its tuned key and every grid point's selection metric (`own`: the arm's
        overrides, its budget included)."""
        from scaletrain.report.collect import Metric, check_metrics, collect_jobs, higher_is_better

        arm = self.study.arms[name]
        assert arm.tune is not None
        grid = sorted(arm.grid)
        spacing = min(b / a for a, b in zip(grid, grid[1:], strict=False))
        sign = -1.0 if higher_is_better(self.study.select) else 1.0
        fixed = [*own, *(f"{k}={fmt(v)}" for k, v in inherited.items()), f"train.seed={self.study.tune_seed}"]
        widened = 0
        while True:
            phase = self.phase(f"tune_{name}", arm.tune, [fmt(v) for v in grid], fixed, arm.tune.split(".")[-1])
            self.launch(phase)
            if self.dry_run and phase.unfinished():  # what it would choose is not known yet
                return Tuning(arm.tune, grid[len(grid) // 2], {}, False)
            results = {v: self.final(phase.folders[fmt(v)], self.study.select) for v in grid}
            scored = {v: sign * r for v, r in results.items() if r is not None and math.isfinite(r)}
            if not scored:  # a misspelt val/... or downstream/... key is known only now: name the nearest recorded
                check_metrics([Metric.parse(self.study.select)], collect_jobs(phase.sweep_dir))
                raise StudyError(f"no run of {self.root / f'tune_{name}'} has a finite {self.study.select}")
            best = min(scored, key=scored.__getitem__)
            edge = best in (grid[0], grid[-1])
            if not edge or widened == self.study.max_widen:
                return Tuning(arm.tune, best, results, edge)
            grid = [grid[0] / spacing, *grid] if best == grid[0] else [*grid, grid[-1] * spacing]
            widened += 1

    def phase(self, folder: str, key: str, values: list[str], fixed: list[str], label: str) -> Phase:
        sweep = self.root / folder
        subdir = f"{label}${{{key}}}"
        return Phase(sweep, subdir, fixed, key, values, {v: sweep / f"{label}{v}" for v in values})

    def run(self) -> dict[str, dict[str, float]]:
        """Budget, tune, evaluate; returns each arm's tuned values."""
        self.freeze()
        budget = self.budget()
        if self.dry_run and self.study.match == StudyMatch.time and budget is None:
            print("(the arms' lengths follow from the pace runs: the commands below show the recipe's train.max_steps)")
        tuned: dict[str, dict[str, float]] = {}
        tuning: dict[str, Tuning] = {}
        for name in arm_order(self.study):
            arm = self.study.arms[name]
            inherited = {key: tuned[src][key] for key, src in arm.inherit.items()}
            tuned[name] = dict(inherited)
            if arm.tune is not None:
                tuning[name] = self.tune(name, inherited, self.arm_overrides(name, budget))
                tuned[name][arm.tune] = tuning[name].best
        for name in self.study.arms:
            values = [*self.arm_overrides(name, budget), *(f"{k}={fmt(v)}" for k, v in tuned[name].items())]
            seeds = [str(s) for s in self.study.seeds]
            self.launch(self.phase("eval", "train.seed", seeds, values, f"{name}_s"))
        if not self.dry_run:
            write_tuning(self.root, self.study, tuned, tuning, budget)
        return tuned


def write_tuning(root: Path, study: StudyConfig, tuned: dict, tuning: dict, budget: dict | None = None) -> Path:
    """tuning.md: the budget (study.match), each tuned arm's grid with the selection metric per point and the
    choice, and a plot."""
    lines = [f"# Tuning: {root.name}", "", f"Seed {study.tune_seed} (not an evaluation seed); every run fully decayed; "
             f"chosen by the final {study.select}.", ""]  # fmt: skip
    if budget:
        lines += [
            f"## Budget: equal {budget['match']} (reference arm: {budget['reference']})",
            "",
            f"| arm | {budget['unit']} | train.max_steps |",
            "|---|---|---|",
            *(f"| {a} | {budget['per_step'][a]:.4g} | {budget['steps'][a]} |" for a in budget["steps"]),
            "",
        ]
    for name, t in tuning.items():
        key, best, results = t.key, t.best, t.results
        fixed = {k: v for k, v in tuned[name].items() if k != key}
        lines += [
            f"## {name}: {key}" + (f" (with {', '.join(f'{k}={v:g}' for k, v in fixed.items())})" if fixed else "")
        ]
        lines += ["", f"| {key} | {study.select} |", "|---|---|"]
        for value in sorted(results):
            r = results[value]
            cell = "—" if r is None else f"{r:.4f}"
            lines.append(f"| {value:g} | {'**' + cell + '** (chosen)' if value == best else cell} |")
        if t.edge:
            lines.append(
                f"\nThe best {key} is at an edge of the grid after study.max_widen={study.max_widen} widenings: the "
                "optimum may lie beyond it; widen the grid before trusting this arm's tuning."
            )
        lines.append("")
    path = root / TUNING_MD
    if tuning:
        plot = _plot_tuning(root, study, tuning)
        lines += [f"![tuning]({plot.name})", ""]
    path.write_text("\n".join(lines))
    return path


def _plot_tuning(root: Path, study: StudyConfig, tuning: dict) -> Path:
    from matplotlib.figure import Figure

    from scaletrain.report.plots import FIG_DPI, FIG_SIZE_IN

    fig = Figure(figsize=FIG_SIZE_IN, dpi=FIG_DPI)
    ax = fig.add_subplot()
    for name, t in tuning.items():
        xs = sorted(v for v, r in t.results.items() if r is not None)
        ax.plot(xs, [t.results[x] for x in xs], marker="o", label=f"{name}: {t.key}")
    ax.set_xscale("log")
    ax.set(xlabel="tuned value", ylabel=f"final {study.select}", title=f"{root.name}: learning-rate tuning per arm")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = root / "tuning.png"
    fig.savefig(path)
    return path


def report(root: Path, study: StudyConfig, out: Path) -> list[Path]:
    from scaletrain import report as rp

    def arm_of(job: rp.Job) -> str | None:  # eval/<arm>_s<seed>
        return job.dir.name.rsplit("_s", 1)[0] if job.dir is not None else None

    r = rp.build_report(root / "eval", metrics=list(study.metrics), label_of=arm_of)
    return rp.write_report(r, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scaletrain.study", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="experiment=<recipe> and any key=value of scaletrain.run")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the multirun commands still to run, run nothing (an arm not tuned yet shows its grid's middle)",
    )
    parser.add_argument("--out", help="where the report and per-seed results go (default: <study.dir>/report)")
    args = parser.parse_args(argv)
    try:
        cfg = compose(args.overrides, check_grid=True)
        if cfg.study is None:
            raise ConfigError(
                f"experiment={cfg.experiment}: the recipe has no study: section (see conf/experiment/"
                "reasoning_mixture.yaml); use `python -m scaletrain.run -m` for a plain sweep"
            )
        from scaletrain.report.collect import Metric

        for text in (cfg.study.select, *cfg.study.metrics):
            Metric.parse(text)  # a misspelt summary field fails now, naming the nearest, not after the runs
        root = Path(cfg.study.dir).resolve()
        study = Study(args.overrides, cfg, root, args.dry_run)
        tuned = study.run()
        if args.dry_run:
            if not study.launched:
                print(f"nothing to run: every job of {root} finished; without --dry-run the report is written again")
            return 0
        paths = report(root, cfg.study, Path(args.out) if args.out else root / "report")
    except BadInput as err:  # ConfigError, StudyError, a plugin that does not import, ...
        print(f"study error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Hydra's compose errors name the key
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(err, HydraException | OmegaConfBaseException):
            print(f"study error: {err}", file=sys.stderr)
            return 2
        raise
    print("tuned: " + "; ".join(f"{a}: " + ", ".join(f"{k}={v:g}" for k, v in t.items()) for a, t in tuned.items()))
    print(f"wrote {root / TUNING_MD}, " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
