"""The ``cold`` scenario of ``bench.py``: what a fresh process pays before its loads are warm.

Each repeat runs, in fresh processes, interleaved (the order rotates with the repeat):

- ``floor``: ``python -c "import torch.distributed.checkpoint"``, wall time of the process;
- ``inspect``: ``python -m aiodcp inspect s3://bench/<tiny>`` (a 64-tensor checkpoint), wall time
  of the process; ``inspect / floor`` is the CLI target (DCP's metadata classes are its floor);
- one ``cold_worker.py`` process per loader: ``import torch.distributed.checkpoint`` (timed),
  the loader's import (timed: ``import aiodcp`` for both aiodcp loaders), the state dict built
  as ``worker.py`` builds it, ``--cold-gap-s`` of sleep (default none), then ``--cold-loads``
  loads of the ~400 MiB one-file checkpoint, each timed as ``worker.py`` times a load.
  ``first / warm`` is the first load over the median of the later ones; ``to first loaded`` is
  the loader's import + building the state dict + the first load, i.e. everything the process
  paid for its first load, wherever it was paid.

One untimed ``floor`` and ``inspect`` first (torch's libraries into the page cache); the
checkpoint's pages are read (into the page cache) before each run. Ratios are per repeat,
then the median. aiodcp's bytecode is compiled before the runs (``bench.py`` does it for every
scenario), as pip does when it installs a package.

``--cold-sources`` runs the aiodcp loaders again for each other place their credentials and
endpoint can come from (``SOURCES``; each a ``cold_worker.py`` process of its own, interleaved
with the rest; dcp_optimized only with ``env``):

- ``env``: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` and ``http://127.0.0.1:<port>``;
- ``path``: the same, with the endpoint ``http://127.0.0.1:<port>/s3`` (nginx serves the
  files there too);
- ``profile``: no credentials in the environment; static keys in a credentials file,
  selected with ``AWS_PROFILE``;
- ``process``: a ``credential_process`` (a Python one-liner printing credentials);
- ``web_identity``: ``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN``, STS
  (``AWS_ENDPOINT_URL_STS``) played by tests/credservers.py on 127.0.0.1;
- ``assume_role``: a profile's ``role_arn`` + ``source_profile`` (static keys in the
  credentials file), STS ``AssumeRole`` from the same loopback server (it checks the
  signature);
- ``container``: ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` + ``AWS_CONTAINER_AUTHORIZATION_TOKEN``,
  served by the same loopback server;
- ``imds``: instance metadata (IMDSv2) at ``AWS_EC2_METADATA_SERVICE_ENDPOINT``, the same server.

nginx checks no signature: what is measured is what a process pays to find its credentials
and endpoint (imports, files, requests to the credential service) before its first load.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
COLD_LOADERS = ["aiodcp_sync", "aiodcp_async", "s3tc_dcp_optimized"]
IMPORT_TARGET_S = 0.15
FIRST_TARGET_X = 1.1
SOURCE_TARGET_X = 1.15
"""First load / warm load for every source but ``env`` (issue 20)."""
INSPECT_TARGET_X = 1.2
SOURCES = [
    "env",
    "path",
    "profile",
    "process",
    "web_identity",
    "assume_role",
    "container",
    "imds",
]
_ENV_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _credential_server() -> Any:
    """tests/credservers.py (stdlib only), loaded by path: the benchmarks and the tests share
    one loopback STS / container / IMDS implementation."""
    path = HERE.parent / "tests" / "credservers.py"
    spec = importlib.util.spec_from_file_location("aiodcp_bench_credservers", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def source_setup(
    source: str, env: dict[str, str], endpoint: str, tmp: Path, creds: Any
) -> tuple[dict[str, str], str, dict[str, Any]]:
    """(environment, endpoint, aiodcp options) of one source (see the module docstring)."""
    env = dict(env)
    options: dict[str, Any] = {}
    home = tmp / f"cold-{source}"
    home.mkdir(parents=True, exist_ok=True)
    env["AWS_CONFIG_FILE"] = str(home / "config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(home / "credentials")
    if source in ("env", "path"):
        return env, endpoint + ("/s3" if source == "path" else ""), options
    keys = {k: env.pop(k) for k in _ENV_CREDENTIALS if k in env}
    if source == "profile":
        (home / "credentials").write_text(
            f"[bench]\naws_access_key_id = {keys['AWS_ACCESS_KEY_ID']}\n"
            f"aws_secret_access_key = {keys['AWS_SECRET_ACCESS_KEY']}\n"
        )
        env["AWS_PROFILE"] = "bench"
    elif source == "process":
        answer = json.dumps(
            {
                "Version": 1,
                "AccessKeyId": keys["AWS_ACCESS_KEY_ID"],
                "SecretAccessKey": keys["AWS_SECRET_ACCESS_KEY"],
                "Expiration": "2099-01-01T00:00:00Z",
            }
        )
        (home / "process.py").write_text(f"print({answer!r})\n")
        (home / "config").write_text(
            f'[default]\ncredential_process = "{sys.executable}" "{home / "process.py"}"\n'
        )
    elif source == "assume_role":
        (home / "credentials").write_text(
            f"[base]\naws_access_key_id = {keys['AWS_ACCESS_KEY_ID']}\n"
            f"aws_secret_access_key = {keys['AWS_SECRET_ACCESS_KEY']}\n"
        )
        (home / "config").write_text(
            "[default]\nrole_arn = arn:aws:iam::123456789012:role/bench\nsource_profile = base\n"
        )
        env["AWS_ENDPOINT_URL_STS"] = creds.url
    elif source == "web_identity":
        (home / "token").write_text(creds.web_token)
        env["AWS_WEB_IDENTITY_TOKEN_FILE"] = str(home / "token")
        env["AWS_ROLE_ARN"] = "arn:aws:iam::123456789012:role/bench"
        env["AWS_ENDPOINT_URL_STS"] = creds.url
    elif source == "container":
        env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = creds.url + "/container/credentials"
        env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = creds.container_token
    elif source == "imds":
        env.pop("AWS_EC2_METADATA_DISABLED", None)
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = creds.url
    else:
        raise SystemExit(f"unknown cold source {source!r}; choose from {SOURCES}")
    return env, endpoint, options


@contextlib.contextmanager
def _credentials_served(sources: list[str], env: dict[str, str]) -> Iterator[Any]:
    if not set(sources) & {"web_identity", "assume_role", "container", "imds"}:
        yield None
        return
    module = _credential_server()
    signers = {env["AWS_ACCESS_KEY_ID"]: (env["AWS_SECRET_ACCESS_KEY"], None)}
    with module.CredentialServer(
        mint=module.fixed_credentials(3600.0),
        container_token="bench-container-token",
        signers=signers,
    ) as server:
        yield server


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str | None]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    error = None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-400:]}"
    return wall, error


def run(
    *,
    loaders: list[str],
    repeats: int,
    loads: int,
    gap_s: float,
    sources: list[str] | None = None,
    ckpt: Any,
    tiny: Any,
    endpoint: str,
    env: dict[str, str],
    jobs: Path,
    tmp: Path,
    wait_quiet: Callable[[], float],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Every run of the scenario, and its summary (``summarize``)."""
    sources = sources or ["env"]
    for source in sources:
        if source not in SOURCES:
            raise SystemExit(f"unknown cold source {source!r}; choose from {SOURCES}")
    with _credentials_served(sources, env) as creds:
        return _run(
            loaders=loaders,
            repeats=repeats,
            loads=loads,
            gap_s=gap_s,
            sources=sources,
            ckpt=ckpt,
            tiny=tiny,
            endpoint=endpoint,
            env=env,
            jobs=jobs,
            tmp=tmp,
            wait_quiet=wait_quiet,
            log=log,
            creds=creds,
        )


