"""The gap and part size settings of a load: defaults, validation, and ``"auto"`` resolved from
a measured latency (the range planner, ``_planner``, plans with the result).

Apart from the planner so that ``_config`` (which every save and ``import aiodcp`` import)
does not import the planner's range classes, which only a load uses: every saver process pays
for each module it imports (benchmarks/README.md, "Saves"). ``_planner`` re-exports these names.
"""

from __future__ import annotations

import math
from typing import Literal, TypeAlias

from ._errors import ConfigError

__all__ = [
    "ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S",
    "ASSUMED_REQUEST_LATENCY_S",
    "AUTO_GAP_SIZE",
    "DEFAULT_MAX_GAP_SIZE_BYTES",
    "DEFAULT_PART_SIZE_BYTES",
    "MAX_AUTO_GAP_SIZE_BYTES",
    "MIN_AUTO_GAP_SIZE_BYTES",
    "GapSetting",
    "auto_gap_size",
    "request_latency_from_get",
    "resolve_max_gap_size",
    "validate_gap_setting",
    "validate_max_gap_size",
    "validate_part_size",
]

AUTO_GAP_SIZE: Literal["auto"] = "auto"
"""The ``max_gap_size`` setting that lets :func:`auto_gap_size` choose from a measured latency."""
ASSUMED_REQUEST_LATENCY_S = 0.025
"""Prior time to first byte of one S3 GET, used when nothing was measured: AWS documents median
latencies "in the tens of milliseconds" for small GETs, and this project's S3-shaped benchmark
holds every first byte 20 ms."""
ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S = 85_000_000
"""Bytes per second one S3 connection streams: 80-100 MB/s is the usual single-stream figure
from an EC2 instance in the bucket's region (the S3-shaped benchmark paces at 80 MB/s)."""
MIN_AUTO_GAP_SIZE_BYTES = 256 * 1024
"""The smallest gap ``"auto"`` merges over, however fast the store answers."""
MAX_AUTO_GAP_SIZE_BYTES = 8 * 1024 * 1024
"""The largest gap ``"auto"`` merges over, however slow the measured request was."""
DEFAULT_MAX_GAP_SIZE_BYTES = round(
    ASSUMED_REQUEST_LATENCY_S * ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S
)
"""The gap ``"auto"`` picks without a measurement (2,125,000 bytes, ~2 MiB), and the default of
``coalesce``/``plan_file``: two needed ranges whose gap is at most this many bytes are fetched
as one span."""
DEFAULT_PART_SIZE_BYTES = 8 * 1024 * 1024
"""The largest span one ranged GET asks for: 8 MiB. A store that answers each GET after a time
to first byte and streams each connection at a capped rate (S3: tens of ms, 80-100 MB/s)
spends the first byte's wait once per GET, so large parts waste less of each connection; but
GETs into buffered item memory are bounded by the memory budget, and there more, smaller GETs
win (throughput about ``memory_budget / (latency + part / per-connection bandwidth)``). So
this size applies to items received straight into their destination, and buffered parts are
cut to ``ReaderConfig.buffered_part_size`` (2 MiB with the default budget and concurrency).
Figures: benchmarks/README.md, "Choosing the defaults"."""


def validate_max_gap_size(value: object) -> int | float:
    """``value`` as a gap size: a non-negative int, or ``float('inf')`` (merge everything).

    A finite float with an integral value (``4.0``) is accepted and returned as an int.
    Raises ConfigError for anything else (bool, NaN, negative, fractional, other types).
    """
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if value >= 0:
            return int(value)
    elif isinstance(value, float):
        if value == math.inf:
            return value
        if math.isfinite(value) and value >= 0 and value.is_integer():
            return int(value)
    raise ConfigError(
        "max_gap_size must be a non-negative integer number of bytes, or float('inf') to merge "
        f"all ranges, got {value!r}",
        field="max_gap_size",
        value=value,
    )


GapSetting: TypeAlias = int | float | Literal["auto"]
"""A ``max_gap_size`` setting: bytes, ``float("inf")``, or ``"auto"``."""


