"""fsck: a healthy tree is clean; each kind of damage, made directly in the KV, is found and repaired.

Every damage test runs the same cycle (``check``): a report-only pass that must not move the KV
sequence number, a repair pass that must report the same problems as repaired in one batch, and
a second pass that must come back clean.
"""

from __future__ import annotations

import contextlib
import json
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pxfs.errors import FsError
from pxfs.meta import keys, quota, snapshots
from pxfs.meta.fs import Meta
from pxfs.meta.fsck import LOST_FOUND, FsckReport, fsck
from pxfs.meta.keys import Attr
from pxfs.meta.kv import KV, Batch, MemKV, RocksKV
from pxfs.meta.opids import Op
from pxfs.meta.slices import whole

from .conftest import BLOCK, FakeClock

ROOT = 1
H1, H2, H3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


@dataclass
class Tree:
    """A small healthy volume: /d/e/g, /f (hard-linked as /d/f2), /s -> target, an open orphan."""

    meta: Meta
    d: int
    e: int
    f: int
    g: int
    s: int
    orphan: int

    @property
    def kv(self) -> KV:
        return self.meta.kv

    def attr(self, ino: int) -> Attr:
        return self.meta.getattr(ino)


def build(m: Meta) -> Tree:
    d = m.mkdir(ROOT, b"d", 0o755, 1000, 1000).ino
    e = m.mkdir(d, b"e", 0o755, 1000, 1000).ino
    f = m.mknod(ROOT, b"f", stat.S_IFREG | 0o644, 0, 1000, 1000).ino
    m.commit_blocks(f, {0: (H1, BLOCK), 1: (H2, 100)}, BLOCK + 100)
    m.link(f, d, b"f2")
    m.setxattr(f, b"user.tag", b"v")
    g = m.mknod(e, b"g", stat.S_IFREG | 0o600, 0, 0, 0).ino
    m.commit_blocks(g, {0: (H1, 10)}, 10)  # the same chunk as f's first block, shorter
    s = m.symlink(ROOT, b"s", b"d/e/g", 0, 0).ino
    orphan = m.mknod(ROOT, b"tmp", stat.S_IFREG | 0o644, 0, 0, 0).ino
    m.commit_blocks(orphan, {0: (H3, 50)}, 50)
    m.open(orphan)
    m.unlink(ROOT, b"tmp")
    return Tree(m, d, e, f, g, s, orphan)


@pytest.fixture
def tree(meta: Meta) -> Tree:
    return build(meta)


def run(t: Tree, repair: bool = False) -> FsckReport:
    return fsck(t.kv, block_size=BLOCK, repair=repair, is_open=t.meta._is_open, clock=t.meta.clock)


def damage(kv: KV, puts: dict[bytes, bytes] | None = None, deletes: tuple[bytes, ...] = ()) -> None:
    """Write ``puts`` and ``deletes`` raw; the metaBytes counter follows them (unless a put sets
    it), so that each test shows only the damage it makes (test_quota checks that counter)."""
    ops: dict[bytes, bytes | None] = {**(puts or {}), **dict.fromkeys(deletes)}
    meta_key = keys.counter_key(keys.META_BYTES)
    if meta_key not in ops:
        grown = quota.meta_delta(ops, kv.get)[0]
        if grown:
            ops[meta_key] = keys.encode_u64(counter(kv, keys.META_BYTES) + grown)
    batch = Batch()
    for key, value in ops.items():
        if value is None:
            batch.delete(key)
        else:
            batch.put(key, value)
    kv.write(batch)


def put_attr(t: Tree, ino: int, **changes: int) -> bytes:
    """The encoded attr of ``ino`` with ``changes`` applied (for a ``damage`` put)."""
    a = t.attr(ino)
    for name, value in changes.items():
        setattr(a, name, value)
    return keys.encode_attr(a)


def counter(kv: KV, name: bytes) -> int:
    return keys.decode_u64(kv.get(keys.counter_key(name)))


def check(t: Tree, *kinds: str) -> FsckReport:
    """Report (nothing written), repair (one batch, same problems), then a clean second pass."""
    seq = t.kv.seq
    found = run(t)
    assert t.kv.seq == seq, "a report-only fsck wrote"
    assert sorted({p.kind for p in found.problems}) == sorted(kinds), found.problems
    assert not any(p.repaired for p in found.problems)
    fixed = run(t, repair=True)
    assert [(p.kind, p.ino, p.detail) for p in fixed.problems] == [(p.kind, p.ino, p.detail) for p in found.problems]
    assert all(p.repaired for p in fixed.problems), fixed.problems
    assert t.kv.seq == seq + 1, "the repair must be exactly one batch"
    again = run(t)
    assert again.ok, again.problems
    return fixed


