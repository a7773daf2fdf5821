"""What each cold-start change did, measured at the change's commit and at its parent.

The ``cold`` scenario (``cold.py``) measures what a fresh process pays at one revision. This
measures the steps that brought that cost down, each in fresh processes, the two revisions of
a step interleaved per repeat (the order alternating), medians and per-repeat ratios:

- ``import`` (23cedcb, names resolved on first access): ``import aiodcp`` after ``import
  torch.distributed.checkpoint``, wall and CPU seconds, and whether it imported botocore;
- ``parse`` (c99fedc, S3's model and endpoint data parsed into plain dicts): with torch's DCP
  and the S3 stack imported and the collector off, the CPU time of one more ``_load_loader()``
  (the parse) and the tracked objects it leaves;
- ``ssl`` (ccb3e52, one SSL context per process): three ``S3StorageReader``s opened one after
  another in one process, the CPU time of each one's ``read_metadata()`` (a ``.metadata`` GET);
- ``cli`` (15ec97b, the CLI freezes what is alive at its start): CPU seconds (user + sys) of
  ``python -m aiodcp inspect`` of a 64-tensor checkpoint, and of ``python -c "import
  torch.distributed.checkpoint"`` in the same repeat;
- ``lag`` (46d9c03, ``load_checkpoint`` imports the S3 stack in a worker thread, and the
  current revision, whose plain case imports no S3 stack): a 1 ms heartbeat on the event loop
  of a fresh process during its first ``await aiodcp.load_checkpoint`` (name resolved on the
  loop) of the 64-tensor checkpoint, the worst gap;
- ``stack`` (the current revision only): after torch's DCP, what importing each part of the S3
  stack costs (CPU seconds and tracked objects, collector off): aiohttp, botocore's session,
  aiobotocore's session, and aiodcp's ``_botostore`` (S3's model parsed).

The server is nginx on 127.0.0.1 (``bench.Servers``) serving ``bench.py``'s ``tiny``
checkpoint. Run from the checkout::

    benchmarks/.venv-bench/bin/python benchmarks/cold_steps.py [--repeats 5] [--steps ...]

Results: ``results/cold-steps.json`` and ``.md`` (with the command, revisions and load).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
import provenance  # noqa: E402
from common import small_specs  # noqa: E402

STEPS: dict[str, tuple[list[str], str]] = {
    "import": (["23cedcb^", "23cedcb"], "import aiodcp after torch's DCP"),
    "parse": (["c99fedc^", "c99fedc"], "S3's model and endpoint data parsed (_load_loader)"),
    "ssl": (["ccb3e52^", "ccb3e52"], "read_metadata() of three readers in one process"),
    "cli": (["15ec97b^", "15ec97b"], "python -m aiodcp inspect (64 tensors)"),
    "lag": (["23cedcb", "46d9c03", "HEAD"], "1 ms heartbeat during a process's first load"),
    "stack": (["HEAD"], "the S3 stack's parts, imported after torch's DCP"),
}
"""Step -> (revisions, in order: before ... after; what is measured)."""

PROBES = {
    "import": """
import json, sys, time
import torch.distributed.checkpoint
t0, c0 = time.perf_counter(), time.process_time()
import aiodcp
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
stack = sorted(m for m in ("aiobotocore", "aiohttp", "botocore") if m in sys.modules)
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "s3_stack_imported": stack}))
""",
    "parse": """
import gc, importlib, json, time
import torch.distributed.checkpoint, aiohttp, botocore.session, aiobotocore.session
import aiodcp
for name in ("aiodcp._botostore", "aiodcp._store"):
    try:
        module = importlib.import_module(name)
    except ImportError:
        continue
    if hasattr(module, "_load_loader"):
        break
gc.collect()
gc.disable()
module._LOADER = None
before, c0 = len(gc.get_objects()), time.process_time()
module._load_loader()
cpu, objects = time.process_time() - c0, len(gc.get_objects()) - before
print(json.dumps({"cpu_s": cpu, "tracked_objects": objects, "module": module.__name__}))
""",
    "ssl": """
