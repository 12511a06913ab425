"""Fixtures for the vfs tier: a Vfs over in-process fakes of the metadata and the chunk store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from pxfs.vfs.vfs import Vfs
from tests.vfs.fakes import FakeChunks, FakeMeta

BLOCK = 4096
ROOT = 1


@pytest.fixture
def meta() -> FakeMeta:
    return FakeMeta(capacity=1 << 30, block_size=BLOCK)


@pytest.fixture
def chunks() -> FakeChunks:
    return FakeChunks()


@asynccontextmanager
async def running(meta: FakeMeta, chunks: FakeChunks, **kwargs: Any) -> AsyncIterator[Vfs]:
    """A Vfs with its background task running, as the mount daemon runs it; closed on exit."""
    vfs = Vfs(meta, chunks, BLOCK, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(vfs.run)
        try:
            yield vfs
            await vfs.close()
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture
async def vfs(meta: FakeMeta, chunks: FakeChunks) -> AsyncIterator[Vfs]:
    async with running(meta, chunks) as v:
        yield v


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that differ in every block (no accidental dedup between blocks)."""
    return bytes((i * 7 + seed + i // BLOCK) % 251 for i in range(n))
