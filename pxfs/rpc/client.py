"""Connecting to a node: mutual TLS with a credential (pxfs.rpc.pki), typed trio-side clients.

Every client method is one ``await`` in trio; the capnp work (building the request, reading the
answer into plain Python values) happens on the bridge's thread.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import capnp
import trio

from pxfs.errors import Invalid, PxfsError, Unauthorized, Unavailable
from pxfs.model import NodeInfo, PoolInfo, VolumeInfo
from pxfs.rpc import convert, tls
from pxfs.rpc.bridge import CAPNP_ATTRS, Bridge, CapnpError
from pxfs.rpc.errors import decode
from pxfs.rpc.pki import Credential
from pxfs.rpc.schema import TRAVERSAL_LIMIT_WORDS, pxfs_capnp

log = logging.getLogger(__name__)

T = TypeVar("T")
CONNECT_TIMEOUT = 5.0


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise Invalid(f"address {address!r}", "expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


class _Caller:
    """Runs one capnp coroutine through the bridge and turns its failure into a PxfsError."""

    def __init__(self, bridge: Bridge, peer: str) -> None:
        self.bridge, self.peer = bridge, peer
        bridge.track(self)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return await self.bridge.run(fn, *args)
        except PxfsError:
            raise
        except (CapnpError, capnp.KjException, OSError, EOFError) as exc:
            raise decode(exc, self.peer) from None

    async def drop(self) -> None:
        """Release this client's capability now, on the capnp thread."""
        async def go() -> None:
            self.cap = None  # type: ignore[attr-defined]
        if getattr(self, "cap", None) is not None:
            await self.bridge.run(go)

    def __del__(self) -> None:
        # capnp objects must be destroyed on the capnp thread (see Bridge.dispose): move every
        # reference out of this object into the one list the capnp thread will clear.
        held = [self.__dict__.pop(name) for name in CAPNP_ATTRS if self.__dict__.get(name) is not None]
        if held:
            self.bridge.dispose(held)


class AdminClient(_Caller):
    def __init__(self, bridge: Bridge, peer: str, cap: Any) -> None:
        super().__init__(bridge, peer)
        self.cap = cap

    async def revoke_credential(self, serial: int, name: str) -> None:
        async def go() -> None:
            await self.cap.revokeCredential(f"{serial:x}", name)
        await self.call(go)

    async def revoked_credentials(self) -> list[dict[str, Any]]:
        async def go() -> str:
            return (await self.cap.revokedCredentials()).report
        return json.loads(await self.call(go))

    async def cluster_info(self) -> dict[str, str]:
        async def go() -> dict[str, str]:
            r = await self.cap.clusterInfo()
            return {"id": r.id, "name": r.name, "seed": r.seed, "store": r.store}
        return await self.call(go)

    async def list_nodes(self) -> list[NodeInfo]:
        async def go() -> list[NodeInfo]:
            return [convert.node_from(n) for n in (await self.cap.listNodes()).nodes]
        return await self.call(go)

    async def create_volume(self, name: str, size: int, repl: int, block_size: int,
                            labels: dict[str, str], min_replicas: int = 1, max_inodes: int = 0) -> VolumeInfo:
        async def go() -> VolumeInfo:
            req = self.cap.createVolume_request()
            req.name, req.size, req.repl, req.blockSize = name, size, repl, block_size
            req.minReplicas, req.maxInodes = min_replicas, max_inodes
            convert.labels_to(req.init("labels", len(labels)), labels)
            return convert.volume_from((await req.send()).volume)
        return await self.call(go)

    async def list_volumes(self) -> list[VolumeInfo]:
        async def go() -> list[VolumeInfo]:
            return [convert.volume_from(v) for v in (await self.cap.listVolumes()).volumes]
        return await self.call(go)

    async def get_volume(self, name: str, replicas: bool = False) -> VolumeInfo:
        """``replicas``: with each replica's metadata on disk (``detail["replica_meta"]``)."""
        async def go() -> VolumeInfo:
            return convert.volume_from((await self.cap.getVolume(name, replicas)).volume)
        return await self.call(go)

    async def resize_volume(self, name: str, size: int, max_inodes: int = 0) -> VolumeInfo:
        """``size`` 0 keeps the size, ``max_inodes`` 0 the inode limit."""
        async def go() -> VolumeInfo:
            return convert.volume_from((await self.cap.resizeVolume(name, size, max_inodes)).volume)
        return await self.call(go)

    async def delete_volume(self, name: str, force: bool) -> None:
        async def go() -> None:
            await self.cap.deleteVolume(name, force)
        await self.call(go)

    async def ha_update(self, name: str, repl: int) -> VolumeInfo:
        async def go() -> VolumeInfo:
            return convert.volume_from((await self.cap.haUpdate(name, repl)).volume)
        return await self.call(go)

    async def remove_node(self, node_id: str, force: bool) -> None:
        async def go() -> None:
            await self.cap.removeNode(node_id, force)
        await self.call(go)

    async def promote_volume(self, name: str, node: str) -> VolumeInfo:
        async def go() -> VolumeInfo:
            return convert.volume_from((await self.cap.promoteVolume(name, node)).volume)
        return await self.call(go)

    async def clone_volume(self, source: str, name: str) -> VolumeInfo:
        async def go() -> VolumeInfo:
            return convert.volume_from((await self.cap.cloneVolume(source, name)).volume)
        return await self.call(go)

    async def schedule_snapshots(self, name: str, every: int, keep: int) -> None:
        async def go() -> None:
            await self.cap.scheduleSnapshots(name, every, keep)
        await self.call(go)

    async def repair_volume(self, name: str) -> float:
        async def go() -> float:
            return float((await self.cap.repairVolume(name)).requested)
        return await self.call(go)

    async def store_check(self) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            return json.loads((await self.cap.storeCheck()).report)
        return await self.call(go)

    async def recover(self) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            return json.loads((await self.cap.recover()).report)
        return await self.call(go)