def validate_gap_setting(value: object) -> GapSetting:
    """``value`` as a ``max_gap_size`` setting: ``"auto"`` or what :func:`validate_max_gap_size`
    accepts. Raises ConfigError (naming ``"auto"``) for anything else."""
    if value == AUTO_GAP_SIZE and isinstance(value, str):
        return AUTO_GAP_SIZE
    if not isinstance(value, str):
        try:
            return validate_max_gap_size(value)
        except ConfigError:
            pass
    raise ConfigError(
        f'max_gap_size must be "auto" (the default: chosen from the measured request latency), '
        "a non-negative integer number of bytes, or float('inf') to merge all ranges, "
        f"got {value!r}",
        field="max_gap_size",
        value=value,
    )


def auto_gap_size(
    request_latency_s: float | None,
    bandwidth_bytes_per_s: float = ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S,
) -> int:
    """The gap in bytes worth downloading rather than sending one more request.

    Two needed ranges with ``gap`` bytes between them cost, on one connection, either one
    extra request (one more time to first byte, ``request_latency_s``) or ``gap / bandwidth``
    seconds of downloading bytes that are thrown away. They break even at::

        gap = request_latency_s * bandwidth_bytes_per_s

    so a gap up to that is merged. Without a measurement (``None`` or NaN) the prior is
    ``ASSUMED_REQUEST_LATENCY_S`` (25 ms: AWS documents median latencies "in the tens of
    milliseconds" for small S3 GETs; the benchmark's S3 shape uses 20 ms) times
    ``ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S`` (85 MB/s: one S3 stream gives 80-100 MB/s;
    the benchmark paces 80 MB/s), i.e. 2,125,000 bytes (~2 MiB). The former fixed default,
    32 MiB, is the break-even point of a 395 ms request: in-region it downloaded gaps that
    took up to ~16x longer than the request they saved.

    The result is clamped to [``MIN_AUTO_GAP_SIZE_BYTES``, ``MAX_AUTO_GAP_SIZE_BYTES``] =
    [256 KiB, 8 MiB]:

    * below 256 KiB a request costs more than its latency suggests (signing, headers, request
      pricing, ~3 ms of a 85 MB/s stream), and a fast local store (MinIO, moto: a few ms)
      would otherwise split every non-adjacent pair of items;
    * above 8 MiB (a ~100 ms request) the measurement says more about the set-up than about S3
      (the timed request is the first of the process: DNS, TCP and TLS set-up, credential
      lookup, retries all lengthen it, which errs on the side of merging). A gap longer than
      a part (default 8 MiB, 2 MiB into buffered memory) is never downloaded anyway, since no
      GET spans more than one part.

    Monotone: a slower request never gives a smaller gap.
    """
    if not (math.isfinite(bandwidth_bytes_per_s) and bandwidth_bytes_per_s > 0):
        raise ConfigError(
            f"bandwidth must be a positive number, got {bandwidth_bytes_per_s!r}",
            field="bandwidth_bytes_per_s",
            value=bandwidth_bytes_per_s,
        )
    latency = ASSUMED_REQUEST_LATENCY_S
    if request_latency_s is not None and not math.isnan(request_latency_s):
        latency = max(0.0, request_latency_s)
    gap = latency * bandwidth_bytes_per_s
    return round(min(max(gap, MIN_AUTO_GAP_SIZE_BYTES), MAX_AUTO_GAP_SIZE_BYTES))


def request_latency_from_get(
    elapsed_s: float,
    body_bytes: int,
    bandwidth_bytes_per_s: float = ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S,
) -> float:
    """The time to first byte of a whole-object GET that took ``elapsed_s`` for ``body_bytes``:
    the elapsed time minus the body's transfer at ``bandwidth_bytes_per_s`` (a ``.metadata``
    of many items can be megabytes), never below 0."""
    return max(0.0, elapsed_s - body_bytes / bandwidth_bytes_per_s)


def resolve_max_gap_size(setting: GapSetting, request_latency_s: float | None) -> int | float:
    """The gap size to plan with: ``auto_gap_size(request_latency_s)`` for ``"auto"``, the
    (validated) setting itself otherwise."""
    value = validate_gap_setting(setting)
    if isinstance(value, str):
        return auto_gap_size(request_latency_s)
    return value


def validate_part_size(value: object) -> int:
    """``value`` as a part size: a positive int. Raises ConfigError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return int(value)
    raise ConfigError(
        f"part_size must be a positive integer number of bytes, got {value!r}",
        field="part_size",
        value=value,
    )
