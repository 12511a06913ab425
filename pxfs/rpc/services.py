"""Cap'n Proto servers of Admin, ChunkStore and ControlStore: wire in, trio service call, wire out.

Each method validates what the wire cannot (lengths, ranges) before anything reaches a service.
"""

from __future__ import annotations

import json
from typing import Any

from pxfs.cluster import records
from pxfs.cluster.admin import MAX_BLOCK
from pxfs.errors import Invalid, Unauthorized
from pxfs.model import NodeInfo
from pxfs.rpc import convert
from pxfs.rpc.auth import require, require_volume
from pxfs.rpc.bridge import Bridge
from pxfs.rpc.errors import served
from pxfs.rpc.pki import Identity
from pxfs.rpc.schema import pxfs_capnp

MAX_KEY = 1024
MAX_HAS = 65536
MAX_CHUNK = MAX_BLOCK


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
    """Reads for every role (a mount sees only its volumes); everything that changes the cluster
    for admins only."""

    def __init__(self, bridge: Bridge, admin: Any, who: Identity) -> None:
        self._b, self._a, self._who = bridge, admin, who

    def _admin(self, what: str) -> None:
        require(self._who, what)

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
                           minReplicas: int, maxInodes: int, _context: Any, **_: Any) -> None:  # noqa: N803
        self._admin("create volume")
        vol = await self._b.to_trio(self._a.create_volume, name, size, repl, blockSize,
                                    convert.labels_from(labels), minReplicas, maxInodes)
        convert.volume_to(_context.results.init("volume"), vol)

    @served
    async def listVolumes(self, _context: Any, **_: Any) -> None:  # noqa: N802
        vols = [v for v in await self._b.to_trio(self._a.list_volumes) if self._who.may_use(v.name)]
        out = _context.results.init("volumes", len(vols))
        for i, v in enumerate(vols):
            convert.volume_to(out[i], v)

    @served
    async def getVolume(self, name: str, replicas: bool, _context: Any, **_: Any) -> None:  # noqa: N802
        require_volume(self._who, name, f'volume "{name}"')
        get = self._a.inspect_volume if replicas else self._a.get_volume
        convert.volume_to(_context.results.init("volume"), await self._b.to_trio(get, name))

    @served
    async def resizeVolume(self, name: str, size: int, maxInodes: int,  # noqa: N802,N803
                           _context: Any, **_: Any) -> None:
        self._admin("resize volume")
        vol = await self._b.to_trio(self._a.resize_volume, name, size, maxInodes)
        convert.volume_to(_context.results.init("volume"), vol)

    @served
    async def deleteVolume(self, name: str, force: bool, _context: Any, **_: Any) -> None:  # noqa: N802
        self._admin("delete volume")
        await self._b.to_trio(self._a.delete_volume, name, force)

    @served
    async def haUpdate(self, name: str, repl: int, _context: Any, **_: Any) -> None:
        self._admin("ha-update")
        convert.volume_to(_context.results.init("volume"), await self._b.to_trio(self._a.ha_update, name, repl))

    @served
    async def removeNode(self, id: str, force: bool, _context: Any, **_: Any) -> None:  # noqa: A002
        self._admin("remove node")
        await self._b.to_trio(self._a.remove_node, id, force)

    @served
    async def promoteVolume(self, name: str, node: str, _context: Any, **_: Any) -> None:  # noqa: N802
        self._admin("promote volume")
        convert.volume_to(_context.results.init("volume"), await self._b.to_trio(self._a.promote_volume, name, node))

    @served
    async def cloneVolume(self, source: str, name: str, _context: Any, **_: Any) -> None:
        self._admin("clone volume")
        convert.volume_to(_context.results.init("volume"), await self._b.to_trio(self._a.clone_volume, source, name))

    @served
    async def scheduleSnapshots(self, name: str, everySeconds: int, keep: int, _context: Any, **_: Any) -> None:
        self._admin("schedule snapshots")
        await self._b.to_trio(self._a.schedule_snapshots, name, everySeconds, keep)

    @served
    async def storeCheck(self, _context: Any, **_: Any) -> None:  # noqa: N802
        self._admin("store check")
        _context.results.report = json.dumps(await self._b.to_trio(self._a.store_check))

    @served
    async def recover(self, _context: Any, **_: Any) -> None:
        self._admin("cluster recover")
        _context.results.report = json.dumps(await self._b.to_trio(self._a.recover))

    @served
    async def repairVolume(self, name: str, _context: Any, **_: Any) -> None:
        self._admin("repair volume")
        _context.results.requested = await self._b.to_trio(self._a.repair_volume, name)


    @served
    async def revokeCredential(self, serial: str, name: str, _context: Any, **_: Any) -> None:  # noqa: N802
        self._admin("revoke credential")
        try:
            number = int(serial, 16)
        except ValueError:
            raise Invalid(f"credential {serial!r}", "serial must be hex") from None
        await self._b.to_trio(self._a.revoke_credential, number, name[:64])

    @served
    async def revokedCredentials(self, _context: Any, **_: Any) -> None:  # noqa: N802
        self._admin("list revoked credentials")
        _context.results.report = json.dumps(await self._b.to_trio(self._a.revoked_credentials))


