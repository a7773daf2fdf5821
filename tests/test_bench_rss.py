"""benchmarks/common.PeakRSS: the peak it reports is the measured process's real peak, and
nothing samples inside that process (no thread of its own, so its CPU seconds are the measured
code's alone). Each case runs in a child process, so the test process's own peak is untouched.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MIB = 1024 * 1024

# Allocates 200 MiB (every page written: ``bytes * n`` fills it) inside the block and frees it
# before the block ends, so only a measured peak, not the RSS at the end, can show it.
CHILD = """
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
from common import PeakRSS, rss_bytes

def tasks():
    return len(os.listdir("/proc/self/task"))

method, hold_s = sys.argv[2], float(sys.argv[3])
threads_before, tasks_before = threading.active_count(), tasks()
rss_before = rss_bytes()
with PeakRSS(method=method) as rss:
    threads_inside, tasks_inside = threading.active_count(), tasks()
    blob = b"\\x01" * (200 * 1024 * 1024)
    time.sleep(hold_s)
    del blob
print(json.dumps({
    "method": rss.method, "baseline": rss.baseline, "peak": rss.peak,
    "above": rss.above_baseline, "rss_before": rss_before, "rss_after": rss_bytes(),
    "threads": [threads_before, threads_inside], "tasks": [tasks_before, tasks_inside],
}))
"""


def measure(method: str, hold_s: float = 0.0) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(BENCHMARKS), method, str(hold_s)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def assert_real_peak(result: dict[str, Any]) -> None:
    above, baseline = result["above"], result["baseline"]
    assert above >= 190 * MIB, f"a 200 MiB peak reported as {above / MIB:.1f} MiB"
    assert above <= 230 * MIB, f"a 200 MiB peak reported as {above / MIB:.1f} MiB"
    rss_before, rss_after = result["rss_before"], result["rss_after"]
    assert abs(baseline - rss_before) < 16 * MIB  # the baseline is the RSS before the block
    assert rss_after < baseline + 100 * MIB  # the 200 MiB were freed: only a peak can show them


def test_vmhwm_reports_a_freed_peak_with_no_sampler_in_the_process() -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs (Linux >= 4.0): PeakRSS falls back to a sampler")
    result = measure("auto")
    assert result["method"] == "VmHWM"  # "auto" takes the kernel's mark where it can
    assert_real_peak(result)
    before, inside = result["tasks"]
    assert inside == before, "PeakRSS started a thread in the measured process"
    assert result["threads"][0] == result["threads"][1]


def test_the_sampler_fallback_samples_from_another_process() -> None:
    # held 0.3 s: a 2 ms sampler on a busy machine must see it; VmHWM needs no hold
    result = measure("sampler", hold_s=0.3)
    assert result["method"] == "sampler"
    assert_real_peak(result)
    before, inside = result["tasks"]
    assert inside == before, "the sampler runs as a thread of the measured process"


def test_an_unknown_method_is_refused() -> None:
    spec = importlib.util.spec_from_file_location("bench_common", BENCHMARKS / "common.py")
    assert spec is not None and spec.loader is not None
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    with pytest.raises(ValueError, match="'auto', 'VmHWM' or 'sampler'"):
        common.PeakRSS(method="ru_maxrss")
