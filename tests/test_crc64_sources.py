"""CRC64NVME from ISA-L (``isal``'s ``crc64_rocksoft_refl``, through ctypes) and from awscrt:
the same values for every kind of buffer a check hands over, and awscrt whenever ISA-L's cannot
be bound or is not CRC64NVME (``_checksum``'s module docstring says why both)."""

from __future__ import annotations

import os
import platform
import random
import threading
from typing import Any

import pytest
import torch

from aiodcp import _checksum

CHECK = 0xAE8B14860A799888  # CRC-64/NVME of b"123456789" (reveng's catalogue)


def _awscrt(data: object, previous: int = 0) -> int:
    return int(_checksum._crt().crc64nvme(data, previous))


@pytest.fixture
def isal() -> Any:
    """ISA-L's CRC64NVME as ``_checksum`` binds it. isal's x86_64 wheels export it (1.9.1
    does): there it must bind; elsewhere the tests that need it skip (awscrt's is used)."""
    bound = _checksum._isal_crc64()
    if bound is None:
        assert platform.machine() != "x86_64", "isal's x86_64 wheel exports crc64_rocksoft_refl"
        pytest.skip("no ISA-L CRC64NVME on this platform: awscrt's is used")
    return bound


def test_isal_is_bound_here_and_gives_the_check_value(isal: Any) -> None:
    assert isal(b"123456789", 0) == CHECK
    assert isal(b"", 12345) == 12345


@pytest.mark.parametrize("length", [0, 1, 7, 8, 4095, 5 * 1024 + 1, (1 << 20) + 3])
def test_isal_and_awscrt_agree_on_every_kind_of_buffer(isal: Any, length: int) -> None:
    rng = random.Random(length)
    raw = bytes(rng.getrandbits(8) for _ in range(min(length, 4096))) * (length // 4096 + 1)
    raw = raw[:length]
    previous = rng.getrandbits(64)
    tensor = torch.frombuffer(bytearray(raw or b"\0"), dtype=torch.uint8)[:length]
    buffers = {
        "bytes": raw,  # read-only
        "bytearray": bytearray(raw),
        "memoryview of bytes, offset": memoryview(b"xyz" + raw)[3:],  # read-only, not at 0
        "memoryview of a bytearray, offset": memoryview(bytearray(b"xyz" + raw))[3:],
        "numpy view of a tensor": tensor.numpy(),
    }
    for name, data in buffers.items():
        want = _awscrt(data, previous)
        assert isal(data, previous) == want, name
        assert _checksum.crc64nvme(data, previous) == want, name


def test_a_running_crc_continues_across_sources(isal: Any) -> None:
    data = os.urandom(3 << 20)
    head = isal(data[:1_000_003], 0)
    assert _awscrt(data[1_000_003:], head) == _awscrt(data)
    assert isal(memoryview(data)[1_000_003:], _awscrt(data[:1_000_003])) == _awscrt(data)


@pytest.mark.parametrize("writable", [True, False])
def test_a_non_contiguous_buffer_is_refused_not_misread(isal: Any, writable: bool) -> None:
    strided = memoryview(bytearray(64) if writable else bytes(64))[::2]
    with pytest.raises((BufferError, TypeError, ValueError)):
        isal(strided, 0)
    with pytest.raises((BufferError, TypeError, ValueError)):
        _checksum.crc64nvme(strided)


def test_a_symbol_that_is_not_crc64nvme_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The self-check at binding: a function whose check value differs is refused, and
    CRC64NVME then comes from awscrt (the same values)."""
    monkeypatch.setattr(_checksum, "_NVME_CHECK", CHECK ^ 1)
    assert _checksum._bind_isal() is None
    monkeypatch.setattr(_checksum, "_isal", False)  # as if it could not be bound
    monkeypatch.setattr(_checksum, "_checksums", None)  # awscrt not imported yet
    assert _checksum.crc64nvme(b"123456789") == CHECK
    assert _checksum._checksums is not None  # it came from awscrt


def test_crcs_from_many_threads_at_once_are_right(isal: Any) -> None:
    """ctypes releases the GIL for ISA-L's call: concurrent checks (the fetch engine's worker
    threads) each get their own buffer's CRC."""
    chunks = [os.urandom((1 << 20) + n) for n in range(8)]
    want = [_awscrt(c) for c in chunks]
    got: dict[int, list[int]] = {}

    def work(n: int) -> None:
        got[n] = [isal(chunks[(n + k) % 8], 0) for k in range(8)]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(not t.is_alive() for t in threads)
    for n in range(4):
        assert got[n] == [want[(n + k) % 8] for k in range(8)]
