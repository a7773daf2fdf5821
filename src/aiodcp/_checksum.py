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
    full_object_checksum(headers)        -> (algorithm, value) | None: a HEAD's full-object
                                            CRC64NVME/CRC32C/CRC32 (not a composite one)
    full_object_checksum(headers, WHOLE_READ_HEADERS)   the same, SHA1/SHA256 too: what an
                                            object read whole in one stream can be checked
                                            against (``.metadata``, ``aiodcp verify``)
    composite_checksum(headers)          -> the algorithm of a composite checksum (none checks)
    Digest(algorithm).update(data)...value() -> int     any of those five, streamed

Where the CRCs come from: CRC64NVME, what every check of a checkpoint aiodcp saved computes, from
ISA-L's ``crc64_rocksoft_refl`` (Intel's storage-acceleration library, the same CRC: CRC-64/NVME
is CRC-64/Rocksoft), which the ``isal`` package aiodcp already requires (for zip's CRC-32) carries
and exports; it is reached through ``ctypes`` (``_isal_crc64``), which releases the GIL for the
call, and is used only after it gives the catalogue's check value for ``b"123456789"`` in one call
and in two. Binding it costs ~2 ms (``ctypes`` and ``isal.isal_zlib`` imported) where importing
``awscrt`` costs ~30-40 ms of CPU (its 11 MB extension, most of it AWS-LC seeding its random
generator, GIL held), which a process's first verified load paid on its critical path.
Everything else comes from ``awscrt``: ``combine`` (ISA-L has none: a save's part, block and
object CRCs, a whole object folded from its ranges), CRC32C, CRC32; and CRC64NVME too once
``awscrt`` is imported (a process that combines imports it anyway, ``need_combine``), or where
ISA-L's symbol is missing or gives another value.

Neither library is loaded by ``import aiodcp``: a load starts loading what it needs in a thread
of its own as soon as it knows it will check bytes (``warm_up``: ISA-L for a checkpoint with an
integrity record; ``warm_up(combine=True)``, awscrt too, when the store answered a file's HEAD
with a full-object checksum, to be folded from ranges), so it happens while the first GETs are
under way; a load that can check nothing (no record, a store that gives no checksum) loads
neither; anything else loads it at its first checksum.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._errors import MissingDependencyError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "ALGORITHM",
    "FULL_OBJECT_HEADERS",
    "HEADER",
    "WHOLE_READ_HEADERS",
    "Digest",
    "combine",
    "need_combine",
    "composite_checksum",
    "crc64nvme",
    "from_header",
    "full_object_checksum",
    "to_header",
    "warm_up",
]

ALGORITHM = "CRC64NVME"
"""The algorithm's name as S3 spells it (``x-amz-checksum-algorithm``, ``ChecksumAlgorithm``)."""

HEADER = "x-amz-checksum-crc64nvme"
"""The header that carries a CRC64NVME checksum on requests and responses."""

_CRC_BYTES = 8

logger = logging.getLogger(__name__)

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


def warm_up(*, combine: bool = False) -> None:
    """Load the CRC library in a daemon thread now, if it is not loaded yet, so the first
    checksum does not wait for it (a concurrent first checksum waits on Python's import lock):
    ISA-L's CRC64NVME, or with ``combine`` (CRCs of ranges to be combined) ``awscrt``."""
    if _checksums is not None or (_isal and not combine):
        return
    with _warm_lock:
        if combine in _warming:
            return
        _warming.add(combine)

    def load() -> None:
        try:
            need_combine() if combine else _crc64()
        except MissingDependencyError:
            pass  # raised again, with its message, where a checksum is needed

    threading.Thread(target=load, name="import-crc-for-aiodcp", daemon=True).start()


_warm_lock = threading.Lock()
_warming: set[bool] = set()


def need_combine() -> None:
    """This process combines CRCs (a save: its parts', blocks' and objects' CRCs; a whole object
    folded from ranges): load ``awscrt`` now, which every CRC then comes from, rather than
    ISA-L first and ``awscrt`` at the first combine."""
    _crt()


_isal: Any = None
"""ISA-L's CRC64NVME (``_isal_crc64``), once bound; False where it cannot be."""

_NVME_CHECK = 0xAE8B14860A799888
"""CRC-64/NVME of ``b"123456789"``, the catalogue's check value (reveng's CRC catalogue)."""


