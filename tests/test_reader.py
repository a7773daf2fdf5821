"""ChunkBuffer and SequentialReader: every rule of the contract, torch.load, and two state
machines that compare every answer with ``io.BytesIO`` over the same bytes."""

from __future__ import annotations

import array
import ctypes
import io
import itertools
import pickle
import random
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, cast

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from torch.distributed.checkpoint.utils import _create_file_view

from aiodcp._errors import (
    AiodcpError,
    InvalidRangeError,
    ReaderTypeError,
    SequentialAccessError,
)
from aiodcp._reader import (
    _UNLOCKED_COPY_BYTES,
    FALLBACK_HINT,
    SEQUENTIAL_ACCESS_CONTRACT,
    ChunkBuffer,
    SequentialReader,
)


@dataclass(frozen=True)
class Span:
    start: int
    end: int


def split(data: bytes, cuts: Sequence[int]) -> list[memoryview]:
    """``data`` cut at the sorted offsets ``cuts`` (repeats make empty chunks)."""
    view = memoryview(data)
    bounds = [0, *cuts, len(data)]
    return [view[a:b] for a, b in itertools.pairwise(bounds)]


def random_chunks(data: bytes, rng: random.Random, max_chunks: int = 12) -> list[memoryview]:
    if not data:
        return [memoryview(data)] * rng.randint(0, 2)
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, max_chunks)))
    return split(data, cuts)


# --------------------------------------------------------------------------- ChunkBuffer


def test_chunkbuffer_reads_across_chunks_and_empty_chunks() -> None:
    backing = bytearray(b"hi")
    buf = ChunkBuffer([b"abc", b"", memoryview(b"defg"), backing])
    assert len(buf) == 9
    assert buf.read(2) == b"ab"
    assert buf.read(3) == b"cde"  # spans two chunks (and skips the empty one)
    assert buf.tell() == 5
    assert buf.read(100) == b"fghi"
    assert buf.tell() == 9
    assert buf.read() == b""
    assert buf.read(5) == b""
    buf.seek(0)
    assert buf.read(None) == b"abcdefghi"
    buf.seek(1)
    assert buf.read(-7) == b"bcdefghi"
    buf.seek(3)
    assert buf.readall() == b"defghi"
    assert isinstance(buf.read(0), bytes)


def test_chunkbuffer_keeps_the_chunks_without_copying() -> None:
    a = b"x" * 10
    b = bytearray(b"y" * 5)
    buf = ChunkBuffer([a, memoryview(b""), b])
    chunks = buf.chunks
    assert len(chunks) == 2
    assert all(isinstance(c, memoryview) and c.readonly and c.format == "B" for c in chunks)
    assert chunks[0].obj is a
    assert chunks[1].obj is b
    b[0] = ord("z")  # a view, not a copy
    buf.seek(10)
    assert buf.read(1) == b"z"


def test_chunkbuffer_accepts_other_formats_as_bytes() -> None:
    words = array.array("I", [1, 2, 3])
    matrix = memoryview(bytearray(range(6))).cast("B", (2, 3))
    buf = ChunkBuffer([words, matrix])
    assert len(buf) == 12 + 6
    assert buf.read() == words.tobytes() + bytes(range(6))


def test_chunkbuffer_length_argument() -> None:
    assert len(ChunkBuffer([b"ab", b"c"], 3)) == 3
    assert len(ChunkBuffer([], 0)) == 0
    with pytest.raises(ValueError, match="3 bytes but length=4") as info:
        ChunkBuffer([b"ab", b"c"], 4)
    assert isinstance(info.value, InvalidRangeError)
    with pytest.raises(TypeError) as type_info:
        ChunkBuffer([b"ab"], "2")  # type: ignore[arg-type]
    assert isinstance(type_info.value, ReaderTypeError)


@pytest.mark.parametrize(
    "chunk", [42, "text", None, memoryview(b"abcdef")[::2]], ids=["int", "str", "None", "strided"]
)
def test_chunkbuffer_rejects_non_bytes_chunks(chunk: Any) -> None:
    with pytest.raises(ReaderTypeError, match="chunk 1") as info:
        ChunkBuffer([b"ok", chunk])
    assert isinstance(info.value, TypeError)


def test_chunkbuffer_rejects_a_bare_bytes_object() -> None:
    with pytest.raises(ReaderTypeError):
        ChunkBuffer(b"abc")  # type: ignore[arg-type]  # iterates to ints, not chunks


def test_chunkbuffer_seek_whences_and_past_the_end() -> None:
    buf = ChunkBuffer(split(b"0123456789", [3, 7]))
    assert buf.seek(4) == 4
    assert buf.seek(2, io.SEEK_CUR) == 6
    assert buf.seek(-3, io.SEEK_CUR) == 3
    assert buf.seek(-2, io.SEEK_END) == 8
    assert buf.read() == b"89"
    assert buf.seek(5, io.SEEK_END) == 15  # past the end, like a file
    assert buf.tell() == 15
    assert buf.read(3) == b""
    assert buf.readinto(bytearray(4)) == 0
    assert buf.tell() == 15
    assert buf.seek(0, io.SEEK_SET) == 0
    assert buf.read(1) == b"0"


@pytest.mark.parametrize(
    ("offset", "whence"), [(-1, io.SEEK_SET), (-6, io.SEEK_CUR), (-11, io.SEEK_END)]
)
def test_chunkbuffer_negative_position_raises_and_keeps_position(offset: int, whence: int) -> None:
    buf = ChunkBuffer(split(b"0123456789", [5]))
    buf.seek(5)
    with pytest.raises(ValueError, match="negative position") as info:
        buf.seek(offset, whence)
    assert isinstance(info.value, SequentialAccessError)
    assert info.value.position == (offset if whence == 0 else -1)  # type: ignore[attr-defined]
    assert buf.tell() == 5
    assert buf.read(1) == b"5"


