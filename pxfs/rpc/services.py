"""Cap'n Proto servers of Admin, ChunkStore and ControlStore: wire in, trio service call, wire out.

Each method validates what the wire cannot (lengths, ranges) before anything reaches a service.
"""

from __future__ import annotations

import json
from typing import Any

from pxfs.cluster import records
from pxfs.errors import Invalid
from pxfs.model import NodeInfo
from pxfs.rpc import convert
from pxfs.rpc.bridge import Bridge
from pxfs.rpc.errors import served
from pxfs.rpc.schema import pxfs_capnp

MAX_KEY = 1024
MAX_HAS = 65536


def _hash(h: Any) -> bytes:
    h = bytes(h)
    if len(h) != 32:
        raise Invalid("chunk hash", f"must be 32 bytes of BLAKE3-256, got {len(h)}")
    return h


def _key(key: str) -> str:
    if not key or len(key) > MAX_KEY or "\0" in key:
        raise Invalid("control store key", "empty, too long or containing NUL")
    return key


class AdminServer(pxfs_capnp.Admin.Server):
    def __init__(self, bridge: Bridge, admin: Any) -> None:
        self._b, self._a = bridge, admin

    @served
    async def clusterInfo(self, _context: Any, **_: Any) -> None:  # noqa: N802
        info = await self._b.to_trio(self._a.cluster_info)
        r = _context.results
        r.id, r.name, r.seed, r.store = info["id"], info["name"], info["seed"], info["store"]

    @served
    async def listNodes(self, _context: Any, **_: Any) -> None:  # noqa: N802
        nodes = await self._b.to_trio(self._a.list_nodes)
        out = _context.results.init("nodes", len(nodes))
        for i, n in enumerate(nodes):
            convert.node_to(out[i], n)

    @served
    async def createVolume(self, name: str, size: int, repl: int, blockSize: int, labels: Any,  # noqa: N802,N803
                           minReplicas: int, _context: Any, **_: Any) -> None:
        vol = await self._b.to_trio(self._a.create_volume, name, size, repl, blockSize,
                                    convert.labels_from(labels), minReplicas)
        convert.volume_to(_context.results.init("volume"), vol)

    @served
    async def listVolumes(self, _context: Any, **_: Any) -> None:  # noqa: N802
        vols = await self._b.to_trio(self._a.list_volumes)
        out = _context.results.init("volumes", len(vols))
        for i, v in enumerate(vols):
            convert.volume_to(out[i], v)

    @served
    async def getVolume(self, name: str, _context: Any, **_: Any) -> None:  # noqa: N802
        convert.volume_to(_context.results.init("volume"), await self._b.to_trio(self._a.get_volume, name))

    @served
    async def resizeVolume(self, name: str, size: int, _context: Any, **_: Any) -> None:  # noqa: N802
        vol = await self._b.to_trio(self._a.resize_volume, name, size)
        convert.volume_to(_context.results.init("volume"), vol)

    @served
    async def deleteVolume(self, name: str, force: bool, _context: Any, **_: Any) -> None:  # noqa: N802
        await self._b.to_trio(self._a.delete_volume, name, force)

    @served
    async def haUpdate(self, name: str, repl: int, _context: Any, **_: Any) -> None:
        convert.volume_to(_context.results.init("volume"), await self._b.to_trio(self._a.ha_update, name, repl))

    @served
    async def removeNode(self, id: str, force: bool, _context: Any, **_: Any) -> None:  # noqa: A002
        await self._b.to_trio(self._a.remove_node, id, force)

    @served
    async def promoteVolume(self, name: str, node: str, _context: Any, **_: Any) -> None:  # noqa: N802
        convert.volume_to(_context.results.init("volume"), await self._b.to_trio(self._a.promote_volume, name, node))

    @served
    async def cloneVolume(self, source: str, name: str, _context: Any, **_: Any) -> None:
        convert.volume_to(_context.results.init("volume"), await self._b.to_trio(self._a.clone_volume, source, name))

    @served
    async def scheduleSnapshots(self, name: str, everySeconds: int, keep: int, _context: Any, **_: Any) -> None:
        await self._b.to_trio(self._a.schedule_snapshots, name, everySeconds, keep)

    @served
    async def storeCheck(self, _context: Any, **_: Any) -> None:  # noqa: N802
        _context.results.report = json.dumps(await self._b.to_trio(self._a.store_check))

    @served
    async def recover(self, _context: Any, **_: Any) -> None:
        _context.results.report = json.dumps(await self._b.to_trio(self._a.recover))

    @served
    async def repairVolume(self, name: str, _context: Any, **_: Any) -> None:
        _context.results.requested = await self._b.to_trio(self._a.repair_volume, name)


