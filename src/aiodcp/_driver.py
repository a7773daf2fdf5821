"""Where the async engine runs, seen from the synchronous code that torch calls.

``dcp.load`` calls the storage reader synchronously. The reader hands coroutines to a *driver*,
which runs them on an event loop that is not the calling thread's, and blocks for the result:

- ``PrivateLoopDriver``: a private loop on a daemon thread, created lazily and rebuilt after
  ``os.fork`` (a forked child gets a loop and connections of its own; the parent's are never
  touched). Used by plain ``dcp.load(..., storage_reader=S3StorageReader(...))``, including from
  a notebook cell whose own loop is running, by ``await load_checkpoint(...)`` (which only
  awaits it from the caller's loop, see ``_api``) and by prefetch handles.

- ``ScopedDriver`` (``driver.scope()``): one load's view of another driver, the same loop and
  store (connections), but its own set of submitted coroutines: its ``cancel_all()`` cancels
  that load's requests only. Every load session runs through one (``dcp._session``), so
  cancelling one load never touches another's work, nor a prefetch's download.

Each private loop owns one ``S3Store`` opened on it (its connections, and its aiobotocore client
when it needs one, belong to that loop).
Every coroutine submitted is tracked, so ``cancel_all()`` stops all work of a driver at once;
cancelling the future ``submit`` returned cancels that coroutine alone.

Why not anyio's ``start_blocking_portal`` (the same shape: a loop on a daemon thread, calls from
that thread refused, each call cancellable alone). Measured on the 2-core dev machine, anyio 4.16:

- it does not survive ``os.fork``: a portal started in the parent never answers a call in the
  child (no loop thread there), so the pid check, rebuild and pinning below would all stay;
- a call costs twice as much: a no-op coroutine's round trip from a sync thread took a median
  44-78 us through ``PrivateLoopDriver.run``, 90-149 us through ``BlockingPortal.call`` (3 runs
  of 7 x 1,000 in one process; a portal hops to the loop once to spawn the call and again for
  its result). A load makes a few calls, so this alone decides nothing;
- anyio is not one of our dependencies (aiobotocore does not bring it): it would add a package
  and 12-19 ms of import to replace the ~20 lines that start the thread.

Nor anyio's cancel scopes for cancelling one load: a load's work runs on the private loop and in
a decode thread, not in the caller's task, so a scope in the caller's task could not reach it;
a ``ScopedDriver`` per load (its own coroutines) does, from any thread.

``await load_checkpoint(...)`` needs asyncio: under trio it raises an ``AiodcpError`` saying so,
before it starts anything. From trio, run ``dcp.load`` with an ``S3StorageReader`` in
``trio.to_thread.run_sync`` (tried: it loads). A backend-neutral coroutine would need anyio as a
dependency; not done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ._config import ReaderConfig
from ._errors import AiodcpError, LoadCancelledError
from ._store import S3Store, quiet_limit_s

__all__ = ["Driver", "PrivateLoopDriver", "ScopedDriver"]

T = TypeVar("T")

_WAKE_S = 1.0
"""A thread waiting for work on the loop checks this often that the loop still runs."""

_START_TIMEOUT_S = 60.0

StoreCall = Callable[[S3Store], Awaitable[T]]

# What a forked child inherited from its parent's private loops (loop, thread, store), kept
# reachable so it is never finalised in the child: aiohttp closes its transports in ``__del__``,
# and closing one unregisters its socket from the epoll instance the child shares with the
# parent, so the parent's loop would stop seeing replies on its pooled connections.
_INHERITED_FROM_PARENT: list[object] = []
_FORK_LOCKS: weakref.WeakKeyDictionary[object, tuple[str, ...]] = weakref.WeakKeyDictionary()


def renew_locks_after_fork(owner: object, *names: str) -> None:
    """Give ``owner`` new locks in the attributes ``names`` in a forked child. Another thread of
    the parent may have held one when it forked; in the child that thread does not exist, so
    the lock would never be released. (Drivers and readers both register here: one handler.)"""
    _FORK_LOCKS[owner] = names


def _after_fork_in_child() -> None:
    for owner, names in list(_FORK_LOCKS.items()):
        for name in names:
            setattr(owner, name, threading.Lock())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Driver:
    """Runs ``fn(store)`` coroutines on the driver's loop from another thread."""

    def __init__(self) -> None:
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._pending_lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        raise NotImplementedError

    async def _get_store(self) -> S3Store:
        raise NotImplementedError

    def submit(self, fn: StoreCall[T]) -> concurrent.futures.Future[T]:
        """Schedule ``fn(store)`` on the loop; returns a thread-safe future."""
        loop = self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError(
                "aiodcp: a blocking call was made on the event loop that runs the download; "
                "use `await aiodcp.load_checkpoint(...)` from async code, or call dcp.load "
                "from a worker thread"
            )

        async def call() -> T:
            return await fn(await self._get_store())

        future = asyncio.run_coroutine_threadsafe(call(), loop)
        with self._pending_lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._pending_lock:
            self._pending.discard(future)

    def run(self, fn: StoreCall[T], what: str = "a request") -> T:
        """Run ``fn(store)`` on the loop and wait for its result (re-raising its exception);
        ``what`` names the work in the error raised if the loop stops running (``wait``)."""
        future = self.submit(fn)
        try:
            self.wait(future, what)
            return future.result()
        except BaseException:
            future.cancel()
            raise

    @property
    def quiet_limit_s(self) -> float:
        raise NotImplementedError

    def wait(self, future: concurrent.futures.Future[Any], what: str) -> None:
        """Block until ``future`` (work on this driver's loop) is done, or raise an
        ``AiodcpError`` naming ``what`` if the loop does not run for ``quiet_limit_s``.

        The work itself is bounded by the store's timeouts and attempts, but only while the
        loop runs: a loop blocked for good (an ``on_request`` hook that never returns) would
        leave this thread waiting forever. So while it waits it posts a no-op to the loop and
        checks that the loop ran it."""
        if future.done():
            return
        loop = self.loop
        limit = self.quiet_limit_s
        ran = threading.Event()
        posted_at: float | None = None
        while True:
            concurrent.futures.wait([future], timeout=min(_WAKE_S, limit))
            if future.done():
                return
            now = time.monotonic()
            if posted_at is not None and ran.is_set():
                posted_at = None
            if posted_at is None:
                ran.clear()
                posted_at = now
                try:
                    loop.call_soon_threadsafe(ran.set)
                except RuntimeError:  # the loop was closed: the future never completes
                    raise AiodcpError(
                        f"aiodcp: the I/O loop was closed while waiting for {what}"
                    ) from None
            elif now - posted_at >= limit:
                raise AiodcpError(
                    f"aiodcp: waited {now - posted_at:.0f} s for {what} while aiodcp's I/O "
                    "loop did not run at all: is an on_request hook blocking it (it runs on "
                    "that loop and must return quickly)? Otherwise this is a bug in aiodcp: "
                    "please report this message"
                )

    def cancel_all(self) -> None:
        """Cancel every coroutine this driver is running (thread-safe, returns at once)."""
        with self._pending_lock:
            pending = list(self._pending)
        for future in pending:
            future.cancel()

    def close(self) -> None:
        raise NotImplementedError

    def scope(self) -> ScopedDriver:
        """A view of this driver with a set of submitted coroutines of its own."""
        return ScopedDriver(self)


