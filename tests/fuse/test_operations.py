"""Operations without a kernel: errno mapping, EntryAttributes, lookup counts, read-only refusals."""

from __future__ import annotations

import errno
import logging
import stat
from types import SimpleNamespace

import pyfuse3
import pytest

from pxfs.errors import NoSpace, NotFound
from pxfs.fuse.errors import fuse_op
from pxfs.fuse.operations import Operations
from tests.vfs.conftest import BLOCK, ROOT, running
from tests.vfs.fakes import FakeChunks, FakeMeta

CTX = SimpleNamespace(uid=1000, gid=100, pid=1, umask=0o022)


class Handlers:
    def __init__(self) -> None:
        self.timed: list[tuple[str, float]] = []
        self.op_timer = lambda op, seconds: self.timed.append((op, seconds))

    @fuse_op
    async def failing(self, exc: BaseException) -> None:
        raise exc

    @fuse_op
    async def working(self, value: int) -> int:
        return value


@pytest.mark.parametrize(("exc", "code"), [
    (NotFound("x", "gone"), errno.ENOENT),
    (NoSpace("x", "full"), errno.ENOSPC),
    (ExceptionGroup("g", [NotFound("x", "gone"), NoSpace("y", "full")]), errno.ENOSPC),
    (pyfuse3.FUSEError(errno.EPERM), errno.EPERM),
])
async def test_errors_map_to_errno(exc: BaseException, code: int) -> None:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await Handlers().failing(exc)
    assert info.value.errno == code


async def test_bugs_become_eio_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as info:
        await Handlers().failing(KeyError("oops"))
    assert info.value.errno == errno.EIO
    assert "op=failing" in caplog.text


async def test_every_handler_is_timed_once_failures_too() -> None:
    h = Handlers()
    assert await h.working(7) == 7
    with pytest.raises(pyfuse3.FUSEError):
        await h.failing(NotFound("x", "gone"))
    assert [op for op, _ in h.timed] == ["working", "failing"]
    assert all(0 <= s < 10 for _, s in h.timed)
    h.op_timer = None  # metrics off: nothing is measured
    assert await h.working(1) == 1 and len(h.timed) == 2


async def test_entries_and_lookup_counts() -> None:
    async with running(FakeMeta(1 << 30, BLOCK), FakeChunks()) as vfs:
        ops = Operations(vfs, attr_timeout=2.0, entry_timeout=3.0)
        fi, entry = await ops.create(ROOT, b"f", 0o640, 0, CTX)
        assert (entry.st_uid, entry.st_gid, stat.S_IMODE(entry.st_mode)) == (1000, 100, 0o640)
        assert (entry.attr_timeout, entry.entry_timeout, entry.st_blksize) == (2.0, 3.0, BLOCK)
        assert await ops.write(fi.fh, 0, b"x" * 1000) == 1000
        attr = await ops.getattr(entry.st_ino, CTX)
        assert (attr.st_size, attr.st_blocks) == (1000, 2)  # the local size of dirty data
        await ops.lookup(ROOT, b"f", CTX)
        assert ops.lookups[entry.st_ino] == 2
        await ops.forget([(entry.st_ino, 2)])
        assert entry.st_ino not in ops.lookups
        await ops.release(fi.fh)
        missing = await ops.lookup(ROOT, b"missing", CTX)  # a negative entry the kernel may cache
        assert (missing.st_ino, missing.entry_timeout) == (0, 3.0)
        assert 0 not in ops.lookups


async def test_read_only_refuses_changes() -> None:
    async with running(FakeMeta(1 << 30, BLOCK), FakeChunks()) as vfs:
        ops = Operations(vfs, read_only=True)
        for call in (ops.mkdir(ROOT, b"d", 0o755, CTX), ops.create(ROOT, b"f", 0o644, 0, CTX),
                     ops.setxattr(ROOT, b"user.a", b"1", CTX)):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await call
            assert info.value.errno == errno.EROFS
        assert (await ops.statfs(CTX)).f_bsize == BLOCK


async def test_trusted_xattrs_are_for_uid_0_only() -> None:
    root = SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022)
    async with running(FakeMeta(1 << 30, BLOCK), FakeChunks()) as vfs:
        ops = Operations(vfs)
        fi, entry = await ops.create(ROOT, b"f", 0o644, 0, CTX)
        await ops.setxattr(entry.st_ino, b"trusted.t", b"1", root)
        await ops.setxattr(entry.st_ino, b"user.u", b"2", CTX)
        assert await ops.listxattr(entry.st_ino, root) == [b"trusted.t", b"user.u"]
        assert await ops.listxattr(entry.st_ino, CTX) == [b"user.u"]
        assert await ops.getxattr(entry.st_ino, b"trusted.t", root) == b"1"
        for call, code in ((ops.getxattr(entry.st_ino, b"trusted.t", CTX), errno.ENODATA),
                           (ops.setxattr(entry.st_ino, b"trusted.t", b"x", CTX), errno.EPERM),
                           (ops.removexattr(entry.st_ino, b"trusted.t", CTX), errno.EPERM),
                           (ops.setxattr(entry.st_ino, b"foo.bar", b"x", root), errno.EOPNOTSUPP)):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await call
            assert info.value.errno == code
        assert await ops.getxattr(entry.st_ino, b"trusted.t", root) == b"1"
        await ops.release(fi.fh)
