"""Where one fresh-process load spends its CPU, native code included: ``perf record`` around
the timed load only, summed per thread.

py-spy (``bench.py --profile``) sees Python frames, and with ``--idle`` cannot tell waiting
from working; the cost of a verified load is mostly native (the kernel's copies, awscrt's CRC
and its import's initialisation). This runs ``worker.py load JOB`` under ``perf record -g``
with sampling switched on (``--control fifo``) when the worker's timed load starts and off when
it ends, so the worker's imports, state building and checks of the result are left out, then
prints per thread its samples by what the stack holds (``recv``: receiving, ``crc64nvme``: the
checks' CRC, ``jent``: the jitter-entropy seeding of AWS-LC's random generator, which
``s2n_init`` runs inside awscrt's module initialisation) and its top leaf functions.

The jobs are those ``bench.py`` writes (``.data/jobs/<scenario>-<loader>.json``; run bench.py
once first); nginx is started as bench.py starts it. Needs ``perf`` and
``kernel.perf_event_paranoid`` <= 2 (root)::

    benchmarks/.venv-bench/bin/python benchmarks/perf_load.py \\
        full_1file-aiodcp_sync full_1file-aiodcp_sync+rec --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TAGS = ("recv", "crc64nvme", "jent", "PyInit", "futex", "page_fault", "memmove")
"""Looked for in each sample's stack, in this order: the first found names the sample."""


def child(job_path: str, control: str, ack: str) -> None:
    """In the process perf records: worker.py's load, sampling on around the timed load."""
    sys.path.insert(0, str(HERE))
    sys.argv = ["worker.py", "load", job_path]
    import worker

    loader = json.loads(Path(job_path).read_text())["loader"]
    inner = worker.LOADERS[loader]

    def tell(word: str) -> None:
        with open(control, "w") as f:
            f.write(word + "\n")
        with open(ack) as f:
            f.readline()

    if asyncio.iscoroutinefunction(inner):

        async def timed_async(state: Any, job: Any) -> Any:
            tell("enable")
            try:
                return await inner(state, job)
            finally:
                tell("disable")

        worker.LOADERS[loader] = timed_async
    else:

        def timed(state: Any, job: Any) -> Any:
            tell("enable")
            try:
                return inner(state, job)
            finally:
                tell("disable")

        worker.LOADERS[loader] = timed
    worker.main()


def summarize(script: str, top: int) -> list[str]:
    """Per thread (most samples first): samples, samples by tag, the top leaf functions."""
    per_thread: dict[str, collections.Counter[tuple[str, str]]] = collections.defaultdict(
        collections.Counter
    )
    for block in script.strip().split("\n\n"):
        lines = block.strip().splitlines()
        if len(lines) < 2:
            continue
        tid = lines[0].split()[0]
        leaf = lines[1].split(None, 1)[-1].rsplit(" (", 1)[0]
        stack = " ".join(lines[1:])
        tag = next((t for t in TAGS if t in stack), "")
        per_thread[tid][tag, leaf] += 1
    out = []
    for tid, counts in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values())):
        tags: collections.Counter[str] = collections.Counter()
        for (tag, _), n in counts.items():
            tags[tag or "other"] += n
        out.append(f"  thread {tid}: {sum(counts.values())} samples {dict(tags.most_common())}")
        out += [
            f"      {n:5d} {tag or '-':10s} {leaf}" for (tag, leaf), n in counts.most_common(top)
        ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jobs", nargs="+", help="bench.py job names, e.g. full_1file-aiodcp_sync+rec")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per job (alternated)")
    p.add_argument("--freq", type=int, default=2000, help="samples per second per thread")
    p.add_argument("--top", type=int, default=4, help="leaf functions shown per thread")
    p.add_argument("--aiodcp-src", default=str(HERE.parent / "src"), help="aiodcp's src/")
    args = p.parse_args()

    sys.path.insert(0, str(HERE))
    import bench

    data = HERE / ".data"
    env = bench.child_env(Path(args.aiodcp_src))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    os.environ.update(bench.CREDENTIALS, AWS_EC2_METADATA_DISABLED="true")
    with tempfile.TemporaryDirectory() as tmp, bench.Servers(data, kind="nginx") as servers:
        work = Path(tmp)
        for repeat in range(args.repeats):
            for name in args.jobs:
                job = json.loads((data / "jobs" / f"{name}.json").read_text())
                job["endpoint"] = servers.endpoint(None)
                job["result"] = str(work / "result.json")
                job_path = work / "job.json"
                job_path.write_text(json.dumps(job))
                control, ack, record = work / "ctl", work / "ack", work / "perf.data"
                for fifo in (control, ack):
                    fifo.unlink(missing_ok=True)
                    os.mkfifo(fifo)
                perf = ["perf", "record", "-q", "-F", str(args.freq), "-g", "-D", "-1"]
                perf += ["--control", f"fifo:{control},{ack}", "-o", str(record), "--"]
                cmd = [sys.executable, __file__, "--child", str(job_path), str(control), str(ack)]
                subprocess.run([*perf, *cmd], env=env, check=True)
                result = json.loads((work / "result.json").read_text())
                script = subprocess.run(
                    ["perf", "script", "-i", str(record), "-F", "tid,ip,sym,dso"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                stats = result.get("aiodcp_stats") or {}
                wall, cpu = result["wall_s"], result["cpu_s"]
                print(
                    f"{name} r{repeat}: wall {wall:.3f} s, cpu {cpu:.3f} s, "
                    f"verified {stats.get('verified_bytes')} bytes, correct {result['ok']}; "
                    f"{args.freq} samples/s"
                )
                print("\n".join(summarize(script, args.top)), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
