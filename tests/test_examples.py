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


def test_prefetch_notebook_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "prefetch_notebook.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: prefetched loads match the trained model" in result.stdout
    assert "aload after await handle: 0 requests" in result.stdout
    assert "100%" in result.stderr  # the progress bar
