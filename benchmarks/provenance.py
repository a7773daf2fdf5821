"""Where a benchmark figure comes from: the command, the revisions, the machine's load.

Every script here that writes results (``bench.py`` and its ``cold`` scenario, ``shared.py``,
``headline.py``) records ``collect()`` in its JSON and prints ``line()`` at the head of its
markdown, so a figure copied into the docs carries what is needed to produce it again:

- ``command``: the command line as run (the interpreter, then the script path relative to the
  checkout, then the arguments), quoted for a shell;
- ``harness``: ``git describe --always --dirty`` of the checkout the script runs from (the
  benchmark code), with ``+ uncommitted benchmarks/ changes`` when its files differ from that
  commit (``--dirty`` looks at the whole tree; this looks at ``benchmarks/`` alone);
- ``aiodcp``: the aiodcp code measured, said by the script (``bench.aiodcp_source``: this
  checkout's ``src/`` at a commit, or a ``git archive`` of a revision);
- ``uptime``: the load averages (1, 5, 15 min) when the run started, and the machine's uptime.

Nothing here runs on the timed path; it reads git and ``/proc``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def harness_revision() -> str:
    """``git describe`` of this checkout, and whether ``benchmarks/`` differs from it."""
    described = _git("describe", "--always", "--dirty") or "unknown (not a git checkout)"
    changed = _git("status", "--porcelain", "--", str(HERE.relative_to(REPO)))
    return described + (" + uncommitted benchmarks/ changes" if changed else "")


def command(argv: list[str] | None = None) -> str:
    """The command line that ran this process, as a shell would take it from the checkout."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        script = Path(argv[0]).resolve()
        if script.is_relative_to(REPO):
            argv[0] = str(script.relative_to(REPO))
    python = Path(sys.executable)
    if python.is_relative_to(REPO):
        python = python.relative_to(REPO)
    return shlex.join([str(python), *argv])


def uptime() -> str:
    """``uptime``'s figures: load averages over 1, 5 and 15 minutes, and the time since boot."""
    one, five, fifteen = os.getloadavg()
    up = ""
    try:
        with open("/proc/uptime") as f:
            seconds = float(f.read().split()[0])
        up = f"up {seconds / 3600:.1f} h, "
    except OSError:
        pass
    return f"{up}load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def collect(argv: list[str] | None = None) -> dict[str, Any]:
    """The provenance of a run that starts now."""
    return {
        "command": command(argv),
        "harness": harness_revision(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "uptime_at_start": uptime(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def line(meta: dict[str, Any]) -> str:
    """One markdown line naming the command, the revisions and the load (from ``collect()``'s
    keys in ``meta``, with ``aiodcp`` and ``aiodcp_baseline`` where the script set them)."""
    if "command" not in meta:
        return "Provenance: not recorded (a run from before provenance.py)."
    parts = [
        f"Command: `{meta['command']}`",
        f"harness {meta['harness']}",
        f"aiodcp {meta.get('aiodcp', 'n/a')}",
    ]
    if meta.get("aiodcp_baseline"):
        parts.append(f"baseline aiodcp {meta['aiodcp_baseline']}")
    parts.append(f"started {meta['started']}, {meta['uptime_at_start']}")
    return "; ".join(parts) + "."
