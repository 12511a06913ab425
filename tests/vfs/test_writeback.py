"""The write-back buffer: back-pressure, the flush timer, and failures that must not lose data."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from pxfs.errors import FsError, NoSpace, Unavailable
from pxfs.vfs.vfs import Vfs
from tests.vfs.conftest import BLOCK, ROOT, pattern, running
from tests.vfs.fakes import FakeChunks, FakeMeta


async def test_buffer_limit_bounds_memory_of_all_inodes(meta: FakeMeta, chunks: FakeChunks) -> None:
    limit = 3 * BLOCK
    async with running(meta, chunks, buffer_limit=limit) as vfs:
        wb = vfs.writeback
        fa, a = await vfs.create(ROOT, b"a", 0o644, 0, 0, 0)
        fb, b = await vfs.create(ROOT, b"b", 0o644, 0, 0, 0)
        await vfs.write(fa, 0, pattern(2 * BLOCK))
        for i in range(10):
            await vfs.write(fb, i * BLOCK, pattern(BLOCK, seed=i))
            assert wb.dirty_bytes + wb.flying_bytes <= limit
        assert a.ino in [c[0] for c in meta.commits]  # the other file's blocks made room too
        await vfs.release(fb)
        await vfs.release(fa)
        fh = await vfs.open(b.ino, 0)
        assert await vfs.read(fh, 0, 11 * BLOCK) == b"".join(pattern(BLOCK, seed=i) for i in range(10))
        await vfs.release(fh)
        fh = await vfs.open(a.ino, 0)
        assert await vfs.read(fh, 0, 3 * BLOCK) == pattern(2 * BLOCK)
        await vfs.release(fh)


async def test_buffer_limit_without_background_tasks_flushes_in_the_writer(meta: FakeMeta,
                                                                            chunks: FakeChunks) -> None:
    vfs = Vfs(meta, chunks, BLOCK, buffer_limit=2 * BLOCK)  # not running: no pumps
    fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
    for i in range(5):
        await vfs.write(fh, i * BLOCK, pattern(BLOCK, seed=i))
        assert vfs.writeback.dirty_bytes <= 2 * BLOCK
    assert meta.commits
    await vfs.release(fh)
    assert meta.meta.getattr(attr.ino).size == 5 * BLOCK


async def test_timer_flushes_old_dirty_blocks(meta: FakeMeta, chunks: FakeChunks,
                                              autojump_clock: trio.testing.MockClock) -> None:
    async with running(meta, chunks, flush_interval=5.0) as vfs:
        fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
        await vfs.write(fh, 0, b"hello")
        await trio.sleep(2)
        assert meta.commits == []  # not old enough yet
        await trio.sleep(6)
        assert [c[0] for c in meta.commits] == [attr.ino]
        assert not vfs.writeback.dirty_inodes()
        await vfs.release(fh)
        assert len(meta.commits) == 1


async def test_failed_put_keeps_data_dirty(vfs: Vfs, meta: FakeMeta, chunks: FakeChunks) -> None:
    fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
    data = pattern(3 * BLOCK)
    await vfs.write(fh, 0, data)
    chunks.fail = NoSpace("pool", "full")
    with pytest.raises(NoSpace):
        await vfs.fsync(fh)
    with pytest.raises(NoSpace):
        await vfs.flush(fh)  # close(2) sees ENOSPC too
    assert meta.commits == []
    assert await vfs.read(fh, 0, 4 * BLOCK) == data
    chunks.fail = Unavailable("replica n2", "down")
    with pytest.raises(Unavailable):
        await vfs.fsync(fh)
    chunks.fail = None
    await vfs.fsync(fh)
    assert meta.meta.get_blocks(attr.ino)[0].size == len(data)
    await vfs.release(fh)


async def test_release_failure_keeps_data_for_the_timer(meta: FakeMeta, chunks: FakeChunks,
                                                        autojump_clock: trio.testing.MockClock) -> None:
    async with running(meta, chunks, flush_interval=1.0) as vfs:
        fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
        await vfs.write(fh, 0, b"precious")
        chunks.fail = Unavailable("replica n2", "down")
        with pytest.raises(Unavailable):
            await vfs.release(fh)
        chunks.fail = None
        await trio.sleep(5)
        assert not vfs.writeback.dirty_inodes()
        fh = await vfs.open(attr.ino, 0)
        assert await vfs.read(fh, 0, 100) == b"precious"
        await vfs.release(fh)


async def test_quota_enospc_at_fsync(chunks: FakeChunks) -> None:
    meta = FakeMeta(capacity=2 * BLOCK, block_size=BLOCK)
    async with running(meta, chunks) as vfs:
        fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
        await vfs.write(fh, 0, pattern(3 * BLOCK))  # buffered: the quota is checked at commit
        with pytest.raises(NoSpace) as info:
            await vfs.fsync(fh)
        assert info.value.errno == errno.ENOSPC
        assert meta.meta.getattr(attr.ino).size == 0
        await vfs.setattr(attr.ino, size=BLOCK)  # drops the dirty blocks past the new size
        await vfs.fsync(fh)
        await vfs.release(fh)
        assert meta.meta.statfs()["used"] == BLOCK


async def test_write_to_unknown_handle_is_ebadf(vfs: Vfs) -> None:
    with pytest.raises(FsError) as info:
        await vfs.write(99, 0, b"x")
    assert info.value.errno == errno.EBADF


async def test_large_flush_hashes_in_a_thread(meta: FakeMeta, chunks: FakeChunks) -> None:
    async with running(meta, chunks) as vfs:
        fh, attr = await vfs.create(ROOT, b"big", 0o644, 0, 0, 0)
        data = pattern(5 << 20)  # more than the inline-hashing threshold
        await vfs.write(fh, 0, data)
        await vfs.fsync(fh)
        assert len(meta.commits) == 1 and len(meta.commits[0][1]) == len(data) // BLOCK
        await vfs.release(fh)
    async with running(meta, chunks) as vfs:
        fh = await vfs.open(attr.ino, 0)
        assert await vfs.read(fh, 0, len(data)) == data
        await vfs.release(fh)


async def test_unmount_drops_only_the_data_of_files_that_are_gone(meta: FakeMeta, chunks: FakeChunks) -> None:
    """Close (the unmount flush) fails while data it could store is left; the buffered data of a
    file unlinked since has nowhere to go and is no reason to fail."""
    async with running(meta, chunks) as vfs:
        fh, attr = await vfs.create(ROOT, b"gone", 0o644, 0, 0, 0)
        await vfs.write(fh, 0, b"never stored")
        fh2, attr2 = await vfs.create(ROOT, b"kept", 0o644, 0, 0, 0)
        await vfs.write(fh2, 0, b"precious")
        chunks.fail = NoSpace("pool", "full")
        for f in (fh, fh2):
            with pytest.raises(NoSpace):
                await vfs.release(f)
        await vfs.unlink(ROOT, b"gone")
        with pytest.raises(NoSpace):
            await vfs.close()  # "kept" is still buffered: the unmount must not pretend otherwise
        assert [st.ino for st in vfs.writeback.dirty_inodes()] == [attr2.ino]  # "gone" was dropped
        chunks.fail = None
    assert meta.meta.getattr(attr2.ino).size == len(b"precious")
    assert not vfs.writeback.dirty_inodes()
