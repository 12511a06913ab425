"""Op ids: a replayed mutation returns its first answer and writes nothing; the records stay bounded."""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable

import pytest

from pxfs.errors import Invalid
from pxfs.meta import keys, maintenance, snapshots
from pxfs.meta.fs import RENAME_EXCHANGE, Attr, Meta, Op
from pxfs.meta.fsck import fsck
from pxfs.meta.keys import OP_SLOTS
from pxfs.meta.kv import Batch, MemKV
from pxfs.meta.opids import OpIds
from tests.meta.test_fs import BLOCK, H1, ROOT, fails, mkdir, mkfile

REG = stat.S_IFREG | 0o644


def ops_of(mount: str, prefix: bytes = b"\x07" * 8) -> Callable[[], Op]:
    ids = OpIds(prefix)
    return lambda: Op(mount, ids.next())


def dump(m: Meta) -> list[tuple[bytes, bytes]]:
    return list(m.kv.scan(b""))


def op_records(m: Meta) -> list[bytes]:
    return [k for k, _ in m.kv.scan(keys.OP_PREFIX)]


# Every mutation, given a file f (with xattr user.a and a block), a directory d and an empty dir e.
MUTATIONS: list[tuple[str, Callable[[Meta, Attr, Attr, Op], object]]] = [
    ("mknod", lambda m, f, d, op: m.mknod(ROOT, b"new", REG, 0, 1, 1, op=op)),
    ("create", lambda m, f, d, op: m.create(ROOT, b"new", REG, 1, 1, op=op)),
    ("mkdir", lambda m, f, d, op: m.mkdir(d.ino, b"new", 0o755, 1, 1, op=op)),
    ("symlink", lambda m, f, d, op: m.symlink(ROOT, b"s", b"target", 1, 1, op=op)),
    ("link", lambda m, f, d, op: m.link(f.ino, d.ino, b"l", op=op)),
    ("unlink", lambda m, f, d, op: m.unlink(ROOT, b"f", op=op)),
    ("rmdir", lambda m, f, d, op: m.rmdir(ROOT, b"e", op=op)),
    ("rename", lambda m, f, d, op: m.rename(ROOT, b"f", d.ino, b"f", op=op)),
    ("exchange", lambda m, f, d, op: m.rename(ROOT, b"f", ROOT, b"d", RENAME_EXCHANGE, op=op)),
    ("setattr", lambda m, f, d, op: m.setattr(f.ino, mode=0o600, size=1, op=op)),
    ("setxattr", lambda m, f, d, op: m.setxattr(f.ino, b"user.x", b"1", op=op)),
    ("removexattr", lambda m, f, d, op: m.removexattr(f.ino, b"user.a", op=op)),
    ("commit_blocks", lambda m, f, d, op: m.commit_blocks(f.ino, {1: (H1, 1)}, BLOCK + 1, op=op)),
]


def tree(m: Meta) -> tuple[Attr, Attr]:
    f = mkfile(m, ROOT, b"f")
    d = mkdir(m, ROOT, b"d")
    mkdir(m, ROOT, b"e")
    m.commit_blocks(f.ino, {0: (H1, 10)}, 10)
    m.setxattr(f.ino, b"user.a", b"1")
    return f, d


@pytest.mark.parametrize("mutation", [fn for _, fn in MUTATIONS], ids=[name for name, _ in MUTATIONS])
def test_replay_returns_the_first_answer_and_writes_nothing(
        meta: Meta, mutation: Callable[[Meta, Attr, Attr, Op], object]) -> None:
    f, d = tree(meta)
    op = Op("mount-a", OpIds(b"\x01" * 8).next())
    seq = meta.kv.seq
    first = mutation(meta, f, d, op)
    assert meta.kv.seq == seq + 1  # the record rides in the mutation's own batch
    assert len(op_records(meta)) == 1
    after = dump(meta)
    again = mutation(meta, f, d, op)
    assert again == first
    assert meta.kv.seq == seq + 1 and dump(meta) == after
    assert meta.replays == 1


