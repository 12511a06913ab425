"""The control store: the cluster map as a small key-value store, behind one interface.

Backends: ``EmbeddedStore`` (RocksDB inside the seed node, served to the other nodes over the
``ControlStore`` RPC) and, later, etcd. Values are JSON documents; keys:

  nodes/<id>        NodeInfo of a registered node (labels, address, pools with usage)
  volumes/<name>    VolumeInfo spec (size, repl, block size, labels, replicas, coordinator, epoch)
  usage/<name>      {"used": bytes, "inodes": n} reported by the volume's coordinator
  mounts/<name>/<id> {"host", "pid", "mountpoint"} of a live mount (renewed by its heartbeat)

Liveness is not persisted: a node is up when the store heard its heartbeat within ``down_after``
seconds (an etcd backend will use leases for the same thing).
"""

from __future__ import annotations

import json
import time
from typing import Protocol

from rocksdict import Options, Rdict, WriteOptions

from pxfs.model import NodeInfo, PoolInfo

DOWN_AFTER = 3.0


class ControlStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, value: bytes) -> None: ...
    async def delete(self, key: str) -> bool: ...
    async def range(self, prefix: str) -> list[tuple[str, bytes]]: ...
    async def cas(self, key: str, expected: bytes | None, value: bytes) -> bool: ...
    async def heartbeat(self, node: NodeInfo) -> None: ...
    async def liveness(self) -> list[NodeInfo]: ...


def node_to_json(n: NodeInfo) -> bytes:
    d = n.to_json()
    d.pop("state")
    d.pop("last_seen_ms")
    return json.dumps(d).encode()


def node_from_json(raw: bytes) -> NodeInfo:
    d = json.loads(raw)
    pools = [PoolInfo(node=p["node"], path=p["path"], klass=p["class"], capacity=p["capacity"], used=p["used"],
                      free=p["free"], chunks=p.get("chunks", 0)) for p in d.get("pools", [])]
    return NodeInfo(id=d["id"], address=d["address"], labels=d.get("labels", {}), pools=pools,
                    seed=d.get("seed", False))


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
        raw = node_to_json(node)
        key = f"nodes/{node.id}".encode()
        if self._db.get(key) != raw:
            self._db.put(key, raw)

    async def liveness(self) -> list[NodeInfo]:
        now = time.monotonic()
        nodes = []
        for _key, raw in await self.range("nodes/"):
            n = node_from_json(raw)
            seen = self._seen.get(n.id)
            n.last_seen_ms = int((now - seen) * 1000) if seen is not None else 0
            n.state = "up" if seen is not None and now - seen <= self.down_after else "down"
            nodes.append(n)
        return nodes
