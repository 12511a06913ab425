"""Freed inodes with more block entries than one batch should hold go on the purge list (issue 13):
the unlink is one small batch, the entries go PURGE_BATCH at a time in later ones."""

from __future__ import annotations

import errno
import stat

import pytest

from pxfs.errors import FsError
from pxfs.meta import keys
from pxfs.meta.fs import Meta
from pxfs.meta.fsck import fsck
from pxfs.meta.kv import Batch
from pxfs.meta.slices import whole
from tests.meta.conftest import BLOCK

ROOT = 1
SMALL = 8  # PURGE_BATCH for these tests
H = b"\x07" * 32


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "PURGE_BATCH", SMALL)


def big_file(m: Meta, name: bytes, blocks: int) -> int:
    m.capacity = 1 << 40
    ino = m.mknod(ROOT, name, stat.S_IFREG | 0o644, 0, 0, 0).ino
    m.setxattr(ino, b"user.a", b"b")
    m.commit_blocks(ino, {i: (H, BLOCK) for i in range(blocks)}, blocks * BLOCK)
    return ino


def last_batch_ops(m: Meta) -> int:
    entry = m.kv.log_entry(m.kv.seq)
    assert entry is not None
    return len(Batch.decode(entry))


def inode_keys(m: Meta, ino: int) -> list[bytes]:
    return [k for k, _ in m.kv.scan(keys.inode_prefix(ino))]


def drain(m: Meta) -> list[int]:
    steps = []
    while m.purging():
        steps.append(m.purge_step())
        assert last_batch_ops(m) <= SMALL + 3  # the entries, the mark, the counter, the seq bookkeeping
    return steps


def test_unlinking_a_big_file_is_one_small_batch_then_bounded_purge_steps(meta: Meta) -> None:
    ino = big_file(meta, b"big", 3 * SMALL + 2)
    meta.unlink(ROOT, b"big")
    assert last_batch_ops(meta) <= 8  # entry, attr, xattr, mark, counters, parent: not the blocks
    with pytest.raises(FsError) as err:
        meta.getattr(ino)
    assert err.value.errno == errno.ENOENT
    st = meta.statfs()
    assert st["inodes"] == 1 and st["used"] == (3 * SMALL + 2) * BLOCK and st["meta_bytes"] == 0
    assert fsck(meta.kv, block_size=BLOCK).problems == []  # blocks on the purge list are no damage
    assert drain(meta) == [SMALL, SMALL, SMALL, 3]  # the last: two entries and the mark
    assert meta.statfs()["used"] == 0 and inode_keys(meta, ino) == [] and meta.purge_step() == 0
    assert fsck(meta.kv, block_size=BLOCK).problems == []


def test_a_small_file_is_freed_at_once(meta: Meta) -> None:
    ino = big_file(meta, b"small", SMALL)
    meta.unlink(ROOT, b"small")
    assert not meta.purging() and inode_keys(meta, ino) == [] and meta.statfs()["used"] == 0


def test_the_last_close_and_a_rename_over_it_use_the_purge_list_too(meta: Meta) -> None:
    a = big_file(meta, b"a", 2 * SMALL)
    meta.open(a)
    meta.unlink(ROOT, b"a")
    assert not meta.purging()  # open: an orphan, its blocks readable
    meta.release(a)
    assert meta.purging()
    drain(meta)
    b = big_file(meta, b"b", 2 * SMALL)
    mk = meta.mknod(ROOT, b"c", stat.S_IFREG | 0o644, 0, 0, 0)
    meta.rename(ROOT, b"c", ROOT, b"b")
    assert meta.lookup(ROOT, b"b").ino == mk.ino and meta.purging()
    drain(meta)
    assert inode_keys(meta, a) == inode_keys(meta, b) == [] and meta.statfs()["used"] == 0


def test_a_purge_mark_beside_a_live_inode_never_deletes_its_blocks(meta: Meta) -> None:
    ino = big_file(meta, b"live", 2 * SMALL)
    b = Batch()
    b.put(keys.purge_key(ino), b"")
    meta.kv.write(b)
    report = fsck(meta.kv, block_size=BLOCK)
    assert [p.kind for p in report.problems] == ["purge-live"]
    meta.purge_step()
    assert not meta.purging() and len(meta.get_blocks(ino)[1]) == 2 * SMALL


def test_a_big_truncate_cuts_ahead_in_bounded_batches(meta: Meta) -> None:
    ino = big_file(meta, b"t", 3 * SMALL + 2)
    cuts = []
    while n := meta.cut_ahead(ino, BLOCK + 10):
        cuts.append(n)
        assert last_batch_ops(meta) <= SMALL + 2 and meta.getattr(ino).size == (3 * SMALL + 2) * BLOCK
    assert cuts == [SMALL, SMALL]  # what is left (SMALL entries past the cut) fits the truncate's batch
    meta.setattr(ino, size=BLOCK + 10)
    assert last_batch_ops(meta) <= SMALL + 4
    assert meta.get_blocks(ino)[1] == {0: whole(H, BLOCK), 1: whole(H, 10)}
    assert meta.statfs()["used"] == BLOCK + 10
    assert meta.cut_ahead(ino, 0) == 0 and meta.cut_ahead(ino, -1) == 0 and meta.cut_ahead(ino, 1 << 40) == 0
    assert fsck(meta.kv, block_size=BLOCK).problems == []
