"""Extended attributes: their namespaces as ext4 answers them, over the ``A<ino>X<name>`` keys.

The kernel checks part of the rules before a request reaches a FUSE filesystem (``xattr_permission``
in fs/xattr.c: CAP_SYS_ADMIN for ``trusted.*`` reads and writes, file types and modes for
``user.*``, an LSM for ``security.*`` writes); what it leaves to the filesystem is here:

- a name is in a namespace the volume keeps (``user.``, ``trusted.``, ``security.``) or is one of
  the two POSIX ACL names; anything else, other ``system.*`` names included, is EOPNOTSUPP;
- ``user.*`` only on regular files and directories: EPERM to change, ENODATA to read elsewhere;
- ``trusted.*`` is neither read, written nor listed for an unprivileged caller. Only the mount
  knows the caller, so it asks ``for_caller`` and ``listed`` (``pxfs.vfs``); the kernel's own check
  stands in front of it;
- the POSIX ACL names hold ACLs (``pxfs.meta.acl``): setting the access ACL sets the mode, and one
  a mode can say is not kept; chmod rewrites the access ACL (``chmod``); a new inode gets its
  parent's default ACL (``inherit``). Removing an ACL that is not there is no error, as on ext4.

Each function fills one ``Txn`` (or reads through one) and leaves committing to the caller.
"""

from __future__ import annotations

import errno
import stat

from pxfs.errors import FsError
from pxfs.meta import acl, keys
from pxfs.meta.txn import Txn

XATTR_CREATE = 1
XATTR_REPLACE = 2
NAME_MAX = 255  # bytes, as XATTR_NAME_MAX
SIZE_MAX = 65536  # bytes of a value, as XATTR_SIZE_MAX

USER = b"user."
TRUSTED = b"trusted."
SECURITY = b"security."
ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
_PREFIXES = (USER, TRUSTED, SECURITY)


def check_name(ino: int, name: bytes) -> None:
    """A name the volume can keep at all; the errno Linux gives for the first thing wrong with it."""
    if not name or len(name) > NAME_MAX:
        raise FsError(errno.ERANGE if name else errno.EINVAL, f"inode {ino}",
                      f"xattr name of {len(name)} bytes (1 to {NAME_MAX})")
    if b"\0" in name:
        raise FsError(errno.EINVAL, f"inode {ino}", f"xattr name {name[:80]!r} with a NUL byte")
    if name in (ACL_ACCESS, ACL_DEFAULT):
        return
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            if name == prefix:
                raise FsError(errno.EINVAL, f"inode {ino}", f"xattr name {name!r} is only a namespace")
            return
    raise FsError(errno.EOPNOTSUPP, f"inode {ino}", f"xattr namespace of {name[:80]!r} not supported")


def for_caller(ino: int, name: bytes, privileged: bool, writing: bool) -> None:
    """``trusted.*`` is for CAP_SYS_ADMIN only: EPERM to change, absent to read, as fs/xattr.c."""
    if name.startswith(TRUSTED) and not privileged:
        if writing:
            raise FsError(errno.EPERM, f"inode {ino}", f"xattr {name[:80]!r} needs CAP_SYS_ADMIN")
        raise FsError(errno.ENODATA, f"inode {ino}", f"no xattr {name[:80]!r}")


def listed(names: list[bytes], privileged: bool) -> list[bytes]:
    """The names a caller sees in listxattr(2): ``trusted.*`` only for a privileged one."""
    return names if privileged else [n for n in names if not n.startswith(TRUSTED)]


def _check_type(a: keys.Attr, name: bytes, writing: bool) -> None:
    if name.startswith(USER) and not (stat.S_ISREG(a.mode) or stat.S_ISDIR(a.mode)):
        if writing:
            raise FsError(errno.EPERM, f"inode {a.ino}", "user.* xattrs only on regular files and directories")
        raise FsError(errno.ENODATA, f"inode {a.ino}", f"no xattr {name[:80]!r}")


