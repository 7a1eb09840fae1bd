"""Plugins: user packages that add components (optimizers, attention, MLPs) and their configs to scaletrain.

A plugin is an importable Python package named in one of two ways:
- installed with an entry point in the `scaletrain.plugins` group (its pyproject.toml:
  `[project.entry-points."scaletrain.plugins"] lion = "scaletrain_lion"`), or
- listed in the `SCALETRAIN_PLUGINS` environment variable (comma-separated module names on PYTHONPATH), for code
  that is not installed.
Importing it defines its config schemas (subclasses of the component bases in config.py: an optimizer schema
subclasses `OptimConfig`, an attention schema `AttentionConfig`, an MLP schema `MLPConfig`), which
`config.register_configs` stores in Hydra's ConfigStore, exactly as the built-ins are; a `conf/` folder inside the
package joins Hydra's search path (its `optim/lion.yaml` makes `optim=lion` an option). Built-in components go
through the same door: their schemas name their `_target_` the same way (config.py), only their import is not
deferred.

This module never imports torch; the search-path side (`plugin_config_dirs`) does not even import the plugins.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from scaletrain.config import BadInput

ENTRY_POINT_GROUP = "scaletrain.plugins"
PLUGINS_ENV = "SCALETRAIN_PLUGINS"


class PluginError(BadInput, ImportError):
    """A plugin named by an entry point or SCALETRAIN_PLUGINS could not be imported; the message says which."""

    kind = "plugin"


def plugin_modules() -> dict[str, str]:
    """Module name -> where it was named (`entry point <name>` or `$SCALETRAIN_PLUGINS`), in a stable order."""
    found: dict[str, str] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        found.setdefault(ep.value.split(":")[0], f"entry point {ep.name!r} of group {ENTRY_POINT_GROUP}")
    for name in os.environ.get(PLUGINS_ENV, "").split(","):
        if name.strip():
            found.setdefault(name.strip(), f"${PLUGINS_ENV}")
    return found


_LOADED: dict[str, ModuleType] = {}


def load_plugins() -> list[ModuleType]:
    """Import every plugin once (their schemas register themselves by subclassing); an import failure is one
    PluginError naming the module and where it was named."""
    for name, origin in plugin_modules().items():
        if name in _LOADED:
            continue
        try:
            _LOADED[name] = importlib.import_module(name)
        except Exception as err:
            raise PluginError(f"plugin {name!r} ({origin}) failed to import: {type(err).__name__}: {err}") from err
    return list(_LOADED.values())


def plugin_config_dirs() -> list[str]:
    """`file://` search-path entries: the `conf/` folder of each plugin package that has one (found without
    importing the plugin, so Hydra's start stays cheap)."""
    dirs = []
    for name in plugin_modules():
        spec = importlib.util.find_spec(name.split(".")[0])  # the top-level package: importing nothing
        if spec is None or not spec.submodule_search_locations:
            continue
        base = Path(next(iter(spec.submodule_search_locations)))
        for part in name.split(".")[1:]:
            base = base / part
        if (base / "conf").is_dir():
            dirs.append(f"file://{(base / 'conf').resolve()}")
    return dirs
