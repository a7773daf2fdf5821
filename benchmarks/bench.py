"""aiodcp benchmark: DCP loads from a local S3 server, aiodcp against its peers.

``make bench`` (or ``benchmarks/run.sh``) builds the venv and runs this. What it does:

1. starts the S3 server on 127.0.0.1 (``--server``):

   - ``nginx`` (default): nginx serving the checkpoint files read-only at S3 path-style URLs
     (``GET``/``HEAD``, ``Range``, ``ETag``/``If-Match``; signatures are not checked) with
     ``sendfile``, so the server spends almost no CPU and the loaders, not the server, share
     the two cores. Requests and body bytes are counted from its access log;
   - ``s3rver``: a full S3 implementation in Node (uploads, listing, signatures) that costs
     about a core per GiB/s; loaders reach it through ``s3proxy.py``, which counts requests
     and bytes on the wire (``--direct``: s3rver counts its own traffic instead);

   and ``s3proxy.py`` in front of the server for the S3-shaped scenario, which adds time to
   first byte and a per-connection bandwidth cap (and counts that scenario's traffic);
2. saves the checkpoints with ``dcp.save`` under ``benchmarks/.data`` (kept between runs, keyed by
   their shape) and, for s3rver, uploads them;
3. for each scenario and repeat, runs every loader once, interleaved (the order rotates with the
   repeat), each in a fresh ``worker.py`` process that checks every loaded tensor bit for bit;
4. writes ``results/latest.json``, ``latest.md`` and ``latest.png`` (``report.py``).

Quick run: ``BENCH_QUICK=1`` or ``--quick``. Everything goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import pickle
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psutil
from botocore.config import Config

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import cold  # noqa: E402
import provenance  # noqa: E402
import report  # noqa: E402
from common import MIB, layer_specs, small_specs, spec_bytes  # noqa: E402

BUCKET = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER"}
ALL_LOADERS = [
    "aiodcp_sync",
    "aiodcp_async",
    "s3tc_dcp_optimized",
    "s3tc_sequential",
    "fsspec_default",
    "fsspec_tuned",
    "boto3_then_fs",
    "local_fs",
    "fetch_only",
]
ALL_SCENARIOS = [
    "full_1file",
    "full_8files",
    "partial",
    "many_small",
    "s3_shaped",
    "dist",
    "loop_lag",
    "cold",
]
SCENARIO_TEXT = {
    "full_1file": "full load, ~{size} MiB, 1 data file",
    "full_8files": "full load, ~{size} MiB, 8 data files (thread_count=8)",
    "partial": "half the tensors (every other stored item in file order) of the 1-file checkpoint",
    "many_small": "{small_count} tensors x {small_kib} KiB, 1 data file",
    "s3_shaped": "full load of the 1-file checkpoint through {latency} ms to first byte and "
    "{mbps} MB/s per connection",
    "dist": "2 gloo ranks load (DTensor Shard(1)) a ~{dist_size} MiB checkpoint saved by 4 ranks "
    "(Shard(0))",
    "loop_lag": "1 ms heartbeat on the event loop during the full 1-file and many-small loads",
    "cold": "fresh processes: import time, first load vs warm loads, `aiodcp inspect` (cold.py)",
}
# Loaders that make no sense in a scenario (see README).
SKIP = {
    "partial": {"fetch_only"},
    "many_small": {"fetch_only"},
    "dist": {"boto3_then_fs", "fetch_only"},
}
BASE_SUFFIX = "@base"
"""Suffix of a loader run from the ``--baseline`` revision's aiodcp."""
VARIANTS = {
    "rec": "the checkpoint's twin whose .metadata carries the integrity record an aiodcp save "
    "writes (data GETs pinned to the recorded ETags, every item checked: the verified path)",
    "noverify": "verify_checksums=False (nothing checked, nothing pinned by a record)",
}
"""``<aiodcp loader>+<variant>``: the same loader on a variant of the load."""


def split_loader(name: str) -> tuple[str, str | None]:
    """``"aiodcp_sync+rec"`` -> ``("aiodcp_sync", "rec")``; ``@base`` stays on the name."""
    base, _, variant = name.partition("+")
    return base, variant or None


