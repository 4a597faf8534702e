"""Golden explain reports of the zoo: tests/golden/<family>.txt.

Each file is a short header (what was checked and counted) and the explain table of the
family's compiled training step. test_zoo.py compares the file with what the run gives;
with ``MST_FX_UPDATE_GOLDEN=1`` it writes the files instead, so a change in coverage is a
reviewable diff:

    MST_FX_UPDATE_GOLDEN=1 pytest -q -p no:cacheprovider tests/zoo
    python tests/zoo/readme_table.py          # then docs/models.md's table from the files
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
UPDATE = os.environ.get("MST_FX_UPDATE_GOLDEN") == "1"


def render(header: dict[str, str], report: str) -> str:
    lines = [f"# {key}: {value}" for key, value in header.items()]
    return "\n".join(lines + [report]) + "\n"


def parse(text: str) -> tuple[dict[str, str], str]:
    """(header, report) of a golden file's text."""
    header, rest = {}, []
    for line in text.splitlines():
        if line.startswith("# ") and ": " in line and not rest:
            key, value = line[2:].split(": ", 1)
            header[key] = value
        else:
            rest.append(line)
    return header, "\n".join(rest)


def check(name: str, text: str) -> None:
    """Compare ``text`` with tests/golden/<name>.txt (or write it, with the switch)."""
    path = GOLDEN_DIR / f"{name}.txt"
    if UPDATE:
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing; write it with MST_FX_UPDATE_GOLDEN=1"
    want = path.read_text()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                            f"golden/{name}.txt", "this run"))
        raise AssertionError(f"the report of {name} changed (MST_FX_UPDATE_GOLDEN=1 accepts it):\n{diff}")


def load_all() -> dict[str, tuple[dict[str, str], str]]:
    return {p.stem: parse(p.read_text()) for p in sorted(GOLDEN_DIR.glob("*.txt"))}