def set_xattr(txn: Txn, ino: int, name: bytes, value: bytes, flags: int) -> None:
    check_name(ino, name)
    if flags & ~(XATTR_CREATE | XATTR_REPLACE):
        raise FsError(errno.EINVAL, f"inode {ino}", f"unknown setxattr flags {flags:#x}")
    if len(value) > SIZE_MAX:
        raise FsError(errno.E2BIG, f"inode {ino}", f"xattr value of {len(value)} bytes (at most {SIZE_MAX})")
    a = txn.attr(ino)
    _check_type(a, name, writing=True)
    if name in (ACL_ACCESS, ACL_DEFAULT):
        _set_acl(txn, a, name, acl.decode(value, f"inode {ino} {name.decode()}"))
        return
    key = keys.xattr_key(ino, name)
    exists = txn.get(key) is not None
    if flags & XATTR_CREATE and exists:
        raise FsError(errno.EEXIST, f"inode {ino}", f"xattr {name!r} exists")
    if flags & XATTR_REPLACE and not exists:
        raise FsError(errno.ENODATA, f"inode {ino}", f"no xattr {name!r}")
    txn.put(key, value)
    txn.save(a)


def get_xattr(txn: Txn, ino: int, name: bytes) -> bytes:
    check_name(ino, name)
    _check_type(txn.attr(ino), name, writing=False)
    value = txn.get(keys.xattr_key(ino, name))
    if value is None:
        raise FsError(errno.ENODATA, f"inode {ino}", f"no xattr {name[:80]!r}")
    return value


def list_xattrs(txn: Txn, ino: int) -> list[bytes]:
    txn.attr(ino)
    prefix = keys.xattr_prefix(ino)
    return [k[len(prefix) :] for k, _ in txn.kv.scan(prefix)]


def remove_xattr(txn: Txn, ino: int, name: bytes) -> None:
    check_name(ino, name)
    a = txn.attr(ino)
    _check_type(a, name, writing=True)
    if name in (ACL_ACCESS, ACL_DEFAULT):
        _set_acl(txn, a, name, None)  # the mode stays what the ACL made it
        return
    key = keys.xattr_key(ino, name)
    if txn.get(key) is None:
        raise FsError(errno.ENODATA, f"inode {ino}", f"no xattr {name[:80]!r}")
    txn.delete(key)
    txn.save(a)


# -- POSIX ACLs ---------------------------------------------------------------------------------
def _set_acl(txn: Txn, a: keys.Attr, name: bytes, entries: acl.Acl | None) -> None:
    """Keep ``entries`` (None: remove) as ``a``'s access or default ACL, as ext4's ``__ext4_set_acl``."""
    if stat.S_ISLNK(a.mode):
        raise FsError(errno.EOPNOTSUPP, f"inode {a.ino}", "a symlink has no ACLs")
    key = keys.xattr_key(a.ino, name)
    if name == ACL_DEFAULT:
        if not stat.S_ISDIR(a.mode):
            if entries is None:
                return
            raise FsError(errno.EACCES, f"inode {a.ino}", "a default ACL is for directories only")
    elif entries is not None:
        a.mode, more = acl.equiv_mode(entries, a.mode)
        if not more:
            entries = None  # the mode says it all
    if entries is None:
        if txn.get(key) is not None:
            txn.delete(key)
    else:
        txn.put(key, acl.encode(entries))
    txn.save(a)


def chmod(txn: Txn, a: keys.Attr) -> None:
    """``a``'s mode changed: its access ACL, if it has one, follows (owner, mask or group, other)."""
    key = keys.xattr_key(a.ino, ACL_ACCESS)
    raw = txn.get(key)
    if raw is None or stat.S_ISLNK(a.mode):
        return
    entries = acl.decode(raw, f"inode {a.ino} access ACL")
    if entries is not None:
        txn.put(key, acl.encode(acl.chmod(entries, a.mode)))


def inherit(txn: Txn, parent: keys.Attr, a: keys.Attr) -> None:
    """A new inode ``a`` in ``parent``: its access ACL and mode from the parent's default ACL, masked
    by the create mode, and for a directory the default ACL itself (``posix_acl_create``)."""
    if stat.S_ISLNK(a.mode):
        return
    raw = txn.get(keys.xattr_key(parent.ino, ACL_DEFAULT))
    if raw is None:
        return
    default = acl.decode(raw, f"inode {parent.ino} default ACL")
    if default is None:
        return
    access, a.mode, more = acl.create_masq(default, a.mode)
    if more:
        txn.put(keys.xattr_key(a.ino, ACL_ACCESS), acl.encode(access))
    if stat.S_ISDIR(a.mode):
        txn.put(keys.xattr_key(a.ino, ACL_DEFAULT), raw)
