"""The control store of a non-seed node: the seed's ``ControlStore`` over RPC, reconnecting lazily."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from pxfs.errors import Unavailable
from pxfs.model import NodeInfo
from pxfs.rpc.bridge import Bridge
from pxfs.rpc.client import Connection, ControlClient
from pxfs.rpc.pki import Credential

log = logging.getLogger(__name__)
T = TypeVar("T")

CALL_TIMEOUT = 5.0


class RemoteStore:
    def __init__(self, bridge: Bridge, seed: str, credential: Credential, peer: str) -> None:
        self._bridge, self._seed, self._credential, self._peer = bridge, seed, credential, peer
        self._conn: Connection | None = None
        self._client: ControlClient | None = None
        self._lock = trio.Lock()

    async def _control(self) -> ControlClient:
        async with self._lock:
            if self._client is None:
                self._conn = await Connection.open(self._bridge, self._seed, self._credential, self._peer)
                self._client = await self._conn.control()
            return self._client

    async def _call(self, fn: Callable[[ControlClient], Awaitable[T]]) -> T:
        # Bounded: a frozen or partitioned seed must fail a call, never hang the node's rounds.
        try:
            with trio.fail_after(CALL_TIMEOUT):
                return await fn(await self._control())
        except trio.TooSlowError:
            await self.close()
            raise Unavailable(f"control store at seed {self._seed}", f"no answer in {CALL_TIMEOUT:g}s") from None
        except Unavailable:
            await self.close()
            raise

    async def close(self) -> None:
        conn, self._conn, self._client = self._conn, None, None
        if conn is not None:
            await conn.close()

    async def get(self, key: str) -> bytes | None:
        return await self._call(lambda c: c.get(key))

    async def put(self, key: str, value: bytes) -> None:
        await self._call(lambda c: c.put(key, value))

    async def delete(self, key: str) -> bool:
        return await self._call(lambda c: c.delete(key))

    async def range(self, prefix: str) -> list[tuple[str, bytes]]:
        return await self._call(lambda c: c.range(prefix))

    async def cas(self, key: str, expected: bytes | None, value: bytes) -> bool:
        return await self._call(lambda c: c.cas(key, expected, value))

    async def heartbeat(self, node: NodeInfo) -> None:
        await self._call(lambda c: c.heartbeat(node))

    async def liveness(self) -> list[NodeInfo]:
        return await self._call(lambda c: c.liveness())
