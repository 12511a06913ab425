"""xattr namespaces as ext4 answers them (pxfs.meta.xattrs), through Meta."""

from __future__ import annotations

import errno
import stat

import pytest

from pxfs.errors import FsError
from pxfs.meta import acl, xattrs
from pxfs.meta.fs import Meta
from tests.meta.test_fs import ROOT, fails, mkdir, mkfile


def test_kept_namespaces(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    for name in (b"user.a", b"trusted.b", b"security.c"):
        meta.setxattr(f.ino, name, b"v")
        assert meta.getxattr(f.ino, name) == b"v"
    # Meta lists everything; what a caller may see is the mount's to filter (see below).
    assert meta.listxattr(f.ino) == [b"security.c", b"trusted.b", b"user.a"]


@pytest.mark.parametrize("name", [b"foo.bar", b"userx", b"system.foo", b"system.posix_acl", b"os2.x", b"x"])
def test_unknown_namespaces_are_eopnotsupp(meta: Meta, name: bytes) -> None:
    f = mkfile(meta, ROOT, b"f")
    seq = meta.kv.seq
    fails(errno.EOPNOTSUPP, meta.setxattr, f.ino, name, b"v")
    fails(errno.EOPNOTSUPP, meta.getxattr, f.ino, name)
    fails(errno.EOPNOTSUPP, meta.removexattr, f.ino, name)
    assert meta.kv.seq == seq and meta.listxattr(f.ino) == []


def test_a_namespace_alone_is_einval(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    for name in (b"user.", b"trusted.", b"security."):
        fails(errno.EINVAL, meta.setxattr, f.ino, name, b"v")


def test_user_xattrs_only_on_files_and_directories(meta: Meta) -> None:
    d = mkdir(meta, ROOT, b"d")
    meta.setxattr(d.ino, b"user.ok", b"1")
    link = meta.symlink(ROOT, b"l", b"f", 0, 0)
    fifo = meta.mknod(ROOT, b"p", stat.S_IFIFO | 0o644, 0, 0, 0)
    dev = meta.mknod(ROOT, b"c", stat.S_IFCHR | 0o644, 0x0501, 0, 0)
    for a in (link, fifo, dev):
        fails(errno.EPERM, meta.setxattr, a.ino, b"user.x", b"1")
        fails(errno.EPERM, meta.removexattr, a.ino, b"user.x")
        fails(errno.ENODATA, meta.getxattr, a.ino, b"user.x")
        meta.setxattr(a.ino, b"trusted.x", b"1")  # other namespaces are fine there
        meta.setxattr(a.ino, b"security.x", b"1")


@pytest.mark.parametrize("writing", [True, False])
def test_trusted_is_for_the_privileged_caller(writing: bool) -> None:
    xattrs.for_caller(1, b"trusted.a", privileged=True, writing=writing)
    for name in (b"user.a", b"security.a"):
        xattrs.for_caller(1, name, privileged=False, writing=writing)
    with pytest.raises(FsError) as e:
        xattrs.for_caller(1, b"trusted.a", privileged=False, writing=writing)
    assert e.value.errno == (errno.EPERM if writing else errno.ENODATA)
    names = [b"security.s", b"trusted.t", b"user.u"]
    assert xattrs.listed(names, privileged=True) == names
    assert xattrs.listed(names, privileged=False) == [b"security.s", b"user.u"]


# -- POSIX ACLs -----------------------------------------------------------------------------------
def acl_value(*entries: tuple[int, int, int]) -> bytes:
    return acl.encode(tuple(acl.Entry(tag, perm, id_) for tag, perm, id_ in entries))


U = acl.UNDEFINED_ID


def base(user: int, group: int, other: int) -> list[tuple[int, int, int]]:
    return [(acl.USER_OBJ, user, U), (acl.GROUP_OBJ, group, U), (acl.OTHER, other, U)]


def with_user(uid: int, perm: int, user: int, group: int, mask: int, other: int) -> bytes:
    return acl_value((acl.USER_OBJ, user, U), (acl.USER, perm, uid), (acl.GROUP_OBJ, group, U),
                     (acl.MASK, mask, U), (acl.OTHER, other, U))


def test_an_access_acl_a_mode_can_say_is_only_the_mode(meta: Meta) -> None:
    """setfacl -m o::--- on a 0644 file: mode 0640, and nothing kept as an xattr."""
    f = mkfile(meta, ROOT, b"f", 0o644)
    meta.setxattr(f.ino, xattrs.ACL_ACCESS, acl_value(*base(6, 4, 0)))
    assert stat.S_IMODE(meta.getattr(f.ino).mode) == 0o640
    assert meta.listxattr(f.ino) == []
    fails(errno.ENODATA, meta.getxattr, f.ino, xattrs.ACL_ACCESS)


def test_an_access_acl_with_a_named_user_is_kept_and_its_mask_is_the_group_bits(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f", 0o600)
    value = with_user(1000, 4, user=6, group=0, mask=4, other=0)  # setfacl -m u:1000:r
    meta.setxattr(f.ino, xattrs.ACL_ACCESS, value)
    assert stat.S_IMODE(meta.getattr(f.ino).mode) == 0o640
    assert meta.getxattr(f.ino, xattrs.ACL_ACCESS) == value
    # chmod rewrites owner, mask and other; the named entry and the owning group stay.
    meta.setattr(f.ino, mode=0o705)
    assert meta.getxattr(f.ino, xattrs.ACL_ACCESS) == with_user(1000, 4, user=7, group=0, mask=0, other=5)
    # Removing the ACL keeps the mode it left.
    meta.removexattr(f.ino, xattrs.ACL_ACCESS)
    meta.removexattr(f.ino, xattrs.ACL_ACCESS)  # not there: no error, as on ext4
    assert stat.S_IMODE(meta.getattr(f.ino).mode) == 0o705 and meta.listxattr(f.ino) == []


def test_a_default_acl_of_base_entries_masks_the_mode_only(meta: Meta) -> None:
    d = mkdir(meta, ROOT, b"d")
    # A default ACL with only base entries is kept (it is not a mode), and a file gets its masq.
    meta.setxattr(d.ino, xattrs.ACL_DEFAULT, acl_value(*base(7, 5, 0)))
    f = meta.mknod(d.ino, b"f", stat.S_IFREG | 0o666, 0, 0, 0)
    assert stat.S_IMODE(f.mode) == 0o640 and meta.listxattr(f.ino) == []


def test_a_default_acl_is_inherited(meta: Meta) -> None:
    d = mkdir(meta, ROOT, b"d")
    default = with_user(1000, 7, user=7, group=5, mask=7, other=0)  # setfacl -d -m u:1000:rwx
    meta.setxattr(d.ino, xattrs.ACL_DEFAULT, default)
    assert stat.S_IMODE(meta.getattr(d.ino).mode) == 0o755  # a default ACL leaves the mode alone
    f = meta.mknod(d.ino, b"f", stat.S_IFREG | 0o644, 0, 0, 0)
    # The create mode masks the ACL: owner rw, mask r (from the group bits 4), other none.
    assert stat.S_IMODE(f.mode) == 0o640
    assert meta.getxattr(f.ino, xattrs.ACL_ACCESS) == with_user(1000, 7, user=6, group=5, mask=4, other=0)
    assert xattrs.ACL_DEFAULT not in meta.listxattr(f.ino)
    sub = meta.mkdir(d.ino, b"sub", 0o777, 0, 0)
    assert stat.S_IMODE(sub.mode) == 0o770
    assert meta.getxattr(sub.ino, xattrs.ACL_DEFAULT) == default  # and on to its children
    assert meta.getxattr(sub.ino, xattrs.ACL_ACCESS) == with_user(1000, 7, user=7, group=5, mask=7, other=0)
    link = meta.symlink(d.ino, b"l", b"f", 0, 0)
    assert stat.S_IMODE(link.mode) == 0o777 and meta.listxattr(link.ino) == []


def test_acl_errors(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    link = meta.symlink(ROOT, b"l", b"f", 0, 0)
    seq = meta.kv.seq
    fails(errno.EACCES, meta.setxattr, f.ino, xattrs.ACL_DEFAULT, acl_value(*base(7, 5, 5)))
    fails(errno.EOPNOTSUPP, meta.setxattr, link.ino, xattrs.ACL_ACCESS, acl_value(*base(7, 5, 5)))
    bad = [b"", b"\x02\x00\x00", b"\x01\x00\x00\x00" + acl_value(*base(7, 5, 5))[4:],
           acl_value(*base(7, 5, 5))[:-1], acl_value(*base(7, 5, 5))[:-8],  # no OTHER
           acl_value((acl.USER_OBJ, 7, U), (acl.USER, 7, 5), (acl.GROUP_OBJ, 5, U), (acl.OTHER, 0, U)),  # no mask
           acl_value((acl.GROUP_OBJ, 5, U), (acl.USER_OBJ, 7, U), (acl.OTHER, 0, U)),  # out of order
           acl_value((acl.USER_OBJ, 8, U), (acl.GROUP_OBJ, 5, U), (acl.OTHER, 0, U)),  # perm past rwx
           acl_value((acl.USER_OBJ, 7, U), (0x40, 5, U), (acl.OTHER, 0, U))]  # unknown tag
    for value in bad:
        with pytest.raises(FsError) as e:
            meta.setxattr(f.ino, xattrs.ACL_ACCESS, value)
        assert e.value.errno in (errno.EINVAL, errno.EOPNOTSUPP), value
    assert meta.kv.seq == seq
    meta.setxattr(f.ino, xattrs.ACL_ACCESS, b"\x02\x00\x00\x00")  # a header without entries: no ACL
    assert meta.listxattr(f.ino) == []
