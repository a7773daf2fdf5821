"""Results of a benchmark run -> JSON, a markdown table and a PNG plot.

``python report.py results/latest.json`` re-renders ``latest.md`` and ``latest.png`` from the
JSON alone. Medians are over the paired repeats; a ratio against a reference loader is the
median of the per-repeat ratios (both loaders ran in the same repeat, on the same server).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance

MIB = 1024 * 1024
REF = "s3tc_dcp_optimized"
FLOOR = "local_fs"
BASE_SUFFIX = "@base"  # as bench.BASE_SUFFIX: a loader run from the --baseline revision
NUMBER = {
    "full_1file": 1,
    "full_8files": 2,
    "partial": 3,
    "many_small": 4,
    "s3_shaped": 5,
    "dist": 6,
    "loop_lag": 7,
}
AIODCP = ("aiodcp_sync", "aiodcp_async")


def describe_run(row: dict[str, Any]) -> str:
    if not row.get("ok"):
        detail = row.get("worker_error") or row.get("error") or row.get("mismatched")
        return f"  {row['scenario']:<12} r{row['repeat']} {row['loader']:<20} FAILED: {detail}"
    lag = ""
    if "lag_ms" in row and isinstance(row["lag_ms"], dict):
        lag = f" lag p99 {row['lag_ms']['p99']:.1f} ms max {row['lag_ms']['max']:.1f} ms"
    return (
        f"  {row['scenario']:<12} r{row['repeat']} {row['loader']:<20} "
        f"{row['wall_s']:7.2f} s (cpu {row.get('cpu_s', 0.0):5.2f} s) "
        f"{row['fetched_bytes'] / MIB:8.1f} MiB "
        f"{row['requests']:6d} req  rss +{row['rss_above'] / MIB:7.1f} MiB "
        f"gc {row.get('gc_s', 0.0):.2f} s (foreign cpu {row.get('foreign_cpu_share', 0):.0%}){lag}"
    )


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else None


def summarize(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (checkpoint, loader): medians and paired ratios."""
    runs = entry["runs"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r.get("checkpoint", ""), r["loader"]), []).append(r)

    def paired(ckpt: str, loader: str, ref: str, field: str) -> float | None:
        by_repeat = {r["repeat"]: r for r in groups.get((ckpt, ref), []) if r.get("ok")}
        ratios = []
        for r in groups.get((ckpt, loader), []):
            other = by_repeat.get(r["repeat"])
            if r.get("ok") and other and other.get(field) and r.get(field) is not None:
                ratios.append(r[field] / other[field])
        return _median(ratios)

    rows = []
    for (ckpt, loader), rs in groups.items():
        ok = [r for r in rs if r.get("ok")]
        row: dict[str, Any] = {
            "checkpoint": ckpt,
            "loader": loader,
            "runs": len(rs),
            "ok_runs": len(ok),
            "wall_s": _median([r["wall_s"] for r in ok]),
            "wall_min_s": min((r["wall_s"] for r in ok), default=None),
            "wall_max_s": max((r["wall_s"] for r in ok), default=None),
            "fetched_bytes": _median([r["fetched_bytes"] for r in ok]),
            "requests": _median([r["requests"] for r in ok]),
            "max_in_flight": _median([r["max_in_flight"] for r in ok]),
            "rss_above": _median([r["rss_above"] for r in ok]),
            "server_cpu_s": _median([r["server_cpu_s"] for r in ok]),
            "proxy_cpu_s": _median([r["proxy_cpu_s"] for r in ok]),
            "x_ref": paired(ckpt, loader, REF, "wall_s"),
            "cpu_x_ref": paired(ckpt, loader, REF, "cpu_s"),
            "cpu_x_base": paired(ckpt, loader, loader + BASE_SUFFIX, "cpu_s"),
            "x_floor": paired(ckpt, loader, FLOOR, "wall_s"),
            "rss_x_ref": paired(ckpt, loader, REF, "rss_above"),
            # Against the same loader from the --baseline revision, same repeats.
            "x_base": paired(ckpt, loader, loader + BASE_SUFFIX, "wall_s"),
            "rss_x_base": paired(ckpt, loader, loader + BASE_SUFFIX, "rss_above"),
            "cpu_s": _median([r["cpu_s"] for r in ok if r.get("cpu_s") is not None]),
            # A variant (`<loader>+rec`, `+noverify`) against the plain loader, same repeats.
            "x_plain": paired(ckpt, loader, loader.partition("+")[0], "wall_s")
            if "+" in loader
            else None,
            "cpu_x_plain": paired(ckpt, loader, loader.partition("+")[0], "cpu_s")
            if "+" in loader
            else None,
        }
        if row["fetched_bytes"] is not None and entry.get("needed_bytes"):
            row["fetched_x_needed"] = row["fetched_bytes"] / entry["needed_bytes"]
        lags = [r["lag_ms"] for r in ok if isinstance(r.get("lag_ms"), dict)]
        if lags:
            row["lag_p50_ms"] = _median([x["p50"] for x in lags])
            row["lag_p99_ms"] = _median([x["p99"] for x in lags])
            row["lag_max_ms"] = max(x["max"] for x in lags)
        rows.append(row)
    return rows


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:,.0f}"


