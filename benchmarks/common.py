"""Shared by the orchestrator and the per-run worker: checkpoint shapes, data, peak RSS.

Every tensor's content is a pure function of its name (a seeded generator), so a worker can
check what it loaded against what was saved by regenerating it, one tensor at a time, after the
timed load, without the saving process or a second copy of the checkpoint in memory.
"""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}
MIB = 1024 * 1024

# One entry per tensor: [name, shape, dtype name].
TensorSpec = list[Any]


def layer_specs(size_mib: float, *, dist: bool = False) -> list[TensorSpec]:
    """A transformer-like state dict of about ``size_mib`` MiB (d_model 1024, fp32 blocks).

    Per layer: wqkv 12 MiB, wo 4 MiB, w1 and w2 16 MiB each, plus small vectors (norms, bias);
    a bf16 embedding of 16 MiB and an int64 step. With ``dist`` only 2-D tensors whose dims
    divide by 4 and 2 (they are sharded by 4 ranks on dim 0 and 2 ranks on dim 1).
    """
    d = 1024
    specs: list[TensorSpec] = [["embed.weight", [8192, d], "bfloat16"]]
    per_layer = (3 + 1 + 4 + 4) * d * d * 4 / MIB
    layers = max(1, round((size_mib - 16) / per_layer))
    for i in range(layers):
        p = f"layers.{i:02d}."
        specs += [
            [p + "attn.wqkv", [3 * d, d], "float32"],
            [p + "attn.wo", [d, d], "float32"],
            [p + "mlp.w1", [4 * d, d], "float32"],
            [p + "mlp.w2", [d, 4 * d], "float32"],
        ]
        if not dist:
            specs += [
                [p + "norm1.weight", [d], "float32"],
                [p + "norm2.weight", [d], "float32"],
                [p + "mlp.b1", [4 * d], "float32"],
            ]
    if not dist:
        specs.append(["step", [], "int64"])
    return specs


def small_specs(count: int, size_kib: int = 16) -> list[TensorSpec]:
    """``count`` float32 tensors of ``size_kib`` KiB each."""
    return [[f"p.{i:06d}", [size_kib * 256], "float32"] for i in range(count)]


def spec_bytes(specs: list[TensorSpec]) -> int:
    total = 0
    for _, shape, dtype in specs:
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty((), dtype=DTYPES[dtype]).element_size()
    return total


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def make_tensor(name: str, shape: list[int], dtype: str) -> torch.Tensor:
    """The saved content of tensor ``name`` (deterministic)."""
    g = torch.Generator().manual_seed(_seed(name))
    if dtype == "int64":
        return torch.randint(-(2**40), 2**40, shape, generator=g, dtype=torch.int64)
    t = torch.empty(shape, dtype=torch.float32)
    t.uniform_(-1.0, 1.0, generator=g)
    return t.to(DTYPES[dtype])


def zeros_like_spec(shape: list[int], dtype: str) -> torch.Tensor:
    t = torch.empty(shape, dtype=DTYPES[dtype])
    t.zero_()  # touch every page now, so the RSS baseline includes the state dict
    return t


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def status_bytes(*fields: str) -> list[int]:
    """``/proc/self/status`` fields given in kB (``VmRSS``, ``VmHWM``), in bytes, in order."""
    found: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in fields:
                found[name] = int(value.split()[0]) * 1024
    return [found[name] for name in fields]


