"""A node's HTTP port: ``/metrics`` (Prometheus), ``/api/status`` (``pxfs status --json``),
``/api/activity`` (its events and rates, pxfs.observe.activity) and ``/``, the live cluster page:
plain server-rendered HTML that refreshes itself, nothing fetched by the browser at run time. A
mount serves the same port with its own pages: its /metrics and its status document.

A deliberately small HTTP/1.1 server (h11 on trio, one request per connection, GET only, bounded
request size): the port serves a few read-only pages, so a web framework would be all weight.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio

from pxfs.observe.metrics import exposition

log = logging.getLogger(__name__)

MAX_REQUEST = 16 << 10
REQUEST_TIMEOUT = 10.0
Status = Callable[[], Awaitable[dict[str, Any]]]
Page = Callable[[], Awaitable[tuple[str, bytes]]]  # -> (content type, body)
Pages = dict[str, Page]  # path -> page, beside /metrics which every port serves


def json_page(doc: Status) -> Page:
    async def page() -> tuple[str, bytes]:
        return "application/json", json.dumps(await doc(), indent=2).encode()
    return page


def html_page(render: Callable[[], Awaitable[str]]) -> Page:
    async def page() -> tuple[str, bytes]:
        return "text/html; charset=utf-8", (await render()).encode()
    return page


async def _respond(stream: trio.SocketStream, conn: h11.Connection, status: int, ctype: str, body: bytes) -> None:
    headers = [("content-type", ctype), ("content-length", str(len(body))), ("connection", "close"),
               ("cache-control", "no-store")]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    await stream.send_all(conn.send(h11.Data(data=body)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def _handle(stream: trio.SocketStream, pages: Pages) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    try:
        with trio.fail_after(REQUEST_TIMEOUT):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(MAX_REQUEST)
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                break
            if not isinstance(event, h11.Request):
                return
            path = event.target.decode(errors="replace").split("?", 1)[0]
            if event.method != b"GET":
                await _respond(stream, conn, 405, "text/plain", b"GET only\n")
            elif path == "/metrics":
                await _respond(stream, conn, 200, "text/plain; version=0.0.4; charset=utf-8",
                               await trio.to_thread.run_sync(exposition))
            elif path in pages:
                await _respond(stream, conn, 200, *await pages[path]())
            else:
                known = ", ".join(sorted({"/metrics", *pages}))
                await _respond(stream, conn, 404, "text/plain", f"not found: {known}\n".encode())
    except (h11.RemoteProtocolError, trio.TooSlowError, trio.BrokenResourceError, OSError):
        pass  # a broken or slow client costs only its own connection
    finally:
        await stream.aclose()


async def listen(host: str, port: int) -> tuple[list[trio.SocketListener], str]:
    """Bind the port (port 0: any free one): the listeners, and the bound ``HOST:PORT``."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    return listeners, f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"


async def serve_on(listeners: list[trio.SocketListener], pages: Pages) -> None:
    """Serve bound ``listeners`` until cancelled (then they are closed)."""
    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _handle(stream, pages)
        except Exception:  # noqa: BLE001 - a page that fails to render must not stop the port
            log.exception("http request failed")

    await trio.serve_listeners(handler, listeners)


async def serve(host: str, port: int, pages: Pages, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; ``task_status.started`` gets the bound ``HOST:PORT``."""
    listeners, bound = await listen(host, port)
    task_status.started(bound)
    await serve_on(listeners, pages)
