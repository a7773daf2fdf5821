"""Saves to a local S3 server: aiodcp against s3torchconnector's and fsspec's DCP writers.

Scenarios (every saver, fresh processes, interleaved per repeat with the order rotating):

- ``save_1file``: ~``--size-mib`` (1 GiB) transformer-like state dict (``common.layer_specs``:
  fp32 blocks of 4-16 MiB, small norms and biases, a bf16 embedding, an int64 step) as one
  data file;
- ``save_8files``: the same as 8 data files (``files_per_rank=8``; ``thread_count=8`` for
  s3torchconnector and FsspecWriter);
- ``save_s3_shaped``: ``save_1file`` through ``s3proxy.py``'s S3 shape: the reply to every
  request 20 ms after its body arrived, each connection's body read at 80 MB/s;
- ``save_dist``: 4 gloo ranks save FSDP-style DTensors sharded on dim 0 (``--dist-size-mib``
  in all), one data file per rank; wall = the slowest rank, RSS = the largest, CPU summed.

Savers: ``aiodcp_sync`` (``dcp.save`` with ``aiodcp.S3StorageWriter``), ``aiodcp_async``
(``await aiodcp.save_checkpoint``), ``s3tc`` (s3torchconnector 1.5's ``S3StorageWriter``, its
file system given a client with the endpoint), ``fsspec`` (torch's ``FsspecWriter`` over s3fs).
All talk to s3rver (``node_modules/.bin/s3rver``, the version ``make bench`` installs) through
``s3proxy.py``, which counts requests and uploaded bytes on the wire. Per run: wall time, the
saver's CPU seconds (its process, every thread; nothing samples RSS in it), peak RSS above the
state dict (the kernel's ``VmHWM``, reset at the baseline: ``common.PeakRSS``), uploaded bytes,
requests, most requests in flight, s3rver's and the proxy's CPU seconds; then (untimed) the
checkpoint is loaded back with aiodcp and compared bit for bit, and its objects deleted. With
``--lag``, an ``aiodcp_async`` save runs beside a 5 ms heartbeat on the caller's loop, and the
report gives its lag (p50 / p99 / max): the figure behind "a 5 ms heartbeat never lags 100
ms", which tests/test_save_failures.py checks by the loop thread's CPU, not the wall clock.

Run from the checkout with the benchmarks' virtualenv::

    benchmarks/.venv-bench/bin/python benchmarks/save.py [--size-mib 1024] [--repeats 3]

Everything listens on 127.0.0.1; the processes it starts are stopped when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
from common import MIB, layer_specs, spec_bytes  # noqa: E402

SCENARIOS = ("save_1file", "save_8files", "save_s3_shaped", "save_dist")
SAVERS = ("aiodcp_sync", "aiodcp_async", "s3tc", "fsspec")
SHAPE = {"latency_ms": 20.0, "bandwidth": 80_000_000.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=float, default=1024)
    parser.add_argument("--dist-size-mib", type=float, default=1024)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--savers", default=",".join(SAVERS))
    parser.add_argument("--aiodcp-src", default="worktree", help="worktree, or a git revision")
    parser.add_argument("--aiodcp-options", default="{}", help="JSON: extra WriterConfig fields")
    parser.add_argument(
        "--extra-pythonpath",
        default="",
        help="prepended to the savers' PYTHONPATH (e.g. a --target install of a requirement "
        "the virtualenv predates)",
    )
    parser.add_argument(
        "--lag",
        action="store_true",
        help="aiodcp_async: a 5 ms heartbeat on the caller's loop during the save (its lag "
        "p50/p99/max in the report; adds its wake-ups to the saver's CPU)",
    )
    parser.add_argument("--data", default=str(HERE / ".data"))
    parser.add_argument("--out", default=str(HERE / "results" / "save.json"))
    return parser.parse_args(argv)


def delete_prefix(endpoint: str, bucket: str, prefix: str) -> None:
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    for entry in listed.get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=entry["Key"])
    # (s3rver has no ListMultipartUploads: open uploads are checked by the test suite)


def run_one(
    servers: bench.Servers,
    env: dict[str, str],
    tmp: Path,
    scenario: str,
    saver: str,
    repeat: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    dist = scenario == "save_dist"
    shaped = scenario == "save_s3_shaped"
    size = args.dist_size_mib if dist else args.size_mib
    specs = layer_specs(size, dist=dist)
    prefix = f"{scenario}-{saver}-{repeat}-{time.monotonic_ns()}"
    job = {
        "saver": saver,
        "url": f"s3://{bench.BUCKET}/{prefix}",
        "endpoint": servers.endpoint(SHAPE if shaped else None),
        "specs": specs,
        "files": 8 if scenario == "save_8files" else 1,
        "dist": dist,
        "aiodcp_options": json.loads(args.aiodcp_options),
        "lag": args.lag,
        "result": str(tmp / prefix),
    }
    path = tmp / f"{prefix}.json"
    path.write_text(json.dumps(job))
    servers.control("reset", **(SHAPE if shaped else {}))
    server_cpu0 = servers.server_proc.cpu_times()
    proxy_cpu0 = servers.proxy_proc.cpu_times()
    load0 = os.getloadavg()[0]
    cmd = [sys.executable, str(HERE / "save_worker.py"), str(path)]
    if dist:
        bench.run_ranks(cmd, args.world, env)
    else:
        subprocess.run(cmd, env=env, check=True, timeout=1800)
    server_cpu1 = servers.server_proc.cpu_times()
    proxy_cpu1 = servers.proxy_proc.cpu_times()
    stats = servers.control("stats")
    ranks = [
        json.loads(Path(f"{job['result']}.{r}").read_text())
        for r in range(args.world if dist else 1)
    ]
    delete_prefix(servers.direct_url, bench.BUCKET, prefix)
    return {
        "scenario": scenario,
        "saver": saver,
        "repeat": repeat,
        "bytes": spec_bytes(specs),
        "wall_s": max(r["wall_s"] for r in ranks),
        "cpu_s": sum(r["cpu_s"] for r in ranks),
        "rss_above_state": max(r["rss_above_state"] for r in ranks),
        "rss_method": ranks[0].get("rss_method"),
        "correct": all(r["correct"] for r in ranks),
        "uploaded": stats.get("request_bytes", 0),
        "requests": stats.get("requests", 0),
        "by_method": stats.get("by_method", {}),
        "max_in_flight": stats.get("max_in_flight", 0),
        "server_cpu_s": (server_cpu1.user + server_cpu1.system)
        - (server_cpu0.user + server_cpu0.system),
        "proxy_cpu_s": (proxy_cpu1.user + proxy_cpu1.system)
        - (proxy_cpu0.user + proxy_cpu0.system),
        "load_avg_1m_before": load0,
        "aiodcp_stats": ranks[0].get("aiodcp_stats"),
        "crc32": ranks[0].get("crc32"),
        "lag_ms": ranks[0].get("lag_ms"),
    }


def lag_lines(rows: list[dict[str, Any]]) -> list[str]:
    """``--lag``: the caller's loop lag during ``save_checkpoint`` (a 5 ms heartbeat), worst
    repeat's p50 / p99 / max."""
    lagged = [r["lag_ms"] for r in rows if r.get("lag_ms")]
    if not lagged:
        return []
    worst = {k: max(lag[k] for lag in lagged) for k in ("p50", "p99", "max")}
    return [
        f"Caller's loop lag during `await save_checkpoint` (a 5 ms heartbeat, rank 0, worst of "
        f"{len(lagged)} repeats): p50 {worst['p50']:.1f} ms, p99 {worst['p99']:.1f} ms, "
        f"max {worst['max']:.1f} ms."
    ]