def _run(
    *,
    loaders: list[str],
    repeats: int,
    loads: int,
    gap_s: float,
    sources: list[str],
    ckpt: Any,
    tiny: Any,
    endpoint: str,
    env: dict[str, str],
    jobs: Path,
    tmp: Path,
    wait_quiet: Callable[[], float],
    log: Callable[[str], None],
    creds: Any,
) -> dict[str, Any]:
    python = sys.executable
    inspect_cmd = [
        *(python, "-m", "aiodcp", "inspect", tiny.url),
        *("--endpoint-url", endpoint, "--addressing-style", "path", "--region", "us-east-1"),
    ]
    floor_cmd = [python, "-c", "import torch.distributed.checkpoint"]
    runs: list[dict[str, Any]] = []
    steps = ["floor", "inspect"]
    for source in sources:
        for loader in loaders:
            if source == "env":
                steps.append(loader)
            elif loader.startswith("aiodcp"):
                steps.append(f"{loader}@{source}")
    # Untimed: torch's libraries and the tiny checkpoint into the page cache.
    for cmd in (floor_cmd, inspect_cmd):
        _timed(cmd, env)
    for repeat in range(repeats):
        shift = repeat % len(steps)
        for step in steps[shift:] + steps[:shift]:
            waited = wait_quiet()
            row: dict[str, Any] = {"repeat": repeat, "step": step, "waited_for_quiet_s": waited}
            if step in ("floor", "inspect"):
                wall, error = _timed(floor_cmd if step == "floor" else inspect_cmd, env)
                row.update(wall_s=wall, ok=error is None, error=error)
                note = f" FAILED: {error}" if error else ""
                log(f"  cold         r{repeat} {step:<20} {wall:7.3f} s{note}")
            else:
                loader, _, source = step.partition("@")
                source_env, source_endpoint, options = source_setup(
                    source or "env", env, endpoint, tmp, creds
                )
                row["source"] = source or "env"
                row.update(
                    _load_run(
                        loader,
                        ckpt,
                        loads,
                        gap_s,
                        source_endpoint,
                        source_env,
                        jobs,
                        tmp,
                        options,
                        step,
                    )
                )
                log(_describe(row))
            runs.append(row)
    gap = f", {gap_s:g} s of sleep before the first load" if gap_s else ""
    loaders = [step for step in steps if step not in ("floor", "inspect")]
    entry = {
        "description": f"fresh processes: import, first load vs warm loads ({loads} loads of "
        f"~{round(ckpt.nbytes / 2**20)} MiB, one file{gap}), `aiodcp inspect` vs "
        "`import torch.distributed.checkpoint`",
        "gap_s": gap_s,
        "checkpoint": ckpt.prefix,
        "inspect_checkpoint": tiny.prefix,
        "sources": sources,
        "runs": runs,
    }
    entry["summary"] = summarize(runs, loaders)
    return entry


