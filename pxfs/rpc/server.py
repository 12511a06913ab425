"""A node's listening socket: mutual TLS, the Gateway and the Session that hands out capabilities by role.

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
from pxfs.rpc import tls
from pxfs.rpc.auth import require
from pxfs.rpc.bridge import Bridge
from pxfs.rpc.errors import InFlight, served
from pxfs.rpc.pki import Credential, Identity
from pxfs.rpc.schema import TRAVERSAL_LIMIT_WORDS, pxfs_capnp

log = logging.getLogger(__name__)

LOGIN_DEADLINE = 10.0
# Calls one connection may have running at once; a mount keeps well below (its write-back and
# readahead run tens in parallel).
MAX_IN_FLIGHT = 256


@dataclass
class Services:
    """The trio objects a node exposes; any of them may be missing on a given node."""

    admin: Any = None
    chunks: Any = None
    control: Any = None
    volumes: Any = None


class SessionServer(pxfs_capnp.Session.Server):
    """The capabilities a peer's role allows (``pxfs.rpc.auth``); each one checks per method too."""

    def __init__(self, bridge: Bridge, services: Services, who: Identity, in_flight: InFlight) -> None:
        self._bridge, self._services, self._who = bridge, services, who
        self.in_flight = in_flight  # one budget for every capability of the connection (served)

    def _bounded(self, server: Any) -> Any:
        server.in_flight = self.in_flight
        return server

    def _need(self, name: str) -> Any:
        svc = getattr(self._services, name)
        if svc is None:
            raise Unavailable(f"{name} service", "not served by this node")
        return svc

    @served
    async def admin(self, _context: Any, **_: Any) -> None:
        from pxfs.rpc.services import AdminServer

        _context.results.admin = self._bounded(AdminServer(self._bridge, self._need("admin"), self._who))

    @served
    async def chunks(self, _context: Any, **_: Any) -> None:
        from pxfs.rpc.services import ChunkStoreServer

        _context.results.chunks = self._bounded(ChunkStoreServer(self._bridge, self._need("chunks"), self._who,
                                                                 self._services.volumes))

    @served
    async def control(self, _context: Any, **_: Any) -> None:
        from pxfs.rpc.services import ControlStoreServer

        require(self._who, "control store", "node")
        _context.results.control = self._bounded(ControlStoreServer(self._bridge, self._need("control"), self._who))

    @served
    async def volumes(self, _context: Any, **_: Any) -> None:
        from pxfs.rpc.volume_server import VolumeServiceServer

        _context.results.volumes = self._bounded(VolumeServiceServer(self._bridge, self._need("volumes"), self._who))


class GatewayServer(pxfs_capnp.Gateway.Server):
    """One per connection, for the identity the TLS handshake verified."""

    def __init__(self, bridge: Bridge, services: Services, cluster_id: str, node_id: str, who: Identity,
                 revoked: bool) -> None:
        self._bridge, self._services = bridge, services
        self.in_flight = InFlight(MAX_IN_FLIGHT * (16 if who.role == "node" else 1))  # a node ships for many volumes
        self._cluster_id, self._node_id, self._who, self._revoked = cluster_id, node_id, who, revoked
        self.logged_in = False

    @served
    async def hello(self, peer: str, _context: Any, **_: Any) -> None:
        if self._revoked:
            raise Unauthorized(f"node {self._node_id}", f"{self._who} is revoked")
        self.logged_in = True
        r = _context.results
        r.session = SessionServer(self._bridge, self._services, self._who, self.in_flight)
        r.clusterId, r.nodeId, r.version = self._cluster_id, self._node_id, 2


class RpcServer:
    """Listens on one TCP port for mutual-TLS connections; each starts at a fresh Gateway.

    ``revoked``: serial numbers of credentials refused from now on; connections open under one are
    closed by ``revoke``."""

    def __init__(self, bridge: Bridge, services: Services, credential: Credential, cluster_id: str, node_id: str):
        self._bridge, self._services, self._credential = bridge, services, credential
        self._cluster_id, self._node_id = cluster_id, node_id
        self._server: Any = None
        self._gate: tls.Gate | None = None
        self.revoked: set[int] = set()
        self._streams: dict[int, set[Any]] = {}  # serial -> its open streams (capnp thread)
        self.port = 0

    async def listen(self, host: str, port: int) -> int:
        async def on_connection(stream: Any, who: Identity, remote: str) -> None:
            if who.serial in self.revoked and self._gate is not None:
                self._gate.refused(remote, f"{who} is revoked")  # hello says so to the peer
            self._streams.setdefault(who.serial, set()).add(stream)
            try:
                gateway = GatewayServer(self._bridge, self._services, self._cluster_id, self._node_id, who,
                                        who.serial in self.revoked)
                server = capnp.TwoPartyServer(stream, bootstrap=gateway,
                                              traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS)

                async def login_deadline() -> None:
                    # A peer that never says hello (or sends half a frame) must not hold a connection.
                    await asyncio.sleep(LOGIN_DEADLINE)
                    if not gateway.logged_in:
                        log.info("connection from %s closed: no hello within %gs", remote, LOGIN_DEADLINE)
                        stream.close()

                deadline = asyncio.ensure_future(login_deadline())
                try:
                    await server.on_disconnect()
                finally:
                    deadline.cancel()
            except Exception as exc:  # noqa: BLE001 - a broken peer must never stop the node
                log.info("connection closed with error: %s", str(exc).splitlines()[0][:200] if str(exc) else exc)
            finally:
                streams = self._streams.get(who.serial)
                if streams is not None:
                    streams.discard(stream)
                    if not streams:
                        del self._streams[who.serial]

        async def start() -> int:
            self._gate = tls.Gate(self._credential.server_context(), on_connection)
            self._server = await tls.serve(self._gate, host, port)
            return self._server.sockets[0].getsockname()[1]

        self.port = await self._bridge.run(start)
        return self.port

    async def revoke(self, serials: set[int]) -> None:
        """Refuse these credentials from now on and close the connections open under them."""
        new = serials - self.revoked
        if not new:
            return
        self.revoked |= new

        async def cut() -> int:
            n = 0
            for serial in new:
                for stream in list(self._streams.pop(serial, ())):
                    stream.close()
                    n += 1
            return n

        closed = await self._bridge.run(cut)
        log.info("node=%s: %d credential(s) revoked, %d connection(s) closed", self._node_id, len(new), closed)

    async def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()

        await self._bridge.run(stop)
