"""Unit and property tests of the pure range planner (``aiodcp._planner``)."""

from __future__ import annotations

import ast
import gc
import math
import pickle
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiodcp._errors import AiodcpError, ConfigError, InvalidRangeError
from aiodcp._planner import (
    ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S,
    ASSUMED_REQUEST_LATENCY_S,
    DEFAULT_MAX_GAP_SIZE_BYTES,
    DEFAULT_PART_SIZE_BYTES,
    MAX_AUTO_GAP_SIZE_BYTES,
    MIN_AUTO_GAP_SIZE_BYTES,
    FilePlan,
    ItemRange,
    Part,
    RangeGroup,
    auto_gap_size,
    coalesce,
    plan_file,
    request_latency_from_get,
    resolve_max_gap_size,
    split_into_parts,
    validate_gap_setting,
    validate_max_gap_size,
    validate_part_size,
)

R = ItemRange
MiB = 1024 * 1024


def spans(groups: list[RangeGroup]) -> list[list[tuple[int, int]]]:
    return [[(r.start, r.end) for r in g.items] for g in groups]


def part_spans(parts: list[Part] | tuple[Part, ...]) -> list[tuple[int, int, int]]:
    """(start, end, number of items) per part."""
    return [(p.start, p.end, len(p.items)) for p in parts]


@pytest.fixture
def gc_enabled() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        else:
            gc.disable()


# ----------------------------------------------------------------------------- defaults / module


def test_defaults() -> None:
    # The prior of the "auto" gap policy: 25 ms x 85 MB/s (see auto_gap_size's docstring).
    assert DEFAULT_MAX_GAP_SIZE_BYTES == 2_125_000 == auto_gap_size(None)
    assert DEFAULT_PART_SIZE_BYTES == 8 * MiB
    assert MIN_AUTO_GAP_SIZE_BYTES == 256 * 1024
    assert MAX_AUTO_GAP_SIZE_BYTES == 8 * MiB
    assert MIN_AUTO_GAP_SIZE_BYTES < DEFAULT_MAX_GAP_SIZE_BYTES < MAX_AUTO_GAP_SIZE_BYTES


