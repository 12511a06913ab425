"""pyfuse3 ``Operations``: each FUSE request becomes one ``Vfs`` call; failures become an errno.

No filesystem logic lives here: names, permissions (the mount uses ``default_permissions``, so the
kernel checks modes), sizes and data are the vfs's and the metadata's business. What this layer owns
is the FUSE protocol: EntryAttributes, kernel lookup counts, directory-listing snapshots, statfs.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections import Counter
from collections.abc import Sequence

import pyfuse3
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, RequestContext, SetattrFields, StatvfsData

from pxfs.errors import FsError
from pxfs.fuse.errors import OpTimer, fuse_op
from pxfs.meta.names import NAME_MAX
from pxfs.model import Attr
from pxfs.vfs.vfs import Vfs

log = logging.getLogger(__name__)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


def _privileged(ctx: RequestContext) -> bool:
    """CAP_SYS_ADMIN, as far as FUSE tells: the request comes from uid 0 (of the mount's namespace)."""
    return ctx.uid == 0


class Operations(pyfuse3.Operations):
    # The kernel writeback cache would make the kernel the owner of size and mtime between flushes,
    # which breaks close-to-open coherence between mounts on different hosts.
    enable_writeback_cache = False
    # FUSE_POSIX_ACL: the kernel checks access against system.posix_acl_* (read from us, cached) as
    # well as the mode; keeping ACLs and mode in step is the metadata's (pxfs.meta.xattrs). Without
    # FUSE_DONT_MASK (pyfuse3 does not ask for it) the kernel applies the umask to a create even
    # under a default ACL, which POSIX says should replace it.
    enable_acl = True
    supports_dot_lookup = True

    def __init__(self, vfs: Vfs, *, attr_timeout: float = 1.0, entry_timeout: float = 1.0,
                 read_only: bool = False, op_timer: OpTimer | None = None) -> None:
        super().__init__()
        self.vfs = vfs
        self.op_timer = op_timer  # every handler's duration goes here (fuse_op)
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.read_only = read_only
        self.lookups: Counter[int] = Counter()  # kernel lookup counts, per pyfuse3's contract
        self._dirs: dict[int, list[tuple[bytes, Attr]]] = {}
        self._next_dir_fh = itertools.count(1)

    # -- helpers --------------------------------------------------------------------------------
    def _entry(self, a: Attr) -> EntryAttributes:
        e = EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = self.vfs.block_size
        e.st_blocks = (a.size + 511) // 512
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        e.attr_timeout = self.attr_timeout
        e.entry_timeout = self.entry_timeout
        return e

    def _looked_up(self, a: Attr) -> EntryAttributes:
        """An entry handed to the kernel: it now holds one more reference (until ``forget``)."""
        self.lookups[a.ino] += 1
        return self._entry(a)

    def _writable(self) -> None:
        if self.read_only:
            raise FUSEError(errno.EROFS)

    # -- names ----------------------------------------------------------------------------------
    @fuse_op
    async def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        try:
            a = await self.vfs.lookup(parent_inode, name)
        except FsError as err:
            if err.errno != errno.ENOENT:
                raise
            # A negative entry the kernel may keep (inode 0): the coordinator's invalidation
            # reaches us when another mount creates the name.
            e = EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = self.entry_timeout
            return e
        return self._looked_up(a)

    async def invalidate(self, inodes: list[int], entries: list[tuple[int, bytes]]) -> None:
        """Another mount changed these: make the kernel ask again instead of using its cache."""
        self.vfs.invalidated(inodes, entries)
        for parent, name in entries:
            if parent in self.lookups or parent == pyfuse3.ROOT_INODE:
                pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
        for ino in inodes:
            if ino in self.lookups or ino == pyfuse3.ROOT_INODE:
                try:
                    # Attributes only: the page cache is dropped at open (close-to-open) anyway,
                    # and invalidating pages could wait on a read this process has to answer.
                    pyfuse3.invalidate_inode(ino, attr_only=True)
                except OSError as err:
                    log.debug("invalidate inode=%d: %s", ino, err)

    def forget_attributes(self) -> None:
        """After a reconnect: what other mounts changed meanwhile may never have been called back
        (the new coordinator did not know this mount yet), so the kernel asks again for every inode."""
        for ino in [pyfuse3.ROOT_INODE, *self.lookups]:
            try:
                pyfuse3.invalidate_inode(ino, attr_only=True)  # attributes only, as in invalidate()
            except OSError as err:
                log.debug("invalidate inode=%d: %s", ino, err)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Nothing to free here: open data is released by release(), orphans by the metadata.
        for ino, n in inode_list:
            left = self.lookups[ino] - n
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)

    @fuse_op
    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        return self._entry(await self.vfs.getattr(inode))

    @fuse_op
    async def setattr(self, inode: int, attr: EntryAttributes, fields: SetattrFields, fh: int | None,
                      ctx: RequestContext) -> EntryAttributes:
        self._writable()
        a = await self.vfs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        return self._entry(a)

    @fuse_op
    async def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        return await self.vfs.readlink(inode)

    @fuse_op
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: RequestContext) -> EntryAttributes:
        self._writable()
        return self._looked_up(await self.vfs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @fuse_op
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: RequestContext) -> EntryAttributes:
        self._writable()
        return self._looked_up(await self.vfs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @fuse_op
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: RequestContext) -> EntryAttributes:
        self._writable()
        return self._looked_up(await self.vfs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @fuse_op
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: RequestContext) -> EntryAttributes:
        self._writable()
        return self._looked_up(await self.vfs.link(inode, new_parent_inode, new_name))

    @fuse_op
    async def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self._writable()
        await self.vfs.unlink(parent_inode, name)

    @fuse_op
    async def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self._writable()
        await self.vfs.rmdir(parent_inode, name)

    @fuse_op
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: RequestContext) -> None:
        self._writable()
        await self.vfs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # -- files ----------------------------------------------------------------------------------
    @fuse_op
    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        if flags & _WRITE_FLAGS:
            self._writable()
        return FileInfo(fh=await self.vfs.open(inode, flags))

    @fuse_op
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        self._writable()
        fh, a = await self.vfs.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return FileInfo(fh=fh), self._looked_up(a)

    @fuse_op
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.vfs.read(fh, off, size)

    @fuse_op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._writable()
        return await self.vfs.write(fh, off, buf)

    @fuse_op
    async def flush(self, fh: int) -> None:
        await self.vfs.flush(fh)

    @fuse_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.vfs.fsync(fh)

    @fuse_op
    async def release(self, fh: int) -> None:
        await self.vfs.release(fh)

    # -- directories ----------------------------------------------------------------------------
    @fuse_op
    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        # A snapshot per handle: offsets into it stay valid while entries come and go, so a listing
        # never skips or repeats a name (pyfuse3's readdir contract).
        entries = [(b".", await self.vfs.getattr(inode)), (b"..", await self.vfs.lookup(inode, b".."))]
        after = b""
        while True:
            page = await self.vfs.readdir(inode, after)
            entries.extend(page)
            if not page:
                break
            after = page[-1][0]
        fh = next(self._next_dir_fh)
        self._dirs[fh] = entries
        return fh

    @fuse_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise FUSEError(errno.EBADF)
        for i in range(start_id, len(entries)):
            name, a = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._entry(a), i + 1):
                break
            if name not in (b".", b".."):
                self.lookups[a.ino] += 1

    @fuse_op
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @fuse_op
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass  # every metadata operation is committed before it returns

    # -- xattrs ---------------------------------------------------------------------------------
    @fuse_op
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: RequestContext) -> None:
        self._writable()
        # pyfuse3 checks XATTR_CREATE / XATTR_REPLACE itself (through getxattr) before calling us.
        await self.vfs.setxattr(inode, name, value, 0, privileged=_privileged(ctx))

    @fuse_op
    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        return await self.vfs.getxattr(inode, name, privileged=_privileged(ctx))

    @fuse_op
    async def listxattr(self, inode: int, ctx: RequestContext) -> Sequence[bytes]:
        return await self.vfs.listxattr(inode, privileged=_privileged(ctx))

    @fuse_op
    async def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        self._writable()
        await self.vfs.removexattr(inode, name, privileged=_privileged(ctx))

    # -- the volume -----------------------------------------------------------------------------
    @fuse_op
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        info = await self.vfs.statfs()
        bsize = int(info.get("block_size") or self.vfs.block_size)
        capacity = int(info.get("capacity", 0))
        # Metadata (names, xattrs, symlink targets) takes its share of the quota, as data does.
        free = max(0, capacity - int(info.get("used", 0)) - int(info.get("meta_bytes", 0)))
        s = StatvfsData()
        s.f_bsize = bsize
        s.f_frsize = bsize
        s.f_blocks = capacity // bsize
        s.f_bfree = s.f_bavail = free // bsize
        inodes, max_inodes = int(info.get("inodes", 0)), int(info.get("max_inodes", 0))
        # Without an inode limit (a Meta of tests and tools) report a large, constant free count.
        s.f_ffree = s.f_favail = max(0, max_inodes - inodes) if max_inodes else 1 << 32
        s.f_files = max_inodes or inodes + s.f_ffree
        s.f_namemax = NAME_MAX
        return s

    @fuse_op
    async def access(self, inode: int, mode: int, ctx: RequestContext) -> bool:
        return True  # the mount uses default_permissions: the kernel has checked already