def _isal_crc64() -> Any:
    """``crc(data, previous) -> int``: ISA-L's ``crc64_rocksoft_refl`` on any C-contiguous
    buffer (read-only ones too, without a copy), or None where the ``isal`` package does not
    export it or it does not give CRC64NVME's check value."""
    global _isal
    if _isal is None:
        _isal = _bind_isal() or False
    return _isal or None


def _bind_isal() -> Any:
    try:
        import ctypes

        from isal import isal_zlib

        library = ctypes.CDLL(isal_zlib.__file__)
        library.crc64_rocksoft_refl  # noqa: B018 (AttributeError where it is not exported)
    except (ImportError, OSError, AttributeError):
        return None

    class PyBuffer(ctypes.Structure):  # Python's Py_buffer (part of the stable ABI since 3.11)
        _fields_ = (
            ("buf", ctypes.c_void_p),
            ("obj", ctypes.c_void_p),
            ("len", ctypes.c_ssize_t),
            ("itemsize", ctypes.c_ssize_t),
            ("readonly", ctypes.c_int),
            ("ndim", ctypes.c_int),
            ("format", ctypes.c_char_p),
            ("shape", ctypes.c_void_p),
            ("strides", ctypes.c_void_p),
            ("suboffsets", ctypes.c_void_p),
            ("internal", ctypes.c_void_p),
        )

    # private function objects (prototypes), never ctypes.pythonapi's shared ones re-typed
    pointer = ctypes.POINTER(PyBuffer)
    function = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)(
        ("crc64_rocksoft_refl", library)
    )
    get_buffer = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, pointer, ctypes.c_int)(
        ("PyObject_GetBuffer", ctypes.pythonapi)
    )  # sets BufferError on failure, which a PYFUNCTYPE call raises
    release = ctypes.PYFUNCTYPE(None, pointer)(("PyBuffer_Release", ctypes.pythonapi))
    simple = 0  # PyBUF_SIMPLE: the bytes, C-contiguous
    first_byte, address_of = ctypes.c_char.from_buffer, ctypes.addressof

    def crc(data: Buffer, previous: int) -> int:
        # ctypes releases the GIL for the call; a buffer export held across it keeps the memory
        # in place (``whole``, or ``exported``'s)
        whole = data if isinstance(data, memoryview) else memoryview(data)
        if not whole.readonly:  # a writable buffer (received bytes, a tensor): its first byte's
            length = whole.nbytes  # address (~0.8 us a call here, ~1.5 us through a Py_buffer)
            if length == 0:
                return previous
            return int(function(previous, address_of(first_byte(whole)), length))
        exported = PyBuffer()
        get_buffer(whole, ctypes.byref(exported), simple)
        try:
            return int(function(previous, exported.buf, exported.len))
        finally:
            release(ctypes.byref(exported))

    if crc(b"123456789", 0) != _NVME_CHECK or crc(b"6789", crc(b"12345", 0)) != _NVME_CHECK:
        logger.debug("ISA-L's crc64_rocksoft_refl is not CRC64NVME here: awscrt's is used")
        return None
    return crc


def _crc64() -> Any:
    """The CRC64NVME function to use now: awscrt's once it is imported, ISA-L's before that."""
    if _checksums is not None:
        return _checksums.crc64nvme
    return _isal_crc64() or _crt().crc64nvme


