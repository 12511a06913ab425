"""The control store: the cluster map as a small key-value store, behind one interface.

Backends (registered by name in ``pxfs.cluster.backends``): ``EmbeddedStore`` here (RocksDB inside
the seed node, served to the other nodes over the ``ControlStore`` RPC) and ``EtcdStore``
(``pxfs.cluster.etcd_store``). The keys and their records are in ``pxfs.cluster.records``.

Embedded liveness is not persisted: a node is up when the store heard its heartbeat within
``down_after`` seconds. etcd uses a lease per node for the same thing.
"""

from __future__ import annotations

import time
from typing import Protocol

from rocksdict import Options, Rdict, WriteOptions

from pxfs.cluster import records
from pxfs.model import NodeInfo

DOWN_AFTER = 3.0


class ControlStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, value: bytes) -> None: ...
    async def delete(self, key: str) -> bool: ...
    async def range(self, prefix: str) -> list[tuple[str, bytes]]: ...
    async def cas(self, key: str, expected: bytes | None, value: bytes) -> bool: ...
    async def heartbeat(self, node: NodeInfo) -> None: ...
    async def liveness(self) -> list[NodeInfo]: ...


class Election(Protocol):
    """Who runs a cluster-wide duty (the manager): ``lead()`` says whether this node does now."""

    async def lead(self) -> bool: ...
    async def resign(self) -> None: ...


class LeadAlways:
    """The embedded store's seed: it holds the store, so it is the one manager there can be."""

    async def lead(self) -> bool:
        return True

    async def resign(self) -> None:
        return None


class EmbeddedStore:
    """RocksDB in the seed node. Small records only, so calls stay on the trio thread."""

    def __init__(self, path: str, down_after: float = DOWN_AFTER) -> None:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self._db = Rdict(path, options=opts)
        sync = WriteOptions()
        sync.sync = True  # the cluster map is small and rarely written: every write is durable
        self._db.set_write_options(sync)
        self._seen: dict[str, float] = {}
        self.down_after = down_after

    def close(self) -> None:
        self._db.close()

    async def get(self, key: str) -> bytes | None:
        return self._db.get(key.encode())

    async def put(self, key: str, value: bytes) -> None:
        self._db.put(key.encode(), value)

    async def delete(self, key: str) -> bool:
        k = key.encode()
        if self._db.get(k) is None:
            return False
        self._db.delete(k)
        return True

    async def range(self, prefix: str) -> list[tuple[str, bytes]]:
        p = prefix.encode()
        out: list[tuple[str, bytes]] = []
        it = self._db.iter()
        it.seek(p)
        while it.valid():
            k = it.key()
            if not k.startswith(p):
                break
            out.append((k.decode(), it.value()))
            it.next()
        return out

    async def cas(self, key: str, expected: bytes | None, value: bytes) -> bool:
        # Atomic because the store is only touched from the seed's trio thread, with no await
        # between the read and the write.
        if self._db.get(key.encode()) != expected:
            return False
        self._db.put(key.encode(), value)
        return True

    async def heartbeat(self, node: NodeInfo) -> None:
        self._seen[node.id] = time.monotonic()
        raw = records.encode_node(node)
        key = f"nodes/{node.id}".encode()
        if self._db.get(key) != raw:
            self._db.put(key, raw)

    async def liveness(self) -> list[NodeInfo]:
        now = time.monotonic()
        nodes = []
        for n in records.decode_all(await self.range("nodes/"), records.decode_node):
            seen = self._seen.get(n.id)
            n.last_seen_ms = int((now - seen) * 1000) if seen is not None else 0
            n.state = "up" if seen is not None and now - seen <= self.down_after else "down"
            nodes.append(n)
        return nodes