def lost_found(t: Tree) -> Attr:
    return t.meta.lookup(ROOT, LOST_FOUND)


# -- a healthy volume -----------------------------------------------------------------------------
def test_healthy_tree_is_clean(tree: Tree) -> None:
    assert fsck(MemKV(), block_size=BLOCK).problems[0].kind == "no-root"
    seq = tree.kv.seq
    report = run(tree)
    assert report.ok and report.problems == []
    assert (report.inodes, report.entries, report.blocks) == (7, 6, 4)
    assert report.chunk_refs == {
        H1: [(tree.f, 0), (tree.g, 0)], H2: [(tree.f, 1)], H3: [(tree.orphan, 0)],
    }  # fmt: skip
    assert set(report.chunk_refs) == set(tree.meta.chunk_refs())
    assert run(tree, repair=True).ok
    assert tree.kv.seq == seq
    out = json.loads(json.dumps(report.to_json()))
    assert out == {"ok": True, "inodes": 7, "entries": 6, "blocks": 4, "chunks": 3, "problems": []}


def test_snapshot_op_and_acl_records_are_part_of_a_clean_volume(tree: Tree) -> None:
    """Every kind of key Meta and the snapshot code write is in the schema fsck reads (issue 13:
    each ``N<name>`` snapshot key was reported as bad-key)."""
    snapshots.create(tree.kv, "vol", "before-upgrade", 1)
    snapshots.create(tree.kv, "vol", "nightly.2026-12-02", 2)
    tree.meta.setxattr(tree.f, b"trusted.t", b"1", op=Op("mount-1", b"\0" * 8 + (7).to_bytes(8, "big")))
    access = bytes.fromhex("02000000" "0100" "0600" "ffffffff" "0200" "0400" "e8030000"
                           "0400" "0000" "ffffffff" "1000" "0400" "ffffffff" "2000" "0000" "ffffffff")
    tree.meta.setxattr(tree.f, b"system.posix_acl_access", access)  # u::rw- u:1000:r-- g::--- m::r-- o::---
    report = run(tree)
    assert report.ok, report.problems
    assert run(tree, repair=True).ok


def test_every_key_meta_writes_decodes(tree: Tree) -> None:
    snapshots.create(tree.kv, "vol", "s1", 1)
    decoded = [keys.decode_key(k) for k, _ in tree.kv.scan(b"")]
    kinds = {type(k).__name__ for k in decoded}
    assert kinds == {"AttrKey", "DentryKey", "BlockKey", "SymlinkKey", "XattrKey", "CounterKey", "OrphanKey",
                     "SnapshotKey"}
    assert keys.SnapshotKey("s1") in decoded and keys.OrphanKey(tree.orphan) in decoded
    assert keys.BlockKey(tree.f, 1) in decoded and keys.DentryKey(tree.d, b"f2") in decoded
    op_key = keys.op_key("m", b"\0" * 8 + (5).to_bytes(8, "big"))
    assert keys.decode_key(op_key) == keys.OpKey(keys.mount_hash("m"), 5)
    for raw, ino, tag in ((b"Zjunk", 0, b""), (keys.inode_prefix(3) + b"Q", 3, b"Q"),
                          (keys.block_prefix(4) + b"xx", 4, b"C"), (b"A\0", 0, b""), (b"N\xff", 0, b""),
                          (b"O\0", 0, b""), (keys.OP_PREFIX + b"short", 0, b""), (keys.attr_key(5) + b"x", 5, b"I")):
        with pytest.raises(keys.BadKey) as e:
            keys.decode_key(raw)
        assert (e.value.ino, e.value.tag) == (ino, tag), raw


def test_problem_json(tree: Tree) -> None:
    damage(tree.kv, {keys.attr_key(tree.f): put_attr(tree, tree.f, nlink=9)})
    out = run(tree).to_json()
    assert out["ok"] is False
    assert out["problems"] == [{"kind": "nlink", "ino": tree.f, "detail": "nlink 9, expected 2", "repaired": False}]


# -- entries --------------------------------------------------------------------------------------
def test_dangling_file_entry(tree: Tree) -> None:
    damage(tree.kv, {keys.dentry_key(tree.d, b"ghost"): keys.encode_dentry(999, stat.S_IFREG)})
    check(tree, "dangling-entry")
    assert tree.kv.get(keys.dentry_key(tree.d, b"ghost")) is None


