"""Test setup: which copy of the plugin is tested, and scaletrain told to load it in the tests that compose a
config (`plugin_env`), as the installed entry point would.

An installed copy (a wheel, as .ci/wheel.sh installs it, or `pip install -e`) is the one tested; without one, the
package in this folder is put on sys.path. The header of the pytest run names the copy in use.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

PLUGIN_ROOT = Path(__file__).resolve().parents[1]  # examples/scaletrain_lion: holds the scaletrain_lion package
if importlib.util.find_spec("scaletrain_lion") is None:
    sys.path.insert(0, str(PLUGIN_ROOT))


def pytest_report_header() -> str:
    spec = importlib.util.find_spec("scaletrain_lion")
    assert spec is not None and spec.origin is not None
    return f"scaletrain_lion under test: {Path(spec.origin).parent}"


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """scaletrain imports the modules named in SCALETRAIN_PLUGINS and Hydra searches their conf/ folders
    (scaletrain/plugins.py): the same two effects as the `scaletrain.plugins` entry point of an installed copy
    (which names the same module, so an installed copy is not loaded twice)."""
    monkeypatch.setenv("SCALETRAIN_PLUGINS", "scaletrain_lion")
