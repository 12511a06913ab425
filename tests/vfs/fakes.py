"""In-process fakes of the two ports under the vfs: a real ``Meta`` on a MemKV, a dict of chunks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import blake3
import trio

from pxfs.errors import Corrupt, NotFound, PxfsError
from pxfs.meta.fs import Meta
from pxfs.meta.kv import MemKV
from pxfs.model import Attr
from pxfs.vfs.ports import BlockMap, BlockWrite


class FakeMeta:
    """MetaPort over ``pxfs.meta.fs.Meta``: every call is a checkpoint, as an RPC would be."""

    def __init__(self, capacity: int, block_size: int) -> None:
        self.meta = Meta(MemKV(), capacity, block_size)
        self.meta.init_root()
        self.commits: list[tuple[int, dict[int, BlockWrite], int]] = []

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.meta, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            await trio.lowlevel.checkpoint()
            return fn(*args, **kwargs)

        return call

    async def open(self, ino: int) -> tuple[Attr, BlockMap]:
        await trio.lowlevel.checkpoint()
        self.meta.open(ino)
        return self.meta.get_blocks(ino)

    async def commit(self, ino: int, blocks: Mapping[int, BlockWrite], size: int, mtime_ns: int,
                     put_started: float | None = None) -> Attr:
        await trio.lowlevel.checkpoint()
        attr = self.meta.commit_blocks(ino, blocks, size, mtime_ns)
        self.commits.append((ino, dict(blocks), size))
        return attr


class FakeChunks:
    """ChunkPort as a dict; counts calls, verifies hashes, and fails on demand."""

    def __init__(self) -> None:
        self.store: dict[bytes, bytes] = {}
        self.puts = 0  # puts that stored their chunk
        self.started = 0  # puts entered, stored or not: an upload under way shows here first
        self.gets: list[bytes] = []
        self.fail: PxfsError | None = None  # raised by every put while set
        self.get_gate: trio.Event | None = None  # gets wait on it while set: to observe in-flight fetches
        self.put_gate: trio.Event | None = None  # puts wait on it while set: to act in the middle of a flush

    async def put(self, h: bytes, data: bytes) -> None:
        self.started += 1
        if self.put_gate is not None:
            await self.put_gate.wait()
        await trio.lowlevel.checkpoint()
        if self.fail is not None:
            raise self.fail
        if blake3.blake3(data).digest() != h:
            raise Corrupt(h.hex(), "put with a wrong hash")
        self.puts += 1
        self.store[h] = bytes(data)

    async def get(self, h: bytes) -> bytes:
        self.gets.append(h)
        if self.get_gate is not None:
            await self.get_gate.wait()
        await trio.lowlevel.checkpoint()
        try:
            return self.store[h]
        except KeyError:
            raise NotFound(h.hex(), "no such chunk") from None