def test_chunkbuffer_invalid_whence() -> None:
    buf = ChunkBuffer([b"abc"])
    buf.seek(1)
    with pytest.raises(SequentialAccessError, match="whence"):
        buf.seek(0, 3)
    assert buf.tell() == 1


@pytest.mark.parametrize("bad", [1.0, "1", True, None, b"1"])
def test_chunkbuffer_type_errors_keep_position(bad: Any) -> None:
    buf = ChunkBuffer([b"abcdef"])
    buf.seek(2)
    with pytest.raises(ReaderTypeError) as info:
        buf.seek(bad)
    assert isinstance(info.value, TypeError)
    with pytest.raises(ReaderTypeError):
        buf.seek(0, bad)
    if bad is not None:  # read(None) means "to the end"
        with pytest.raises(ReaderTypeError):
            buf.read(bad)
    assert buf.tell() == 2


def test_chunkbuffer_accepts_index_like_integers() -> None:
    class Index:
        def __index__(self) -> int:
            return 3

    buf = ChunkBuffer([b"abcdef"])
    assert buf.seek(Index()) == 3  # type: ignore[arg-type]
    assert buf.read(Index()) == b"def"  # type: ignore[arg-type]


def _tensor_bytes_view(tensor: torch.Tensor) -> memoryview:
    """A writable, numpy-free byte view of a CPU tensor's memory."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr()))


def test_chunkbuffer_readinto_destinations() -> None:
    data = bytes(range(40))
    buf = ChunkBuffer(split(data, [7, 7, 19, 33]))

    target = bytearray(10)
    assert buf.readinto(target) == 10
    assert target == data[:10]

    words = memoryview(bytearray(8)).cast("I")  # another format: copied as bytes
    assert buf.readinto(words) == 8
    assert words.tobytes() == data[10:18]

    shorts = array.array("H", [0] * 3)
    assert buf.readinto1(shorts) == 6
    assert shorts.tobytes() == data[18:24]

    tensor = torch.zeros(4, dtype=torch.int16)  # a ctypes view over the tensor's memory
    assert buf.readinto(_tensor_bytes_view(tensor)) == 8
    assert tensor.tolist() == array.array("h", data[24:32]).tolist()

    backing = bytearray(16)
    shared = torch.frombuffer(backing, dtype=torch.uint8)
    assert buf.readinto(memoryview(backing)) == 8  # short read: only 8 bytes left
    assert shared[:8].tolist() == list(data[32:40])
    assert shared[8:].tolist() == [0] * 8
    assert buf.tell() == 40
    assert buf.readinto(bytearray(3)) == 0


@pytest.mark.parametrize("source", ["writable", "read-only", "mixed"])
def test_chunkbuffer_large_readinto_is_exact_whichever_copy_runs(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of _UNLOCKED_COPY_BYTES or more between writable memory go through ctypes.memmove
    (GIL released); read-only chunks and short runs through slice assignment. Every offset and
    chunk boundary combination must give the same bytes."""
    moves: list[int] = []
    memmove = ctypes.memmove

    def counting_memmove(dst: int, src: int, count: int) -> Any:
        moves.append(count)
        return memmove(dst, src, count)

    monkeypatch.setattr(ctypes, "memmove", counting_memmove)
    rng = random.Random(7)
    big = _UNLOCKED_COPY_BYTES
    sizes = [big * 2, 13, big + 5, big - 1, 3 * big]
    data = bytes(rng.getrandbits(8) for _ in range(sum(sizes)))
    chunks: list[Any] = []
    at = 0
    for index, size in enumerate(sizes):
        piece = data[at : at + size]
        at += size
        readonly = source == "read-only" or (source == "mixed" and index % 2)
        chunks.append(piece if readonly else memoryview(bytearray(piece)))
    buf = ChunkBuffer(chunks)
    cuts = [0, 1, big - 1, big, 2 * big, 2 * big + 13, 3 * big + 18, len(data) - 1, len(data)]
    for start in cuts:
        for end in cuts:
            if end <= start:
                continue
            buf.seek(start)
            tensor = torch.zeros(end - start, dtype=torch.uint8)
            assert buf.readinto(_tensor_bytes_view(tensor)) == end - start
            assert bytes(_tensor_bytes_view(tensor)) == data[start:end], (start, end)
            buf.seek(start)
            target = bytearray(end - start)
            assert buf.readinto(target) == end - start
            assert target == data[start:end], (start, end)
    if source == "read-only":
        assert not moves  # ctypes cannot take a read-only buffer's address: slices copied
    else:
        assert moves and min(moves) >= big


@pytest.mark.parametrize(
    "bad",
    [b"readonly", memoryview(b"readonly"), [0, 0], "str", memoryview(bytearray(8))[::2]],
    ids=["bytes", "readonly-view", "list", "str", "strided"],
)
def test_chunkbuffer_readinto_rejects_bad_buffers(bad: Any) -> None:
    buf = ChunkBuffer([b"abcdef"])
    buf.seek(1)
    with pytest.raises(ReaderTypeError) as info:
        buf.readinto(bad)
    assert isinstance(info.value, TypeError)
    assert buf.tell() == 1


def test_chunkbuffer_flags_close_and_context_manager() -> None:
    buf = ChunkBuffer([b"abc"])
    assert buf.readable() and buf.seekable() and not buf.writable()
    assert not buf.closed
    with buf as entered:
        assert entered is buf
        assert entered.read(1) == b"a"
    assert buf.closed
    assert buf.chunks == ()
    assert len(buf) == 3
    for call in (buf.read, buf.tell, lambda: buf.seek(0), lambda: buf.readinto(bytearray(1))):
        with pytest.raises(ValueError, match="closed"):
            call()
    buf.close()  # idempotent
    assert buf.closed
    assert "closed" in repr(buf)


