"""Metadata in the quota (pxfs.meta.quota): names, xattrs and symlink targets count against the
capacity, inodes against the inode limit; growth past either is ENOSPC, freeing always works."""

from __future__ import annotations

import errno
import random
import stat

import pytest

from pxfs.errors import FsError, NoSpace
from pxfs.meta import keys, maintenance, quota, snapshots
from pxfs.meta.fs import Meta
from pxfs.meta.fsck import fsck
from pxfs.meta.kv import Batch, MemKV
from tests.meta.conftest import BLOCK, FakeClock

ROOT = 1
H1 = b"\x01" * 32


def meta_bytes(m: Meta) -> int:
    return m.statfs()["meta_bytes"]


def counted(m: Meta) -> int:
    """What a full scan says the counter must be."""
    return quota.recount(m.kv.scan(keys.INODE_PREFIX))


def mkfile(m: Meta, parent: int, name: bytes) -> int:
    return m.mknod(parent, name, stat.S_IFREG | 0o644, 0, 1000, 1000).ino


def test_names_xattrs_and_symlink_targets_are_counted(meta: Meta) -> None:
    assert meta_bytes(meta) == 0
    f = mkfile(meta, ROOT, b"file")
    d = meta.mkdir(ROOT, b"dir", 0o755, 0, 0).ino
    meta.symlink(d, b"ln", b"../file", 0, 0)
    meta.setxattr(f, b"user.k", b"12345")
    assert meta_bytes(meta) == len(b"file") + len(b"dir") + len(b"ln") + len(b"../file") + len(b"user.k") + 5
    meta.setxattr(f, b"user.k", b"1")  # a shorter value frees the difference
    meta.link(f, d, b"second-name")  # every name counts, hard links too
    meta.rename(ROOT, b"file", ROOT, b"f")
    assert meta_bytes(meta) == counted(meta) == 1 + 3 + 2 + 7 + 6 + 1 + len(b"second-name")
    meta.unlink(ROOT, b"f")
    meta.unlink(d, b"second-name")  # the last name: the inode goes with its xattrs
    meta.unlink(d, b"ln")
    meta.rmdir(ROOT, b"dir")
    assert meta_bytes(meta) == counted(meta) == 0


