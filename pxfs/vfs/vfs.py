"""The mount's view of a volume: open files, write-back, read assembly, metadata pass-through.

``Vfs`` knows blocks and chunk hashes but not where chunks live (``ChunkPort``) nor how metadata is
kept (``MetaPort``). Consistency with other mounts is close-to-open: the block map is fetched by the
first open of an inode in this mount, and this mount's writes are visible elsewhere once flushed
(at the latest on close).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from pxfs.errors import FsError, PxfsError
from pxfs.meta import slices, xattrs
from pxfs.meta.names import check_length
from pxfs.model import Attr
from pxfs.vfs.cache import ChunkCache
from pxfs.vfs.dircache import KnownDirs
from pxfs.vfs.flush import Writeback
from pxfs.vfs.openfile import Handle, OpenInode
from pxfs.vfs.ports import BlockMap, ChunkPort, MetaPort

log = logging.getLogger(__name__)

READDIR_PAGE = 1000
NO_XATTR_LIMIT = 100_000  # inodes
RENAME_EXCHANGE = 2  # renameat2(2) flag, linux/fs.h


class Vfs:
    def __init__(self, meta: MetaPort, chunks: ChunkPort, block_size: int, *, buffer_limit: int = 64 << 20,
                 flush_interval: float = 1.0, readahead: int = 4, cache_limit: int = 32 << 20) -> None:
        self.meta = meta
        self.block_size = block_size
        self.flush_interval = flush_interval
        self.readahead = readahead
        self.cache = ChunkCache(chunks, cache_limit)
        self.writeback = Writeback(meta, chunks, self.cache, block_size, buffer_limit, self._forget_if_idle)
        self._inodes: dict[int, OpenInode] = {}  # open, or closed with dirty blocks still to flush
        self._handles: dict[int, Handle] = {}
        self._next_fh = itertools.count(1)
        self._nursery: trio.Nursery | None = None  # for readahead; set while run() runs
        self.known = KnownDirs()  # directories whose every name this mount knows
        self._no_xattr: dict[int, set[bytes]] = {}  # xattrs known to be absent, per inode

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The flush timer and the home of readahead and background upload tasks; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = self.writeback.tasks = nursery
            task_status.started()
            try:
                while True:
                    # Half the interval: no block stays dirty much longer than flush_interval.
                    await trio.sleep(self.flush_interval / 2)
                    await self.writeback.flush_due(self.flush_interval)
            finally:
                self._nursery = self.writeback.tasks = None

    async def close(self) -> None:
        """Flush everything (unmount, and ``pxfs umount``'s flush before it); raises the first failure
        after trying every inode, whose data stays buffered."""
        failure: PxfsError | None = None
        for st in self.writeback.dirty_inodes():
            try:
                await self.writeback.sync(st)
            except PxfsError as err:
                if st.handles == 0 and (err.errno in (errno.ENOENT, errno.ESTALE) or await self._gone(st.ino)):
                    # Unlinked and closed: its data has nowhere to go, as on a local disk.
                    log.info("inode=%d is gone; dropping its unflushed blocks", st.ino)
                    self.writeback.discard(st)
                    continue
                log.error("flush of inode=%d at close failed: %s", st.ino, err)
                st.failed(err)  # handles still open on it hear of it
                failure = failure or err
        if failure is not None:
            raise failure

    async def _gone(self, ino: int) -> bool:
        """Whether the metadata says ``ino`` no longer exists (a flush may fail before it asks)."""
        try:
            await self.meta.getattr(ino)
        except FsError as err:
            return err.errno in (errno.ENOENT, errno.ESTALE)
        except PxfsError:
            return False
        return False

    def _forget_if_idle(self, st: OpenInode) -> None:
        if st.handles == 0 and not st.dirty and self._inodes.get(st.ino) is st:
            del self._inodes[st.ino]

    def _patch(self, attr: Attr) -> Attr:
        st = self._inodes.get(attr.ino)
        return attr if st is None else st.patch(attr)

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsError(errno.EBADF, f"fh {fh}", "no such open file") from None

    # -- open files -----------------------------------------------------------------------------
    async def open(self, ino: int, flags: int) -> int:
        attr, blocks = await self.meta.open(ino)  # meta counts every handle: one release each
        return await self._opened(attr, blocks, flags)

    async def _opened(self, attr: Attr, blocks: BlockMap, flags: int) -> int:
        ino = attr.ino
        st = self._inodes.get(ino)
        if st is None:
            st = self._inodes[ino] = OpenInode(attr, blocks, self.block_size)
        elif st.handles == 0:
            st.refresh(attr, blocks)  # close-to-open: see what others committed since our last close
        st.handles += 1
        fh = next(self._next_fh)
        self._handles[fh] = Handle(fh, st, flags)
        if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            # The kernel hands O_TRUNC to open (atomic_o_trunc): truncate here, and like
            # truncate(2), mark the file modified even when it was already empty.
            now = time.time_ns()
            try:
                await self.setattr(ino, size=0, mtime_ns=now, ctime_ns=now)
            except BaseException:
                await self.release(fh)
                raise
        return fh

    async def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int) -> tuple[int, Attr]:
        with self._changing(parent):
            attr = await self.meta.create(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)
        self.known.added(parent, name)
        return await self._opened(attr, {}, flags & ~os.O_TRUNC), attr  # new and empty: nothing to truncate

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        st = h.inode
        bs = self.block_size
        end = min(off + size, st.size)
        if off >= end:
            return b""
        first, last = off // bs, (end - 1) // bs
        chunks = await self._chunks_for(st, first, last)
        parts: list[bytes] = []
        for idx in range(first, last + 1):
            lo = max(off, idx * bs) - idx * bs
            hi = min(end, idx * bs + bs) - idx * bs
            blk = st.dirty.get(idx)
            if blk is not None and blk.based:
                parts.append(bytes(memoryview(blk.buf)[lo:hi]))
                continue
            block = st.blocks.get(idx, ())
            piece = slices.assemble(block, lo, hi, chunks.__getitem__) if block else bytes(hi - lo)
            if blk is not None:  # what this mount wrote over the stored slices
                mine = bytearray(piece)
                for a, b in blk.ranges:
                    a, b = max(a, lo), min(b, hi)
                    if a < b:
                        mine[a - lo:b - lo] = memoryview(blk.buf)[a:b]
                piece = bytes(mine)
            parts.append(piece)
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        if off in (0, h.next_off):
            self._read_ahead(st, last + 1)
        h.next_off = off + len(out)
        return out

    async def _chunks_for(self, st: OpenInode, first: int, last: int) -> dict[bytes, bytes]:
        """The chunks a read of blocks ``first..last`` needs, fetched at once where not cached."""
        need = {h for i in range(first, last + 1) if not (i in st.dirty and st.dirty[i].based)
                for h in slices.hashes(st.blocks.get(i, ()))}
        got, fetched = await self.cache.get_many(need)
        self.cache.hits += len(got) - fetched
        self.cache.misses += fetched
        return got

    def _read_ahead(self, st: OpenInode, start: int) -> None:
        if self._nursery is None:
            return
        bs = self.block_size
        for idx in range(start, start + self.readahead):
            if idx * bs >= st.size:
                break
            if idx in st.dirty:
                continue
            for h in slices.hashes(st.blocks.get(idx, ())):
                if self.cache.wanted(h):
                    self._nursery.start_soon(self.cache.prefetch, h)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        await self.writeback.write(self._handle(fh).inode, off, data)
        return len(data)

    async def flush(self, fh: int) -> None:
        await self._flush(self._handle(fh))

    async def fsync(self, fh: int) -> None:
        await self._flush(self._handle(fh))

    async def _flush(self, h: Handle) -> None:
        """Commit the file's data, then raise a write-back failure this handle has not reported: its
        own, or one another handle's flush or a background upload met (even if this retry went through)."""
        try:
            await self.writeback.flush(h.inode)
        except PxfsError:
            h.unreported()  # this failure is the report, of it and of any earlier one
            raise
        err = h.unreported()
        if err is not None:
            raise err

    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        st = h.inode
        try:
            await self._flush(h)
        finally:
            # A failed flush keeps the inode (and its dirty blocks) for the timer to retry.
            st.handles -= 1
            self._forget_if_idle(st)
            await self.meta.release(st.ino)

    # -- attributes -----------------------------------------------------------------------------
    async def getattr(self, ino: int) -> Attr:
        return self._patch(await self.meta.getattr(ino))

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                      size: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None,
                      ctime_ns: int | None = None) -> Attr:
        changes = dict(mode=mode, uid=uid, gid=gid, size=size, atime_ns=atime_ns, mtime_ns=mtime_ns,
                       ctime_ns=ctime_ns)
        st = self._inodes.get(ino)
        if st is None or (size is None and mtime_ns is None):
            return self._patch(await self.meta.setattr(ino, **changes))
        async with st.lock:
            # Commit dirty data first, so the truncate or the explicit mtime lands after it
            # instead of being overwritten by a later flush.
            if size is not None:
                self.writeback.truncate(st, size)
            await self.writeback.flush_locked(st)
            attr = await self.meta.setattr(ino, **changes)
            if size is not None:
                st.cut(size)
            st.refresh(attr, st.blocks)
        return st.patch(attr)

    # -- names and metadata: to the metadata, with local sizes of dirty files --------------------
    async def lookup(self, parent: int, name: bytes) -> Attr:
        check_length(name)  # before the known-names answer: a too long name is never just absent
        if self.known.missing(parent, name):
            raise FsError(errno.ENOENT, f"name {name[:80]!r}", "no such entry")
        return self._patch(await self.meta.lookup(parent, name))

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        with self._changing(parent):
            attr = await self.meta.mknod(parent, name, mode, rdev, uid, gid)
        self.known.added(parent, name)
        return attr

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        with self._changing(parent):
            attr = await self.meta.mkdir(parent, name, mode, uid, gid)
        self.known.added(parent, name)
        self.known.made(attr.ino)
        return attr

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        with self._changing(parent):
            attr = await self.meta.symlink(parent, name, target, uid, gid)
        self.known.added(parent, name)
        return attr

    async def readlink(self, ino: int) -> bytes:
        return await self.meta.readlink(ino)

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        with self._changing(new_parent):
            attr = await self.meta.link(ino, new_parent, new_name)
        self.known.added(new_parent, new_name)
        return self._patch(attr)

    async def unlink(self, parent: int, name: bytes) -> None:
        with self._changing(parent):
            await self.meta.unlink(parent, name)
        self.known.removed(parent, name)

    async def rmdir(self, parent: int, name: bytes) -> None:
        with self._changing(parent):
            await self.meta.rmdir(parent, name)
        self.known.removed(parent, name)

    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0) -> None:
        with self._changing(parent, new_parent):
            await self.meta.rename(parent, name, new_parent, new_name, flags)
        if not flags & RENAME_EXCHANGE:  # an exchange keeps both names
            self.known.removed(parent, name)
            self.known.added(new_parent, new_name)

    @contextmanager
    def _changing(self, *parents: int) -> Iterator[None]:
        """A change this mount makes in ``parents``; if it fails, someone else's change may be why."""
        try:
            yield
        except PxfsError:
            for p in parents:
                self.known.forget(p)
            raise

    async def readdir(self, ino: int, after: bytes = b"", limit: int = READDIR_PAGE) -> list[tuple[bytes, Attr]]:
        return [(name, self._patch(a)) for name, a in await self.meta.readdir(ino, after, limit)]

    # xattrs: ``privileged`` is the caller's CAP_SYS_ADMIN (uid 0), which only the mount knows.
    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0, *,
                       privileged: bool = False) -> None:
        xattrs.for_caller(ino, name, privileged, writing=True)
        self._no_xattr.pop(ino, None)
        await self.meta.setxattr(ino, name, value, flags)

    async def getxattr(self, ino: int, name: bytes, *, privileged: bool = False) -> bytes:
        xattrs.for_caller(ino, name, privileged, writing=False)
        # The kernel asks for security.capability before every write(2): a known absence saves a
        # round trip per write.
        if name in self._no_xattr.get(ino, ()):
            raise FsError(errno.ENODATA, f"xattr {name[:80]!r}", "no such attribute")
        try:
            return await self.meta.getxattr(ino, name)
        except FsError as err:
            if err.errno == errno.ENODATA:
                if len(self._no_xattr) >= NO_XATTR_LIMIT:
                    self._no_xattr.clear()
                self._no_xattr.setdefault(ino, set()).add(name)
            raise

    async def listxattr(self, ino: int, *, privileged: bool = False) -> list[bytes]:
        return xattrs.listed(await self.meta.listxattr(ino), privileged)

    async def removexattr(self, ino: int, name: bytes, *, privileged: bool = False) -> None:
        xattrs.for_caller(ino, name, privileged, writing=True)
        self._no_xattr.pop(ino, None)
        await self.meta.removexattr(ino, name)

    # -- what other mounts changed ----------------------------------------------------------------
    def invalidated(self, inodes: list[int], entries: list[tuple[int, bytes]]) -> None:
        """Another mount changed these (the coordinator's callback): forget what we knew of them."""
        for parent, _name in entries:
            self.known.forget(parent)
        for ino in inodes:
            self._no_xattr.pop(ino, None)

    def forget_caches(self) -> None:
        """After a reconnect: callbacks may have been lost, so trust nothing cached about names."""
        self.known.forget_all()
        self._no_xattr.clear()

    async def statfs(self) -> dict[str, Any]:
        return await self.meta.statfs()