def test_module_imports_only_stdlib_and_errors() -> None:
    import aiodcp._planner as planner

    tree = ast.parse(Path(planner.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    relative: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative.add(node.module or "")
            else:
                imported.add((node.module or "").split(".")[0])
    assert relative == {"_errors", "_gapsize"}  # _gapsize: the gap settings, as pure
    assert imported - {"__future__"} <= set(sys.stdlib_module_names)
    assert not imported & {"asyncio", "botocore", "aiobotocore", "aiohttp", "torch"}
    assert tree.body and isinstance(tree.body[0], ast.Expr)  # the module docstring
    assert "Data flow" in (ast.get_docstring(tree) or "")


# ----------------------------------------------------------------------------- ItemRange


def test_item_range_basics() -> None:
    r = R(3, 10)
    assert (r.start, r.end, r.length) == (3, 10, 7)
    assert R(0, 1).length == 1
    assert r == R(3, 10) and hash(r) == hash(R(3, 10))
    assert len({R(3, 10), R(3, 10), R(10, 12)}) == 2
    assert sorted([R(5, 6), R(0, 9), R(0, 2)]) == [R(0, 2), R(0, 9), R(5, 6)]
    assert repr(r) == "ItemRange(start=3, end=10)"
    with pytest.raises(AttributeError):
        r.start = 4  # type: ignore[misc]


def test_item_range_pickles() -> None:
    r = R(7, 9)
    assert pickle.loads(pickle.dumps(r)) == r


@pytest.mark.parametrize(
    ("start", "end", "fragment"),
    [
        (True, 5, "True"),
        (0, True, "True"),
        (False, 1, "False"),
        (0.0, 5, "0.0"),
        (0, 5.0, "5.0"),
        ("0", 5, "'0'"),
        (None, 5, "None"),
        (-1, 5, "start=-1"),
        (5, 5, "empty"),
        (0, 0, "empty"),
        (10, 4, "reversed"),
    ],
)
def test_item_range_rejects(start: object, end: object, fragment: str) -> None:
    with pytest.raises(InvalidRangeError) as info:
        ItemRange(start, end)  # type: ignore[arg-type]
    exc = info.value
    assert type(exc) is InvalidRangeError
    assert isinstance(exc, ValueError) and isinstance(exc, AiodcpError)
    assert fragment in str(exc)
    assert f"start={start!r}, end={end!r}" in str(exc)  # names the range
    assert exc.ranges == ((start, end),)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- RangeGroup / Part


def test_range_group_properties() -> None:
    g = RangeGroup((R(10, 20), R(25, 30), R(30, 31)))
    assert (g.start, g.end) == (10, 31)
    assert g.item_bytes == 16
    assert g.gap_bytes == 5


@pytest.mark.parametrize(
    "items",
    [(), [R(0, 1)], (R(5, 6), R(0, 1)), (R(0, 5), R(4, 6)), (R(0, 5), R(0, 5)), ((0, 1),)],
)
def test_range_group_rejects(items: object) -> None:
    with pytest.raises(InvalidRangeError) as info:
        RangeGroup(items)  # type: ignore[arg-type]
    assert type(info.value) is InvalidRangeError


def test_part_properties_and_rejects() -> None:
    p = Part(4, 12, (R(4, 12),))
    assert p.length == 8
    for start, end in [(5, 5), (6, 5), (-1, 3), (True, 3), (0, 2.0)]:
        with pytest.raises(InvalidRangeError):
            Part(start, end, ())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (1, 1), (DEFAULT_MAX_GAP_SIZE_BYTES, DEFAULT_MAX_GAP_SIZE_BYTES), (3.0, 3), (-0.0, 0)],
)
def test_validate_max_gap_size_accepts(value: int | float, expected: int) -> None:
    result = validate_max_gap_size(value)
    assert result == expected
    assert type(result) is int


def test_validate_max_gap_size_accepts_inf() -> None:
    assert validate_max_gap_size(math.inf) == math.inf
    assert validate_max_gap_size(float("inf")) == math.inf