@pytest.mark.parametrize("mutation", [fn for _, fn in MUTATIONS], ids=[name for name, _ in MUTATIONS])
def test_a_new_coordinator_replays_from_the_replicated_records(
        meta: Meta, mutation: Callable[[Meta, Attr, Attr, Op], object]) -> None:
    f, d = tree(meta)
    op = Op("mount-a", OpIds(b"\x02" * 8).next())
    first = mutation(meta, f, d, op)
    follower = MemKV()
    for seq, data in meta.kv.log_since(0):
        follower.apply(seq, data)
    promoted = Meta(follower, meta.capacity, BLOCK, meta.clock)
    seq = follower.seq
    assert mutation(promoted, f, d, op) == first
    assert follower.seq == seq


def test_o_excl_create_stays_exclusive_across_a_retry(meta: Meta) -> None:
    a, b = ops_of("mount-a", b"\xaa" * 8), ops_of("mount-b", b"\xbb" * 8)
    op = a()
    mine = meta.create(ROOT, b"f", REG, 1000, 1000, op=op)
    # Before the retry arrives, another mount removes our file and creates its own under the name.
    meta.unlink(ROOT, b"f", op=b())
    theirs = meta.create(ROOT, b"f", REG, 2000, 2000, op=b())
    assert theirs.ino != mine.ino
    assert meta.create(ROOT, b"f", REG, 1000, 1000, op=op) == mine  # never their file
    fails(errno.EEXIST, meta.create, ROOT, b"f", REG, 1000, 1000, op=a())  # a new op is a new create
    fails(errno.EEXIST, meta.mknod, ROOT, b"f", REG, 0, 1000, 1000)  # and so is a call without op id


def test_a_failed_mutation_records_nothing(meta: Meta) -> None:
    mkfile(meta, ROOT, b"f")
    op = Op("mount-a", OpIds().next())
    seq = meta.kv.seq
    fails(errno.EEXIST, meta.mkdir, ROOT, b"f", 0o755, 1, 1, op=op)
    assert meta.kv.seq == seq and op_records(meta) == []
    meta.unlink(ROOT, b"f")
    # The retry of a call that failed runs again: it may now succeed.
    assert stat.S_ISDIR(meta.mkdir(ROOT, b"f", 0o755, 1, 1, op=op).mode)


def test_same_counter_from_another_session_or_mount_is_another_op(meta: Meta) -> None:
    first = meta.mkdir(ROOT, b"x", 0o755, 1, 1, op=Op("mount-a", OpIds(b"\x01" * 8).next()))
    # A remount under the same id starts its counter again, with another random prefix.
    fails(errno.EEXIST, meta.mkdir, ROOT, b"x", 0o755, 1, 1, op=Op("mount-a", OpIds(b"\x02" * 8).next()))
    fails(errno.EEXIST, meta.mkdir, ROOT, b"x", 0o755, 1, 1, op=Op("mount-b", OpIds(b"\x01" * 8).next()))
    assert meta.mkdir(ROOT, b"x", 0o755, 1, 1, op=Op("mount-a", OpIds(b"\x01" * 8).next())) == first


def test_records_are_a_bounded_ring_per_mount(meta: Meta) -> None:
    a = OpIds(b"\x0a" * 8)
    first = Op("mount-a", a.next())
    meta.mkdir(ROOT, b"d0", 0o755, 1, 1, op=first)
    for i in range(1, OP_SLOTS + 10):
        meta.setattr(ROOT, mode=0o700 + i % 2, op=Op("mount-a", a.next()))
    meta.mkdir(ROOT, b"other", 0o755, 1, 1, op=Op("mount-b", OpIds().next()))
    assert len(op_records(meta)) == OP_SLOTS + 1
    assert len([k for k, _ in meta.kv.scan(keys.op_prefix("mount-a"))]) == OP_SLOTS
    # The oldest op's slot now answers a newer op: a retry that late runs again (here: EEXIST).
    fails(errno.EEXIST, meta.mkdir, ROOT, b"d0", 0o755, 1, 1, op=first)


