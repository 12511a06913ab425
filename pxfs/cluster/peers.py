"""Logged-in connections from one node (or mount) to the other nodes, found by id in the cluster map."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from pxfs.cluster import records
from pxfs.cluster.store import ControlStore
from pxfs.errors import NotFound, Unavailable
from pxfs.rpc.bridge import Bridge
from pxfs.rpc.client import ChunkClient, Connection
from pxfs.rpc.pki import Credential
from pxfs.rpc.volume_client import VolumeServiceClient

log = logging.getLogger(__name__)


def store_resolver(store: ControlStore) -> Callable[[str], Awaitable[str]]:
    """Node id -> address, from the control store's node records; the last address seen when the
    store cannot be reached, so replication and chunk copies go on while only the map is frozen."""
    known: dict[str, str] = {}

    async def resolve(node_id: str) -> str:
        key = f"nodes/{node_id}"
        try:
            raw = await store.get(key)
        except Unavailable:
            if node_id in known:
                return known[node_id]
            raise
        if raw is None:
            known.pop(node_id, None)
            raise NotFound(f"node {node_id}", "not registered in the cluster map")
        known[node_id] = records.decode_node(key, raw).address
        return known[node_id]

    return resolve

CALL_TIMEOUT = 10.0


class Peers:
    def __init__(self, bridge: Bridge, credential: Credential, self_id: str,
                 resolve: Callable[[str], Awaitable[str]]) -> None:
        self._bridge, self._credential, self._self_id, self._resolve = bridge, credential, self_id, resolve
        self._conns: dict[str, Connection] = {}
        self._locks: dict[str, trio.Lock] = {}

    async def address(self, node_id: str) -> str:
        return await self._resolve(node_id)

    async def connection(self, node_id: str) -> Connection:
        lock = self._locks.setdefault(node_id, trio.Lock())
        async with lock:
            conn = self._conns.get(node_id)
            if conn is None:
                conn = await Connection.open(self._bridge, await self.address(node_id), self._credential,
                                             peer=self._self_id, timeout=3)
                self._conns[node_id] = conn
            return conn

    async def forget(self, node_id: str) -> None:
        conn = self._conns.pop(node_id, None)
        if conn is not None:
            await conn.close()

    async def volumes(self, node_id: str) -> VolumeServiceClient:
        conn = await self.connection(node_id)
        return VolumeServiceClient(self._bridge, conn.peer, await conn.volumes_cap())

    async def chunks(self, node_id: str) -> ChunkClient:
        return await (await self.connection(node_id)).chunks()

    async def apply_many(self, node_id: str, volume: str, epoch: int, first: int, batches: list[bytes],
                         trimmed: int = 0) -> int:
        try:
            with trio.fail_after(CALL_TIMEOUT):
                return await (await self.volumes(node_id)).apply_many(volume, epoch, first, batches, trimmed)
        except (Unavailable, trio.TooSlowError):
            await self.forget(node_id)
            raise Unavailable(f"node {node_id}", "did not answer a replication call") from None

    async def load(self, node_id: str, volume: str, epoch: int, snapshot: str, items: list[tuple[bytes, bytes]],
                   seq: int, last_batch: bytes) -> None:
        """One part of a full copy (``pxfs.volume.transfer``)."""
        try:
            with trio.fail_after(CALL_TIMEOUT):
                await (await self.volumes(node_id)).load(volume, epoch, snapshot, items, seq, last_batch)
        except (Unavailable, trio.TooSlowError):
            await self.forget(node_id)
            raise Unavailable(f"node {node_id}", "did not answer a full-copy call") from None

    async def reset(self, node_id: str, volume: str, epoch: int) -> None:
        try:
            with trio.fail_after(CALL_TIMEOUT):
                await (await self.volumes(node_id)).reset(volume, epoch)
        except (Unavailable, trio.TooSlowError):
            await self.forget(node_id)
            raise Unavailable(f"node {node_id}", "did not answer") from None

    async def last_seq(self, node_id: str, volume: str) -> tuple[int, int, bytes]:
        try:
            with trio.fail_after(CALL_TIMEOUT):
                return await (await self.volumes(node_id)).last_seq(volume)
        except (Unavailable, trio.TooSlowError):
            await self.forget(node_id)
            raise Unavailable(f"node {node_id}", "did not answer") from None

    async def local_replicas(self, node_id: str) -> str:
        try:
            with trio.fail_after(CALL_TIMEOUT):
                return await (await self.volumes(node_id)).local_replicas()
        except (Unavailable, trio.TooSlowError):
            await self.forget(node_id)
            raise Unavailable(f"node {node_id}", "did not answer") from None

    async def close(self) -> None:
        for node_id in list(self._conns):
            await self.forget(node_id)