def _load_run(
    loader: str,
    ckpt: Any,
    loads: int,
    gap_s: float,
    endpoint: str,
    env: dict[str, str],
    jobs: Path,
    tmp: Path,
    options: dict[str, Any],
    step: str,
) -> dict[str, Any]:
    ckpt._warm()  # the checkpoint's pages in the page cache, as for the other scenarios
    name = step.replace("@", "-")
    result_path = jobs / f"cold-{name}.result"
    result_path.unlink(missing_ok=True)
    base, _, variant = loader.partition("+")  # bench.py's loader variants
    job = {
        "loader": base,
        "url": ckpt.recorded_url if variant == "rec" else ckpt.url,
        "endpoint": endpoint,
        "local_dir": str(ckpt.local_dir),
        "tmp_dir": str(tmp),
        "tensors": ckpt.tensors,
        "keys": None,
        "lag": False,
        "dist": False,
        "aiodcp_options": {
            **options,
            **({"verify_checksums": False} if variant == "noverify" else {}),
        },
        "loads": loads,
        "gap_s": gap_s,
        "result": str(result_path),
    }
    job_path = jobs / f"cold-{name}.json"
    job_path.write_text(json.dumps(job))
    wall, error = _timed([sys.executable, str(HERE / "cold_worker.py"), str(job_path)], env)
    row: dict[str, Any] = {"process_s": wall}
    if error is not None or not result_path.exists():
        return {**row, "ok": False, "error": error or "no result"}
    result = json.loads(result_path.read_text())
    row.update(result)
    loads_s = result["loads_s"]
    row["first_s"] = loads_s[0]
    row["warm_s"] = statistics.median(loads_s[1:]) if len(loads_s) > 1 else None
    row["first_x_warm"] = row["first_s"] / row["warm_s"] if row["warm_s"] else None
    cpu = result.get("cpu_s") or []
    warm_cpu = statistics.median(cpu[1:]) if len(cpu) > 1 else None
    row["first_cpu_s"] = cpu[0] if cpu else None
    row["first_cpu_x_warm"] = cpu[0] / warm_cpu if warm_cpu else None
    row["to_first_loaded_s"] = result["import_loader_s"] + result["build_state_s"] + loads_s[0]
    return row


