"""One metadata mutation in the making: reads that see its own writes, committed as one batch.

POSIX operations touch the same record more than once (a rename inside one directory updates the
parent twice, a rename over a hard link of itself meets the same inode twice). Reading through
the pending writes keeps each step simple and still yields exactly one atomic ``KV.write``.
"""

from __future__ import annotations

import errno
import stat

from pxfs.errors import FsError
from pxfs.meta import keys, quota, slices
from pxfs.meta.keys import Attr
from pxfs.meta.kv import KV, Batch
from pxfs.meta.names import check_length


class Txn:
    """Pending writes over a KV plus a cache of the attrs read or changed so far."""

    def __init__(self, kv: KV, now: int, limits: quota.Limits | None = None) -> None:
        self.kv = kv
        self.now = now
        self.limits = limits  # None: no quota (fsck, tools)
        self._pending: dict[bytes, bytes | None] = {}
        self._attrs: dict[int, Attr | None] = {}
        self._dirty: set[int] = set()

    @property
    def size(self) -> int:
        """Keys written so far: what bounds one batch."""
        return len(self._pending)

    # -- raw keys -------------------------------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        if key in self._pending:
            return self._pending[key]
        return self.kv.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self._pending[key] = value

    def delete(self, key: bytes) -> None:
        self._pending[key] = None

    def add_counter(self, name: bytes, delta: int) -> int:
        key = keys.counter_key(name)
        value = keys.decode_u64(self.get(key)) + delta
        self.put(key, keys.encode_u64(value))
        return value

    # -- inodes ---------------------------------------------------------------------------------
    def find(self, ino: int) -> Attr | None:
        if ino not in self._attrs:
            raw = self.kv.get(keys.attr_key(ino))
            self._attrs[ino] = keys.decode_attr(ino, raw) if raw is not None else None
        return self._attrs[ino]

    def attr(self, ino: int) -> Attr:
        """The inode's attrs (ENOENT if it does not exist); mutate, then ``save``."""
        a = self.find(ino)
        if a is None:
            raise FsError(errno.ENOENT, f"inode {ino}", "no such inode")
        return a

    def dir(self, ino: int) -> Attr:
        a = self.attr(ino)
        if not stat.S_ISDIR(a.mode):
            raise FsError(errno.ENOTDIR, f"inode {ino}", "not a directory")
        return a

    def save(self, a: Attr, ctime: bool = True) -> None:
        if ctime:
            a.ctime_ns = self.now
        self._attrs[a.ino] = a
        self._dirty.add(a.ino)

    def touch_dir(self, a: Attr) -> None:
        """A directory whose entries changed: new mtime and ctime."""
        a.mtime_ns = self.now
        self.save(a)

    def new_inode(self, mode: int, uid: int, gid: int, rdev: int = 0, parent: int = 0) -> Attr:
        inodes = self.add_counter(keys.INODES, 1)
        if self.limits is not None:
            quota.check_inodes(self.limits, inodes, "new inode")
        ino = self.add_counter(keys.NEXT_INODE, 1) - 1
        a = Attr(ino, mode, 1, uid, gid, rdev, 0, self.now, self.now, self.now, parent)
        self.save(a)
        return a

    def purge(self, a: Attr) -> None:
        """Delete every key of the inode, its orphan mark, and its share of the counters.

        An inode with more than PURGE_BATCH block entries loses everything but them here, and goes
        on the purge list: its block entries go in later batches (``Meta.purge_step``), so that no
        batch (and no stall of the coordinator's loop) grows with the size of a file.
        """
        prefix = keys.inode_prefix(a.ino)
        blocks = keys.block_prefix(a.ino)
        if sum(1 for _ in self.kv.scan(blocks, limit=keys.PURGE_BATCH + 1)) > keys.PURGE_BATCH:
            for key, _ in self.kv.scan(prefix, start=prefix + b"D"):  # past the C range: not the blocks
                self.delete(key)
            self.put(keys.purge_key(a.ino), b"")
            self._forget(a)
            return
        used = 0
        for key, value in self.kv.scan(prefix):
            if key.startswith(blocks):
                used += slices.extent(keys.decode_block(value))
            self.delete(key)
        self._forget(a)
        if used:
            self.add_counter(keys.USED_BYTES, -used)

    def _forget(self, a: Attr) -> None:
        prefix = keys.inode_prefix(a.ino)
        for key in [k for k in self._pending if k.startswith(prefix)]:
            self.delete(key)
        self.delete(keys.orphan_key(a.ino))
        self._attrs[a.ino] = None
        self._dirty.discard(a.ino)
        self.add_counter(keys.INODES, -1)

    def drop_link(self, a: Attr, is_open: bool) -> None:
        """One name of ``a`` is gone: free it at its last link, or orphan it while still open."""
        if stat.S_ISDIR(a.mode):
            self.purge(a)
            return
        a.nlink -= 1
        if a.nlink > 0:
            self.save(a)
        elif is_open:
            self.save(a)
            self.put(keys.orphan_key(a.ino), b"")
        else:
            self.purge(a)

    # -- directory entries ----------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> int | None:
        """The inode ``name`` in ``parent`` names: every name a request carries passes here."""
        check_length(name)
        raw = self.get(keys.dentry_key(parent, name))
        return keys.decode_dentry(raw)[0] if raw is not None else None

    def child(self, parent: int, name: bytes) -> Attr:
        ino = self.lookup(parent, name)
        if ino is None:
            raise FsError(errno.ENOENT, repr(name), "no such entry")
        return self.attr(ino)

    def link_entry(self, parent: int, name: bytes, a: Attr) -> None:
        self.put(keys.dentry_key(parent, name), keys.encode_dentry(a.ino, a.mode))

    def unlink_entry(self, parent: int, name: bytes) -> None:
        self.delete(keys.dentry_key(parent, name))

    def is_empty_dir(self, ino: int) -> bool:
        """No entries in ``ino``, counting this transaction's own writes."""
        prefix = keys.dentry_prefix(ino)
        if any(k.startswith(prefix) and v is not None for k, v in self._pending.items()):
            return False
        return all(self._pending.get(k, b"") is None for k, _ in self.kv.scan(prefix))

    # -- commit ---------------------------------------------------------------------------------
    def counter(self, name: bytes) -> int:
        return keys.decode_u64(self.get(keys.counter_key(name)))

    def commit(self) -> int:
        """Write everything as one batch; returns the KV sequence number (unchanged if no-op).

        The metadata bytes the batch adds or frees go to their counter here, once for every kind
        of mutation; growth past the quota is NoSpace with nothing written.
        """
        for ino in self._dirty:
            a = self._attrs[ino]
            assert a is not None
            self.put(keys.attr_key(ino), keys.encode_attr(a))
        if not self._pending:
            return self.kv.seq
        grown, what = quota.meta_delta(self._pending, self.kv.get)
        if grown:
            meta = self.counter(keys.META_BYTES)
            if self.limits is not None:
                quota.check_space(self.limits, self.counter(keys.USED_BYTES), meta, 0, grown, what)
            # max(): a keyspace from before the counter; Meta.init_root counts it, this is only a guard.
            self.put(keys.counter_key(keys.META_BYTES), keys.encode_u64(max(0, meta + grown)))
        batch = Batch()
        for key, value in self._pending.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        return self.kv.write(batch)
