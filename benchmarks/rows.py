"""Shared by the whole-model benchmarks: run one table row in its own process (so an OOM
is recorded and the sweep goes on) and write the rows as CSV."""

from __future__ import annotations

import csv
import json
import subprocess


def run_row(cmd: list[str], failed: dict, note: str) -> dict:
    """The row the child printed as ``RESULT {json}``, else ``failed`` with ``note`` set to
    "OOM" or the child's last error line."""
    rows, error = run_rows(cmd)
    return rows[-1] if rows else {**failed, note: error}


def run_rows(cmd: list[str]) -> tuple[list[dict], str | None]:
    """Every row the child printed as ``RESULT {json}``, and None if it exited cleanly, else
    "OOM" or its last error line."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0:
        return rows, None
    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return rows, "OOM" if "OutOfMemory" in proc.stderr else err[:200]


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
