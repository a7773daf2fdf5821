"""Hugging Face safetensors from a local S3 server: aiodcp against Run:ai's model streamer and
torch's ``HuggingFaceStorageReader`` on a page-cached local copy (the floor).

    benchmarks/.venv-bench/bin/python benchmarks/safetensors_bench.py [--size-mib 1024]
        [--shards 4] [--repeats 3] [--aiodcp-src worktree|REV] [--ranks 4] [--name NAME]

Run it inside a loopback-only network namespace to be sure nothing leaves the machine (every
loader is pointed at 127.0.0.1 anyway)::

    unshare -n sh -c 'ip link set lo up && benchmarks/.venv-bench/bin/python \
        benchmarks/safetensors_bench.py'

What it does:

1. writes a Llama-shaped bf16 checkpoint (d_model 2048, GQA with 4 KV heads, MLP 5632, vocab
   32000, as many layers as ``--size-mib`` holds; every tensor a pure function of its name) in
   ``--shards`` files ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``
   with the ``safetensors`` library, under ``benchmarks/.data/`` (kept between runs);
2. serves it with nginx at S3 path-style URLs on 127.0.0.1 (``bench.Servers``: ``sendfile``,
   requests and bytes counted from its access log);
3. per repeat, runs each loader in a fresh process (the order rotates per repeat), which times
   the load and its peak RSS (``common.PeakRSS``) and checks every tensor bit for bit afterwards:

   - ``aiodcp``: ``await aiodcp.load_safetensors(url)`` (new tensors, the caller's own);
   - ``aiodcp_into``: the same ``into=`` a state dict allocated before the load;
   - ``runai``: ``SafetensorsStreamer().stream_files(urls)`` with ``owned=True`` (the
     tensors are the caller's), ``AWS_ENDPOINT_URL`` and path-style addressing pointed at
     nginx; the files are named (nginx cannot list), as vLLM names them from its index;
   - ``torch_local``: ``dcp.load`` with ``HuggingFaceStorageReader`` from the local files,
     read once beforehand so the page cache holds them;

   "RSS beyond" is the peak RSS above the RSS before the load, minus the bytes of tensors the
   loader returns (``aiodcp``, ``runai``); for ``aiodcp_into`` and ``torch_local`` the state
   dict is allocated (and touched) before that baseline;
4. with ``--ranks N`` (default 4), N gloo ranks load the checkpoint resharded (DTensors sharded
   on dim 0) with ``dcp.load`` + ``S3HuggingFaceStorageReader``, sharing across ranks (the
   default) and not; the job's bytes on the wire over the bytes the ranks' shards hold;
5. writes ``results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

MIB = 1024 * 1024
BUCKET = "bench"
LOADERS = ["aiodcp", "aiodcp_into", "runai", "torch_local"]


# ------------------------------------------------------------------------------ checkpoint


def llama_specs(size_mib: float) -> list[tuple[str, list[int]]]:
    """(name, shape) of a Llama-shaped bf16 state dict of about ``size_mib`` MiB."""
    d, kv, mlp, vocab = 2048, 256, 5632, 32000
    per_layer = (2 * d * d + 2 * d * kv + 3 * d * mlp + 2 * d) * 2 / MIB
    layers = max(1, round((size_mib - 2 * vocab * d * 2 / MIB) / per_layer))
    specs = [("model.embed_tokens.weight", [vocab, d])]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", [d, d]),
            (p + "self_attn.k_proj.weight", [kv, d]),
            (p + "self_attn.v_proj.weight", [kv, d]),
            (p + "self_attn.o_proj.weight", [d, d]),
            (p + "mlp.gate_proj.weight", [mlp, d]),
            (p + "mlp.up_proj.weight", [mlp, d]),
            (p + "mlp.down_proj.weight", [d, mlp]),
            (p + "input_layernorm.weight", [d]),
            (p + "post_attention_layernorm.weight", [d]),
        ]
    specs += [("model.norm.weight", [d]), ("lm_head.weight", [vocab, d])]
    return specs


def make(name: str, shape: list[int]) -> Any:
    from common import make_tensor

    return make_tensor(name, shape, "bfloat16")


def write_checkpoint(root: Path, size_mib: float, shards: int) -> tuple[Path, list[str]]:
    """The checkpoint directory (written once per shape) and its files."""
    from safetensors.torch import save_file

    specs = llama_specs(size_mib)
    directory = root / "ckpt" / f"llama-{len(specs)}t-{shards}s"
    names = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    if (directory / "model.safetensors.index.json").exists():
        for path in directory.iterdir():  # save_file writes 0600: nginx's worker must read
            path.chmod(0o644)
        return directory, names
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(2 * _numel(shape) for _, shape in specs)
    per_shard, weight_map, k, held = total / shards, {}, 0, 0
    batch: dict[str, Any] = {}
    for name, shape in specs:  # in model order, each shard about total / shards
        batch[name] = make(name, shape)
        held += 2 * _numel(shape)
        weight_map[name] = names[k]
        if held >= per_shard * (k + 1) and k < shards - 1:
            save_file(batch, str(directory / names[k]), metadata={"format": "pt"})
            batch, k = {}, k + 1
    save_file(batch, str(directory / names[k]), metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    for path in directory.iterdir():  # save_file writes 0600: nginx's worker must read
        path.chmod(0o644)
    return directory, names[: k + 1]


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ------------------------------------------------------------------------------ worker


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One timed load in this fresh process (see the module docstring)."""
    import torch
    from common import PeakRSS, rss_bytes

    loader, url, files, local = job["loader"], job["url"], job["files"], job["local"]
    specs = llama_specs(job["size_mib"])
    state: dict[str, Any] = {}
    if loader in ("aiodcp_into", "torch_local"):
        state = {n: torch.zeros(s, dtype=torch.bfloat16) for n, s in specs}  # pages touched
    if loader == "torch_local":
        for f in Path(local).glob("*.safetensors"):  # into the page cache
            with open(f, "rb") as fh:
                while fh.read(64 * MIB):
                    pass
    # The loader's imports are timed apart (``import_s``): aiodcp's API imports
    # torch.distributed.checkpoint (DTensor, sympy: ~1 s here on first use), which any DCP
    # reader needs; runai imports its C++ streamer.
    imported = time.perf_counter()
    if loader.startswith("aiodcp"):
        import aiodcp

        aiodcp.load_safetensors  # noqa: B018  (the lazy import, as a first call makes it)
    elif loader == "runai":
        from runai_model_streamer import SafetensorsStreamer
    else:
        import torch.distributed.checkpoint as dcp
    import_s = time.perf_counter() - imported
    returned = 0
    stats: dict[str, Any] = {}
    with PeakRSS() as rss:
        started = time.perf_counter()
        if loader.startswith("aiodcp"):
            options = {"endpoint_url": job["endpoint"], "region": "us-east-1"}
            options["addressing_style"] = "path"
            into = state if loader == "aiodcp_into" else None
            loaded = asyncio.run(aiodcp.load_safetensors(url, into=into, **options))
            stats = {"requests": loaded.stats.requests, "direct_items": loaded.stats.direct_items}
            state = dict(loaded)
        elif loader == "runai":
            with SafetensorsStreamer() as streamer:
                streamer.stream_files([f"{url}/{f}" for f in files])
                for name, tensor in streamer.get_tensors():
                    state[name] = tensor
        else:
            dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(local))
        wall = time.perf_counter() - started
        if loader in ("aiodcp", "runai"):
            returned = sum(t.numel() * t.element_size() for t in state.values())
    bad = [
        n
        for n, s in specs
        if not torch.equal(state[n].view(torch.int16), make(n, s).view(torch.int16))
    ]
    return {
        "loader": loader,
        "wall_s": wall,
        "import_s": import_s,
        "first_s": import_s + wall,
        "rss_above_mib": (rss.above_baseline - returned) / MIB,
        "peak_above_baseline_mib": rss.above_baseline / MIB,
        "returned_mib": returned / MIB,
        "rss_after_mib": rss_bytes() / MIB,
        "tensors": len(state),
        "mismatched": bad,
        "stats": stats,
    }