def test_dangling_dir_entry_fixes_parent_nlink(tree: Tree) -> None:
    nlink = tree.attr(ROOT).nlink
    damage(tree.kv, {
        keys.dentry_key(ROOT, b"ghost"): keys.encode_dentry(999, stat.S_IFDIR),
        keys.attr_key(ROOT): put_attr(tree, ROOT, nlink=nlink + 1),  # as mkdir would have counted it
    })  # fmt: skip
    check(tree, "dangling-entry")
    assert tree.attr(ROOT).nlink == nlink


def test_deleted_file_attr(tree: Tree) -> None:
    """The file's name dangles and its blocks are stray; the counters follow the cleanup."""
    used, inodes = counter(tree.kv, keys.USED_BYTES), counter(tree.kv, keys.INODES)
    damage(tree.kv, deletes=(keys.attr_key(tree.g),))
    check(tree, "dangling-entry", "stray-key", "counter-inodes")
    assert tree.meta.readdir(tree.e) == []
    assert list(tree.kv.scan(keys.inode_prefix(tree.g))) == []
    assert counter(tree.kv, keys.USED_BYTES) == used - 10
    assert counter(tree.kv, keys.INODES) == inodes - 1


def test_deleted_dir_attr_adopts_its_children(tree: Tree) -> None:
    d_nlink = tree.attr(tree.d).nlink
    damage(tree.kv, deletes=(keys.attr_key(tree.e),))
    report = check(tree, "dangling-entry", "stray-key", "orphan-inode", "counter-inodes")
    assert [p.ino for p in report.problems if p.kind == "orphan-inode"] == [tree.g]
    assert tree.attr(tree.d).nlink == d_nlink - 1
    lf = lost_found(tree)
    assert tree.meta.lookup(lf.ino, b"#%d" % tree.g).ino == tree.g
    assert tree.meta.get_blocks(tree.g)[1] == {0: whole(H1, 10)}


def test_entry_type(tree: Tree) -> None:
    damage(tree.kv, {keys.dentry_key(ROOT, b"f"): keys.encode_dentry(tree.f, stat.S_IFDIR)})
    check(tree, "entry-type")
    assert tree.kv.get(keys.dentry_key(ROOT, b"f")) == keys.encode_dentry(tree.f, stat.S_IFREG)


def test_undecodable_entry_is_deleted(tree: Tree) -> None:
    damage(tree.kv, {keys.dentry_key(ROOT, b"junk"): b"xyz"})
    check(tree, "bad-entry")
    assert tree.kv.get(keys.dentry_key(ROOT, b"junk")) is None


def test_entry_in_a_file_is_deleted(tree: Tree) -> None:
    damage(tree.kv, {keys.dentry_key(tree.f, b"x"): keys.encode_dentry(tree.g, stat.S_IFREG)})
    check(tree, "bad-entry")
    assert tree.attr(tree.g).nlink == 1


def test_second_entry_for_a_dir(tree: Tree) -> None:
    damage(tree.kv, {keys.dentry_key(ROOT, b"e2"): keys.encode_dentry(tree.e, stat.S_IFDIR)})
    check(tree, "bad-entry")
    assert tree.kv.get(keys.dentry_key(ROOT, b"e2")) is None
    assert tree.meta.lookup(tree.d, b"e").ino == tree.e


# -- orphans --------------------------------------------------------------------------------------
def test_unnamed_inodes_go_to_lost_found(tree: Tree, clock: FakeClock) -> None:
    root, inodes = tree.attr(ROOT), counter(tree.kv, keys.INODES)
    damage(tree.kv, deletes=(keys.dentry_key(ROOT, b"s"), keys.dentry_key(tree.d, b"e")))
    report = check(tree, "orphan-inode", "nlink")  # nlink: d lost its subdirectory
    assert sorted(p.ino for p in report.problems if p.kind == "orphan-inode") == [tree.e, tree.s]
    lf = lost_found(tree)
    assert stat.S_ISDIR(lf.mode) and stat.S_IMODE(lf.mode) == 0o700 and lf.parent == ROOT
    assert lf.mtime_ns <= clock.now and lf.nlink == 3
    assert {n for n, _ in tree.meta.readdir(lf.ino)} == {b"#%d" % tree.e, b"#%d" % tree.s}
    assert tree.meta.readlink(tree.s) == b"d/e/g"
    assert tree.attr(tree.e).parent == lf.ino
    assert tree.meta.lookup(tree.e, b"..").ino == lf.ino
    assert tree.attr(ROOT).nlink == root.nlink + 1
    assert counter(tree.kv, keys.INODES) == inodes + 1
    assert counter(tree.kv, keys.NEXT_INODE) == lf.ino + 1
    tree.meta.mkdir(ROOT, b"new", 0o755, 0, 0)  # the inode counter still hands out free numbers


