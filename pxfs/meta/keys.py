"""The metadata key schema, written down once, and the helpers that encode and decode it.

All integers are big-endian so that keys sort numerically; ``<ino>`` is 8 bytes. Every key of an
inode starts with ``A<ino>``, so purging an inode is one prefix scan.

    A<ino>I            attr:    ver:1 mode:4 nlink:4 uid:4 gid:4 rdev:8 size:8
                                atime_ns:8 mtime_ns:8 ctime_ns:8 parent:8   (parent: dirs only)
    A<ino>D<name>      dentry:  child ino:8 + file type:1 (mode >> 12)
    A<ino>C<idx:8>     block:   its slices (pxfs.meta.slices), later over earlier, zeros where none
                                reaches; a missing entry is a hole. One slice at offset 0 is
                                hash:32 + length:4 (the block is chunk[:length]); any other list
                                is 0x01 + (hash:32 + offset:4 + length:4) per slice
    A<ino>S            symlink: target bytes
    A<ino>X<name>      xattr:   value bytes
    C<name>            counter: value:8 (nextInode, usedBytes, inodes, metaBytes: bytes of entry
                                names, xattr names and values and symlink targets, the metadata
                                charged against the quota; see pxfs.meta.quota)
    O<ino>             orphan:  empty; nlink is 0 but the file is still open
    G<ino>             purge:   empty; the inode is gone (no attr, no names, no xattrs) but its
                                block entries are too many for one batch: they are deleted
                                PURGE_BATCH at a time in later batches (Meta.purge_step)
    M                  maintenance mark: JSON {"job": "restore", "snapshot", "after", ...} or
                                {"job": "fsck"}; written by the first batch of a job that rewrites
                                the keyspace in many batches and deleted by its last: while it is
                                there the keyspace is a mix, served to no mount (pxfs.meta.maintenance)
    N<name>            snapshot: JSON {"created_ns"}; every replica takes a checkpoint of the
                                keyspace when it commits the batch that creates this key
    P<mount:8><slot:2> op record: op id:16 + kind:1 (0: no result, 1: an Attr) [+ ino:8 + attr]
                                written in the batch of the mutation it answers, so that a retry
                                of that op id gets the same answer (pxfs.meta.opids); <mount> is
                                blake2b-64 of the mount id, <slot> the op counter mod OP_SLOTS:
                                a ring, at most OP_SLOTS records per mount
    0xff...            reserved by pxfs.meta.kv: sequence number and replication log

``decode_key`` is the one reader of this schema: it turns a raw key into one of the typed keys
below (``AttrKey`` ... ``OpKey``) or raises ``BadKey``; fsck, snapshots, op ids, handles and the
chunk scans all read keys through it (or through ``block_entries``), none slices them by hand.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pxfs.errors import Corrupt
from pxfs.meta.slices import Block, extent

ROOT_INO = 1
HASH_LEN = 32

NEXT_INODE = b"nextInode"
USED_BYTES = b"usedBytes"
INODES = b"inodes"
META_BYTES = b"metaBytes"

_U64 = struct.Struct(">Q")
_ATTR_VERSION = 1
_ATTR = struct.Struct(">BIIIIQQqqqQ")
_DENTRY = struct.Struct(">QB")
_BLOCK = struct.Struct(f">{HASH_LEN}sI")
_SLICE = struct.Struct(f">{HASH_LEN}sII")
_LEN_AT_END = struct.Struct(">I")
_SLICES_VERSION = 1


@dataclass
class Attr:
    """An inode's attributes; ``mode`` includes the S_IF type bits, ``parent`` is set for dirs only."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    parent: int = 0


INODE_PREFIX = b"A"


def inode_prefix(ino: int) -> bytes:
    return INODE_PREFIX + _U64.pack(ino)


def attr_key(ino: int) -> bytes:
    return inode_prefix(ino) + b"I"


def dentry_prefix(parent: int) -> bytes:
    return inode_prefix(parent) + b"D"


def dentry_key(parent: int, name: bytes) -> bytes:
    return dentry_prefix(parent) + name


def block_prefix(ino: int) -> bytes:
    return inode_prefix(ino) + b"C"


def block_key(ino: int, idx: int) -> bytes:
    return block_prefix(ino) + _U64.pack(idx)


def symlink_key(ino: int) -> bytes:
    return inode_prefix(ino) + b"S"


def xattr_prefix(ino: int) -> bytes:
    return inode_prefix(ino) + b"X"


def xattr_key(ino: int, name: bytes) -> bytes:
    return xattr_prefix(ino) + name


COUNTER_PREFIX = b"C"


def counter_key(name: bytes) -> bytes:
    return COUNTER_PREFIX + name


ORPHAN_PREFIX = b"O"
PURGE_PREFIX = b"G"
PURGE_BATCH = 4096  # block entries one batch deletes: ~100 KB of batch, ~10 ms of the loop


def purge_key(ino: int) -> bytes:
    return PURGE_PREFIX + _U64.pack(ino)


MAINTENANCE_KEY = b"M"
SNAPSHOT_PREFIX = b"N"


