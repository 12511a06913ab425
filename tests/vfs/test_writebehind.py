"""Write-behind: complete blocks upload in the background while the writer goes on.

Puts wait on ``FakeChunks.put_gate`` so a test can look at the mount while an upload is under way;
``wait_all_tasks_blocked`` lets every background task run as far as it can before the test looks.
"""

from __future__ import annotations

import os

import blake3
import pytest
import trio
import trio.testing

from pxfs.errors import NoSpace
from pxfs.vfs.vfs import Vfs
from tests.vfs.conftest import BLOCK, ROOT, pattern, running
from tests.vfs.fakes import FakeChunks, FakeMeta


def held(vfs: Vfs) -> int:
    return vfs.writeback.dirty_bytes + vfs.writeback.flying_bytes


async def read_back(meta: FakeMeta, chunks: FakeChunks, ino: int, n: int) -> bytes:
    """The file as a fresh mount reads it: only committed data."""
    async with running(meta, chunks) as vfs:
        fh = await vfs.open(ino, 0)
        data = await vfs.read(fh, 0, n)
        await vfs.release(fh)
    return data


async def test_streaming_writer_does_not_wait_for_uploads(meta: FakeMeta, chunks: FakeChunks,
                                                          autojump_clock: trio.testing.MockClock) -> None:
    async with running(meta, chunks, buffer_limit=16 * BLOCK, flush_interval=60) as vfs:
        fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
        data = pattern(12 * BLOCK)
        chunks.put_gate = trio.Event()  # no upload finishes until the writer is done
        # A writer waiting for a put would let the clock jump past this deadline.
        with trio.fail_after(1):
            for off in range(0, len(data), BLOCK // 2):
                await vfs.write(fh, off, data[off:off + BLOCK // 2])
                await trio.testing.wait_all_tasks_blocked()
        assert chunks.started > 0 and vfs.writeback.flying_bytes > 0  # uploads under way...
        assert chunks.puts == 0 and meta.commits == []  # ...and none finished
        chunks.put_gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(meta.commits) > 1  # in groups, without fsync
        await vfs.fsync(fh)
        assert held(vfs) == 0
        await vfs.release(fh)
    assert await read_back(meta, chunks, attr.ino, 13 * BLOCK) == data


async def test_fsync_waits_for_uploads_in_flight(vfs: Vfs, meta: FakeMeta, chunks: FakeChunks) -> None:
    fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
    data = pattern(2 * BLOCK + 100)
    chunks.put_gate = trio.Event()
    await vfs.write(fh, 0, data)
    await trio.testing.wait_all_tasks_blocked()
    assert chunks.started  # blocks 0 and 1 are being put; block 2 is still being appended to
    synced = False

    async def fsync() -> None:
        nonlocal synced
        await vfs.fsync(fh)
        synced = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fsync)
        await trio.testing.wait_all_tasks_blocked()
        assert not synced and meta.commits == []
        chunks.put_gate.set()
    assert synced
    # The background commit claimed only the blocks it carried; fsync committed the rest.
    assert [(sorted(blocks), size) for _, blocks, size in meta.commits] == [([0, 1], 2 * BLOCK), ([2], len(data))]
    assert meta.meta.getattr(attr.ino).size == len(data)
    await vfs.release(fh)
    assert await read_back(meta, chunks, attr.ino, 3 * BLOCK) == data


async def test_block_rewritten_during_its_upload_is_uploaded_again(vfs: Vfs, meta: FakeMeta,
                                                                   chunks: FakeChunks) -> None:
    fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
    old = pattern(2 * BLOCK)
    chunks.put_gate = trio.Event()
    await vfs.write(fh, 0, old)
    await trio.testing.wait_all_tasks_blocked()  # the upload holds blocks 0 and 1
    await vfs.write(fh, 10, b"new")
    new = old[:10] + b"new" + old[13:]
    assert await vfs.read(fh, 0, 2 * BLOCK) == new
    chunks.put_gate.set()
    await vfs.fsync(fh)
    first, *later = meta.commits
    assert first[1][0].slices[0][0] == blake3.blake3(old[:BLOCK]).digest()  # the upload stored what it hashed
    assert later and later[-1][1][0].slices[0][0] == blake3.blake3(new[:BLOCK]).digest()
    assert meta.meta.get_blocks(attr.ino)[1][0][0][0] == blake3.blake3(new[:BLOCK]).digest()
    assert held(vfs) == 0
    await vfs.release(fh)
    assert await read_back(meta, chunks, attr.ino, 3 * BLOCK) == new


async def test_background_failure_is_reported_by_the_next_fsync(vfs: Vfs, meta: FakeMeta,
                                                                chunks: FakeChunks) -> None:
    fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
    data = pattern(3 * BLOCK)
    chunks.fail = NoSpace("pool", "full")
    await vfs.write(fh, 0, data)
    await trio.testing.wait_all_tasks_blocked()
    assert chunks.started and meta.commits == []  # the background upload tried and failed
    assert vfs.writeback.dirty_inodes() and held(vfs) == 3 * BLOCK
    assert await vfs.read(fh, 0, 4 * BLOCK) == data
    chunks.fail = None  # room again: the application must still learn that writing had failed
    with pytest.raises(NoSpace):
        await vfs.fsync(fh)
    assert meta.meta.getattr(attr.ino).size == len(data)  # that fsync's retry kept the data
    await vfs.fsync(fh)  # reported once
    await vfs.release(fh)
    assert await read_back(meta, chunks, attr.ino, 4 * BLOCK) == data


async def test_close_reports_background_failure(vfs: Vfs, meta: FakeMeta, chunks: FakeChunks) -> None:
    fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
    chunks.fail = NoSpace("pool", "full")
    await vfs.write(fh, 0, pattern(2 * BLOCK))
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(NoSpace):
        await vfs.flush(fh)  # close(2) returns ENOSPC
    with pytest.raises(NoSpace):
        await vfs.release(fh)  # still no room: the data stays dirty for the timer
    chunks.fail = None
    await vfs.close()
    assert meta.meta.getattr(attr.ino).size == 2 * BLOCK


async def test_committed_size_never_covers_a_block_still_in_memory(vfs: Vfs, meta: FakeMeta,
                                                                   chunks: FakeChunks) -> None:
    fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
    await vfs.write(fh, 0, b"head")  # block 0: written in part, so not uploaded before fsync
    await vfs.write(fh, BLOCK, pattern(3 * BLOCK))  # complete blocks past it
    await trio.testing.wait_all_tasks_blocked()
    # Committing blocks 1..3 would make the size cover block 0, which a crash would show as zeros.
    assert meta.commits == []
    await vfs.write(fh, 4, pattern(BLOCK - 4, seed=9))  # block 0 complete: all of them may go
    await trio.testing.wait_all_tasks_blocked()
    assert [(sorted(blocks), size) for _, blocks, size in meta.commits] == [([0, 1, 2, 3], 4 * BLOCK)]
    await vfs.release(fh)


async def test_half_full_buffer_uploads_blocks_still_being_written(meta: FakeMeta, chunks: FakeChunks) -> None:
    async with running(meta, chunks, buffer_limit=8 * BLOCK) as vfs:
        fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
        for i in range(4):  # half of each block: none is complete
            await vfs.write(fh, i * BLOCK, pattern(BLOCK // 2, seed=i))
        await trio.testing.wait_all_tasks_blocked()
        assert meta.commits == []  # at the high-water mark, not past it
        await vfs.write(fh, 4 * BLOCK, pattern(BLOCK // 2, seed=4))
        await trio.testing.wait_all_tasks_blocked()
        assert [(sorted(blocks), size) for _, blocks, size in meta.commits] == [([0, 1], 2 * BLOCK)]
        assert held(vfs) == 3 * BLOCK
        await vfs.release(fh)
    want = b"".join(pattern(BLOCK // 2, seed=i) + bytes(BLOCK // 2) for i in range(5))[:4 * BLOCK + BLOCK // 2]
    assert await read_back(meta, chunks, attr.ino, 6 * BLOCK) == want


async def test_writer_waits_at_the_limit(meta: FakeMeta, chunks: FakeChunks) -> None:
    limit = 4 * BLOCK
    async with running(meta, chunks, buffer_limit=limit) as vfs:
        fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
        data = pattern(6 * BLOCK)
        chunks.put_gate = trio.Event()
        for i in range(4):
            await vfs.write(fh, i * BLOCK, data[i * BLOCK:(i + 1) * BLOCK])
        written = False

        async def write_more() -> None:
            nonlocal written
            await vfs.write(fh, 4 * BLOCK, data[4 * BLOCK:])
            written = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_more)
            await trio.testing.wait_all_tasks_blocked()
            assert not written and held(vfs) <= limit
            assert chunks.started  # the writer waits for uploads under way, not for a flush of its own
            chunks.put_gate.set()
        assert written and held(vfs) <= limit
        await vfs.release(fh)
    assert await read_back(meta, chunks, attr.ino, 7 * BLOCK) == data


async def test_writer_at_the_limit_gets_the_upload_failure(meta: FakeMeta, chunks: FakeChunks) -> None:
    async with running(meta, chunks, buffer_limit=2 * BLOCK) as vfs:
        fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
        data = pattern(3 * BLOCK)
        chunks.fail = NoSpace("pool", "full")
        await vfs.write(fh, 0, data[:2 * BLOCK])
        with pytest.raises(NoSpace):
            await vfs.write(fh, 2 * BLOCK, data[2 * BLOCK:])  # write(2) fails with ENOSPC, no hang
        assert await vfs.read(fh, 0, 3 * BLOCK) == data[:2 * BLOCK]
        chunks.fail = None
        await vfs.write(fh, 2 * BLOCK, data[2 * BLOCK:])
        with pytest.raises(NoSpace):
            await vfs.fsync(fh)  # the failed background upload, reported once
        await vfs.release(fh)
    assert await read_back(meta, chunks, attr.ino, 4 * BLOCK) == data


async def test_truncate_during_upload_wins(vfs: Vfs, meta: FakeMeta, chunks: FakeChunks) -> None:
    fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
    data = pattern(3 * BLOCK)
    chunks.put_gate = trio.Event()
    await vfs.write(fh, 0, data)
    await trio.testing.wait_all_tasks_blocked()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: vfs.setattr(attr.ino, size=100))
        await trio.testing.wait_all_tasks_blocked()
        chunks.put_gate.set()
    assert await vfs.read(fh, 0, 4 * BLOCK) == data[:100]
    await vfs.release(fh)
    assert meta.meta.getattr(attr.ino).size == 100
    assert meta.meta.statfs()["used"] == 100
    assert await read_back(meta, chunks, attr.ino, 4 * BLOCK) == data[:100]


async def test_a_write_back_failure_reaches_every_handle_once(vfs: Vfs, meta: FakeMeta, chunks: FakeChunks) -> None:
    """As Linux's errseq: each fd open on the file when writing its data back failed reports it at
    its next fsync or close, once; an fd opened after it was reported does not."""
    fh1, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
    fh2 = await vfs.open(attr.ino, os.O_RDWR)
    fh3 = await vfs.open(attr.ino, os.O_RDONLY)  # a reader: it had no dirty data, and still hears of it
    chunks.fail = NoSpace("pool", "full")
    await vfs.write(fh1, 0, pattern(3 * BLOCK))
    await trio.testing.wait_all_tasks_blocked()  # the background upload failed
    chunks.fail = None
    for fh in (fh1, fh2, fh3):
        with pytest.raises(NoSpace):
            await vfs.fsync(fh)
        await vfs.fsync(fh)  # once per handle
    fh4 = await vfs.open(attr.ino, os.O_RDONLY)
    await vfs.fsync(fh4)  # opened after every report: nothing to report
    # A failure met by one handle's own fsync reaches the others too.
    await vfs.write(fh2, 0, b"again")
    chunks.fail = NoSpace("pool", "full")
    with pytest.raises(NoSpace):
        await vfs.fsync(fh2)
    chunks.fail = None
    with pytest.raises(NoSpace):
        await vfs.flush(fh1)  # close(2) of another fd: its flush commits the data, and reports
    await vfs.fsync(fh2)
    for fh in (fh3, fh4):
        with pytest.raises(NoSpace):
            await vfs.fsync(fh)
    for fh in (fh1, fh2, fh3, fh4):
        await vfs.release(fh)
    assert (await read_back(meta, chunks, attr.ino, 4 * BLOCK))[:5] == b"again"


async def test_an_unreported_failure_reaches_a_handle_opened_after_it(vfs: Vfs, chunks: FakeChunks) -> None:
    fh1, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
    chunks.fail = NoSpace("pool", "full")
    await vfs.write(fh1, 0, pattern(2 * BLOCK))
    await trio.testing.wait_all_tasks_blocked()
    chunks.fail = None
    fh2 = await vfs.open(attr.ino, os.O_RDONLY)  # nobody reported it yet (errseq_sample)
    with pytest.raises(NoSpace):
        await vfs.fsync(fh2)
    with pytest.raises(NoSpace):
        await vfs.fsync(fh1)
    await vfs.release(fh1)
    await vfs.release(fh2)