@pytest.mark.parametrize(
    "value", [-1, -(2**70), -math.inf, math.nan, 1.5, -2.0, True, False, "1", None, [1], 1j]
)
def test_validate_max_gap_size_rejects(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        validate_max_gap_size(value)
    exc = info.value
    assert type(exc) is ConfigError and isinstance(exc, ValueError)
    message = str(exc)
    assert "max_gap_size" in message and "non-negative" in message and "inf" in message
    assert repr(value) in message
    assert exc.field == "max_gap_size"  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- gap policy


def test_auto_gap_is_latency_times_bandwidth() -> None:
    assert auto_gap_size(0.02) == 1_700_000  # 20 ms x 85 MB/s (the benchmark's S3 shape)
    assert auto_gap_size(0.02, 80_000_000) == 1_600_000
    assert auto_gap_size(0.05, 100_000_000) == 5_000_000
    assert auto_gap_size(ASSUMED_REQUEST_LATENCY_S) == round(
        ASSUMED_REQUEST_LATENCY_S * ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S
    )
    assert type(auto_gap_size(0.0123)) is int


@pytest.mark.parametrize("latency", [None, math.nan])
def test_auto_gap_without_a_measurement_is_the_prior(latency: float | None) -> None:
    assert auto_gap_size(latency) == DEFAULT_MAX_GAP_SIZE_BYTES


@pytest.mark.parametrize(
    ("latency", "expected"),
    [
        (0.0, MIN_AUTO_GAP_SIZE_BYTES),  # a loopback server answers in ~1 ms
        (-1.0, MIN_AUTO_GAP_SIZE_BYTES),
        (0.001, MIN_AUTO_GAP_SIZE_BYTES),
        (0.5, MAX_AUTO_GAP_SIZE_BYTES),  # a cold first request (TLS, credentials...)
        (30.0, MAX_AUTO_GAP_SIZE_BYTES),
        (math.inf, MAX_AUTO_GAP_SIZE_BYTES),
    ],
)
def test_auto_gap_is_clamped(latency: float, expected: int) -> None:
    assert auto_gap_size(latency) == expected


@pytest.mark.parametrize("bandwidth", [0, -1.0, math.inf, math.nan])
def test_auto_gap_rejects_a_bad_bandwidth(bandwidth: float) -> None:
    with pytest.raises(ConfigError, match="bandwidth"):  # a ValueError too
        auto_gap_size(0.02, bandwidth)


@given(
    st.floats(min_value=0, max_value=1e3, allow_nan=False),
    st.floats(min_value=0, max_value=1e3, allow_nan=False),
    st.floats(min_value=1e3, max_value=1e11, allow_nan=False),
)
def test_auto_gap_is_monotone_and_bounded(a: float, b: float, bandwidth: float) -> None:
    low, high = sorted((a, b))
    gap_low, gap_high = auto_gap_size(low, bandwidth), auto_gap_size(high, bandwidth)
    assert gap_low <= gap_high
    for gap in (gap_low, gap_high):
        assert MIN_AUTO_GAP_SIZE_BYTES <= gap <= MAX_AUTO_GAP_SIZE_BYTES


def test_request_latency_from_get_subtracts_the_body() -> None:
    assert request_latency_from_get(0.03, 0) == 0.03
    bandwidth = ASSUMED_CONNECTION_BANDWIDTH_BYTES_PER_S
    assert request_latency_from_get(0.03, bandwidth // 100) == pytest.approx(0.02)
    assert request_latency_from_get(0.001, 10 * MiB) == 0.0  # never negative
    assert request_latency_from_get(0.03, 1_000_000, 1e8) == pytest.approx(0.02)


def test_resolve_max_gap_size() -> None:
    assert resolve_max_gap_size("auto", 0.02) == auto_gap_size(0.02)
    assert resolve_max_gap_size("auto", None) == DEFAULT_MAX_GAP_SIZE_BYTES
    for fixed in (0, 7, 64 * MiB):
        assert resolve_max_gap_size(fixed, 0.02) == fixed
        assert resolve_max_gap_size(fixed, None) == fixed
    assert resolve_max_gap_size(math.inf, 0.5) == math.inf
    assert type(resolve_max_gap_size(3.0, None)) is int
    with pytest.raises(ConfigError, match="auto"):
        resolve_max_gap_size("sometimes", 0.02)  # type: ignore[arg-type]


def test_validate_gap_setting() -> None:
    assert validate_gap_setting("auto") == "auto"
    assert validate_gap_setting(0) == 0
    assert validate_gap_setting(math.inf) == math.inf
    for bad in ("AUTO", "", "2MiB", "0", None, -1, math.nan, 1.5, False, b"auto"):
        with pytest.raises(ConfigError) as info:
            validate_gap_setting(bad)
        message = str(info.value)
        assert '"auto"' in message and "non-negative" in message and repr(bad) in message
        assert info.value.field == "max_gap_size"  # type: ignore[attr-defined]


def test_the_planner_itself_needs_a_number() -> None:
    # "auto" is resolved before planning: coalesce and plan_file never guess.
    with pytest.raises(ConfigError):
        plan_file([R(0, 1)], max_gap_size="auto")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        coalesce([R(0, 1)], "auto")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [1, 7, DEFAULT_PART_SIZE_BYTES, 2**40])
def test_validate_part_size_accepts(value: int) -> None:
    assert validate_part_size(value) == value


@pytest.mark.parametrize("value", [0, -1, True, False, 1.0, 16.5, math.inf, math.nan, "16", None])
def test_validate_part_size_rejects(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        validate_part_size(value)
    exc = info.value
    assert type(exc) is ConfigError and isinstance(exc, ValueError)
    assert "part_size" in str(exc) and "positive" in str(exc) and repr(value) in str(exc)
    assert exc.field == "part_size"  # type: ignore[attr-defined]


def test_entry_points_validate_config_even_without_ranges() -> None:
    with pytest.raises(ConfigError):
        coalesce([], -1)
    with pytest.raises(ConfigError):
        plan_file([], max_gap_size=math.nan)
    with pytest.raises(ConfigError):
        plan_file([], part_size=0)
    with pytest.raises(ConfigError):
        split_into_parts(RangeGroup((R(0, 1),)), True)


# ----------------------------------------------------------------------------- coalesce


def test_coalesce_empty() -> None:
    assert coalesce([]) == []
    assert coalesce(iter(())) == []


def test_coalesce_sorts_and_accepts_any_iterable() -> None:
    ranges = [R(50, 60), R(0, 10), R(20, 30)]
    assert spans(coalesce(iter(ranges), 10)) == [[(0, 10), (20, 30)], [(50, 60)]]
    assert spans(coalesce({r: None for r in ranges}.keys(), 10)) == spans(coalesce(ranges, 10))


def test_coalesce_dedupes_identical_ranges() -> None:
    groups = coalesce([R(0, 10), R(20, 30), R(0, 10), R(20, 30), R(0, 10)], 0)
    assert spans(groups) == [[(0, 10)], [(20, 30)]]


def test_coalesce_adjacent_ranges_merge_with_zero_gap() -> None:
    assert spans(coalesce([R(10, 20), R(0, 10), R(20, 21)], 0)) == [[(0, 10), (10, 20), (20, 21)]]
    assert spans(coalesce([R(0, 10), R(11, 20)], 0)) == [[(0, 10)], [(11, 20)]]


@pytest.mark.parametrize("max_gap", [0, 1, 7, 1000])
def test_coalesce_gap_boundary_is_inclusive(max_gap: int) -> None:
    at_limit = [R(0, 10), R(10 + max_gap, 20 + max_gap)]
    assert len(coalesce(at_limit, max_gap)) == 1
    over_limit = [R(0, 10), R(11 + max_gap, 20 + max_gap)]
    assert len(coalesce(over_limit, max_gap)) == 2


def test_coalesce_default_gap_boundary() -> None:
    gap = DEFAULT_MAX_GAP_SIZE_BYTES
    assert len(coalesce([R(0, 1), R(1 + gap, 2 + gap)])) == 1
    assert len(coalesce([R(0, 1), R(2 + gap, 3 + gap)])) == 2


def test_coalesce_inf_makes_one_group() -> None:
    ranges = [R(0, 1), R(10**15, 10**15 + 1), R(5, 6)]
    groups = coalesce(ranges, math.inf)
    assert spans(groups) == [[(0, 1), (5, 6), (10**15, 10**15 + 1)]]


def test_coalesce_integral_float_gap() -> None:
    assert len(coalesce([R(0, 1), R(3, 4)], 2.0)) == 1
    assert len(coalesce([R(0, 1), R(3, 4)], 1.0)) == 2


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (R(0, 10), R(5, 20)),  # partial overlap
        (R(0, 20), R(5, 10)),  # containment
        (R(0, 10), R(0, 20)),  # same start
        (R(5, 20), R(0, 20)),  # same end
        (R(0, 10), R(9, 10)),  # one byte
    ],
)
def test_coalesce_rejects_overlaps(first: ItemRange, second: ItemRange) -> None:
    for order in ([first, second], [second, first], [R(100, 110), second, first, first]):
        with pytest.raises(InvalidRangeError) as info:
            coalesce(order, 0)
        exc = info.value
        assert type(exc) is InvalidRangeError and isinstance(exc, ValueError)
        message = str(exc)
        assert repr(first) in message and repr(second) in message
        assert "overlap" in message and "cannot be served" in message
        assert set(exc.ranges) == {first, second}  # type: ignore[attr-defined]