def test_zipfile_over_chunkbuffer() -> None:
    payload = {f"m{i}.bin": random.Random(i).randbytes(300 * i) for i in range(1, 6)}
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, body in payload.items():
            zf.writestr(name, body)
    data = raw.getvalue()
    for seed in range(5):
        buf = ChunkBuffer(random_chunks(data, random.Random(seed), max_chunks=30))
        with zipfile.ZipFile(buf) as zf:
            assert zf.namelist() == list(payload)
            for name in reversed(list(payload)):  # seek all over the place
                assert zf.read(name) == payload[name]
    buf = ChunkBuffer(split(data, [1, 2, len(data) - 10]))
    buf.seek(-22, io.SEEK_END)
    assert buf.read(4) == b"PK\x05\x06"  # end-of-central-directory record


def _saved(obj: object) -> bytes:
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


TENSORS: dict[str, Callable[[], torch.Tensor]] = {
    "float32": lambda: torch.randn(17, 5),
    "bfloat16": lambda: torch.randn(33, 3).to(torch.bfloat16),
    "float16": lambda: torch.randn(9).to(torch.float16),
    "bool": lambda: torch.rand(50) > 0.5,
    "complex64": lambda: torch.randn(6, 4, dtype=torch.complex64),
    "int64": lambda: torch.randint(-(2**40), 2**40, (3, 3, 3)),
    "uint8": lambda: torch.randint(0, 256, (1000,), dtype=torch.uint8),
    "0-d": lambda: torch.tensor(3.25),
    "empty": lambda: torch.empty(0, 4),
    "strided-view": lambda: torch.arange(40.0).reshape(8, 5)[::2, 1:],
}


@pytest.mark.parametrize("kind", list(TENSORS))
def test_torch_load_through_chunkbuffer(kind: str) -> None:
    torch.manual_seed(0)
    tensor = TENSORS[kind]()
    data = _saved(tensor)
    for seed in range(6):
        rng = random.Random(seed)
        chunks = random_chunks(data, rng, max_chunks=rng.choice([0, 1, 5, 40]))
        if seed == 5:  # one byte per chunk: every read spans chunks
            chunks = split(data, range(1, len(data)))
        loaded = torch.load(cast(IO[bytes], ChunkBuffer(chunks, len(data))), weights_only=True)
        assert loaded.dtype == tensor.dtype
        assert loaded.shape == tensor.shape
        assert torch.equal(loaded, tensor), (kind, seed)


def test_torch_load_state_dict_through_chunkbuffer() -> None:
    state: dict[str, Any] = {"w": torch.randn(4, 4), "b": torch.zeros(4, dtype=torch.bfloat16)}
    state["n"] = 3
    data = _saved(state)
    loaded = torch.load(
        cast(IO[bytes], ChunkBuffer(random_chunks(data, random.Random(7)))), weights_only=True
    )
    assert loaded.keys() == state.keys()
    assert torch.equal(loaded["w"], state["w"])
    assert torch.equal(loaded["b"], state["b"])
    assert loaded["n"] == 3


# ---------------------------------------------------------------------- SequentialReader

FILE = bytes(range(256)) * 2
# items: #0 [10, 20) adjacent #1 [20, 30), gap, #2 [40, 50), gap, #3 [60, 70) adjacent #4 [70, 80)
ITEMS = [Span(10, 20), Span(20, 30), Span(40, 50), Span(60, 70), Span(70, 80)]


class Recorder:
    """get_item/release_item callbacks over FILE that record every call."""

    def __init__(
        self, items: Sequence[Span] = ITEMS, data: bytes = FILE, chunk_seed: int = 0
    ) -> None:
        self.items = items
        self.data = data
        self.rng = random.Random(chunk_seed)
        self.fetched: list[int] = []
        self.released: list[int] = []
        self.fail: set[int] = set()

    def get(self, i: int) -> ChunkBuffer:
        if i in self.fail:
            self.fail.discard(i)
            raise ConnectionError(f"item {i} failed")
        self.fetched.append(i)
        item = self.items[i]
        return ChunkBuffer(random_chunks(self.data[item.start : item.end], self.rng))

    def release(self, i: int) -> None:
        self.released.append(i)

    def reader(self, name: str = "s3://bucket/__0_0.distcp") -> SequentialReader:
        return SequentialReader(self.items, self.get, self.release, name=name)


def test_reader_starts_at_the_first_item_and_fetches_lazily() -> None:
    rec = Recorder()
    reader = rec.reader()
    assert reader.tell() == 10
    assert reader.readable() and reader.seekable() and not reader.writable()
    assert reader.items == tuple(ITEMS)
    assert rec.fetched == []
    assert reader.read(0) == b""
    assert rec.fetched == []
    assert reader.read(4) == FILE[10:14]
    assert rec.fetched == [0]
    assert reader.read(3) == FILE[14:17]
    assert rec.fetched == [0]


def test_reader_seek_inside_the_current_item_both_ways() -> None:
    rec = Recorder()
    reader = rec.reader()
    assert reader.seek(18) == 18
    assert reader.read(2) == FILE[18:20]
    assert reader.seek(12) == 12  # back, still inside the current item
    assert reader.read(1) == FILE[12:13]
    assert reader.seek(-3, io.SEEK_CUR) == 10
    assert reader.seek(20) == 20  # the end of the current item is inside it
    assert reader.current_index == 0
    assert reader.seek(10) == 10
    assert rec.released == []


