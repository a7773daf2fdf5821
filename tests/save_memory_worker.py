"""One save in a fresh process for tests/test_save_memory.py: peak RSS above the state dict.

``python save_memory_worker.py ENDPOINT URL KIND BUDGET``: builds a state dict of ``KIND``
(``staged``: 4096 tensors of 32 KiB, every one torch.save'd into a buffer; ``direct``: 256 MiB
of 8 MiB tensors sent from their own memory), saves a tiny checkpoint first (imports, the I/O
loop, connections), resets the peak RSS (``/proc/self/clear_refs``), saves with
``memory_budget=BUDGET`` and prints one JSON line: the peak RSS above the RSS before the save,
and the save's statistics.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp

import aiodcp


def vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    endpoint, url, kind, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    warnings.simplefilter("ignore")
    g = torch.Generator().manual_seed(3)
    if kind == "staged":
        state = {f"t{i:05d}": torch.randn(8192, generator=g) for i in range(4096)}
    else:
        state = {f"w{i:03d}": torch.randn(2 * 1024 * 1024, generator=g) for i in range(32)}
    options = {
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "addressing_style": "path",
        "memory_budget": budget,
        "part_size": 5 * 1024 * 1024,
    }
    with aiodcp.S3StorageWriter(url + "-warm", **options) as writer:
        dcp.save({"x": torch.zeros(300_000)}, storage_writer=writer)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
        before = vm("VmRSS")
        writer.reset(url)
        dcp.save(state, storage_writer=writer)
        peak = vm("VmHWM")
        assert writer.stats is not None
        stats = dataclasses.asdict(writer.stats)
    print(json.dumps({"rss_above": peak - before, "stats": stats}))  # noqa: T201


if __name__ == "__main__":
    main()
