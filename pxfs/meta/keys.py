"""The metadata key schema, written down once, and the helpers that encode and decode it.

All integers are big-endian so that keys sort numerically; ``<ino>`` is 8 bytes. Every key of an
inode starts with ``A<ino>``, so purging an inode is one prefix scan.

    A<ino>I            attr:    ver:1 mode:4 nlink:4 uid:4 gid:4 rdev:8 size:8
                                atime_ns:8 mtime_ns:8 ctime_ns:8 parent:8   (parent: dirs only)
    A<ino>D<name>      dentry:  child ino:8 + file type:1 (mode >> 12)
    A<ino>C<idx:8>     block:   BLAKE3-256 hash:32 + length:4; the block's data is chunk[:length]
                                followed by zeros up to the block end; a missing entry is a hole
    A<ino>S            symlink: target bytes
    A<ino>X<name>      xattr:   value bytes
    C<name>            counter: value:8 (nextInode, usedBytes, inodes)
    O<ino>             orphan:  empty; nlink is 0 but the file is still open
    N<name>            snapshot: JSON {"created_ns"}; every replica takes a checkpoint of the
                                keyspace when it commits the batch that creates this key
    0xff...            reserved by pxfs.meta.kv: sequence number and replication log
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pxfs.errors import Corrupt

ROOT_INO = 1
HASH_LEN = 32

NEXT_INODE = b"nextInode"
USED_BYTES = b"usedBytes"
INODES = b"inodes"

_U64 = struct.Struct(">Q")
_ATTR_VERSION = 1
_ATTR = struct.Struct(">BIIIIQQqqqQ")
_DENTRY = struct.Struct(">QB")
_BLOCK = struct.Struct(f">{HASH_LEN}sI")


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


def inode_prefix(ino: int) -> bytes:
    return b"A" + _U64.pack(ino)


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


def counter_key(name: bytes) -> bytes:
    return b"C" + name


ORPHAN_PREFIX = b"O"


SNAPSHOT_PREFIX = b"N"


def snapshot_key(name: str) -> bytes:
    return SNAPSHOT_PREFIX + name.encode()


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
    ino, ftype = _DENTRY.unpack(value)
    return ino, ftype << 12


def encode_block(digest: bytes, length: int) -> bytes:
    return _BLOCK.pack(digest, length)


def decode_block(value: bytes) -> tuple[bytes, int]:
    digest, length = _BLOCK.unpack(value)
    return digest, length


def encode_u64(n: int) -> bytes:
    return _U64.pack(n)


def decode_u64(value: bytes | None) -> int:
    return _U64.unpack(value)[0] if value else 0


def touched(keys: list[bytes]) -> tuple[set[int], set[tuple[int, bytes]]]:
    """The inodes whose attributes or data and the (parent, name) entries that writes to ``keys`` change."""
    inodes: set[int] = set()
    entries: set[tuple[int, bytes]] = set()
    for key in keys:
        if len(key) < 10 or key[:1] != b"A":
            continue
        ino = _U64.unpack_from(key, 1)[0]
        if key[9:10] == b"D":
            entries.add((ino, key[10:]))
        else:
            inodes.add(ino)
    return inodes, entries
