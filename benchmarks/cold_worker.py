"""One run of the ``cold`` scenario (``cold.py``): a fresh process that imports DCP, then a
loader, then loads the same checkpoint several times, timing each step.

``python cold_worker.py JOB.json`` writes ``JOB["result"]``:

- ``import_dcp_s``: ``import torch.distributed.checkpoint``, the first thing the process does;
- ``import_loader_s``: then the loader's import (``import aiodcp``, ``import
  s3torchconnector.dcp``), after ``worker.py``'s own imports (untimed, as in ``worker.py``;
  DCP has already imported all of them but ``statistics``);
- ``build_state_s``: the destination state dict, built as ``worker.py`` builds it (zeros,
  every page touched);
- then ``JOB["gap_s"]`` of sleep (default 0): other work the caller does before its first load
  that leaves the GIL free;
- ``loads_s``: each load, timed as ``worker.py`` times one (reader construction to reader
  close; ``await aiodcp.load_checkpoint`` for ``aiodcp_async``, all loads on one event loop),
  the state dict zeroed (untimed) between loads; ``cpu_s``: the process's CPU time (every
  thread) in each load, which other processes on a busy machine disturb much less than the
  wall time; ``gc_s``: the garbage collector's time in each load (every thread);
- ``ok``: the state dict after the last load compared bit for bit with the saved tensors;
- ``s3_stack``: which of botocore, aiobotocore and aiohttp the process imported by its end
  (none for aiodcp in the plain case, whatever its credential source).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# The imports each loader's process pays for (as worker.PREPARE, which cannot be used before the
# timed imports: worker.py imports more than DCP).
PREPARE_MODULES = {
    "aiodcp": "aiodcp",
    "s3tc": "s3torchconnector.dcp",
    "fsspec": "s3fs",
    "boto3": "boto3",
    "local": None,
    "fetch": "aiohttp",
}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    t0 = time.perf_counter()
    import torch.distributed.checkpoint  # noqa: F401

    import_dcp_s = time.perf_counter() - t0
    # worker.py's own imports (all but `statistics` already imported by DCP), untimed, as
    # worker.py does them before importing the loader
    sys.path.insert(0, str(HERE))
    import asyncio

    import worker

    module = PREPARE_MODULES[job["loader"].split("_")[0]]
    t0 = time.perf_counter()
    if module is not None:
        __import__(module)
    import_loader_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    state = worker.build_state(job)
    build_state_s = time.perf_counter() - t0
    time.sleep(job.get("gap_s", 0.0))  # the caller's other work before its first load, if any
    fn = worker.LOADERS[job["loader"]]
    loads: list[float] = []
    cpus: list[float] = []
    gcs: list[float] = []

    def prepare(i: int) -> worker._GcTimer:
        if i:
            for tensor in state.values():
                tensor.zero_()
        return worker._GcTimer()

    if asyncio.iscoroutinefunction(fn):

        async def run_all() -> None:
            for i in range(job["loads"]):
                with prepare(i) as timer:
                    t, c = time.perf_counter(), time.process_time()
                    await fn(state, job)
                    loads.append(time.perf_counter() - t)
                    cpus.append(time.process_time() - c)
                gcs.append(timer.total_s)

        asyncio.run(run_all())
    else:
        for i in range(job["loads"]):
            with prepare(i) as timer:
                t, c = time.perf_counter(), time.process_time()
                fn(state, job)
                loads.append(time.perf_counter() - t)
                cpus.append(time.process_time() - c)
            gcs.append(timer.total_s)
    bad = worker.check_state(state, job)
    result: dict[str, Any] = {
        "loader": job["loader"],
        "import_dcp_s": import_dcp_s,
        "import_loader_s": import_loader_s,
        "build_state_s": build_state_s,
        "loads_s": loads,
        "cpu_s": cpus,
        "gc_s": gcs,
        "ok": not bad,
        "mismatched": bad[:10],
        "s3_stack": sorted(m for m in ("aiobotocore", "aiohttp", "botocore") if m in sys.modules),
    }
    Path(job["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