def test_reader_seek_forward_releases_and_skips_without_fetching() -> None:
    rec = Recorder()
    reader = rec.reader()
    assert reader.read(1) == FILE[10:11]
    assert reader.seek(63) == 63  # skips #1 and #2
    assert reader.current_index == 3
    assert rec.released == [0, 1, 2]
    assert rec.fetched == [0]
    assert reader.read(2) == FILE[63:65]
    assert rec.fetched == [0, 3]
    assert reader.seek(5, io.SEEK_CUR) == 70  # boundary of adjacent #3/#4: stays in #3
    assert reader.current_index == 3
    assert reader.seek(60) == 60
    assert reader.seek(75) == 75
    assert reader.current_index == 4
    assert rec.released == [0, 1, 2, 3]


def test_reader_seek_to_the_start_of_an_adjacent_item_is_a_boundary() -> None:
    rec = Recorder()
    reader = rec.reader()
    reader.seek(25)  # forward into #1: the item starting at 20 is passed
    assert reader.current_index == 1
    assert rec.released == [0]
    reader.seek(70)
    assert reader.current_index == 4  # start of #4 == end of #3: the later item
    assert rec.released == [0, 1, 2, 3]


def _assert_contract_error(error: SequentialAccessError, position: int) -> None:
    message = str(error)
    assert message.startswith(SEQUENTIAL_ACCESS_CONTRACT.format(name="s3://bucket/__0_0.distcp"))
    assert message.endswith(FALLBACK_HINT)
    assert f"Position {position} " in message
    assert error.position == position  # type: ignore[attr-defined]
    assert isinstance(error, ValueError) and isinstance(error, AiodcpError)


@pytest.mark.parametrize(
    ("start", "target", "words"),
    [
        (45, 25, "before the current item #2 ItemRange(start=40, end=50)"),
        (45, 9, "before the current item"),
        (45, -4, "before the current item"),
        (12, 35, "gap between item #1 ItemRange(start=20, end=30) and item #2"),
        (12, 55, "gap between item #2 ItemRange(start=40, end=50) and item #3"),
        (12, 81, "after the last planned item #4 ItemRange(start=70, end=80)"),
        (75, 65, "before the current item #4"),
    ],
)
def test_reader_forbidden_seeks(start: int, target: int, words: str) -> None:
    rec = Recorder()
    reader = rec.reader()
    reader.seek(start)
    reader.read(1)
    before = (reader.tell(), reader.current_index, list(rec.fetched), list(rec.released))
    for whence, offset in ((io.SEEK_SET, target), (io.SEEK_CUR, target - reader.tell())):
        with pytest.raises(SequentialAccessError) as info:
            reader.seek(offset, whence)
        _assert_contract_error(info.value, target)
        assert words in str(info.value)
        assert (reader.tell(), reader.current_index, rec.fetched, rec.released) == before
    assert reader.read(1) == FILE[start + 1 : start + 2]  # still usable


def test_reader_seek_end_and_bad_whence() -> None:
    rec = Recorder()
    reader = rec.reader()
    reader.seek(15)
    with pytest.raises(
        SequentialAccessError, match=r"seek\(offset, SEEK_END\) is not supported"
    ) as info:
        reader.seek(0, io.SEEK_END)
    assert str(info.value).endswith(FALLBACK_HINT)
    with pytest.raises(SequentialAccessError, match="invalid whence 5"):
        reader.seek(0, 5)
    assert reader.tell() == 15


@pytest.mark.parametrize("size", [None, -1, -100])
def test_reader_whole_file_reads_are_refused(size: int | None) -> None:
    rec = Recorder()
    reader = rec.reader()
    reader.seek(15)
    with pytest.raises(SequentialAccessError, match="must be >= 0") as info:
        reader.read(size)
    assert str(info.value).startswith("aiodcp's DCP reader serves only the planned byte ranges")
    assert reader.tell() == 15
    assert rec.fetched == []


@pytest.mark.parametrize("bad", [1.0, "3", True, b"3"])
def test_reader_type_errors(bad: Any) -> None:
    rec = Recorder()
    reader = rec.reader()
    reader.seek(15)
    for call in (reader.read, reader.seek, lambda v: reader.seek(0, v)):
        with pytest.raises(ReaderTypeError) as info:
            call(bad)
        assert isinstance(info.value, TypeError)
    for buffer in (b"abc", "abc", [1, 2]):
        with pytest.raises(ReaderTypeError):
            reader.readinto(buffer)  # type: ignore[arg-type]
    assert reader.tell() == 15
    assert rec.fetched == []


def _assert_boundary_error(error: SequentialAccessError, position: int, item: int) -> None:
    message = str(error)
    assert message.startswith(SEQUENTIAL_ACCESS_CONTRACT.format(name="s3://bucket/__0_0.distcp"))
    assert message.endswith(FALLBACK_HINT)
    assert f"read at position {position} crosses" in message
    assert error.position == position  # type: ignore[attr-defined]
    assert isinstance(error, ValueError) and isinstance(error, AiodcpError)
    first, second = ITEMS[item], ITEMS[item + 1]
    assert (
        f"crosses the end of item #{item} ItemRange(start={first.start}, end={first.end}) "
        f"into item #{item + 1} ItemRange(start={second.start}, end={second.end})"
    ) in str(error)
    assert f"then read on from position {first.end}." in str(error)
    assert error.boundary == first.end  # type: ignore[attr-defined]


def test_reader_read_across_an_adjacent_boundary_raises() -> None:
    rec = Recorder()
    reader = rec.reader()
    reader.seek(17)
    with pytest.raises(SequentialAccessError) as info:
        reader.read(6)  # #0 -> #1 (adjacent): items are separate buffers
    _assert_boundary_error(info.value, 17, 0)
    assert "Read at most 3 bytes here" in str(info.value)
    assert (reader.tell(), reader.current_index, rec.fetched, rec.released) == (17, 0, [], [])
    assert reader.read(3) == FILE[17:20]
    assert reader.read(3) == FILE[20:23]  # at the boundary: from the item starting there
    assert reader.current_index == 1
    assert rec.released == [0]
    assert rec.fetched == [0, 1]
    assert reader.read(100) == FILE[23:30]  # short: #2 is after a gap
    assert reader.tell() == 30
    assert reader.current_index == 1
    assert reader.read(5) == b""  # at the end of #1, nothing adjacent
    assert reader.tell() == 30
    reader.seek(40)
    assert reader.read(10) == FILE[40:50]  # exactly to the end: stays in #2
    assert reader.current_index == 2
    assert reader.seek(41) == 41
    error = pickle.loads(pickle.dumps(info.value))
    assert str(error) == str(info.value)
    assert error.boundary == 20


