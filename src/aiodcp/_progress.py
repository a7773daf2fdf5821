"""Progress bars (tqdm, notebook-aware) fed from a load's statistics recorder.

A small coroutine polls the ``StatsRecorder`` of a load ten times a second and moves a
``tqdm.auto`` bar (bytes, rate, ETA); nothing is added to the download's hot path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from ._stats import StatsRecorder

__all__ = ["track_progress", "with_progress"]

T = TypeVar("T")

_INTERVAL_S = 0.1


def _make_bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=True)


async def track_progress(recorder: StatsRecorder, total: int, desc: str) -> None:
    """Show a bar of ``recorder.bytes_received`` against ``total`` until cancelled."""
    bar = _make_bar(total, desc)
    shown = 0
    try:
        while True:
            done = min(recorder.bytes_received, total)
            if done > shown:
                bar.update(done - shown)
                shown = done
            await asyncio.sleep(_INTERVAL_S)
    finally:
        done = min(recorder.bytes_received, total)
        if done > shown:
            bar.update(done - shown)
        bar.close()


async def with_progress(work: Awaitable[T], recorder: StatsRecorder, total: int, desc: str) -> T:
    """``await work`` with a bar of ``recorder``'s bytes against ``total`` (none if 0)."""
    if not total:
        return await work
    bar = asyncio.create_task(track_progress(recorder, total, desc))
    try:
        return await work
    finally:
        bar.cancel()
        await asyncio.gather(bar, return_exceptions=True)