def rank_worker(job: dict[str, Any]) -> None:
    """One gloo rank of the resharded load: DTensors sharded on dim 0."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import aiodcp

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    specs = llama_specs(job["size_mib"])
    state = {
        n: distribute_tensor(torch.zeros(s, dtype=torch.bfloat16), mesh, [Shard(0)])
        for n, s in specs
    }
    dist.barrier()
    started = time.perf_counter()
    with aiodcp.S3HuggingFaceStorageReader(
        job["url"],
        endpoint_url=job["endpoint"],
        region="us-east-1",
        addressing_style="path",
        share_across_ranks=job["share"],
    ) as reader:
        dcp.load(state, storage_reader=reader)
        stats = reader.stats
    wall = time.perf_counter() - started
    bad = 0
    for n, s in specs:
        full = make(n, s)
        mine = state[n].to_local()
        rows = mine.shape[0]
        start = dist.get_rank() * (-(-s[0] // world))  # torch.chunk's split of dim 0
        if rows and not torch.equal(
            mine.view(torch.int16), full[start : start + rows].view(torch.int16)
        ):
            bad += 1
    need = sum(state[n].to_local().numel() * 2 for n, _ in specs)
    assert stats is not None
    print(
        "RESULT "
        + json.dumps(
            {
                "rank": dist.get_rank(),
                "wall_s": wall,
                "needed": need,
                "bad": bad,
                "sliced_items": stats.sliced_items,
                "bytes_from_peers": stats.bytes_from_peers,
            }
        ),
        flush=True,
    )
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ orchestration


def run_worker(job: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "worker", json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{job['loader']} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


def run_ranks(job: dict[str, Any], env: dict[str, str], world: int) -> list[dict[str, Any]]:
    from bench import free_port

    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = dict(
            env,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME="lo",
            RANK=str(rank),
            WORLD_SIZE=str(world),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "rank", json.dumps(job)],
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"a rank failed:\n{out[-3000:]}")
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return sorted(results, key=lambda r: r["rank"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=float, default=1024)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", type=int, default=4, help="0: no resharded load")
    p.add_argument("--loaders", default=",".join(LOADERS))
    p.add_argument("--aiodcp-src", default="worktree")
    p.add_argument("--name", default="safetensors")
    args = p.parse_args(argv)

    from bench import CREDENTIALS, Servers, aiodcp_source, child_env

    data = HERE / ".data"
    directory, files = write_checkpoint(data, args.size_mib, args.shards)
    src, described = aiodcp_source(args.aiodcp_src, data)
    env = child_env(src)
    env.update(CREDENTIALS, RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0")
    env["PYTHONPATH"] = os.pathsep.join([str(src), str(HERE)])
    loaders = args.loaders.split(",")
    total = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in loaders}
    ranked: dict[str, list[dict[str, Any]]] = {}
    started = time.time()
    load_avg: list[tuple[float, float, float]] = []
    with Servers(data) as servers:
        endpoint = servers.direct_url
        env["AWS_ENDPOINT_URL"] = endpoint
        url = f"s3://{BUCKET}/{directory.name}"
        for repeat in range(args.repeats):
            order = loaders[repeat % len(loaders) :] + loaders[: repeat % len(loaders)]
            for loader in order:
                servers.control("reset")
                job = {
                    "loader": loader,
                    "url": url,
                    "files": files,
                    "local": str(directory),
                    "size_mib": args.size_mib,
                    "endpoint": endpoint,
                }
                result = run_worker(job, env)
                wire = servers.control("stats")
                result["fetched_mib"] = wire["body_bytes"] / MIB
                result["requests_on_wire"] = wire["requests"]
                result["load_avg"] = os.getloadavg()
                load_avg.append(os.getloadavg())
                results[loader].append(result)
                print(
                    f"r{repeat} {loader:12s} {result['wall_s']:6.2f} s  rss beyond "
                    f"{result['rss_above_mib']:7.1f} MiB  fetched {result['fetched_mib']:7.1f} "
                    f"MiB  load {os.getloadavg()[0]:.2f}  bad {len(result['mismatched'])}",
                    flush=True,
                )
        if args.ranks:
            for share in (True, False):
                servers.control("reset")
                job = {"url": url, "endpoint": endpoint, "size_mib": args.size_mib, "share": share}
                got = run_ranks(job, env, args.ranks)
                wire = servers.control("stats")
                needed = sum(r["needed"] for r in got)
                ranked["shared" if share else "each_rank"] = [
                    {
                        "ranks": got,
                        "fetched_bytes": wire["body_bytes"],
                        "needed_bytes": needed,
                        "fetched_over_needed": wire["body_bytes"] / needed,
                        "requests": wire["requests"],
                        "wall_s": max(r["wall_s"] for r in got),
                        "bad": sum(r["bad"] for r in got),
                        "load_avg": os.getloadavg(),
                    }
                ]
                print(
                    f"{args.ranks} ranks, share={share}: fetched/needed "
                    f"{wire['body_bytes'] / needed:.3f}, wall {max(r['wall_s'] for r in got):.2f}"
                    f" s, bad {sum(r['bad'] for r in got)}",
                    flush=True,
                )
        server = servers.describe()
    summary = summarize(results, ranked)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    document = {
        "aiodcp": described,
        "server": server,
        "size_bytes": total,
        "files": files,
        "repeats": args.repeats,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "load_avg": load_avg,
        "results": results,
        "resharded": ranked,
        "summary": summary,
    }
    (out / f"{args.name}.json").write_text(json.dumps(document, indent=1))
    (out / f"{args.name}.md").write_text(render(document))
    print(render(document))


def summarize(
    results: dict[str, list[dict[str, Any]]], ranked: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Medians per loader, and medians of per-repeat ratios against runai and torch_local."""
    summary: dict[str, Any] = {}
    for loader, runs in results.items():
        if not runs:
            continue
        entry = {
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "first_s": statistics.median(r["first_s"] for r in runs),
            "rss_above_mib": statistics.median(r["rss_above_mib"] for r in runs),
            "fetched_mib": statistics.median(r["fetched_mib"] for r in runs),
            "correct": sum(1 for r in runs if not r["mismatched"]),
            "runs": len(runs),
        }
        for peer in ("runai", "torch_local"):
            if peer in results and len(results[peer]) == len(runs) and peer != loader:
                pairs = list(zip(runs, results[peer], strict=True))
                entry[f"x_{peer}"] = statistics.median(r["wall_s"] / q["wall_s"] for r, q in pairs)
                entry[f"first_x_{peer}"] = statistics.median(
                    r["first_s"] / q["first_s"] for r, q in pairs
                )
        summary[loader] = entry
    for kind, runs in ranked.items():
        summary[f"resharded_{kind}"] = runs[0]["fetched_over_needed"]
    return summary


