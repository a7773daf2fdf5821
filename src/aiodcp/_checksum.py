"""Checksums of stored bytes: CRC64NVME, the checksum S3 computes for every object.

Why CRC64NVME: since December 2024 S3 gives every new object a CRC64NVME full-object checksum
(multipart uploads too: the parts' CRCs combine into the object's), so the checksum aiodcp
records at save is the one S3 itself verifies on receipt and reports (``x-amz-checksum-crc64nvme``
with ``x-amz-checksum-mode: ENABLED``). The CRC comes from ``awscrt`` (AWS's common runtime, the
implementation botocore itself uses): it is hardware-accelerated (tens of GB/s on one core),
releases the GIL on large buffers, and combines the CRCs of adjacent ranges, so the CRC of a
whole object or item follows from the CRCs of its parts without reading them again. No CRC is
written by hand here.

Data flow::

    crc64nvme(data, previous=0)          -> int   running: crc64nvme(b, crc64nvme(a)) is a+b's
    combine(crc_a, crc_b, length_b)      -> int   the CRC of a+b from the CRCs of a and b
    to_header(crc) / from_header(text)   <-> S3's header form (8 bytes big-endian, base64)

``awscrt`` is imported when a checksum is first needed, not by ``import aiodcp``: loading its
11 MB extension takes 50-70 ms of CPU here, so a load that will check bytes starts the import in
a thread of its own as soon as it knows (``warm_up``), while its first GETs are under way.
"""

from __future__ import annotations

import base64
import binascii
import threading
from typing import TYPE_CHECKING, Any

from ._errors import MissingDependencyError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["ALGORITHM", "HEADER", "combine", "crc64nvme", "from_header", "to_header", "warm_up"]

ALGORITHM = "CRC64NVME"
"""The algorithm's name as S3 spells it (``x-amz-checksum-algorithm``, ``ChecksumAlgorithm``)."""

HEADER = "x-amz-checksum-crc64nvme"
"""The header that carries a CRC64NVME checksum on requests and responses."""

_CRC_BYTES = 8

_checksums: Any = None


def _crt() -> Any:
    global _checksums
    if _checksums is None:
        try:
            import awscrt.checksums
        except ImportError as exc:  # a dependency: only a broken install lacks it
            raise MissingDependencyError(
                "aiodcp needs awscrt for CRC64NVME checksums: pip install 'awscrt>=0.36'",
                package="awscrt",
            ) from exc
        _checksums = awscrt.checksums
    return _checksums


def warm_up() -> None:
    """Import ``awscrt`` in a daemon thread now, if it is not imported yet, so the first
    checksum does not wait for it (a concurrent ``_crt()`` waits on Python's import lock)."""
    if _checksums is not None or _warming.is_set():
        return
    _warming.set()

    def load() -> None:
        try:
            _crt()
        except MissingDependencyError:
            pass  # raised again, with its message, where a checksum is needed

    threading.Thread(target=load, name="import-awscrt-for-aiodcp", daemon=True).start()


_warming = threading.Event()


def crc64nvme(data: Buffer, previous: int = 0) -> int:
    """The CRC64NVME of ``data`` (any buffer: bytes, memoryview, a tensor's numpy view...),
    continuing ``previous``, the CRC of the bytes before it."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return int(_crt().crc64nvme(view, previous))


def combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """The CRC64NVME of ``a + b`` from the CRC of ``a``, the CRC of ``b`` and ``len(b)``."""
    if length_b == 0:
        return crc_a
    return int(_crt().combine_crc64nvme(crc_a, crc_b, length_b))


def to_header(crc: int) -> str:
    """``crc`` as S3 spells it in ``x-amz-checksum-crc64nvme``: 8 bytes big-endian, base64."""
    return base64.b64encode(crc.to_bytes(_CRC_BYTES, "big")).decode("ascii")


def from_header(text: str) -> int:
    """The CRC in an ``x-amz-checksum-crc64nvme`` value; ``ValueError`` if it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a base64 CRC64NVME: {text!r}") from exc
    if len(raw) != _CRC_BYTES:
        raise ValueError(f"a CRC64NVME is {_CRC_BYTES} bytes, {text!r} holds {len(raw)}")
    return int.from_bytes(raw, "big")