class ChunkClient(_Caller):
    """A remote node's chunk store; same async face as ``pxfs.chunks.local.LocalChunkStore``."""

    def __init__(self, bridge: Bridge, peer: str, cap: Any) -> None:
        super().__init__(bridge, peer)
        self.cap = cap

    async def put(self, h: bytes, data: bytes) -> bool:
        async def go() -> bool:
            return (await self.cap.put(h, data)).stored
        return await self.call(go)

    async def get(self, h: bytes) -> bytes:
        async def go() -> bytes:
            return bytes((await self.cap.get(h)).data)
        return await self.call(go)

    async def has_many(self, hashes: list[bytes]) -> list[bool]:
        async def go() -> list[bool]:
            return list((await self.cap.has(hashes)).present)
        return await self.call(go)

    async def stats(self) -> list[PoolInfo]:
        async def go() -> list[PoolInfo]:
            return [convert.pool_from(p) for p in (await self.cap.stats()).pools]
        return await self.call(go)

    async def verify(self, hashes: list[bytes]) -> list[int]:
        async def go() -> list[int]:
            return list((await self.cap.verify(hashes)).status)
        return await self.call(go)

    async def collect(self, dry_run: bool, grace: float) -> dict[str, Any]:
        async def go() -> str:
            return (await self.cap.collect(dry_run, grace)).report
        return json.loads(await self.call(go))

    async def list_hashes(self, after: bytes, limit: int) -> list[bytes]:
        async def go() -> list[bytes]:
            return [bytes(h) for h in (await self.cap.list(after, limit)).hashes]
        return await self.call(go)


class ControlClient(_Caller):
    """The seed's embedded control store, seen from another node (``ControlStore`` interface)."""

    def __init__(self, bridge: Bridge, peer: str, cap: Any) -> None:
        super().__init__(bridge, peer)
        self.cap = cap

    async def get(self, key: str) -> bytes | None:
        async def go() -> bytes | None:
            r = await self.cap.get(key)
            return bytes(r.value) if r.found else None
        return await self.call(go)

    async def put(self, key: str, value: bytes) -> None:
        async def go() -> None:
            await self.cap.put(key, value)
        await self.call(go)

    async def delete(self, key: str) -> bool:
        async def go() -> bool:
            return (await self.cap.delete(key)).deleted
        return await self.call(go)

    async def range(self, prefix: str) -> list[tuple[str, bytes]]:
        async def go() -> list[tuple[str, bytes]]:
            return [(bytes(i.key).decode(), bytes(i.value)) for i in (await self.cap.range(prefix)).items]
        return await self.call(go)

    async def cas(self, key: str, expected: bytes | None, value: bytes) -> bool:
        async def go() -> bool:
            return (await self.cap.cas(key, expected or b"", expected is not None, value)).ok
        return await self.call(go)

    async def heartbeat(self, node: NodeInfo) -> None:
        async def go() -> None:
            req = self.cap.heartbeat_request()
            convert.node_to(req.init("node"), node)
            await req.send()
        await self.call(go)

    async def liveness(self) -> list[NodeInfo]:
        async def go() -> list[NodeInfo]:
            return [convert.node_from(n) for n in (await self.cap.liveness()).nodes]
        return await self.call(go)


