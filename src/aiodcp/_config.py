"""Configuration: frozen, keyword-only, validated objects, one per direction.

``ReaderConfig`` holds everything a load can be tuned with: how to reach the store (region,
endpoint, addressing style, TLS, credentials, retries, timeouts) and how to fetch (gap size, part
size, concurrency, memory budget). ``WriterConfig`` holds the same connection fields and how a
save uploads (part size, concurrency, memory budget, files per rank, prefix spreading); its
``store_config()`` is the ``ReaderConfig`` the store is opened with (connections, signing and
retries are the load's). Each is validated in ``__post_init__`` so a bad value fails at
construction, with a message that names the field and what is allowed, before any I/O happens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, TypeVar

from ._errors import ConfigError
from ._gapsize import (
    AUTO_GAP_SIZE,
    DEFAULT_MAX_GAP_SIZE_BYTES,
    DEFAULT_PART_SIZE_BYTES,
    validate_gap_setting,
    validate_part_size,
)
from ._stats import RequestMetrics

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_MAX_GAP_SIZE",
    "DEFAULT_MAX_GAP_SIZE_BYTES",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "DEFAULT_PART_SIZE_BYTES",
    "DEFAULT_READ_TIMEOUT_S",
    "DEFAULT_UPLOAD_PART_SIZE_BYTES",
    "MAX_UPLOAD_PART_SIZE_BYTES",
    "MIN_UPLOAD_PART_SIZE_BYTES",
    "ReaderConfig",
    "WriterConfig",
]

DEFAULT_MAX_GAP_SIZE: Literal["auto"] = AUTO_GAP_SIZE
"""Gap policy: the gap size is chosen per load from the measured latency of the ``.metadata``
GET (``_gapsize.auto_gap_size``); ``DEFAULT_MAX_GAP_SIZE_BYTES`` without a measurement."""
DEFAULT_MAX_CONCURRENCY = 32
"""Concurrent ranged GETs (and pooled connections) per load. S3 streams each connection at
80-100 MB/s after a time to first byte of tens of ms, so throughput comes from connections in
flight (s3torchconnector's CRT client keeps ~25 busy). How 32 was chosen, with the figures:
benchmarks/README.md, "Choosing the defaults"."""
DEFAULT_MEMORY_BUDGET_BYTES = 64 * 1024 * 1024
"""Item memory buffered ahead of the item being decoded: 64 MiB, one buffered part (2 MiB,
``ReaderConfig.buffered_part_size``) for each default connection. Memory is counted in the
1 MiB blocks items are received into. The budget caps the throughput of buffered items against
a distant store at about ``memory_budget / (latency + buffered part / per-connection
bandwidth)``: ~1.2 GB/s at 30 ms and 90 MB/s; raise it (with ``max_concurrency``) on instances
whose network is faster. Figures: benchmarks/README.md, "Choosing the defaults"."""
_MIN_BUFFERED_PART = 1024 * 1024
"""Buffered GETs are not cut below this (unless ``part_size`` is): a tiny budget over many
connections would otherwise mean a request per few KiB."""
DEFAULT_MAX_ATTEMPTS = 5
"""Attempts per request, the first included, whatever failed (error responses, timeouts, bodies
broken mid-stream, which resume at the next byte needed)."""
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0

_MAX_CONCURRENCY_LIMIT = 1024
_MAX_ATTEMPTS_LIMIT = 100
_ADDRESSING_STYLES = ("auto", "path", "virtual")


def _positive_int(name: str, value: object, *, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive int, got {value!r}", field=name, value=value)
    if limit is not None and value > limit:
        raise ConfigError(
            f"{name}={value} is absurdly large (the limit is {limit}); pick a smaller value",
            field=name,
            value=value,
        )
    return value


def _positive_seconds(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            f"{name} must be a positive, finite number of seconds, got {value!r}",
            field=name,
            value=value,
        )
    return float(value)


def _optional_str(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(
            f"{name} must be a non-empty string or None, got {value!r}", field=name, value=value
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ReaderConfig:
    """How aiodcp reaches the store and fetches a checkpoint. Every field is keyword-only.

    ``None`` for a connection field means botocore's own resolution (environment variables such as
    ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL``, the shared config file, the credential
    chain), which the plain case (``_native``) reproduces without botocore.
    """

    region: str | None = None
    """AWS region, e.g. ``"us-east-1"``. Default: botocore's resolution
    (``AWS_DEFAULT_REGION``...)."""
    endpoint_url: str | None = None
    """Endpoint of an S3-compatible store (MinIO, R2, moto...). Default: botocore's resolution."""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """``"path"`` for most S3-compatible stores; ``"virtual"`` for bucket-in-host. Default auto."""
    verify: bool | str = True
    """TLS verification: ``True``, ``False``, or the path of a CA bundle. Default True."""
    profile: str | None = None
    """A named botocore profile. Default: the standard credential chain."""
    unsigned: bool = False
    """Send unsigned requests (public buckets, no credentials needed). Default False."""
    request_payer: Literal["requester"] | None = None
    """``"requester"`` to read from a Requester Pays bucket (your account pays for the
    requests and the transfer; S3 refuses every request without it). Default None."""
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    """Attempts per request including the first, for errors before and during the body (a
    broken body resumes where it stopped). Retries wait with exponential backoff and full
    jitter. Default 5."""
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    """Seconds to establish a connection before the attempt fails (and is retried). Default 10."""
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    """Seconds without a byte, waiting for the response or inside its body, before the attempt
    fails (and is retried). Default 60."""
    max_gap_size: int | float | Literal["auto"] = DEFAULT_MAX_GAP_SIZE
    """Bytes: two needed ranges whose gap is <= this share a request (the gap is downloaded and
    dropped). ``0`` merges only adjacent ranges, ``float("inf")`` merges all. Default
    ``"auto"``: each load times its ``.metadata`` GET (time to first byte, connection set-up
    included) and merges gaps that download faster than one more request would take, i.e.
    latency x 85 MB/s per connection, clamped to 256 KiB..8 MiB (~2 MiB at S3's typical
    25 ms); ``LoadStats.max_gap_size`` shows what was used. A single GET never spans more than
    ``part_size`` bytes, so a gap larger than ``part_size`` is never downloaded."""
    part_size: int = DEFAULT_PART_SIZE_BYTES
    """Bytes: the largest span one ranged GET asks for; larger spans run as concurrent parts.
    GETs into buffered item memory are further cut to ``memory_budget / max_concurrency``
    (``buffered_part_size``, 2 MiB with the defaults); items received straight into their
    destination (see ``fast_decode``) take whole parts. Default 8 MiB."""
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    """Ranged GETs in flight at once (across all files of a load). Default 32."""
    memory_budget: int = DEFAULT_MEMORY_BUDGET_BYTES
    """Bytes: memory for downloaded items buffered ahead of decoding (items of 512 KiB or more
    count in whole 1 MiB blocks). An item larger than the budget is still served, alone.
    Items received straight into their destination (see ``fast_decode``) take none of it.
    Default 64 MiB (a 2 MiB buffered GET per default connection). Against a store with a time
    to first byte, the throughput of buffered items is about ``memory_budget / (latency +
    buffered_part_size / bandwidth per connection)``: raise it on hosts with a faster network
    than ~1 GB/s when most of a checkpoint is small tensors, partial reads or is read through a
    custom planner."""
    fast_decode: bool = True
    """Decode plain stored tensors straight into their destination (one copy, no temporary)
    instead of ``torch.load`` + ``copy_``; anything unusual falls back to ``torch.load``.
    With ``torch``'s ``DefaultLoadPlanner``, a stored tensor of 512 KiB or more read whole
    into a contiguous CPU tensor is received from the network straight into that tensor (no
    copy, no item memory, nothing held against ``memory_budget``); its zip directory is
    checked once it arrived, and an archive laid out otherwise is fetched again for
    ``torch.load``. Default True; False always uses ``torch.load``."""
    fast_http: bool = True
    """Send data GETs through aiodcp's own HTTP/1.1 path (URLs presigned once per object,
    bodies received straight into item memory) instead of botocore/aiohttp, which costs several
    times more CPU per byte. Anything unusual (proxies, client certificates, redirects, odd
    responses) still goes through botocore. Default True; False sends every GET via botocore."""
    share_across_ranks: bool = True
    """In a multi-rank load (``dcp.load`` or ``load_checkpoint`` with a process group of 2 or
    more ranks whose backend moves CPU tensors, i.e. gloo), fetch ``.metadata`` and every
    stored item the ranks need once per job, and send it to the other ranks that need it over
    the process group, instead of every rank fetching its own copy. Default True; False makes
    each rank load for itself. Single-process loads are the same either way."""
    verify_checksums: bool = True
    """Check every stored byte a load hands to torch against a checksum first (not to be
    confused with ``verify``, TLS verification). A checkpoint saved by aiodcp records each data
    file's ETag and a CRC64NVME per 1 MiB block of each stored item: every data GET is pinned
    to the recorded ETag (``If-Match``) and every item (a slice: the whole blocks it touches)
    is checked before decoding; a mismatch is fetched once more, then raises
    ``ChecksumMismatchError``. Checkpoints without a record load unchecked (``aiodcp verify``
    checks them against the store's full-object checksums). ``LoadStats.verified_bytes`` /
    ``unverified_bytes`` say what was checked. Default True; False loads without checking (no
    widened slices). Every rank of a multi-rank load must use the same setting."""
    safe_bytes: bool = False
    """Non-tensor values (BYTE_IO items) are unpickled by torch's load planner with
    ``torch.load(weights_only=False)``, which runs whatever the pickle says. With True, each
    value is first checked with ``torch.load(weights_only=True)`` (primitives, containers,
    tensors) and a value that needs anything else raises ``CheckpointFormatError``. Default
    False, as in torch."""
    on_request: Callable[[RequestMetrics], None] | None = field(
        default=None, compare=False, hash=False
    )
    """A metrics hook: called on the event loop with a :class:`RequestMetrics` after every
    attempt of every data GET (requests, bytes, retries, latency). Keep it fast; its exceptions
    are logged and ignored. Default None."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Advanced: keyword arguments passed as they are to ``AioConfig`` (botocore ``Config``)."""

    def __post_init__(self) -> None:
        _optional_str("region", self.region)
        _optional_str("endpoint_url", self.endpoint_url)
        _optional_str("profile", self.profile)
        if self.endpoint_url is not None and not self.endpoint_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                f"endpoint_url must start with http:// or https://, got {self.endpoint_url!r}",
                field="endpoint_url",
                value=self.endpoint_url,
            )
        if self.addressing_style not in _ADDRESSING_STYLES:
            raise ConfigError(
                f"addressing_style must be one of {_ADDRESSING_STYLES}, "
                f"got {self.addressing_style!r}",
                field="addressing_style",
                value=self.addressing_style,
            )
        if not isinstance(self.verify, (bool, str)) or self.verify == "":
            raise ConfigError(
                f"verify must be True, False or a CA bundle path, got {self.verify!r}",
                field="verify",
                value=self.verify,
            )
        if not isinstance(self.safe_bytes, bool):
            raise ConfigError(
                f"safe_bytes must be a bool, got {self.safe_bytes!r}",
                field="safe_bytes",
                value=self.safe_bytes,
            )
        if not isinstance(self.verify_checksums, bool):
            raise ConfigError(
                f"verify_checksums must be a bool, got {self.verify_checksums!r}",
                field="verify_checksums",
                value=self.verify_checksums,
            )
        if not isinstance(self.fast_decode, bool):
            raise ConfigError(
                f"fast_decode must be a bool, got {self.fast_decode!r}",
                field="fast_decode",
                value=self.fast_decode,
            )
        if not isinstance(self.share_across_ranks, bool):
            raise ConfigError(
                f"share_across_ranks must be a bool, got {self.share_across_ranks!r}",
                field="share_across_ranks",
                value=self.share_across_ranks,
            )
        if not isinstance(self.fast_http, bool):
            raise ConfigError(
                f"fast_http must be a bool, got {self.fast_http!r}",
                field="fast_http",
                value=self.fast_http,
            )
        if self.request_payer not in (None, "requester"):
            raise ConfigError(
                f"request_payer must be None or 'requester', got {self.request_payer!r}",
                field="request_payer",
                value=self.request_payer,
            )
        if not isinstance(self.unsigned, bool):
            raise ConfigError(
                f"unsigned must be a bool, got {self.unsigned!r}",
                field="unsigned",
                value=self.unsigned,
            )
        _positive_int("max_attempts", self.max_attempts, limit=_MAX_ATTEMPTS_LIMIT)
        _positive_int("max_concurrency", self.max_concurrency, limit=_MAX_CONCURRENCY_LIMIT)
        _positive_int("memory_budget", self.memory_budget)
        _positive_seconds("connect_timeout_s", self.connect_timeout_s)
        _positive_seconds("read_timeout_s", self.read_timeout_s)
        object.__setattr__(self, "max_gap_size", validate_gap_setting(self.max_gap_size))
        object.__setattr__(self, "part_size", validate_part_size(self.part_size))
        if self.on_request is not None and not callable(self.on_request):
            raise ConfigError(
                f"on_request must be a callable taking RequestMetrics, got {self.on_request!r}",
                field="on_request",
                value=self.on_request,
            )
        if not isinstance(self.extra, dict):
            raise ConfigError(
                f"extra must be a dict of AioConfig arguments, got {self.extra!r}",
                field="extra",
                value=self.extra,
            )

    def replace(self, **changes: Any) -> ReaderConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @property
    def buffered_part_size(self) -> int:
        """Bytes: the largest GET into buffered item memory: ``part_size``, cut so that one
        GET per connection fits ``memory_budget`` (at least 1 MiB). Within a budget, GETs in
        flight make the throughput against a store with a time to first byte; items received
        straight into their destination hold no budget and take whole ``part_size`` GETs."""
        per_connection = max(self.memory_budget // self.max_concurrency, _MIN_BUFFERED_PART)
        return min(self.part_size, per_connection)

    @classmethod
    def from_kwargs(cls, base: ReaderConfig | None, **kwargs: Any) -> ReaderConfig:
        """``base`` (or the defaults) with the keyword arguments that are not None applied."""
        return _from_kwargs(cls, base, kwargs)


DEFAULT_UPLOAD_PART_SIZE_BYTES = 8 * 1024 * 1024
"""Bytes per uploaded part of a data file (and the largest file sent as one PUT): 8 MiB, the
size S3's own transfer managers use. Against S3 (a first byte after tens of ms, 80-100 MB/s
per connection) an 8 MiB part keeps a connection busy ~85% of the time; larger parts waste less
of each request, but a checkpoint of small items holds its staged bytes longer."""
MIN_UPLOAD_PART_SIZE_BYTES = 5 * 1024 * 1024
"""S3's smallest part of a multipart upload (all but the last)."""
MAX_UPLOAD_PART_SIZE_BYTES = 5 * 1024**3
"""S3's largest part (and largest single PUT): 5 GiB."""
_MAX_FILES_PER_RANK = 1024
_MAX_PREFIX_SPREAD = 4096


@dataclass(frozen=True, kw_only=True, slots=True)
class WriterConfig:
    """How aiodcp reaches the store and uploads a checkpoint. Every field is keyword-only.

    The connection fields mean what they mean in :class:`ReaderConfig` (``None``: botocore's
    own resolution; the plain case resolves it without botocore); a save opens its store with
    ``store_config()``.
    """

    region: str | None = None
    """AWS region. Default: botocore's resolution (``AWS_DEFAULT_REGION``...)."""
    endpoint_url: str | None = None
    """Endpoint of an S3-compatible store. Default: botocore's resolution."""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """``"path"`` for most S3-compatible stores; ``"virtual"`` for bucket-in-host. Default auto."""
    verify: bool | str = True
    """TLS verification: ``True``, ``False``, or the path of a CA bundle. Default True."""
    profile: str | None = None
    """A named botocore profile. Default: the standard credential chain."""
    unsigned: bool = False
    """Send unsigned requests (a bucket that accepts anonymous writes). Default False."""
    request_payer: Literal["requester"] | None = None
    """``"requester"`` for a Requester Pays bucket. Default None."""
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    """Attempts per request including the first (a part is sent again from the same memory,
    never serialised again). Default 5."""
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    """Seconds to establish a connection before the attempt fails (and is retried). Default 10."""
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    """Seconds without progress (the store not taking the body, or not answering) before the
    attempt fails (and is retried). Default 60."""
    part_size: int = DEFAULT_UPLOAD_PART_SIZE_BYTES
    """Bytes per uploaded part; a data file up to this size is one PUT, a larger one a
    multipart upload of parts this size (the last one shorter). 5 MiB to 5 GiB; a file that
    would need over 10,000 parts gets larger parts. Default 8 MiB."""
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    """Requests (parts and files) in flight at once, across every file of the save. Default 32."""
    memory_budget: int = DEFAULT_MEMORY_BUDGET_BYTES
    """Bytes: memory for data that must be copied before it is sent (staged): small tensors'
    archives, non-tensor values, tensors that are not contiguous CPU memory of their own
    (cloned, or copied off the GPU). Tensors of 128 KiB or more whose memory is contiguous on
    the CPU are sent from that memory and take none of it. A staged item larger than the
    budget is still served, alone. Default 64 MiB."""
    files_per_rank: int = 1
    """Data files each rank writes (``FileSystemWriter``'s ``thread_count``): items are spread
    over them by size; their parts upload concurrently either way. Default 1."""
    prefix_spread: int = 0
    """0 (default): data files directly under the checkpoint's prefix. N > 0: under N
    sub-prefixes (``<ckpt>/<hex>/__0_0.<id>.distcp``), recorded in the checkpoint, for jobs
    whose writes would exceed what one S3 prefix takes (~3,500 PUT/s); see README."""
    fast_http: bool = True
    """Send requests through aiodcp's own HTTP/1.1 path (bodies written from the tensors'
    memory); False sends every request through botocore (each body joined into one buffer
    first). Default True."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Advanced: keyword arguments passed as they are to ``AioConfig`` (botocore ``Config``)."""

    def __post_init__(self) -> None:
        part = self.part_size
        if (
            isinstance(part, bool)
            or not isinstance(part, int)
            or not (MIN_UPLOAD_PART_SIZE_BYTES <= part <= MAX_UPLOAD_PART_SIZE_BYTES)
        ):
            raise ConfigError(
                f"part_size must be an int from 5 MiB to 5 GiB (S3's part sizes), got {part!r}",
                field="part_size",
                value=part,
            )
        _positive_int("files_per_rank", self.files_per_rank, limit=_MAX_FILES_PER_RANK)
        spread = self.prefix_spread
        if (
            isinstance(spread, bool)
            or not isinstance(spread, int)
            or not (0 <= spread <= _MAX_PREFIX_SPREAD)
        ):
            raise ConfigError(
                f"prefix_spread must be an int from 0 (off) to {_MAX_PREFIX_SPREAD}, "
                f"got {spread!r}",
                field="prefix_spread",
                value=spread,
            )
        _positive_int("memory_budget", self.memory_budget)
        self.store_config()  # the connection fields, validated as a load's

    def store_config(self) -> ReaderConfig:
        """The configuration the save's store is opened with (its connection fields)."""
        return ReaderConfig(
            region=self.region,
            endpoint_url=self.endpoint_url,
            addressing_style=self.addressing_style,
            verify=self.verify,
            profile=self.profile,
            unsigned=self.unsigned,
            request_payer=self.request_payer,
            max_attempts=self.max_attempts,
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
            max_concurrency=self.max_concurrency,
            memory_budget=self.memory_budget,
            fast_http=self.fast_http,
            extra=self.extra,
        )

    def replace(self, **changes: Any) -> WriterConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def from_kwargs(cls, base: WriterConfig | None, **kwargs: Any) -> WriterConfig:
        """``base`` (or the defaults) with the keyword arguments that are not None applied."""
        return _from_kwargs(cls, base, kwargs)


_C = TypeVar("_C", "ReaderConfig", "WriterConfig")


def _from_kwargs(cls: type[_C], base: _C | None, kwargs: dict[str, Any]) -> _C:
    """``base`` (or ``cls``'s defaults) with the keyword arguments that are not None applied;
    an unknown option or a ``base`` of another type raises ``ConfigError``."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ConfigError(
            f"unknown configuration option(s) {unknown}; valid options: {sorted(names)}",
            field=unknown[0],
            value=kwargs[unknown[0]],
        )
    if base is not None and not isinstance(base, cls):
        raise ConfigError(
            f"config must be an aiodcp.{cls.__name__}, got {type(base).__name__}",
            field="config",
            value=base,
        )
    given = {k: v for k, v in kwargs.items() if v is not None}
    if base is None:
        return cls(**given)
    return replace(base, **given) if given else base
