"""Shared by the orchestrator and the per-run worker: checkpoint shapes, data, RSS sampling.

Every tensor's content is a pure function of its name (a seeded generator), so a worker can
check what it loaded against what was saved by regenerating it, one tensor at a time, after the
timed load, without the saving process or a second copy of the checkpoint in memory.
"""

from __future__ import annotations

import hashlib
import os
import resource
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
    """Peak RSS during a block: ru_maxrss when it rose, else a 2 ms sampling thread."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.baseline = rss_bytes()
        self._maxrss_before = maxrss_bytes()
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        after = maxrss_bytes()
        if after > self._maxrss_before:
            self.peak = max(self.peak, after)

    @property
    def above_baseline(self) -> int:
        return max(0, self.peak - self.baseline)
