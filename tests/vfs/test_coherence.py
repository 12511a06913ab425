"""Reads from chunks, readahead, and what two mounts (two Vfs on the same fakes) see of each other."""

from __future__ import annotations

import trio
import trio.testing

from pxfs.vfs.vfs import Vfs
from tests.vfs.conftest import BLOCK, ROOT, pattern, running
from tests.vfs.fakes import FakeChunks, FakeMeta


async def write_file(meta: FakeMeta, chunks: FakeChunks, data: bytes, name: bytes = b"f") -> int:
    async with running(meta, chunks) as vfs:
        fh, attr = await vfs.create(ROOT, name, 0o644, 0, 0, 0)
        await vfs.write(fh, 0, data)
        await vfs.release(fh)
    return attr.ino


async def test_sequential_reads_prefetch_next_blocks(meta: FakeMeta, chunks: FakeChunks) -> None:
    data = pattern(10 * BLOCK)
    ino = await write_file(meta, chunks, data)
    _, blocks = meta.meta.get_blocks(ino)
    async with running(meta, chunks, readahead=4) as vfs:
        fh = await vfs.open(ino, 0)
        assert await vfs.read(fh, 0, BLOCK) == data[:BLOCK]
        await trio.testing.wait_all_tasks_blocked()
        assert chunks.gets[0] == blocks[0][0][0]
        assert sorted(chunks.gets) == sorted(blocks[i][0][0] for i in range(5))  # 1..4 in the background
        assert await vfs.read(fh, BLOCK, 3 * BLOCK) == data[BLOCK:4 * BLOCK]
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(chunks.gets) == sorted(blocks[i][0][0] for i in range(8))  # from cache; 5..7 fetched ahead
        await vfs.release(fh)


async def test_random_reads_do_not_prefetch(meta: FakeMeta, chunks: FakeChunks) -> None:
    ino = await write_file(meta, chunks, pattern(10 * BLOCK))
    async with running(meta, chunks) as vfs:
        fh = await vfs.open(ino, 0)
        await vfs.read(fh, 5 * BLOCK, 10)
        await trio.testing.wait_all_tasks_blocked()
        assert len(chunks.gets) == 1
        await vfs.release(fh)


async def test_one_fetch_per_chunk_in_flight(meta: FakeMeta, chunks: FakeChunks) -> None:
    data = pattern(2 * BLOCK)
    ino = await write_file(meta, chunks, data)
    async with running(meta, chunks) as vfs:
        f1 = await vfs.open(ino, 0)
        f2 = await vfs.open(ino, 0)
        chunks.get_gate = trio.Event()
        results: list[bytes] = []

        async def read(fh: int) -> None:
            results.append(await vfs.read(fh, BLOCK, 100))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, f1)
            nursery.start_soon(read, f2)
            await trio.testing.wait_all_tasks_blocked()
            chunks.get_gate.set()
        assert results == [data[BLOCK:BLOCK + 100]] * 2
        assert len(chunks.gets) == 1
        await vfs.release(f1)
        await vfs.release(f2)


async def test_close_to_open_between_mounts(meta: FakeMeta, chunks: FakeChunks) -> None:
    async with running(meta, chunks) as a, running(meta, chunks) as b:
        fa, attr = await a.create(ROOT, b"f", 0o644, 0, 0, 0)
        await a.write(fa, 0, b"one")
        await a.release(fa)
        fb = await b.open(attr.ino, 0)
        assert await b.read(fb, 0, 100) == b"one"
        fa = await a.open(attr.ino, 0)
        await a.write(fa, 0, b"TWO!")
        await a.release(fa)
        assert await b.read(fb, 0, 100) == b"one"  # b's open predates a's close
        fb2 = await b.open(attr.ino, 0)  # still open in b: the block map is b's, not refetched
        await b.release(fb2)
        await b.release(fb)
        fb = await b.open(attr.ino, 0)  # first open after all closed: revalidates
        assert await b.read(fb, 0, 100) == b"TWO!"
        assert (await b.getattr(attr.ino)).size == 4
        await b.release(fb)


async def test_unlinked_open_file_stays_readable(vfs: Vfs, meta: FakeMeta) -> None:
    fh, attr = await vfs.create(ROOT, b"f", 0o644, 0, 0, 0)
    data = pattern(2 * BLOCK + 7)
    await vfs.write(fh, 0, data)
    await vfs.fsync(fh)
    await vfs.unlink(ROOT, b"f")
    assert await vfs.read(fh, 0, 3 * BLOCK) == data
    await vfs.write(fh, 0, b"still writable")
    await vfs.release(fh)
    assert meta.meta.statfs()["used"] == 0  # the orphan was purged at its last release


async def test_rename_over_open_file_keeps_its_data(vfs: Vfs) -> None:
    fh, _ = await vfs.create(ROOT, b"old", 0o644, 0, 0, 0)
    await vfs.write(fh, 0, b"old data")
    await vfs.fsync(fh)
    fn, _ = await vfs.create(ROOT, b"new", 0o644, 0, 0, 0)
    await vfs.write(fn, 0, b"new data")
    await vfs.release(fn)
    await vfs.rename(ROOT, b"new", ROOT, b"old", 0)
    assert await vfs.read(fh, 0, 100) == b"old data"
    await vfs.release(fh)
    assert (await vfs.lookup(ROOT, b"old")).size == len(b"new data")
