"""Fixtures for the meta tier: KV engines and a Meta on a fake clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pxfs.meta.fs import Meta
from pxfs.meta.kv import KV, MemKV, RocksKV

BLOCK = 4096


class FakeClock:
    """Deterministic nanosecond clock: every reading is one microsecond later than the last."""

    def __init__(self) -> None:
        self.now = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        self.now += 1000
        return self.now


@pytest.fixture(params=["mem", "rocks"])
def kv(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KV]:
    store: KV = MemKV() if request.param == "mem" else RocksKV(str(tmp_path / "kv"))
    yield store
    store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def meta(clock: FakeClock) -> Meta:
    m = Meta(MemKV(), capacity=10 * BLOCK, block_size=BLOCK, clock=clock)
    m.init_root()
    return m


@pytest.fixture
def rocks_meta(tmp_path: Path, clock: FakeClock) -> Iterator[Meta]:
    store = RocksKV(str(tmp_path / "meta"))
    m = Meta(store, capacity=10 * BLOCK, block_size=BLOCK, clock=clock)
    m.init_root()
    yield m
    store.close()
