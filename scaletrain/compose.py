"""The one front door to the config tree: where it lives, and composing it.

The tree ships inside the package (`scaletrain/conf`, Hydra's `pkg://scaletrain.conf`), so a wheel installed
anywhere has its configs; no code here or elsewhere looks for a `conf/` folder next to a clone. Every command
composes through `compose()` (run.py's preflight, study, bench, runs/eval/sample); `hydra.main` uses the same
`CONFIG_PATH`. The search path is extended, in this order, by:
- the `hydra.searchpath` key on the command line (Hydra's own, e.g. `hydra.searchpath=[file:///home/me/conf]`);
- the folders of the `SCALETRAIN_CONFIG_PATH` environment variable (`:`-separated; `file://` implied);
- the `conf` folder of every installed plugin package (`scaletrain.plugins` entry points, plugins.py).
The last two come from a Hydra SearchPathPlugin (hydra_plugins/scaletrain_searchpath.py), so they hold for
`hydra.main` and `compose()` alike, in any process (sweep jobs included).

`sweep_jobs()` is the one expansion of a `-m` sweep into its jobs (Hydra's basic sweeper's order), for run.py's
preflight and the report's pending jobs. Only public Hydra/OmegaConf API is used in scaletrain
(tests/test_compose.py checks it, and compares these stand-ins with Hydra's own code).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

if TYPE_CHECKING:
    from hydra.core.config_loader import ConfigLoader

CONFIG_MODULE = "scaletrain.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"  # hydra.main's config_path
CONFIG_NAME = "config"
CONFIG_PATH_ENV = "SCALETRAIN_CONFIG_PATH"


def user_config_dirs() -> list[str]:
    """Search-path entries from SCALETRAIN_CONFIG_PATH (folders, `:`-separated), as Hydra URLs."""
    dirs = [d for d in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if d.strip()]
    return [d if "://" in d else f"file://{os.path.abspath(os.path.expanduser(d))}" for d in dirs]


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The composed (untyped) config of `overrides`, as `scaletrain-run <overrides>` would compose it.
    Plugins are loaded and every schema registered first (config.register_configs)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from scaletrain.config import register_configs

    register_configs()
    kwargs = {"config_name": CONFIG_NAME, "overrides": list(overrides), "return_hydra_config": return_hydra_config}
    if GlobalHydra.instance().is_initialized():  # inside hydra.main (a job): its own search path is the one in use
        return hydra_compose(**kwargs)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(**kwargs)


def sweep_jobs(
    overrides: Sequence[str], recipe_grid: Mapping[str, Any] | None = None, config_loader: ConfigLoader | None = None
) -> list[list[str]]:
    """The overrides of every job of a `-m` command, in the order Hydra's basic sweeper numbers the jobs (the one
    sweep expansion: run.py's preflight and the report's pending jobs). `recipe_grid` is the recipe's
    `hydra.sweeper.params` ({key: "a,b"}): its keys come first, the command line's after them; a key given in both
    keeps the recipe's place and takes the command line's values. Each key is one axis (choice or range sweep, or a
    single value); the jobs are the cartesian product over the axes in that order, the last one varying fastest.
    Interval sweeps (for an optimizing sweeper) raise HydraException, as the basic sweeper does; a glob sweep
    (`model=glob(moe*)`) needs the `config_loader` that lists the group's options (Hydra's, once initialized)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    lines = [f"{key}={value}" for key, value in (recipe_grid or {}).items()] + list(overrides)
    axes: dict[str, list[str]] = {}  # a key seen again keeps its first position (insertion order)
    for override in OverridesParser.create(config_loader=config_loader).parse_overrides(lines):
        key = override.get_key_element()  # with its +/~/++ prefix and @package: `+a=1` and `a=2` are two axes
        if not override.is_sweep_override():
            axes[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            axes[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            kind = override.value_type.name if override.value_type else "unknown"
            raise HydraException(f"BasicSweeper does not support sweep type : {kind}")
    return [list(job) for job in itertools.product(*axes.values())]
