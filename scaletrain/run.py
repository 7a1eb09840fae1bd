"""Entry point: `scaletrain-run [group=option ...] [key=value ...]` or `python -m scaletrain.run ...` (`-m`: sweep).

`cli()` checks the command line before Hydra acts on it (`preflight`): every job the command would start
(each point of a `-m` sweep, recipe grids included) is composed and converted to typed config objects, so a
mistyped key or option fails at once with the nearest valid name, `+key=value` cannot add a key the schema
lacks, and `--cfg job` validates what it prints; a command that will run also has its output folder checked
(writable) and, for a single run, `train.resume=PATH` (a checkpoint this config can continue). Then Hydra runs
`main()` per job: compose -> `load_config` (typed `Config`) -> `check_job` (device, ranks, W&B login:
what needs the job's machine or run dir, before minutes of data and model setup) -> `trainer.train` in Hydra's
run (or sweep job) directory.

Bad input (`config.BadInput` and its subclasses, whose messages name the key or file and the fix) ends a single
run with one line `<kind> error: <message>` and exit code 2; under -m the job fails, its error names the job
and its log file, and the sweep goes on. Any other exception is a bug and keeps its traceback. A Ctrl-C that
reaches the command (while it starts up, imports included, or prepares data; a second one while the first one's
checkpoint is saved) ends in one line saying the state of the run folder, and exit code 130 as a first Ctrl-C
during training does. Hydra's grammar errors say how to quote a value (a path with a space). Ranks, devices and
preemption live in distributed.py.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

INTERRUPTED_EXIT = 128 + signal.SIGINT  # 130: the shell's code for Ctrl-C, as a run stopped by its first Ctrl-C
# Run as the command (`python -m scaletrain.run`, `scaletrain-run`), not imported by other code: then a Ctrl-C while
# the modules below load ends in one line instead of the traceback of whichever module was loading. (Not before
# Python has read this file: under `python -m`, the first ~0.1 s of a start, Python's own traceback remains.)
_COMMAND = __name__ == "__main__" or os.path.basename(sys.argv[0]) == "scaletrain-run"


def _stop_interrupted(line: str) -> NoReturn:
    """Ctrl-C: one line on stderr, exit 130. Further Ctrl-Cs are ignored from here on: they would interrupt the
    line itself (a traceback of this function, where one line was promised)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(line, file=sys.stderr)
    raise SystemExit(INTERRUPTED_EXIT) from None


STARTING_UP = "interrupted (Ctrl-C) while starting up: no run was started, nothing was written"

try:
    import argparse
    import re
    import traceback
    from pathlib import Path

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import OverrideParseException
    from hydra.types import RunMode
    from omegaconf import DictConfig, OmegaConf

    from scaletrain import records
    from scaletrain.compose import CONFIG_MODULE, CONFIG_NAME, CONFIG_PATH, sweep_jobs
    from scaletrain.config import (
        RESUME_KEYWORDS,
        BadInput,
        Config,
        ConfigError,
        Resume,
        check_batch_split,
        load_config,
        register_configs,
        resume_role,
        suggest,
        to_dict,
        unwritable,
    )
except KeyboardInterrupt:
    if not _COMMAND:
        raise
    _stop_interrupted(STARTING_UP)

try:  # at import: a sweep job unpickling main() needs the schemas too
    register_configs()
except BadInput as _err:  # a plugin that does not import: one line, before Hydra starts
    print(f"{_err.kind} error: {_err}", file=sys.stderr)
    raise SystemExit(2) from None
except KeyboardInterrupt:  # plugins load here
    if not _COMMAND:
        raise
    _stop_interrupted(STARTING_UP)
