"""LocalChunkStore: a node's pools behind one async chunk store."""

from __future__ import annotations

from pathlib import Path

import blake3
import pytest
import trio

from pxfs.chunks.local import LocalChunkStore
from pxfs.chunks.pool import MiB, Pool
from pxfs.errors import Corrupt, Invalid, NoSpace, NotFound

pytestmark = pytest.mark.trio


def chunk(i: int, size: int = 4096) -> tuple[bytes, bytes]:
    data = i.to_bytes(8, "big") * (size // 8)
    return blake3.blake3(data).digest(), data


def holders(store: LocalChunkStore, h: bytes) -> list[int]:
    return [i for i, p in enumerate(store.pools) if p.has(h)]


async def make_store(tmp_path: Path, *capacities: int) -> LocalChunkStore:
    pools = [Pool(tmp_path / f"pool{i}", capacity=c, reserve=0) for i, c in enumerate(capacities)]
    store = LocalChunkStore(pools)
    await store.open()
    return store


async def test_put_get_roundtrip(tmp_path: Path) -> None:
    store = await make_store(tmp_path, 64 * MiB, 64 * MiB)
    h, data = chunk(1)
    assert await store.put(h, data) is True
    assert await store.get(h) == data
    assert len(holders(store, h)) == 1
    assert await store.put(h, data) is False


async def test_missing_and_invalid(tmp_path: Path) -> None:
    store = await make_store(tmp_path, 64 * MiB)
    h, data = chunk(1)
    with pytest.raises(NotFound):
        await store.get(h)
    with pytest.raises(Invalid, match="hash mismatch"):
        await store.put(h, data + b"!")
    with pytest.raises(Invalid):
        await store.put(h[:16], data)
    assert store.pools[0].used == 0


async def test_placement_is_deterministic_and_spread(tmp_path: Path) -> None:
    store = await make_store(tmp_path, 64 * MiB, 64 * MiB, 64 * MiB)
    chunks = [chunk(i, 64) for i in range(150)]
    for h, d in chunks:
        await store.put(h, d)
    placed = {h: holders(store, h) for h, _ in chunks}
    assert all(len(v) == 1 for v in placed.values())
    counts = [store.pools[i].chunk_count for i in range(3)]
    assert min(counts) > 25, counts

    # A fresh store over the same pools (same paths) picks the same pool for each chunk.
    for h, _ in chunks:
        await store.delete(h)
    again = LocalChunkStore([Pool(p.path, capacity=p.capacity, reserve=0) for p in store.pools])
    await again.open()
    for h, d in chunks:
        await again.put(h, d)
    assert {h: holders(again, h) for h, _ in chunks} == placed


async def test_placement_weighted_by_capacity(tmp_path: Path) -> None:
    store = await make_store(tmp_path, 300 * MiB, 100 * MiB)
    for i in range(400):
        await store.put(*chunk(i, 64))
    big, small = (p.chunk_count for p in store.pools)
    assert 240 <= big <= 360, (big, small)


async def test_chunk_in_any_pool_is_dedup(tmp_path: Path) -> None:
    store = await make_store(tmp_path, 64 * MiB, 64 * MiB)
    h, data = chunk(7)
    await store.put(h, data)
    [home] = holders(store, h)
    other = store.pools[1 - home]
    await store.delete(h)
    other.put(h, data)  # e.g. placed there while the home pool was full
    assert await store.put(h, data) is False
    assert holders(store, h) == [1 - home]
    assert await store.get(h) == data


async def test_full_pool_skipped_then_nospace_names_pools(tmp_path: Path) -> None:
    store = await make_store(tmp_path, 4 * 4096, 4 * 4096)
    chunks = [chunk(i) for i in range(9)]
    for h, d in chunks[:8]:
        assert await store.put(h, d)
    assert [p.used for p in store.pools] == [4 * 4096, 4 * 4096]
    h, d = chunks[8]
    with pytest.raises(NoSpace) as err:
        await store.put(h, d)
    assert str(store.pools[0].path) in str(err.value) and str(store.pools[1].path) in str(err.value)
    assert holders(store, h) == []
    # A chunk already stored is still accepted (no-op) when every pool is full.
    assert await store.put(*chunks[0]) is False


async def test_has_many_across_pools(tmp_path: Path) -> None:
    store = await make_store(tmp_path, 64 * MiB, 64 * MiB)
    chunks = [chunk(i) for i in range(6)]
    store.pools[0].put(*chunks[0])
    store.pools[1].put(*chunks[1])
    await store.put(*chunks[2])
    assert await store.has_many([h for h, _ in chunks]) == [True, True, True, False, False, False]
    assert await store.has_many([]) == []


async def test_delete_removes_every_copy(tmp_path: Path) -> None:
    store = await make_store(tmp_path, 64 * MiB, 64 * MiB)
    h, d = chunk(3)
    for p in store.pools:
        p.put(h, d)
    assert await store.delete(h) is True
    assert holders(store, h) == []
    assert await store.delete(h) is False


async def test_get_prefers_a_good_copy_over_a_corrupt_one(tmp_path: Path) -> None:
    store = await make_store(tmp_path, 64 * MiB, 64 * MiB)
    h, d = chunk(4)
    for p in store.pools:
        p.put(h, d)
    bad = store.pools[0].path / "chunks" / h.hex()[:2] / h.hex()
    bad.chmod(0o644)
    bad.write_bytes(b"rot" + d[3:])
    assert await store.get(h) == d
    good = store.pools[1].path / "chunks" / h.hex()[:2] / h.hex()
    good.chmod(0o644)
    good.write_bytes(b"rot" + d[3:])
    with pytest.raises(Corrupt):
        await store.get(h)


async def test_concurrent_puts_of_one_chunk(tmp_path: Path) -> None:
    store = await make_store(tmp_path, 64 * MiB, 64 * MiB)
    h, d = chunk(5, MiB)
    results: list[bool] = []

    async def put() -> None:
        results.append(await store.put(h, d))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(put)
    assert sorted(results) == [False] * 7 + [True]
    assert sum(p.used for p in store.pools) == MiB
    assert await store.get(h) == d


async def test_needs_distinct_pools(tmp_path: Path) -> None:
    with pytest.raises(Invalid):
        LocalChunkStore([])
    with pytest.raises(Invalid):
        LocalChunkStore([Pool(tmp_path, capacity=MiB * 10), Pool(tmp_path, capacity=MiB * 10)])
