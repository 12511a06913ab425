"""Answers the vfs gives without a round trip: names in directories this mount made, absent xattrs."""

from __future__ import annotations

import errno
import stat

import pytest

from pxfs.errors import FsError
from pxfs.vfs.vfs import Vfs
from tests.vfs.conftest import ROOT
from tests.vfs.fakes import FakeMeta


class Counting:
    """Counts the calls of one FakeMeta method that reach the metadata."""

    def __init__(self, meta: FakeMeta, name: str) -> None:
        self.calls = 0
        real = getattr(meta.meta, name)

        def counted(*args: object) -> object:
            self.calls += 1
            return real(*args)

        setattr(meta.meta, name, counted)


async def test_lookup_in_a_directory_this_mount_made(vfs: Vfs, meta: FakeMeta) -> None:
    lookups = Counting(meta, "lookup")
    d = await vfs.mkdir(ROOT, b"d", 0o755, 0, 0)
    with pytest.raises(FsError) as e:
        await vfs.lookup(d.ino, b"x")
    assert e.value.errno == errno.ENOENT and lookups.calls == 0
    fh, a = await vfs.create(d.ino, b"x", 0o644, 0, 0, 0)
    await vfs.release(fh)
    assert (await vfs.lookup(d.ino, b"x")).ino == a.ino and lookups.calls == 1
    await vfs.rename(d.ino, b"x", d.ino, b"y")
    with pytest.raises(FsError):
        await vfs.lookup(d.ino, b"x")
    assert lookups.calls == 1
    # Another mount makes a name there (straight in the metadata): its callback makes us ask again.
    meta.meta.mknod(d.ino, b"theirs", stat.S_IFREG | 0o644, 0, 0, 0)
    vfs.invalidated([], [(d.ino, b"theirs")])
    assert (await vfs.lookup(d.ino, b"theirs")).nlink == 1 and lookups.calls == 2
    # A failed change (here: the name exists) also makes us ask again.
    d2 = await vfs.mkdir(ROOT, b"d2", 0o755, 0, 0)
    meta.meta.mknod(d2.ino, b"raced", stat.S_IFREG | 0o644, 0, 0, 0)
    with pytest.raises(FsError) as e:
        await vfs.mknod(d2.ino, b"raced", stat.S_IFREG | 0o644, 0, 0, 0)
    assert e.value.errno == errno.EEXIST
    assert (await vfs.lookup(d2.ino, b"raced")).nlink == 1
    vfs.forget_caches()
    with pytest.raises(FsError):
        await vfs.lookup(d.ino, b"nope")
    assert lookups.calls == 4  # after a reconnect nothing is known


async def test_a_name_past_255_bytes_is_too_long_even_where_every_name_is_known(vfs: Vfs, meta: FakeMeta) -> None:
    lookups = Counting(meta, "lookup")
    d = await vfs.mkdir(ROOT, b"d", 0o755, 0, 0)
    for parent in (d.ino, ROOT):  # known to this mount, and not
        with pytest.raises(FsError) as e:
            await vfs.lookup(parent, b"n" * 256)
        assert e.value.errno == errno.ENAMETOOLONG
    assert lookups.calls == 0  # refused before any round trip
    with pytest.raises(FsError) as e:
        await vfs.lookup(d.ino, b"n" * 255)
    assert e.value.errno == errno.ENOENT


async def test_absent_xattr_is_remembered_until_changed(vfs: Vfs, meta: FakeMeta) -> None:
    gets = Counting(meta, "getxattr")
    fh, a = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
    for _ in range(3):
        with pytest.raises(FsError) as e:
            await vfs.getxattr(a.ino, b"security.capability")
        assert e.value.errno == errno.ENODATA
    assert gets.calls == 1
    await vfs.setxattr(a.ino, b"security.capability", b"caps")
    assert await vfs.getxattr(a.ino, b"security.capability") == b"caps"
    await vfs.removexattr(a.ino, b"security.capability")
    with pytest.raises(FsError):
        await vfs.getxattr(a.ino, b"security.capability")
    meta.meta.setxattr(a.ino, b"security.capability", b"theirs", 0)  # another mount
    vfs.invalidated([a.ino], [])
    assert await vfs.getxattr(a.ino, b"security.capability") == b"theirs"
    await vfs.release(fh)
