"""Name-space changes that remove or move entries: link, unlink, rmdir and rename.

Each function fills one ``Txn`` and leaves committing to the caller, so an operation either
happens completely or not at all. The error order follows Linux ``renameat2``/``unlinkat`` so
that callers see the errno a local filesystem would give.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable

from pxfs.errors import FsError
from pxfs.meta.keys import ROOT_INO, Attr
from pxfs.meta.names import check_name
from pxfs.meta.txn import Txn

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

IsOpen = Callable[[int], bool]


def link(txn: Txn, ino: int, new_parent: int, new_name: bytes) -> Attr:
    """A new name for an existing non-directory."""
    check_name(new_name, creating=True)
    a = txn.attr(ino)
    parent = txn.dir(new_parent)
    if txn.lookup(new_parent, new_name) is not None:
        raise FsError(errno.EEXIST, repr(new_name), "entry exists")
    if stat.S_ISDIR(a.mode):
        raise FsError(errno.EPERM, f"inode {ino}", "cannot hard-link a directory")
    if a.nlink == 0:
        raise FsError(errno.ENOENT, f"inode {ino}", "inode was unlinked")
    a.nlink += 1
    txn.save(a)
    txn.link_entry(new_parent, new_name, a)
    txn.touch_dir(parent)
    return a


def unlink(txn: Txn, parent_ino: int, name: bytes, is_open: IsOpen) -> None:
    check_name(name)
    parent = txn.dir(parent_ino)
    a = txn.child(parent_ino, name)
    if stat.S_ISDIR(a.mode):
        raise FsError(errno.EISDIR, repr(name), "is a directory")
    txn.unlink_entry(parent_ino, name)
    txn.touch_dir(parent)
    txn.drop_link(a, is_open(a.ino))


def rmdir(txn: Txn, parent_ino: int, name: bytes) -> None:
    check_name(name)
    parent = txn.dir(parent_ino)
    a = txn.child(parent_ino, name)
    if not stat.S_ISDIR(a.mode):
        raise FsError(errno.ENOTDIR, repr(name), "not a directory")
    if not txn.is_empty_dir(a.ino):
        raise FsError(errno.ENOTEMPTY, repr(name), "directory not empty")
    txn.unlink_entry(parent_ino, name)
    parent.nlink -= 1
    txn.touch_dir(parent)
    txn.purge(a)


def _is_ancestor(txn: Txn, ancestor: int, ino: int) -> bool:
    """Whether directory ``ancestor`` is ``ino`` or lies on its path to the root."""
    seen = 0
    while True:
        if ino == ancestor:
            return True
        if ino == ROOT_INO:
            return False
        ino = txn.attr(ino).parent
        seen += 1
        if seen > 1 << 20:  # a loop means corrupt metadata; fail rather than hang
            raise FsError(errno.ELOOP, f"inode {ino}", "directory parent chain does not end")


def _move_dir(txn: Txn, a: Attr, old_parent: Attr, new_parent: Attr) -> None:
    """``..`` of ``a`` now points at ``new_parent``: move one subdir link between the parents."""
    if old_parent.ino == new_parent.ino:
        return
    old_parent.nlink -= 1
    new_parent.nlink += 1
    a.parent = new_parent.ino


def rename(
    txn: Txn, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int, is_open: IsOpen
) -> None:
    """Move or swap an entry, replacing a compatible target; a no-op when the target is the source."""
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
        raise FsError(errno.EINVAL, "rename", f"bad flags {flags:#x}")
    check_name(name)
    check_name(new_name)
    src_dir = txn.dir(parent)
    dst_dir = txn.dir(new_parent)
    src = txn.child(parent, name)
    dst_ino = txn.lookup(new_parent, new_name)
    dst = txn.attr(dst_ino) if dst_ino is not None else None
    if flags & RENAME_EXCHANGE:
        if dst is None:
            raise FsError(errno.ENOENT, repr(new_name), "no such entry")
        _exchange(txn, src_dir, name, src, dst_dir, new_name, dst)
        return
    if dst is not None and flags & RENAME_NOREPLACE:
        raise FsError(errno.EEXIST, repr(new_name), "entry exists")
    if dst is not None and dst.ino == src.ino:
        return  # the same name, or two hard links of one file: POSIX says do nothing
    src_is_dir = stat.S_ISDIR(src.mode)
    if src_is_dir and new_parent != parent and _is_ancestor(txn, src.ino, new_parent):
        raise FsError(errno.EINVAL, repr(name), "cannot move a directory into itself")
    if dst is not None:
        if stat.S_ISDIR(dst.mode):
            if not src_is_dir:
                raise FsError(errno.EISDIR, repr(new_name), "is a directory")
            if not txn.is_empty_dir(dst.ino):
                raise FsError(errno.ENOTEMPTY, repr(new_name), "directory not empty")
            dst_dir.nlink -= 1
        elif src_is_dir:
            raise FsError(errno.ENOTDIR, repr(new_name), "not a directory")
        txn.drop_link(dst, is_open(dst.ino))
    if src_is_dir:
        _move_dir(txn, src, src_dir, dst_dir)
    txn.unlink_entry(parent, name)
    txn.link_entry(new_parent, new_name, src)
    txn.save(src)
    txn.touch_dir(src_dir)
    txn.touch_dir(dst_dir)


def _exchange(txn: Txn, a_dir: Attr, a_name: bytes, a: Attr, b_dir: Attr, b_name: bytes, b: Attr) -> None:
    """RENAME_EXCHANGE: swap two existing entries atomically, whatever their types."""
    if a.ino == b.ino:
        return
    if a_dir.ino != b_dir.ino:
        for moving, into in ((a, b_dir), (b, a_dir)):
            if stat.S_ISDIR(moving.mode) and _is_ancestor(txn, moving.ino, into.ino):
                raise FsError(errno.EINVAL, f"inode {moving.ino}", "cannot move a directory into itself")
        if stat.S_ISDIR(a.mode):
            _move_dir(txn, a, a_dir, b_dir)
        if stat.S_ISDIR(b.mode):
            _move_dir(txn, b, b_dir, a_dir)
    txn.link_entry(b_dir.ino, b_name, a)
    txn.link_entry(a_dir.ino, a_name, b)
    txn.save(a)
    txn.save(b)
    txn.touch_dir(a_dir)
    txn.touch_dir(b_dir)