class ChunkStoreServer(pxfs_capnp.ChunkStore.Server):
    """Nodes and admins: everything. A mount: get, has, stats, and put only to a node holding a
    replica of one of its volumes (a mount credential must not fill other nodes' pools)."""

    def __init__(self, bridge: Bridge, store: Any, who: Identity, volumes: Any = None) -> None:
        self._b, self._s, self._who, self._volumes = bridge, store, who, volumes

    def _tools(self, what: str) -> None:
        require(self._who, what, "node")

    @served
    async def put(self, hash: Any, data: Any, _context: Any, **_: Any) -> None:  # noqa: A002
        if self._who.role == "mount":
            if self._volumes is None or not await self._b.to_trio(self._volumes.replicates_any, self._who.volumes):
                raise Unauthorized("chunk put",
                                   f"refused to {self._who}: this node holds no replica of its volumes")
        if len(data) > MAX_CHUNK:
            raise Invalid("chunk", f"{len(data)} bytes: larger than the largest block ({MAX_CHUNK})")
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
        self._tools("verify chunks")
        if len(hashes) > MAX_HAS:
            raise Invalid("verify", f"at most {MAX_HAS} hashes per call")
        status = await self._b.to_trio(self._s.verify, [_hash(h) for h in hashes])
        out = _context.results.init("status", len(status))
        for i, st in enumerate(status):
            out[i] = st

    @served
    async def collect(self, dryRun: bool, graceSeconds: float, _context: Any, **_: Any) -> None:  # noqa: N803
        self._tools("garbage collection")
        # The node checks the grace (pxfs.cluster.config.check_gc_grace): one rule, one message.
        _context.results.report = json.dumps(await self._b.to_trio(self._s.collect, dryRun, graceSeconds))

    @served
    async def list(self, after: Any, limit: int, _context: Any, **_: Any) -> None:
        self._tools("list chunks")
        found = await self._b.to_trio(self._s.list_hashes, bytes(after), max(1, min(limit or 4096, MAX_HAS)))
        out = _context.results.init("hashes", len(found))
        for i, h in enumerate(found):
            out[i] = h


class ControlStoreServer(pxfs_capnp.ControlStore.Server):
    """Nodes only (the Session checks); a node heartbeats for itself only."""

    def __init__(self, bridge: Bridge, store: Any, who: Identity) -> None:
        self._b, self._s, self._who = bridge, store, who

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
        if self._who.role == "node" and info.id != self._who.name:
            raise Unauthorized(f"heartbeat of node {info.id}", f"refused to {self._who}: a node speaks for itself")
        await self._b.to_trio(self._s.heartbeat, info)

    @served
    async def liveness(self, _context: Any, **_: Any) -> None:
        nodes = await self._b.to_trio(self._s.liveness)
        out = _context.results.init("nodes", len(nodes))
        for i, n in enumerate(nodes):
            convert.node_to(out[i], n)