def snapshot_key(name: str) -> bytes:
    return SNAPSHOT_PREFIX + name.encode()


OP_PREFIX = b"P"
OP_SLOTS = 4096
OP_ID_LEN = 16  # what a mount sends: a random session prefix:8 + counter:8
_SLOT = struct.Struct(">H")
OP_KEY_LEN = 1 + 8 + _SLOT.size
_OP_NONE, _OP_ATTR = 0, 1


def mount_hash(mount: str) -> bytes:
    """8 bytes naming a mount in op-record keys (mount ids are up to 128 characters)."""
    return hashlib.blake2b(mount.encode(), digest_size=8).digest()


def op_prefix(mount: str) -> bytes:
    return OP_PREFIX + mount_hash(mount)


def op_key(mount: str, op_id: bytes) -> bytes:
    counter = _U64.unpack(op_id[8:16])[0]
    return op_prefix(mount) + _SLOT.pack(counter % OP_SLOTS)


def encode_op_record(op_id: bytes, attr: Attr | None) -> bytes:
    if attr is None:
        return op_id + bytes([_OP_NONE])
    return op_id + bytes([_OP_ATTR]) + _U64.pack(attr.ino) + encode_attr(attr)


def decode_op_record(value: bytes) -> tuple[bytes, Attr | None]:
    """(op id, the recorded result); Corrupt for a record this schema cannot have written."""
    op_id, kind, rest = value[:OP_ID_LEN], value[OP_ID_LEN : OP_ID_LEN + 1], value[OP_ID_LEN + 1 :]
    if len(op_id) != OP_ID_LEN or kind not in (bytes([_OP_NONE]), bytes([_OP_ATTR])):
        raise Corrupt("op record", f"bad record ({len(value)} bytes)")
    if kind[0] == _OP_NONE:
        if rest:
            raise Corrupt("op record", f"{len(rest)} stray bytes after a record without result")
        return op_id, None
    if len(rest) != 8 + _ATTR.size:
        raise Corrupt("op record", f"bad attr result ({len(rest)} bytes)")
    ino = _U64.unpack(rest[:8])[0]
    return op_id, decode_attr(ino, rest[8:])


def orphan_key(ino: int) -> bytes:
    return ORPHAN_PREFIX + _U64.pack(ino)


def orphan_ino(key: bytes) -> int:
    return _U64.unpack(key[len(ORPHAN_PREFIX) :])[0]


def block_idx(key: bytes) -> int:
    """The block index at the end of a ``block_key``."""
    return _U64.unpack(key[-8:])[0]


def encode_attr(a: Attr) -> bytes:
    return _ATTR.pack(
        _ATTR_VERSION, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.size,
        a.atime_ns, a.mtime_ns, a.ctime_ns, a.parent,
    )  # fmt: skip


def decode_attr(ino: int, value: bytes) -> Attr:
    if len(value) != _ATTR.size or value[0] != _ATTR_VERSION:
        raise Corrupt(f"inode {ino}", f"bad attr record ({len(value)} bytes)")
    _, mode, nlink, uid, gid, rdev, size, atime, mtime, ctime, parent = _ATTR.unpack(value)
    return Attr(ino, mode, nlink, uid, gid, rdev, size, atime, mtime, ctime, parent)


def encode_dentry(ino: int, mode: int) -> bytes:
    return _DENTRY.pack(ino, (mode >> 12) & 0xF)


def decode_dentry(value: bytes) -> tuple[int, int]:
    """(child ino, file type bits as in S_IFMT)."""
    if len(value) != _DENTRY.size:
        raise Corrupt("dentry", f"{len(value)}-byte value, not {_DENTRY.size}")
    ino, ftype = _DENTRY.unpack(value)
    return ino, ftype << 12


def encode_block(block: Block) -> bytes:
    if len(block) == 1 and block[0][1] == 0:
        return _BLOCK.pack(block[0][0], block[0][2])
    return bytes([_SLICES_VERSION]) + b"".join(_SLICE.pack(*s) for s in block)


def block_length(value: bytes) -> int:
    """``slices.extent`` of an encoded block entry, without decoding the common one-chunk form."""
    if len(value) == _BLOCK.size:
        return _LEN_AT_END.unpack_from(value, HASH_LEN)[0]
    return extent(decode_block(value))


def decode_block(value: bytes) -> Block:
    if len(value) == _BLOCK.size:
        digest, length = _BLOCK.unpack(value)
        return ((digest, 0, length),)
    if not value or value[0] != _SLICES_VERSION or (len(value) - 1) % _SLICE.size:
        raise Corrupt("block entry", f"{len(value)}-byte value, neither one chunk nor a slice list")
    return tuple(_SLICE.iter_unpack(memoryview(value)[1:]))


def encode_u64(n: int) -> bytes:
    return _U64.pack(n)


def decode_u64(value: bytes | None) -> int:
    return _U64.unpack(value)[0] if value else 0


def decode_counter(value: bytes) -> int:
    """A stored counter; Corrupt unless it is 8 bytes (``decode_u64`` reads a missing one as 0)."""
    if len(value) != _U64.size:
        raise Corrupt("counter", f"{len(value)}-byte value, not {_U64.size}")
    return _U64.unpack(value)[0]


