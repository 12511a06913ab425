"""Directory entry names: the checks every name passes on its way into the metadata.

Every name a request carries is resolved through ``Txn.lookup`` (lookup, create, link, unlink,
rmdir and both names of a rename), which calls ``check_length``; the mount calls it too before it
answers a lookup from the names it already knows (``pxfs.vfs.dircache``), so ENAMETOOLONG never
depends on what a cache holds.
"""

from __future__ import annotations

import errno

from pxfs.errors import FsError

NAME_MAX = 255  # bytes, as ext4; the kernel passes FUSE names of up to 1024 bytes


def check_length(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, f"name {name[:32]!r}...", f"{len(name)} bytes, longer than {NAME_MAX}")


def check_name(name: bytes, creating: bool = False) -> None:
    """Reject names no directory entry may have; "." and ".." already exist when creating."""
    check_length(name)
    if not name or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, repr(name), "invalid name")
    if name in (b".", b".."):
        raise FsError(errno.EEXIST if creating else errno.EINVAL, repr(name), "reserved name")