import json, os, time
import torch.distributed.checkpoint
import aiodcp
cpu = []
for _ in range(3):
    reader = aiodcp.S3StorageReader(os.environ["PROBE_URL"], endpoint_url=os.environ["PROBE_EP"],
                                    addressing_style="path", region="us-east-1")
    c0 = time.process_time()
    reader.read_metadata()
    cpu.append(time.process_time() - c0)
    reader.close()
print(json.dumps({"cpu_s": cpu}))
""",
    "lag": """
import asyncio, json, os
import torch, torch.distributed.checkpoint
import aiodcp
state = {name: torch.zeros(shape) for name, shape in json.loads(os.environ["PROBE_SPECS"])}
async def main():
    gaps, done = [], asyncio.Event()
    async def beat():
        loop = asyncio.get_running_loop()
        while not done.is_set():
            t = loop.time()
            await asyncio.sleep(0.001)
            gaps.append(loop.time() - t - 0.001)
    task = asyncio.create_task(beat())
    await asyncio.sleep(0.05)
    gaps.clear()
    load = aiodcp.load_checkpoint  # resolved on the loop, as a caller would
    await load(state, os.environ["PROBE_URL"], endpoint_url=os.environ["PROBE_EP"],
               addressing_style="path", region="us-east-1")
    done.set()
    await task
    return max(gaps)
worst = asyncio.run(main())
ok = all(bool((t != 0).any()) for t in state.values())
print(json.dumps({"max_gap_s": worst, "ok": ok}))
""",
    "stack": """
import gc, importlib, json, time
import torch.distributed.checkpoint
import aiodcp
gc.collect()
gc.disable()
parts = {}
for name in ("aiohttp", "botocore.session", "aiobotocore.session", "aiodcp._botostore"):
    before, c0 = len(gc.get_objects()), time.process_time()
    importlib.import_module(name)
    parts[name] = {"cpu_s": time.process_time() - c0,
                   "tracked_objects": len(gc.get_objects()) - before}
