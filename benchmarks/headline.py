"""Every figure README.md quotes from a benchmark, produced in one go, with its provenance.

``make headline`` (or ``benchmarks/.venv-bench/bin/python benchmarks/headline.py``) runs, one
after the other on the same server and machine:

1. ``bench.py`` with the scenarios README's "Why" quotes (``full_1file``, ``full_8files``,
   ``partial``, ``many_small``, ``s3_shaped``, ``loop_lag``) and ``cold`` (README "Plain case"),
   the loaders ``aiodcp_sync``, ``aiodcp_async``, ``s3tc_dcp_optimized`` (the peer every ratio is
   taken against, in the same repeat) and ``local_fs``; results in ``results/headline.*``;
2. ``shared.py`` with the dim-0 resharding loads (``dim0_2to4``, ``dim0_1to4``) and the variants
   README "Resharded loads" quotes (``shared``, ``per_rank``, ``per_rank_gap256k``, and ``base``:
   ``--shared-baseline``, default be52019, main before sharing and slicing, whose ranks each
   fetch whole chunks); results in ``results/headline-shared.*``;

then writes ``results/headline-figures.md`` (and prints it): each figure with the README
sentence it belongs to, the run it came from (command, harness and aiodcp revisions, date,
server, machine, load average and foreign CPU share), and the "Why" paragraph with the figures
filled in. ``--render-only`` renders that page from the JSON of earlier runs; ``--steps bench``
or ``--steps shared`` runs one step. Arguments after ``--`` go to ``bench.py``.

Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402
import report  # noqa: E402
from common import MIB, layer_specs  # noqa: E402

BENCH_SCENARIOS = "full_1file,full_8files,partial,many_small,s3_shaped,loop_lag,cold"
BENCH_LOADERS = "aiodcp_sync,aiodcp_async,s3tc_dcp_optimized,local_fs"
SHARED_LOADS = "dim0_2to4,dim0_1to4"
SHARED_VARIANTS = "shared,per_rank,per_rank_gap256k,base"
AIODCP = ("aiodcp_sync", "aiodcp_async")
REF = "s3tc_dcp_optimized"


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


# ------------------------------------------------------------------------------ figures


def _rows(results: dict[str, Any], scenario: str) -> dict[tuple[str, str], dict[str, Any]]:
    entry = results["scenarios"].get(scenario)
    if entry is None:
        return {}
    return {(r["checkpoint"].split("-")[0], r["loader"]): r for r in entry["summary"]}


def _one(results: dict[str, Any], scenario: str, loader: str, ckpt: str = "") -> dict[str, Any]:
    for (name, x), row in _rows(results, scenario).items():
        if x == loader and name.startswith(ckpt):
            return row
    return {}


def _span(values: list[float | None], fmt: str = "{:.2f}") -> str:
    """``a-b`` over the values (one value alone if they round alike); ``n/a`` if none."""
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    low, high = fmt.format(min(known)), fmt.format(max(known))
    return low if low == high else f"{low}-{high}"


def _pair(values: list[float | None], fmt: str = "{:.2f}") -> str:
    return " / ".join("n/a" if v is None else fmt.format(v) for v in values)


def per_repeat(results: dict[str, Any], scenario: str, loaders: tuple[str, ...] = AIODCP) -> str:
    """The range of the per-repeat wall-time ratios to dcp_optimized behind the medians: how much
    the figure moved within the run (the peer's time moves most, see benchmarks/README.md, "Why
    0.25-0.31x became 0.42-0.46x")."""
    entry = results["scenarios"].get(scenario)
    if entry is None:
        return "n/a"
    ok = [r for r in entry["runs"] if r.get("ok")]
    ref = {(r["checkpoint"], r["repeat"]): r["wall_s"] for r in ok if r["loader"] == REF}
    ratios = [
        r["wall_s"] / ref[(r["checkpoint"], r["repeat"])]
        for r in ok
        if r["loader"] in loaders and (r["checkpoint"], r["repeat"]) in ref
    ]
    return f"per repeat {_span(ratios)}x" if ratios else "n/a"


def bench_figures(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(README place, figure, value as measured) for every figure of the bench run."""
    out: list[tuple[str, str, str]] = []
    why = "README 'Why'"

    def field(scenario: str, key: str, loaders: tuple[str, ...] = AIODCP) -> list[float | None]:
        return [_one(results, scenario, x).get(key) for x in loaders]

    full = [*field("full_1file", "x_ref"), *field("full_8files", "x_ref")]
    out.append(
        (
            why,
            "full 1 GiB loads, wall x dcp_optimized (1 file sync, async; 8 files sync, async)",
            f"{_span(full)}x ({_pair(full)}; {per_repeat(results, 'full_1file')}, 8 files "
            f"{per_repeat(results, 'full_8files')})",
        )
    )
    rss_x = [*field("full_1file", "rss_x_ref"), *field("full_8files", "rss_x_ref")]
    rss_ours = [*field("full_1file", "rss_above"), *field("full_8files", "rss_above")]
    rss_ref = [_one(results, s, REF).get("rss_above") for s in ("full_1file", "full_8files")]
    out.append(
        (
            why,
            "full 1 GiB loads, peak RSS above the state dict x dcp_optimized's (MiB: aiodcp, "
            "dcp_optimized)",
            f"{_span(rss_x)}x ({_span([v and v / MIB for v in rss_ours], '{:.0f}')} MiB against "
            f"{_span([v and v / MIB for v in rss_ref], '{:.0f}')} MiB)",
        )
    )
    out.append(
        (
            why,
            "one-file load x FileSystemReader on a page-cached local copy (sync / async); 8 files",
            f"{_span(field('full_1file', 'x_floor'))}x; 8 files "
            f"{_span(field('full_8files', 'x_floor'))}x",
        )
    )
    partial_ref = _one(results, "partial", REF).get("fetched_x_needed")
    out.append(
        (
            why,
            "half-keys partial load: fetched x needed (dcp_optimized), wall x dcp_optimized",
            f"{_span(field('partial', 'fetched_x_needed'))}x "
            f"(dcp_optimized {_span([partial_ref])}x), {_span(field('partial', 'x_ref'))}x "
            "its time",
        )
    )
    out.append(
        (
            why,
            "20,000 small tensors: wall x dcp_optimized (x local FileSystemReader)",
            f"{_span(field('many_small', 'x_ref'))}x ({_span(field('many_small', 'x_floor'))}x; "
            f"{per_repeat(results, 'many_small')})",
        )
    )
    out.append(
        (
            why,
            "S3-shaped (20 ms to first byte, 80 MB/s per connection): wall x dcp_optimized",
            f"{_span(field('s3_shaped', 'x_ref'))}x ({per_repeat(results, 's3_shaped')})",
        )
    )
    lag = [
        _one(results, "loop_lag", "aiodcp_async", c).get("lag_p99_ms") for c in ("big1", "small")
    ]
    out.append(
        (
            why,
            "event-loop lag p99 during `await load_checkpoint` (1 GiB; 20,000 tensors)",
            f"{_pair(lag, '{:.0f}')} ms",
        )
    )
    cold = results.get("cold", {}).get("summary", {}).get("loaders", {})
    if cold:
        firsts = [cold.get(x, {}).get("first_x_warm") for x in AIODCP]
        ref = cold.get(REF, {}).get("first_x_warm")
        out.append(
            (
                "README 'Plain case: no botocore at all'",
                "`cold`: a process's first load x its warm loads, sync / async (dcp_optimized)",
                f"{_pair(firsts)}x (dcp_optimized {_span([ref])}x)",
            )
        )
    return out


def shared_figures(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(README place, figure, value) from a shared.py run with variants shared, per_rank,
    per_rank_gap256k and base (a revision whose ranks fetch whole chunks for themselves)."""
    rows = result["rows"]
    size = result["config"]["size_mib"]
    chunks = len(layer_specs(size, dist=True))  # stored chunks each rank touches, both loads
    med = statistics.median

    def runs(load: str, variant: str) -> list[dict[str, Any]]:
        return [r for r in rows if r["load"] == load and r["variant"] == variant]

    def vs_base(load: str, variant: str, key: str) -> float | None:
        base = {r["repeat"]: r for r in runs(load, "base")}
        pairs = [
            r[key] / base[r["repeat"]][key] for r in runs(load, variant) if r["repeat"] in base
        ]
        return med(pairs) if pairs else None

    def bytes_x(load: str, variant: str) -> float | None:
        rs = runs(load, variant)
        return med([r["fetched_bytes"] / r["needed_bytes"] for r in rs]) if rs else None

    def gets_per_chunk(load: str, variant: str) -> float | None:
        rs = runs(load, variant)
        if not rs:
            return None
        return med([(r["requests"] - r["metadata_gets"]) / r["ranks"] / chunks for r in rs])

    out: list[tuple[str, str, str]] = []
    place = "README 'Resharded loads'"
    for variant, what in (
        ("per_rank_gap256k", "each rank for itself, max_gap_size 256 KiB"),
        ("per_rank", "each rank for itself (share_across_ranks=False), defaults"),
        ("shared", "defaults (sharing and slicing)"),
    ):
        for load, saved in (("dim0_2to4", "2-rank save"), ("dim0_1to4", "1-process save")):
            if not runs(load, variant):
                continue
            out.append(
                (
                    place,
                    f"4 ranks, dim 0, {saved}, {what}: wall x whole chunks; store bytes x needed "
                    "(whole chunks); peak RSS x whole chunks'; GETs per stored chunk a rank "
                    "touches",
                    f"{_span([vs_base(load, variant, 'wall_s')])}x; "
                    f"{_span([bytes_x(load, variant)])}x ({_span([bytes_x(load, 'base')])}x); "
                    f"{_span([vs_base(load, variant, 'rss_above')])}x; "
                    f"{_span([gets_per_chunk(load, variant)])}",
                )
            )
    return out


def why_paragraph(results: dict[str, Any]) -> str:
    """README's headline paragraph with this run's figures."""

    def field(scenario: str, key: str, loader: str, ckpt: str = "") -> float | None:
        return _one(results, scenario, loader, ckpt).get(key)

    def both(scenario: str, key: str) -> list[float | None]:
        return [field(scenario, key, x) for x in AIODCP]

    full = [*both("full_1file", "x_ref"), *both("full_8files", "x_ref")]
    rss_x = [*both("full_1file", "rss_x_ref"), *both("full_8files", "rss_x_ref")]
    rss_ours = [
        v and v / MIB for v in [*both("full_1file", "rss_above"), *both("full_8files", "rss_above")]
    ]
    rss_ref = [
        v and v / MIB for v in (field(s, "rss_above", REF) for s in ("full_1file", "full_8files"))
    ]
    lag = [field("loop_lag", "lag_p99_ms", "aiodcp_async", c) for c in ("big1", "small")]
    repeats = results["config"]["repeats"]
    m = results["meta"]
    runs = [r for e in results["scenarios"].values() for r in e["runs"]]
    return (
        f"Measured with `make headline` at aiodcp {m['aiodcp'].split(' ')[0]} on "
        f"{m['date']}, on a {m['nproc']}-core {m['cpu_model']} with {m['memory_gib']} GiB RAM "
        f"(machine load: {report.load_summary(runs)}), "
        f"{m.get('server', 'n/a').split(' (')[0]} serving the files at S3 path-style URLs on "
        "127.0.0.1 (with `sendfile`, so the server takes almost no CPU from the loaders), "
        f"medians of {repeats} paired runs against s3torchconnector 1.5's `dcp_optimized` reader "
        "in the same run, aiodcp with its defaults: full 1 GiB loads take "
        f"{_span(full)}x its time and hold {_span(rss_x)}x its peak RSS above the state dict "
        f"({_span(rss_ours, '{:.0f}')} MiB against {_span(rss_ref, '{:.0f}')} MiB); the one-file "
        f"load takes {_span(both('full_1file', 'x_floor'))}x as long as `FileSystemReader` on a "
        f"page-cached local copy (8 files: {_span(both('full_8files', 'x_floor'))}x); a "
        f"half-keys partial load fetches {_span(both('partial', 'fetched_x_needed'))}x the "
        f"needed bytes (dcp_optimized {_span([field('partial', 'fetched_x_needed', REF)])}x) in "
        f"{_span(both('partial', 'x_ref'))}x its time; 20,000 small tensors load in "
        f"{_span(both('many_small', 'x_ref'))}x its time "
        f"({_span(both('many_small', 'x_floor'))}x of the local `FileSystemReader`); with 20 ms "
        f"to first byte and 80 MB/s per connection, {_span(both('s3_shaped', 'x_ref'))}x its "
        "time. The event loop's lag p99 during `await load_checkpoint` is "
        f"{_pair(lag[:1], '{:.0f}')} ms on the 1 GiB checkpoint and {_pair(lag[1:], '{:.0f}')} ms "
        "on the 20,000-tensor one."
    )


BUSY_SHARE = 0.15
"""Median foreign CPU share above which the page warns that the machine was busy."""


def load_warning(runs: list[dict[str, Any]], peer: str = "dcp_optimized") -> str:
    foreign = [r["foreign_cpu_share"] for r in runs if r.get("foreign_cpu_share") is not None]
    loads = [r["loadavg_1m_before"] for r in runs if r.get("loadavg_1m_before") is not None]
    if foreign and statistics.median(foreign) > BUSY_SHARE:
        busy = f"other processes used a median {statistics.median(foreign):.0%} of the CPU"
    elif not foreign and loads and statistics.median(loads) > (os.cpu_count() or 1):
        busy = f"the load average was {statistics.median(loads):.1f} (median before each run)"
    else:
        return ""
    return (
        f"**Busy machine**: {busy} during these runs. Ratios against {peer} move with that "
        "load (with other jobs on this round's 2-core machine, the per-repeat ratio of a 1 GiB "
        "load to dcp_optimized's spread over 0.06-0.37x: benchmarks/README.md, \"Why "
        '0.25-0.31x became 0.42-0.46x"), so these are not figures for README: rerun when the '
        "machine is quiet (`-- --quiet-wait 60` waits up to a minute before each run of "
        "bench.py)."
    )


def run_provenance(results: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    m = results["meta"]
    return (
        f"{provenance.line(m)} Server {m.get('server', 'n/a')} on 127.0.0.1; machine "
        f"{m['nproc']} cores ({m['cpu_model']}), {m['memory_gib']} GiB RAM, {m['os']}; Python "
        f"{m['python']}, torch {m['torch']}, s3torchconnector {m['s3torchconnector']}. "
        f"Machine load: {report.load_summary(runs)}."
    )


def render(bench_json: Path | None, shared_json: Path | None) -> str:
    lines = ["# Headline figures and where they come from", ""]
    if bench_json is not None and bench_json.exists():
        results = json.loads(bench_json.read_text())
        runs = [r for e in results["scenarios"].values() for r in e["runs"]]
        lines += [
            f"## `{bench_json.name}`",
            "",
            run_provenance(results, runs),
            "",
            load_warning(runs),
            "",
            "| where | figure | measured |",
            "| --- | --- | --- |",
            *(f"| {a} | {b} | {c} |" for a, b, c in bench_figures(results)),
            "",
            "README 'Why', with these figures:",
            "",
            "> " + why_paragraph(results),
            "",
        ]
    if shared_json is not None and shared_json.exists():
        result = json.loads(shared_json.read_text())
        rows = result["rows"]
        lines += [
            f"## `{shared_json.name}`",
            "",
            load_warning(rows, peer="the whole-chunk baseline"),
            "",
            f"{run_provenance(result, rows)} Base: aiodcp {result['base']}; s3proxy.py caps all "
            f"connections together at {result['config']['total_mbps']:.0f} MB/s, "
            f"{result['config']['latency_ms']:.0f} ms before each response.",
            "",
            "| where | figure | measured |",
            "| --- | --- | --- |",
            *(f"| {a} | {b} | {c} |" for a, b, c in shared_figures(result)),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="paired repeats (bench.py, shared.py)")
    p.add_argument("--aiodcp-src", default="worktree", help="as bench.py's --aiodcp-src")
    p.add_argument("--steps", default="bench,shared", help="bench, shared or both")
    p.add_argument("--shared-baseline", default="be52019", help="shared.py's base revision")
    p.add_argument("--render-only", action="store_true", help="only render earlier results")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("bench_args", nargs="*", help="after --: more bench.py arguments")
    args = p.parse_args()
    out = Path(args.out)
    steps = set(args.steps.split(","))
    python = sys.executable
    if not args.render_only and "bench" in steps:
        run(
            [
                *(python, str(HERE / "bench.py"), "--scenarios", BENCH_SCENARIOS),
                *("--loaders", BENCH_LOADERS, "--repeats", str(args.repeats)),
                *("--aiodcp-src", args.aiodcp_src, "--out", str(out), "--name", "headline"),
                *args.bench_args,
            ]
        )
    if not args.render_only and "shared" in steps:
        run(
            [
                *(python, str(HERE / "shared.py"), "--loads", SHARED_LOADS),
                *("--variants", SHARED_VARIANTS, "--baseline", args.shared_baseline),
                *("--repeats", str(args.repeats), "--aiodcp-src", args.aiodcp_src),
                *("--out", str(out / "headline-shared")),
            ]
        )
    text = render(out / "headline.json", out / "headline-shared.json")
    (out / "headline-figures.md").write_text(text + "\n")
    print(text)
    print(f"\n(written to {out / 'headline-figures.md'}; this page: {provenance.command()})")


if __name__ == "__main__":
    main()
