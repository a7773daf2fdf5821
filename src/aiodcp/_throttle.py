"""Adaptive request rate: how fast a load may start GETs on a store that answers ``SlowDown``.

Data flow: the engine awaits ``AdaptiveRate.acquire()`` before each GET attempt, then reports
the outcome: ``succeeded()`` or ``throttled(sent_at)`` (a 503 ``SlowDown`` or another
throttling reply). Until the first throttling reply there is no limit and ``acquire`` returns
at once (no cost on stores that never throttle). Then:

- **decrease**: the limit becomes half the rate at which requests were started over the last
  second (or half the limit, if lower). One cut per wave: replies to requests sent before the
  last cut do not cut again, so 32 requests refused together halve the rate once, not 32 times;
- **increase**: each success raises the limit along ``cut_rate * (1 + GROWTH * seconds since
  the cut)`` (the rate doubles back in 1 / GROWTH seconds), and once the limit is four times
  the rate requests are actually started at, it no longer limits anything and is dropped;
- **pacing**: a token bucket at the limit, holding at most one token, so starts are spread
  evenly instead of in bursts.

This is the shape of botocore's ``adaptive`` retry mode (a client-side token bucket whose rate
is cut on throttling and grows back) and of AWS's guidance for S3 prefixes (back off, then ramp
up gradually), applied to a whole load rather than to each request alone. One instance per
store, shared by the loads on it; event-loop only.
"""

from __future__ import annotations

import asyncio
import collections
import time

__all__ = ["AdaptiveRate"]

GROWTH = 0.5
"""Per second after a cut, the limit grows by this fraction of the rate it was cut to."""
MIN_RATE = 1.0
"""Requests per second: the limit never goes below this."""
_WINDOW_S = 1.0
"""Seconds of request starts the measured rate is taken over."""


class AdaptiveRate:
    """Requests per second a store is sent; see the module docstring."""

    __slots__ = ("_cut_at", "_cut_rate", "_last", "_starts", "_tokens", "limit", "lowest")

    def __init__(self) -> None:
        self.limit: float | None = None
        """Requests per second currently allowed; None while unlimited."""
        self.lowest: float | None = None
        """The lowest limit ever applied (None: never throttled)."""
        self._cut_at = float("-inf")
        self._cut_rate = 0.0
        self._tokens = 1.0
        self._last = time.monotonic()
        self._starts: collections.deque[float] = collections.deque()

    async def acquire(self) -> float:
        """Wait until a request may start; returns the time it starts (``time.monotonic``)."""
        while True:
            now = time.monotonic()
            limit = self.limit
            if limit is None:
                break
            self._tokens = min(1.0, self._tokens + (now - self._last) * limit)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                break
            await asyncio.sleep((1.0 - self._tokens) / limit)
        self._starts.append(now)
        return now

    def rate(self, now: float) -> float:
        """Requests started per second over the last ``_WINDOW_S``."""
        starts = self._starts
        while starts and starts[0] < now - _WINDOW_S:
            starts.popleft()
        return len(starts) / _WINDOW_S

    def throttled(self, sent_at: float) -> None:
        """A request started at ``sent_at`` was refused for its rate."""
        if sent_at < self._cut_at:
            return  # sent before the last cut: that cut already answered this wave
        now = time.monotonic()
        measured = self.rate(now)
        base = measured if self.limit is None else min(self.limit, measured)
        self.limit = max(MIN_RATE, base / 2)
        self._cut_rate = self.limit
        self._cut_at = now
        self._tokens = 0.0
        self._last = now
        if self.lowest is None or self.limit < self.lowest:
            self.lowest = self.limit

    def succeeded(self) -> None:
        """A request went through: let the rate grow back."""
        if self.limit is None:
            return
        now = time.monotonic()
        self.limit = max(self.limit, self._cut_rate * (1.0 + GROWTH * (now - self._cut_at)))
        if self.limit > 4 * max(self.rate(now), MIN_RATE):
            self.limit = None  # no longer the bottleneck
