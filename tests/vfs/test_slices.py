"""Small writes as slices: a write into part of a stored block costs a chunk of its own size, never a
read of the block, and a block's slices are merged before they pile up."""

from __future__ import annotations

import random

import blake3
import trio
import trio.testing

from pxfs.errors import PutsExpired
from pxfs.meta import slices
from pxfs.meta.slices import whole
from tests.vfs.conftest import BLOCK, ROOT, pattern, running
from tests.vfs.fakes import FakeChunks, FakeMeta


async def _stored(meta: FakeMeta, chunks: FakeChunks, data: bytes) -> int:
    async with running(meta, chunks) as vfs:
        fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
        await vfs.write(fh, 0, data)
        await vfs.release(fh)
    return attr.ino


async def test_a_small_write_into_a_stored_block_is_a_slice(meta: FakeMeta, chunks: FakeChunks) -> None:
    data = pattern(2 * BLOCK)
    ino = await _stored(meta, chunks, data)
    async with running(meta, chunks) as vfs:  # a fresh mount: nothing cached
        fh = await vfs.open(ino, 0)
        chunks.gets.clear()
        await vfs.write(fh, BLOCK - 2, b"XYZW")  # across the boundary: two slices of 2 bytes
        await vfs.fsync(fh)
        assert chunks.gets == []  # no read of the blocks around the write
        _ino, writes, _size = meta.commits[-1]
        assert {i: (w.append, [n for _h, _o, n in w.slices]) for i, w in writes.items()} == {
            0: (True, [2]), 1: (True, [2])}
        want = data[:BLOCK - 2] + b"XYZW" + data[BLOCK + 2:]
        assert await vfs.read(fh, 0, 3 * BLOCK) == want
        await vfs.release(fh)
    blocks = meta.meta.get_blocks(ino)[1]
    assert [(o, n) for _h, o, n in blocks[0]] == [(0, BLOCK), (BLOCK - 2, 2)]
    async with running(meta, chunks) as vfs:
        fh = await vfs.open(ino, 0)
        assert await vfs.read(fh, 0, 3 * BLOCK) == want
        await vfs.release(fh)


async def test_slices_are_merged_before_they_pile_up(meta: FakeMeta, chunks: FakeChunks) -> None:
    data = bytearray(pattern(BLOCK))
    ino = await _stored(meta, chunks, bytes(data))
    rng = random.Random(5)
    async with running(meta, chunks) as vfs:
        fh = await vfs.open(ino, 0)
        for i in range(5 * slices.MERGE_AT):
            off = rng.randrange(0, BLOCK - 64)
            piece = bytes([i % 251]) * rng.randrange(1, 64)
            await vfs.write(fh, off, piece)
            data[off:off + len(piece)] = piece
            await vfs.fsync(fh)
            block = meta.meta.get_blocks(ino)[1][0]
            assert len(block) <= slices.MERGE_AT
            assert slices.referenced(block) <= 2 * BLOCK
        assert await vfs.read(fh, 0, BLOCK) == bytes(data)
        await vfs.release(fh)
    async with running(meta, chunks) as vfs:
        fh = await vfs.open(ino, 0)
        assert await vfs.read(fh, 0, BLOCK) == bytes(data)
        await vfs.release(fh)


