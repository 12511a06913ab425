"""Mutual-TLS byte streams for pycapnp, with the peer's identity, and an accept gate before TLS.

Runs on the asyncio loop of the capnp thread (``pxfs.rpc.bridge``). pycapnp's own
``AsyncIoStream.create_server/create_connection(ssl=...)`` hide the transport, so the peer's
certificate could not be read; here the capnp stream protocol is made with
``AsyncIoStream._connect`` and the TLS layer is put under it by hand, which also lets a
connection be refused (per-address and total caps) before it costs a TLS handshake.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from asyncio import sslproto
from collections.abc import Awaitable, Callable
from typing import Any

import capnp

from pxfs.errors import Unauthorized, Unavailable
from pxfs.rpc.pki import Identity, identity_of

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0
PER_ADDRESS = 64      # connections (handshaking or open) from one IP address
TOTAL = 768           # in all: below the fds a node keeps for pools and RocksDB (see node.raise_fd_limit)
LOG_EVERY = 10.0      # a refused flood costs one log line per address per this many seconds


def peer_identity(transport: Any) -> Identity:
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise Unauthorized("connection", "the peer presented no certificate")
    return identity_of(der)


OnConnection = Callable[[Any, Identity, str], Awaitable[None]]


class _Counted(sslproto.SSLProtocol):
    """TLS over one accepted socket that gives its slot back however the connection ends."""

    def __init__(self, gate: Gate, address: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate, self._address = gate, address

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._gate.release(self._address)


class _Accept(asyncio.Protocol):
    """The raw socket's first protocol: admitted sockets get TLS under a capnp stream at once,
    before any byte is read (so none is lost); refused ones are closed without a handshake."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def connection_made(self, transport: Any) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "?"
        if not self._gate.admit(address):
            transport.abort()
            return
        holder: dict[str, Any] = {}

        def connected(stream: Any) -> Any:
            app = holder["proto"].transport
            try:
                who = peer_identity(app)
            except Unauthorized as err:
                self._gate.refused(address, err.cause)
                stream.close()
                return None
            return self._gate.on_connection(stream, who, address)

        proto = capnp.AsyncIoStream._connect(connected)
        holder["proto"] = proto
        loop = asyncio.get_running_loop()
        tls = _Counted(self._gate, address, loop, proto, self._gate.context, None, server_side=True,
                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        transport.set_protocol(tls)
        tls.connection_made(transport)


class Gate:
    """Admission of connections to one listening port: caps per address and in total."""

    def __init__(self, context: ssl.SSLContext, on_connection: OnConnection, per_address: int = PER_ADDRESS,
                 total: int = TOTAL) -> None:
        self.context, self.on_connection = context, on_connection
        self.per_address, self.total = per_address, total
        self._open: dict[str, int] = {}
        self._count = 0
        self._logged: dict[str, float] = {}

    def admit(self, address: str) -> bool:
        if self._count >= self.total:
            self.refused(address, f"{self._count} connections open, the node's limit")
            return False
        if self._open.get(address, 0) >= self.per_address:
            self.refused(address, f"{self.per_address} connections open from this address, the limit")
            return False
        self._open[address] = self._open.get(address, 0) + 1
        self._count += 1
        return True

    def release(self, address: str) -> None:
        left = self._open.get(address, 0) - 1
        if left > 0:
            self._open[address] = left
        else:
            self._open.pop(address, None)
        self._count = max(0, self._count - 1)

    def refused(self, address: str, cause: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(address, -LOG_EVERY) >= LOG_EVERY:
            self._logged[address] = now
            if len(self._logged) > 4096:  # a spread-out flood must not grow this without bound
                self._logged.clear()
            log.warning("connection from %s refused: %s (logged once per %gs per address)", address, cause, LOG_EVERY)

    @property
    def connections(self) -> int:
        return self._count


async def serve(gate: Gate, host: str, port: int) -> Any:
    """Listen on ``host:port``; returns the asyncio server (capnp thread)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Accept(gate), host, port, family=socket.AF_INET, backlog=512)


async def connect(host: str, port: int, context: ssl.SSLContext) -> tuple[Any, Identity]:
    """A capnp stream over mutual TLS to ``host:port`` and the identity the server's certificate names."""
    holder: dict[str, Any] = {}
    proto = capnp.AsyncIoStream._connect(lambda stream: holder.setdefault("stream", stream))
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.create_connection(lambda: proto, host, port, ssl=context, family=socket.AF_INET,
                                                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
    except ssl.SSLError as exc:
        raise Unauthorized(f"node {host}:{port}", f"TLS handshake failed: {exc.reason or exc}") from None
    except (TimeoutError, OSError) as exc:
        raise Unavailable(f"node {host}:{port}", str(exc) or type(exc).__name__) from None
    try:
        return holder["stream"], peer_identity(transport)
    except Exception:
        transport.close()
        raise
