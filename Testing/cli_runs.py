"""The command line as a subprocess, for the tests that run it on cohorts (test_cluster, test_cohort_integrity)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "BraTSEnsembleLib.cli", *map(str, args)]


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def events(stdout: str) -> list[dict]:
    """The JSON-lines progress events of a run's stdout."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
