"""Every committed study's verdicts follow from its committed per-seed results.

A study folder under experiments/ that holds runs.json (written by `python -m scaletrain.report ... --out`) has
its report.md rebuilt from runs.json + curves.csv with the options recorded in report.md; each verdict line must
be what the numbers give (tests/test_report.py checks that a doctored report or doctored data fails this).
"""

from __future__ import annotations

import pytest

from scaletrain import report as rp

from .conftest import REPO

STUDIES = sorted(p.parent for p in (REPO / "experiments").glob("*/runs.json"))


@pytest.mark.parametrize("folder", STUDIES, ids=[p.name for p in STUDIES])
def test_committed_verdicts_match_their_data(folder):
    assert rp.check_report(folder) == []