class ScopedDriver(Driver):
    """One load's view of another driver: the same loop and store (connections), but its own
    set of submitted coroutines, so that its ``cancel_all`` (the load's cancellation) cancels
    its own requests only, never another load's or a prefetch's download.

    Its coroutines are tasks of the parent's loop, so closing the parent (which cancels every
    task of that loop before closing it) stops them too."""

    def __init__(self, parent: Driver) -> None:
        super().__init__()
        self._parent = parent
        self.cancelled = False
        renew_locks_after_fork(self, "_pending_lock")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._parent.loop

    def submit(self, fn: StoreCall[T]) -> concurrent.futures.Future[T]:
        """As ``Driver.submit``; once the scope is cancelled, raises ``LoadCancelledError``
        (work that starts after the cancellation would otherwise escape it)."""
        if self.cancelled:
            raise LoadCancelledError("aiodcp: this load was cancelled")
        future = super().submit(fn)
        if self.cancelled:  # cancelled while it was being submitted
            future.cancel()
        return future

    def cancel(self) -> None:
        """Cancel every coroutine of this scope and refuse new ones (thread-safe)."""
        self.cancelled = True
        self.cancel_all()

    async def _get_store(self) -> S3Store:
        return await self._parent._get_store()

    @property
    def quiet_limit_s(self) -> float:
        return self._parent.quiet_limit_s

    def close(self) -> None:
        """Cancel this scope's coroutines; the loop and connections are the parent's."""
        self.cancel_all()


class PrivateLoopDriver(Driver):
    """A private event loop on a daemon thread, started on first use, rebuilt after fork."""

    def __init__(self, config: ReaderConfig) -> None:
        super().__init__()
        self._config = config
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._store: S3Store | None = None
        renew_locks_after_fork(self, "_lock", "_pending_lock")

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's loop, thread and store without touching them."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            if self._loop is not None:
                _INHERITED_FROM_PARENT.append((self._loop, self._thread, self._store))
            self._loop = self._thread = self._store = None
            self._pending = set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            # A forked child: the parent's loop thread does not exist here, and its
            # connections belong to the parent. Start afresh, touching none of it.
            self._forget_parent()
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def main() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                thread = threading.Thread(target=main, name="aiodcp-io", daemon=True)
                thread.start()
                if not started.wait(_START_TIMEOUT_S):
                    raise AiodcpError(
                        f"aiodcp: its I/O thread did not start within {_START_TIMEOUT_S:.0f} s "
                        "(is the process out of threads or memory?)"
                    )
                self._loop, self._thread = loop, thread
            return self._loop

    @property
    def quiet_limit_s(self) -> float:
        return quiet_limit_s(self._config)

    async def _get_store(self) -> S3Store:
        if self._store is None:
            store = S3Store(self._config)
            await store.open()
            self._store = store
        return self._store

    def close(self) -> None:
        """Close the store's connections, stop the loop and join its thread."""
        with self._lock:
            self._forget_parent()
            loop, thread, store = self._loop, self._thread, self._store
            self._loop = self._thread = self._store = None
        if loop is None or thread is None:
            return
        self.cancel_all()
        if not loop.is_closed():

            async def shutdown() -> None:
                # Let every task on the loop finish its cancellation, then close connections.
                current = asyncio.current_task()
                tasks = [t for t in asyncio.all_tasks() if t is not current]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if store is not None:
                    await store.close()

            try:
                asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()