def test_overlap_error_example_message_and_pickle() -> None:
    with pytest.raises(InvalidRangeError) as info:
        plan_file([R(5, 20), R(0, 10)])
    message = str(info.value)
    assert "ItemRange(start=0, end=10) overlaps ItemRange(start=5, end=20)" in message
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is InvalidRangeError
    assert str(clone) == message
    assert clone.ranges == (R(0, 10), R(5, 20))  # type: ignore[attr-defined]


def test_coalesce_rejects_non_item_ranges() -> None:
    with pytest.raises(InvalidRangeError) as info:
        coalesce([R(0, 1), (2, 3)])  # type: ignore[list-item]
    assert "(2, 3)" in str(info.value)


# ----------------------------------------------------------------------------- split_into_parts


def test_split_fills_parts_and_cuts_inside_items() -> None:
    group = RangeGroup((R(0, 4), R(4, 8), R(10, 14)))
    # parts run to part_size wherever items run on; the cut falls inside an item
    assert part_spans(split_into_parts(group, 11)) == [(0, 11, 3), (11, 14, 1)]
    assert part_spans(split_into_parts(group, 14)) == [(0, 14, 3)]
    assert part_spans(split_into_parts(group, 13)) == [(0, 13, 3), (13, 14, 1)]
    assert part_spans(split_into_parts(group, 4)) == [(0, 4, 1), (4, 8, 1), (10, 14, 1)]
    # a part ends early where the next item starts beyond its reach (a gap is never cut)
    assert part_spans(split_into_parts(group, 9)) == [(0, 8, 2), (10, 14, 1)]
    assert part_spans(split_into_parts(group, 10)) == [(0, 8, 2), (10, 14, 1)]


