"""xattr namespaces as ext4 answers them (pxfs.meta.xattrs), through Meta."""

from __future__ import annotations

import errno
import stat

import pytest

from pxfs.errors import FsError
from pxfs.meta import xattrs
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