def _describe(row: dict[str, Any]) -> str:
    head = f"  cold         r{row['repeat']} {row['step']:<20}"
    if not row.get("ok"):
        return f"{head} FAILED: {row.get('error') or row.get('mismatched')}"
    loads = " ".join(f"{x:.3f}" for x in row["loads_s"])
    return (
        f"{head} import dcp {row['import_dcp_s']:.3f} s, loader {row['import_loader_s']:.3f} s, "
        f"state {row['build_state_s']:.3f} s, loads {loads} s (first {row['first_x_warm']:.2f}x "
        f"warm; CPU {_f(row.get('first_cpu_x_warm'))}x), "
        f"gc {' '.join(f'{x:.2f}' for x in row['gc_s'])} s, "
        f"S3 stack imported: {', '.join(row.get('s3_stack') or []) or 'none'}"
    )


def summarize(runs: list[dict[str, Any]], loaders: list[str]) -> dict[str, Any]:
    by_repeat: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        if r.get("ok"):
            by_repeat.setdefault(r["repeat"], {})[r["step"]] = r
    ratios = [
        steps["inspect"]["wall_s"] / steps["floor"]["wall_s"]
        for steps in by_repeat.values()
        if "inspect" in steps and "floor" in steps
    ]
    ok = [r for r in runs if r.get("ok")]
    summary: dict[str, Any] = {
        "floor_s": _median([r["wall_s"] for r in ok if r["step"] == "floor"]),
        "inspect_s": _median([r["wall_s"] for r in ok if r["step"] == "inspect"]),
        "inspect_x_floor": _median(ratios),
        "inspect_x_floor_all": sorted(ratios),
        "loaders": {},
    }
    for loader in loaders:
        rows = [r for r in ok if r["step"] == loader]
        summary["loaders"][loader] = {
            "runs": len([r for r in runs if r["step"] == loader]),
            "ok_runs": len(rows),
            "import_dcp_s": _median([r["import_dcp_s"] for r in rows]),
            "import_loader_s": _median([r["import_loader_s"] for r in rows]),
            "import_loader_max_s": max((r["import_loader_s"] for r in rows), default=None),
            "build_state_s": _median([r["build_state_s"] for r in rows]),
            "first_s": _median([r["first_s"] for r in rows]),
            "warm_s": _median([r["warm_s"] for r in rows if r["warm_s"]]),
            "first_x_warm": _median([r["first_x_warm"] for r in rows if r["first_x_warm"]]),
            "first_x_warm_all": sorted(r["first_x_warm"] for r in rows if r["first_x_warm"]),
            "first_cpu_x_warm": _median(
                [r["first_cpu_x_warm"] for r in rows if r.get("first_cpu_x_warm")]
            ),
            "first_cpu_x_warm_all": sorted(
                r["first_cpu_x_warm"] for r in rows if r.get("first_cpu_x_warm")
            ),
            "first_gc_s": _median([r["gc_s"][0] for r in rows]),
            "to_first_loaded_s": _median([r["to_first_loaded_s"] for r in rows]),
            "s3_stack": sorted({m for r in rows for m in r.get("s3_stack") or []}),
        }
    return summary


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def markdown(entry: dict[str, Any]) -> str:
    s = entry["summary"]
    lines = [
        f"### (8) `cold`: {entry['description']}",
        "",
        "| loader | import s (after DCP's) | build state s | first load s | warm load s | "
        "first / warm | first / warm, CPU | GC in first load s | import + state + first load s | "
        "S3 stack | correct |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for loader, r in s["loaders"].items():
        lines.append(
            f"| {loader} | {_f(r['import_loader_s'], '{:.3f}')} | "
            f"{_f(r['build_state_s'], '{:.3f}')} | {_f(r['first_s'], '{:.3f}')} | "
            f"{_f(r['warm_s'], '{:.3f}')} | "
            f"{_f(r['first_x_warm'])} ({', '.join(f'{x:.2f}' for x in r['first_x_warm_all'])}) | "
            f"{_f(r.get('first_cpu_x_warm'))} "
            f"({', '.join(f'{x:.2f}' for x in r.get('first_cpu_x_warm_all', []))}) | "
            f"{_f(r['first_gc_s'], '{:.3f}')} | {_f(r['to_first_loaded_s'], '{:.3f}')} | "
            f"{', '.join(r['s3_stack']) or 'none'} | {r['ok_runs']}/{r['runs']} |"
        )
    lines += [
        "",
        f"`aiodcp inspect` (64 tensors): {_f(s['inspect_s'], '{:.3f}')} s against "
        f'{_f(s["floor_s"], "{:.3f}")} s for `python -c "import torch.distributed.checkpoint"`: '
        f"{_f(s['inspect_x_floor'])}x (per repeat: "
        f"{', '.join(f'{x:.2f}' for x in s['inspect_x_floor_all'])}).",
        "",
        "| target | aiodcp_sync | aiodcp_async | met |",
        "| --- | ---: | ---: | --- |",
    ]
    sync = s["loaders"].get("aiodcp_sync", {})
    asy = s["loaders"].get("aiodcp_async", {})
    others = sorted({step.partition("@")[2] for step in s["loaders"] if "@" in step})

    def met(values: list[float | None], limit: float) -> str:
        known = [v for v in values if v is not None]
        if not known:
            return "n/a"
        return "yes" if all(v <= limit for v in known) else "**no**"

    imports = [sync.get("import_loader_s"), asy.get("import_loader_s")]
    inspect_x = s["inspect_x_floor"]
    firsts = [sync.get("first_x_warm"), asy.get("first_x_warm")]
    lines += [
        f"| `import aiodcp` adds <= {IMPORT_TARGET_S} s | {_f(imports[0], '{:.3f} s')} | "
        f"{_f(imports[1], '{:.3f} s')} | {met(imports, IMPORT_TARGET_S)} |",
        f"| first load <= {FIRST_TARGET_X}x warm | {_f(firsts[0], '{:.2f}x')} | "
        f"{_f(firsts[1], '{:.2f}x')} | {met(firsts, FIRST_TARGET_X)} |",
        f"| `aiodcp inspect` <= {INSPECT_TARGET_X}x `import torch.distributed.checkpoint` | "
        f"{_f(inspect_x, '{:.2f}x')} | | {met([inspect_x], INSPECT_TARGET_X)} |",
    ]
    for source in others:
        firsts = [
            s["loaders"].get(f"aiodcp_sync@{source}", {}).get("first_x_warm"),
            s["loaders"].get(f"aiodcp_async@{source}", {}).get("first_x_warm"),
        ]
        lines.append(
            f"| first load <= {SOURCE_TARGET_X}x warm, `{source}` | {_f(firsts[0], '{:.2f}x')} | "
            f"{_f(firsts[1], '{:.2f}x')} | {met(firsts, SOURCE_TARGET_X)} |"
        )
    lines.append("")
    return "\n".join(lines)
