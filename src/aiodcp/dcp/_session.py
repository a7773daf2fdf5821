"""One load session under every entry point, and the steps each load takes, written once.

A ``LoadSession`` is one load of one checkpoint. It owns, for that load: the checkpoint's path
and configuration, a cancellation scope of its own (a ``ScopedDriver`` over the loop and
connections it runs on: only the requests this load sent), the ``.metadata`` (fetched, timed and
unpickled once; or given by a prefetch that read it), the measured request latency the gap is
chosen by, the statistics recorder, the progress bar setting, the prefetch it may take items
from, and the read phase (``DcpLoad``: the plan, slicing, the engines, decoding). Its clients are
thin: ``S3StorageReader`` (one session per ``dcp.load``), ``load_checkpoint`` and prefetch handles
(which make the session, read the metadata off the caller's loop, and give it to a reader, see
``attached_reader``) and the CLI's ``inspect``/``plan``.

    LoadSession(path, config, driver, source=..., progress=...)
        .read_metadata(rank=, group=)    blocking (torch's thread); shared over ``group``
        .aread_metadata()                awaited from the caller's loop (load_checkpoint)
        .dcp_load(storage_data, ...)     a DcpLoad over this session for DCP's format
        .read_phase(format)              the same for a checkpoint in any StoredFormat
        .read(plan, planner, format)     the read phase; its LoadStats in .stats
        .cancel()                        from any thread: stops this load's engines, its
                                         requests, its waits for a prefetch; new work in the
                                         scope is refused (LoadCancelledError). Nothing else.

Data flow of the steps::

    fetch_metadata(store, path, recorder, rank=None)     on the I/O loop
        -> GET .metadata (or __{rank}.metadata) whole, timed: its estimated time to first
           byte is what max_gap_size="auto" is resolved with (_planner.request_latency_from_get);
           a missing object says "is this a DCP checkpoint?"; counted in ``recorder``; with
           ``verify_checksums`` checked against the store's full-object checksum before
           anything unpickles it (``_verify.read_verified``: read once more on a mismatch)
        -> FetchedMetadata(data, key, request_latency_s, checksum)
    FetchedMetadata.parse()                              off the loop (a large .metadata
        -> dcp._metadata.load_metadata                   takes long to unpickle)
    select_keys(requested, fqns)                         prefetch(keys=...), aiodcp plan --keys
        -> the fqns the keys select (a key selects itself and every fqn below ``key.``),
           and for each unknown key its close matches

Running ``dcp.load`` (``run_dcp_load``) and threads for a coroutine (``run_in_thread``) live in
``dcp/_run.py``, which a save shares without importing this module's load-only imports.

Callers: ``LoadSession``, and ``PrefetchHandle``'s own download (a prefetch is not a load: it
fills buffers that later load sessions take).
"""

from __future__ import annotations

import asyncio
import difflib
import threading
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlanner

from .._checksum import warm_up
from .._config import ReaderConfig
from .._errors import LoadCancelledError, NoSuchBucketError, NotFoundError
from .._path import CheckpointPath
from .._planner import request_latency_from_get
from .._stats import LoadStats, StatsRecorder
from .._verify import read_verified
from ._archive import METADATA_NAME
from ._integrity import Integrity
from ._metadata import load_metadata
from ._run import run_in_thread
from ._run import unwrap as _unwrap  # noqa: F401  (its old home: tests and workers import it)
from ._sharing import SHARED, RankShare, share_metadata

if TYPE_CHECKING:
    from torch.distributed.checkpoint._extension import ExtensionRegistry
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadPlan

    from .._driver import Driver, ScopedDriver
    from .._store import S3Store
    from ._format import StoredFormat
    from ._load import DcpLoad, PrefetchSource

__all__ = [
    "METADATA_NAME",
    "Fetch",
    "Fetched",
    "FetchedMetadata",
    "LoadSession",
    "fetch_metadata",
    "select_keys",
]


T = TypeVar("T")


class FetchedMetadata(NamedTuple):
    """The bytes of one ``.metadata`` GET, where they came from, and how long it took."""

    data: bytes
    bucket: str
    key: str
    request_latency_s: float
    """Estimated time to first byte of the GET, seconds (``max_gap_size="auto"`` uses it)."""
    checksum: str | None = None
    """The algorithm of the store's full-object checksum ``data`` was checked against (None:
    not checked)."""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def parse(self) -> Metadata:
        """Unpickle with DCP's allow-list (``CheckpointFormatError`` if it is not DCP's)."""
        return load_metadata(self.data, self.url)


class Fetched(Protocol):
    """What describes a checkpoint, as fetched (picklable: a shared load broadcasts it):
    DCP's ``FetchedMetadata``, safetensors' ``FetchedCatalog`` (index and headers)."""

    @property
    def request_latency_s(self) -> float: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def checksum(self) -> str | None:
        """The algorithm of the store's checksum what was read whole (``.metadata``, an
        index) was checked against before parsing; None: not checked."""

    def parse(self) -> Metadata: ...


