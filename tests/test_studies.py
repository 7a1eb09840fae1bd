"""Every committed study's verdicts follow from its committed per-seed results.

A study folder under experiments/ that holds runs.json (written by `python -m scaletrain.report ... --out`) has
its report.md rebuilt from runs.json + curves.csv with the options recorded in report.md; each verdict line must
be what the numbers give (tests/test_report.py checks that a doctored report or doctored data fails this).
The studies committed so far are named here, so a moved or deleted folder (or a glob that finds nothing) fails
instead of leaving nothing to check; a study added later is found by its runs.json.
"""

from __future__ import annotations

import pytest

from scaletrain import report as rp
from scaletrain.report import render

from .conftest import REPO

EXPERIMENTS = REPO / "experiments"
COMMITTED = ("001b_dense_vs_moe", "001c_dense_vs_moe_time", "002b_muon_vs_adamw", "003_reasoning_mixture")
FOUND = sorted(p.parent.name for p in EXPERIMENTS.glob("*/runs.json"))
STUDIES = sorted({*COMMITTED, *FOUND})


def test_the_committed_studies_are_all_found():
    missing = sorted(set(COMMITTED) - set(FOUND))
    assert not missing, f"committed studies without experiments/<study>/runs.json: {missing}"


@pytest.mark.parametrize("name", STUDIES)
def test_committed_verdicts_match_their_data(name):
    folder = EXPERIMENTS / name
    assert (folder / "runs.json").is_file(), f"{folder} has no runs.json to check its report against"
    assert render.verdict_lines((folder / "report.md").read_text()), f"{folder}/report.md states no verdict"
    assert rp.check_report(folder) == []
