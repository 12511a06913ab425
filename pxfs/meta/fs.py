"""POSIX semantics over the metadata KV: the one ``Meta`` a volume's coordinator serves.

``Meta`` is pure and synchronous: it checks, resolves and records; it never does I/O beyond its
KV and never touches file contents (those are chunks, named by the block map it keeps). Every
mutation builds one batch and writes it once, so a crash or a failover never shows half an
operation, and the batch is exactly what the coordinator ships to the followers.

Permission checks are not here: mounts run FUSE with ``default_permissions`` and the kernel checks
modes and ownership before any request reaches us.
"""

from __future__ import annotations

import errno
import functools
import logging
import stat
import time
from collections.abc import Callable, Mapping
from typing import ParamSpec, TypeVar

from pxfs.errors import Corrupt, FsError, Invalid
from pxfs.meta import dirs, handles, keys, opids, quota, slices, xattrs
from pxfs.meta.dirs import RENAME_EXCHANGE, RENAME_NOREPLACE
from pxfs.meta.handles import OpenHandles, PendingPurge
from pxfs.meta.keys import HASH_LEN, ROOT_INO, Attr
from pxfs.meta.kv import KV
from pxfs.meta.names import check_name
from pxfs.meta.opids import Op
from pxfs.meta.slices import BlockMap, BlockWrite, as_write
from pxfs.meta.txn import Txn
from pxfs.meta.xattrs import XATTR_CREATE, XATTR_REPLACE

__all__ = ["RENAME_EXCHANGE", "RENAME_NOREPLACE", "XATTR_CREATE", "XATTR_REPLACE", "Attr", "Meta", "Op"]

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

PATH_MAX = 4096
MAX_FILE_SIZE = 2**63 - 1  # off_t

_NODE_TYPES = (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)


def _once(method: Callable[P, T]) -> Callable[P, T]:
    """A mutation whose op id, when recorded, is answered from its record and changes nothing."""

    @functools.wraps(method)
    def run(*args: P.args, **kw: P.kwargs) -> T:
        self, op = args[0], kw.get("op")
        assert isinstance(self, Meta)
        found, attr = opids.find(self.kv, op if isinstance(op, Op) else None)
        if found:
            self.replays += 1
            log.info("mount=%s op answered from its record: a retry", op.mount if isinstance(op, Op) else "")
            return attr  # type: ignore[return-value]  # the recorded result of this very method
        return method(*args, **kw)

    return run