# submitit's local executor sets CUDA_VISIBLE_DEVICES for every job; keep what this shell had, so that the
# jobs of a local sweep can share out all of its GPUs (scaletrain.distributed.claim_local_slot)
os.environ.setdefault("SCALETRAIN_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
SWEPT_KEYS_ENV = "SCALETRAIN_SWEPT_KEYS"  # set by cli() for the jobs of a sweep: which keys the sweep varies
SEARCHPATH = "hydra.searchpath"  # user config folders: hydra.searchpath=[file:///path/to/conf] (see compose.py)
MAX_PREFLIGHT_JOBS = 256  # a larger sweep has its first jobs checked here, every job still checks itself


class JobFailed(RuntimeError):
    """A sweep job's error as the sweep's console reports it: which job, what went wrong, where its log is."""


def _job_failed(err: Exception) -> JobFailed:
    """Print the traceback into the job's own log, and name that log in the error the launcher returns."""
    traceback.print_exc()
    hc = HydraConfig.get()
    if os.environ.get("SUBMITIT_EXECUTOR"):  # submitit_slurm / submitit_local: <sweep>/.submitit/<job id>/
        import submitit

        paths = submitit.JobEnvironment().paths
        log = f"{paths.stderr} (stdout: {paths.stdout})"
    else:
        log = str(Path(hc.runtime.output_dir) / f"{hc.job.name}.log")
    return JobFailed(
        f"job {hc.job.num} ({' '.join(hc.overrides.task)}) failed: {type(err).__name__}: {err}\n"
        f"  log: {log}\n  run dir: {hc.runtime.output_dir}"
    )


def _fail(kind: str, err: Exception) -> None:
    """A single run stops with a one-line message and exit code 2. Under -m the error is raised as an
    ordinary exception instead: the launcher records this job as failed and runs the others."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise _job_failed(err) from err
    print(f"{kind} error: {err}", file=sys.stderr)
    raise SystemExit(2) from None


def _bad_input_kind(err: BaseException) -> str | None:
    """The word a one-line message starts with, for bad input (config.BadInput: its message names the key or file,
    what was expected and the fix); None for anything else: a bug, which keeps its traceback."""
    return err.kind if isinstance(err, BadInput) else None


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def run_name(cfg: Config, task_overrides: list[str], swept_keys: list[str], run_dir: Path) -> str:
    """W&B run name: `key=value,...` of the keys the sweep varies (a sweep job) but placement keys (where a run
    executes is not what it trains: config.resume_role), else `<experiment or model-optim>-<run folder>` (a single
    run). logging.wandb.name, when set, wins."""
    if cfg.logging.wandb.name:
        return cfg.logging.wandb.name
    named = [o for o in task_overrides if _override_key(o) in swept_keys]
    as_dict = to_dict(cfg) if named else {}  # a component's fields: in the schema the config names
    swept = [o.lstrip("+~") for o in named if resume_role(_override_key(o), as_dict) != Resume.placement]
    if swept:
        return ",".join(swept)
    base = cfg.experiment or "-".join([cfg.model.name, *([cfg.moe.name] if cfg.moe.n_experts else []), cfg.optim.name])
    return f"{base}-{run_dir.name}"


def _swept_keys(hc) -> list[str]:
    from_recipe = list(OmegaConf.select(hc, "sweeper.params", default=None) or {})
    from_cli = [k for k in os.environ.get(SWEPT_KEYS_ENV, "").split("|") if k]
    return list(dict.fromkeys([*from_recipe, *from_cli]))


def check_job(cfg: Config, run_dir: Path) -> None:
    """What a job checks on its own machine before data preparation and model setup (minutes on a large run):
    the device exists, the ranks share the global batch evenly, and an online W&B run can log in. (`train.resume`
    is checked by `trainer.train` itself, first thing: `checkpoint.check_resumable`.)"""
    from scaletrain import distributed, hardware
    from scaletrain.metrics import check_wandb

    dist = distributed.detect_env()  # before pick_device, as the trainer: a submitit_local job may re-expose GPUs
    hardware.pick_device(cfg.train.device)
    check_batch_split(cfg.train.batch_size, dist.world_size, f"this job ({dist.launcher})")
    if dist.is_main:  # only rank 0 logs to W&B
        check_wandb(cfg.logging.wandb)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
def main(dcfg: DictConfig) -> float | None:
    global _run_dir
    _run_dir = Path(HydraConfig.get().runtime.output_dir)  # what a Ctrl-C reports on (cli)
    try:
        cfg = load_config(dcfg)  # the one conversion: typed dataclasses from here on
    except ConfigError as err:
        _fail("config", err)
        return None
    from scaletrain.trainer import train  # torch imports only after the config is known to be valid

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if cfg.train.dry_run:  # size the run on the meta device: no device, no data, no weights
        from scaletrain.sizing import dry_run

        dry_run(cfg, run_dir)
        return None
    try:
        check_job(cfg, run_dir)
        summary = train(cfg, run_dir, run_name=run_name(cfg, list(hc.overrides.task), _swept_keys(hc), run_dir))
    except Exception as err:
        kind = _bad_input_kind(err)
        if kind is not None:
            _fail(kind, err)
            return None
        interrupt = _interrupt_behind(err)
        if interrupt is not None:  # a Ctrl-C that a worker pool turned into its own error (data preparation)
            raise interrupt from None
        if hc.mode == RunMode.MULTIRUN:
            raise _job_failed(err) from err
        raise
    return summary.val_loss


def _interrupt_behind(err: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C that `err` was raised while handling, if any: datasets' worker pool, waiting for its workers
    when the Ctrl-C comes, raises a TimeoutError of its own from it (data preparation with num_proc > 1)."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return None


# ---------------------------------------------------------------------------------------------- preflight


def _grammar_hint(err: OverrideParseException, overrides: list[str]) -> str:
    """Hydra's grammar error for one override, naming it, with how to quote it. An override without `=` that follows
    a key=value is most often the rest of that value, split off by the shell at a space (an unquoted path)."""
    bad, reason = err.override, err.message.split("\n")[0]
    at = overrides.index(bad) if bad in overrides else -1
    before = overrides[at - 1] if at > 0 else ""
    if "=" not in bad and "=" in before:
        key, _, value = before.partition("=")
        return (
            f"{bad!r} is not key=value: if it is the rest of {key}'s value, the shell split the value at a space; "
            f"quote it ({key}='{value} {bad}') or escape the space ({key}={value}\\ {bad})"
        )
    if "=" not in bad:
        return f"{bad!r} is not key=value (or group=option): {reason}"
    key, _, value = bad.partition("=")
    return (
        f"{bad}: {reason}; Hydra's override grammar gives ( ) [ ] {{ }} , quotes and backslashes a meaning: quote the "
        f"value for it, inside the shell's quotes (\"{key}='{value}'\")"
    )


def _explain(err: Exception, overrides: list[str]) -> str:
    """Hydra's composition error, plus the nearest valid name where the error is a misspelling."""
    from hydra import compose

    if isinstance(err, OverrideParseException):  # data.path=/my data (unquoted): a grammar error without a hint
        return _grammar_hint(err, overrides)
    msg = str(err).strip()
    missing = re.search(r"Could not find '(.+)/([^'/]+)'", msg)
    # the schemas the options stack on (`<name>_schema`, ConfigStore) are not options a user picks
    options = [o for o in getattr(err, "options", None) or [] if not o.endswith("_schema")]
    if missing and options:  # model=baseline10m
        return msg.split("\n")[0] + suggest(missing.group(2), options) + f"; available: {', '.join(options)}"
    key = re.search(r"Could not override '([^']+)'", msg)
    if key:  # optim.lrr=1 or modell=tiny: list the valid keys next to the misspelled one
        path = key.group(1)
        parent, _, leaf = path.rpartition(".")
        rest = [o for o in overrides if _override_key(o) != path]
        base = compose(config_name="config", overrides=rest)
        node = OmegaConf.select(base, parent) if parent else base
        keys = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
        if not parent:
            from hydra.core.global_hydra import GlobalHydra

            keys += list(GlobalHydra.instance().config_loader().list_groups(""))
        return (
            f"{path}: no such key{suggest(leaf, keys)}; valid keys{' of ' + parent if parent else ''}: "
            f"{', '.join(sorted(set(keys)))}"
        )
    cause = str(err.__cause__ or "")
    full_key = re.search(r"full_key: (\S+)", cause)
    if full_key:  # model.d_model=abc, model.norm=batchnorm: the key, then OmegaConf's reason (the type or options)
        reason = cause.strip().splitlines()[0]
        value = re.match(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", reason)
        hint = suggest(value.group(1), value.group(2).split(", ")) if value else ""
        return f"{full_key.group(1)}: {reason}{hint}"
    return msg.replace("\n", " ")


def _jobs(overrides: list[str], multirun: bool) -> tuple[list[list[str]], list[str]]:
    """The override list of every job the command starts, and the keys the sweep varies."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # Hydra's own keys are set by hydra.main, except the search path, which decides what the config is made of
    user = [o for o in overrides if not _override_key(o).startswith("hydra") or _override_key(o) == SEARCHPATH]
    if not multirun:
        return [user], []
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(user)
    base = compose(
        config_name="config",
        overrides=[o.input_line or "" for o in parsed if not o.is_sweep_override()],
        return_hydra_config=True,
    )
    recipe = {str(k): str(v) for k, v in (OmegaConf.select(base, "hydra.sweeper.params") or {}).items()}
    grid = parser.parse_overrides([f"{k}={v}" for k, v in recipe.items()]) + parsed
    swept = list(dict.fromkeys([o.get_key_element().lstrip("+~") for o in grid if o.is_sweep_override()]))
    jobs = sweep_jobs(user, recipe, config_loader=GlobalHydra.instance().config_loader())
    return jobs[:MAX_PREFLIGHT_JOBS], swept


def _check_output_dir(first_job: list[str], overrides: list[str], multirun: bool, cfg: Config) -> None:
    """The folder Hydra will create (hydra.run.dir, or hydra.sweep.dir under -m) must be creatable: Hydra would
    otherwise fail inside its logging setup with a long traceback that never names the key. A fresh single
    run's folder must not hold another run's records: Hydra would rewrite its .hydra/ before the trainer
    refuses it (`records.check_run_dir_free`)."""
    from hydra import compose

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    hydra_overrides = [o for o in overrides if _override_key(o).startswith("hydra") and _override_key(o) != SEARCHPATH]
    composed = compose(config_name="config", overrides=[*first_job, *hydra_overrides], return_hydra_config=True)
    folder = str(OmegaConf.select(composed, key))  # ${now:...} resolves to this second: the same parent folders
    problem = unwritable(folder)
    if problem:
        raise ConfigError(f"{key}={folder}: {problem}; set {key} to a folder you can write (or run from one)")
    if not multirun:  # a live run there: refused before Hydra writes its .hydra/ and log into that folder
        from scaletrain.lease import Lease

        Lease(Path(folder)).check_free()
    if not multirun and cfg.train.resume == "none":
        try:
            records.check_run_dir_free(folder, cfg.train.overwrite)
        except OSError as err:  # the folder exists but cannot be listed or read
            raise ConfigError(f"{key}={folder}: cannot check the folder ({err.strerror}: {err.filename})") from None


def error_line(err: Exception, overrides: list[str]) -> str | None:
    """The one line `preflight` ends with for `err`, raised while checking `overrides`: `<kind> error: <message>` for
    bad input (Hydra's or OmegaConf's composition errors, explained; a BadInput), None for a bug (its traceback)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, HydraException | OmegaConfBaseException):
        return f"config error: {_explain(err, overrides)}"
    kind = _bad_input_kind(err)
    return None if kind is None else f"{kind} error: {err}"


def preflight(overrides: list[str], multirun: bool, will_run: bool = True) -> None:
    """Compose and type-check every job of the command before Hydra starts any; exit 2 with one clear
    message (naming the key or option, and the nearest valid one) on the first that fails. A command that
    will run (not `--cfg`) also has its output folder checked and, for a single run, `train.resume=PATH`
    (a sweep's jobs check their own in `check_job`: they may run on other machines)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        try:
            jobs, swept = _jobs(overrides, multirun)
            configs = []
            for job in jobs:
                try:
                    configs.append(load_config(compose(config_name="config", overrides=job)))
                except (HydraException, OmegaConfBaseException) as err:
                    raise ConfigError(_explain(err, job)) from err
            if will_run:
                _check_output_dir(jobs[0], overrides, multirun, configs[0])
                if not multirun and configs[0].train.resume not in RESUME_KEYWORDS:
                    from scaletrain.checkpoint import check_resumable

                    check_resumable(configs[0].train.resume, Path.cwd(), to_dict(configs[0]))  # a PATH: no run dir
                if not multirun and not configs[0].train.dry_run:  # sweep jobs check theirs where they run (Trainer)
                    from scaletrain.sizing import check_resources

                    check_resources(configs[0], warn=False)  # memory, before Hydra creates the run folder
        except Exception as err:
            line = error_line(err, overrides)
            if line is None:
                raise
            print(line, file=sys.stderr)
            raise SystemExit(2) from None
    if swept:
        os.environ[SWEPT_KEYS_ENV] = "|".join(swept)


INFO_CHOICES = ["all", "config", "defaults", "defaults-tree", "plugins", "searchpath"]


def hydra_args_parser() -> argparse.ArgumentParser:
    """The command line as `hydra.main` reads it: Hydra's own flags, declared as Hydra 1.3 declares them (same
    names, order, kinds), so that cli() splits flags from overrides exactly as Hydra will. Hydra keeps its parser
    private; tests/test_compose.py compares this one with it, so a flag a later Hydra adds is noticed."""
    parser = argparse.ArgumentParser(add_help=False, description="Hydra")
    parser.add_argument("--help", "-h", action="store_true", help="Application's help")
    parser.add_argument("--hydra-help", action="store_true", help="Hydra's help")
    parser.add_argument("--version", action="version", version=f"Hydra {hydra.__version__}", help="Hydra's version")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--cfg", "-c", choices=["job", "hydra", "all"], help="Show config instead of running")
    parser.add_argument("--resolve", action="store_true", help="With --cfg: resolve interpolations")
    parser.add_argument("--package", "-p", help="Config package to show")
    parser.add_argument("--run", "-r", action="store_true", help="Run a job")
    parser.add_argument("--multirun", "-m", action="store_true", help="Run multiple jobs (a sweep)")
    parser.add_argument("--shell-completion", "-sc", action="store_true", help="Install or uninstall shell completion")
    parser.add_argument("--config-path", "-cp", help="Overrides the config_path of hydra.main()")
    parser.add_argument("--config-name", "-cn", help="Overrides the config_name of hydra.main()")
    parser.add_argument("--config-dir", "-cd", help="Adds a config dir to the search path")
    parser.add_argument("--experimental-rerun", help="Rerun a job from a previous config pickle")
    parser.add_argument("--info", "-i", const="all", nargs="?", choices=INFO_CHOICES, help="Print Hydra information")
    return parser


def interrupted_line(err: KeyboardInterrupt, run_dir: Path | None) -> str:
    """The one line a Ctrl-C that reached the command ends with: which one (the first one during start-up or data
    preparation, a second one during training: distributed.Preemption), and the state the run folder is left in."""
    why = str(err) or "Ctrl-C"
    if run_dir is None:
        return STARTING_UP.replace("Ctrl-C", why)
    try:
        status = records.read_status(run_dir)
        saved = records.list_checkpoints(run_dir / records.CKPT_DIR)
    except (OSError, ValueError) as read_err:
        return f"interrupted ({why}): run folder {run_dir}, its records cannot be read ({read_err})"
    state = f"status {status.state} at step {status.step}" if status else "the run had not started (no status)"
    resume = f"last checkpoint {saved[-1].name} (train.resume=auto continues from it)" if saved else "no checkpoint"
    return f"interrupted ({why}): run folder {run_dir}, {state}; {resume}"


_run_dir: Path | None = None  # the job's run folder once Hydra made it (main)


def cli() -> None:
    """The console script (`scaletrain-run`): preflight, then Hydra. Hydra's own flags that print help,
    install shell completion or use another config skip the preflight. A Ctrl-C that reaches here (during
    start-up or data preparation, or a second one during training) ends in one line and exit code 130."""
    try:
        args, _ = hydra_args_parser().parse_known_args()
        own_config = args.config_path or args.config_name or args.config_dir or args.experimental_rerun
        if not (args.help or args.hydra_help or args.shell_completion or args.info or own_config):
            preflight(args.overrides, args.multirun, will_run=args.cfg is None)
        main()
    except KeyboardInterrupt as err:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a further Ctrl-C would only interrupt the line
        _stop_interrupted(interrupted_line(err, _run_dir))


if __name__ == "__main__":
    cli()