def reset_peak_rss() -> bool:
    """Make the kernel's peak RSS of this process (``VmHWM``) its current RSS.

    Writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) resets only the high-water mark:
    nothing is sampled, no page table is walked. False where the kernel refuses it (not Linux,
    an older kernel, a sandboxed ``/proc``), or accepts the write and keeps the old mark."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss, hwm = status_bytes("VmRSS", "VmHWM")
    except (OSError, KeyError, ValueError):
        return False
    return hwm - rss < MIB  # else the old mark stayed (a quiet process moves by a few pages)


def reclaimed_pages() -> int:
    """Pages the kernel has reclaimed machine-wide (``/proc/vmstat`` ``pgsteal_anon`` +
    ``pgsteal_file``; 0 where unreadable). The kernel raises ``VmHWM`` to the RSS before it
    unmaps pages (``munmap``, ``brk``, ``MADV_DONTNEED``, exit), but not when reclaim takes a
    process's pages under memory pressure: a rise of this counter during a block says its
    ``VmHWM`` peak may read low. (Nor is ``MADV_PAGEOUT``, a reclaim asked for, counted here.)"""
    try:
        with open("/proc/vmstat") as f:
            return sum(
                int(line.split()[1])
                for line in f
                if line.startswith(("pgsteal_anon ", "pgsteal_file "))
            )
    except OSError:
        return 0


class PeakRSS:
    """Peak RSS during a block, measured with nothing running in the measured process.

    ``method="VmHWM"`` (chosen by ``"auto"`` where the kernel allows it): the kernel's own
    high-water mark, reset to the current RSS on entry (``reset_peak_rss``) and read on exit.
    Exact (every page the process held at any instant, no sampling interval to miss a short
    peak) and free: no thread, no process, two ``/proc`` accesses outside the measured code.
    ``machine_reclaimed_pages`` says whether reclaim ran meanwhile (the one way it reads low).

    ``method="sampler"`` (the fallback): a small process of its own samples this one's
    ``/proc/<pid>/statm`` every ``interval_s``, plus ``ru_maxrss`` when that rose. Its CPU is
    not in this process's ``RUSAGE_SELF``/``process_time``.

    Either way the measured process's CPU seconds are its own code's. (The load benchmarks
    used to sample from a thread of the measured process: ~0.03 CPU-s per second of wall time
    here, more while the GIL is contended, counted against the loader, and GIL hand-offs in
    the middle of its work; benchmarks/README.md, "How peak RSS is measured".)"""

    def __init__(self, interval_s: float = 0.002, *, method: str = "auto") -> None:
        if method not in ("auto", "VmHWM", "sampler"):
            raise ValueError(f"PeakRSS method {method!r}: use 'auto', 'VmHWM' or 'sampler'")
        self.interval_s = interval_s
        self.method = method
        self.baseline = 0
        self.peak = 0
        self.machine_reclaimed_pages = 0
        self._sampler: subprocess.Popen[str] | None = None

    def _choose_method(self) -> str:
        """``"VmHWM"`` once the mark is reset (the measurement starts there), else ``"sampler"``
        (unless ``"VmHWM"`` was asked for)."""
        if self.method == "sampler":
            return "sampler"
        if reset_peak_rss():
            return "VmHWM"
        if self.method == "VmHWM":
            raise RuntimeError(
                "/proc/self/clear_refs did not reset VmHWM (Linux >= 4.0 needed): "
                "use PeakRSS(method='sampler')"
            )
        return "sampler"

    def __enter__(self) -> PeakRSS:
        self.method = self._choose_method()
        if self.method == "sampler":
            self._sampler = _start_sampler(self.interval_s)
        self._reclaimed_before = reclaimed_pages()
        if self.method == "VmHWM":
            self.baseline = status_bytes("VmRSS")[0]
        else:  # after starting the sampler: Popen's memory is not counted
            self.baseline = rss_bytes()
            self._maxrss_before = maxrss_bytes()
        self.peak = self.baseline
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method == "VmHWM":
            self.peak = max(self.baseline, status_bytes("VmHWM")[0])
        else:
            assert self._sampler is not None
            out, _ = self._sampler.communicate("", timeout=60)  # stdin closed: it stops
            self.peak = max(self.peak, int(out.split()[-1]), rss_bytes())
            after = maxrss_bytes()
            if after > self._maxrss_before:
                self.peak = max(self.peak, after)
        self.machine_reclaimed_pages = reclaimed_pages() - self._reclaimed_before

    @property
    def above_baseline(self) -> int:
        return max(0, self.peak - self.baseline)


def _start_sampler(interval_s: float) -> subprocess.Popen[str]:
    sampler = subprocess.Popen(
        [sys.executable, "-c", _SAMPLER, str(os.getpid()), str(interval_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sampler.stdout is not None
    if sampler.stdout.readline().strip() != "READY":  # sampling from now on
        raise RuntimeError("the RSS sampler did not start")
    return sampler


_SAMPLER = """
import os, select, sys
pid, interval = int(sys.argv[1]), float(sys.argv[2])
page, peak, stdin = os.sysconf("SC_PAGE_SIZE"), 0, sys.stdin.fileno()
with open(f"/proc/{pid}/statm", "rb", buffering=0) as statm:
    print("READY", flush=True)
    while True:
        statm.seek(0)
        peak = max(peak, int(statm.read().split()[1]) * page)
        if select.select([stdin], [], [], interval)[0]:  # stdin closed: stop
            break
print(peak, flush=True)
"""
"""The outside sampler (``PeakRSS(method="sampler")``): samples ``/proc/<pid>/statm`` every
``interval`` seconds until its stdin closes, then prints the peak RSS in bytes."""
