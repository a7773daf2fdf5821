"""A reader used in a parent process keeps working in a forked child, and the parent after it.

The child must build a loop, thread and connections of its own and never touch the parent's: the
parent's event loop polls its sockets through an epoll instance that a forked child shares, so
a child that closed (or garbage-collected) the parent's connections would unregister them from
the *parent's* epoll, and the parent's next request on a pooled connection would hang until its
read timeout.
"""

from __future__ import annotations

import copy
import gc
import os
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import aiodcp

from conftest import S3Server, assert_same, save_checkpoint, upload_dir
from faultproxy import FaultProxy, aiodcp_threads, established_to

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

CHILD_TIMEOUT_S = 60.0  # a hang guard
READ_TIMEOUT_S = 30.0


@pytest.fixture
def checkpoint(tmp_path: Path, s3: Any, bucket: str) -> tuple[str, dict[str, Any]]:
    g = torch.Generator().manual_seed(21)
    sd = {f"p{i}": torch.randn(32, 256, generator=g) for i in range(12)}
    local = save_checkpoint(copy.deepcopy(sd), tmp_path / "ck", thread_count=2)
    upload_dir(s3, local, bucket, "ck")
    return f"s3://{bucket}/ck", sd


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A fault-free proxy: unlike moto (``Connection: close``) it keeps connections alive, so
    the parent really holds pooled connections when it forks."""
    with FaultProxy(s3_server.endpoint_url) as p:
        yield p


def blank(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) for k, v in sd.items()}


def fork() -> int:
    with warnings.catch_warnings():  # 3.12+: "this process is multi-threaded, fork() may..."
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def wait_child(pid: int, read_fd: int) -> tuple[int, str]:
    """The child's exit code and what it wrote; kills it if it hangs."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.02)
    with os.fdopen(read_fd, "rb") as f:
        report = f.read().decode(errors="replace")
    return os.waitstatus_to_exitcode(status), report


def load_in_child(
    reader: aiodcp.S3StorageReader,
    sd: dict[str, Any],
    check: Callable[[], None] = lambda: None,
) -> None:
    """Fork; the child loads ``sd``'s checkpoint through ``reader``, checks it (and runs
    ``check``), closes the reader, checks no I/O thread is left, and reports; fails the test if
    the child failed or hung."""
    read_fd, write_fd = os.pipe()
    pid = fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(read_fd)
            child_state = blank(sd)
            dcp.load(child_state, storage_reader=reader)
            assert_same(child_state, sd)
            check()
            reader.close()
            assert [t for t in threading.enumerate() if t.name == "aiodcp-io"] == []
            code = 0
        except BaseException:
            os.write(write_fd, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    code, report = wait_child(pid, read_fd)
    assert code == 0, f"child failed:\n{report}"


def test_reader_reused_in_forked_child_and_then_in_parent(
    checkpoint: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any], proxy: FaultProxy
) -> None:
    url, sd = checkpoint
    port = proxy.port
    # A long read timeout: a parent connection broken by the child would hang until it fires
    # (and count a retry), not fail fast.
    reader = aiodcp.S3StorageReader(
        url, read_timeout_s=READ_TIMEOUT_S, **{**reader_kwargs, "endpoint_url": proxy.endpoint_url}
    )
    try:
        state = blank(sd)
        dcp.load(state, storage_reader=reader)
        assert_same(state, sd)
        parent_loop = reader._io.loop
        parent_threads = aiodcp_threads()
        assert parent_threads == ["aiodcp-io"]
        pooled = established_to(port)
        assert pooled > 0, "the parent should keep pooled keep-alive connections"

        def in_child() -> None:
            assert reader._io.loop is not parent_loop, "the child reused the parent's loop"
            assert reader.stats is not None and reader.stats.items == len(sd)
            gc.collect()  # whatever the child dropped of the parent's must stay untouched

        load_in_child(reader, sd, in_child)

        # The parent: same loop, same thread, its pooled connections still alive and usable.
        assert reader._io.loop is parent_loop
        assert aiodcp_threads() == parent_threads
        assert established_to(port) == pooled
        started = time.perf_counter()
        state = blank(sd)
        dcp.load(state, storage_reader=reader)
        elapsed = time.perf_counter() - started
        assert_same(state, sd)
        assert reader.stats is not None and reader.stats.retries == 0
        # A hang guard, not a time bound: a connection the child broke costs the read timeout.
        assert elapsed < READ_TIMEOUT_S, f"the parent's load took {elapsed:.1f} s after the fork"
    finally:
        reader.close()
    assert aiodcp_threads() == []
    assert established_to(port) == 0


def test_reader_forked_before_first_use(
    checkpoint: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any]
) -> None:
    """A reader made (not used) in the parent: the child starts its loop lazily, as usual."""
    url, sd = checkpoint
    reader = aiodcp.S3StorageReader(url, **reader_kwargs)
    load_in_child(reader, sd)
    assert aiodcp_threads() == []  # the parent never started anything
    with reader:
        state = blank(sd)
        dcp.load(state, storage_reader=reader)
    assert_same(state, sd)


def test_fork_while_another_thread_holds_the_readers_lock(
    checkpoint: tuple[str, dict[str, Any]], reader_kwargs: dict[str, Any]
) -> None:
    """The child of a fork made while a parent thread was inside the reader (holding its lock)
    must still be able to use the reader: that thread does not exist in the child."""
    url, sd = checkpoint
    reader = aiodcp.S3StorageReader(url, **reader_kwargs)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with reader._driver_lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        load_in_child(reader, sd)
    finally:
        release.set()
        holder.join(10)
        reader.close()
