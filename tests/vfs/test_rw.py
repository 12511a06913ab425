"""Reads and writes through the vfs: block assembly, holes, truncation, commits, remounts."""

from __future__ import annotations

import blake3
import trio
import trio.testing

from pxfs.meta import slices
from pxfs.meta.slices import BlockWrite, whole
from pxfs.vfs.vfs import Vfs
from tests.vfs.conftest import BLOCK, ROOT, pattern, running
from tests.vfs.fakes import FakeChunks, FakeMeta


async def new_file(vfs: Vfs, name: bytes = b"f") -> tuple[int, int]:
    fh, attr = await vfs.create(ROOT, name, 0o644, 0, 0, 0)
    return fh, attr.ino


async def test_roundtrip_across_block_boundaries(vfs: Vfs) -> None:
    fh, ino = await new_file(vfs)
    data = pattern(3 * BLOCK + 500)
    assert await vfs.write(fh, 100, data) == len(data)
    end = 100 + len(data)
    for off, size in [(0, end), (0, 100), (BLOCK - 10, 20), (2 * BLOCK + 3, BLOCK), (end - 5, 100), (end, 10)]:
        want = (bytes(100) + data)[off:off + size]
        assert await vfs.read(fh, off, size) == want  # from dirty buffers
    await vfs.fsync(fh)
    assert not vfs.writeback.dirty_inodes()
    assert await vfs.read(fh, 0, end + 10) == bytes(100) + data  # from committed chunks
    assert (await vfs.getattr(ino)).size == end
    await vfs.release(fh)


async def test_fsync_commits_once_with_trimmed_last_block(vfs: Vfs, meta: FakeMeta, chunks: FakeChunks) -> None:
    fh, ino = await new_file(vfs)
    data = pattern(2 * BLOCK + 10)
    for off in range(0, len(data), 1000):  # many small writes, one commit
        await vfs.write(fh, off, data[off:off + 1000])
    await vfs.fsync(fh)
    assert len(meta.commits) == 1
    c_ino, blocks, size = meta.commits[0]
    assert (c_ino, size) == (ino, len(data))
    assert blocks == {i: BlockWrite(whole(blake3.blake3(data[i * BLOCK:(i + 1) * BLOCK]).digest(),
                                          min(BLOCK, len(data) - i * BLOCK))) for i in range(3)}
    assert slices.extent(blocks[2].slices) == 10  # no zeros past EOF are stored
    await vfs.fsync(fh)
    await vfs.release(fh)
    assert len(meta.commits) == 1  # nothing dirty: no second commit
    assert chunks.puts == 3


async def test_partial_overwrite_loads_old_block(meta: FakeMeta, chunks: FakeChunks) -> None:
    data = pattern(2 * BLOCK)
    async with running(meta, chunks) as vfs:
        fh, ino = await new_file(vfs)
        await vfs.write(fh, 0, data)
        await vfs.release(fh)
    async with running(meta, chunks) as vfs:  # a fresh mount: nothing cached
        fh = await vfs.open(ino, 0)
        await vfs.write(fh, BLOCK - 2, b"XYZW")
        await vfs.release(fh)
    async with running(meta, chunks) as vfs:
        fh = await vfs.open(ino, 0)
        want = data[:BLOCK - 2] + b"XYZW" + data[BLOCK + 2:]
        assert await vfs.read(fh, 0, 3 * BLOCK) == want
        await vfs.release(fh)


async def test_sparse_file_and_holes(vfs: Vfs, meta: FakeMeta) -> None:
    fh, ino = await new_file(vfs)
    await vfs.write(fh, 10, b"head")
    await vfs.write(fh, 10 * BLOCK + 5, b"tail")
    size = 10 * BLOCK + 9
    assert (await vfs.getattr(ino)).size == size
    await vfs.fsync(fh)
    _, blocks, _ = meta.commits[-1]
    assert sorted(blocks) == [0, 10]
    assert slices.extent(blocks[10].slices) == 9
    got = await vfs.read(fh, 0, size + 100)
    assert got == bytes(10) + b"head" + bytes(size - 14 - 4) + b"tail"
    assert await vfs.read(fh, 3 * BLOCK, BLOCK) == bytes(BLOCK)
    await vfs.release(fh)


async def test_truncate_down_then_up_with_dirty_data(vfs: Vfs, meta: FakeMeta) -> None:
    fh, ino = await new_file(vfs)
    data = pattern(3 * BLOCK)
    await vfs.write(fh, 0, data)
    cut = BLOCK + BLOCK // 2
    attr = await vfs.setattr(ino, size=cut)
    assert attr.size == cut
    assert await vfs.read(fh, 0, 4 * BLOCK) == data[:cut]
    attr = await vfs.setattr(ino, size=3 * BLOCK)
    assert attr.size == 3 * BLOCK
    assert await vfs.read(fh, 0, 4 * BLOCK) == data[:cut] + bytes(3 * BLOCK - cut)
    # A partial write into the cut block must not resurrect the bytes that were cut off.
    await vfs.write(fh, cut + 10, b"!")
    await vfs.fsync(fh)
    want = bytearray(data[:cut] + bytes(3 * BLOCK - cut))
    want[cut + 10] = ord("!")
    assert await vfs.read(fh, 0, 4 * BLOCK) == bytes(want)
    assert meta.meta.statfs()["used"] <= 3 * BLOCK
    await vfs.release(fh)


