"""The write-back path: dirty blocks -> blake3 -> ``ChunkPort.put`` -> one ``MetaPort.commit``.

Data is dirty until the commit that names its chunks has succeeded; a failed put or commit (NoSpace,
Unavailable) leaves every block dirty and raises to whoever asked for the flush (fsync, close, a
writer under back-pressure), so no failure ever drops data silently.

Write-behind: a streaming writer must not alternate between filling the buffer and waiting for it to
drain. Once a block is complete (the writer filled it and moved on), or once the buffer is half full,
a background task per inode (a *pump*) uploads groups of blocks and commits each group, while the
writer keeps writing. The writer waits only when dirty plus in-flight bytes reach ``limit``, and then
for the pumps rather than flushing by itself. A pump's failure is kept on the inode and raised by the
next fsync or close of every handle open on it (errseq, ``OpenInode.failed``): the blocks stay dirty,
and the application learns that writing them failed.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

import blake3
import trio

from pxfs.errors import PutsExpired, PxfsError
from pxfs.meta import slices
from pxfs.meta.slices import Block, BlockWrite
from pxfs.model import Attr
from pxfs.vfs.cache import ChunkCache, run_all
from pxfs.vfs.openfile import DirtyBlock, OpenInode
from pxfs.vfs.ports import ChunkPort, MetaPort

log = logging.getLogger(__name__)

# Hashing runs at ~10 GB/s with the GIL released; a thread hop costs more than hashing one block,
# so only big batches go to a worker thread.
HASH_IN_THREAD = 4 << 20
PUTS_IN_FLIGHT = 8
# A background commit covers at most this much data: enough that metadata round trips stay rare,
# little enough that the writer gets room back in steps rather than all at the end.
GROUP_BYTES = 16 << 20
RETRY_AFTER = 1.0  # seconds without background uploads of an inode after one of them failed
STREAMING_HOLD = 5  # intervals a timer flush waits at most for a writer to pause
PUT_ROUNDS = 3  # puts and commit again when a commit comes too late after its puts (PutsExpired)

# (append, old slices kept, [(offset in the block, bytes to store as a slice over them)])
Pieces = tuple[bool, Block, list[tuple[int, bytes]]]
Flight = list[tuple[int, DirtyBlock, Pieces]]  # (block index, frozen block, what to store of it)


def _hash_all(datas: list[bytes]) -> list[bytes]:
    return [blake3.blake3(d).digest() for d in datas]


class Writeback:
    """Dirty blocks of every inode of one mount, bounded by ``limit`` bytes with those in flight."""

    def __init__(self, meta: MetaPort, chunks: ChunkPort, cache: ChunkCache, block_size: int, limit: int,
                 on_clean: Callable[[OpenInode], None]) -> None:
        self._meta = meta
        self._chunks = chunks
        self._cache = cache
        self._bs = block_size
        self.limit = limit
        self.high_water = limit // 2
        self._group = max(1, min(GROUP_BYTES, limit // 4) // block_size)
        self._on_clean = on_clean
        self._puts = trio.CapacityLimiter(PUTS_IN_FLIGHT)  # mount-wide: flushes of many inodes share it
        self.dirty_bytes = 0  # writable dirty buffers
        self.flying_bytes = 0  # frozen buffers that an upload holds until its commit lands
        self._dirty: dict[int, OpenInode] = {}  # inodes with dirty blocks, in the order they got dirty
        self.tasks: trio.Nursery | None = None  # where pumps run; None: every flush is the caller's
        self._pumps: set[OpenInode] = set()
        self._waiting = 0  # writers blocked on the limit: pumps then take every block, ignoring backoff
        self._changed = trio.Event()  # set (and replaced) whenever bytes are freed or a pump ends
        self._failures = 0
        self._last_failure: PxfsError | None = None

    def dirty_inodes(self) -> list[OpenInode]:
        return list(self._dirty.values())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- buffering ------------------------------------------------------------------------------
    async def write(self, st: OpenInode, off: int, data: bytes) -> None:
        if not data:
            return
        bs = self._bs
        end = off + len(data)
        src = memoryview(data)
        completed = False
        pos = off
        while pos < end:
            idx, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            blk = await self._writable(st, idx, whole=n == bs)
            # No checkpoint from here to the size update: an upload snapshots a block together
            # with the size that says how much of it to store.
            blk.buf[within:within + n] = src[pos - off:pos - off + n]
            blk.wrote(within, within + n)
            if within <= blk.valid:
                blk.valid = max(blk.valid, within + n)
            completed |= blk.complete
            pos += n
            st.size = max(st.size, pos)
        st.mtime_ns = time.time_ns()
        st.last_write = trio.current_time()
        if completed:
            self._start(st)
        if self.dirty_bytes > self.high_water:
            for other in self.dirty_inodes():
                self._start(other)

    async def _writable(self, st: OpenInode, idx: int, whole: bool) -> DirtyBlock:
        """The writable dirty buffer of block ``idx``: the whole block if it is a hole or about to be
        overwritten whole, else only what is written to it (its slices, ``DirtyBlock.based``)."""
        bs = self._bs
        while True:
            blk = st.dirty.get(idx)
            if blk is not None and not blk.frozen:
                return blk
            await self.make_room(bs)
            blk = st.dirty.get(idx)
            if blk is not None:
                if blk.frozen:  # an upload holds it: copy on write, the upload keeps what it hashed
                    # The copy keeps the ranges: if that upload fails, the copy is what is left.
                    return self._add(st, idx, bytearray(blk.buf), blk.valid, blk.since, blk.based, list(blk.ranges))
                continue
            valid = min(bs, max(0, st.size - idx * bs))  # below EOF: old content or a hole's zeros
            based = whole or idx not in st.blocks
            return self._add(st, idx, bytearray(bs), valid if based else 0, trio.current_time(), based, [])

    def _add(self, st: OpenInode, idx: int, buf: bytearray, valid: int, since: float, based: bool,
             ranges: list[tuple[int, int]]) -> DirtyBlock:
        blk = st.dirty[idx] = DirtyBlock(buf, valid, since, based, ranges)
        self.dirty_bytes += self._bs
        if st.dirty_since is None:
            st.dirty_since = since
            self._dirty[st.ino] = st
        return blk

    def _fits(self, need: int) -> bool:
        return self.dirty_bytes + self.flying_bytes + need <= self.limit

    async def make_room(self, need: int) -> None:
        """Back-pressure: wait until ``need`` more bytes fit the limit; raise a failure of the uploads
        waited for (the writer must not wait forever for room that cannot be made)."""
        if self._fits(need):
            return
        if self.tasks is None:
            for st in self.dirty_inodes():
                if self._fits(need):
                    return
                await self.sync(st)
            return
        failures = self._failures
        self._waiting += 1
        try:
            while not self._fits(need):
                if self._failures != failures and self._last_failure is not None:
                    raise self._last_failure
                for st in self.dirty_inodes():
                    self._start(st)
                if not self._pumps and not self.flying_bytes:
                    return  # nothing buffered can be freed: a write bigger than the whole limit
                await self._changed.wait()
        finally:
            self._waiting -= 1

    def truncate(self, st: OpenInode, size: int) -> None:
        """Forget dirty bytes at or past ``size``: a later extension must read them as zeros. The
        caller holds ``st.lock``, so no upload holds blocks of ``st``."""
        bs = self._bs
        for idx in [i for i in st.dirty if i * bs >= size]:
            self._drop(st, idx)
        idx, keep = divmod(size, bs)
        blk = st.dirty.get(idx)
        if blk is not None and keep:
            blk.buf[keep:] = bytes(bs - keep)
            blk.valid = min(blk.valid, keep)
            blk.clip(keep)
        st.size = min(st.size, size)
        self._check_clean(st)

    def discard(self, st: OpenInode) -> None:
        """Drop every dirty block of an inode that no longer exists."""
        for idx in list(st.dirty):
            self._drop(st, idx)
        st.forget_errors()
        self._check_clean(st)

    def _drop(self, st: OpenInode, idx: int) -> None:
        if not st.dirty.pop(idx).frozen:  # a frozen block's bytes are its upload's until it lands
            self.dirty_bytes -= self._bs
        self._notify()

    def _check_clean(self, st: OpenInode) -> None:
        if st.dirty:
            if st.dirty_since is not None:
                st.dirty_since = min(b.since for b in st.dirty.values())
        elif st.dirty_since is not None:
            st.dirty_since = None
            self._dirty.pop(st.ino, None)
            self._on_clean(st)

    # -- flushing -------------------------------------------------------------------------------
    async def flush(self, st: OpenInode) -> None:
        """fsync and close: commit every byte written so far; a failure is the inode's (``failed``),
        so every handle of it reports it (the caller's handle, through this raise, included)."""
        async with st.lock:  # fair: waits for the upload in flight, not for the pump's next one
            try:
                await self.flush_locked(st)
            except PxfsError as err:
                st.failed(err)
                raise

    async def sync(self, st: OpenInode) -> None:
        """Commit every byte written so far (timer, back-pressure without pumps, unmount)."""
        async with st.lock:
            await self.flush_locked(st)

    async def flush_locked(self, st: OpenInode) -> None:
        """Commit the inode's dirty blocks (caller holds ``st.lock``)."""
        if st.dirty:
            await self._upload(st, sorted(st.dirty), st.size)

    async def _upload(self, st: OpenInode, idxs: list[int], size: int) -> None:
        """Put blocks ``idxs`` and commit them with ``size`` (caller holds ``st.lock``)."""
        bs = self._bs
        mtime_ns = st.mtime_ns
        frozen: list[tuple[int, DirtyBlock, int]] = []
        for idx in idxs:
            length = min(bs, size - idx * bs)  # the last block is stored without zeros past EOF
            if length <= 0:  # wholly past EOF (left by a racing truncate): nothing to commit
                self._drop(st, idx)
                continue
            blk = st.dirty[idx]
            blk.buf = bytes(blk.buf)
            self.dirty_bytes -= bs
            self.flying_bytes += bs
            frozen.append((idx, blk, length))
        if frozen:
            attr: Attr | None = None
            flight: Flight = []
            try:
                for idx, blk, length in frozen:
                    flight.append((idx, blk, await self._pieces(st, idx, blk, length)))
                attr, writes, unique = await self._send(st.ino, flight, size, mtime_ns)
            except PxfsError:
                st.retry_at = trio.current_time() + RETRY_AFTER
                raise
            finally:
                self._land(st, [(idx, blk) for idx, blk, _ in frozen], committed=attr is not None)
            st.committed(attr, writes)
            st.retry_at = 0.0
            for h, data in unique.items():
                self._cache.put(h, data)  # read-after-write is served from memory
            log.debug("committed inode=%d blocks=%d size=%d", st.ino, len(writes), size)
        self._check_clean(st)

    async def _pieces(self, st: OpenInode, idx: int, blk: DirtyBlock, length: int) -> Pieces:
        """What to store of a frozen block. A block written whole, or a hole written into, is one
        chunk; a block of which only parts were written gets those parts as slices over what it
        holds, or, once its slices pile up, some of them merged (``slices.plan``)."""
        buf = blk.buf
        assert isinstance(buf, bytes)
        if blk.based:
            return False, (), [(0, buf if length == len(buf) else buf[:length])]
        ranges = [(a, min(b, length)) for a, b in blk.ranges if a < length]
        old = slices.cut(st.blocks.get(idx, ()), length)
        end = max(slices.extent(old), max((b for _a, b in ranges), default=0))
        if ranges == [(0, end)] or not old:
            return False, (), [(0, buf[:end])]  # everything the block holds was written anew
        how = slices.plan(old, ranges, end)
        if how.append:
            return True, (), [(a, buf[a:b]) for a, b in ranges]
        under = [s for s in old if s[1] < how.hi and s[1] + s[2] > how.lo]
        chunks, _fetched = await self._cache.get_many(slices.hashes(under))
        merged = bytearray(slices.assemble(tuple(under), how.lo, how.hi, chunks.__getitem__))
        for a, b in ranges:
            merged[a - how.lo:b - how.lo] = buf[a:b]
        return False, how.keep, [(how.lo, bytes(merged))]

    async def _send(self, ino: int, flight: Flight, size: int,
                    mtime_ns: int) -> tuple[Attr, dict[int, BlockWrite], dict[bytes, bytes]]:
        datas = [data for _, _, (_append, _keep, pieces) in flight for _off, data in pieces]
        if sum(map(len, datas)) > HASH_IN_THREAD:
            hashes = await trio.to_thread.run_sync(_hash_all, datas)
        else:
            hashes = _hash_all(datas)
        unique = dict(zip(hashes, datas, strict=True))  # equal blocks (zeros, copies) are put once

        def put(h: bytes, data: bytes) -> Callable[[], object]:
            return lambda: self._chunks.put(h, data)

        named = iter(hashes)
        writes = {idx: BlockWrite(keep + tuple((next(named), off, len(data)) for off, data in pieces), append)
                  for idx, _, (append, keep, pieces) in flight}
        for attempt in range(PUT_ROUNDS):
            started = trio.current_time()
            # A put of a chunk the replica has refreshes its age: the second round is cheap.
            await run_all((put(h, d) for h, d in unique.items()), self._puts)
            try:
                return await self._meta.commit(ino, writes, size, mtime_ns, started), writes, unique
            except PutsExpired:
                if attempt == PUT_ROUNDS - 1:
                    raise
                log.info("inode=%d: commit came too long after its puts; putting again", ino)
        raise AssertionError("unreachable")

    def _land(self, st: OpenInode, flight: list[tuple[int, DirtyBlock]], committed: bool) -> None:
        """An upload ended: committed blocks are clean, failed ones writable and dirty again."""
        for idx, blk in flight:
            self.flying_bytes -= self._bs
            if st.dirty.get(idx) is not blk:
                continue  # rewritten meanwhile: its writable copy holds these bytes and newer ones
            if committed:
                del st.dirty[idx]
            else:
                blk.buf = bytearray(blk.buf)
                self.dirty_bytes += self._bs
        self._notify()

    # -- background uploads ---------------------------------------------------------------------
    def _start(self, st: OpenInode) -> None:
        if self.tasks is None or st in self._pumps or not st.dirty:
            return
        if not self._waiting and trio.current_time() < st.retry_at:
            return
        self._pumps.add(st)
        self.tasks.start_soon(self._pump, st)

    async def _pump(self, st: OpenInode) -> None:
        """Upload and commit groups of ``st``'s blocks until none is due; one pump per inode."""
        try:
            while True:
                async with st.lock:
                    idxs = self._due(st)
                    if not idxs:
                        return
                    # Only as long as the blocks committed: a size reaching further would show
                    # bytes still in memory as zeros after a crash.
                    await self._upload(st, idxs, min(st.size, (idxs[-1] + 1) * self._bs))
        except PxfsError as err:
            self._failed(st, err)
        finally:
            self._pumps.discard(st)
            self._notify()

    def _due(self, st: OpenInode) -> list[int]:
        """The next group of blocks a pump should upload, in file order (caller holds ``st.lock``)."""
        pressed = self._waiting > 0
        if not pressed and trio.current_time() < st.retry_at:
            return []
        free = sorted(i for i, b in st.dirty.items() if not b.frozen)
        if not pressed and self.dirty_bytes <= self.high_water:
            free = [i for i in free if st.dirty[i].complete]
        group = free[:self._group]
        # A block left behind past the committed EOF must not end up below the committed size.
        taken = set(group)
        bs = self._bs
        gap = min((i for i in st.dirty if i not in taken and i * bs >= st.attr.size), default=None)
        return group if gap is None else [i for i in group if i < gap]

    def _failed(self, st: OpenInode, err: PxfsError) -> None:
        """A background upload failed: keep the data, and the error for the next fsync or close."""
        if st.handles == 0 and err.errno in (errno.ENOENT, errno.ESTALE):
            log.info("inode=%d is gone; dropping its unflushed blocks", st.ino)
            self.discard(st)
            return
        log.warning("background flush of inode=%d failed: %s", st.ino, err)
        st.failed(err)
        self._failures += 1
        self._last_failure = err
        self._notify()

    async def flush_due(self, max_age: float) -> None:
        """Timer flush: every inode whose oldest dirty byte is older than ``max_age`` seconds, unless
        it is being written right now (a write in the last half interval): a block the writer is
        still filling would be stored in pieces (slices), so it waits for a pause, or at most
        ``STREAMING_HOLD`` intervals."""
        now = trio.current_time()
        for st in self.dirty_inodes():
            if st.dirty_since is None or now - st.dirty_since < max_age:
                continue
            if now - st.last_write < max_age / 2 and now - st.dirty_since < STREAMING_HOLD * max_age:
                continue
            try:
                await self.sync(st)
            except PxfsError as err:
                self._failed(st, err)
                if st.dirty_since is not None:
                    st.dirty_since = trio.current_time()  # retry after another interval
