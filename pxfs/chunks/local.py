"""The async face of a node's pools, served by the node's ChunkStore RPC server.

A chunk goes to one pool of the node, chosen by weighted rendezvous hashing of its hash over the
pools' paths (weight = usable capacity). The choice is deterministic, so two concurrent puts of one
chunk land in the same pool and dedup there, and adding a pool moves only its share of new
placements. A full pool is skipped in favour of the next in the chunk's order.

All disk work (hashing included) runs in worker threads: a 1 MiB put is ~1–3 ms of hashing, write
and fsync, far too long to hold the trio event loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import blake3
import trio

from pxfs.chunks.pool import Pool, check_chunk, chunk_name
from pxfs.errors import Corrupt, Invalid, NoSpace, NotFound

log = logging.getLogger(__name__)

# Disk threads a store may occupy at once: enough to keep a disk queue busy, few enough to leave
# trio's default thread pool (40) to the rest of the node.
DEFAULT_THREADS = 8


def _score(h: bytes, pool: Pool) -> float:
    # Weighted rendezvous (highest random weight): -w / ln(u) with u uniform in (0, 1) from the hash
    # gives each pool a share of chunks proportional to its weight.
    digest = blake3.blake3(h + str(pool.path).encode()).digest(8)
    u = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)
    return -(pool.capacity - pool.reserve) / math.log(u)


class LocalChunkStore:
    """A node's pools as one chunk store: put, get, has_many, delete."""

    def __init__(self, pools: Sequence[Pool], threads: int = DEFAULT_THREADS) -> None:
        if not pools:
            raise Invalid("local chunk store", "needs at least one pool")
        paths = [str(p.path) for p in pools]
        if len(set(paths)) != len(paths):
            raise Invalid("local chunk store", f"pool paths are not distinct: {', '.join(paths)}")
        self._pools = list(pools)
        self._limiter = trio.CapacityLimiter(threads)

    @property
    def pools(self) -> list[Pool]:
        return list(self._pools)

    def _name(self) -> str:
        return "pools " + ", ".join(str(p.path) for p in self._pools)

    def _order(self, h: bytes) -> list[Pool]:
        return sorted(self._pools, key=lambda p: _score(h, p), reverse=True)

    async def open(self) -> None:
        for pool in self._pools:
            await trio.to_thread.run_sync(pool.open, limiter=self._limiter)

    async def put(self, h: bytes, data: bytes | memoryview) -> bool:
        """Store a chunk in one pool; False if some pool already holds it.

        ``Invalid`` for a bad hash, ``NoSpace`` naming this node's pools when none has room.
        """
        return await trio.to_thread.run_sync(self._put_sync, h, data, limiter=self._limiter)

    def _put_sync(self, h: bytes, data: bytes | memoryview) -> bool:
        check_chunk(h, data)
        order = self._order(h)
        if any(p.touch(h) for p in order):
            return False
        n = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
        for pool in order:
            if pool.free < n:
                continue
            try:
                # Hash checked above: skip Pool.put's second check of the same bytes.
                return pool._store(h, data)
            except NoSpace:
                # Filled up since we looked (another thread, or the disk): try the next pool.
                continue
        free = ", ".join(f"{p.path}={p.free}" for p in order)
        raise NoSpace(self._name(), f"no pool has room for {chunk_name(h)} of {n} bytes (free: {free})")

    async def get(self, h: bytes) -> bytes:
        """The chunk's verified bytes from whichever pool holds a good copy.

        ``NotFound`` if no pool has it, ``Corrupt`` if every copy found is bad.
        """
        return await trio.to_thread.run_sync(self._get_sync, h, limiter=self._limiter)

    def _get_sync(self, h: bytes) -> bytes:
        corrupt: Corrupt | None = None
        # The chunk's own placement order first: that is where it almost always is.
        for pool in self._order(h):
            try:
                return pool.get(h)
            except NotFound:
                continue
            except Corrupt as e:
                # Never serve it again: move it aside, so a good copy can be put back in its place
                # (by the reader that fetches one elsewhere, or by repair).
                corrupt = e
                where = pool.quarantine(h)
                log.warning("chunk=%s pool=%s corrupt on read, quarantined to %s", h.hex()[:16], pool.path, where)
        if corrupt is not None:
            raise corrupt
        raise NotFound(chunk_name(h), f"not in {self._name()}")

    async def verify(self, hs: list[bytes]) -> list[int]:
        """Re-read and re-hash each chunk: 0 good, 1 missing, 2 corrupt (now quarantined)."""
        def run() -> list[int]:
            out = []
            for h in hs:
                try:
                    self._get_sync(h)
                    out.append(0)
                except NotFound:
                    out.append(1)
                except Corrupt:
                    out.append(2)
            return out
        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def sweep(self, keep: set[bytes], older_than: float, dry_run: bool,
                    until: float = math.inf) -> tuple[int, int, int]:
        def run() -> tuple[int, int, int]:
            totals = [0, 0, 0]
            for pool in self._pools:
                for i, n in enumerate(pool.sweep(keep, older_than, dry_run, until)):
                    totals[i] += n
            return totals[0], totals[1], totals[2]
        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def list_hashes(self, after: bytes, limit: int) -> list[bytes]:
        """Chunk names above ``after`` in byte order, across all pools (for node-wide scrub)."""
        def run() -> list[bytes]:
            names: set[bytes] = set()
            for pool in self._pools:
                names.update(h for h in pool.iter_hashes() if h > after)
            return sorted(names)[:limit]
        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def has_many(self, hs: list[bytes]) -> list[bool]:
        return await trio.to_thread.run_sync(self._has_many_sync, hs, limiter=self._limiter)

    def _has_many_sync(self, hs: list[bytes]) -> list[bool]:
        found = [False] * len(hs)
        for pool in self._pools:
            for i, hit in enumerate(pool.has_many(hs)):
                found[i] = found[i] or hit
        return found

    async def delete(self, h: bytes) -> bool:
        """Remove the chunk from every pool (a race may have left copies in two); False if none had it."""
        return await trio.to_thread.run_sync(self._delete_sync, h, limiter=self._limiter)

    def _delete_sync(self, h: bytes) -> bool:
        deleted = False
        for pool in self._pools:
            deleted = pool.delete(h) or deleted
        return deleted
