"""The byte budget a load's fetch engine (``_engine``) and a save's upload engine (``_upload``)
share: ``memory_budget``, the bytes that may be buffered at once.

A module of its own so that a save does not import the fetch engine (and its load-only imports:
the range planner, sinks, checksum checks) for it: every saver process pays for each module it
imports (benchmarks/README.md, "Saves").
"""

from __future__ import annotations

import asyncio

__all__ = ["ByteBudget"]


class ByteBudget:
    """Bytes that may be buffered at once. Acquired on the loop, released from any thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._waiter: asyncio.Future[None] | None = None

    async def acquire(self, n: int) -> None:
        """Reserve ``n`` bytes once they fit, or once nothing is held (an item larger than the
        whole budget is served alone)."""
        await self.acquire_beside(n, 0)

    async def acquire_beside(self, n: int, carried: int) -> bool:
        """Reserve ``n`` bytes once they fit and return True; or return False, reserving
        nothing, once no more than ``carried`` bytes are held.

        ``carried``: the bytes of an item the caller's part finishes. The consumer cannot
        release them before that part is fetched, so waiting for them would deadlock.
        """
        while n and self.used + n > self.limit:
            if self.used <= carried:
                if carried:
                    return False
                break  # nothing held: serve it alone
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self.force(n)
        return True

    def force(self, n: int) -> None:
        """Reserve ``n`` bytes now, whatever is held (the caller knows waiting would deadlock)."""
        self.used += n
        if self.used > self.peak:
            self.peak = self.used

    def release(self, n: int) -> None:
        self.used -= n
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
