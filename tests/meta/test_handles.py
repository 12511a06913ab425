"""Open handles per mount, and the orphan purge a new coordinator defers until the mounts are back."""

from __future__ import annotations

import errno

from pxfs.meta import handles, keys
from pxfs.meta.fs import Meta
from tests.meta.test_fs import BLOCK, H1, ROOT, fails, mkfile, used

TTL = 15.0


class Clock:
    """Seconds, moved by hand: registrations expire when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def orphan(m: Meta, name: bytes, *mounts: str) -> int:
    """A file unlinked while ``mounts`` hold it open (one handle each)."""
    f = mkfile(m, ROOT, name)
    m.commit_blocks(f.ino, {0: (H1, 10)}, 10)
    for mount in mounts:
        m.open(f.ino, mount)
    m.unlink(ROOT, name)
    assert m.getattr(f.ino).nlink == 0
    return f.ino


def new_coordinator(m: Meta, registered: dict[str, float], clock: Clock) -> Meta:
    """What a failover gives: the same keyspace (replicated), no open counts, a deferred purge."""
    promoted = Meta(m.kv, m.capacity, BLOCK, m.clock)
    promoted.defer_orphan_purge(registered, TTL, clock)
    return promoted


def test_orphans_wait_for_every_registered_mount(meta: Meta) -> None:
    clock = Clock()
    kept = orphan(meta, b"kept", "a")
    dropped = orphan(meta, b"dropped", "b")
    m = new_coordinator(meta, {"a": clock.now, "b": clock.now - 5}, clock)
    assert m.purge_due() == 0  # nobody reconnected yet: every orphan may still be open
    assert m.reopen("a", [kept]) == []
    assert m.purge_due() == 0  # b may still come back for its file
    assert m.getattr(dropped).nlink == 0
    clock.now += TTL - 5  # b's registration (renewed 5 s before the failover) expires
    assert m.purge_due() == 1
    fails(errno.ENOENT, m.getattr, dropped)
    assert m.getattr(kept).nlink == 0  # a reopened it: it lives until a closes it
    m.release(kept, "a")
    fails(errno.ENOENT, m.getattr, kept)
    assert used(m) == 0


def test_every_mount_back_purges_at_once(meta: Meta) -> None:
    clock = Clock()
    x = orphan(meta, b"x", "a", "b")
    y = orphan(meta, b"y", "b")
    m = new_coordinator(meta, {"a": clock.now, "b": clock.now}, clock)
    m.reopen("b", [x])  # b closed y while the coordinator was away
    assert m.purge_due() == 0
    m.reopen("a", [x])
    assert m.purge_due() == 1  # y: nobody holds it
    fails(errno.ENOENT, m.getattr, y)
    m.release(x, "b")
    assert m.getattr(x).nlink == 0  # a still holds it
    m.release(x, "a")
    fails(errno.ENOENT, m.getattr, x)
    assert m.purge_due() == 0  # done once


def test_a_mount_that_detaches_settles(meta: Meta) -> None:
    clock = Clock()
    x = orphan(meta, b"x", "a")
    m = new_coordinator(meta, {"a": clock.now, "gone": clock.now}, clock)
    m.reopen("a", [])
    m.forget_mount("gone")
    assert m.purge_due() == 1
    fails(errno.ENOENT, m.getattr, x)


def test_nothing_is_freed_while_a_holder_may_be_missing(meta: Meta) -> None:
    clock = Clock()
    x = orphan(meta, b"x", "a", "b")
    f = mkfile(meta, ROOT, b"f")
    m = new_coordinator(meta, {"a": clock.now, "b": clock.now}, clock)
    m.reopen("a", [x])
    m.release(x, "a")  # a's last handle, but b has not said whether it holds one
    assert m.getattr(x).nlink == 0
    m.unlink(ROOT, b"f")  # b may hold f too: it becomes an orphan, not freed yet
    assert m.getattr(f.ino).nlink == 0
    m.reopen("b", [f.ino])
    assert m.purge_due() == 1  # x: a closed it, b does not hold it
    fails(errno.ENOENT, m.getattr, x)
    assert m.getattr(f.ino).nlink == 0
    m.release(f.ino, "b")
    fails(errno.ENOENT, m.getattr, f.ino)


def test_without_a_deferred_purge_an_unopened_file_is_freed_at_unlink(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.unlink(ROOT, b"f")
    fails(errno.ENOENT, meta.getattr, f.ino)
    assert meta.purge_due() == 0


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


def test_registrations_read_after_the_purge_was_deferred(meta: Meta) -> None:
    """A coordinator takes the role before it has read the mounts' registrations from the store."""
    clock = Clock()
    x = orphan(meta, b"x", "a")
    y = orphan(meta, b"y", "b")
    m = Meta(meta.kv, meta.capacity, BLOCK, meta.clock)
    m.defer_orphan_purge(None, TTL, clock)
    assert m.purge_pending() is False
    m.reopen("a", [x])  # before the registrations are known
    f = mkfile(m, ROOT, b"f")
    m.unlink(ROOT, b"f")  # holders unknown: orphaned, not freed
    clock.now += 10 * TTL
    assert m.purge_due() == 0  # however long: nothing is known about the mounts yet
    m.mounts_registered({"a": clock.now, "b": clock.now})
    assert m.purge_pending() is True
    assert m.purge_due() == 0  # b may come back
    m.reopen("b", [])
    assert m.purge_due() == 2  # y and f
    fails(errno.ENOENT, m.getattr, y)
    fails(errno.ENOENT, m.getattr, f.ino)
    assert m.getattr(x).nlink == 0 and m.purge_pending() is None


def test_a_due_purge_frees_orphans_in_bounded_batches(meta: Meta) -> None:
    """Hundreds of orphans whose mount never came back after a failover: freed a bounded number per
    batch (the coordinator calls again while some are left), never all in one."""
    n = 2 * handles.ORPHAN_BATCH + 10
    for i in range(n):
        orphan(meta, b"o%d" % i, "gone")
    clock = Clock()
    m = new_coordinator(meta, {"gone": clock.now}, clock)
    assert m.purge_due() == 0  # its registration has not expired yet
    clock.now += TTL + 1
    batches = []
    while True:
        seq = m.kv.seq
        freed = m.purge_due()
        if not freed:
            break
        batches.append(freed)
        assert m.kv.seq == seq + 1  # one batch each
    assert batches == [handles.ORPHAN_BATCH, handles.ORPHAN_BATCH, 10]
    assert m.purge_pending() is None
    assert not list(m.kv.scan(keys.ORPHAN_PREFIX)) and used(m) == 0
