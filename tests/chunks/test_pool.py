"""Pool: one directory of content-addressed chunks on a local disk."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import blake3
import pytest

from pxfs.chunks.pool import GiB, MiB, Pool, default_reserve
from pxfs.errors import Corrupt, Invalid, NoSpace, NotFound


def chunk(i: int, size: int = 4096) -> tuple[bytes, bytes]:
    data = i.to_bytes(8, "big") * (size // 8) + b"x" * (size % 8)
    return blake3.blake3(data).digest(), data


def chunk_file(pool: Pool, h: bytes) -> Path:
    return pool.path / "chunks" / h.hex()[:2] / h.hex()


def all_files(pool: Pool) -> list[Path]:
    return sorted(p for p in (pool.path / "chunks").rglob("*") if p.is_file())


class SmallDisk(Pool):
    """A pool on a disk with only ``disk_free`` bytes left, whatever the real disk says."""

    disk_free = 0

    def _disk_free(self) -> int:
        return self.disk_free


@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    p = Pool(tmp_path / "pool", capacity=64 * MiB, reserve=0)
    p.open()
    return p


def test_put_get_roundtrip(pool: Pool) -> None:
    h, data = chunk(1)
    assert pool.put(h, data) is True
    assert pool.get(h) == data
    assert pool.has(h)
    assert pool.size_of(h) == len(data)
    assert pool.used == len(data)
    assert pool.chunk_count == 1
    assert chunk_file(pool, h).read_bytes() == data


def test_put_memoryview_and_empty_chunk(pool: Pool) -> None:
    h, data = chunk(2)
    assert pool.put(h, memoryview(data))
    assert pool.get(h) == data
    empty = blake3.blake3(b"").digest()
    assert pool.put(empty, b"")
    assert pool.get(empty) == b""
    assert pool.used == len(data)
    assert pool.chunk_count == 2


def test_dedup_second_put_writes_nothing(pool: Pool) -> None:
    h, data = chunk(3)
    assert pool.put(h, data)
    before = chunk_file(pool, h).stat()
    assert pool.put(h, data) is False
    after = chunk_file(pool, h).stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert pool.used == len(data)
    assert pool.chunk_count == 1


def test_hash_mismatch_refused_and_nothing_written(pool: Pool) -> None:
    h, _ = chunk(4)
    with pytest.raises(Invalid, match="hash mismatch"):
        pool.put(h, b"other bytes")
    assert all_files(pool) == []
    assert not pool.has(h)
    assert pool.used == 0


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_wrong_hash_length(pool: Pool, length: int) -> None:
    h = b"\x01" * length
    with pytest.raises(Invalid, match="bytes, not 32"):
        pool.put(h, b"data")
    with pytest.raises(Invalid):
        pool.get(h)
    with pytest.raises(Invalid):
        pool.has(h)
    assert all_files(pool) == []


def test_get_missing(pool: Pool) -> None:
    h, _ = chunk(5)
    with pytest.raises(NotFound):
        pool.get(h)
    assert pool.size_of(h) is None
    assert pool.delete(h) is False
    assert pool.quarantine(h) is None


def test_corrupt_chunk_detected_left_in_place_then_quarantined(
    pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    h, data = chunk(6)
    pool.put(h, data)
    path = chunk_file(pool, h)
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    with pytest.raises(Corrupt):
        pool.get(h)
    assert path.exists()
    assert pool.has(h)

    with caplog.at_level(logging.WARNING, logger="pxfs.chunks.pool"):
        dest = pool.quarantine(h)
    assert "quarantined" in caplog.text
    assert dest is not None and dest.parent == pool.path / "corrupt"
    assert dest.exists() and not path.exists()
    assert pool.used == 0 and pool.chunk_count == 0
    with pytest.raises(NotFound):
        pool.get(h)
    # A repair puts a good copy back under the same name.
    assert pool.put(h, data)
    assert pool.get(h) == data
    assert list(pool.iter_hashes()) == [h]  # the quarantined copy is not listed


def test_truncated_chunk_is_corrupt(pool: Pool) -> None:
    h, data = chunk(7)
    pool.put(h, data)
    os.truncate(chunk_file(pool, h), 10)
    with pytest.raises(Corrupt):
        pool.get(h)


def test_capacity_minus_reserve_refuses_with_nospace(tmp_path: Path) -> None:
    pool = Pool(tmp_path / "p", capacity=3 * 4096, reserve=4096)
    pool.open()
    h1, d1 = chunk(1)
    h2, d2 = chunk(2)
    h3, d3 = chunk(3)
    assert pool.put(h1, d1)
    assert pool.free == 4096
    assert pool.put(h2, d2)  # exactly fills capacity - reserve
    assert pool.free == 0
    with pytest.raises(NoSpace, match="does not fit"):
        pool.put(h3, d3)
    assert pool.used == 2 * 4096
    assert pool.chunk_count == 2
    assert not pool.has(h3)
    # An existing chunk is still a cheap no-op when full.
    assert pool.put(h1, d1) is False
    pool.delete(h1)
    assert pool.put(h3, d3)


def test_real_disk_free_space_respected(tmp_path: Path) -> None:
    pool = SmallDisk(tmp_path / "p", capacity=GiB, reserve=8192)
    pool.open()
    pool.disk_free = 8192 + 4096
    assert pool.free == 4096
    h1, d1 = chunk(1)
    assert pool.put(h1, d1)
    pool.disk_free = 8192 + 4095
    h2, d2 = chunk(2)
    with pytest.raises(NoSpace, match="disk has"):
        pool.put(h2, d2)
    assert pool.used == 4096
    assert not pool.has(h2)
    assert pool.free == 4095


def test_reopen_recomputes_used_and_removes_temp_leftovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = Pool(tmp_path / "p", capacity=64 * MiB, reserve=0)
    pool.open()
    chunks = [chunk(i, 1000 + i) for i in range(20)]
    for h, d in chunks:
        pool.put(h, d)
    pool.delete(chunks[0][0])
    # What a crash between create and rename leaves behind.
    leftover = chunk_file(pool, chunks[1][0]).with_name(".tmp-" + chunks[1][0].hex() + "-dead")
    leftover.write_bytes(b"half a chunk")

    again = Pool(tmp_path / "p", capacity=64 * MiB, reserve=0)
    with caplog.at_level(logging.WARNING, logger="pxfs.chunks.pool"):
        again.open()
    assert "removed 1 temp files left by a crash" in caplog.text
    assert again.used == sum(len(d) for _, d in chunks[1:])
    assert again.chunk_count == 19
    assert not leftover.exists()
    assert sorted(again.iter_hashes()) == sorted(h for h, _ in chunks[1:])
    assert again.get(chunks[5][0]) == chunks[5][1]


def test_open_creates_layout(tmp_path: Path) -> None:
    pool = Pool(tmp_path / "deep" / "pool", capacity=MiB * 100)
    pool.open()
    assert (pool.path / "chunks" / "00").is_dir()
    assert (pool.path / "chunks" / "ff").is_dir()
    assert (pool.path / "corrupt").is_dir()
    assert pool.used == 0 and pool.chunk_count == 0
    pool.open()  # idempotent


def test_not_open_refuses(tmp_path: Path) -> None:
    pool = Pool(tmp_path / "p", capacity=MiB * 100)
    h, d = chunk(1)
    with pytest.raises(Invalid, match="not open"):
        pool.put(h, d)


def test_concurrent_puts_from_threads(pool: Pool) -> None:
    chunks = [chunk(i, 64 * 1024) for i in range(16)]
    results: list[list[bool]] = [[] for _ in chunks]
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        # Every thread puts every chunk: each chunk is put by 8 threads at once.
        for i, (h, d) in enumerate(chunks):
            results[i].append(pool.put(h, d))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert sorted(r) == [False] * 7 + [True]
    assert pool.used == sum(len(d) for _, d in chunks)
    assert pool.chunk_count == len(chunks)
    for h, d in chunks:
        assert pool.get(h) == d
    assert not [p for p in all_files(pool) if p.name.startswith(".tmp-")]


def test_concurrent_puts_never_overcommit(tmp_path: Path) -> None:
    pool = Pool(tmp_path / "p", capacity=10 * 4096, reserve=0)
    pool.open()
    chunks = [chunk(i) for i in range(40)]
    stored: list[bool] = []
    lock = threading.Lock()

    def worker(part: list[tuple[bytes, bytes]]) -> None:
        for h, d in part:
            try:
                ok = pool.put(h, d)
            except NoSpace:
                ok = False
            with lock:
                stored.append(ok)

    threads = [threading.Thread(target=worker, args=(chunks[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stored.count(True) == 10
    assert pool.used == 10 * 4096
    assert len(all_files(pool)) == 10


def test_has_many_delete_size_iter(pool: Pool) -> None:
    chunks = [chunk(i) for i in range(5)]
    for h, d in chunks[:3]:
        pool.put(h, d)
    hs = [h for h, _ in chunks]
    assert pool.has_many(hs) == [True, True, True, False, False]
    assert pool.has_many([]) == []
    assert sorted(pool.iter_hashes()) == sorted(hs[:3])
    assert pool.delete(hs[1]) is True
    assert pool.delete(hs[1]) is False
    assert pool.has_many(hs) == [True, False, True, False, False]
    assert pool.used == 2 * 4096
    assert pool.chunk_count == 2


def test_default_reserve() -> None:
    assert default_reserve(1 << 40) == GiB
    assert default_reserve(100 * GiB) == GiB
    assert default_reserve(10 * GiB) == 10 * GiB // 100
    assert default_reserve(100 * MiB) == 4 * MiB
    assert default_reserve(2 * MiB) == MiB


@pytest.mark.parametrize(
    ("capacity", "reserve", "klass"),
    [(0, None, "medium"), (-1, 0, "medium"), (100, 100, "medium"), (100, -1, "medium"), (100, 0, "fast")],
)
def test_bad_parameters(tmp_path: Path, capacity: int, reserve: int | None, klass: str) -> None:
    with pytest.raises(Invalid):
        Pool(tmp_path, capacity=capacity, reserve=reserve, klass=klass)


def test_properties(tmp_path: Path) -> None:
    pool = Pool(str(tmp_path / "p"), capacity=100 * GiB, klass="high")
    assert pool.path == tmp_path / "p"
    assert pool.klass == "high"
    assert pool.capacity == 100 * GiB
    assert pool.reserve == GiB
    pool.open()
    st = os.statvfs(pool.path)
    assert pool.free <= max(0, st.f_bavail * st.f_frsize - GiB)


def test_sweep_keeps_what_is_named_and_young_and_stops_at_its_deadline(pool: Pool) -> None:
    (h1, d1), (h2, d2), (h3, d3) = chunk(1), chunk(2), chunk(3)
    for h, d in [(h1, d1), (h2, d2), (h3, d3)]:
        pool.put(h, d)
    old = time.time() - 1000
    for h in (h1, h2):
        os.utime(chunk_file(pool, h), (old, old))
    # Past its deadline a sweep deletes nothing: the mark it was given may be out of date.
    assert pool.sweep({h1}, time.time() - 100, False, until=time.time() - 1) == (0, 0, 0)
    scanned, deleted, _freed = pool.sweep({h1}, time.time() - 100, False)
    assert (scanned, deleted) == (3, 1)
    assert pool.has(h1) and not pool.has(h2) and pool.has(h3)  # named, unnamed and old, young