def test_reader_read_at_an_adjacent_boundary_moves_on() -> None:
    rec = Recorder()
    reader = rec.reader()
    reader.seek(60)
    assert reader.read(10) == FILE[60:70]
    assert reader.current_index == 3
    assert reader.read(1) == FILE[70:71]
    assert reader.current_index == 4
    assert rec.released == [0, 1, 2, 3]
    with pytest.raises(SequentialAccessError):
        reader.seek(65)


def test_reader_readinto_follows_the_same_rules() -> None:
    rec = Recorder()
    reader = rec.reader()
    reader.seek(15)
    target = bytearray(b"\xee" * 12)
    with pytest.raises(SequentialAccessError) as info:
        reader.readinto(target)  # #0 -> #1
    _assert_boundary_error(info.value, 15, 0)
    assert target == b"\xee" * 12
    assert reader.readinto(memoryview(target)[:5]) == 5
    assert reader.readinto(memoryview(target)[5:]) == 7  # at the boundary: from #1
    assert target == FILE[15:27]
    assert reader.current_index == 1
    words = memoryview(bytearray(b"\xee" * 8)).cast("I")
    assert reader.readinto1(words) == 3  # short: stops at the end of #1
    assert words.tobytes() == FILE[27:30] + b"\xee" * 5
    assert reader.readinto(bytearray(4)) == 0
    reader.seek(68)
    tensor = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(SequentialAccessError) as info:
        reader.readinto(_tensor_bytes_view(tensor))  # #3 -> #4
    _assert_boundary_error(info.value, 68, 3)
    assert tensor.tolist() == [0, 0, 0]
    assert reader.seek(70) == 70  # the end of #3
    halves = torch.zeros(6, dtype=torch.int16)
    assert reader.readinto(_tensor_bytes_view(halves)) == 10  # from #4, short at its end
    assert halves.tolist() == [*array.array("h", FILE[70:80]).tolist(), 0]
    assert reader.tell() == 80
    assert rec.fetched == [0, 1, 4]  # #3 was never read from
    assert rec.released == [0, 1, 2, 3]


def test_reader_failed_fetch_at_a_boundary() -> None:
    """A read at the end of an item moves to the next one as current_buffer() does: it
    releases the current item first, so a failed fetch leaves the reader on the next one."""
    rec = Recorder()
    reader = rec.reader()
    reader.seek(60)
    assert reader.read(5) == FILE[60:65]
    rec.fail = {4}
    with pytest.raises(SequentialAccessError):
        reader.read(10)  # would cross into #4: refused before any fetch
    assert (reader.tell(), reader.current_index, rec.released) == (65, 3, [0, 1, 2])
    assert reader.read(5) == FILE[65:70]
    with pytest.raises(ConnectionError):
        reader.read(5)  # needs #4, whose fetch fails
    assert (reader.tell(), reader.current_index, rec.released) == (70, 4, [0, 1, 2, 3])
    assert reader.read(10) == FILE[70:80]  # retried: the fetch now succeeds
    assert rec.fetched == [3, 4]
    assert rec.released == [0, 1, 2, 3]


def test_reader_failed_first_fetch_of_the_current_item() -> None:
    rec = Recorder()
    rec.fail = {0}
    reader = rec.reader()
    target = bytearray(4)
    with pytest.raises(ConnectionError):
        reader.readinto(target)
    assert reader.tell() == 10
    assert reader.readinto(target) == 4
    assert target == FILE[10:14]
    assert rec.fetched == [0]


def test_reader_checks_what_get_item_returns() -> None:
    reader = SequentialReader([Span(0, 4)], lambda i: ChunkBuffer([b"abc"]))
    with pytest.raises(InvalidRangeError, match="returned 3 bytes"):
        reader.read(1)
    assert reader.tell() == 0
    wrong = SequentialReader([Span(0, 4)], lambda i: io.BytesIO(b"abcd"))  # type: ignore[arg-type,return-value]
    with pytest.raises(ReaderTypeError, match="not a ChunkBuffer"):
        wrong.read(1)


@pytest.mark.parametrize(
    "items",
    [
        [Span(0, 10), Span(5, 15)],  # overlapping
        [Span(20, 30), Span(0, 10)],  # unsorted
        [Span(0, 10), Span(10, 10)],  # empty
        [Span(-1, 3)],  # negative
        [Span(0, 10), Span(0, 10)],  # duplicated
    ],
)
def test_reader_rejects_bad_item_lists(items: list[Span]) -> None:
    with pytest.raises(InvalidRangeError) as info:
        SequentialReader(items, Recorder().get)
    assert isinstance(info.value, ValueError)


def test_reader_without_items() -> None:
    calls: list[int] = []
    reader = SequentialReader([], lambda i: ChunkBuffer([]), calls.append, name="empty.distcp")
    assert reader.tell() == 0
    for call in (lambda: reader.seek(0), lambda: reader.read(0), lambda: reader.read(1)):
        with pytest.raises(SequentialAccessError, match="No byte ranges of it are planned"):
            call()
    with pytest.raises(SequentialAccessError):
        reader.readinto(bytearray(2))
    with pytest.raises(SequentialAccessError):
        reader.current_buffer()
    reader.close()
    assert calls == []


