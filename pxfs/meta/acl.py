"""POSIX ACLs in the xattr format the kernel sends and expects, and the mode arithmetic ext4 does.

With FUSE_POSIX_ACL the kernel checks access against the ACLs it reads from
``system.posix_acl_access`` and caches; keeping those xattrs and the mode in step is the
filesystem's job. These are the rules of fs/posix_acl.c, written once:

- ``equiv_mode``: what setting an access ACL does to the mode (``posix_acl_update_mode``); an ACL
  with only the three base entries is the mode itself and is not stored;
- ``chmod``: what chmod(2) does to a stored access ACL (``__posix_acl_chmod``);
- ``create_masq``: a new inode's access ACL from its parent's default ACL and its create mode
  (``posix_acl_create_masq``).

The value is ``posix_acl_xattr_header`` (version 2, little-endian) followed by entries of
tag:2 perm:2 id:4; ids count only for ``USER`` and ``GROUP`` entries.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, replace

from pxfs.errors import FsError

VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
_RWX = 0o7
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")


@dataclass(frozen=True)
class Entry:
    tag: int
    perm: int
    id: int = UNDEFINED_ID


Acl = tuple[Entry, ...]


def decode(value: bytes, what: str = "acl") -> Acl | None:
    """Parse and validate an ACL as ``posix_acl_from_xattr`` and ``posix_acl_valid``; None: no entries
    (which removes the ACL). EINVAL for a malformed or invalid ACL, EOPNOTSUPP for another version."""
    if len(value) < _HEADER.size:
        raise FsError(errno.EINVAL, what, f"ACL of {len(value)} bytes, shorter than its header")
    if _HEADER.unpack_from(value)[0] != VERSION:
        raise FsError(errno.EOPNOTSUPP, what, f"ACL version {_HEADER.unpack_from(value)[0]}, not {VERSION}")
    body = len(value) - _HEADER.size
    if body % _ENTRY.size:
        raise FsError(errno.EINVAL, what, f"ACL body of {body} bytes is not whole entries")
    if body == 0:
        return None
    entries = tuple(Entry(tag, perm, id_ if tag in (USER, GROUP) else UNDEFINED_ID)
                    for tag, perm, id_ in _ENTRY.iter_unpack(value[_HEADER.size :]))
    _validate(entries, what)
    return entries


def _validate(entries: Acl, what: str) -> None:
    """One USER_OBJ, GROUP_OBJ and OTHER, named entries in between in tag order, a MASK when any."""
    state, needs_mask = USER_OBJ, False
    for e in entries:
        if e.perm & ~_RWX:
            raise FsError(errno.EINVAL, what, f"ACL entry perm {e.perm:#o} beyond rwx")
        if e.tag == USER_OBJ and state == USER_OBJ:
            state = USER
        elif e.tag == USER and state == USER:
            needs_mask = True
        elif e.tag == GROUP_OBJ and state == USER:
            state = GROUP
        elif e.tag == GROUP and state == GROUP:
            needs_mask = True
        elif e.tag == MASK and state == GROUP:
            state = OTHER
        elif e.tag == OTHER and (state == OTHER or (state == GROUP and not needs_mask)):
            state = 0
        else:
            raise FsError(errno.EINVAL, what, f"ACL entry tag {e.tag:#x} out of place")
    if state != 0:
        raise FsError(errno.EINVAL, what, "ACL without its user, group or other entry")


def encode(entries: Acl) -> bytes:
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(e.tag, e.perm, e.id) for e in entries)


def equiv_mode(entries: Acl, mode: int) -> tuple[int, bool]:
    """(``mode`` with its rwx bits from the ACL, whether the ACL says more than a mode can)."""
    bits, more = 0, False
    for e in entries:
        if e.tag == USER_OBJ:
            bits |= e.perm << 6
        elif e.tag == GROUP_OBJ:
            bits |= e.perm << 3
        elif e.tag == OTHER:
            bits |= e.perm
        elif e.tag == MASK:  # the mask stands for the group bits (it follows GROUP_OBJ)
            bits = (bits & ~0o070) | e.perm << 3
            more = True
        else:
            more = True
    return (mode & ~0o777) | bits, more


def chmod(entries: Acl, mode: int) -> Acl:
    """The access ACL after chmod(2) to ``mode``: owner, other, and the mask (else the group) follow it."""
    has_mask = any(e.tag == MASK for e in entries)
    out = []
    for e in entries:
        if e.tag == USER_OBJ:
            e = replace(e, perm=(mode >> 6) & _RWX)
        elif e.tag == OTHER:
            e = replace(e, perm=mode & _RWX)
        elif e.tag == MASK or (e.tag == GROUP_OBJ and not has_mask):
            e = replace(e, perm=(mode >> 3) & _RWX)
        out.append(e)
    return tuple(out)


def create_masq(default: Acl, mode: int) -> tuple[Acl, int, bool]:
    """A new inode's (access ACL, mode, whether that ACL says more than the mode) from its parent's
    default ACL and the mode it was created with: each side masks the other."""
    has_mask = any(e.tag == MASK for e in default)
    out: list[Entry] = []
    more = False
    for e in default:
        if e.tag == USER_OBJ:
            e = replace(e, perm=e.perm & (mode >> 6))
            mode &= (e.perm << 6) | ~0o700
        elif e.tag == OTHER:
            e = replace(e, perm=e.perm & mode)
            mode &= e.perm | ~0o007
        elif e.tag in (USER, GROUP):
            more = True
        out.append(e)
    for i, e in enumerate(out):
        if e.tag == MASK or (e.tag == GROUP_OBJ and not has_mask):
            out[i] = e = replace(e, perm=e.perm & (mode >> 3))
            mode &= (e.perm << 3) | ~0o070
            more = more or e.tag == MASK
    return tuple(out), mode, more