async def test_appends_with_fsync_store_about_what_they_write(meta: FakeMeta, chunks: FakeChunks) -> None:
    """A log (a database's WAL) appended and synced record by record: each sync stores the record, not
    the block again, so the bytes put stay within a small multiple of the bytes written."""
    stored: list[int] = []
    put = chunks.put

    async def counting(h: bytes, d: bytes) -> None:
        stored.append(len(d))
        await put(h, d)

    chunks.put = counting  # type: ignore[method-assign]
    record = 200
    async with running(meta, chunks) as vfs:
        fh, attr = await vfs.create(ROOT, b"wal", 0o644, 0, 0, 0)
        log = bytearray()
        for i in range(8 * BLOCK // record):
            rec = pattern(record, seed=i)
            await vfs.write(fh, len(log), rec)
            log += rec
            await vfs.fsync(fh)
        assert await vfs.read(fh, 0, len(log) + 10) == bytes(log)
        await vfs.release(fh)
    assert sum(stored) < 4 * len(log), (sum(stored), len(log))
    async with running(meta, chunks) as vfs:
        fh = await vfs.open(attr.ino, 0)
        assert await vfs.read(fh, 0, len(log) + 10) == bytes(log)
        await vfs.release(fh)


async def test_truncate_cuts_slices(meta: FakeMeta, chunks: FakeChunks) -> None:
    data = pattern(BLOCK)
    ino = await _stored(meta, chunks, data)
    async with running(meta, chunks) as vfs:
        fh = await vfs.open(ino, 0)
        await vfs.write(fh, 1000, b"A" * 100)
        await vfs.fsync(fh)
        await vfs.setattr(ino, size=1050)
        await vfs.write(fh, 2000, b"B" * 10)  # past the cut: the bytes between read as zeros
        want = data[:1000] + b"A" * 50 + bytes(950) + b"B" * 10
        assert await vfs.read(fh, 0, BLOCK) == want
        await vfs.fsync(fh)
        await vfs.release(fh)
    async with running(meta, chunks) as vfs:
        fh = await vfs.open(ino, 0)
        assert await vfs.read(fh, 0, BLOCK) == want
        await vfs.release(fh)
    assert meta.meta.statfs()["used"] == 2010


async def test_a_commit_too_late_after_its_puts_puts_them_again(meta: FakeMeta, chunks: FakeChunks) -> None:
    """The coordinator refuses a commit past the commit window (GC may take chunks that old): the
    write-back puts the chunks again, which refreshes their age, and commits."""
    refused = []
    commit = meta.commit

    async def late_once(*args: object, **kw: object) -> object:
        if not refused:
            refused.append(kw.get("put_started", args[4] if len(args) > 4 else None))
            raise PutsExpired("inode", "chunks put too long ago")
        return await commit(*args, **kw)  # type: ignore[arg-type]

    meta.commit = late_once  # type: ignore[method-assign]
    async with running(meta, chunks) as vfs:
        fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
        await vfs.write(fh, 0, pattern(BLOCK))
        await vfs.fsync(fh)
        await vfs.release(fh)
    assert refused and refused[0] is not None  # the commit said when its puts began
    assert chunks.started == 2  # the one chunk, put twice
    assert meta.meta.getattr(attr.ino).size == BLOCK


async def test_the_timer_waits_for_a_writer_to_pause(meta: FakeMeta, chunks: FakeChunks,
                                                     autojump_clock: trio.testing.MockClock) -> None:
    """A block still being filled is not flushed in pieces by the timer while writes keep coming
    (it would be stored as slices); it is once the writer pauses, or after STREAMING_HOLD intervals."""
    data = pattern(BLOCK)
    async with running(meta, chunks, flush_interval=1.0) as vfs:
        fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
        for off in range(0, BLOCK // 2, 256):  # a slow writer: 256 bytes every 0.2 s, for 1.6 s
            await vfs.write(fh, off, data[off:off + 256])
            await trio.sleep(0.2)
        assert meta.commits == []  # dirty for longer than the interval, but never idle for half of it
        for off in range(BLOCK // 2, BLOCK, 256):
            await vfs.write(fh, off, data[off:off + 256])
            await trio.sleep(0.05)
        await trio.sleep(2)  # the pause: now it goes, in one piece
        assert [list(w) for _ino, w, _size in meta.commits] == [[0]]
        assert meta.meta.get_blocks(attr.ino)[1] == {0: whole(blake3.blake3(data).digest(), BLOCK)}
        await vfs.release(fh)