def test_reader_close_releases_the_current_item_once() -> None:
    rec = Recorder()
    with rec.reader() as reader:
        reader.seek(45)
        reader.read(1)
    assert reader.closed
    assert rec.released == [0, 1, 2]
    reader.close()
    assert rec.released == [0, 1, 2]
    for call in (reader.tell, lambda: reader.read(1), lambda: reader.seek(45)):
        with pytest.raises(SequentialAccessError, match="closed"):
            call()
    with pytest.raises(SequentialAccessError, match="closed"):
        reader.readinto(bytearray(1))


def test_reader_close_without_release_callback() -> None:
    reader = SequentialReader(ITEMS, Recorder().get)
    assert reader.read(2) == FILE[10:12]
    reader.seek(45)
    reader.close()
    assert reader.closed


def test_reader_release_errors_propagate_after_releasing_everything() -> None:
    released: list[int] = []

    def release(i: int) -> None:
        released.append(i)
        if i == 1:
            raise RuntimeError("release failed")

    reader = SequentialReader(ITEMS, Recorder().get, release)
    with pytest.raises(RuntimeError, match="release failed"):
        reader.seek(65)
    assert released == [0, 1, 2]
    assert reader.tell() == 65


def test_current_buffer_in_the_storage_reader_pattern() -> None:
    rec = Recorder(chunk_seed=3)
    with rec.reader() as reader:
        for index, item in enumerate(ITEMS):
            reader.seek(item.start)
            buffer = reader.current_buffer()
            assert reader.current_index == index
            assert reader.current_buffer() is buffer
            assert buffer.read() == FILE[item.start : item.end]
            assert rec.fetched == list(range(index + 1))
            assert rec.released == list(range(index))
    assert rec.released == list(range(len(ITEMS)))


def test_current_buffer_releases_before_fetching_the_next_item() -> None:
    """Moving to an adjacent item releases the current one first (a byte-budgeted engine may
    need those bytes to fetch the next item), so a failed fetch leaves the reader on it."""
    rec = Recorder()
    reader = rec.reader()
    reader.seek(20)
    rec.fail = {1}
    with pytest.raises(ConnectionError):
        reader.current_buffer()
    assert rec.released == [0]
    assert reader.current_index == 1
    assert reader.tell() == 20
    rec.fail = set()
    assert reader.current_buffer().read() == FILE[20:30]
    assert reader.current_index == 1


def test_reader_errors_pickle_with_their_context() -> None:
    reader = Recorder().reader()
    reader.seek(45)
    with pytest.raises(SequentialAccessError) as info:
        reader.seek(12)
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is SequentialAccessError
    assert str(clone) == str(info.value)
    assert clone.position == 12  # type: ignore[attr-defined]
    assert clone.current_item == (40, 50)  # type: ignore[attr-defined]


def test_torch_load_through_dcp_reader_views_over_a_sequential_reader() -> None:
    """The path dcp's FileSystemReader takes: a _ReaderView per item over the file stream."""
    torch.manual_seed(1)
    tensors = [
        torch.randn(10, 3),
        torch.arange(7, dtype=torch.int16),
        torch.randn(4).to(torch.bfloat16),
        torch.tensor(True),
    ]
    blobs = [_saved(t) for t in tensors]
    gaps = [5, 0, 17, 0]  # the second and fourth items are adjacent to the one before
    data = b""
    items = []
    for gap, blob in zip(gaps, blobs, strict=True):
        data += b"\x00" * gap
        items.append(Span(len(data), len(data) + len(blob)))
        data += blob
    data += b"tail"
    for seed in range(4):
        rec = Recorder(items, data, chunk_seed=seed)
        with rec.reader() as reader:
            for item, tensor in zip(items, tensors, strict=True):
                view = _create_file_view(reader, item.start, item.end - item.start)  # type: ignore[arg-type]
                loaded = torch.load(cast(IO[bytes], view), weights_only=True)
                assert torch.equal(loaded, tensor)
        assert rec.fetched == [0, 1, 2, 3]
        assert rec.released == [0, 1, 2, 3]


# ------------------------------------------------------------------------ state machines

CHUNK_KINDS = ("memoryview", "bytes", "bytearray", "slice-of-larger")


def _make_chunk(piece: bytes, kind: str) -> Any:
    if kind == "bytes":
        return piece
    if kind == "bytearray":
        return bytearray(piece)
    if kind == "slice-of-larger":
        return memoryview(b"<" + piece + b">")[1:-1]
    return memoryview(piece)


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[Any]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=16)))
    bounds = [0, *cuts, len(data)]
    return [
        _make_chunk(data[a:b], draw(st.sampled_from(CHUNK_KINDS)))
        for a, b in itertools.pairwise(bounds)
    ]