def test_split_equal_items_take_file_size_over_part_size_gets() -> None:
    fives = RangeGroup(tuple(R(5 * i, 5 * i + 5) for i in range(8)))
    parts = split_into_parts(fives, 8)
    # a part may finish one item and begin others: 40 bytes in 5 GETs of 8, not 8 GETs of 5
    assert part_spans(parts) == [(0, 8, 2), (8, 16, 3), (16, 24, 2), (24, 32, 3), (32, 40, 2)]


def test_split_part_items_are_the_items_it_overlaps() -> None:
    a, b, c = R(0, 4), R(4, 8), R(10, 14)
    parts = split_into_parts(RangeGroup((a, b, c)), 12)
    assert [p.items for p in parts] == [(a, b, c), (c,)]


def test_split_item_of_exactly_part_size_is_one_part() -> None:
    item = R(100, 110)
    assert split_into_parts(RangeGroup((item,)), 10) == [Part(100, 110, (item,))]


def test_split_big_item_into_part_size_slices() -> None:
    big = R(0, 25)
    parts = split_into_parts(RangeGroup((big,)), 10)
    assert parts == [Part(0, 10, (big,)), Part(10, 20, (big,)), Part(20, 25, (big,))]
    exact = R(7, 37)
    assert [p.length for p in split_into_parts(RangeGroup((exact,)), 10)] == [10, 10, 10]


def test_split_big_item_between_small_items() -> None:
    small1, big, small2 = R(0, 3), R(5, 30), R(32, 35)
    parts = split_into_parts(RangeGroup((small1, big, small2)), 10)
    assert parts == [
        Part(0, 10, (small1, big)),
        Part(10, 20, (big,)),
        Part(20, 30, (big,)),
        Part(32, 35, (small2,)),  # the gap [30, 32) falls on the cut: never fetched
    ]
    parts = split_into_parts(RangeGroup((small1, big, small2)), 11)
    assert part_spans(parts) == [(0, 11, 2), (11, 22, 1), (22, 33, 2), (33, 35, 1)]


def test_split_part_size_one() -> None:
    parts = split_into_parts(RangeGroup((R(0, 3), R(5, 6))), 1)
    assert part_spans(parts) == [(0, 1, 1), (1, 2, 1), (2, 3, 1), (5, 6, 1)]