def crc64nvme(data: Buffer, previous: int = 0) -> int:
    """The CRC64NVME of ``data`` (any buffer: bytes, memoryview, a tensor's numpy view...),
    continuing ``previous``, the CRC of the bytes before it."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return int(_crc64()(view, previous))


def combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """The CRC64NVME of ``a + b`` from the CRC of ``a``, the CRC of ``b`` and ``len(b)``."""
    if length_b == 0:
        return crc_a
    return int(_crt().combine_crc64nvme(crc_a, crc_b, length_b))


def to_header(crc: int) -> str:
    """``crc`` as S3 spells it in ``x-amz-checksum-crc64nvme``: 8 bytes big-endian, base64."""
    return base64.b64encode(crc.to_bytes(_CRC_BYTES, "big")).decode("ascii")


_MULTIPART_ETAG = re.compile(r'-[0-9]+"?\s*$')
"""The ETag of an object uploaded in parts ends ``-<parts>``."""

FULL_OBJECT_HEADERS = {
    "CRC64NVME": ("x-amz-checksum-crc64nvme", 8),
    "CRC32C": ("x-amz-checksum-crc32c", 4),
    "CRC32": ("x-amz-checksum-crc32", 4),
}
"""The full-object checksums a load can check an object read whole against (their parts'
CRCs combine): algorithm -> (response header, bytes), in the order they are looked for."""


WHOLE_READ_HEADERS = {
    **FULL_OBJECT_HEADERS,
    "SHA256": ("x-amz-checksum-sha256", 32),
    "SHA1": ("x-amz-checksum-sha1", 20),
}
"""The full-object checksums an object read whole, in one stream from its first byte, can be
checked against: the CRCs, and SHA-256 and SHA-1 (which do not combine from parts read apart).
S3 gives a SHA full-object only to an object uploaded in one PUT with it; a multipart upload's
SHA checksum is composite (``-<parts>``), which no read can check."""


def full_object_checksum(
    headers: Mapping[str, str],
    algorithms: Mapping[str, tuple[str, int]] = FULL_OBJECT_HEADERS,
) -> tuple[str, int] | None:
    """``(algorithm, value)`` of the full-object checksum in a response's headers (lower-case
    names: a HEAD or GET with ``x-amz-checksum-mode: ENABLED``) among ``algorithms`` (name ->
    (header, bytes); ``WHOLE_READ_HEADERS`` adds the SHAs), or None: none, only a
    composite one (``x-amz-checksum-type: COMPOSITE``, or a value ending ``-<parts>``, what a
    multipart upload with CRC32/CRC32C/SHA parts gets), or one that does not parse. A
    CRC32/CRC32C of a multipart object (its ``etag`` ends ``-<parts>``) counts only if the
    response says ``FULL_OBJECT``: some S3-compatible stores (moto) return a composite one
    without its ``-<parts>`` and without the type."""
    declared = headers.get("x-amz-checksum-type")
    if declared is not None and declared.strip().upper() != "FULL_OBJECT":
        return None
    multipart = _MULTIPART_ETAG.search(headers.get("etag", "")) is not None
    for algorithm, (name, width) in algorithms.items():
        text = headers.get(name)
        if not text or "-" in text:
            continue
        if multipart and declared is None and algorithm != "CRC64NVME":
            continue  # CRC64NVME is full-object only; the others may be composite
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == width:
            return algorithm, int.from_bytes(raw, "big")
    return None


def from_header(text: str) -> int:
    """The CRC in an ``x-amz-checksum-crc64nvme`` value; ``ValueError`` if it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a base64 CRC64NVME: {text!r}") from exc
    if len(raw) != _CRC_BYTES:
        raise ValueError(f"a CRC64NVME is {_CRC_BYTES} bytes, {text!r} holds {len(raw)}")
    return int.from_bytes(raw, "big")


def composite_checksum(headers: Mapping[str, str]) -> str | None:
    """The algorithm of a composite checksum in a response's headers (``x-amz-checksum-type:
    COMPOSITE``, or a value ending ``-<parts>``), which no read of the object can check; None
    when there is none."""
    declared = (headers.get("x-amz-checksum-type") or "").strip().upper()
    for algorithm, (name, _) in WHOLE_READ_HEADERS.items():
        text = headers.get(name)
        if text and (declared == "COMPOSITE" or _COMPOSITE_VALUE.search(text)):
            return algorithm
    return None


_COMPOSITE_VALUE = re.compile(r"-[0-9]+\s*$")


class Digest:
    """One of S3's full-object checksums (``WHOLE_READ_HEADERS``) of bytes given in order:
    ``update`` each piece (any buffer), then ``value()``, the checksum as the integer its
    header's bytes spell (big-endian). CRC64NVME from ``crc64nvme``, the other CRCs from awscrt
    (``_crt``), SHAs from hashlib."""

    __slots__ = ("_crc", "_fn", "_sha", "algorithm")

    def __init__(self, algorithm: str) -> None:
        if algorithm not in WHOLE_READ_HEADERS:
            raise ValueError(f"not a full-object checksum S3 reports: {algorithm!r}")
        self.algorithm = algorithm
        self._crc = 0
        self._sha: Any = None
        self._fn: Any = None
        if algorithm.startswith("SHA"):
            self._sha = hashlib.new(algorithm.lower())
        elif algorithm == ALGORITHM:
            self._fn = crc64nvme
        else:
            self._fn = getattr(_crt(), algorithm.lower())

    def update(self, data: Buffer) -> None:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        if self._sha is not None:
            self._sha.update(view)
        elif view:
            self._crc = int(self._fn(view, self._crc))

    def value(self) -> int:
        if self._sha is not None:
            return int.from_bytes(self._sha.digest(), "big")
        return self._crc