def render(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    lines = [
        f"Safetensors from S3 ({doc['server']}, 127.0.0.1), aiodcp {doc['aiodcp']}, "
        f"{doc['size_bytes'] / MIB:.0f} MiB bf16 in {len(doc['files'])} files, "
        f"medians of {doc['repeats']} repeats (fresh process each), {doc['started']}; load "
        f"average during the runs {min(a[0] for a in doc['load_avg']):.2f}-"
        f"{max(a[0] for a in doc['load_avg']):.2f} (2 cores)",
        "",
        "| loader | load s | x runai | x torch_local | imports + load s | x runai | "
        "RSS beyond returned MiB | fetched MiB | correct |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for loader in LOADERS:
        e = s.get(loader)
        if e is None:
            continue
        lines.append(
            f"| {loader} | {e['wall_s']:.2f} | {e.get('x_runai', 1.0):.2f} | "
            f"{e.get('x_torch_local', 1.0):.2f} | {e['first_s']:.2f} | "
            f"{e.get('first_x_runai', 1.0):.2f} | {e['rss_above_mib']:.0f} | "
            f"{e['fetched_mib']:.0f} | {e['correct']}/{e['runs']} |"
        )
    for kind in ("shared", "each_rank"):
        if f"resharded_{kind}" in s:
            run = doc["resharded"][kind][0]
            lines.append(
                f"\nResharded load, {len(run['ranks'])} gloo ranks (dim 0), {kind}: fetched "
                f"{run['fetched_bytes'] / MIB:.1f} MiB for {run['needed_bytes'] / MIB:.1f} MiB "
                f"the ranks need ({run['fetched_over_needed']:.3f}x), {run['requests']} "
                f"requests, slowest rank {run['wall_s']:.2f} s, bad {run['bad']}"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    elif len(sys.argv) > 2 and sys.argv[1] == "rank":
        rank_worker(json.loads(sys.argv[2]))
    else:
        with contextlib.suppress(KeyboardInterrupt):
            main()
