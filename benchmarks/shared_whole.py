"""What the job-wide whole-file check costs a shared 2-rank load of a checkpoint without a record.

A state dict of ``--size-mib`` (8 MiB float32 tensors) saved by one process with torch's
``FileSystemWriter`` is uploaded with boto3 (one PUT per file, with its full-object CRC32) to
moto's server on 127.0.0.1 (tests/s3server.py). Two gloo ranks then load all of it with
``dcp.load`` + ``S3StorageReader`` (every item shared: each rank fetches half the bytes and
receives the other half), alternately with ``verify_checksums`` on (the coordinator HEADs the
file, each rank takes the CRCs of its ranges, the last exchange round carries them) and off, in
the same run. Per variant: the median over the repeats of the slower rank's load wall time and
of the two ranks' CPU time (process time during the load), and the ratio on/off.

    .venv/bin/python benchmarks/shared_whole.py [--size-mib 128] [--repeats 5]

moto serves slowly (a Python server), so the load is slower than against S3 and the ratio is a
lower bound of what the check costs relative to the load; the CPU figures are the ranks' own.
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
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def rank_main(url: str, endpoint: str, verify: bool, size_mib: float) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import aiodcp

    dist.init_process_group("gloo")
    try:
        state = template(size_mib)
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        with aiodcp.S3StorageReader(
            url,
            endpoint_url=endpoint,
            region="us-east-1",
            addressing_style="path",
            verify_checksums=verify,
        ) as reader:
            dcp.load(state, storage_reader=reader)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stats = reader.stats
        assert stats is not None and stats.sharing == "shared", stats
        assert all(bool(torch.all(t == 1.0)) for t in state.values())
        print(
            "RESULT "
            + json.dumps(
                {
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "verified": stats.verified_bytes,
                    "unverified": stats.unverified_bytes,
                    "heads": stats.checksum_requests,
                }
            ),
            flush=True,
        )
    finally:
        dist.destroy_process_group()


def template(size_mib: float, fill: float = 0.0) -> dict[str, object]:
    import torch

    n = max(1, int(size_mib // 8))
    return {f"t{i}": torch.full((2 * 1024 * 1024,), fill) for i in range(n)}


def run_job(url: str, endpoint: str, verify: bool, size_mib: float) -> list[dict[str, float]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME="lo",
            RANK=str(rank),
            WORLD_SIZE="2",
            OMP_NUM_THREADS="1",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_EC2_METADATA_DISABLED="true",
        )
        args = [sys.executable, __file__, "--rank", url, endpoint, str(int(verify)), str(size_mib)]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"a rank failed:\n{out[-3000:]}")
        (line,) = [x for x in out.splitlines() if x.startswith("RESULT ")]
        results.append(json.loads(line.removeprefix("RESULT ")))
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank_main(sys.argv[2], sys.argv[3], sys.argv[4] == "1", float(sys.argv[5]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=float, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import boto3
    import torch.distributed.checkpoint as dcp
    from boto3.s3.transfer import TransferConfig

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "requests.jsonl"
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "s3server.py"), "--log", str(log)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline().split()[1])
            endpoint = f"http://127.0.0.1:{port}"
            local = Path(tmp) / "ck"
            dcp.save(template(args.size_mib, 1.0), storage_writer=dcp.FileSystemWriter(str(local)))
            s3 = boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name="us-east-1",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            s3.create_bucket(Bucket=bucket)
            one_put = TransferConfig(multipart_threshold=1 << 40)  # a full-object CRC32
            for path in sorted(local.iterdir()):
                s3.upload_file(str(path), bucket, f"ck/{path.name}", Config=one_put)
            url = f"s3://{bucket}/ck"
            load_avg = os.getloadavg()
            walls: dict[bool, list[float]] = {True: [], False: []}
            cpus: dict[bool, list[float]] = {True: [], False: []}
            for repeat in range(args.repeats):
                for verify in (True, False) if repeat % 2 == 0 else (False, True):
                    ranks = run_job(url, endpoint, verify, args.size_mib)
                    if verify:
                        assert all(r["unverified"] == 0 and r["verified"] > 0 for r in ranks), ranks
                        assert sum(r["heads"] for r in ranks) == 1, ranks
                    walls[verify].append(max(r["wall_s"] for r in ranks))
                    cpus[verify].append(sum(r["cpu_s"] for r in ranks))
        finally:
            server.terminate()
            server.wait(timeout=10)
    on_w, off_w = statistics.median(walls[True]), statistics.median(walls[False])
    on_c, off_c = statistics.median(cpus[True]), statistics.median(cpus[False])
    print(
        f"2-rank shared load, {args.size_mib:g} MiB, moto on 127.0.0.1, {args.repeats} repeats "
        f"alternating, load average before {load_avg[0]:.1f}\n"
        f"  verify on : wall {on_w:.3f} s (slower rank), CPU {on_c:.3f} s (both ranks)\n"
        f"  verify off: wall {off_w:.3f} s, CPU {off_c:.3f} s\n"
        f"  ratio on/off: wall x{on_w / off_w:.3f}, CPU x{on_c / off_c:.3f}\n"
        f"  walls on {sorted(round(w, 3) for w in walls[True])}, "
        f"off {sorted(round(w, 3) for w in walls[False])}"
    )


if __name__ == "__main__":
    main()
