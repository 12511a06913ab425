"""Consistency check of one volume's metadata keyspace, with an optional repair of what is safe.

``Meta`` writes every mutation as one atomic batch, so a healthy volume never shows half an
operation; what fsck looks for is damage from outside that contract: a bug, a hand-edited store,
a replica that diverged. It reads the whole keyspace once (the schema is in ``pxfs.meta.keys``),
builds the tree as it will be after repair, and compares every stored fact with it.

The repair is written as bounded batches (``pxfs.meta.maintenance.batches``) that ship to the
followers in the ordinary replication stream; the coordinator writes them under the maintenance
mark, so that no mount sees the keyspace half repaired and a crash half way has the repair run
again before anything else (``check`` computes them, so that it can run outside the event loop
while nothing writes). Repairs never throw file data away: an unreferenced inode is moved into
``/lost+found``; only inodes already on the orphan list (unlinked, waiting for their last close)
are purged. Nothing is repaired when the root cannot be read, since the tree to repair towards
is then unknown.

Not checked: directory cycles cut off from the root (every directory there has an entry, so none
looks orphaned), and whether the chunks the block maps name exist; ``chunk_refs`` lists them so
that the caller can ask the replicas.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pxfs.errors import Corrupt
from pxfs.meta import keys, maintenance, quota, slices
from pxfs.meta.keys import ROOT_INO, Attr
from pxfs.meta.kv import KV, Op
from pxfs.meta.slices import Block

LOST_FOUND = b"lost+found"


def _is_block(raw: bytes) -> bool:
    try:
        return isinstance(keys.decode_key(raw), keys.BlockKey)
    except keys.BadKey:
        return False


@dataclass
class Problem:
    """One inconsistency; ``repaired`` means the repair batch that fsck wrote fixes it."""

    kind: str
    ino: int
    detail: str
    repaired: bool = False


@dataclass
class FsckReport:
    """What fsck found; the counts are of records scanned, ``chunk_refs`` of blocks kept."""

    problems: list[Problem] = field(default_factory=list)
    inodes: int = 0
    entries: int = 0
    blocks: int = 0
    # hash -> (ino, block index) of every block entry that survives repair: the chunks the
    # volume still needs, for the caller to check on the replicas.
    chunk_refs: dict[bytes, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """Summary for the CLI and RPC: the chunk list can be huge, so only its size goes out."""
        return {
            "ok": self.ok, "inodes": self.inodes, "entries": self.entries, "blocks": self.blocks,
            "chunks": len(self.chunk_refs), "problems": [asdict(p) for p in self.problems],
        }  # fmt: skip


@dataclass
class _Entry:
    parent: int
    name: bytes
    child: int
    ftype: int  # S_IFMT bits as stored in the entry


def fsck(
    kv: KV,
    *,
    block_size: int,
    repair: bool = False,
    is_open: Callable[[int], bool] = lambda ino: False,
    clock: Callable[[], int] = time.time_ns,
) -> FsckReport:
    """Check ``kv``; with ``repair`` fix what is safe, in bounded batches. Without it, write nothing.

    ``is_open`` tells which orphans still have open handles (those are kept); ``clock`` stamps the
    ctime of repaired inodes and the times of a new ``/lost+found``.
    """
    report, ops = check(kv, block_size=block_size, repair=repair, is_open=is_open, clock=clock)
    for batch in maintenance.batches(ops):
        kv.write(batch)
    return report


def check(
    kv: KV,
    *,
    block_size: int,
    repair: bool = False,
    is_open: Callable[[int], bool] = lambda ino: False,
    clock: Callable[[], int] = time.time_ns,
) -> tuple[FsckReport, list[Op]]:
    """Check ``kv`` (writing nothing) and, with ``repair``, list the writes that fix what is safe."""
    return _Fsck(kv, block_size, repair, is_open, clock()).run()


class _Fsck:
    """One run: the decoded keyspace, the tree after repair, and the pending repair writes."""

    def __init__(self, kv: KV, block_size: int, repair: bool, is_open: Callable[[int], bool], now: int) -> None:
        self.kv, self.bs, self.repair, self.is_open, self.now = kv, block_size, repair, is_open, now
        self.report = FsckReport()
        self.attrs: dict[int, Attr] = {}
        self.bad_attrs: set[int] = set()
        self.entries: list[_Entry] = []
        self.blocks: dict[int, list[tuple[int, Block]]] = {}
        self.inode_keys: dict[int, list[bytes]] = {}
        self.orphans: set[int] = set()
        self.purging: set[int] = set()  # on the purge list: block entries without attr are expected
        self.counters: dict[bytes, int | None] = {}
        self.max_ino = 0  # highest inode number with any key (grows if /lost+found is created)
        self.scanned_max = 0
        self.used_before = 0
        self.meta_before = 0  # metadata bytes as found (pxfs.meta.quota)
        # The tree after repair: who names each inode, and what the repairs change on the way.
        self.refs: dict[int, list[_Entry]] = {}
        self.implied: dict[int, int] = {}  # nlink change a repair causes (not a problem of its own)
        # Files whose nlink adoption sets as a side effect; left alone if they stay unnamed.
        self.explained: set[int] = set()
        self.gone: set[int] = set()
        self.lost_found: Attr | None = None
        self.used_removed = 0
        self.inodes_delta = 0
        self.ops: dict[bytes, bytes | None] = {}
        self.dirty: set[int] = set()

    def problem(self, kind: str, ino: int, detail: str, fixable: bool = True) -> bool:
        """Record a problem; True when the caller should add its fix to the repair batch."""
        fix = self.repair and fixable
        self.report.problems.append(Problem(kind, ino, detail, fix))
        return fix

    def save(self, a: Attr) -> None:
        a.ctime_ns = self.now
        self.dirty.add(a.ino)

    def run(self) -> tuple[FsckReport, list[Op]]:
        self._scan()
        root = self.attrs.get(ROOT_INO)
        if root is None or not stat.S_ISDIR(root.mode):
            if ROOT_INO not in self.bad_attrs:  # an undecodable root is already reported as such
                what = "has no attr" if root is None else f"is not a directory (mode {root.mode:#o})"
                self.problem("no-root", ROOT_INO, f"the root {what}", fixable=False)
            self.repair = False  # without a readable root there is no tree to repair towards
            for p in self.report.problems:
                p.repaired = False
        self._strays()
        self._check_entries()
        self._check_orphans()
        self._check_links()
        self._check_blocks()
        self._check_counters()
        if not self.repair:
            return self.report, []
        for ino in self.dirty - self.gone:
            self.ops[keys.attr_key(ino)] = keys.encode_attr(self.attrs[ino])
        return self.report, list(self.ops.items())

    # -- reading ----------------------------------------------------------------------------------
    def _scan(self) -> None:
        """Decode every key once (``keys.decode_key``); undecodable records are reported as met."""
        for raw, value in self.kv.scan(b""):
            try:
                key = keys.decode_key(raw)
            except keys.BadKey as e:
                self._bad_key(e)
                continue
            if isinstance(key, keys.InodeKey):
                self._scan_inode_key(raw, key, value)
            elif isinstance(key, keys.CounterKey):
                try:
                    self.counters[key.name] = keys.decode_counter(value)
                except Corrupt:
                    self.counters[key.name] = None
            elif isinstance(key, keys.OrphanKey):
                self.orphans.add(key.ino)  # a mark alone claims no inode number
            elif isinstance(key, keys.PurgeKey):
                self.purging.add(key.ino)
            elif isinstance(key, keys.OpKey):
                self._scan_op_record(raw, value)
            # A SnapshotKey names a checkpoint of the replicas, nothing in this tree to check.
        self.report.inodes = len(self.attrs) + len(self.bad_attrs)
        self.scanned_max = self.max_ino

    def _bad_key(self, e: keys.BadKey) -> None:
        """A key outside the schema: reported, kept (nobody knows what it was), unless it is a block
        key with a malformed index (a hole is all a reader could make of it), which goes."""
        if e.ino:
            self.max_ino = max(self.max_ino, e.ino)
            self.inode_keys.setdefault(e.ino, []).append(e.raw)
        if e.tag == b"C":
            self.report.blocks += 1
            if self.problem("bad-block", e.ino, e.cause):
                self.ops[e.raw] = None
            return
        self.problem("bad-key", e.ino, f"{e.obj}: {e.cause}", fixable=False)

    def _scan_op_record(self, key: bytes, value: bytes) -> None:
        """An op record answers retries only: a bad one is dropped (a retry then simply runs again)."""
        try:
            keys.decode_op_record(value)
        except Corrupt as e:
            if self.problem("bad-op-record", 0, f"key {key!r}: {e.cause}"):
                self.ops[key] = None

    def _scan_inode_key(self, raw: bytes, key: keys.InodeKey, value: bytes) -> None:
        ino = key.ino
        self.max_ino = max(self.max_ino, ino)
        self.inode_keys.setdefault(ino, []).append(raw)
        self.meta_before += quota.record_bytes(raw, value)
        if isinstance(key, keys.AttrKey):
            try:
                self.attrs[ino] = keys.decode_attr(ino, value)
            except Corrupt as e:
                self.bad_attrs.add(ino)
                self.problem("bad-attr", ino, e.cause, fixable=False)
        elif isinstance(key, keys.DentryKey):
            self.report.entries += 1
            try:
                child, ftype = keys.decode_dentry(value)
            except Corrupt as e:
                if self.problem("bad-entry", ino, f"entry {key.name!r}: {e.cause}"):
                    self.ops[raw] = None
                return
            self.entries.append(_Entry(ino, key.name, child, ftype))
        elif isinstance(key, keys.BlockKey):
            self.report.blocks += 1
            try:
                block = keys.decode_block(value)
            except Corrupt as e:
                if self.problem("bad-block", ino, f"block {key.idx}: {e.cause}"):
                    self.ops[raw] = None
                return
            self.blocks.setdefault(ino, []).append((key.idx, block))
            self.used_before += slices.extent(block)

    def _strays(self) -> None:
        """Keys of an inode without attr (entries of a lost directory too) are unreachable: drop them.

        A missing root is left alone: its entries still hold the tree, nothing is repaired anyway.
        """
        for ino in sorted(self.purging & set(self.attrs)):
            # purge_step would drop the mark and keep the blocks; fsck says so and does the same.
            if self.problem("purge-live", ino, "on the purge list but has an attr"):
                self.ops[keys.purge_key(ino)] = None
        for ino, inode_keys in self.inode_keys.items():
            if ino in self.attrs or ino in self.bad_attrs or ino == ROOT_INO:
                continue
            if ino in self.purging and all(_is_block(raw) for raw in inode_keys):
                continue  # block entries the purge steps have yet to delete
            if self.problem("stray-key", ino, f"{len(inode_keys)} keys of an inode without attr"):
                for key in inode_keys:
                    self.ops[key] = None
                self.used_removed += sum(slices.extent(b) for _, b in self.blocks.get(ino, ()))
            self.blocks.pop(ino, None)
            self.gone.add(ino)

    def _known(self, ino: int) -> bool:
        return ino in self.attrs or ino in self.bad_attrs

    # -- the name space ---------------------------------------------------------------------------
    def _check_entries(self) -> None:
        """Keep the entries that point at real inodes from real directories; fix their type bytes."""
        for e in self.entries:
            if e.parent in self.gone:
                continue  # deleted with the stray keys of its directory
            key = keys.dentry_key(e.parent, e.name)
            parent = self.attrs.get(e.parent)
            if parent is not None and not stat.S_ISDIR(parent.mode) and e.parent != ROOT_INO:
                if self.problem("bad-entry", e.parent, f"entry {e.name!r} in a non-directory"):
                    self.ops[key] = None
                continue
            if not self._known(e.child):
                if self.problem("dangling-entry", e.parent, f"entry {e.name!r} names missing inode {e.child}"):
                    self.ops[key] = None
                if e.ftype == stat.S_IFDIR:  # the parent's nlink counted it: part of this problem
                    self.implied[e.parent] = self.implied.get(e.parent, 0) - 1
                continue
            child = self.attrs.get(e.child)
            if child is not None and stat.S_IFMT(child.mode) != e.ftype:
                detail = f"entry {e.name!r} has type {e.ftype:#o}, inode {e.child} is {stat.S_IFMT(child.mode):#o}"
                if self.problem("entry-type", e.parent, detail):
                    self.ops[key] = keys.encode_dentry(e.child, child.mode)
            self.refs.setdefault(e.child, []).append(e)
        # A directory has exactly one name (the root none): keep the one its parent field agrees with.
        # ``refs`` describes the tree after repair in both modes, so both report the same problems.
        for ino, refs in self.refs.items():
            a = self.attrs.get(ino)
            if a is None or not stat.S_ISDIR(a.mode):
                continue
            keep = [] if ino == ROOT_INO else [next((e for e in refs if e.parent == a.parent), refs[0])]
            for e in refs:
                if e not in keep and self.problem("bad-entry", e.parent, f"extra entry {e.name!r} for dir {ino}"):
                    self.ops[keys.dentry_key(e.parent, e.name)] = None
            refs[:] = keep

    def _check_orphans(self) -> None:
        """Unnamed inodes: purge unlinked orphans nobody has open, adopt the rest into /lost+found."""
        for ino in sorted(self.orphans):
            if not self._known(ino):  # the stray keys of the inode are under A<ino>, the mark is not
                if self.problem("orphan-inode", ino, "orphan mark for a missing inode"):
                    self.ops[keys.orphan_key(ino)] = None
            elif self.refs.get(ino):
                # purge_orphans() would free a file that still has a name: drop the mark.
                if self.problem("orphan-inode", ino, "orphan mark on an inode that has entries"):
                    self.ops[keys.orphan_key(ino)] = None
        for ino in sorted(self.attrs):
            a = self.attrs[ino]
            if ino == ROOT_INO or self.refs.get(ino) or ino in self.gone or a is self.lost_found:
                continue
            has_children = any(e.parent == ino for e in self.entries)
            if ino in self.orphans and a.nlink == 0 and not has_children:
                if not self.is_open(ino):
                    self._purge(ino, self.problem("orphan-inode", ino, "unlinked and not open"))
            elif ino in self.orphans:
                self._adopt(a, f"on the orphan list with nlink {a.nlink}")
            else:
                self._adopt(a, "no entry names it")

    def _purge(self, ino: int, fix: bool) -> None:
        """Drop every key of an orphan; its chunks leave ``chunk_refs`` even when only reporting."""
        used = sum(slices.extent(b) for _, b in self.blocks.pop(ino, ()))
        self.gone.add(ino)
        if fix:
            for key in self.inode_keys[ino]:
                self.ops[key] = None
            self.ops[keys.orphan_key(ino)] = None
            self.used_removed += used
            self.inodes_delta -= 1

    def _adopt(self, a: Attr, why: str) -> None:
        """Give an unnamed inode the name ``/lost+found/#<ino>`` so its data stays reachable."""
        lf = self._lost_found() if self.repair else None
        if not stat.S_ISDIR(a.mode):
            self.explained.add(a.ino)  # its nlink becomes right with its new name
        if not self.problem("orphan-inode", a.ino, why, fixable=lf is not None) or lf is None:
            return
        name, n = b"#%d" % a.ino, 0
        while self.kv.get(keys.dentry_key(lf.ino, name)) is not None:
            n += 1
            name = b"#%d.%d" % (a.ino, n)
        e = _Entry(lf.ino, name, a.ino, stat.S_IFMT(a.mode))
        self.ops[keys.dentry_key(lf.ino, name)] = keys.encode_dentry(a.ino, a.mode)
        self.refs[a.ino] = [e]
        if a.ino in self.orphans:
            self.ops[keys.orphan_key(a.ino)] = None
        if stat.S_ISDIR(a.mode):
            a.parent = lf.ino
            self.save(a)
            self.implied[lf.ino] = self.implied.get(lf.ino, 0) + 1
        lf.mtime_ns = self.now
        self.save(lf)

    def _lost_found(self) -> Attr | None:
        """The existing /lost+found or a new one (mode 0700); None if that name is not a usable dir."""
        if self.lost_found is not None:
            return self.lost_found
        old = next((e for e in self.entries if e.parent == ROOT_INO and e.name == LOST_FOUND), None)
        if old is not None:
            a = self.attrs.get(old.child)
            kept = old in self.refs.get(old.child, [])
            self.lost_found = a if kept and a is not None and stat.S_ISDIR(a.mode) else None
            return self.lost_found
        if self.kv.get(keys.dentry_key(ROOT_INO, LOST_FOUND)) is not None:
            return None  # an undecodable entry, deleted by this repair: adopt on the next run
        ino = max(self.counters.get(keys.NEXT_INODE) or 0, self.max_ino + 1)
        a = Attr(ino, stat.S_IFDIR | 0o700, 2, 0, 0, 0, 0, self.now, self.now, self.now, ROOT_INO)
        self.attrs[ino] = self.lost_found = a
        self.max_ino = ino
        self.inodes_delta += 1
        self.refs[ino] = [_Entry(ROOT_INO, LOST_FOUND, ino, stat.S_IFDIR)]
        self.ops[keys.dentry_key(ROOT_INO, LOST_FOUND)] = keys.encode_dentry(ino, a.mode)
        self.implied[ROOT_INO] = self.implied.get(ROOT_INO, 0) + 1
        self.explained.add(ino)
        self.save(a)
        return a

    def _check_links(self) -> None:
        """nlink: names of a file, 2 + subdirectories of a dir; a dir's parent: where its name is."""
        subdirs: dict[int, int] = {}
        for ino, refs in self.refs.items():
            child = self.attrs.get(ino)
            is_dir = stat.S_ISDIR(child.mode) if child is not None else refs[0].ftype == stat.S_IFDIR
            for e in refs if is_dir else ():
                subdirs[e.parent] = subdirs.get(e.parent, 0) + 1
        for ino, a in self.attrs.items():
            if ino in self.gone or ino == ROOT_INO and not stat.S_ISDIR(a.mode):
                continue  # a root that is no directory is reported, and its entries still count
            is_dir = stat.S_ISDIR(a.mode)
            want = 2 + subdirs.get(ino, 0) if is_dir else len(self.refs.get(ino, ()))
            if a.nlink != want and not (ino in self.explained and not self.refs.get(ino)):
                explained = ino in self.explained or a.nlink + self.implied.get(ino, 0) == want
                if explained or self.problem("nlink", ino, f"nlink {a.nlink}, expected {want}"):
                    a.nlink = want
                    self.save(a)
            refs = self.refs.get(ino) or []
            if is_dir and (refs or ino == ROOT_INO):
                holder = ROOT_INO if ino == ROOT_INO else refs[0].parent
                if a.parent != holder and self.problem("dir-parent", ino, f"parent {a.parent}, entry in {holder}"):
                    a.parent = holder
                    self.save(a)

    # -- data and counters ------------------------------------------------------------------------
    def _check_blocks(self) -> None:
        """Block entries must lie within the file and their block; list the chunks that remain."""
        for ino, blocks in self.blocks.items():
            a = self.attrs.get(ino)
            size = a.size if a is not None and stat.S_ISREG(a.mode) else 0
            for idx, block in blocks:
                length = slices.extent(block)
                keep = length if a is None else max(0, min(length, self.bs, size - idx * self.bs))
                kept = slices.cut(block, keep)
                if keep < length or keep == 0:
                    what = "is empty" if length == 0 else f"({length} bytes) is past EOF {size}"
                    if keep:
                        what = f"runs past EOF {size} or block size: {length} -> {keep} bytes"
                    if self.problem("block-past-eof", ino, f"block {idx} {what}"):
                        key = keys.block_key(ino, idx)
                        self.ops[key] = keys.encode_block(kept) if kept else None
                        self.used_removed += length - keep
                for digest in slices.hashes(kept):
                    self.report.chunk_refs.setdefault(digest, []).append((ino, idx))

    def _check_counters(self) -> None:
        """Counters are judged against the keyspace as found; the repair writes the repaired totals."""
        inodes = self.report.inodes
        meta_after = self.meta_before + quota.meta_delta(self.ops, self.kv.get)[0]
        checks = [
            (keys.USED_BYTES, "counter-used", self.used_before, self.used_before - self.used_removed),
            (keys.INODES, "counter-inodes", inodes, inodes + self.inodes_delta),
            (keys.META_BYTES, "counter-meta", self.meta_before, meta_after),
        ]
        for name, kind, found, after in checks:
            stored = self.counters.get(name, 0)
            fix = stored == found or self.problem(kind, 0, f"{name.decode()} is {stored}, counted {found}")
            if fix and self.repair and stored != after:
                self.ops[keys.counter_key(name)] = keys.encode_u64(after)
        stored = self.counters.get(keys.NEXT_INODE, 0)
        ok = stored is not None and stored > self.scanned_max
        fix = ok or self.problem("counter-next", 0, f"nextInode is {stored}, inode {self.scanned_max} exists")
        if fix and self.repair and (stored is None or stored <= self.max_ino):
            self.ops[keys.counter_key(keys.NEXT_INODE)] = keys.encode_u64(self.max_ino + 1)