def test_existing_lost_found_is_reused(tree: Tree) -> None:
    lf = tree.meta.mkdir(ROOT, LOST_FOUND, 0o700, 0, 0)
    tree.meta.mknod(lf.ino, b"#%d" % tree.s, stat.S_IFREG, 0, 0, 0)  # the name is taken
    damage(tree.kv, deletes=(keys.dentry_key(ROOT, b"s"),))
    check(tree, "orphan-inode")
    assert tree.meta.lookup(lf.ino, b"#%d.1" % tree.s).ino == tree.s
    assert lost_found(tree).ino == lf.ino


def test_lost_found_that_is_a_file_blocks_adoption(tree: Tree) -> None:
    tree.meta.mknod(ROOT, LOST_FOUND, stat.S_IFREG, 0, 0, 0)
    damage(tree.kv, deletes=(keys.dentry_key(ROOT, b"s"),))
    seq = tree.kv.seq
    report = run(tree, repair=True)
    assert [(p.kind, p.repaired) for p in report.problems] == [("orphan-inode", False)]
    assert tree.kv.seq == seq


def test_unlinked_orphan_not_open_is_purged(tree: Tree) -> None:
    used, inodes = counter(tree.kv, keys.USED_BYTES), counter(tree.kv, keys.INODES)
    tree.meta.handles.forget("")  # a restart forgot the open handle: only fsck can free it
    assert H3 not in run(tree).chunk_refs
    check(tree, "orphan-inode")
    assert list(tree.kv.scan(keys.inode_prefix(tree.orphan))) == []
    assert tree.kv.get(keys.orphan_key(tree.orphan)) is None
    assert counter(tree.kv, keys.USED_BYTES) == used - 50
    assert counter(tree.kv, keys.INODES) == inodes - 1


def test_stale_orphan_marks(tree: Tree) -> None:
    damage(tree.kv, {keys.orphan_key(tree.f): b"", keys.orphan_key(999): b""})
    check(tree, "orphan-inode")
    assert tree.kv.get(keys.orphan_key(tree.f)) is None
    assert tree.attr(tree.f).nlink == 2


def test_orphan_that_lost_its_attr(tree: Tree) -> None:
    damage(tree.kv, deletes=(keys.attr_key(tree.orphan),))
    check(tree, "stray-key", "orphan-inode", "counter-inodes")
    assert list(tree.kv.scan(keys.ORPHAN_PREFIX)) == list(tree.kv.scan(keys.inode_prefix(tree.orphan))) == []


# -- links ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which,nlink", [("f", 1), ("f", 5), ("d", 2), ("d", 9), ("s", 0)])
def test_wrong_nlink(tree: Tree, which: str, nlink: int) -> None:
    ino = getattr(tree, which)
    want = tree.attr(ino).nlink
    damage(tree.kv, {keys.attr_key(ino): put_attr(tree, ino, nlink=nlink)})
    check(tree, "nlink")
    assert tree.attr(ino).nlink == want


def test_dir_parent(tree: Tree) -> None:
    damage(tree.kv, {keys.attr_key(tree.e): put_attr(tree, tree.e, parent=ROOT)})
    check(tree, "dir-parent")
    assert tree.attr(tree.e).parent == tree.d


