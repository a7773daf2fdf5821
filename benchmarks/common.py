"""Shared by the orchestrator and the per-run worker: checkpoint shapes, data, RSS sampling.

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
import threading
import time
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


class PeakRSS:
    """Peak RSS during a block: ru_maxrss when it rose, else sampling every 2 ms.

    ``outside=False``: a thread of this process samples (what the load benchmarks use).
    ``outside=True``: a small process of its own samples this one's ``/proc/<pid>/statm``, so
    the sampling costs this process nothing: its CPU seconds (``RUSAGE_SELF``) are the measured
    code's alone. An in-process sampler waking every 2 ms costs ~0.03 CPU-s per second of wall
    time here (more while the GIL is contended), which would be counted against whatever is
    measured, and more against a slower one (save_worker.py uses ``outside=True``)."""

    def __init__(self, interval_s: float = 0.002, *, outside: bool = False) -> None:
        self.interval_s = interval_s
        self.outside = outside
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sampler: subprocess.Popen[str] | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        if self.outside:
            self._sampler = subprocess.Popen(
                [sys.executable, "-c", _SAMPLER, str(os.getpid()), str(self.interval_s)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert self._sampler.stdout is not None
            if self._sampler.stdout.readline().strip() != "READY":  # sampling from now on
                raise RuntimeError("the RSS sampler did not start")
        self.baseline = rss_bytes()  # (after starting the sampler: Popen's memory is not counted)
        self._maxrss_before = maxrss_bytes()
        self.peak = self.baseline
        if not self.outside:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sampler is not None:
            out, _ = self._sampler.communicate("", timeout=60)  # stdin closed: it stops
            self.peak = max(self.peak, int(out.split()[-1]))
        else:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        after = maxrss_bytes()
        if after > self._maxrss_before:
            self.peak = max(self.peak, after)

    @property
    def above_baseline(self) -> int:
        return max(0, self.peak - self.baseline)


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
"""The outside sampler (``PeakRSS(outside=True)``): samples ``/proc/<pid>/statm`` every
``interval`` seconds until its stdin closes, then prints the peak RSS in bytes."""
