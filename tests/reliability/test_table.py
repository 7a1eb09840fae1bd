"""The README's reliability table is the suite's: one row per fault-marked case of tests/reliability, in the
suite's order, none failed. Regenerate it with `python -m pytest tests/reliability --reliability-table=README.md`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from ..conftest import REPO
from .table import END, START, render, replace_section


def _readme_rows() -> list[tuple[str, str, str]]:
    section = (REPO / "README.md").read_text().split(START, 1)[1].split(END, 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Fault")]
    return [tuple(c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)[1:4]) for row in rows]  # type: ignore[misc]


def test_the_readme_table_lists_every_fault_case_of_the_suite_and_none_failed(tmp_path):
    rows_file = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "tests/reliability"]
        + [f"--reliability-rows={rows_file}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    suite = [(r["what"], r["outcome"]) for r in json.loads(rows_file.read_text())]
    readme = _readme_rows()
    assert [(what, outcome) for what, outcome, _ in readme] == suite, (
        "README's reliability table is out of date: python -m pytest tests/reliability --reliability-table=README.md"
    )
    assert all(result == "passed" or result.startswith("skipped: ") for _, _, result in readme)


def test_the_table_is_written_between_its_markers_and_escapes_pipes():
    rows = [{"what": "a|b", "outcome": "ok", "result": "passed"}]
    text = replace_section(f"intro\n{START}\nold\n{END}\nrest\n", render(rows, "today"), REPO / "README.md")
    assert text.startswith("intro\n" + START) and text.endswith(END + "\nrest\n")
    assert "| a\\|b | ok | passed |" in text and "old" not in text and "1 of 1 passed" in text
