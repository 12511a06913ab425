"""Jobs that rewrite much of a keyspace go in bounded batches under the maintenance mark (issue 13):
a restore to a snapshot and an fsck repair, each step at most STEP_OPS ops, STEP_BYTES bytes and
STEP_SCAN keys read; a restore stopped half way leaves the mark with its cursor, never a mix that
looks finished, and goes on (or starts over towards another snapshot) from there."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pxfs.meta import keys, maintenance, quota, snapshots
from pxfs.meta.fs import Meta, Op
from pxfs.meta.fsck import fsck
from pxfs.meta.kv import KV, Batch, MemKV, RocksKV
from pxfs.meta.opids import OpIds
from tests.meta.conftest import BLOCK, FakeClock

ROOT = 1
OPS, SCAN, BYTES = 16, 40, 4000
H = b"\x05" * 32


@pytest.fixture(autouse=True)
def small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maintenance, "STEP_OPS", OPS)
    monkeypatch.setattr(maintenance, "STEP_SCAN", SCAN)
    monkeypatch.setattr(maintenance, "STEP_BYTES", BYTES)


def new_meta(kv: KV) -> Meta:
    m = Meta(kv, capacity=1 << 40, block_size=BLOCK, clock=FakeClock())
    m.init_root()
    return m


def populate(m: Meta, tag: bytes, files: int) -> list[int]:
    out = []
    for i in range(files):
        a = m.mknod(ROOT, tag + b"%03d" % i, stat.S_IFREG | 0o644, 0, 0, 0)
        m.commit_blocks(a.ino, {0: (H, 10), 1: (H, 10)}, BLOCK + 10)
        out.append(a.ino)
    return out


def data(kv: KV) -> dict[bytes, bytes]:
    """What a restore makes equal: everything but op and snapshot records, the mark and the counters
    a restore sets by rule."""
    skip = (keys.OP_PREFIX, keys.SNAPSHOT_PREFIX, keys.MAINTENANCE_KEY,
            keys.counter_key(keys.NEXT_INODE), keys.counter_key(keys.META_BYTES))
    return {k: v for k, v in kv.scan(b"") if not k.startswith(skip)}


def logged_ops(kv: KV, since: int) -> list[tuple[int, int]]:
    """(ops, bytes) of each batch logged after ``since``."""
    out = []
    for seq in range(since + 1, kv.seq + 1):
        entry = kv.log_entry(seq)
        assert entry is not None
        out.append((len(Batch.decode(entry)), len(entry)))
    return out


def snapshot_of(m: Meta) -> MemKV:
    snap = MemKV()
    for b in maintenance.batches(m.kv.scan(b"")):
        snap.write(b)
    return snap


def test_a_restore_is_bounded_batches_that_end_in_the_snapshot(meta: Meta) -> None:
    meta.capacity = 1 << 40
    populate(meta, b"kept", 30)
    meta.setxattr(ROOT, b"user.big", b"v" * 3000)
    snap = snapshot_of(meta)
    op = Op("mount-a", OpIds().next())
    meta.mkdir(ROOT, b"later", 0o755, 0, 0, op=op)
    populate(meta, b"new", 30)
    for i in range(0, 30, 2):
        meta.unlink(ROOT, b"kept%03d" % i)
    meta.setxattr(ROOT, b"user.big", b"w" * 3000)
    highest = meta.kv.get(keys.counter_key(keys.NEXT_INODE))
    ops_before = list(meta.kv.scan(keys.OP_PREFIX))
    before = meta.kv.seq

    batches = maintenance.restore(meta.kv, "s", snap)

    assert data(meta.kv) == data(snap)
    assert meta.kv.get(keys.MAINTENANCE_KEY) is None
    assert meta.kv.get(keys.counter_key(keys.NEXT_INODE)) == highest  # never goes back
    assert list(meta.kv.scan(keys.OP_PREFIX)) == ops_before  # today's retries still answered
    assert meta.statfs()["meta_bytes"] == quota.recount(meta.kv.scan(keys.INODE_PREFIX))
    logged = logged_ops(meta.kv, before)
    assert len(logged) == batches > 4
    # Each batch: the step's ops plus the mark (or the counters and the mark's deletion at the end);
    # a big value may take one step past STEP_BYTES, never more.
    assert all(n <= OPS + 3 for n, _ in logged), logged
    assert all(size <= BYTES + 3000 + 500 for _, size in logged), logged
    assert fsck(meta.kv, block_size=BLOCK).problems == []
    assert meta.mknod(ROOT, b"fresh", stat.S_IFREG, 0, 0, 0).ino >= keys.decode_u64(highest)


def test_each_step_reads_a_bounded_number_of_keys(meta: Meta) -> None:
    """Two keyspaces that agree on many keys: steps that change nothing still end after STEP_SCAN
    keys read (the cursor moves on in the mark)."""
    meta.capacity = 1 << 40
    populate(meta, b"same", 40)
    snap = snapshot_of(meta)
    maintenance.begin_restore(meta.kv, "s", snap)
    steps = 0
    while not maintenance.restore_step(meta.kv, snap):
        steps += 1
        job = maintenance.pending(meta.kv)
        assert job is not None and job.after
    assert steps >= len(data(snap)) // SCAN - 1
    assert data(meta.kv) == data(snap)


def test_a_restore_stopped_half_way_is_marked_and_goes_on(tmp_path: Path) -> None:
    kv = RocksKV(str(tmp_path / "live"))
    m = new_meta(kv)
    populate(m, b"snap", 20)
    snap = RocksKV(str(tmp_path / "snap"))
    for b in maintenance.batches(kv.scan(b"")):
        snap.write(b)
    populate(m, b"live", 20)
    m.setxattr(ROOT, b"user.x", b"y")
    maintenance.begin_restore(kv, "s", snap)
    assert not maintenance.restore_step(kv, snap)
    assert not maintenance.restore_step(kv, snap)
    kv.close()  # the coordinator dies here

    kv = RocksKV(str(tmp_path / "live"))
    job = maintenance.pending(kv)
    assert job is not None and job.job == maintenance.RESTORE and job.snapshot == "s"
    done_upto = bytes.fromhex(job.after)
    assert {k: v for k, v in data(kv).items() if k <= done_upto} == \
        {k: v for k, v in data(snap).items() if k <= done_upto}
    assert data(kv) != data(snap)  # a mix: the mark says so, and what is past the cursor is not yet
    while not maintenance.restore_step(kv, snap):
        pass
    assert data(kv) == data(snap) and maintenance.pending(kv) is None
    kv.close()
    snap.close()


def test_a_restore_towards_another_snapshot_supersedes_a_half_done_one(meta: Meta) -> None:
    meta.capacity = 1 << 40
    populate(meta, b"a", 10)
    first = snapshot_of(meta)
    populate(meta, b"b", 10)
    second = snapshot_of(meta)
    populate(meta, b"c", 10)
    maintenance.begin_restore(meta.kv, "first", first)
    maintenance.restore_step(meta.kv, first)
    maintenance.restore(meta.kv, "second", second)
    assert data(meta.kv) == data(second)


def test_a_restore_counts_metadata_a_snapshot_did_not(meta: Meta) -> None:
    meta.capacity = 1 << 40
    populate(meta, b"name", 25)
    snap = snapshot_of(meta)
    b = Batch()
    b.delete(keys.counter_key(keys.META_BYTES))
    snap.write(b)
    populate(meta, b"other", 5)
    maintenance.restore(meta.kv, "s", snap)
    assert meta.statfs()["meta_bytes"] == 25 * len(b"name000")


def test_the_mark_is_part_of_the_schema_and_of_no_copy(meta: Meta) -> None:
    maintenance.begin_fsck(meta.kv)
    assert isinstance(keys.decode_key(keys.MAINTENANCE_KEY), keys.MaintenanceKey)
    assert fsck(meta.kv, block_size=BLOCK).problems == []
    clone = MemKV()
    snapshots.copy_into(clone, meta.kv)
    assert clone.get(keys.MAINTENANCE_KEY) is None
    maintenance.end(meta.kv)
    assert maintenance.pending(meta.kv) is None


def test_fsck_repairs_go_in_bounded_batches(meta: Meta) -> None:
    meta.capacity = 1 << 40
    populate(meta, b"f", 10)
    b = Batch()
    for i in range(100):
        b.put(keys.dentry_key(ROOT, b"dangling%03d" % i), keys.encode_dentry(10_000 + i, stat.S_IFREG))
    meta.kv.write(b)
    before = meta.kv.seq
    report = fsck(meta.kv, block_size=BLOCK, repair=True)
    assert sum(p.kind == "dangling-entry" and p.repaired for p in report.problems) == 100
    logged = logged_ops(meta.kv, before)
    assert len(logged) >= 100 // OPS and all(n <= OPS for n, _ in logged), logged
    assert fsck(meta.kv, block_size=BLOCK).problems == []
