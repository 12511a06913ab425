"""A content-addressed read cache of clean blocks, with single-flight fetches.

Chunks are immutable and named by their hash, so a cached chunk never goes stale: the cache needs no
invalidation, only a byte bound (LRU). Concurrent readers of one chunk (a read racing its own readahead,
two handles reading one file) share one ``ChunkPort.get``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable

import trio

from pxfs.errors import PxfsError
from pxfs.vfs.ports import ChunkPort

log = logging.getLogger(__name__)


class ChunkCache:
    def __init__(self, chunks: ChunkPort, limit: int) -> None:
        self._chunks = chunks
        self._limit = limit
        self._lru: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[bytes, trio.Event] = {}
        # Chunks a read needed, found in memory or not, counted by the reader (Vfs.read): readahead and
        # read-modify-write also look here, and are no reads an application waits for.
        self.hits = 0
        self.misses = 0

    @property
    def size(self) -> int:
        return self._bytes

    def peek(self, h: bytes) -> bytes | None:
        data = self._lru.get(h)
        if data is not None:
            self._lru.move_to_end(h)
        return data

    def wanted(self, h: bytes) -> bool:
        """Neither cached nor being fetched: a readahead for it would do useful work."""
        return h not in self._lru and h not in self._inflight

    def put(self, h: bytes, data: bytes) -> None:
        if len(data) > self._limit:
            return
        old = self._lru.pop(h, None)
        if old is not None:
            self._bytes -= len(old)
        self._lru[h] = data
        self._bytes += len(data)
        while self._bytes > self._limit:
            _, evicted = self._lru.popitem(last=False)
            self._bytes -= len(evicted)

    async def get(self, h: bytes) -> bytes:
        while True:
            data = self.peek(h)
            if data is not None:
                return data
            pending = self._inflight.get(h)
            if pending is None:
                break
            # Someone is fetching it: wait, then look again (their fetch may have failed, or the
            # chunk may be too big to cache: then we fetch it ourselves).
            await pending.wait()
            if h not in self._inflight and h not in self._lru:
                break
        done = trio.Event()
        self._inflight[h] = done
        try:
            data = await self._chunks.get(h)
            self.put(h, data)
        finally:
            del self._inflight[h]
            done.set()
        return data

    async def get_many(self, hashes: Iterable[bytes]) -> tuple[dict[bytes, bytes], int]:
        """Every chunk of ``hashes``, those not cached fetched at once; and how many were fetched."""
        got: dict[bytes, bytes] = {}
        missing = []
        for h in set(hashes):
            data = self.peek(h)
            if data is None:
                missing.append(h)
            else:
                got[h] = data

        async def fetch(h: bytes) -> None:
            got[h] = await self.get(h)

        if len(missing) > 1:
            await run_all(lambda h=h: fetch(h) for h in missing)
        elif missing:
            await fetch(missing[0])
        return got, len(missing)

    async def prefetch(self, h: bytes) -> None:
        """Background readahead: a failure only costs the later read a fetch of its own."""
        try:
            await self.get(h)
        except PxfsError as err:
            log.debug("readahead of chunk=%s failed: %s", h.hex()[:16], err)


async def run_all(jobs: Iterable[Callable[[], Awaitable[object]]], limiter: trio.CapacityLimiter | None = None) -> None:
    """Run ``jobs`` concurrently; on the first ``PxfsError`` cancel the rest and raise that error.

    Raising the error itself (not an ExceptionGroup) keeps the errno intact for the FUSE layer.
    NoSpace wins over other failures: ENOSPC tells the application more than EIO.
    """
    errors: list[PxfsError] = []

    async def one(job: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
        try:
            if limiter is None:
                await job()
            else:
                async with limiter:
                    await job()
        except PxfsError as err:
            errors.append(err)
            scope.cancel()

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(one, job, nursery.cancel_scope)
    if errors:
        errors.sort(key=lambda e: e.code != "no-space")
        raise errors[0]