def report(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        f"Measured {info['when']} on {info['machine']}; server {info['server']} through "
        f"s3proxy.py (counting; S3 shape: 20 ms reply, 80 MB/s per connection), 127.0.0.1. "
        f"aiodcp {info['aiodcp']}; {info['versions']}. Load average (1 min) before the runs: "
        f"{info['load']}. Median of {info['repeats']} paired repeats, each saver in a fresh "
        "process; `x s3tc` is the median of per-repeat ratios to s3torchconnector's "
        "S3StorageWriter in the same repeat.",
        "",
    ]
    for scenario in dict.fromkeys(r["scenario"] for r in results):
        rows = [r for r in results if r["scenario"] == scenario]
        gib = rows[0]["bytes"] / 1024**3
        lines += [
            f"### `{scenario}`: {rows[0]['bytes'] / MIB:,.0f} MiB",
            "",
            "| saver | wall s | x s3tc | CPU s/GiB | CPU x s3tc | peak RSS above state MiB | "
            "uploaded MiB | requests | max in flight | server CPU s | proxy CPU s | correct |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for saver in dict.fromkeys(r["saver"] for r in rows):
            mine = [r for r in rows if r["saver"] == saver]

            def ratio(
                key: str,
                saver_rows: list[dict[str, Any]] = mine,
                scenario_rows: list[dict[str, Any]] = rows,
            ) -> str:
                pairs = []
                for r in saver_rows:
                    peer = [
                        p
                        for p in scenario_rows
                        if p["saver"] == "s3tc" and p["repeat"] == r["repeat"]
                    ]
                    if peer and peer[0][key]:
                        pairs.append(r[key] / peer[0][key])
                return f"{statistics.median(pairs):.2f}" if pairs else "-"

            def med(key: str, saver_rows: list[dict[str, Any]] = mine) -> float:
                return statistics.median(r[key] for r in saver_rows)

            lines.append(
                f"| {saver} | {med('wall_s'):.2f} | {ratio('wall_s')} | "
                f"{med('cpu_s') / gib:.2f} | {ratio('cpu_s')} | "
                f"{med('rss_above_state') / MIB:,.0f} | {med('uploaded') / MIB:,.0f} | "
                f"{med('requests'):.0f} | {med('max_in_flight'):.0f} | "
                f"{med('server_cpu_s'):.1f} | {med('proxy_cpu_s'):.1f} | "
                f"{sum(r['correct'] for r in mine)}/{len(mine)} |"
            )
        lines += ["", *lag_lines(rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    src, described = bench.aiodcp_source(args.aiodcp_src, data)
    bench.compile_bytecode(src)  # as pip does: else every saver process compiles aiodcp anew
    env = bench.child_env(src)
    if args.extra_pythonpath:
        env["PYTHONPATH"] = f"{args.extra_pythonpath}:{env['PYTHONPATH']}"
    for var in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[var]
    os.environ.update(bench.CREDENTIALS, AWS_EC2_METADATA_DISABLED="true")
    scenarios = args.scenarios.split(",")
    savers = args.savers.split(",")
    results: list[dict[str, Any]] = []
    load = os.getloadavg()
    with bench.Servers(data, kind="s3rver") as servers, tempfile.TemporaryDirectory() as tmp:
        info = {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} cores",
            "server": servers.describe(),
            "aiodcp": described,
            "versions": versions(),
            "load": " / ".join(f"{x:.2f}" for x in load),
            "repeats": args.repeats,
        }
        for repeat in range(args.repeats):
            for scenario in scenarios:
                order = savers[repeat % len(savers) :] + savers[: repeat % len(savers)]
                for saver in order:
                    result = run_one(servers, env, Path(tmp), scenario, saver, repeat, args)
                    results.append(result)
                    bench.log(
                        f"{scenario} {saver} #{repeat}: {result['wall_s']:.2f} s wall, "
                        f"{result['cpu_s']:.2f} CPU-s, "
                        f"{result['rss_above_state'] / MIB:.0f} MiB RSS, "
                        f"load {result['load_avg_1m_before']:.1f}, correct {result['correct']}"
                    )
        info["load_after"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "results": results}, indent=1))
    markdown = report(results, info)
    out.with_suffix(".md").write_text(markdown)
    bench.log(markdown)


def versions() -> str:
    import importlib.metadata as md

    names = ("torch", "s3torchconnector", "s3fs", "aiobotocore")
    return ", ".join(f"{n} {md.version(n)}" for n in names)


if __name__ == "__main__":
    main()
