"""A node's listening socket: the Gateway (login) and the Session that hands out capabilities.

The capnp server classes of each interface live in ``pxfs.rpc.services``; they translate wire
calls into awaits on the node's trio services, given here as a ``Services`` bundle.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import capnp

from pxfs.errors import Unauthorized, Unavailable
from pxfs.rpc import auth
from pxfs.rpc.bridge import Bridge
from pxfs.rpc.errors import served
from pxfs.rpc.schema import TRAVERSAL_LIMIT_WORDS, pxfs_capnp

log = logging.getLogger(__name__)

LOGIN_DEADLINE = 10.0


@dataclass
class Services:
    """The trio objects a node exposes; any of them may be missing on a given node."""

    admin: Any = None
    chunks: Any = None
    control: Any = None
    volumes: Any = None


class SessionServer(pxfs_capnp.Session.Server):
    def __init__(self, bridge: Bridge, services: Services, peer: str) -> None:
        self._bridge, self._services, self._peer = bridge, services, peer

    def _need(self, name: str) -> Any:
        svc = getattr(self._services, name)
        if svc is None:
            raise Unavailable(f"{name} service", "not served by this node")
        return svc

    @served
    async def admin(self, _context: Any, **_: Any) -> None:
        from pxfs.rpc.services import AdminServer

        _context.results.admin = AdminServer(self._bridge, self._need("admin"))

    @served
    async def chunks(self, _context: Any, **_: Any) -> None:
        from pxfs.rpc.services import ChunkStoreServer

        _context.results.chunks = ChunkStoreServer(self._bridge, self._need("chunks"))

    @served
    async def control(self, _context: Any, **_: Any) -> None:
        from pxfs.rpc.services import ControlStoreServer

        _context.results.control = ControlStoreServer(self._bridge, self._need("control"))

    @served
    async def volumes(self, _context: Any, **_: Any) -> None:
        from pxfs.rpc.volume_server import VolumeServiceServer

        _context.results.volumes = VolumeServiceServer(self._bridge, self._need("volumes"), self._peer)


class GatewayServer(pxfs_capnp.Gateway.Server):
    """One per connection: the nonces it issued are single use and die with the connection."""

    def __init__(self, bridge: Bridge, services: Services, secret: bytes, cluster_id: str, node_id: str,
                 remote: str) -> None:
        self._bridge, self._services, self._secret = bridge, services, secret
        self._cluster_id, self._node_id, self._remote = cluster_id, node_id, remote
        self._nonces: set[bytes] = set()
        self.logged_in = False

    @served
    async def challenge(self, _context: Any, **_: Any) -> None:
        if len(self._nonces) >= 16:
            raise Unauthorized(f"node {self._node_id}", "too many outstanding login challenges")
        nonce = auth.new_nonce()
        self._nonces.add(nonce)
        r = _context.results
        r.nonce, r.clusterId, r.nodeId, r.version = nonce, self._cluster_id, self._node_id, 1

    @served
    async def login(self, nonce: bytes, clientNonce: bytes, proof: bytes, peer: str,  # noqa: N803
                    _context: Any, **_: Any) -> None:
        nonce, client_nonce, proof = bytes(nonce), bytes(clientNonce), bytes(proof)
        if nonce not in self._nonces:
            log.warning("login refused peer=%s remote=%s cause=unknown-or-replayed-nonce", peer, self._remote)
            raise Unauthorized(f"node {self._node_id}", "login refused: unknown or replayed challenge")
        self._nonces.discard(nonce)
        if len(client_nonce) != auth.NONCE_BYTES or not auth.check(
            auth.client_proof(self._secret, nonce, client_nonce), proof
        ):
            log.warning("login refused peer=%s remote=%s cause=wrong-secret", peer, self._remote)
            raise Unauthorized(f"node {self._node_id}", "login refused: wrong cluster secret")
        self.logged_in = True
        r = _context.results
        r.session = SessionServer(self._bridge, self._services, peer or self._remote)
        r.serverProof = auth.server_proof(self._secret, nonce, client_nonce)


class RpcServer:
    """Listens on one TCP port; every connection starts at a fresh Gateway."""

    def __init__(self, bridge: Bridge, services: Services, secret: bytes, cluster_id: str, node_id: str):
        self._bridge, self._services, self._secret = bridge, services, secret
        self._cluster_id, self._node_id = cluster_id, node_id
        self._server: Any = None
        self.port = 0

    async def listen(self, host: str, port: int) -> int:
        async def on_connection(stream: Any) -> None:
            remote = "?"
            try:
                gateway = GatewayServer(self._bridge, self._services, self._secret, self._cluster_id,
                                        self._node_id, remote)
                server = capnp.TwoPartyServer(stream, bootstrap=gateway,
                                              traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS)

                async def login_deadline() -> None:
                    # A peer that never logs in (or sends half a frame) must not hold a connection.
                    await asyncio.sleep(LOGIN_DEADLINE)
                    if not gateway.logged_in:
                        log.info("connection closed: no login within %gs", LOGIN_DEADLINE)
                        stream.close()

                deadline = asyncio.ensure_future(login_deadline())
                try:
                    await server.on_disconnect()
                finally:
                    deadline.cancel()
            except Exception as exc:  # noqa: BLE001 - a broken peer must never stop the node
                log.info("connection closed with error: %s", str(exc).splitlines()[0][:200] if str(exc) else exc)

        async def start() -> int:
            self._server = await capnp.AsyncIoStream.create_server(on_connection, host, port)
            return self._server.sockets[0].getsockname()[1]

        self.port = await self._bridge.run(start)
        return self.port

    async def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()

        await self._bridge.run(stop)