class Fetch(Protocol):
    """``fetch(store, path, recorder, rank=None)``: fetch what describes the checkpoint at
    ``path`` (``fetch_metadata`` for DCP), counting its requests in ``recorder``."""

    def __call__(
        self,
        store: S3Store,
        path: CheckpointPath,
        recorder: StatsRecorder | None = None,
        *,
        rank: int | None = None,
    ) -> Awaitable[Fetched]: ...


async def fetch_metadata(
    store: S3Store,
    path: CheckpointPath,
    recorder: StatsRecorder | None = None,
    *,
    rank: int | None = None,
) -> FetchedMetadata:
    """GET ``.metadata`` (``__{rank}.metadata`` when ``rank`` is given) of ``path`` whole,
    timed, counted as one request in ``recorder``, and checked against the store's checksum
    when the store's configuration says ``verify_checksums`` (``_verify.read_verified``)."""
    name = METADATA_NAME if rank is None else f"__{int(rank)}{METADATA_NAME}"
    key = path.key(name)
    if recorder is not None:
        recorder.add(requests=1)
    started = time.perf_counter()
    try:
        data, checksum = await read_verified(
            store, path.bucket, key, stats=recorder, verify=store.config.verify_checksums
        )
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
    return FetchedMetadata(data, path.bucket, key, latency, checksum)