def test_xattrs_past_the_capacity_are_enospc_and_change_nothing(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.commit_blocks(f, {0: (H1, BLOCK)}, BLOCK)
    value = b"v" * 4000
    stored = 0
    with pytest.raises(NoSpace) as err:
        for i in range(100):
            meta.setxattr(f, f"user.{i:03d}".encode(), value)
            stored += 1
    assert err.value.errno == errno.ENOSPC and "xattr b'user." in str(err.value)
    each = len(b"user.000") + len(value)
    assert stored == (10 * BLOCK - BLOCK - len(b"f")) // each  # 10 blocks: one of data, the name, xattrs
    seq = meta.kv.seq
    with pytest.raises(NoSpace):
        meta.commit_blocks(f, {1: (H1, BLOCK)}, 2 * BLOCK)  # data meets the metadata's share too
    with pytest.raises(NoSpace):
        meta.symlink(ROOT, b"s", b"t" * 1000, 0, 0)
    assert meta.kv.seq == seq
    meta.capacity = BLOCK  # shrunk below what is in use: removing must still work
    meta.removexattr(f, b"user.000")
    meta.setxattr(f, b"user.001", b"")
    assert meta_bytes(meta) == counted(meta) == 1 + (stored - 1) * len(b"user.000") + (stored - 2) * len(value)


def test_a_symlink_target_and_a_long_name_meet_the_quota(clock: FakeClock) -> None:
    m = Meta(MemKV(), capacity=100, block_size=BLOCK, clock=clock)
    m.init_root()
    m.symlink(ROOT, b"a", b"t" * 90, 0, 0)
    with pytest.raises(NoSpace):
        m.symlink(ROOT, b"b", b"t" * 9, 0, 0)
    with pytest.raises(NoSpace):
        m.rename(ROOT, b"a", ROOT, b"a" * 20)  # renaming to a longer name grows the metadata
    m.rename(ROOT, b"a", ROOT, b"b" * 10)
    assert meta_bytes(m) == 100 == counted(m)


def test_inodes_past_the_limit_are_enospc(clock: FakeClock) -> None:
    m = Meta(MemKV(), capacity=1 << 20, block_size=BLOCK, clock=clock, max_inodes=4)
    m.init_root()  # the root is one of them
    mkfile(m, ROOT, b"a")
    m.mkdir(ROOT, b"d", 0o755, 0, 0)
    m.symlink(ROOT, b"s", b"a", 0, 0)
    seq = m.kv.seq
    for make in (lambda: mkfile(m, ROOT, b"b"), lambda: m.mkdir(ROOT, b"e", 0o755, 0, 0),
                 lambda: m.symlink(ROOT, b"t", b"a", 0, 0), lambda: m.create(ROOT, b"c", stat.S_IFREG | 0o644, 0, 0)):
        with pytest.raises(NoSpace) as err:
            make()
        assert err.value.errno == errno.ENOSPC and "all 4 of the volume's inodes" in str(err.value)
    assert m.kv.seq == seq and m.statfs()["inodes"] == 4
    m.link(m.lookup(ROOT, b"a").ino, ROOT, b"a2")  # a name is no inode
    m.unlink(ROOT, b"s")
    mkfile(m, ROOT, b"b")  # a freed inode can be used again
    m.max_inodes = 2  # lowered below use: deleting still works, creating does not
    m.unlink(ROOT, b"b")
    with pytest.raises(NoSpace):
        mkfile(m, ROOT, b"b")


def test_counter_matches_a_recount_after_random_operations(meta: Meta) -> None:
    meta.capacity = 1 << 30
    rnd = random.Random(13)
    names = [b"x" * n for n in (1, 7, 50, 255)]
    for _ in range(400):
        name, other = rnd.choice(names), rnd.choice(names)
        try:
            match rnd.randrange(6):
                case 0:
                    mkfile(meta, ROOT, name)
                case 1:
                    meta.unlink(ROOT, name)
                case 2:
                    meta.rename(ROOT, name, ROOT, other)
                case 3:
                    meta.setxattr(meta.lookup(ROOT, name).ino, b"user." + other, other * rnd.randrange(3))
                case 4:
                    meta.removexattr(meta.lookup(ROOT, name).ino, b"user." + other)
                case 5:
                    meta.link(meta.lookup(ROOT, name).ino, ROOT, other)
        except FsError:
            pass
        assert meta_bytes(meta) == counted(meta)


def test_a_keyspace_from_before_the_counter_is_counted_once(meta: Meta, clock: FakeClock) -> None:
    f = mkfile(meta, ROOT, b"old")
    meta.setxattr(f, b"user.a", b"bc")
    b = Batch()
    b.delete(keys.counter_key(keys.META_BYTES))
    meta.kv.write(b)
    m = Meta(meta.kv, meta.capacity, BLOCK, clock)
    m.init_root()
    assert meta_bytes(m) == 3 + 6 + 2
    seq = m.kv.seq
    m.init_root()
    assert m.kv.seq == seq
    m.unlink(ROOT, b"old")
    assert meta_bytes(m) == 0


def test_fsck_checks_and_repairs_the_counter(meta: Meta) -> None:
    mkfile(meta, ROOT, b"abc")
    b = Batch()
    b.put(keys.counter_key(keys.META_BYTES), keys.encode_u64(99))
    meta.kv.write(b)
    report = fsck(meta.kv, block_size=BLOCK, repair=True)
    assert [(p.kind, p.repaired) for p in report.problems] == [("counter-meta", True)]
    assert meta_bytes(meta) == 3
    assert fsck(meta.kv, block_size=BLOCK).problems == []


def test_fsck_repairs_count_the_entries_they_remove(meta: Meta) -> None:
    mkfile(meta, ROOT, b"abc")
    b = Batch()
    b.put(keys.dentry_key(ROOT, b"dangling"), keys.encode_dentry(777, stat.S_IFREG))
    b.put(keys.counter_key(keys.META_BYTES), keys.encode_u64(3 + len(b"dangling")))
    meta.kv.write(b)
    fsck(meta.kv, block_size=BLOCK, repair=True)
    assert meta_bytes(meta) == counted(meta) == 3


def test_restore_never_hands_out_an_inode_number_again(meta: Meta) -> None:
    snap = MemKV()
    mkfile(meta, ROOT, b"before")
    snapshots.copy_into(snap, meta.kv)
    later = mkfile(meta, ROOT, b"after")
    maintenance.restore(meta.kv, "s", snap)
    assert mkfile(meta, ROOT, b"new") > later
    assert meta_bytes(meta) == counted(meta) == len(b"before") + len(b"new")


def test_a_snapshot_without_the_counter_is_counted_at_restore(meta: Meta) -> None:
    snap = MemKV()
    mkfile(meta, ROOT, b"kept")
    snapshots.copy_into(snap, meta.kv)
    b = Batch()
    b.delete(keys.counter_key(keys.META_BYTES))
    snap.write(b)
    mkfile(meta, ROOT, b"gone")
    maintenance.restore(meta.kv, "s", snap)
    assert meta_bytes(meta) == 4
    meta.unlink(ROOT, b"kept")
    assert meta_bytes(meta) == 0


def test_record_bytes_ignores_what_is_not_metadata_of_a_user() -> None:
    assert quota.record_bytes(keys.attr_key(5), b"x" * 77) == 0
    assert quota.record_bytes(keys.block_key(5, 1), b"x" * 36) == 0
    assert quota.record_bytes(keys.counter_key(keys.INODES), b"x" * 8) == 0
    assert quota.record_bytes(keys.dentry_key(5, b"name"), None) == 0
    assert quota.record_bytes(keys.dentry_key(5, b"name"), b"x" * 9) == 4
    assert quota.record_bytes(keys.xattr_key(5, b"user.n"), b"vv") == 8
    assert quota.record_bytes(keys.symlink_key(5), b"target") == 6