print(json.dumps(parts))
""",
}


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def probe(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one fresh process; its JSON (last stdout line), wall and CPU seconds."""
    c0, t0 = children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out: dict[str, Any] = {
        "process_wall_s": time.perf_counter() - t0,
        "process_cpu_s": children_cpu() - c0,
        "loadavg_1m_before": os.getloadavg()[0],
    }
    if proc.returncode != 0:
        return {**out, "ok": False, "error": proc.stderr[-600:]}
    lines = proc.stdout.strip().splitlines()
    try:
        out.update(json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {})
    except json.JSONDecodeError:
        pass
    out.setdefault("ok", True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument("--out", default=str(HERE / "results" / "cold-steps"))
    args = p.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    for s in steps:
        if s not in STEPS:
            p.error(f"unknown step {s!r}; choose from {list(STEPS)}")
    for var in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[var]
    os.environ.update(bench.CREDENTIALS, AWS_EC2_METADATA_DISABLED="true")
    data = HERE / ".data"
    data.mkdir(exist_ok=True)
    revisions = {rev for s in steps for rev in STEPS[s][0]}
    envs: dict[str, dict[str, str]] = {}
    described: dict[str, str] = {}
    for rev in sorted(revisions):
        src, described[rev] = bench.aiodcp_source(rev, data)
        bench.compile_bytecode(src)
        envs[rev] = bench.child_env(src)
    python = sys.executable
    tiny = bench.Checkpoint("tiny", small_specs(64, 16), files=1)
    rows: list[dict[str, Any]] = []
    with bench.Servers(data, kind="nginx") as servers:
        meta = bench.machine_info(", ".join(f"{r}: {d}" for r, d in sorted(described.items())))
        meta["server"] = servers.describe()
        tiny.ensure(data, servers, python, envs[sorted(revisions)[0]])
        extra = {
            "PROBE_URL": tiny.url,
            "PROBE_EP": servers.direct_url,
            "PROBE_SPECS": json.dumps([[n, s] for n, s, _ in tiny.tensors]),
        }
        inspect = [
            *(python, "-m", "aiodcp", "inspect", tiny.url, "--endpoint-url"),
            *(servers.direct_url, "--addressing-style", "path", "--region", "us-east-1"),
        ]
        floor = [python, "-c", "import torch.distributed.checkpoint"]
        for step in steps:
            revs = STEPS[step][0]
            for rev in revs:  # untimed: each revision's modules and torch into the page cache
                probe(inspect if step == "cli" else [python, "-c", "import aiodcp"], envs[rev])
            for repeat in range(args.repeats):
                order = revs if repeat % 2 == 0 else revs[::-1]
                if step == "cli":
                    order = ["floor", *order] if repeat % 2 == 0 else [*order, "floor"]
                for rev in order:
                    if rev == "floor":
                        row = probe(floor, envs[revs[-1]])
                    elif step == "cli":
                        row = probe(inspect, envs[rev])
                    else:
                        row = probe([python, "-c", PROBES[step]], {**envs[rev], **extra})
                    row.update(step=step, revision=rev, repeat=repeat)
                    rows.append(row)
                    shown = {k: v for k, v in row.items() if k not in ("step", "repeat")}
                    bench.log(f"  {step:<6} r{repeat} {json.dumps(shown)[:300]}")
    result = {"meta": meta, "config": vars(args), "revisions": described, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def markdown(result: dict[str, Any]) -> str:
    rows = [r for r in result["rows"] if r.get("ok")]
    loads = [r["loadavg_1m_before"] for r in result["rows"]]
    lines = [
        provenance.line(result["meta"])
        + f" Machine load: load average (1 min) before each probe {min(loads, default=0):.1f}-"
        f"{max(loads, default=0):.1f}.",
        "",
        f"Fresh processes, {result['config']['repeats']} repeats, medians (range); server "
        f"{result['meta']['server']} on 127.0.0.1; {result['meta']['nproc']} cores "
        f"({result['meta']['cpu_model']}).",
        "",
        "| step | revision | measured |",
        "| --- | --- | --- |",
    ]

    def spread(values: list[float], fmt: str) -> str:
        if not values:
            return "n/a"
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-" + (
            f"{fmt.format(max(values))})"
        )

    for step, (revs, what) in STEPS.items():
        for rev in revs + (["floor"] if step == "cli" else []):
            rs = [r for r in rows if r["step"] == step and r["revision"] == rev]
            if not rs:
                continue
            if step == "import":
                text = (
                    f"wall {spread([r['wall_s'] for r in rs], '{:.3f}')} s, CPU "
                    f"{spread([r['cpu_s'] for r in rs], '{:.3f}')} s; S3 stack imported: "
                    f"{', '.join(rs[0]['s3_stack_imported']) or 'none'}"
                )
            elif step == "parse":
                text = (
                    f"CPU {spread([r['cpu_s'] * 1000 for r in rs], '{:.1f}')} ms, "
                    f"{_fmt(_med([r['tracked_objects'] for r in rs]), '{:,.0f}')} tracked objects"
                )
            elif step == "ssl":
                text = "; ".join(
                    f"reader {i + 1}: {spread([r['cpu_s'][i] * 1000 for r in rs], '{:.1f}')} ms"
                    for i in range(3)
                )
            elif step == "cli":
                text = f"CPU {spread([r['process_cpu_s'] for r in rs], '{:.2f}')} s"
            elif step == "lag":
                text = (
                    f"worst gap {spread([r['max_gap_s'] * 1000 for r in rs], '{:.0f}')} ms "
                    f"({sum(bool(r.get('ok')) for r in rs)}/{len(rs)} loads correct)"
                )
            else:
                names = ["aiohttp", "botocore.session", "aiobotocore.session", "aiodcp._botostore"]
                text = "; ".join(
                    f"{n} {spread([r[n]['cpu_s'] * 1000 for r in rs], '{:.0f}')} ms, "
                    f"{_fmt(_med([r[n]['tracked_objects'] for r in rs]), '{:,.0f}')} objects"
                    for n in names
                    if all(n in r for r in rs)
                )
            label = "`python -c 'import torch.distributed.checkpoint'`" if rev == "floor" else rev
            lines.append(f"| {step}: {what} | {label} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