def scenario_table(name: str, entry: dict[str, Any]) -> list[str]:
    rows = entry["summary"]
    lines = [f"### ({NUMBER[name]}) `{name}`: {entry['description']}", ""]
    if name == "loop_lag":
        lines += [
            "| checkpoint | loader | wall s | lag p50 ms | lag p99 ms | lag max ms | correct |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in rows:
            lines.append(
                f"| {r['checkpoint'].split('-')[0]} | {r['loader']} | {_f(r['wall_s'])} | "
                f"{_f(r.get('lag_p50_ms'), '{:.1f}')} | {_f(r.get('lag_p99_ms'), '{:.1f}')} | "
                f"{_f(r.get('lag_max_ms'), '{:.1f}')} | {r['ok_runs']}/{r['runs']} |"
            )
        lines.append("")
        lines.append(
            "aiodcp_async: `await load_checkpoint` (decode in a worker thread; I/O on the "
            "awaiting loop up to aiodcp 262be04, on aiodcp's own I/O thread after it); "
            "the other two run `dcp.load` in `asyncio.to_thread`."
        )
        return [*lines, ""]
    needed = entry.get("needed_bytes")
    if any(r["x_base"] is not None for r in rows):
        lines += [
            "Against the `--baseline` revision's same loader (`<loader>@base`), paired per "
            "repeat: "
            + "; ".join(
                f"{r['loader']} wall x{_f(r['x_base'])}, CPU x{_f(r.get('cpu_x_base'))}, "
                f"peak RSS x{_f(r['rss_x_base'])}"
                for r in rows
                if r["x_base"] is not None
            )
            + ".",
            "",
        ]
    if any(r.get("x_plain") is not None for r in rows):
        lines += [
            "Variants against the same loader, paired per repeat (`+rec`: the checkpoint with "
            "an integrity record, every item verified; `+noverify`: verify_checksums=False): "
            + "; ".join(
                f"{r['loader']} wall x{_f(r['x_plain'])}, CPU x{_f(r['cpu_x_plain'])} "
                f"({_f(r['cpu_s'])} CPU-s)"
                for r in rows
                if r.get("x_plain") is not None
            )
            + ".",
            "",
        ]
    lines += [
        f"Needed: {_mib(needed)} MiB ({entry['keys_loaded']} tensors"
        + (", both ranks)" if name == "dist" else ")"),
        "",
        "| loader | wall s | x dcp_opt | x local | fetched MiB | fetched / needed | requests "
        "| max in flight | peak RSS above state MiB | RSS x dcp_opt | correct |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["wall_s"] is None, r["wall_s"] or 0)):
        lines.append(
            f"| {r['loader']} | {_f(r['wall_s'])} | {_f(r['x_ref'])} | {_f(r['x_floor'])} | "
            f"{_mib(r['fetched_bytes'])} | {_f(r.get('fetched_x_needed'))} | "
            f"{_f(r['requests'], '{:.0f}')} | {_f(r['max_in_flight'], '{:.0f}')} | "
            f"{_mib(r['rss_above'])} | {_f(r['rss_x_ref'])} | {r['ok_runs']}/{r['runs']} |"
        )
    return [*lines, ""]


def _row(entry: dict[str, Any] | None, loader: str, ckpt_prefix: str = "") -> dict[str, Any]:
    if entry is None:
        return {}
    for r in entry["summary"]:
        if r["loader"] == loader and r["checkpoint"].startswith(ckpt_prefix):
            return r
    return {}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for aiodcp with default settings, both entry points."""
    sc = results["scenarios"]
    out: list[dict[str, Any]] = []

    def add(target: str, loader: str, value: float | None, limit: float, fmt: str) -> None:
        met = None if value is None else value <= limit
        out.append(
            {
                "target": target,
                "loader": loader,
                "value": value,
                "limit": limit,
                "met": met,
                "text": "n/a" if value is None else fmt.format(value),
            }
        )

    for loader in AIODCP:
        for s in ("full_1file", "full_8files"):
            if s in sc:
                r = _row(sc[s], loader)
                add(
                    f"({NUMBER[s]}) wall <= 0.6x dcp_optimized",
                    loader,
                    r.get("x_ref"),
                    0.6,
                    "{:.2f}x",
                )
                add(
                    f"({NUMBER[s]}) wall <= 1.5x local FileSystemReader",
                    loader,
                    r.get("x_floor"),
                    1.5,
                    "{:.2f}x",
                )
                add(
                    f"({NUMBER[s]}) peak RSS above state <= 1/3 of dcp_optimized's",
                    loader,
                    r.get("rss_x_ref"),
                    1 / 3,
                    "{:.2f}x",
                )
        if "partial" in sc:
            r = _row(sc["partial"], loader)
            add(
                "(3) bytes fetched <= 1.1x needed",
                loader,
                r.get("fetched_x_needed"),
                1.1,
                "{:.2f}x",
            )
            add("(3) wall <= 0.6x dcp_optimized", loader, r.get("x_ref"), 0.6, "{:.2f}x")
        if "many_small" in sc:
            r = _row(sc["many_small"], loader)
            add("(4) wall <= 0.7x dcp_optimized", loader, r.get("x_ref"), 0.7, "{:.2f}x")
        if "s3_shaped" in sc:
            r = _row(sc["s3_shaped"], loader)
            add("(5) wall <= 0.5x dcp_optimized", loader, r.get("x_ref"), 0.5, "{:.2f}x")
    if "loop_lag" in sc:
        for prefix in ("big1", "small"):
            r = _row(sc["loop_lag"], "aiodcp_async", prefix)
            add(
                f"(7) loop lag p99 < 20 ms ({prefix})",
                "aiodcp_async",
                r.get("lag_p99_ms"),
                20.0,
                "{:.1f} ms",
            )
    return out


def load_summary(runs: list[dict[str, Any]]) -> str:
    """The machine's load during the runs: the 1-minute load average before each run and the
    share of the CPU that processes outside the benchmark used during it."""
    loads = [r["loadavg_1m_before"] for r in runs if r.get("loadavg_1m_before") is not None]
    foreign = [r["foreign_cpu_share"] for r in runs if r.get("foreign_cpu_share") is not None]
    if not loads and not foreign:
        return "machine load not recorded"
    text = []
    if loads:
        text.append(f"load average (1 min) before each run {min(loads):.1f}-{max(loads):.1f}")
    if foreign:
        text.append(
            f"foreign CPU share median {statistics.median(foreign):.0%}, max {max(foreign):.0%}"
        )
    return ", ".join(text)


def rss_method(runs: list[dict[str, Any]]) -> str:
    """How the runs' peak RSS was measured (``common.PeakRSS``), in words for the report."""
    methods = {r.get("rss_method", "thread") for r in runs if r.get("ok")}
    words = {
        "VmHWM": "the kernel's high-water mark VmHWM, reset at the baseline",
        "sampler": "sampled every 2 ms by a process of its own",
        "thread": "sampled every 2 ms by a thread of the loading process",
    }
    said = "; ".join(words.get(m, m) for m in sorted(methods)) or "no run succeeded"
    if any(r.get("machine_reclaimed_pages") for r in runs):
        said += "; the kernel reclaimed pages during some runs, whose peak may read low"
    return said


def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    cfg = results["config"]
    runs = [r for entry in results["scenarios"].values() for r in entry["runs"]]
    lines = [
        provenance.line(m) + f" Machine load: {load_summary(runs)}.",
        "",
        f"Measured {m['date']} on {m['nproc']} cores ({m['cpu_model']}), {m['memory_gib']} GiB "
        f"RAM, no GPU; server {m['server']} "
        + (
            "counting requests and bytes in its access log, loaders connected directly (the "
            f"S3-shaped scenario shaped by {m.get('shaped_by', 's3proxy.py')})"
            if m.get("server_kind", "s3rver") == "nginx"
            else "counting its own traffic, loaders connected directly (`--direct`; the "
            "S3-shaped scenario still through the shaping proxy)"
            if m.get("direct")
            else "behind the counting proxy"
        )
        + ", all on 127.0.0.1. "
        f"Python {m['python']}, torch {m['torch']}, aiodcp {m['aiodcp']}"
        + (f" (baseline: aiodcp {m['aiodcp_baseline']})" if m.get("aiodcp_baseline") else "")
        + ", s3torchconnector "
        f"{m['s3torchconnector']}, s3fs {m['s3fs']} (fsspec {m['fsspec']}), aiobotocore "
        f"{m['aiobotocore']}, boto3 {m['boto3']}.",
        "",
        f"Median of {cfg['repeats']} paired repeat(s), each loader in a fresh process; "
        "`x dcp_opt` / `x local` are medians of per-repeat ratios to s3torchconnector's "
        "dcp_optimized reader and to `FileSystemReader` on a page-cached local copy. Fetched = "
        "response body bytes counted on the wire (nginx's access log, the proxy, or s3rver with "
        "`--direct`); "
        "RSS = peak RSS above the RSS measured after "
        f"allocating the destination state dict ({rss_method(runs)}). fsspec_tuned: block size "
        f"{cfg['fsspec_block_mib']:g} MiB. Total run time {results.get('total_s', 0) / 60:.0f} "
        "min.",
        "",
    ]
    for name, entry in results["scenarios"].items():
        lines += scenario_table(name, entry)
    t = results.get("targets", [])
    if t:
        lines += [
            "### Targets (aiodcp defaults)",
            "",
            "| target | loader | measured | met |",
            "| --- | --- | ---: | --- |",
        ]
        for x in t:
            met = "n/a" if x["met"] is None else ("yes" if x["met"] else "**no**")
            lines.append(f"| {x['target']} | {x['loader']} | {x['text']} | {met} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results["scenarios"] if n != "loop_lag"]
    has_lag = "loop_lag" in results["scenarios"]
    panels = len(names) + (1 if has_lag else 0)
    if not panels:
        return
    cols = min(panels, 4)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    colors = {
        "aiodcp_sync": "#1f77b4",
        "aiodcp_async": "#17becf",
        "s3tc_dcp_optimized": "#d62728",
        "s3tc_sequential": "#ff9896",
        "fsspec_default": "#2ca02c",
        "fsspec_tuned": "#98df8a",
        "boto3_then_fs": "#9467bd",
        "local_fs": "#7f7f7f",
        "fetch_only": "#bcbd22",
    }
    for ax, name in zip(axes.flat, names, strict=False):
        summary = [r for r in results["scenarios"][name]["summary"] if r["wall_s"] is not None]
        summary.sort(key=lambda r: r["wall_s"], reverse=True)
        labels = [r["loader"] for r in summary]
        values = [r["wall_s"] for r in summary]
        ax.barh(labels, values, color=[colors.get(x, "#333") for x in labels])
        for i, r in enumerate(summary):
            note = f" {r['wall_s']:.2f}s"
            if r["x_ref"] is not None and r["loader"] != REF:
                note += f" ({r['x_ref']:.2f}x)"
            ax.text(r["wall_s"], i, note, va="center", fontsize=7)
        ax.set_title(f"({NUMBER[name]}) {name}", fontsize=9)
        ax.set_xlabel("wall time, s (x = vs dcp_optimized)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlim(0, max(values, default=1) * 1.45)
    if has_lag:
        ax = axes.flat[len(names)]
        summary = results["scenarios"]["loop_lag"]["summary"]
        labels = [f"{r['loader']}\n{r['checkpoint'].split('-')[0]}" for r in summary]
        p99 = [r.get("lag_p99_ms") or 0 for r in summary]
        mx = [r.get("lag_max_ms") or 0 for r in summary]
        y = range(len(summary))
        ax.barh([i + 0.2 for i in y], mx, height=0.4, label="max", color="#ffbb78")
        ax.barh([i - 0.2 for i in y], p99, height=0.4, label="p99", color="#ff7f0e")
        ax.set_yticks(list(y), labels)
        ax.axvline(20, color="k", lw=0.8, ls="--")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_title("(7) loop lag, 1 ms heartbeat", fontsize=9)
        ax.set_xlabel("ms (dashed: 20 ms target)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    m = results["meta"]
    fig.suptitle(
        f"DCP loads from {m['server'].split(' (')[0]} on 127.0.0.1 - {m['nproc']} cores "
        f"{m['cpu_model']}, "
        f"torch {m['torch']}, aiodcp {m['aiodcp']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path, name: str) -> None:
    for entry in results["scenarios"].values():
        entry["summary"] = summarize(entry)
    results["targets"] = targets(results)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{name}.md").write_text(markdown(results))
    plot(results, out / f"{name}.png")


def main() -> None:
    path = Path(sys.argv[1])
    results = json.loads(path.read_text())
    write(results, path.parent, path.stem)


if __name__ == "__main__":
    main()