class Connection(_Caller):
    """One logged-in TCP connection to a node."""

    def __init__(self, bridge: Bridge, address: str, client: Any, session: Any, node_id: str,
                 cluster_id: str) -> None:
        super().__init__(bridge, address)
        self.address, self.node_id, self.cluster_id = address, node_id, cluster_id
        self._client, self._session = client, session
        self._caps: dict[str, Any] = {}
        self._cap_lock = trio.Lock()

    @classmethod
    async def open(cls, bridge: Bridge, address: str, credential: Credential, peer: str = "",
                   timeout: float = CONNECT_TIMEOUT) -> Connection:
        """Mutual TLS to ``address`` with ``credential``; the node must present a node certificate
        of the same cluster CA (a mount's or admin's certificate cannot pose as a node)."""
        host, port = split_address(address)
        shook = False

        async def go() -> Connection:
            nonlocal shook
            stream, server = await tls.connect(host, port, credential.client_context())
            shook = True
            if server.role != "node":
                stream.close()
                raise Unauthorized(f"node {address}", f"presented the credential of {server}, not of a node")
            client = capnp.TwoPartyClient(stream, traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS)
            gateway = client.bootstrap().cast_as(pxfs_capnp.Gateway)
            r = await gateway.hello(peer)
            if r.nodeId != server.name:
                client.close()
                raise Unauthorized(f"node {address}", f"says it is {r.nodeId} but its certificate names {server.name}")
            return cls(bridge, address, client, r.session, r.nodeId, r.clusterId)

        caller = _Caller(bridge, address)
        try:
            with trio.fail_after(timeout):
                return await caller.call(go)
        except trio.TooSlowError:
            raise Unavailable(f"node {address}", f"no answer within {timeout:g}s") from None
        except Unavailable as err:
            if shook:
                # TLS 1.3: the node checks the client's certificate after the client thinks the
                # handshake is done, and refuses by closing the connection.
                raise Unauthorized(f"node {address}", f"closed the connection after the TLS handshake ({err.cause}): "
                                   f"it refused credential {str(credential.path)!r} (another cluster's CA, expired, "
                                   "or not valid yet)") from None
            raise Unavailable(f"node {address}", f"cannot connect: {err.cause}") from None


    async def _cap(self, name: str, iface: Any) -> Any:
        cap = self._caps.get(name)
        if cap is not None:
            return cap

        async def go() -> Any:
            if name not in self._caps:
                r = await getattr(self._session, name)()
                self._caps[name] = getattr(r, name).cast_as(iface)
            return self._caps[name]

        # One fetch at a time: a capability fetched twice would leave one copy referenced only
        # from the trio side, and its destructor needs the KJ loop of the capnp thread.
        async with self._cap_lock:
            return await self.call(go)

    async def admin(self) -> AdminClient:
        return AdminClient(self.bridge, self.peer, await self._cap("admin", pxfs_capnp.Admin))

    async def chunks(self) -> ChunkClient:
        return ChunkClient(self.bridge, self.peer, await self._cap("chunks", pxfs_capnp.ChunkStore))

    async def control(self) -> ControlClient:
        return ControlClient(self.bridge, self.peer, await self._cap("control", pxfs_capnp.ControlStore))

    async def volumes_cap(self) -> Any:
        return await self._cap("volumes", pxfs_capnp.VolumeService)

    async def close(self) -> None:
        async def go() -> None:
            self._caps.clear()
            self._session = None
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - the peer may be gone already
                pass
            self._client = None

        with trio.CancelScope(shield=True):
            try:
                with trio.move_on_after(2):
                    await self.bridge.run(go)
            except PxfsError:
                pass
