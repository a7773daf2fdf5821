"""The examples run end to end as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart_runs_and_checks_both_loads() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: both loads match the saved model exactly" in result.stdout
    assert "dcp.load + S3StorageReader" in result.stdout
    assert "await aiodcp.load_checkpoint" in result.stdout