class Meta:
    """A volume's metadata: inodes, directory entries, block maps, xattrs, quota, open counts.

    Every mutation takes ``op`` (who asks, and the op id of this call): with an op id, the answer
    is recorded in the mutation's batch and a repeat of the id gets it back, changing nothing.
    """

    def __init__(
        self, kv: KV, capacity: int, block_size: int, clock: Callable[[], int] = time.time_ns,
        max_inodes: int = 0,
    ) -> None:
        if block_size <= 0:
            raise Invalid("meta", f"block size {block_size} must be positive")
        self.kv = kv
        # Both writable: a volume resize changes the quota in place (pxfs.meta.quota).
        self.capacity = capacity
        self.max_inodes = max_inodes  # 0: no limit
        self.block_size = block_size
        self.clock = clock
        # Open counts are per coordinator process on purpose (see pxfs.meta.handles): after a
        # failover the mounts re-register theirs, and the orphans nobody reopened are freed then.
        self.handles = OpenHandles()
        # Mutations answered from their op record: a coordinator must still see such an answer
        # acknowledged by the replicas before it gives it (the batch may be only on this one yet).
        self.replays = 0

    @property
    def limits(self) -> quota.Limits:
        return quota.Limits(self.capacity, self.max_inodes)

    def _txn(self) -> Txn:
        return Txn(self.kv, self.clock(), self.limits)

    def _is_open(self, ino: int) -> bool:
        return self.handles.is_open(ino)

    @staticmethod
    def _commit(txn: Txn, op: Op | None, attr: Attr | None = None) -> None:
        """Commit a mutation together with its op record (its answer for a retry)."""
        opids.record(txn, op, attr)
        txn.commit()

    # -- inodes ---------------------------------------------------------------------------------
    def init_root(self, uid: int = 0, gid: int = 0, mode: int = 0o755) -> Attr:
        """Create the root directory of a new volume; an existing root is returned untouched.

        A keyspace written before metadata counted against the quota gets its ``metaBytes``
        counted here, once (one scan), so that later frees have something to subtract from.
        """
        txn = self._txn()
        root = txn.find(ROOT_INO)
        if root is not None:
            if self.kv.get(keys.counter_key(keys.META_BYTES)) is None:
                counted = quota.recount(self.kv.scan(keys.INODE_PREFIX))
                txn.put(keys.counter_key(keys.META_BYTES), keys.encode_u64(counted))
                txn.commit()
            return root
        now = txn.now
        root = Attr(ROOT_INO, stat.S_IFDIR | (mode & 0o7777), 2, uid, gid, 0, 0, now, now, now, ROOT_INO)
        txn.save(root)
        txn.put(keys.counter_key(keys.NEXT_INODE), keys.encode_u64(ROOT_INO + 1))
        txn.put(keys.counter_key(keys.META_BYTES), keys.encode_u64(0))
        txn.add_counter(keys.INODES, 1)
        txn.commit()
        return root

    def getattr(self, ino: int) -> Attr:
        return self._txn().attr(ino)

    def lookup(self, parent: int, name: bytes) -> Attr:
        txn = self._txn()
        d = txn.dir(parent)
        if name == b".":
            return d
        if name == b"..":
            return txn.attr(d.parent)
        return txn.child(parent, name)

    def _create(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> tuple[Txn, Attr]:
        """Common part of every create: checks, SGID inheritance, entry, parent times."""
        check_name(name, creating=True)
        txn = self._txn()
        p = txn.dir(parent)
        if txn.lookup(parent, name) is not None:
            raise FsError(errno.EEXIST, repr(name), "entry exists")
        is_dir = stat.S_ISDIR(mode)
        if p.mode & stat.S_ISGID:
            gid = p.gid
            if is_dir:
                mode |= stat.S_ISGID
        a = txn.new_inode(mode, uid, gid, rdev, parent if is_dir else 0)
        xattrs.inherit(txn, p, a)
        if is_dir:
            a.nlink = 2
            p.nlink += 1
        txn.link_entry(parent, name, a)
        txn.touch_dir(p)
        return txn, a

    @_once
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
              *, op: Op | None = None) -> Attr:
        """Regular files, FIFOs, sockets and devices (a type of 0 means a regular file, as mknod(2))."""
        ftype = stat.S_IFMT(mode) or stat.S_IFREG
        if ftype not in _NODE_TYPES:
            raise FsError(errno.EINVAL, repr(name), f"mknod cannot create type {ftype:#o}")
        if ftype not in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = 0
        txn, a = self._create(parent, name, ftype | (mode & 0o7777), uid, gid, rdev)
        self._commit(txn, op, a)
        return a

    @_once
    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int, *, op: Op | None = None) -> Attr:
        txn, a = self._create(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)
        self._commit(txn, op, a)
        return a

    @_once
    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int, *, op: Op | None = None) -> Attr:
        if not target:
            raise FsError(errno.ENOENT, repr(name), "empty symlink target")
        if b"\0" in target:
            raise FsError(errno.EINVAL, repr(name), "NUL byte in symlink target")
        if len(target) >= PATH_MAX:
            raise FsError(errno.ENAMETOOLONG, repr(name), "symlink target too long")
        txn, a = self._create(parent, name, stat.S_IFLNK | 0o777, uid, gid)
        a.size = len(target)
        txn.put(keys.symlink_key(a.ino), target)
        self._commit(txn, op, a)
        return a

    def readlink(self, ino: int) -> bytes:
        txn = self._txn()
        a = txn.attr(ino)
        if not stat.S_ISLNK(a.mode):
            raise FsError(errno.EINVAL, f"inode {ino}", "not a symlink")
        target = txn.get(keys.symlink_key(ino))
        if target is None:
            raise FsError(errno.EIO, f"inode {ino}", "symlink without target")
        return target

    # -- names ----------------------------------------------------------------------------------
    @_once
    def link(self, ino: int, new_parent: int, new_name: bytes, *, op: Op | None = None) -> Attr:
        txn = self._txn()
        a = dirs.link(txn, ino, new_parent, new_name)
        self._commit(txn, op, a)
        return a

    @_once
    def unlink(self, parent: int, name: bytes, *, op: Op | None = None) -> None:
        txn = self._txn()
        dirs.unlink(txn, parent, name, self._is_open)
        self._commit(txn, op)

    @_once
    def rmdir(self, parent: int, name: bytes, *, op: Op | None = None) -> None:
        txn = self._txn()
        dirs.rmdir(txn, parent, name)
        self._commit(txn, op)

    @_once
    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0,
               *, op: Op | None = None) -> None:
        """Atomic rename (see ``dirs.rename``); flags are RENAME_NOREPLACE and RENAME_EXCHANGE."""
        txn = self._txn()
        dirs.rename(txn, parent, name, new_parent, new_name, flags, self._is_open)
        self._commit(txn, op)

    def readdir(self, ino: int, after: bytes = b"", limit: int = 1000) -> list[tuple[bytes, Attr]]:
        """Entries in byte order strictly after ``after``: a stable cursor across calls and renames."""
        txn = self._txn()
        txn.dir(ino)
        prefix = keys.dentry_prefix(ino)
        start = prefix + after + b"\0" if after else None
        out = []
        for key, value in self.kv.scan(prefix, start, limit):
            out.append((key[len(prefix) :], txn.attr(keys.decode_dentry(value)[0])))
        return out

    # -- attributes -----------------------------------------------------------------------------
    @_once
    def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
        op: Op | None = None,
    ) -> Attr:
        """Change attributes; a size change truncates or sparsely extends the block map."""
        txn = self._txn()
        a = txn.attr(ino)
        if mode is not None:
            a.mode = stat.S_IFMT(a.mode) | (mode & 0o7777)
            xattrs.chmod(txn, a)
        if uid is not None:
            a.uid = uid
        if gid is not None:
            a.gid = gid
        if size is not None:
            if stat.S_ISDIR(a.mode):
                raise FsError(errno.EISDIR, f"inode {ino}", "cannot truncate a directory")
            if not stat.S_ISREG(a.mode):
                raise FsError(errno.EINVAL, f"inode {ino}", "cannot truncate a special file")
            if size < 0:
                raise FsError(errno.EINVAL, f"inode {ino}", f"negative size {size}")
            if size > MAX_FILE_SIZE:
                raise FsError(errno.EFBIG, f"inode {ino}", f"size {size} beyond the largest file (2^63-1)")
            if size < a.size:
                self._cut_blocks(txn, ino, size)
            a.size = size
            a.mtime_ns = txn.now
        if atime_ns is not None:
            a.atime_ns = atime_ns
        if mtime_ns is not None:
            a.mtime_ns = mtime_ns
        txn.save(a)
        if ctime_ns is not None:
            a.ctime_ns = ctime_ns
        self._commit(txn, op, a)
        return a

    def cut_ahead(self, ino: int, size: int, limit: int = 0) -> int:
        """Before a truncate to ``size`` that would drop more than PURGE_BATCH block entries: drop
        up to ``limit`` of the blocks wholly past ``size``, the size unchanged, as one batch;
        returns how many (0: few enough are left for the truncate's own batch).

        The coordinator calls it until it returns 0 and then truncates (``setattr``): each batch
        bounded. Until the size changes a reader sees zeros where the cut is going, and a truncate
        that fails on the way leaves them (a retry finishes it): only bytes it was told to drop.
        """
        limit = limit or keys.PURGE_BATCH
        txn = self._txn()
        a = txn.attr(ino)
        if not stat.S_ISREG(a.mode) or not 0 <= size < a.size:
            return 0  # nothing to cut, or a truncate setattr refuses with its own errno
        first = keys.block_key(ino, -(-size // self.block_size))
        past = list(self.kv.scan(keys.block_prefix(ino), first, keys.PURGE_BATCH + 1))
        if len(past) <= keys.PURGE_BATCH:
            return 0
        freed = 0
        for key, value in past[:limit]:
            freed += slices.extent(keys.decode_block(value))
            txn.delete(key)
        txn.add_counter(keys.USED_BYTES, -freed)
        txn.commit()
        return min(limit, len(past))

    def _cut_blocks(self, txn: Txn, ino: int, size: int) -> None:
        """Drop block entries past ``size``; a block cut in the middle keeps its chunk, shorter."""
        bs = self.block_size
        first = size // bs
        freed = 0
        for key, value in self.kv.scan(keys.block_prefix(ino), keys.block_key(ino, first)):
            idx = keys.block_idx(key)
            block = keys.decode_block(value)
            kept = slices.cut(block, size - idx * bs)
            freed += slices.extent(block) - slices.extent(kept)
            if kept:
                txn.put(key, keys.encode_block(kept))
            else:
                txn.delete(key)
        if freed:
            txn.add_counter(keys.USED_BYTES, -freed)

    # -- xattrs (namespaces and their rules: pxfs.meta.xattrs) ----------------------------------
    @_once
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0, *, op: Op | None = None) -> None:
        txn = self._txn()
        xattrs.set_xattr(txn, ino, name, value, flags)
        self._commit(txn, op)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        return xattrs.get_xattr(self._txn(), ino, name)

    def listxattr(self, ino: int) -> list[bytes]:
        """Every name, ``trusted.*`` included: the mount filters for its caller (``xattrs.listed``)."""
        return xattrs.list_xattrs(self._txn(), ino)

    @_once
    def removexattr(self, ino: int, name: bytes, *, op: Op | None = None) -> None:
        txn = self._txn()
        xattrs.remove_xattr(txn, ino, name)
        self._commit(txn, op)

    # -- data -----------------------------------------------------------------------------------
    def get_blocks(self, ino: int) -> tuple[Attr, BlockMap]:
        """Attrs and block map {index: slices}; indexes missing from the map are holes."""
        a = self._txn().attr(ino)
        blocks = {keys.block_idx(k): keys.decode_block(v) for k, v in self.kv.scan(keys.block_prefix(ino))}
        return a, blocks

    def block_page(self, ino: int, start: int, limit: int) -> tuple[Attr, BlockMap, bool]:
        """Attrs and up to ``limit`` block map entries from index ``start`` on; True when more follow."""
        a = self._txn().attr(ino)
        page = list(self.kv.scan(keys.block_prefix(ino), keys.block_key(ino, max(0, start)), max(1, limit) + 1))
        more = len(page) > max(1, limit)
        return a, {keys.block_idx(k): keys.decode_block(v) for k, v in page[: max(1, limit)]}, more

    @_once
    def commit_blocks(
        self, ino: int, blocks: Mapping[int, BlockWrite | tuple[bytes, int]], size: int,
        mtime_ns: int | None = None, dry_run: bool = False, *, op: Op | None = None,
    ) -> Attr:
        """Record written blocks and the new size; ENOSPC (nothing changed) past the quota.

        Each write replaces a block's slices, or adds slices over them (``BlockWrite``); a
        ``(hash, length)`` pair is a whole block of one chunk, and a length of 0 punches a hole. A
        block may not reach past the resulting size: that would be a block the file cannot show,
        counted against the quota. ``dry_run`` checks all of that and writes nothing (the
        coordinator judges a commit before it makes replicas fetch chunks).
        """
        txn = self._txn()
        a = txn.attr(ino)
        if stat.S_ISDIR(a.mode):
            raise FsError(errno.EISDIR, f"inode {ino}", "a directory has no blocks")
        if not stat.S_ISREG(a.mode):
            raise FsError(errno.EINVAL, f"inode {ino}", "not a regular file")
        if size > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, f"inode {ino}", f"size {size} beyond the largest file (2^63-1)")
        new_size = max(a.size, size)
        bs = self.block_size
        delta = 0
        for idx, w in sorted(blocks.items()):
            w = w if isinstance(w, BlockWrite) else as_write(w)
            ss = w.slices
            for digest, off, length in ss:
                if idx < 0 or off < 0 or length < 0 or off + length > bs or len(digest) != HASH_LEN:
                    raise FsError(errno.EINVAL, f"inode {ino}", f"bad slice of block {idx} ({length} bytes at {off})")
            key = keys.block_key(ino, idx)
            raw = txn.get(key)
            if w.append:
                new = slices.add(keys.decode_block(raw) if raw is not None else (), ss)
            else:  # the common case, a block written whole: one slice, nothing to hide
                new = ss if len(ss) == 1 and ss[0][2] > 0 else slices.add((), ss)
            if len(new) > slices.MAX_SLICES:
                raise FsError(errno.EINVAL, f"inode {ino}", f"block {idx} would hold {len(new)} slices "
                              f"(at most {slices.MAX_SLICES}): write it whole")
            length = slices.extent(new)
            if idx * bs + length > new_size:
                raise FsError(errno.EINVAL, f"inode {ino}", f"block {idx} reaches past size {new_size}")
            if raw is not None:
                delta -= keys.block_length(raw)
            if new:
                txn.put(key, keys.encode_block(new))
            else:
                txn.delete(key)
            delta += length
        if delta > 0:
            quota.check_space(self.limits, txn.counter(keys.USED_BYTES), txn.counter(keys.META_BYTES),
                              delta, 0, f"inode {ino}")
        if delta:
            txn.add_counter(keys.USED_BYTES, delta)
        a.size = new_size
        a.mtime_ns = txn.now if mtime_ns is None else mtime_ns
        if dry_run:
            return a
        txn.save(a)
        self._commit(txn, op, a)
        return a

    def chunk_refs(self) -> dict[bytes, int]:
        """Every chunk the volume's block maps name, with its size in use (for repair and scrub)."""
        refs: dict[bytes, int] = {}
        for _key, block in keys.block_entries(self.kv.scan(keys.INODE_PREFIX)):
            for digest, _off, length in block:
                refs[digest] = max(refs.get(digest, 0), length)
        return refs

    def locate_chunks(self, hashes: set[bytes]) -> list[tuple[bytes, bytes, int, int]]:
        """(hash, path, offset, length) of every block that uses one of ``hashes``, in (path, offset)
        order: scrub's report. It reads the keyspace in two scans and nothing else, so it may run in
        a worker thread while the volume is served: each scan is one RocksDB iterator, one point in
        time (a file renamed between the two is named where the second found it)."""
        found: list[tuple[int, int, bytes, int]] = []  # (ino, offset in the file, hash, length)
        for key, block in keys.block_entries(self.kv.scan(keys.INODE_PREFIX)):
            for digest, off, length in block:
                if digest in hashes:
                    found.append((key.ino, key.idx * self.block_size + off, digest, length))
        if not found:
            return []
        files = {ino for ino, _idx, _h, _n in found}
        names: dict[int, tuple[int, bytes]] = {}  # every directory and the files found: (parent, name)
        for raw, value in self.kv.scan(keys.INODE_PREFIX):
            if raw[9:10] != b"D":  # the cheap test first: most inode keys are not entries
                continue
            try:
                entry = keys.decode_key(raw)
                child, ftype = keys.decode_dentry(value)
            except Corrupt:
                continue  # fsck's to report
            if isinstance(entry, keys.DentryKey) and (ftype == stat.S_IFDIR or child in files):
                names.setdefault(child, (entry.parent, entry.name))

        def path(ino: int) -> bytes:
            parts: list[bytes] = []
            at = ino
            while at != ROOT_INO:
                if at not in names or len(parts) > len(names):  # unnamed, or a cycle cut off from the root
                    return f"<orphan ino {ino}>".encode()
                at, name = names[at]
                parts.append(name)
            return b"/" + b"/".join(reversed(parts))

        paths = {ino: path(ino) for ino in files}
        out = [(digest, paths[ino], offset, length) for ino, offset, digest, length in found]
        return sorted(out, key=lambda p: (p[1], p[2]))

    def statfs(self) -> dict[str, int]:
        def counter(name: bytes) -> int:
            return keys.decode_u64(self.kv.get(keys.counter_key(name)))

        return {
            "capacity": self.capacity,
            "used": counter(keys.USED_BYTES),  # file data; metadata is meta_bytes, both count
            "inodes": counter(keys.INODES),
            "block_size": self.block_size,
            "max_inodes": self.max_inodes,
            "meta_bytes": counter(keys.META_BYTES),
        }

    # -- open files (counts in memory, see pxfs.meta.handles) -----------------------------------
    def open(self, ino: int, mount: str = "") -> Attr:
        """Count an open handle: an unlinked file lives on (as an orphan) until its last release."""
        a = self.getattr(ino)
        self.handles.hold(mount, ino)
        return a

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, *, op: Op | None = None) -> Attr:
        """open(O_CREAT) of a new regular file: mknod and one open handle, in one call."""
        if not stat.S_ISREG(mode):
            raise FsError(errno.EINVAL, f"name {name[:80]!r}", "create makes regular files only")
        a = self.mknod(parent, name, mode, 0, uid, gid, op=op)
        # A replayed create still owes the caller its handle, unless this coordinator counted it.
        self.handles.hold(op.mount if op else "", a.ino, op.id if op else b"")
        return a

    def release(self, ino: int, mount: str = "") -> None:
        if self.handles.drop(mount, ino):
            handles.free_unopened(self._txn(), self.handles, [ino])

    def reopen(self, mount: str, inos: list[int]) -> list[int]:
        """``mount`` (re)connected holding exactly ``inos`` (one per handle); returns the inodes gone.

        This is how a new coordinator learns the handles a failover took from it, and what settles
        the mount for a deferred orphan purge. A handle of an inode that no longer exists is
        dropped: its file was freed, the mount's handle is stale.
        """
        return handles.reopen(self._txn(), self.handles, mount, inos)

    def forget_mount(self, mount: str) -> None:
        """``mount`` is gone (detached, or its registration expired): its handles and op records go."""
        txn = self._txn()
        for key in opids.ring_keys(self.kv, mount):
            txn.delete(key)
        if self.handles.pending is not None:
            self.handles.pending.reconnected(mount)  # it holds nothing any more: settled
        handles.free_unopened(txn, self.handles, self.handles.forget(mount))

    def forget_stale_mounts(self, live: list[str], limit: int = 16) -> int:
        """Drop the op records of up to ``limit`` mounts not in ``live`` (one batch); returns how many.

        For mounts that went without detaching. ``live`` must name every mount that may still retry.
        """
        txn = self._txn()
        stale = opids.stale_mounts(self.kv, live, limit)
        for prefix in stale:
            for key, _ in self.kv.scan(prefix):
                txn.delete(key)
        txn.commit()
        return len(stale)

    def defer_orphan_purge(self, registered: Mapping[str, float] | None, ttl: float,
                           clock: Callable[[], float]) -> None:
        """A new coordinator's hook, in place of ``purge_orphans()`` at once: free orphans only once
        every mount in ``registered`` (mount id -> last renewal of its registration, on ``clock``)
        reconnected (``reopen``) or ``ttl`` passed since that renewal; ``purge_due`` then frees
        those nobody reopened. Until then nothing is freed: any inode may still be open somewhere.
        ``registered`` None: not read yet, given later to ``mounts_registered``.
        """
        self.handles.pending = PendingPurge(registered, ttl, clock)

    def mounts_registered(self, registered: Mapping[str, float]) -> None:
        """The mounts registered for the volume, for a purge deferred before they were read."""
        if self.handles.pending is not None:
            self.handles.pending.learn(registered)

    def purge_pending(self) -> bool | None:
        """None: no deferred purge; False: one that still needs ``mounts_registered``; True: one waiting."""
        pending = self.handles.pending
        return None if pending is None else pending.known

    def purge_due(self) -> int:
        """Run a deferred purge once every mount it waits for settled, one bounded batch per call;
        returns the orphans freed (the purge stays due until a batch finds none left).

        The coordinator calls this periodically, through its call path so that the batch replicates.
        """
        pending = self.handles.pending
        if pending is None or pending.waiting() != []:
            return 0
        freed, more = handles.purge_orphans(self._txn(), self.handles)
        if not more:
            self.handles.pending = None
        return freed

    def purge_orphans(self) -> int:
        """Free every orphan no handle counted here holds, in bounded batches; returns how many."""
        total = 0
        while True:
            freed, more = handles.purge_orphans(self._txn(), self.handles)
            total += freed
            if not more:
                return total

    # -- the purge list: block entries of freed inodes, PURGE_BATCH per batch -------------------
    def purging(self) -> bool:
        """Block entries of freed inodes wait on the purge list (``purge_step`` deletes them)."""
        return any(True for _ in self.kv.scan(keys.PURGE_PREFIX, limit=1))

    def purge_step(self, limit: int = 0) -> int:
        """Delete up to ``limit`` block entries of inodes on the purge list, as one batch; returns
        the keys it deleted (0: the list is empty). The coordinator calls it until it returns 0,
        through its call path, so that each batch replicates like any other."""
        limit = limit or keys.PURGE_BATCH
        txn = self._txn()
        done = freed = 0
        for raw, _ in self.kv.scan(keys.PURGE_PREFIX):
            key = keys.decode_key(raw)
            assert isinstance(key, keys.PurgeKey)
            if txn.find(key.ino) is not None:
                # A live inode is never purged: a mark beside an attr is damage (fsck reports it).
                log.warning("inode %d is on the purge list but has an attr: mark dropped, blocks kept", key.ino)
                txn.delete(raw)
                done += 1
                continue
            entries = list(self.kv.scan(keys.block_prefix(key.ino), limit=limit - done))
            for bkey, value in entries:
                freed += slices.extent(keys.decode_block(value))
                txn.delete(bkey)
            done += len(entries)
            if done < limit:
                txn.delete(raw)  # none left
                done += 1
            if done >= limit:
                break
        if freed:
            txn.add_counter(keys.USED_BYTES, -freed)
        txn.commit()
        return done