# -- blocks ---------------------------------------------------------------------------------------
def test_blocks_past_eof(tree: Tree) -> None:
    """Whole blocks past EOF go, long ones are trimmed; the counter is set to match (as found)."""
    used = counter(tree.kv, keys.USED_BYTES)
    damage(tree.kv, {
        keys.block_key(tree.f, 7): keys.encode_block(((H3, 0, 10),)),  # wholly past EOF
        keys.block_key(tree.f, 1): keys.encode_block(((H2, 0, 900),)),  # past EOF (size is BLOCK + 100)
        keys.block_key(tree.g, 0): keys.encode_block(((H1, 0, BLOCK + 5),)),  # longer than a block
        keys.block_key(tree.e, 0): keys.encode_block(((H3, 0, 1),)),  # a directory has no data
        keys.block_key(tree.s, 0): keys.encode_block(((H3, 0, 0),)),  # an empty entry
        keys.counter_key(keys.USED_BYTES): keys.encode_u64(used + 10 + 800 + BLOCK - 5 + 1),
    })  # fmt: skip
    report = check(tree, "block-past-eof")
    assert len(report.problems) == 5
    assert tree.meta.get_blocks(tree.f)[1] == {0: whole(H1, BLOCK), 1: whole(H2, 100)}
    assert tree.meta.get_blocks(tree.g)[1] == {0: whole(H1, 10)}
    assert list(tree.kv.scan(keys.block_prefix(tree.e))) == list(tree.kv.scan(keys.block_prefix(tree.s))) == []
    assert counter(tree.kv, keys.USED_BYTES) == used
    assert report.chunk_refs[H3] == [(tree.orphan, 0)]


def test_undecodable_blocks(tree: Tree) -> None:
    used = counter(tree.kv, keys.USED_BYTES)
    damage(tree.kv, {
        keys.block_key(tree.f, 1): b"short",
        keys.block_prefix(tree.f) + b"xx": keys.encode_block(((H3, 0, 1),)),  # index of the wrong length
    })  # fmt: skip
    report = check(tree, "bad-block", "counter-used")
    assert len([p for p in report.problems if p.kind == "bad-block"]) == 2
    assert tree.meta.get_blocks(tree.f)[1] == {0: whole(H1, BLOCK)}  # block 1 is now a hole
    assert counter(tree.kv, keys.USED_BYTES) == used - 100


# -- attrs, keys and the root ---------------------------------------------------------------------
def test_undecodable_attr_is_reported_not_repaired(tree: Tree) -> None:
    damage(tree.kv, {keys.attr_key(tree.f): b"garbage"})
    seq = tree.kv.seq
    for repair in (False, True):
        report = run(tree, repair)
        assert [(p.kind, p.ino, p.repaired) for p in report.problems] == [("bad-attr", tree.f, False)]
        assert (tree.f, 0) in report.chunk_refs[H1]  # its data is not given up
    assert tree.kv.seq == seq


def test_unknown_key_is_reported(tree: Tree) -> None:
    damage(tree.kv, {b"Zjunk": b"", keys.inode_prefix(tree.f) + b"Q": b""})
    report = run(tree, repair=True)
    assert [(p.kind, p.repaired) for p in report.problems] == [("bad-key", False)] * 2


@pytest.mark.parametrize("root_mode", [None, stat.S_IFREG | 0o755])
def test_unreadable_root_repairs_nothing(tree: Tree, root_mode: int | None) -> None:
    """No root (or a file as root): the rest is reported, nothing is written."""
    puts = {keys.dentry_key(ROOT, b"junk"): b"x"}
    if root_mode is not None:
        puts[keys.attr_key(ROOT)] = put_attr(tree, ROOT, mode=root_mode)
    damage(tree.kv, puts, deletes=(keys.attr_key(ROOT),) if root_mode is None else ())
    seq = tree.kv.seq
    report = run(tree, repair=True)
    want = {"no-root", "bad-entry"} | ({"counter-inodes"} if root_mode is None else set())
    assert {p.kind for p in report.problems} == want  # no orphans: the tree still hangs together
    assert not any(p.repaired for p in report.problems)
    assert tree.kv.seq == seq


# -- counters -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,value,kind",
    [(keys.USED_BYTES, keys.encode_u64(1), "counter-used"), (keys.USED_BYTES, b"bad", "counter-used"),
     (keys.INODES, keys.encode_u64(100), "counter-inodes"), (keys.INODES, None, "counter-inodes"),
     (keys.NEXT_INODE, keys.encode_u64(3), "counter-next"), (keys.NEXT_INODE, b"", "counter-next")],
)  # fmt: skip
def test_counters(tree: Tree, name: bytes, value: bytes | None, kind: str) -> None:
    want = {keys.USED_BYTES: BLOCK + 100 + 10 + 50, keys.INODES: 7, keys.NEXT_INODE: tree.orphan + 1}[name]
    if value is None:
        damage(tree.kv, deletes=(keys.counter_key(name),))
    else:
        damage(tree.kv, {keys.counter_key(name): value})
    check(tree, kind)
    assert counter(tree.kv, name) == want