class LoadSession:
    """One load of one checkpoint (see the module docstring). Not reusable: one per load."""

    def __init__(
        self,
        path: CheckpointPath,
        config: ReaderConfig,
        driver: Driver,
        *,
        source: PrefetchSource | None = None,
        progress: bool = False,
        metadata: Metadata | None = None,
        request_latency_s: float | None = None,
        fetch: Fetch | None = None,
        metadata_checksum: str | None = None,
    ) -> None:
        self.path = path
        self.fetch: Fetch = fetch_metadata if fetch is None else fetch
        """What reads the checkpoint's description: DCP's ``.metadata`` by default."""
        self.config = config
        self.scope: ScopedDriver = driver.scope()
        """This load's requests: what ``cancel`` stops, and nothing else."""
        self.source = source
        self.progress = progress
        self.recorder = StatsRecorder()
        self.recorder.request_latency_s = request_latency_s
        self.metadata = metadata
        """The checkpoint's metadata, once read (or given by the prefetch that read it)."""
        self.request_latency_s = request_latency_s
        """Estimated time to first byte of the ``.metadata`` GET (None: not measured)."""
        self.metadata_bytes = 0
        """Size of the ``.metadata`` this session read (0: given, not read)."""
        self.metadata_checksum = metadata_checksum
        """The algorithm of the store's checksum the ``.metadata`` (a safetensors index) was
        checked against before it was parsed (None: not checked); given with ``metadata`` by a
        prefetch that read it."""
        self.recorder.metadata_verified = metadata_checksum is not None
        self.stats: LoadStats | None = None
        """The load's statistics once its read phase ended (or failed)."""
        self._integrity: tuple[Integrity | None] | None = None
        self._lock = threading.Lock()
        self._cancelled = False
        self._load: DcpLoad | None = None

    # ------------------------------------------------------------------ metadata

    def _fetch(self, rank: int | None = None) -> Fetched:
        path, recorder, fetch = self.path, self.recorder, self.fetch
        if fetch is fetch_metadata:
            name = METADATA_NAME if rank is None else f"__{int(rank)}{METADATA_NAME}"
            what = f"the GET of {path.url}/{name}"
        else:
            what = f"the read of what describes {path.url} (its index and headers)"
        return self.scope.run(lambda store: fetch(store, path, recorder, rank=rank), what)

    def _took(self, fetched: Fetched, metadata: Metadata) -> Metadata:
        self.request_latency_s = self.recorder.request_latency_s = fetched.request_latency_s
        self.metadata_bytes = fetched.nbytes
        self.metadata_checksum = fetched.checksum
        self.recorder.metadata_verified = fetched.checksum is not None
        self.metadata = metadata
        self._integrity = None
        return metadata

    @property
    def integrity(self) -> Integrity | None:
        """The checkpoint's integrity record (``dcp._integrity``), which the read phase checks
        every item against; None without one, before the metadata is read, or when the load
        does not verify (``verify_checksums=False``). A malformed record raises
        ``CheckpointFormatError``."""
        if self.metadata is None or not self.config.verify_checksums:
            return None
        if self._integrity is None:
            where = f"{self.path.url}/{METADATA_NAME}"
            self._integrity = (Integrity.of(self.metadata, where),)
            if self._integrity[0] is not None:
                warm_up()  # the checks' CRC library, imported while the first GETs run
        return self._integrity[0]

    def read_metadata(
        self, *, rank: int | None = None, group: dist.ProcessGroup | None = None
    ) -> Metadata:
        """GET (``__{rank}.metadata`` when ``rank`` is given), time and unpickle the metadata,
        blocking. With ``group``, the group's rank 0 GETs it and every rank gets its bytes
        (one GET per job; every rank of ``group`` must call this)."""
        fetched = (
            self._fetch(rank) if group is None else share_metadata(group, lambda: self._fetch(rank))
        )
        return self._took(fetched, fetched.parse())

    async def aread_metadata(self) -> Metadata:
        """``read_metadata`` awaited from a coroutine of another loop (the caller's): the GET
        runs on the session's loop, the unpickling in a thread (a large checkpoint's metadata
        takes long). Cancelling the awaiting task cancels the session."""
        path, recorder, fetch = self.path, self.recorder, self.fetch
        future = self.scope.submit(lambda store: fetch(store, path, recorder))
        try:
            fetched = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.cancel()
            raise
        return self._took(fetched, await run_in_thread(fetched.parse, on_cancel=self.cancel))

    # ------------------------------------------------------------------ read phase

    def dcp_load(
        self,
        storage_data: dict[MetadataIndex, _StorageInfo],
        tensor_metadata: dict[str, Any],
        *,
        extensions: ExtensionRegistry | None = None,
        recorder: StatsRecorder | None = None,
    ) -> DcpLoad:
        """The read phase of a DCP checkpoint over this session (``recorder``: another one,
        for planning only)."""
        return self.read_phase(self.dcp_format(storage_data, tensor_metadata, extensions), recorder)

    def dcp_format(
        self,
        storage_data: dict[MetadataIndex, _StorageInfo],
        tensor_metadata: dict[str, Any],
        extensions: ExtensionRegistry | None = None,
    ) -> StoredFormat:
        """DCP's format (``dcp/_archive.py``) over this checkpoint's metadata."""
        from ._archive import DcpArchive

        return DcpArchive(
            path=self.path,
            config=self.config,
            storage_data=storage_data,
            tensor_metadata=tensor_metadata,
            extensions=extensions,
        )

    def read_phase(self, format: StoredFormat, recorder: StatsRecorder | None = None) -> DcpLoad:
        """The read phase over this session for a checkpoint in ``format`` (``recorder``:
        another one, for planning only)."""
        # Imported here: it brings in the S3 stack, which load_checkpoint imports off the
        # caller's loop (this module is imported on it).
        from ._load import DcpLoad

        return DcpLoad(
            path=self.path,
            config=self.config,
            format=format,
            driver=self.scope,
            recorder=self.recorder if recorder is None else recorder,
            request_latency_s=self.request_latency_s,
            source=self.source,
            progress=self.progress,
            integrity=self.integrity,
        )

    def read(
        self,
        plan: LoadPlan,
        planner: LoadPlanner,
        format: StoredFormat,
        *,
        group: dist.ProcessGroup | None = None,
        sharing: str = "",
    ) -> LoadStats:
        """Load ``plan``'s items of a checkpoint in ``format`` (through the exchange when
        ``plan`` carries this rank's share of a shared load over ``group``); returns the load's
        statistics (also ``.stats``, set when it fails too). ``sharing``: why the load does not
        share (``LoadStats.sharing``)."""
        load = self.read_phase(format)
        share = plan.storage_data
        shared = isinstance(share, RankShare) and group is not None
        if shared:
            self.recorder.sharing = SHARED
        elif sharing == SHARED:
            self.recorder.sharing = (
                "off: the coordinator did not share (not every rank could: sharing switched "
                "off on a rank, another group, or a rank's plan names an unknown item)"
            )
        else:
            self.recorder.sharing = sharing or "off: a single process (no process group)"
        with self._lock:
            cancelled = self._cancelled
            self._load = load
        if cancelled:
            if not shared:
                with self._lock:
                    self._load = None
                raise LoadCancelledError(f"{self.path.url}: the load was cancelled")
            # The other ranks wait for this one in the exchange: it goes in, aborted, and its
            # first step fails, which the exchange reports to every rank (PeerLoadError).
            load.abort()
        recorder = self.recorder
        try:
            if shared:
                assert isinstance(share, RankShare) and group is not None
                load.read_shared(plan, planner, recorder, share, group)
            else:
                load.read(plan, planner, recorder)
        finally:
            with self._lock:
                self._load = None
            self.stats = recorder.finish()
        return self.stats

    @property
    def cancelled(self) -> bool:
        """Whether ``cancel`` was called."""
        return self._cancelled

    def cancel(self) -> None:
        """Stop this load, from any thread: its engines, the requests it sent, its waits for
        a prefetch's items; work it starts afterwards raises ``LoadCancelledError``. Other
        loads and a prefetch's download on the same loop and connections go on."""
        with self._lock:
            self._cancelled = True
            load = self._load
        self.scope.cancel()
        if load is not None:
            load.abort()
        if self.source is not None:
            self.source.cancel()


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
