"""What a volume's quota counts besides file data: metadata bytes and inodes.

A name, an xattr or a symlink target is stored on every replica's state disk, so it is charged
against the volume's size like data is: the ``metaBytes`` counter holds the bytes of every entry
name, xattr name and value, and symlink target (``record_bytes``). Data plus metadata may not pass
the capacity (ENOSPC, as ext4 without quotas answers a full disk). Inodes have a limit of their own
(``max_inodes``, as ext4's inode table fixed at mkfs): a file with a one-byte name costs one byte
here but a whole inode record on every replica, and the limit is what bounds those.

Growth is refused, shrinking never is: a remove, an unlink or a shorter value must work on a volume
already past its limits (a resize may shrink the quota below what is in use).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from pxfs.errors import NoSpace
from pxfs.meta import keys

_COUNTED_TAGS = frozenset((b"D", b"X", b"S"))


@dataclass(frozen=True)
class Limits:
    """The quota a transaction is held to; ``max_inodes`` 0 means no inode limit."""

    capacity: int
    max_inodes: int = 0


def record_bytes(raw: bytes, value: bytes | None) -> int:
    """Bytes of the record ``raw`` = ``value`` that count against the quota (None: no record)."""
    if value is None or raw[:1] != keys.INODE_PREFIX or raw[9:10] not in _COUNTED_TAGS:
        return 0  # the cheap test first: attrs and block entries are most of the keyspace
    try:
        key = keys.decode_key(raw)
    except keys.BadKey:
        return 0  # fsck's to report; nothing a Meta write produces
    if isinstance(key, keys.DentryKey):
        return len(key.name)
    if isinstance(key, keys.XattrKey):
        return len(key.name) + len(value)
    if isinstance(key, keys.SymlinkKey):
        return len(value)
    return 0


def recount(items: Iterable[tuple[bytes, bytes]]) -> int:
    """The metadata bytes of a whole keyspace (a scan of ``INODE_PREFIX``)."""
    return sum(record_bytes(k, v) for k, v in items)


def _describe(raw: bytes) -> str:
    key = keys.decode_key(raw)
    if isinstance(key, keys.DentryKey):
        return f"entry {key.name[:80]!r} in inode {key.parent}"
    if isinstance(key, keys.XattrKey):
        return f"xattr {key.name[:80]!r} of inode {key.ino}"
    assert isinstance(key, keys.InodeKey)
    return f"symlink inode {key.ino}"


def meta_delta(pending: Mapping[bytes, bytes | None], old: Callable[[bytes], bytes | None]) -> tuple[int, str]:
    """(change of metadata bytes that ``pending`` writes make, the record that grows most);
    ``old`` reads a key as it is before them."""
    delta, most, what = 0, 0, ""
    for raw, value in pending.items():
        if raw[:1] != keys.INODE_PREFIX or raw[9:10] not in _COUNTED_TAGS:
            continue
        d = record_bytes(raw, value) - record_bytes(raw, old(raw))
        delta += d
        if d > most:
            most, what = d, _describe(raw)
    return delta, what


def check_space(limits: Limits, used: int, meta: int, data_delta: int, meta_delta: int, what: str) -> None:
    """NoSpace when growth would take data plus metadata past the capacity; shrinking always passes."""
    if data_delta + meta_delta <= 0:
        return
    if used + meta + data_delta + meta_delta > limits.capacity:
        raise NoSpace(what, f"quota: {used} bytes of data + {meta} of metadata + {data_delta + meta_delta} "
                      f"more > capacity {limits.capacity}")


def check_inodes(limits: Limits, inodes: int, what: str) -> None:
    """NoSpace when ``inodes`` (the count after a create) passes the inode limit."""
    if limits.max_inodes and inodes > limits.max_inodes:
        raise NoSpace(what, f"no free inode: all {limits.max_inodes} of the volume's inodes are in use")
