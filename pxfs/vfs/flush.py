"""The write-back path: dirty blocks -> blake3 -> ``ChunkPort.put`` -> one ``MetaPort.commit``.

Data is dirty until the commit that names its chunks has succeeded; a failed put or commit (NoSpace,
Unavailable) leaves every block dirty and raises to whoever asked for the flush (fsync, close,
a writer under back-pressure), so no failure ever drops data silently.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import blake3
import trio

from pxfs.errors import PxfsError
from pxfs.vfs.cache import ChunkCache, run_all
from pxfs.vfs.openfile import DirtyBlock, OpenInode
from pxfs.vfs.ports import BlockMap, ChunkPort, MetaPort

log = logging.getLogger(__name__)

# Hashing runs at ~10 GB/s with the GIL released; a thread hop costs more than hashing one block,
# so only big batches go to a worker thread.
HASH_IN_THREAD = 4 << 20
PUTS_IN_FLIGHT = 8


def _hash_all(datas: list[bytes]) -> list[bytes]:
    return [blake3.blake3(d).digest() for d in datas]


class Writeback:
    """Dirty blocks of every inode of one mount, bounded by ``limit`` bytes."""

    def __init__(self, meta: MetaPort, chunks: ChunkPort, cache: ChunkCache, block_size: int, limit: int,
                 on_clean: Callable[[OpenInode], None]) -> None:
        self._meta = meta
        self._chunks = chunks
        self._cache = cache
        self._bs = block_size
        self.limit = limit
        self._on_clean = on_clean
        self._puts = trio.CapacityLimiter(PUTS_IN_FLIGHT)  # mount-wide: flushes of many inodes share it
        self.dirty_bytes = 0
        self._dirty: dict[int, OpenInode] = {}  # inodes with dirty blocks, in the order they got dirty

    def dirty_inodes(self) -> list[OpenInode]:
        return list(self._dirty.values())

    # -- buffering ------------------------------------------------------------------------------
    async def block(self, st: OpenInode, idx: int, whole: bool) -> DirtyBlock:
        """The dirty buffer of block ``idx``, made from the committed chunk unless ``whole`` is
        about to be overwritten (a partial write must keep the bytes around it)."""
        blk = st.dirty.get(idx)
        if blk is not None:
            return blk
        buf = bytearray(self._bs)
        old = st.blocks.get(idx)
        if old is not None and not whole:
            h, length = old
            data = await self._cache.get(h)
            buf[:length] = memoryview(data)[:length]
            blk = st.dirty.get(idx)
            if blk is not None:  # another writer made it while we fetched: theirs has newer bytes
                return blk
        blk = DirtyBlock(buf)
        st.dirty[idx] = blk
        self.dirty_bytes += self._bs
        if st.dirty_since is None:
            st.dirty_since = trio.current_time()
            self._dirty[st.ino] = st
        return blk

    async def make_room(self, need: int) -> None:
        """Back-pressure: flush the oldest dirty inodes until ``need`` more bytes fit the limit."""
        for st in sorted(self._dirty.values(), key=lambda s: s.dirty_since or 0.0):
            if self.dirty_bytes + need <= self.limit:
                return
            await self.flush(st)

    def truncate(self, st: OpenInode, size: int) -> None:
        """Forget dirty bytes at or past ``size``: a later extension must read them as zeros."""
        bs = self._bs
        for idx in [i for i in st.dirty if i * bs >= size]:
            self._drop(st, idx)
        idx, keep = divmod(size, bs)
        blk = st.dirty.get(idx)
        if blk is not None and keep:
            blk.buf[keep:] = bytes(bs - keep)
            blk.version += 1
        st.size = min(st.size, size)
        self._check_clean(st)

    def discard(self, st: OpenInode) -> None:
        """Drop every dirty block of an inode that no longer exists."""
        for idx in list(st.dirty):
            self._drop(st, idx)
        self._check_clean(st)

    def _drop(self, st: OpenInode, idx: int) -> None:
        del st.dirty[idx]
        self.dirty_bytes -= self._bs

    def _check_clean(self, st: OpenInode) -> None:
        if not st.dirty and st.dirty_since is not None:
            st.dirty_since = None
            self._dirty.pop(st.ino, None)
            self._on_clean(st)

    # -- flushing -------------------------------------------------------------------------------
    async def flush(self, st: OpenInode) -> None:
        async with st.lock:
            await self.flush_locked(st)

    async def flush_locked(self, st: OpenInode) -> None:
        """Commit the inode's dirty blocks (caller holds ``st.lock``)."""
        if not st.dirty:
            return
        bs = self._bs
        size, mtime_ns = st.size, st.mtime_ns
        snap: list[tuple[int, DirtyBlock, int, bytes]] = []
        for idx, blk in sorted(st.dirty.items()):
            length = min(bs, size - idx * bs)  # the last block is stored without zeros past EOF
            if length > 0:
                snap.append((idx, blk, blk.version, bytes(memoryview(blk.buf)[:length])))
        datas = [s[3] for s in snap]
        if sum(map(len, datas)) > HASH_IN_THREAD:
            hashes = await trio.to_thread.run_sync(_hash_all, datas)
        else:
            hashes = _hash_all(datas)
        unique = dict(zip(hashes, datas, strict=True))  # equal blocks (zeros, copies) are put once

        def put(h: bytes, data: bytes) -> Callable[[], object]:
            return lambda: self._chunks.put(h, data)

        await run_all((put(h, d) for h, d in unique.items()), self._puts)
        entries: BlockMap = {s[0]: (h, len(s[3])) for s, h in zip(snap, hashes, strict=True)}
        attr = await self._meta.commit(st.ino, entries, size, mtime_ns)
        st.committed(attr, entries)
        for h, data in unique.items():
            self._cache.put(h, data)  # read-after-write is served from memory
        for idx, blk, version, _ in snap:
            if st.dirty.get(idx) is blk and blk.version == version:
                self._drop(st, idx)
        # Blocks wholly past EOF (left by a racing truncate) have nothing to commit.
        for idx in [i for i in st.dirty if i * bs >= st.size]:
            self._drop(st, idx)
        log.debug("flushed inode=%d blocks=%d size=%d", st.ino, len(entries), size)
        self._check_clean(st)

    async def flush_due(self, max_age: float) -> None:
        """Timer flush: every inode whose oldest dirty byte is older than ``max_age`` seconds."""
        now = trio.current_time()
        for st in list(self._dirty.values()):
            if st.dirty_since is None or now - st.dirty_since < max_age:
                continue
            try:
                await self.flush(st)
            except PxfsError as err:
                if st.handles == 0 and err.errno in (errno.ENOENT, errno.ESTALE):
                    log.info("inode=%d is gone; dropping its unflushed blocks", st.ino)
                    self.discard(st)
                    continue
                # Keep the data; retry after another interval, and tell the next fsync/close.
                log.warning("background flush of inode=%d failed: %s", st.ino, err)
                if st.dirty_since is not None:
                    st.dirty_since = trio.current_time()