async def test_truncate_up_with_dirty_data(vfs: Vfs) -> None:
    fh, ino = await new_file(vfs)
    await vfs.write(fh, 0, b"abc")
    attr = await vfs.setattr(ino, size=2 * BLOCK)
    assert attr.size == 2 * BLOCK
    assert await vfs.read(fh, 0, 3 * BLOCK) == b"abc" + bytes(2 * BLOCK - 3)
    await vfs.release(fh)


async def test_truncate_of_file_not_open_here(vfs: Vfs) -> None:
    fh, ino = await new_file(vfs)
    await vfs.write(fh, 0, pattern(2 * BLOCK))
    await vfs.release(fh)
    assert (await vfs.setattr(ino, size=100)).size == 100
    fh = await vfs.open(ino, 0)
    assert await vfs.read(fh, 0, BLOCK) == pattern(100)
    await vfs.release(fh)


async def test_remount_reads_back(meta: FakeMeta, chunks: FakeChunks) -> None:
    data = pattern(5 * BLOCK + 123, seed=3)
    async with running(meta, chunks) as vfs:
        fh, ino = await new_file(vfs)
        await vfs.write(fh, 0, data)
        # Left open and unflushed: close() of the vfs must flush it.
    async with running(meta, chunks) as vfs:
        fh = await vfs.open(ino, 0)
        assert await vfs.read(fh, 0, len(data) + BLOCK) == data
        assert (await vfs.lookup(ROOT, b"f")).size == len(data)
        await vfs.release(fh)


async def test_read_cache_counts_hits_and_misses_of_the_chunks_reads_need(meta: FakeMeta, chunks: FakeChunks) -> None:
    data = pattern(3 * BLOCK, seed=5)
    async with running(meta, chunks) as vfs:
        fh, ino = await new_file(vfs)
        await vfs.write(fh, 0, data)
    async with running(meta, chunks, readahead=0) as vfs:  # a fresh cache; no fetch but the reader's
        fh = await vfs.open(ino, 0)
        assert await vfs.read(fh, 0, len(data)) == data
        assert (vfs.cache.hits, vfs.cache.misses) == (0, 3)
        assert await vfs.read(fh, BLOCK, 2 * BLOCK) == data[BLOCK:]
        assert (vfs.cache.hits, vfs.cache.misses) == (2, 3)
        # A block written in part reads the stored chunk under the new bytes (a lookup); one written
        # whole and holes are none.
        await vfs.write(fh, 0, b"x")
        assert await vfs.read(fh, 0, BLOCK) == b"x" + data[1:BLOCK]
        assert (vfs.cache.hits, vfs.cache.misses) == (3, 3)
        await vfs.write(fh, BLOCK, bytes(BLOCK))
        assert await vfs.read(fh, BLOCK, BLOCK) == bytes(BLOCK)
        await vfs.setattr(ino, size=5 * BLOCK)
        assert await vfs.read(fh, 4 * BLOCK, BLOCK) == bytes(BLOCK)
        assert (vfs.cache.hits, vfs.cache.misses) == (3, 3)
        await vfs.release(fh)


async def test_attrs_show_local_size_while_dirty(vfs: Vfs, meta: FakeMeta) -> None:
    fh, ino = await new_file(vfs)
    await vfs.write(fh, 0, pattern(BLOCK + 1))
    assert meta.meta.getattr(ino).size == 0  # nothing committed yet
    assert (await vfs.getattr(ino)).size == BLOCK + 1
    assert (await vfs.lookup(ROOT, b"f")).size == BLOCK + 1
    [(name, attr)] = await vfs.readdir(ROOT)
    assert (name, attr.size) == (b"f", BLOCK + 1)
    await vfs.release(fh)
    assert meta.meta.getattr(ino).size == BLOCK + 1


async def test_write_during_flush_stays_dirty(vfs: Vfs, chunks: FakeChunks) -> None:
    fh, ino = await new_file(vfs)
    await vfs.write(fh, 0, b"a" * 100)  # not a complete block: only the fsync uploads it
    chunks.put_gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vfs.fsync, fh)
        await trio.testing.wait_all_tasks_blocked()  # the flush waits in its put
        await vfs.write(fh, 0, b"b")
        chunks.put_gate.set()
    assert vfs.writeback.dirty_inodes()  # the newer byte was not covered by that commit
    await vfs.fsync(fh)
    assert await vfs.read(fh, 0, 2) == b"ba"
    await vfs.release(fh)


async def test_explicit_mtime_survives_later_flush(vfs: Vfs, meta: FakeMeta) -> None:
    fh, ino = await new_file(vfs)
    await vfs.write(fh, 0, b"data")
    attr = await vfs.setattr(ino, mtime_ns=5_000_000_000)
    assert (attr.size, attr.mtime_ns) == (4, 5_000_000_000)
    await vfs.release(fh)
    assert meta.meta.getattr(ino).mtime_ns == 5_000_000_000
