"""A small HTTP/1.1 server for JSON POSTs on a unix socket (h11 on trio): what the volume plugin
protocol needs, no more. One request at a time per connection; every answer is JSON."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import trio

from pxfs.paths import claim_socket

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
CONTENT_TYPE = b"application/vnd.docker.plugins.v1+json"
Handler = Callable[[str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]


async def _send(stream: trio.SocketStream, conn: h11.Connection, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", CONTENT_TYPE), (b"content-length", str(len(data)).encode())]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=data)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


async def _serve_connection(stream: trio.SocketStream, handle: Handler) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            try:
                event = await _next_event(stream, conn)
                if not isinstance(event, h11.Request):  # closed, or a protocol state we do not serve
                    return
                body = b""
                while True:
                    part = await _next_event(stream, conn)
                    if isinstance(part, h11.Data):
                        body += part.data
                        if len(body) > MAX_BODY:
                            await _send(stream, conn, 413, {"Err": "request body too large"})
                            return
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return
                path = event.target.decode(errors="replace").split("?", 1)[0]
                try:
                    request = json.loads(body) if body.strip() else {}
                    if not isinstance(request, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    await _send(stream, conn, 400, {"Err": f"{path}: request is not a JSON object ({exc})"})
                else:
                    status, answer = await handle(path, request)
                    await _send(stream, conn, status, answer)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
                log.info("plugin connection dropped: %s", exc)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def serve_unix(path: Path, handle: Handler, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                     ) -> None:
    """Serve ``handle(path, json)`` on the unix socket ``path`` (a stale socket there is replaced;
    a live one is an error) until cancelled; the socket file goes with it."""
    claim_socket(path, f"socket {str(path)!r}", "plugin")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen()
        task_status.started()
        await trio.serve_listeners(lambda s: _serve_connection(s, handle), [trio.SocketListener(sock)])
    finally:
        sock.close()
        path.unlink(missing_ok=True)