class ChunkStoreServer(pxfs_capnp.ChunkStore.Server):
    def __init__(self, bridge: Bridge, store: Any) -> None:
        self._b, self._s = bridge, store

    @served
    async def put(self, hash: Any, data: Any, _context: Any, **_: Any) -> None:  # noqa: A002
        _context.results.stored = await self._b.to_trio(self._s.put, _hash(hash), bytes(data))

    @served
    async def get(self, hash: Any, _context: Any, **_: Any) -> None:  # noqa: A002
        _context.results.data = await self._b.to_trio(self._s.get, _hash(hash))

    @served
    async def has(self, hashes: Any, _context: Any, **_: Any) -> None:
        if len(hashes) > MAX_HAS:
            raise Invalid("has", f"at most {MAX_HAS} hashes per call")
        present = await self._b.to_trio(self._s.has_many, [_hash(h) for h in hashes])
        out = _context.results.init("present", len(present))
        for i, p in enumerate(present):
            out[i] = bool(p)

    @served
    async def stats(self, _context: Any, **_: Any) -> None:
        pools = await self._b.to_trio(self._s.stats)
        out = _context.results.init("pools", len(pools))
        for i, p in enumerate(pools):
            convert.pool_to(out[i], p)


    @served
    async def verify(self, hashes: Any, _context: Any, **_: Any) -> None:
        if len(hashes) > MAX_HAS:
            raise Invalid("verify", f"at most {MAX_HAS} hashes per call")
        status = await self._b.to_trio(self._s.verify, [_hash(h) for h in hashes])
        out = _context.results.init("status", len(status))
        for i, st in enumerate(status):
            out[i] = st

    @served
    async def collect(self, dryRun: bool, graceSeconds: float, _context: Any, **_: Any) -> None:
        # The node checks the grace (pxfs.cluster.config.check_gc_grace): one rule, one message.
        _context.results.report = json.dumps(await self._b.to_trio(self._s.collect, dryRun, graceSeconds))

    @served
    async def list(self, after: Any, limit: int, _context: Any, **_: Any) -> None:
        found = await self._b.to_trio(self._s.list_hashes, bytes(after), max(1, min(limit or 4096, MAX_HAS)))
        out = _context.results.init("hashes", len(found))
        for i, h in enumerate(found):
            out[i] = h


class ControlStoreServer(pxfs_capnp.ControlStore.Server):
    def __init__(self, bridge: Bridge, store: Any) -> None:
        self._b, self._s = bridge, store

    @served
    async def get(self, key: str, _context: Any, **_: Any) -> None:
        value = await self._b.to_trio(self._s.get, _key(key))
        _context.results.found = value is not None
        _context.results.value = value or b""

    @served
    async def put(self, key: str, value: Any, _context: Any, **_: Any) -> None:
        value = bytes(value)
        records.validate(_key(key), value)
        await self._b.to_trio(self._s.put, key, value)

    @served
    async def delete(self, key: str, _context: Any, **_: Any) -> None:
        _context.results.deleted = await self._b.to_trio(self._s.delete, _key(key))

    @served
    async def range(self, prefix: str, _context: Any, **_: Any) -> None:
        items = await self._b.to_trio(self._s.range, prefix)
        out = _context.results.init("items", len(items))
        for i, (k, v) in enumerate(items):
            out[i].key, out[i].value = k.encode(), v

    @served
    async def cas(self, key: str, expected: Any, expectFound: bool, value: Any,  # noqa: N803
                  _context: Any, **_: Any) -> None:
        exp = bytes(expected) if expectFound else None
        value = bytes(value)
        records.validate(_key(key), value)
        _context.results.ok = await self._b.to_trio(self._s.cas, key, exp, value)

    @served
    async def heartbeat(self, node: Any, _context: Any, **_: Any) -> None:
        info: NodeInfo = convert.node_from(node)
        if not info.id or len(info.id) > 64:
            raise Invalid("heartbeat", "node id missing or too long")
        await self._b.to_trio(self._s.heartbeat, info)

    @served
    async def liveness(self, _context: Any, **_: Any) -> None:
        nodes = await self._b.to_trio(self._s.liveness)
        out = _context.results.init("nodes", len(nodes))
        for i, n in enumerate(nodes):
            convert.node_to(out[i], n)