def test_gap_larger_than_part_size_is_never_fetched() -> None:
    plan = plan_file([R(0, 2), R(50, 52)], max_gap_size=math.inf, part_size=10)
    assert len(plan.groups) == 1
    assert part_spans(plan.parts) == [(0, 2, 1), (50, 52, 1)]
    assert (plan.requested_bytes, plan.gap_bytes) == (4, 0)


def test_split_rejects_non_group() -> None:
    with pytest.raises(InvalidRangeError):
        split_into_parts((R(0, 1),))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- plan_file


def test_plan_file_example_accounting() -> None:
    plan = plan_file([R(100, 110), R(20, 30), R(0, 10), R(20, 30)], max_gap_size=10, part_size=64)
    assert plan.items == (R(0, 10), R(20, 30), R(100, 110))
    assert spans(list(plan.groups)) == [[(0, 10), (20, 30)], [(100, 110)]]
    assert part_spans(plan.parts) == [(0, 30, 2), (100, 110, 1)]
    assert (plan.item_bytes, plan.requested_bytes, plan.gap_bytes) == (30, 40, 10)
    assert (plan.groups[0].item_bytes, plan.groups[0].gap_bytes) == (20, 10)


def test_plan_file_empty() -> None:
    plan = plan_file([])
    assert plan == FilePlan(items=(), groups=(), parts=())
    assert (plan.item_bytes, plan.requested_bytes, plan.gap_bytes) == (0, 0, 0)


def test_plan_file_defaults() -> None:
    plan = plan_file([R(0, 40 * MiB), R(40 * MiB + 5, 40 * MiB + 10)])
    assert len(plan.groups) == 1
    assert [p.length for p in plan.parts] == [8 * MiB] * 5 + [5]
    assert max(p.length for p in plan.parts) == DEFAULT_PART_SIZE_BYTES


def test_plan_file_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        plan_file([R(0, 1)], 0, 10)  # type: ignore[call-arg]


@pytest.mark.usefixtures("gc_enabled")
def test_plan_file_restores_gc_state() -> None:
    plan_file([R(0, 1)])
    assert gc.isenabled()
    with pytest.raises(InvalidRangeError):
        plan_file([R(0, 2), R(1, 3)])
    assert gc.isenabled()
    gc.disable()
    plan_file([R(0, 1)])
    coalesce([R(0, 1)])
    assert not gc.isenabled()
    gc.enable()


