"""Multi-rank loads through one bandwidth cap: a shared load against every rank for itself.

Loads, as in the issues that asked for sharing and for slicing (each in a fresh gloo job per
run):

- ``replicated``: 4 ranks each load a whole plain state dict (data-parallel replicas), saved by
  one process;
- ``dim1``: 2 ranks load DTensors sharded on dim 1 from a checkpoint saved by 2 ranks sharded
  on dim 0 (every rank needs a column half of every stored chunk);
- ``dim0_2to4``: 4 ranks load DTensors sharded on dim 0 from that checkpoint (FSDP resuming on
  twice the ranks: every rank needs half the rows of one stored chunk per tensor);
- ``dim0_1to4``: 4 ranks load DTensors sharded on dim 0 from the plain checkpoint saved by one
  process (a quarter of the rows of every stored tensor).

The ranks reach nginx through ``s3proxy.py`` with ``total_bandwidth`` (default 200 MB/s) capping
the sum of every connection, a node's NIC that its ranks share, and ``latency_ms`` (default 20)
before each response. Variants, interleaved per repeat (order rotating), each on the same
server in the same run:

- ``shared``: this checkout's aiodcp, defaults (``share_across_ranks=True``);
- ``per_rank``: this checkout's aiodcp with ``share_across_ranks=False``;
- ``base``: the ``--baseline`` revision's aiodcp (default ``be52019``, main before sharing),
  defaults;
- ``base_per_rank``: the baseline with ``share_across_ranks=False`` (where it has the option;
  before sharing that is its default): every rank fetching whole stored chunks for itself;
- ``per_rank_gap256k``: this checkout, ``share_across_ranks=False`` and ``max_gap_size`` 256
  KiB (``"auto"`` at its floor: a request worth little, so items are sliced whenever more than
  that is left out);
- ``shared_rec`` / ``per_rank_rec``: as ``shared`` / ``per_rank``, loading a twin of the
  checkpoint whose ``.metadata`` carries the integrity record an aiodcp save writes: every item
  checked, and sliced runs widened to the whole 1 MiB checksum blocks they touch (what checking
  costs a resharded load in bytes).

Per run: the slowest rank's wall time (``await load_checkpoint``, started after a barrier), the
largest peak RSS above the state dict of any rank, bytes and requests the proxy served, and its
count of ``.metadata`` GETs; every rank checks every tensor it loaded against its expected
value. Figures: medians over the repeats of per-repeat ratios against ``base``.

Run from the checkout (it uses benchmarks/.venv-bench, built by ``make bench``)::

    benchmarks/.venv-bench/bin/python benchmarks/shared.py [--size-mib 256] [--repeats 3]

Everything listens on 127.0.0.1; the processes it starts are stopped when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
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
import report  # noqa: E402
from common import MIB, layer_specs  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402

LOADS = {"replicated": 4, "dim1": 2, "dim0_2to4": 4, "dim0_1to4": 4}
"""Load name -> ranks that load it."""
SAVED_BY = {"replicated": "plain", "dim1": "dim0x2", "dim0_2to4": "dim0x2", "dim0_1to4": "plain"}
"""Load name -> the checkpoint it loads: ``plain`` (saved by one process), ``dim0x2`` (saved
by 2 ranks as DTensors sharded on dim 0)."""
VARIANTS = (
    "shared",
    "per_rank",
    "base",
    "base_per_rank",
    "per_rank_gap256k",
    "shared_rec",
    "per_rank_rec",
)
OPTIONS: dict[str, dict[str, Any]] = {
    "per_rank": {"share_across_ranks": False},
    "base_per_rank": {"share_across_ranks": False},
    "per_rank_gap256k": {"share_across_ranks": False, "max_gap_size": 256 * 1024},
    "per_rank_rec": {"share_across_ranks": False},
}
RECORDED = ("shared_rec", "per_rank_rec")
"""Variants that load the checkpoint's twin with an integrity record (``bench.recorded_twin``):
every item checked, sliced runs widened to the whole 1 MiB checksum blocks they touch."""
"""Variant -> aiodcp options (defaults otherwise)."""


def run_ranks(world: int, args: list[str], env: dict[str, str], timeout: float) -> list[str]:
    port = bench.free_port()
    procs = []
    for rank in range(world):
        rank_env = dict(env)
        rank_env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME="lo",
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "shared_worker.py"), *args],
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"a rank failed:\n{out[-3000:]}")
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def rank_results(outputs: list[str]) -> list[dict[str, Any]]:
    found = []
    for out in outputs:
        lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
        if len(lines) != 1:
            raise RuntimeError(f"no result:\n{out[-3000:]}")
        found.append(json.loads(lines[0].removeprefix("RESULT ")))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=float, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--total-mbps", type=float, default=200.0, help="MB/s over all connections")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--baseline", default="be52019")
    p.add_argument(
        "--aiodcp-src",
        default="worktree",
        help="the aiodcp of the shared/per_rank variants: 'worktree' (this checkout's src/) or "
        "a git revision (git archive), as bench.py's",
    )
    p.add_argument("--loads", default=",".join(LOADS))
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="which variants to run; a baseline from before sharing has no share_across_ranks "
        "option, so leave out base_per_rank for it",
    )
    p.add_argument("--out", default=str(HERE / "results" / "shared"))
    args = p.parse_args()
    for var in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[var]
    os.environ.update(bench.CREDENTIALS, AWS_EC2_METADATA_DISABLED="true")
    data = HERE / ".data"
    data.mkdir(exist_ok=True)
    src, desc = bench.aiodcp_source(args.aiodcp_src, data)
    base_src, base_desc = bench.aiodcp_source(args.baseline, data)
    for s in (src, base_src):
        bench.compile_bytecode(s)
    envs = {v: bench.child_env(src) for v in ("shared", "per_rank", "per_rank_gap256k", *RECORDED)}
    envs["base"] = envs["base_per_rank"] = bench.child_env(base_src)
    specs = layer_specs(args.size_mib, dist=True)
    shaping = {"latency_ms": args.latency_ms, "total_bandwidth": args.total_mbps * 1e6}
    rows: list[dict[str, Any]] = []
    with bench.Servers(data, kind="nginx") as servers:
        meta = bench.machine_info(desc)
        meta["server"] = servers.describe()
        bench.log(f"aiodcp {desc} (base: {base_desc}); {meta['server']}; {meta['cpu_model']}")
        saved: dict[str, str] = {}
        needed: dict[str, int] = {}
        for load in args.loads.split(","):
            layout = SAVED_BY[load]
            prefix = f"shared-{layout}-{int(args.size_mib)}"
            local = data / "ckpt" / prefix
            if not (local / ".metadata").exists():
                job = {"tensors": specs, "out": str(local), "layout": load}
                job_path = data / f"{prefix}-save.json"
                job_path.write_text(json.dumps(job))
                world = 1 if layout == "plain" else 2
                run_ranks(world, ["save", str(job_path)], envs["shared"], 1800)
            saved[load] = f"s3://{bench.BUCKET}/{prefix}"
            if any(v in args.variants.split(",") for v in RECORDED):
                bench.recorded_twin(local, prefix, data, servers, sys.executable, envs["shared"])
            # Both loads need every stored item: the checkpoint's stored bytes.
            md = FileSystemReader(str(local)).read_metadata()
            needed[load] = sum(info.length for info in md.storage_data.values())
        for repeat in range(args.repeats):
            for load, world in LOADS.items():
                if load not in saved:
                    continue
                variants = [v for v in VARIANTS if v in args.variants.split(",")]
                shift = repeat % len(variants)
                order = variants[shift:] + variants[:shift]
                for variant in order:
                    job = {
                        "url": saved[load] + ("-rec" if variant in RECORDED else ""),
                        "endpoint": servers.proxy_url,
                        "tensors": specs,
                        "layout": load,
                        "needed_bytes": needed[load],
                        "options": OPTIONS.get(variant, {}),
                    }
                    job_path = data / f"shared-{load}-{variant}.json"
                    job_path.write_text(json.dumps(job))
                    servers.control("reset", **shaping)
                    load0 = os.getloadavg()[0]
                    t0 = time.perf_counter()
                    results = rank_results(
                        run_ranks(world, ["load", str(job_path)], envs[variant], 1800)
                    )
                    traffic = servers.control("stats")
                    row = {
                        "load": load,
                        "variant": variant,
                        "repeat": repeat,
                        "ranks": world,
                        "process_s": time.perf_counter() - t0,
                        "loadavg_1m_before": load0,
                        "wall_s": max(r["wall_s"] for r in results),
                        "rss_above": max(r["rss_above"] for r in results),
                        "ok": all(r["ok"] for r in results),
                        "fetched_bytes": traffic["body_bytes"],
                        "requests": traffic["requests"],
                        "metadata_gets": traffic["metadata_gets"],
                        "needed_bytes": results[0]["needed_bytes"],
                        "from_peers": sum(r.get("from_peers", 0) for r in results),
                        "sliced_items": sum(r.get("sliced_items", 0) for r in results),
                        "verified_bytes": sum(r.get("verified_bytes", 0) for r in results),
                        "unverified_bytes": sum(r.get("unverified_bytes", 0) for r in results),
                        "max_gap_size": [r.get("max_gap_size") for r in results],
                    }
                    rows.append(row)
                    bench.log(
                        f"  {load:<10} r{repeat} {variant:<9} {row['wall_s']:6.2f} s  "
                        f"{row['fetched_bytes'] / MIB:8.1f} MiB fetched "
                        f"({row['fetched_bytes'] / row['needed_bytes']:.2f}x needed), "
                        f"{row['requests']} req, {row['metadata_gets']} .metadata, "
                        f"rss +{row['rss_above'] / MIB:.1f} MiB, ok={row['ok']}"
                    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "config": vars(args), "base": base_desc, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)


def markdown(result: dict[str, Any]) -> str:
    m, cfg, rows = result["meta"], result["config"], result["rows"]
    lines = [
        provenance.line(m) + f" Machine load: {report.load_summary(rows)}.",
        "",
        f"Measured {m['date']} on {m['nproc']} cores ({m['cpu_model']}), {m['memory_gib']} GiB "
        f"RAM; nginx {m['server']} behind s3proxy.py capping all connections together at "
        f"{cfg['total_mbps']:.0f} MB/s with {cfg['latency_ms']:.0f} ms before each response, "
        f"127.0.0.1. aiodcp {m['aiodcp']}; base = aiodcp {result['base']}. torch {m['torch']}. "
        f"{cfg['repeats']} repeats, medians; ratios are medians of per-repeat ratios to base.",
        "",
        "| load | variant | ranks | wall s (slowest rank) | x base | x base_per_rank "
        "| fetched / needed | requests | .metadata GETs | from peers MiB | sliced items "
        "| peak RSS above state MiB (max rank) | RSS x base_per_rank | correct |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | --- |",
    ]
    med = statistics.median

    def ratio(rs: list[dict[str, Any]], ref: dict[int, dict[str, Any]], key: str) -> str:
        pairs = [r[key] / ref[r["repeat"]][key] for r in rs if ref.get(r["repeat"])]
        return f"{med(pairs):.2f}" if pairs else "n/a"

    for load in LOADS:
        ref = {
            variant: {r["repeat"]: r for r in rows if r["load"] == load and r["variant"] == variant}
            for variant in ("base", "base_per_rank")
        }
        for variant in VARIANTS:
            rs = [r for r in rows if r["load"] == load and r["variant"] == variant]
            if not rs:
                continue
            lines.append(
                f"| {load} | {variant} | {rs[0]['ranks']} | {med([r['wall_s'] for r in rs]):.2f} "
                f"| {ratio(rs, ref['base'], 'wall_s')} "
                f"| {ratio(rs, ref['base_per_rank'], 'wall_s')} "
                f"| {med([r['fetched_bytes'] / r['needed_bytes'] for r in rs]):.2f} "
                f"| {med([r['requests'] for r in rs]):.0f} "
                f"| {med([r['metadata_gets'] for r in rs]):.0f} "
                f"| {med([r['from_peers'] for r in rs]) / MIB:.0f} "
                f"| {med([r.get('sliced_items', 0) for r in rs]):.0f} "
                f"| {med([r['rss_above'] for r in rs]) / MIB:.0f} "
                f"| {ratio(rs, ref['base_per_rank'], 'rss_above')} "
                f"| {sum(r['ok'] for r in rs)}/{len(rs)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