def _destination(kind: str, size: int) -> tuple[Any, Callable[[], bytes]]:
    """A writable buffer of ``size`` bytes pre-filled with 0xAA, and a way to read it back."""
    if kind == "bytearray":
        target = bytearray(b"\xaa" * size)
        return target, lambda: bytes(target)
    if kind == "memoryview":
        backing = bytearray(b"\xaa" * size)
        return memoryview(backing), lambda: bytes(backing)
    if kind == "array":
        arr = array.array("B", b"\xaa" * size)
        return arr, arr.tobytes
    if kind == "multi-dim":  # a 2-D memoryview (casting needs a shape without zeros)
        backing = bytearray(b"\xaa" * size)
        rows = 2 if size % 2 == 0 else 1
        view = memoryview(backing).cast("B", (rows, size // rows)) if size else memoryview(backing)
        return view, lambda: bytes(backing)
    tensor = torch.full((size,), 0xAA, dtype=torch.uint8)
    return _tensor_bytes_view(tensor), lambda: bytes(tensor.tolist())


DESTINATIONS = ("bytearray", "memoryview", "array", "multi-dim", "tensor")
MACHINE_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class ChunkBufferMachine(RuleBasedStateMachine):
    """Random seeks (all whences), reads and readintos, checked against io.BytesIO."""

    @initialize(data=st.data(), body=st.binary(max_size=120), give_length=st.booleans())
    def setup(self, data: st.DataObject, body: bytes, give_length: bool) -> None:
        self.body = body
        self.buf = ChunkBuffer(data.draw(chunkings(body)), len(body) if give_length else None)
        self.model = io.BytesIO(body)

    @rule(offset=st.integers(-140, 280), whence=st.sampled_from([0, 1, 2]))
    def seek(self, offset: int, whence: int) -> None:
        base = {0: 0, 1: self.model.tell(), 2: len(self.body)}[whence]
        if base + offset < 0:  # BytesIO clamps some of these to 0; a file raises
            before = self.buf.tell()
            with pytest.raises(SequentialAccessError):
                self.buf.seek(offset, whence)
            assert self.buf.tell() == before
        else:
            assert self.buf.seek(offset, whence) == self.model.seek(offset, whence)

    @rule(size=st.none() | st.integers(-3, 140))
    def read(self, size: int | None) -> None:
        got = self.buf.read(size)
        assert type(got) is bytes
        assert got == self.model.read(size)

    @rule(size=st.integers(0, 140), kind=st.sampled_from(DESTINATIONS), one=st.booleans())
    def readinto(self, size: int, kind: str, one: bool) -> None:
        target, contents = _destination(kind, size)
        expected = bytearray(b"\xaa" * size)
        count = (self.buf.readinto1 if one else self.buf.readinto)(target)
        assert count == self.model.readinto(expected)
        assert contents() == bytes(expected)

    @rule()
    def readall(self) -> None:
        assert self.buf.readall() == self.model.read()

    @rule(bad=st.sampled_from([1.5, "2", b"x", True]))
    def bad_arguments(self, bad: Any) -> None:
        before = self.buf.tell()
        with pytest.raises(ReaderTypeError):
            self.buf.seek(bad)
        with pytest.raises(ReaderTypeError):
            self.buf.read(bad)
        with pytest.raises(ReaderTypeError):
            self.buf.readinto(b"read-only")
        assert self.buf.tell() == before

    @invariant()
    def same_position_and_length(self) -> None:
        assert self.buf.tell() == self.model.tell()
        assert len(self.buf) == len(self.body)
        assert b"".join(self.buf.chunks) == self.body


TestChunkBufferMachine = ChunkBufferMachine.TestCase
TestChunkBufferMachine.settings = MACHINE_SETTINGS


class SequentialReaderMachine(RuleBasedStateMachine):
    """Random planned items over random bytes; every allowed call is checked against io.BytesIO,
    every forbidden one must raise and change nothing."""

    @initialize(
        data=st.data(),
        layout=st.lists(
            st.tuples(st.sampled_from([0, 0, 1, 5, 13]), st.integers(1, 40)),
            min_size=1,
            max_size=6,
        ),
        tail=st.integers(0, 8),
        seed=st.integers(0, 2**32 - 1),
    )
    def setup(
        self, data: st.DataObject, layout: list[tuple[int, int]], tail: int, seed: int
    ) -> None:
        spans = []
        offset = 0
        for gap, length in layout:
            offset += gap
            spans.append(Span(offset, offset + length))
            offset += length
        self.body = random.Random(seed).randbytes(offset + tail)
        self.spans = spans
        self.item_chunks = [data.draw(chunkings(self.body[s.start : s.end])) for s in spans]
        self.fetched: list[int] = []
        self.released: list[int] = []
        self.read_from: set[int] = set()  # items the model says bytes were taken from
        self.cur = 0
        self.model = io.BytesIO(self.body)
        self.model.seek(spans[0].start)
        self.reader = SequentialReader(spans, self._get, self._release, name="m.distcp")

    def _get(self, i: int) -> ChunkBuffer:
        assert i not in self.fetched, f"get_item({i}) called twice"
        assert i not in self.released, f"get_item({i}) after release_item({i})"
        assert i >= self.cur
        self.fetched.append(i)
        return ChunkBuffer(self.item_chunks[i])

    def _release(self, i: int) -> None:
        assert i not in self.released, f"release_item({i}) called twice"
        self.released.append(i)

    # -- model helpers

    def _item_at(self, position: int) -> int:
        """The item a seek to ``position`` (outside the current item) makes current."""
        candidates = [k for k, s in enumerate(self.spans) if s.start <= position <= s.end]
        return max(candidates)

    def _adjacent(self, k: int) -> bool:
        return k + 1 < len(self.spans) and self.spans[k + 1].start == self.spans[k].end

    def _count(self, size: int) -> int | None:
        """What a ``size``-byte read returns: from the current item, or at its end from the
        next one if it starts there; short at an item a gap or nothing follows; ``None``
        (refused) if it would cross into an adjacent item."""
        position = self.model.tell()
        k = self.cur
        if position == self.spans[k].end and self._adjacent(k):
            k += 1
        if position + size <= self.spans[k].end:
            return size
        return None if self._adjacent(k) else self.spans[k].end - position

    def _consume(self, position: int, count: int) -> None:
        """Bookkeeping for ``count`` bytes read from ``position``."""
        if count == 0:
            return
        last = position + count - 1
        for k, s in enumerate(self.spans):
            if s.start < position + count and position < s.end:
                self.read_from.add(k)
            if s.start <= last < s.end:
                self.cur = k

    def _forbidden(
        self, call: Callable[[], object], error: type[Exception], words: str = ""
    ) -> None:
        before = (self.reader.tell(), self.reader.current_index)
        calls = (len(self.fetched), len(self.released))
        with pytest.raises(error) as info:
            call()
        assert (self.reader.tell(), self.reader.current_index) == before
        assert (len(self.fetched), len(self.released)) == calls
        assert words in str(info.value)
        if error is SequentialAccessError:
            message = str(info.value)
            assert message.startswith(SEQUENTIAL_ACCESS_CONTRACT.format(name="m.distcp"))
            assert message.endswith(FALLBACK_HINT)

    # -- allowed

    @rule(data=st.data(), relative=st.booleans())
    def seek_inside_current(self, data: st.DataObject, relative: bool) -> None:
        span = self.spans[self.cur]
        target = data.draw(st.integers(span.start, span.end))
        if relative:
            assert self.reader.seek(target - self.reader.tell(), io.SEEK_CUR) == target
        else:
            assert self.reader.seek(target) == target
        self.model.seek(target)

    @precondition(lambda self: self.cur + 1 < len(self.spans))
    @rule(data=st.data())
    def seek_forward(self, data: st.DataObject) -> None:
        j = data.draw(st.integers(self.cur + 1, len(self.spans) - 1))
        target = data.draw(st.integers(self.spans[j].start, self.spans[j].end))
        assert self.reader.seek(target) == target
        self.model.seek(target)
        current = self.spans[self.cur]
        if not current.start <= target <= current.end:
            self.cur = self._item_at(target)

    @rule(size=st.integers(0, 90))
    def read(self, size: int) -> None:
        position = self.model.tell()
        count = self._count(size)
        if count is None:
            self._forbidden(lambda: self.reader.read(size), SequentialAccessError, "crosses")
            return
        got = self.reader.read(size)
        assert got == self.model.read(count)
        self._consume(position, count)

    @rule(size=st.integers(0, 90), kind=st.sampled_from(DESTINATIONS))
    def readinto(self, size: int, kind: str) -> None:
        position = self.model.tell()
        count = self._count(size)
        target, contents = _destination(kind, size)
        if count is None:
            self._forbidden(lambda: self.reader.readinto(target), SequentialAccessError, "crosses")
            assert contents() == b"\xaa" * size
            return
        assert self.reader.readinto(target) == count
        assert contents() == self.model.read(count) + b"\xaa" * (size - count)
        self._consume(position, count)

    @rule()
    def current_buffer(self) -> None:
        position = self.model.tell()
        nxt = self.cur + 1
        if (
            position == self.spans[self.cur].end
            and nxt < len(self.spans)
            and self.spans[nxt].start == position
        ):
            self.cur = nxt
        buffer = self.reader.current_buffer()
        span = self.spans[self.cur]
        assert b"".join(buffer.chunks) == self.body[span.start : span.end]
        self.read_from.add(self.cur)

    # -- forbidden

    @precondition(lambda self: self.spans[self.cur].start > 0)
    @rule(data=st.data(), relative=st.booleans())
    def seek_back(self, data: st.DataObject, relative: bool) -> None:
        target = data.draw(st.integers(-3, self.spans[self.cur].start - 1))
        offset = target - self.reader.tell() if relative else target
        whence = io.SEEK_CUR if relative else io.SEEK_SET
        self._forbidden(lambda: self.reader.seek(offset, whence), SequentialAccessError)

    @rule(data=st.data())
    def seek_outside_items(self, data: st.DataObject) -> None:
        last = self.spans[-1].end
        holes = [
            p
            for p in range(self.spans[self.cur].end + 1, last + 4)
            if not any(s.start <= p <= s.end for s in self.spans)
        ]
        if holes:
            target = data.draw(st.sampled_from(holes))
            self._forbidden(lambda: self.reader.seek(target), SequentialAccessError)

    @rule(offset=st.integers(-5, 5))
    def seek_end(self, offset: int) -> None:
        self._forbidden(lambda: self.reader.seek(offset, io.SEEK_END), SequentialAccessError)

    @rule(size=st.sampled_from([None, -1, -9]))
    def whole_file_read(self, size: int | None) -> None:
        self._forbidden(lambda: self.reader.read(size), SequentialAccessError)

    @rule(bad=st.sampled_from([2.0, "2", True, b"2"]))
    def wrong_types(self, bad: Any) -> None:
        self._forbidden(lambda: self.reader.read(bad), ReaderTypeError)
        self._forbidden(lambda: self.reader.seek(bad), ReaderTypeError)
        self._forbidden(lambda: self.reader.readinto(b"read-only"), ReaderTypeError)

    # -- always

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert self.reader.tell() == self.model.tell()
        assert self.reader.current_index == self.cur
        assert self.released == list(range(self.cur))  # every passed item, once, in order
        assert sorted(self.fetched) == sorted(self.read_from)  # never a skipped item

    def teardown(self) -> None:
        if not hasattr(self, "reader"):
            return
        self.reader.close()
        assert self.released == list(range(self.cur + 1))
        self.reader.close()
        assert self.released == list(range(self.cur + 1))


TestSequentialReaderMachine = SequentialReaderMachine.TestCase
TestSequentialReaderMachine.settings = MACHINE_SETTINGS


def test_chunk_buffer_window_is_a_view_of_the_same_bytes() -> None:
    data = bytes(range(256)) * 40
    cuts = [0, 3, 1000, 1001, 4096, 7000, len(data)]
    buffer = ChunkBuffer([bytearray(data[a:b]) for a, b in itertools.pairwise(cuts)])
    for start, end in [(0, len(data)), (2, 1500), (1000, 1001), (4096, 7000), (5, 5)]:
        window = buffer.window(start, end)
        assert len(window) == end - start
        assert window.read() == data[start:end]
        out = bytearray(end - start)
        window.seek(0)
        assert window.readinto(out) == end - start and bytes(out) == data[start:end]
    with pytest.raises(InvalidRangeError):
        buffer.window(10, len(data) + 1)
    with pytest.raises(InvalidRangeError):
        buffer.window(5, 4)
