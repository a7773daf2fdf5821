"""The steps every entry point takes once per load, written once.

Data flow::

    fetch_metadata(store, path, recorder, rank=None)     on the I/O loop
        -> GET .metadata (or __{rank}.metadata), timed: its estimated time to first byte is
           what max_gap_size="auto" is resolved with (_planner.request_latency_from_get);
           a missing object says "is this a DCP checkpoint?"; counted in ``recorder``
        -> FetchedMetadata(data, key, request_latency_s)
    FetchedMetadata.parse()                              off the loop (a large .metadata
        -> dcp._metadata.load_metadata                   takes long to unpickle)
    run_dcp_load(state_dict, reader, ...)                in the thread that decodes
        -> torch's dcp.load; its CheckpointException is unwrapped to this rank's own error
    select_keys(requested, fqns)                         prefetch(keys=...), aiodcp plan --keys
        -> the fqns the keys select (a key selects itself and every fqn below ``key.``),
           and for each unknown key its close matches
    run_in_thread(fn, on_cancel=...)                     from a coroutine
        -> fn in a fresh thread; cancelling the awaiting task calls on_cancel and waits for
           the thread to finish before re-raising

Callers: ``S3StorageReader.read_metadata``, ``load_checkpoint``, ``PrefetchHandle`` and the
CLI's ``inspect``/``plan``.
"""

from __future__ import annotations

import asyncio
import difflib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlanner
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.storage import StorageReader

from .._errors import NoSuchBucketError, NotFoundError
from .._path import CheckpointPath
from .._planner import request_latency_from_get
from .._stats import StatsRecorder
from ._metadata import load_metadata

if TYPE_CHECKING:
    from .._store import S3Store

__all__ = [
    "METADATA_NAME",
    "FetchedMetadata",
    "fetch_metadata",
    "run_dcp_load",
    "run_in_thread",
    "select_keys",
]

METADATA_NAME = ".metadata"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FetchedMetadata:
    """The bytes of one ``.metadata`` GET, where they came from, and how long it took."""

    data: bytes
    bucket: str
    key: str
    request_latency_s: float
    """Estimated time to first byte of the GET, seconds (``max_gap_size="auto"`` uses it)."""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def parse(self) -> Metadata:
        """Unpickle with DCP's allow-list (``CheckpointFormatError`` if it is not DCP's)."""
        return load_metadata(self.data, self.url)


async def fetch_metadata(
    store: S3Store,
    path: CheckpointPath,
    recorder: StatsRecorder | None = None,
    *,
    rank: int | None = None,
) -> FetchedMetadata:
    """GET ``.metadata`` (``__{rank}.metadata`` when ``rank`` is given) of ``path``, timed, and
    counted as one request in ``recorder``."""
    name = METADATA_NAME if rank is None else f"__{int(rank)}{METADATA_NAME}"
    key = path.key(name)
    if recorder is not None:
        recorder.add(requests=1)
    started = time.perf_counter()
    try:
        data = await store.get_object(path.bucket, key, stats=recorder)
    except NoSuchBucketError:
        raise
    except NotFoundError as exc:
        raise NotFoundError(
            f"no {name} at {path.url}, is this a DCP checkpoint? "
            f"(s3://{path.bucket}/{key} does not exist)",
            bucket=path.bucket,
            key=key,
        ) from exc
    latency = request_latency_from_get(time.perf_counter() - started, len(data))
    if recorder is not None:
        recorder.add(bytes_received=len(data))
    return FetchedMetadata(data, path.bucket, key, latency)


def select_keys(requested: Sequence[str], fqns: Iterable[str]) -> tuple[set[str], list[str]]:
    """The fqns that ``requested`` keys select (each key itself, or every fqn below it:
    ``model`` selects ``model.encoder.weight``), and one description per unknown key, with
    its close matches (``"'model.wieght' (did you mean 'model.weight'?)"``)."""
    known = set(fqns)
    below: dict[str, set[str]] = {}
    for fqn in known:
        parts = fqn.split(".")
        for n in range(1, len(parts)):
            below.setdefault(".".join(parts[:n]), set()).add(fqn)
    selected: set[str] = set()
    unknown: list[str] = []
    for key in requested:
        found = below.get(key, set()) | ({key} if key in known else set())
        if not found:
            close = difflib.get_close_matches(key, sorted(known | set(below)), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(map(repr, close))}?" if close else "no close match"
            unknown.append(f"{key!r} ({hint})")
        selected |= found
    return selected, unknown


def run_dcp_load(
    state_dict: dict[str, Any],
    reader: StorageReader,
    *,
    planner: LoadPlanner | None,
    process_group: dist.ProcessGroup | None,
    no_dist: bool,
) -> None:
    """``dcp.load`` with ``reader``, raising this rank's original error instead of torch's
    ``CheckpointException`` wrapper."""
    try:
        dcp_load(
            state_dict,
            storage_reader=reader,
            planner=planner,
            process_group=process_group,
            no_dist=no_dist,
        )
    except CheckpointException as exc:
        raise _unwrap(exc) from None


def _unwrap(exc: CheckpointException) -> BaseException:
    """The original exception inside torch's ``CheckpointException`` (this rank's first)."""
    failures = exc.failures
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    ordered = sorted(failures.items(), key=lambda kv: (kv[0] != rank, kv[0]))
    for _, failure in ordered:
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return inner
    return exc


async def run_in_thread(fn: Callable[[], T], *, on_cancel: Callable[[], None]) -> T:
    """Run ``fn`` in a fresh thread; on cancellation call ``on_cancel`` and wait for the thread."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = fn()
        except BaseException as error:
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    thread = threading.Thread(target=target, name="aiodcp-load", daemon=True)
    thread.start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        on_cancel()
        while not done.done():
            try:
                await asyncio.shield(done)
            except asyncio.CancelledError:
                on_cancel()
            except BaseException:
                break
        raise
    finally:
        if done.done() and not done.cancelled():
            done.exception()  # retrieved: no "exception was never retrieved" warning
        thread.join(timeout=1.0)