def touched(keys: list[bytes]) -> tuple[set[int], set[tuple[int, bytes]]]:
    """The inodes whose attributes or data and the (parent, name) entries that writes to ``keys`` change."""
    inodes: set[int] = set()
    entries: set[tuple[int, bytes]] = set()
    for raw in keys:
        if not raw.startswith(INODE_PREFIX):
            continue
        try:
            key = decode_key(raw)
        except BadKey:
            continue  # nothing a mount caches: no callback to make
        if isinstance(key, DentryKey):
            entries.add((key.parent, key.name))
        elif isinstance(key, InodeKey):
            inodes.add(key.ino)
    return inodes, entries


# -- the decoder ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InodeKey:
    """A key under ``A<ino>``: it goes when the inode is purged."""

    ino: int


@dataclass(frozen=True)
class AttrKey(InodeKey):
    pass


@dataclass(frozen=True)
class DentryKey(InodeKey):
    """``ino`` is the directory the entry is in."""

    name: bytes

    @property
    def parent(self) -> int:
        return self.ino


@dataclass(frozen=True)
class BlockKey(InodeKey):
    idx: int


@dataclass(frozen=True)
class SymlinkKey(InodeKey):
    pass


@dataclass(frozen=True)
class XattrKey(InodeKey):
    name: bytes


@dataclass(frozen=True)
class CounterKey:
    name: bytes


@dataclass(frozen=True)
class OrphanKey:
    ino: int


@dataclass(frozen=True)
class PurgeKey:
    ino: int


@dataclass(frozen=True)
class MaintenanceKey:
    pass


@dataclass(frozen=True)
class SnapshotKey:
    name: str


@dataclass(frozen=True)
class OpKey:
    mount: bytes  # mount_hash() of the mount id
    slot: int


Key = (AttrKey | DentryKey | BlockKey | SymlinkKey | XattrKey | CounterKey | OrphanKey | PurgeKey
       | MaintenanceKey | SnapshotKey | OpKey)


class BadKey(Corrupt):
    """A key this schema cannot have written; ``ino`` is its inode for an ``A<ino>`` key, else 0,
    and ``tag`` the record type byte after it (b"C" for a block key with a malformed index)."""

    def __init__(self, raw: bytes, cause: str, ino: int = 0, tag: bytes = b"") -> None:
        super().__init__(f"key {raw[:40]!r}", cause)
        self.raw, self.ino, self.tag = raw, ino, tag


_INODE_TAGS = {b"I": AttrKey, b"S": SymlinkKey}  # tags without anything after them


def decode_key(raw: bytes) -> Key:
    """The typed key ``raw`` is, or BadKey: the one parser of the schema above."""
    head = raw[:1]
    if head == INODE_PREFIX:
        if len(raw) < 10:
            raise BadKey(raw, "inode key shorter than A<ino:8><tag>")
        ino = _U64.unpack_from(raw, 1)[0]
        tag, rest = raw[9:10], raw[10:]
        if tag in _INODE_TAGS and not rest:
            return _INODE_TAGS[tag](ino)
        if tag == b"D" and rest:
            return DentryKey(ino, rest)
        if tag == b"X" and rest:
            return XattrKey(ino, rest)
        if tag == b"C":
            if len(rest) != 8:
                raise BadKey(raw, f"block index of {len(rest)} bytes, not 8", ino, tag)
            return BlockKey(ino, _U64.unpack(rest)[0])
        raise BadKey(raw, f"no inode record {tag!r} with {len(rest)} bytes after it", ino, tag)
    if head == COUNTER_PREFIX and len(raw) > 1:
        return CounterKey(raw[1:])
    if head == ORPHAN_PREFIX and len(raw) == 1 + 8:
        return OrphanKey(orphan_ino(raw))
    if head == PURGE_PREFIX and len(raw) == 1 + 8:
        return PurgeKey(_U64.unpack_from(raw, 1)[0])
    if raw == MAINTENANCE_KEY:
        return MaintenanceKey()
    if head == SNAPSHOT_PREFIX and len(raw) > 1:
        try:
            return SnapshotKey(raw[1:].decode())
        except UnicodeDecodeError:
            raise BadKey(raw, "snapshot name is not UTF-8") from None
    if head == OP_PREFIX and len(raw) == OP_KEY_LEN:
        return OpKey(raw[1:9], _SLOT.unpack_from(raw, 9)[0])
    raise BadKey(raw, "not in the schema")


def block_entries(items: Iterable[tuple[bytes, bytes]]) -> Iterator[tuple[BlockKey, Block]]:
    """(key, slices) of every block entry among ``items`` (a scan of ``INODE_PREFIX``), for the
    chunk scans; keys and values that do not decode are fsck's to report, skipped here."""
    for raw, value in items:
        if raw[9:10] != b"C":  # the cheap test first: most inode keys are not blocks
            continue
        try:
            key = decode_key(raw)
            if not isinstance(key, BlockKey):
                continue
            block = decode_block(value)
        except Corrupt:
            continue
        yield key, block