def test_forget_mount_drops_its_records_and_only_its(meta: Meta) -> None:
    a, b = ops_of("mount-a", b"\x01" * 8), ops_of("mount-b", b"\x02" * 8)
    for i in range(5):
        meta.mkdir(ROOT, b"a%d" % i, 0o755, 1, 1, op=a())
    kept = b()
    meta.mkdir(ROOT, b"b", 0o755, 1, 1, op=kept)
    seq = meta.kv.seq
    meta.forget_mount("mount-a")
    assert meta.kv.seq == seq + 1  # one batch
    assert op_records(meta) == [keys.op_key("mount-b", kept.id)]
    meta.forget_mount("mount-a")
    assert meta.kv.seq == seq + 1  # nothing left: no batch


def test_forget_stale_mounts_is_bounded_per_call(meta: Meta) -> None:
    for i in range(5):
        meta.mkdir(ROOT, b"m%d" % i, 0o755, 1, 1, op=Op(f"mount-{i}", OpIds().next()))
    assert meta.forget_stale_mounts(["mount-0"], limit=3) == 3
    assert meta.forget_stale_mounts(["mount-0"], limit=3) == 1
    assert meta.forget_stale_mounts(["mount-0"], limit=3) == 0
    assert op_records(meta) == [k for k, _ in meta.kv.scan(keys.op_prefix("mount-0"))] != []


def test_a_replayed_create_counts_its_handle_once(meta: Meta) -> None:
    op = Op("mount-a", OpIds().next())
    f = meta.create(ROOT, b"f", REG, 1, 1, op=op)
    meta.create(ROOT, b"f", REG, 1, 1, op=op)  # the same coordinator: already counted
    meta.unlink(ROOT, b"f")
    meta.release(f.ino, "mount-a")
    fails(errno.ENOENT, meta.getattr, f.ino)


def test_a_replayed_create_at_a_new_coordinator_counts_its_handle(meta: Meta) -> None:
    op = Op("mount-a", OpIds().next())
    f = meta.create(ROOT, b"f", REG, 1, 1, op=op)
    promoted = Meta(meta.kv, meta.capacity, BLOCK, meta.clock)
    promoted.reopen("mount-a", [])  # the mount reconnects; the create had not answered yet
    assert promoted.create(ROOT, b"f", REG, 1, 1, op=op) == f
    promoted.unlink(ROOT, b"f")
    assert promoted.getattr(f.ino).nlink == 0  # open: an orphan, not freed
    promoted.release(f.ino, "mount-a")
    fails(errno.ENOENT, promoted.getattr, f.ino)


def test_op_ids_are_checked(meta: Meta) -> None:
    with pytest.raises(Invalid):
        Op("mount-a", b"short")
    with pytest.raises(Invalid):
        OpIds(b"1234")
    ids = OpIds()
    assert len(ids.next()) == keys.OP_ID_LEN and ids.next() != ids.next()
    seq = meta.kv.seq
    meta.mkdir(ROOT, b"plain", 0o755, 1, 1, op=Op("mount-a"))  # no id: works, records nothing
    assert meta.kv.seq == seq + 1 and op_records(meta) == []


def test_fsck_knows_op_records(meta: Meta) -> None:
    f, d = tree(meta)
    meta.setattr(f.ino, mode=0o600, op=Op("mount-a", OpIds().next()))
    meta.rmdir(ROOT, b"e", op=Op("mount-b", OpIds().next()))
    assert fsck(meta.kv, block_size=BLOCK).problems == []
    bad = keys.op_prefix("mount-c") + b"\x00\x01"
    damage = Batch()
    damage.put(bad, b"garbage")
    meta.kv.write(damage)
    report = fsck(meta.kv, block_size=BLOCK, repair=True)
    assert [(p.kind, p.repaired) for p in report.problems] == [("bad-op-record", True)]
    assert meta.kv.get(bad) is None
    assert fsck(meta.kv, block_size=BLOCK).problems == []


def test_clones_and_restores_leave_op_records_alone(meta: Meta) -> None:
    meta.mkdir(ROOT, b"x", 0o755, 1, 1, op=Op("mount-a", OpIds().next()))
    clone = MemKV()
    snapshots.copy_into(clone, meta.kv)
    assert list(clone.scan(keys.OP_PREFIX)) == []
    records = op_records(meta)
    maintenance.restore(meta.kv, "s", MemKV())
    assert op_records(meta) == records