def test_many_problems_in_one_batch(tree: Tree) -> None:
    damage(tree.kv, {
        keys.attr_key(tree.f): put_attr(tree, tree.f, nlink=1),
        keys.block_key(tree.g, 3): keys.encode_block(((H2, 0, 5),)),
        keys.dentry_key(ROOT, b"ghost"): keys.encode_dentry(999, stat.S_IFLNK),
        keys.counter_key(keys.INODES): keys.encode_u64(2),
    }, deletes=(keys.dentry_key(ROOT, b"s"),))  # fmt: skip
    check(tree, "nlink", "block-past-eof", "dangling-entry", "counter-inodes", "orphan-inode", "counter-used")


# -- no false alarms ------------------------------------------------------------------------------
# Each op gets (meta, some inode, some dir, another dir, a name, a number); FsError is fine.
OPS: dict[str, Callable[[Meta, int, int, int, bytes, int], object]] = {
    "mknod": lambda m, ino, d, d2, name, n: m.mknod(d, name, stat.S_IFREG | 0o644, 0, 0, 0),
    "mkdir": lambda m, ino, d, d2, name, n: m.mkdir(d, name, 0o755, 0, 0),
    "link": lambda m, ino, d, d2, name, n: m.link(ino, d, name),
    "unlink": lambda m, ino, d, d2, name, n: m.unlink(d, name),
    "rmdir": lambda m, ino, d, d2, name, n: m.rmdir(d, name),
    "rename": lambda m, ino, d, d2, name, n: m.rename(d, name, d2, name.swapcase()),
    "write": lambda m, ino, d, d2, name, n: m.commit_blocks(ino, {n % 3: (H1, 1 + n)}, (n % 3) * BLOCK + 1 + n),
    "truncate": lambda m, ino, d, d2, name, n: m.setattr(ino, size=n * 97),
    "open": lambda m, ino, d, d2, name, n: m.open(ino),
    "release": lambda m, ino, d, d2, name, n: m.release(ino),
}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(OPS)), st.integers(0, 99), st.integers(0, 99),
                          st.sampled_from([b"a", b"b", b"A"])), max_size=40))  # fmt: skip
def test_whatever_meta_does_is_clean(steps: list[tuple[str, int, int, bytes]]) -> None:
    """Any sequence of Meta operations leaves a keyspace fsck finds nothing wrong with."""
    m = Meta(MemKV(), capacity=100 * BLOCK, block_size=BLOCK, clock=FakeClock())
    m.init_root()
    for op, i, j, name in steps:
        inos = [k for k in range(1, counter(m.kv, keys.NEXT_INODE)) if m.kv.get(keys.attr_key(k))]
        dirs = [k for k in inos if stat.S_ISDIR(m.getattr(k).mode)]
        with contextlib.suppress(FsError):
            OPS[op](m, inos[i % len(inos)], dirs[j % len(dirs)], dirs[i % len(dirs)], name, i)
    assert fsck(m.kv, block_size=BLOCK, is_open=m._is_open).ok
    report = fsck(m.kv, block_size=BLOCK, repair=True)  # a restart: every orphan is closed
    assert {p.kind for p in report.problems} <= {"orphan-inode"}
    assert fsck(m.kv, block_size=BLOCK).ok


# -- on RocksDB, replicated -----------------------------------------------------------------------
def test_repair_on_rocks_replicates(tmp_path: Path, clock: FakeClock) -> None:
    """The repair is an ordinary logged batch: a follower that applies the log ends up clean too."""
    store = RocksKV(str(tmp_path / "kv"))
    m = Meta(store, capacity=10 * BLOCK, block_size=BLOCK, clock=clock)
    m.init_root()
    t = build(m)
    damage(store, {
        keys.attr_key(t.d): put_attr(t, t.d, nlink=1),
        keys.block_key(t.f, 9): keys.encode_block(((H3, 0, 1),)),
    }, deletes=(keys.dentry_key(t.e, b"g"),))  # fmt: skip
    check(t, "nlink", "block-past-eof", "orphan-inode", "counter-used")
    follower = MemKV()
    for seq, data in store.log_since(0):
        follower.apply(seq, data)
    assert fsck(follower, block_size=BLOCK, is_open=m._is_open).ok
    store.close()
    reopened = RocksKV(str(tmp_path / "kv"))
    try:
        report = fsck(reopened, block_size=BLOCK, is_open=m._is_open)
        assert report.ok and report.inodes == 8  # the seven plus /lost+found
        assert report.chunk_refs == fsck(follower, block_size=BLOCK, is_open=m._is_open).chunk_refs
    finally:
        reopened.close()