def _many_ranges(n: int, seed: int) -> list[ItemRange]:
    rng = random.Random(seed)
    ranges: list[ItemRange] = []
    offset = 0
    for _ in range(n):
        offset += rng.randint(0, 4096)
        length = rng.randint(1, 300_000)
        ranges.append(R(offset, offset + length))
        offset += length
    ranges += rng.sample(ranges, n // 10)
    rng.shuffle(ranges)
    return ranges


@pytest.mark.usefixtures("gc_enabled")
@pytest.mark.parametrize(
    ("max_gap", "part_size"), [(0, MiB), (math.inf, 16 * MiB), (4096, 512 * 1024)]
)
def test_plan_file_scales_to_100k_ranges(max_gap: int | float, part_size: int) -> None:
    ranges = _many_ranges(100_000, seed=part_size)
    # CPU time of this thread, not wall time: a busy machine makes the wait for a CPU longer,
    # not the work. A guard against a blow-up (quadratic would take hours), not a goal.
    started = time.thread_time()
    plan = plan_file(ranges, max_gap_size=max_gap, part_size=part_size)
    cpu = time.thread_time() - started
    assert len(plan.items) == 100_000
    assert plan.item_bytes == sum(r.length for r in set(ranges))
    assert cpu < 10.0, f"planning 100k ranges took {cpu:.2f} s of CPU"


# ----------------------------------------------------------------------------- properties

gaps = st.one_of(st.just(0), st.integers(0, 100))
max_gaps = st.one_of(st.just(0), st.just(math.inf), st.integers(0, 120))
part_sizes = st.one_of(st.just(1), st.integers(1, 150))


@st.composite
def layouts(draw: st.DrawFn) -> list[ItemRange]:
    """Sorted, unique, non-overlapping ranges (adjacent ones included)."""
    specs = draw(st.lists(st.tuples(gaps, st.integers(1, 100)), max_size=25))
    offset = draw(st.integers(0, 50))
    ranges: list[ItemRange] = []
    for gap, length in specs:
        offset += gap
        ranges.append(R(offset, offset + length))
        offset += length
    return ranges


@st.composite
def requests(draw: st.DrawFn) -> tuple[list[ItemRange], list[ItemRange]]:
    """(the unique sorted layout, the request: shuffled, with duplicates)."""
    unique = draw(layouts())
    duplicates = draw(st.lists(st.sampled_from(unique), max_size=10)) if unique else []
    return unique, draw(st.permutations(unique + duplicates))


def gap_before(items: tuple[ItemRange, ...], index: int) -> int:
    return items[index].start - items[index - 1].end


def check_groups(unique: list[ItemRange], groups: list[RangeGroup], max_gap: int | float) -> None:
    seen = Counter(item for group in groups for item in group.items)
    assert set(seen) == set(unique)
    assert all(count == 1 for count in seen.values())
    flat = [item for group in groups for item in group.items]
    assert flat == unique  # sorted, in order
    for group in groups:
        assert group.items
        for i in range(1, len(group.items)):
            assert 0 <= gap_before(group.items, i) <= max_gap
        assert group.gap_bytes == (group.end - group.start) - group.item_bytes >= 0
    for before, after in pairwise(groups):
        assert before.end < after.start
        assert after.start - before.end > max_gap


def check_parts(group: RangeGroup, parts: list[Part], part_size: int) -> None:
    items = group.items
    assert parts
    for part in parts:
        assert 0 < part.length <= part_size
        assert group.start <= part.start < part.end <= group.end
        # never starts or ends inside a gap
        assert any(i.start <= part.start < i.end for i in items)
        assert any(i.start < part.end <= i.end for i in items)
        # its items are exactly the items it overlaps
        assert list(part.items) == [i for i in items if i.start < part.end and part.start < i.end]
    for before, after in pairwise(parts):
        assert before.end <= after.start  # sorted, disjoint
    for item in items:  # every item byte in exactly one part (parts are disjoint)
        covered = sum(
            min(item.end, p.end) - max(item.start, p.start)
            for p in parts
            if p.start < item.end and item.start < p.end
        )
        assert covered == item.length
    for index, part in enumerate(parts):
        head = part.items[0]
        reach = part.start + part_size
        later = [i for i in items if i.start >= part.end]
        if part.start > head.start:  # it carries on with an item the previous part began
            assert index > 0 and parts[index - 1].end == part.start
        if not any(i.end == part.end for i in items):
            assert part.length == part_size  # a cut inside an item comes only at full size
        elif part.length < part_size and later:
            # it ended early only because the next item was out of reach
            assert later[0].start >= reach


@given(requests(), max_gaps)
def test_coalesce_properties(request: tuple[list[ItemRange], list[ItemRange]], gap: float) -> None:
    unique, ranges = request
    groups = coalesce(ranges, gap)
    check_groups(unique, groups, gap)
    if gap == math.inf:
        assert len(groups) == (1 if unique else 0)


@given(layouts(), part_sizes)
def test_split_properties(layout: list[ItemRange], part_size: int) -> None:
    if not layout:
        return
    group = RangeGroup(tuple(layout))
    parts = split_into_parts(group, part_size)
    check_parts(group, parts, part_size)
    fetched_gap = sum(p.length for p in parts) - group.item_bytes
    assert 0 <= fetched_gap <= group.gap_bytes
    if group.gap_bytes == 0:  # items back to back: as few GETs as the bytes allow
        assert len(parts) == -(-(group.end - group.start) // part_size)


@given(requests(), max_gaps, part_sizes)
def test_plan_file_properties(
    request: tuple[list[ItemRange], list[ItemRange]], gap: float, part_size: int
) -> None:
    unique, ranges = request
    plan = plan_file(ranges, max_gap_size=gap, part_size=part_size)
    assert plan.items == tuple(unique)
    assert list(plan.groups) == coalesce(ranges, gap)
    check_groups(unique, list(plan.groups), gap)
    expected_parts: list[Part] = []
    for group in plan.groups:
        group_parts = split_into_parts(group, part_size)
        check_parts(group, group_parts, part_size)
        expected_parts += group_parts
    assert list(plan.parts) == expected_parts
    # byte accounting
    assert plan.item_bytes == sum(r.length for r in unique)
    assert plan.requested_bytes == sum(p.length for p in plan.parts)
    assert plan.gap_bytes == plan.requested_bytes - plan.item_bytes
    assert 0 <= plan.gap_bytes <= sum(g.gap_bytes for g in plan.groups)
    # the gap bytes fetched are exactly those of the gaps lying inside one part
    fetched_gaps = sum(
        gap_before(g.items, i)
        for g in plan.groups
        for i in range(1, len(g.items))
        if any(p.start < g.items[i - 1].end and g.items[i].start < p.end for p in plan.parts)
    )
    assert plan.gap_bytes == fetched_gaps


@given(
    st.lists(
        st.builds(
            lambda start, length: R(start, start + length), st.integers(0, 60), st.integers(1, 20)
        ),
        max_size=8,
    ),
    max_gaps,
)
def test_overlap_detection_matches_brute_force(ranges: list[ItemRange], gap: float) -> None:
    overlapping = {
        (a, b) for a in ranges for b in ranges if a != b and a.start < b.end and b.start < a.end
    }
    if not overlapping:
        assert [i for g in coalesce(ranges, gap) for i in g.items] == sorted(set(ranges))
        return
    with pytest.raises(InvalidRangeError) as info:
        coalesce(ranges, gap)
    first, second = info.value.ranges  # type: ignore[attr-defined]
    assert (first, second) in overlapping
    assert repr(first) in str(info.value) and repr(second) in str(info.value)


def test_unbuffered_items_take_longer_parts() -> None:
    """Parts that start inside an item received into its destination span the larger size;
    the others keep ``part_size``, and the items (so their indexes) do not change."""
    small = [ItemRange(i * 100, i * 100 + 100) for i in range(4)]  # 0..400
    big = ItemRange(400, 2_400)
    tail = [ItemRange(2_400 + i * 100, 2_500 + i * 100) for i in range(3)]  # 2400..2700
    ranges = [*small, big, *tail]
    plain = plan_file(ranges, max_gap_size=0, part_size=300)
    mixed = plan_file(
        ranges, max_gap_size=0, part_size=300, unbuffered={big}, unbuffered_part_size=1_000
    )
    assert mixed.items == plain.items
    assert [(p.start, p.end) for p in mixed.parts] == [
        (0, 300),
        (300, 600),  # starts in a buffered item: 300 bytes, though it goes on into big
        (600, 1_600),  # starts inside big: 1,000
        (1_600, 2_600),  # still inside big: runs on into the buffered items after it
        (2_600, 2_700),
    ]
    assert all(p.end - p.start <= 300 for p in plain.parts)
    assert sum(p.end - p.start for p in mixed.parts) == 2_700


def test_buffered_part_size_fits_a_get_per_connection_in_the_budget() -> None:
    from aiodcp import ReaderConfig

    assert ReaderConfig().part_size == 8 * MiB
    assert ReaderConfig().buffered_part_size == 2 * MiB  # 64 MiB over 32 connections
    assert ReaderConfig(memory_budget=512 * MiB).buffered_part_size == 8 * MiB  # part_size caps
    assert ReaderConfig(memory_budget=MiB).buffered_part_size == MiB  # not below 1 MiB...
    assert ReaderConfig(memory_budget=MiB, part_size=4096).buffered_part_size == 4096  # ...unless
