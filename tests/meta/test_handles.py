"""Open handles per mount: counted per mount, replaced on a reconnect, dropped when the mount goes."""

from __future__ import annotations

import errno

from pxfs.meta.fs import Meta
from tests.meta.test_fs import H1, ROOT, fails, mkfile


def orphan(m: Meta, name: bytes, *mounts: str) -> int:
    """A file unlinked while ``mounts`` hold it open (one handle each)."""
    f = mkfile(m, ROOT, name)
    m.commit_blocks(f.ino, {0: (H1, 10)}, 10)
    for mount in mounts:
        m.open(f.ino, mount)
    m.unlink(ROOT, name)
    assert m.getattr(f.ino).nlink == 0
    return f.ino


def test_a_reconnect_replaces_the_mount_s_counts(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.open(f.ino, "a")
    meta.open(f.ino, "a")
    meta.open(f.ino, "b")
    # a reconnects to the same coordinator holding one handle: not three.
    assert meta.reopen("a", [f.ino]) == []
    meta.unlink(ROOT, b"f")
    meta.release(f.ino, "b")
    meta.release(f.ino, "a")
    fails(errno.ENOENT, meta.getattr, f.ino)


def test_a_reconnect_without_the_handle_frees_the_orphan(meta: Meta) -> None:
    x = orphan(meta, b"x", "a")
    meta.reopen("a", [])  # its close was lost in the reconnect
    fails(errno.ENOENT, meta.getattr, x)


def test_reopen_of_a_freed_inode_reports_it(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.unlink(ROOT, b"f")
    assert meta.reopen("a", [f.ino, ROOT, f.ino]) == [f.ino]
    meta.release(ROOT, "a")
    meta.release(f.ino, "a")  # a stale handle's close: harmless


def test_forget_mount_frees_what_only_it_held(meta: Meta) -> None:
    x = orphan(meta, b"x", "a")
    y = orphan(meta, b"y", "a", "b")
    meta.forget_mount("a")
    fails(errno.ENOENT, meta.getattr, x)
    assert meta.getattr(y).nlink == 0
    meta.release(y, "a")  # from before it was forgotten: nothing to undo
    assert meta.getattr(y).nlink == 0
    meta.release(y, "b")
    fails(errno.ENOENT, meta.getattr, y)