LAG_LOADERS = ["aiodcp_async", "aiodcp_sync", "s3tc_dcp_optimized"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on 127.0.0.1:{port}")


# ------------------------------------------------------------------------------ servers


NGINX_CONF = """\
{load_echo}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format counted '$msec $request_time $connection $status $body_bytes_sent '
                       '$request_method "$http_range"';
    access_log {prefix}/access.log counted;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    root {prefix}/root;
    server {{
        listen 127.0.0.1:{port};
        location /{bucket}/ {{
            limit_except GET {{ deny all; }}
        }}
        # the same files under a path, as a gateway serving S3 at http://host/s3 would
        location /s3/{bucket}/ {{
            limit_except GET {{ deny all; }}
            alias {prefix}/root/{bucket}/;
        }}
    }}
{shaped}
}}
"""
# The S3-shaped server: the echo module's echo_sleep holds each request for the time to first
# byte, then hands it to a location that paces the body with limit_rate. nginx sends up to
# sendfile_max_chunk (1 MiB), then waits chunk / rate (in whole ms: 13 ms per MiB at 80 MB/s):
# the same shape as s3proxy.py's pacing (a first 1 MiB at once, then the rate).
NGINX_SHAPED = """\
    server {{
        listen 127.0.0.1:{port};
        location /{bucket}/ {{
            limit_except GET {{ deny all; }}
            echo_sleep {latency_s};
            echo_exec @paced;
        }}
        location @paced {{
            limit_rate {bandwidth};
            sendfile_max_chunk 1m;
        }}
    }}
"""
NGINX_ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


def nginx_binary() -> str:
    """nginx on PATH, or Debian's place for it (root's PATH has /usr/sbin, others may not)."""
    return shutil.which("nginx") or "/usr/sbin/nginx"


def access_log_stats(lines: list[str]) -> dict[str, Any]:
    """The proxy's counters (``s3proxy.Counters``) from nginx access-log lines in the
    ``counted`` format: ``msec request_time connection status body_bytes method "range"``."""
    stats: dict[str, Any] = {
        "requests": 0,
        "by_method": {},
        "ranged_gets": 0,
        "body_bytes": 0,
        "header_bytes": None,  # not in the log format (the proxy counts them)
        "request_bytes": None,
        "connections": 0,
        "max_in_flight": 0,
        "statuses": {},
        "upstream_reconnects": None,  # no upstream
        "client_aborts": 0,
    }
    connections: set[str] = set()
    events: list[tuple[float, int]] = []
    for line in lines:
        head, _, quoted = line.partition(' "')
        fields = head.split()
        if len(fields) != 6:
            continue
        end, duration, connection, status, body, method = fields
        stats["requests"] += 1
        stats["by_method"][method] = stats["by_method"].get(method, 0) + 1
        if method == "GET" and quoted.rstrip('"\n') not in ("", "-"):
            stats["ranged_gets"] += 1
        stats["body_bytes"] += int(body)
        stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
        if status == "499":  # nginx: the client closed the connection first
            stats["client_aborts"] += 1
        connections.add(connection)
        # Both fields have a 1 ms resolution: a request logged as taking 0 ms still took up to
        # 1 ms, so every request counts as in flight during at least that millisecond.
        finished = float(end)
        events += [(finished - max(float(duration), 0.001), 1), (finished, -1)]
    stats["connections"] = len(connections)
    active = 0
    for _, step in sorted(events, key=lambda e: (e[0], -e[1])):  # starts before ends on ties
        active += step
        stats["max_in_flight"] = max(stats["max_in_flight"], active)
    return stats


class Servers:
    """The S3 server and the shaping/counting proxy, all on 127.0.0.1, stopped on exit.

    ``kind="nginx"``: nginx serves ``data/ckpt`` as bucket ``bench`` (read-only, files in
    place, nothing uploaded) and counts in its access log; only shaped runs go through the
    proxy. ``kind="s3rver"``: every run goes through the counting proxy unless ``direct``, where
    s3rver counts its own traffic (``s3rver_counting.js``) and only shaped runs use the proxy.
    """

    def __init__(
        self,
        data: Path,
        *,
        kind: str = "nginx",
        direct: bool = False,
        shaping: dict[str, float] | None = None,
    ) -> None:
        self.data = data
        self.kind = kind
        self.direct = direct or kind == "nginx"
        self.shaping = shaping or {}
        self.procs: list[subprocess.Popen[Any]] = []
        self._counted_by_proxy = True
        self._log_offset = 0
        self.shaped_port: int | None = None  # nginx shapes itself when it has the echo module

    @property
    def uploads(self) -> bool:
        """Whether checkpoints must be uploaded (nginx serves the saved files in place)."""
        return self.kind != "nginx"

    def __enter__(self) -> Servers:
        self.s3_port = free_port()
        if self.kind == "nginx":
            server = self._start_nginx()
        else:
            server = self._start_s3rver()
        proxy = subprocess.Popen(
            [sys.executable, str(HERE / "s3proxy.py"), "--upstream-port", str(self.s3_port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proxy)
        assert proxy.stdout is not None
        line = proxy.stdout.readline()
        if not line.startswith("PORT "):
            raise SystemExit(f"the proxy did not start: {line!r}")
        self.proxy_port = int(line.split()[1])
        self.server_proc = psutil.Process(server.pid)
        self.proxy_proc = psutil.Process(proxy.pid)
        return self

    def _start_nginx(self) -> subprocess.Popen[Any]:
        nginx = nginx_binary()
        if not Path(nginx).exists():
            raise SystemExit(
                "nginx is not installed: `apt-get install nginx-light` (run.sh does it when it "
                "can), or run with --server s3rver"
            )
        prefix = self.data / "nginx"
        for sub in ("tmp", "conf", "root"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        self.access_log = prefix / "access.log"
        self.access_log.write_bytes(b"")
        (self.data / "ckpt").mkdir(parents=True, exist_ok=True)
        bucket_dir = prefix / "root" / BUCKET  # s3://bench/<prefix>/<name> is ckpt/<prefix>/<name>
        if bucket_dir.is_symlink() or bucket_dir.exists():
            bucket_dir.unlink()
        bucket_dir.symlink_to(self.data / "ckpt", target_is_directory=True)
        shaped = ""
        if self.shaping and NGINX_ECHO_MODULE.exists():
            self.shaped_port = free_port()
            shaped = NGINX_SHAPED.format(
                port=self.shaped_port,
                bucket=BUCKET,
                latency_s=f"{self.shaping['latency_ms'] / 1000:.3f}",
                bandwidth=int(self.shaping["bandwidth"]),
            )
        conf = prefix / "conf" / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                load_echo=f"load_module {NGINX_ECHO_MODULE};" if shaped else "",
                prefix=prefix,
                port=self.s3_port,
                bucket=BUCKET,
                shaped=shaped,
            )
        )
        log = open(prefix / "stdout.log", "ab")
        server = subprocess.Popen(
            [nginx, "-p", str(prefix), "-c", str(conf)], stdout=log, stderr=log
        )
        self.procs.append(server)
        wait_port(self.s3_port, server, "nginx")
        if self.shaped_port is not None:
            wait_port(self.shaped_port, server, "nginx (shaped)")
        return server

    def _start_s3rver(self) -> subprocess.Popen[Any]:
        s3rver = HERE / "node_modules" / ".bin" / "s3rver"
        if not s3rver.exists():
            raise SystemExit("s3rver is not installed: run `make bench` or `npm ci` in benchmarks/")
        (self.data / "s3rver").mkdir(parents=True, exist_ok=True)
        log = open(self.data / "s3rver.log", "ab")
        if self.direct:  # s3rver counting its own traffic (s3rver_counting.js)
            self.stats_port = free_port()
            cmd = [
                "node",
                str(HERE / "s3rver_counting.js"),
                *(str(self.data / "s3rver"), str(self.s3_port), BUCKET, str(self.stats_port)),
            ]
        else:
            cmd = [
                str(s3rver),
                *("-d", str(self.data / "s3rver"), "-a", "127.0.0.1", "-p", str(self.s3_port)),
                *("--silent", "--configure-bucket", BUCKET),
            ]
        server = subprocess.Popen(cmd, stdout=log, stderr=log)
        self.procs.append(server)
        wait_port(self.s3_port, server, "s3rver")
        if self.direct:
            wait_port(self.stats_port, server, "s3rver's counters")
        return server

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def describe(self) -> str:
        if self.kind == "nginx":
            version = subprocess.run(
                [nginx_binary(), "-v"], capture_output=True, text=True
            ).stderr.strip()
            return f"{version.split(': ')[-1]} (read-only S3 GET endpoint, sendfile)"
        s3rver_pkg = json.loads((HERE / "node_modules" / "s3rver" / "package.json").read_text())
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
        return f"s3rver {s3rver_pkg['version']} (node {node.strip()})"

    @property
    def direct_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def _proxied(self, shaping: dict[str, float] | None) -> bool:
        """Whether a run goes through the proxy: always, unless direct and no shaping (or the
        shaping is nginx's own)."""
        if shaping and self.shaped_port is not None:
            return False
        return not self.direct or bool(shaping)

    def endpoint(self, shaping: dict[str, float] | None) -> str:
        """Where a loader sends its requests."""
        if shaping and self.shaped_port is not None:
            return f"http://127.0.0.1:{self.shaped_port}"
        return self.proxy_url if self._proxied(shaping) else self.direct_url

    def shaped_by(self) -> str:
        if self.shaped_port is not None:
            return "nginx (echo_sleep, limit_rate)"
        return "s3proxy.py"

    def control(self, action: str, **query: float) -> dict[str, Any]:
        """``reset`` (with the shaping, if any) or ``stats`` of whichever counts the run."""
        if action == "reset":
            self._counted_by_proxy = self._proxied(query)
            if self.kind == "nginx" and not self._counted_by_proxy:
                self._log_offset = self.access_log.stat().st_size
                return {}
        if self._counted_by_proxy:
            qs = "&".join(f"{k}={v}" for k, v in query.items())
            url = f"{self.proxy_url}/__bench__/{action}" + (f"?{qs}" if qs else "")
        elif self.kind == "nginx":
            return access_log_stats(self._new_log_lines())
        else:
            url = f"http://127.0.0.1:{self.stats_port}/{action}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return dict(json.loads(response.read()))

    def _new_log_lines(self) -> list[str]:
        """Access-log lines since the last reset. nginx logs a request when it completes, which
        can follow the client's exit by a moment: read until the log stops growing."""
        size, deadline = -1, time.monotonic() + 2.0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.access_log.stat().st_size
            if now == size:
                break
            size = now
        with open(self.access_log, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode("latin-1").splitlines()

    def cpu_seconds(self) -> tuple[float, float]:
        def total(p: psutil.Process) -> float:
            t = p.cpu_times()
            return float(t.user + t.system)

        def tree(p: psutil.Process) -> float:  # nginx's master and its worker
            with contextlib.suppress(psutil.Error):
                return total(p) + sum(total(c) for c in p.children())
            return 0.0

        return tree(self.server_proc), total(self.proxy_proc)


# ------------------------------------------------------------------------------ checkpoints


class Checkpoint:
    """A checkpoint saved under .data/ckpt/<name>-<hash> and uploaded to s3://bench/<same>."""

    def __init__(self, name: str, tensors: list[Any], files: int = 1, ranks: int = 1) -> None:
        self.name = name
        self.tensors = tensors
        self.files = files
        self.ranks = ranks
        digest = hashlib.sha1(json.dumps([tensors, files, ranks]).encode()).hexdigest()[:10]
        self.prefix = f"{name}-{digest}"
        self.url = f"s3://{BUCKET}/{self.prefix}"
        self.local_dir: Path = Path()
        self.metadata: Any = None

    @property
    def nbytes(self) -> int:
        return spec_bytes(self.tensors)

    def ensure(self, data: Path, servers: Servers, python: str, env: dict[str, str]) -> None:
        self.local_dir = data / "ckpt" / self.prefix
        done = self.local_dir / ".complete"
        if not done.exists():
            shutil.rmtree(self.local_dir, ignore_errors=True)
            self.local_dir.mkdir(parents=True)
            t0 = time.perf_counter()
            job = data / "jobs" / f"save-{self.prefix}.json"
            job.parent.mkdir(parents=True, exist_ok=True)
            spec = {"tensors": self.tensors, "out": str(self.local_dir), "files": self.files}
            job.write_text(json.dumps(spec))
            worker = [python, str(HERE / "worker.py")]
            if self.ranks == 1:
                subprocess.run([*worker, "save", str(job)], env=env, check=True)
            else:
                run_ranks([*worker, "save-dist", str(job)], self.ranks, env)
            done.write_text("")
            log(f"  saved {self.prefix} in {time.perf_counter() - t0:.1f} s")
        self._warm()
        if not servers.uploads:
            return
        s3 = boto3.client(
            "s3",
            endpoint_url=servers.direct_url,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )
        names = sorted(p.name for p in self.local_dir.iterdir() if p.name != ".complete")
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=self.prefix + "/").get("Contents", [])
        remote = {o["Key"].rsplit("/", 1)[1]: o["Size"] for o in listed}
        local = {n: (self.local_dir / n).stat().st_size for n in names}
        if remote != local:
            t0 = time.perf_counter()
            for n in names:
                s3.upload_file(str(self.local_dir / n), BUCKET, f"{self.prefix}/{n}")
            log(f"  uploaded {self.prefix} in {time.perf_counter() - t0:.1f} s")

    @property
    def recorded_url(self) -> str:
        """The twin with an integrity record (``ensure_recorded``)."""
        return f"{self.url}-rec"

    def ensure_recorded(
        self, data: Path, servers: Servers, python: str, env: dict[str, str]
    ) -> None:
        """The twin ``s3://bench/<prefix>-rec`` (``recorded_twin``)."""
        recorded_twin(self.local_dir, self.prefix, data, servers, python, env)

    def _warm(self) -> None:
        with open(self.local_dir / ".metadata", "rb") as f:
            self.metadata = pickle.load(f)  # our own file, just written by dcp.save
        for p in self.local_dir.iterdir():  # warm the page cache (local floor; nginx)
            with open(p, "rb") as f:
                while f.read(16 * MIB):
                    pass

    def files_and_sizes(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in self.local_dir.iterdir() if p.name != ".complete"}

    def items_in_file_order(self) -> list[tuple[str, int, int]]:
        """(fqn, offset, length) of every stored item, in (file, offset) order."""
        rows = []
        for index, info in self.metadata.storage_data.items():
            rows.append((info.relative_path, info.offset, info.length, index.fqn))
        rows.sort()
        return [(fqn, offset, length) for _, offset, length, fqn in rows]

    def needed_bytes(self, keys: set[str] | None) -> int:
        md_size = (self.local_dir / ".metadata").stat().st_size
        total = sum(
            info.length
            for index, info in self.metadata.storage_data.items()
            if keys is None or index.fqn in keys
        )
        return total + md_size


def recorded_twin(
    local_dir: Path, prefix: str, data: Path, servers: Servers, python: str, env: dict[str, str]
) -> None:
    """The twin ``s3://bench/<prefix>-rec`` of the checkpoint in ``local_dir``: the same data
    files (symlinks that nginx serves with the originals' ETags; uploaded again for s3rver) and
    a ``.metadata`` with the integrity record of an aiodcp save (``worker.py record``), ETags as
    the server answers them."""
    twin = data / "ckpt" / f"{prefix}-rec"
    twin.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in local_dir.iterdir() if p.name not in (".complete", ".metadata"))
    s3 = boto3.client(
        "s3",
        endpoint_url=servers.direct_url,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    for n in names:
        link = twin / n
        if not link.is_symlink():
            link.symlink_to(local_dir / n)
        if servers.uploads:
            s3.upload_file(str(local_dir / n), BUCKET, f"{prefix}-rec/{n}")
    etags = {n: s3.head_object(Bucket=BUCKET, Key=f"{prefix}-rec/{n}")["ETag"] for n in names}
    job = data / "jobs" / f"record-{prefix}.json"
    job.parent.mkdir(parents=True, exist_ok=True)
    job.write_text(json.dumps({"dir": str(local_dir), "etags": etags, "out": str(twin)}))
    subprocess.run([python, str(HERE / "worker.py"), "record", str(job)], env=env, check=True)
    if servers.uploads:
        s3.upload_file(str(twin / ".metadata"), BUCKET, f"{prefix}-rec/.metadata")


def run_ranks(cmd: list[str], world: int, env: dict[str, str], timeout: float = 1800) -> None:
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = dict(
            env,
            # As torchrun does with several processes per node: one intra-op thread per rank
            # (2 ranks x 2 OpenMP threads on 2 cores made torch's copies spin against each other).
            OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME="lo",
        )
        procs.append(subprocess.Popen(cmd, env=rank_env))
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            codes.append(-9)
    if any(codes):
        raise RuntimeError(f"{cmd[-2]} ranks exited with {codes}")


# ------------------------------------------------------------------------------ runs


def busy_cpu_seconds() -> float:
    """Non-idle CPU seconds of the whole machine since boot."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (the workers)."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def log(msg: str) -> None:
    print(msg, flush=True)


def child_env(aiodcp_src: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AWS_") and k not in ("PYTHONPATH", "BENCH_QUICK")
    }
    env.update(CREDENTIALS)
    env.update(
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONPATH=str(aiodcp_src),
        PYTHONUNBUFFERED="1",
        MPLBACKEND="Agg",
    )
    return env


def compile_bytecode(src: Path) -> None:
    """Compile aiodcp's modules (as pip does on install): the cold scenario times imports, and
    PYTHONDONTWRITEBYTECODE (set here) would make every process compile them again."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(src / "aiodcp")], env=env, check=True
    )


def aiodcp_source(rev: str, data: Path) -> tuple[Path, str]:
    """Where children import aiodcp from, and a description of that code."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if rev == "worktree":
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return REPO / "src", f"{head[:12]}{' + uncommitted src changes' if dirty else ''}"
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    target = data / "aiodcp-src" / commit
    if not (target / "src" / "aiodcp").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit, "src"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "src", f"{commit[:12]} (git archive of {rev})"


class Runner:
    def __init__(
        self,
        args: argparse.Namespace,
        servers: Servers,
        env: dict[str, str],
        data: Path,
        base_env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.servers = servers
        self.env = env
        self.base_env = base_env
        self.data = data
        self.jobs = data / "jobs"
        self.jobs.mkdir(parents=True, exist_ok=True)
        (data / "tmp").mkdir(parents=True, exist_ok=True)

    def wait_quiet(self) -> float:
        """Wait (up to --quiet-wait s) until other processes use < 15% of the machine."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < self.args.quiet_wait:
            busy0, ours0 = busy_cpu_seconds(), sum(self.servers.cpu_seconds())
            time.sleep(1.0)
            foreign = busy_cpu_seconds() - busy0 - (sum(self.servers.cpu_seconds()) - ours0)
            if foreign / (os.cpu_count() or 1) < 0.15:
                break
        return time.perf_counter() - t0

    def run(
        self,
        scenario: str,
        loader: str,
        ckpt: Checkpoint,
        *,
        keys: list[str] | None = None,
        shaping: dict[str, float] | None = None,
        lag: bool = False,
        repeat: int = 0,
    ) -> dict[str, Any]:
        job_path = self.jobs / f"{scenario}-{loader}.json"
        result_path = self.jobs / f"{scenario}-{loader}.result"
        for stale in self.jobs.glob(f"{scenario}-{loader}.result*"):
            stale.unlink()
        env = self.env
        if loader.endswith(BASE_SUFFIX):
            if self.base_env is None:
                raise ValueError(f"{loader}: no --baseline revision given")
            env = self.base_env
        base_loader, variant = split_loader(loader)
        aiodcp_options = dict(self.args.aiodcp_options)
        if variant == "noverify":
            aiodcp_options["verify_checksums"] = False
        job = {
            "loader": base_loader.removesuffix(BASE_SUFFIX),
            "url": ckpt.recorded_url if variant == "rec" else ckpt.url,
            "endpoint": self.servers.endpoint(shaping),
            "local_dir": str(ckpt.local_dir),
            "tmp_dir": str(self.data / "tmp"),
            "tensors": ckpt.tensors,
            "keys": keys,
            "lag": lag,
            "dist": ckpt.ranks > 1,
            "fsspec_block_size": int(self.args.fsspec_block_mib * MIB),
            "aiodcp_options": aiodcp_options,
            "result": str(result_path),
        }
        job_path.write_text(json.dumps(job))
        cmd = [sys.executable, str(HERE / "worker.py"), "load", str(job_path)]
        if self.args.profile and loader in self.args.profile:
            out = Path(self.args.out) / f"profile-{scenario}-{ckpt.name}-{loader}-r{repeat}"
            cmd = [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--rate",
                "250",
                "--threads",
                "--idle",
                "--subprocesses",
                "--format",
                "raw",
                "-o",
                f"{out}.txt",
                "--",
                *cmd,
            ]
        waited = self.wait_quiet()
        self.servers.control("reset", **(shaping or {}))
        cpu0 = self.servers.cpu_seconds()
        busy0, ours0 = busy_cpu_seconds(), own_cpu_seconds()
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        error = None
        try:
            if ckpt.ranks > 1:
                run_ranks(cmd, 2, env, timeout=self.args.run_timeout)
            else:
                subprocess.run(cmd, env=env, check=True, timeout=self.args.run_timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError) as exc:
            error = str(exc)
        elapsed = time.perf_counter() - t0
        traffic = self.servers.control("stats")
        cpu1 = self.servers.cpu_seconds()
        busy = busy_cpu_seconds() - busy0
        ours = own_cpu_seconds() - ours0 + (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])
        parts = sorted(self.jobs.glob(f"{scenario}-{loader}.result*"))
        results = [json.loads(p.read_text()) for p in parts]
        row: dict[str, Any] = {
            "scenario": scenario,
            "loader": loader,
            "repeat": repeat,
            "process_s": elapsed,
            "loadavg_1m_before": load0,
            "waited_for_quiet_s": waited,
            # CPU used by processes that are not this benchmark's (other users' tests...), as a
            # share of the machine during the run: a contamination indicator.
            "foreign_cpu_share": max(0.0, busy - ours) / ((os.cpu_count() or 1) * elapsed),
            "server_cpu_s": cpu1[0] - cpu0[0],
            "proxy_cpu_s": cpu1[1] - cpu0[1],
            "fetched_bytes": traffic["body_bytes"],
            "requests": traffic["requests"],
            "max_in_flight": traffic["max_in_flight"],
            "connections": traffic["connections"],
            "traffic": traffic,
        }
        if not results or error:
            row.update(ok=False, error=error or "no result", wall_s=None, rss_above=None)
            for r in results:
                row.setdefault("worker_error", r.get("error"))
            return row
        expected = 2 if ckpt.ranks > 1 else 1
        row["ok"] = len(results) == expected and all(r.get("ok") for r in results)
        row["wall_s"] = max(r["wall_s"] for r in results)
        row["cpu_s"] = sum(r.get("cpu_s", 0.0) for r in results)  # the loading processes, all ranks
        row["rss_above"] = max(r["rss_above"] for r in results)
        row["rss_baseline"] = max(r["rss_baseline"] for r in results)
        row["rss_method"] = results[0]["rss_method"]  # common.PeakRSS: "VmHWM" where allowed
        row["machine_reclaimed_pages"] = max(r.get("machine_reclaimed_pages", 0) for r in results)
        row["mismatched"] = sorted({m for r in results for m in r.get("mismatched", [])})
        row["gc_s"] = max(r.get("gc_s", 0.0) for r in results)  # garbage collection in the load
        for key in ("aiodcp_stats", "lag_ms"):
            if key in results[0]:
                row[key] = results[0][key] if len(results) == 1 else [r[key] for r in results]
        return row


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    quick_env = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    p = argparse.ArgumentParser(description="aiodcp benchmark against its peers (127.0.0.1 only)")
    p.add_argument("--quick", action="store_true", default=quick_env, help="small, fast run")
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS))
    p.add_argument(
        "--loaders",
        default=",".join(ALL_LOADERS),
        help="comma-separated loaders; an aiodcp loader may take a variant: "
        + ", ".join(f"'<loader>+{k}' ({v})" for k, v in VARIANTS.items()),
    )
    p.add_argument("--size-mib", type=float, help="checkpoint size for scenarios 1, 2, 3, 5, 7")
    p.add_argument("--small-count", type=int, help="tensors in the many-small checkpoint")
    p.add_argument("--small-kib", type=int, default=16, help="size of each small tensor")
    p.add_argument("--dist-size-mib", type=float, help="checkpoint size for the dist scenario")
    p.add_argument("--repeats", type=int, help="paired repeats (median reported)")
    p.add_argument(
        "--cold-size-mib", type=float, help="checkpoint size for the cold scenario (default 400)"
    )
    p.add_argument(
        "--cold-loads", type=int, default=3, help="loads per process in the cold scenario"
    )
    p.add_argument(
        "--cold-gap-s",
        type=float,
        default=0.0,
        help="cold scenario: seconds of sleep between building the state dict and the first "
        "load (other work the caller does first; default 0)",
    )
    p.add_argument(
        "--cold-sources",
        default="env",
        help="cold scenario: where aiodcp's credentials and endpoint come from, each a run of "
        f"its own: {','.join(cold.SOURCES)} (default env; see cold.py)",
    )
    p.add_argument("--shaped-latency-ms", type=float, default=20.0)
    p.add_argument("--shaped-mbps", type=float, default=80.0, help="MB/s per connection")
    p.add_argument(
        "--fsspec-block-mib", type=float, default=0.25, help="fsspec_tuned block size (MiB)"
    )
    p.add_argument(
        "--aiodcp-options",
        type=json.loads,
        default={},
        help="JSON of extra aiodcp options, e.g. '{\"memory_budget\": 100663296}' (default: none)",
    )
    p.add_argument(
        "--aiodcp-src",
        default="worktree",
        help="'worktree' (this checkout's src/) or a git revision to benchmark (git archive)",
    )
    p.add_argument(
        "--baseline",
        default="",
        help="a git revision (e.g. main, a commit): its aiodcp loaders run too, as "
        "'<loader>@base', interleaved with the others in the same run, so 'x base' ratios "
        "compare two versions of aiodcp on the same server and machine",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        help="before each run, wait up to this many seconds for other processes to go quiet "
        "(default 5, quick 0)",
    )
    p.add_argument(
        "--server",
        choices=["nginx", "s3rver"],
        default="nginx",
        help="nginx (default): read-only S3 GETs with sendfile, almost no server CPU; s3rver: a "
        "full S3 implementation in Node that takes about a core per GiB/s",
    )
    p.add_argument(
        "--direct",
        action="store_true",
        help="with --server s3rver: loaders talk to s3rver directly, which counts its own "
        "traffic (s3rver_counting.js); only the S3-shaped scenario goes through the proxy "
        "(always so with nginx)",
    )
    p.add_argument("--run-timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--name", default="latest", help="results/<name>.json/.md/.png")
    p.add_argument(
        "--profile",
        default="",
        help="comma-separated loaders to run under py-spy (raw stacks to results/profile-*.txt)",
    )
    args = p.parse_args(argv)
    defaults = (
        {
            "size_mib": 128,
            "small_count": 2000,
            "dist_size_mib": 64,
            "cold_size_mib": 128,
            "repeats": 1,
            "quiet_wait": 0,
        }
        if args.quick
        else {
            "size_mib": 1024,
            "small_count": 20000,
            "dist_size_mib": 512,
            "cold_size_mib": 400,
            "repeats": 3,
            "quiet_wait": 5,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.loaders = [x for x in args.loaders.split(",") if x]
    args.profile = {x for x in args.profile.split(",") if x}
    for s in args.scenarios:
        if s not in ALL_SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose from {ALL_SCENARIOS}")
    if args.baseline:
        args.loaders += [f"{x}{BASE_SUFFIX}" for x in args.loaders if x.startswith("aiodcp_")]
    for x in args.loaders:
        base, variant = split_loader(x)
        if base.removesuffix(BASE_SUFFIX) not in ALL_LOADERS:
            p.error(f"unknown loader {x!r}; choose from {ALL_LOADERS}")
        if variant is not None and (
            variant not in VARIANTS or not base.startswith("aiodcp_") or BASE_SUFFIX in base
        ):
            p.error(
                f"{x!r}: a variant is '<aiodcp loader>+<variant>' with a variant of "
                f"{sorted(VARIANTS)} (not on {BASE_SUFFIX} loaders)"
            )
    return args


def machine_info(aiodcp_desc: str) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": "none",
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "aiodcp": aiodcp_desc,
        "s3torchconnector": version("s3torchconnector"),
        "s3torchconnectorclient": version("s3torchconnectorclient"),
        "s3fs": version("s3fs"),
        "fsspec": version("fsspec"),
        "aiobotocore": version("aiobotocore"),
        "boto3": version("boto3"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **provenance.collect(),  # command line, harness revision, load average at the start
    }


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    log(f"{label} took {time.perf_counter() - t0:.0f} s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The orchestrator uploads with boto3: the local server's fixed credentials, and never the
    # instance-metadata address or a configured profile/endpoint.
    for var in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[var]
    os.environ.update(CREDENTIALS, AWS_EC2_METADATA_DISABLED="true")
    data = HERE / ".data"
    data.mkdir(exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src, aiodcp_desc = aiodcp_source(args.aiodcp_src, data)
    env = child_env(src)
    compile_bytecode(src)
    base_env = None
    meta = machine_info(aiodcp_desc)
    if args.baseline:
        base_src, base_desc = aiodcp_source(args.baseline, data)
        compile_bytecode(base_src)
        base_env = child_env(base_src)
        meta["aiodcp_baseline"] = base_desc
    scenarios = args.scenarios
    big_specs = layer_specs(args.size_mib)
    ckpts = {
        "big1": Checkpoint("big1", big_specs, files=1),
        "big8": Checkpoint("big8", big_specs, files=8),
        "small": Checkpoint("small", small_specs(args.small_count, args.small_kib)),
        "dist": Checkpoint("dist", layer_specs(args.dist_size_mib, dist=True), ranks=4),
        "cold": Checkpoint("cold", layer_specs(args.cold_size_mib), files=1),
        "tiny": Checkpoint("tiny", small_specs(64, 16), files=1),
    }
    uses = {
        "full_1file": "big1",
        "full_8files": "big8",
        "partial": "big1",
        "many_small": "small",
        "s3_shaped": "big1",
        "dist": "dist",
        "loop_lag": "big1",
        "cold": "cold",
    }
    needed_ckpts = {uses[s] for s in scenarios} | ({"small"} if "loop_lag" in scenarios else set())
    needed_ckpts |= {"tiny"} if "cold" in scenarios else set()
    results: dict[str, Any] = {
        "meta": meta,
        "config": {
            k: (sorted(v) if isinstance(v, set) else v)
            for k, v in vars(args).items()
            if k not in ("out",)
        },
        "scenarios": {},
    }
    started = time.perf_counter()
    shaping = {"latency_ms": args.shaped_latency_ms, "bandwidth": args.shaped_mbps * 1e6}
    with Servers(data, kind=args.server, direct=args.direct, shaping=shaping) as servers:
        meta["server"] = servers.describe()
        meta["server_kind"] = servers.kind
        meta["direct"] = servers.direct
        meta["shaped_by"] = servers.shaped_by()
        if base_env is not None:
            log(f"baseline (loaders {BASE_SUFFIX}): aiodcp {meta['aiodcp_baseline']}")
        log(f"aiodcp {aiodcp_desc}; torch {meta['torch']}; {meta['server']}; {meta['cpu_model']}")
        with timed("checkpoints"):
            for name in sorted(needed_ckpts):
                ckpts[name].ensure(data, servers, sys.executable, env)
                if any(split_loader(x)[1] == "rec" for x in args.loaders):
                    ckpts[name].ensure_recorded(data, servers, sys.executable, env)
        runner = Runner(args, servers, env, data, base_env)
        for scenario in [s for s in scenarios if s != "cold"]:
            ckpt = ckpts[uses[scenario]]
            keys: list[str] | None = None
            if scenario == "partial":
                keys = [fqn for fqn, _, _ in ckpt.items_in_file_order()[::2]]
            if scenario == "loop_lag":
                # (and their --baseline twins, so a lag can be compared between revisions)
                loaders = [x for x in args.loaders if x.removesuffix(BASE_SUFFIX) in LAG_LOADERS]
                targets = [ckpts["big1"], ckpts["small"]]
            else:
                loaders = [x for x in args.loaders if x not in SKIP.get(scenario, set())]
                targets = [ckpt]
            shaping = (
                {"latency_ms": args.shaped_latency_ms, "bandwidth": args.shaped_mbps * 1e6}
                if scenario == "s3_shaped"
                else None
            )
            entry: dict[str, Any] = {
                "description": SCENARIO_TEXT[scenario].format(
                    size=round(spec_bytes(big_specs) / MIB),
                    small_count=args.small_count,
                    small_kib=args.small_kib,
                    latency=args.shaped_latency_ms,
                    mbps=args.shaped_mbps,
                    dist_size=round(ckpts["dist"].nbytes / MIB),
                ),
                "checkpoint": {
                    t.prefix: {"tensor_bytes": t.nbytes, "files": t.files_and_sizes()}
                    for t in targets
                },
                "needed_bytes": ckpt.needed_bytes(set(keys) if keys else None)
                * (2 if ckpt.ranks > 1 else 1),
                "keys_loaded": len(keys) if keys else len(ckpt.tensors),
                "runs": [],
            }
            results["scenarios"][scenario] = entry
            with timed(f"scenario {scenario}"):
                for repeat in range(args.repeats):
                    for target in targets:
                        shift = repeat % len(loaders)
                        for loader in loaders[shift:] + loaders[:shift]:
                            row = runner.run(
                                scenario,
                                loader,
                                target,
                                keys=keys,
                                shaping=shaping,
                                lag=scenario == "loop_lag",
                                repeat=repeat,
                            )
                            row["checkpoint"] = target.prefix
                            entry["runs"].append(row)
                            log(report.describe_run(row))
            results["total_s"] = time.perf_counter() - started
            report.write(results, out, args.name)  # after every scenario: partial results
        if "cold" in scenarios:
            with timed("scenario cold"):
                results["cold"] = cold.run(
                    loaders=[x for x in args.loaders if split_loader(x)[0] in cold.COLD_LOADERS],
                    repeats=args.repeats,
                    loads=args.cold_loads,
                    gap_s=args.cold_gap_s,
                    sources=args.cold_sources.split(","),
                    ckpt=ckpts["cold"],
                    tiny=ckpts["tiny"],
                    endpoint=servers.direct_url,
                    env=env,
                    jobs=runner.jobs,
                    tmp=data / "tmp",
                    wait_quiet=runner.wait_quiet,
                    log=log,
                )
            results["total_s"] = time.perf_counter() - started
            report.write(results, out, args.name)
            section = cold.markdown(results["cold"])
            with open(out / f"{args.name}.md", "a") as f:
                f.write("\n" + section)
            log(section)
    log(f"total {time.perf_counter() - started:.0f} s; results in {out}/{args.name}.*")


if __name__ == "__main__":
    main()
