"""A node's HTTP port: ``/metrics`` (Prometheus), ``/api/status`` (``pxfs status --json``) and ``/``,
the live cluster page: plain server-rendered HTML that refreshes itself, nothing fetched at run time.
A mount serves the same port without the page: its /metrics and its own status document.

A deliberately small HTTP/1.1 server (h11 on trio, one request per connection, GET only, bounded
request size): the port serves three read-only pages, so a web framework would be all weight.
"""

from __future__ import annotations

import html
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
Render = Callable[[dict[str, Any]], str]


async def _respond(stream: trio.SocketStream, conn: h11.Connection, status: int, ctype: str, body: bytes) -> None:
    headers = [("content-type", ctype), ("content-length", str(len(body))), ("connection", "close"),
               ("cache-control", "no-store")]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    await stream.send_all(conn.send(h11.Data(data=body)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def _handle(stream: trio.SocketStream, status: Status, render: Render | None) -> None:
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
            elif path == "/api/status":
                await _respond(stream, conn, 200, "application/json", json.dumps(await status(), indent=2).encode())
            elif path == "/" and render is not None:
                await _respond(stream, conn, 200, "text/html; charset=utf-8", render(await status()).encode())
            else:
                pages = "/, /metrics, /api/status" if render is not None else "/metrics, /api/status"
                await _respond(stream, conn, 404, "text/plain", f"not found: {pages}\n".encode())
    except (h11.RemoteProtocolError, trio.TooSlowError, trio.BrokenResourceError, OSError):
        pass  # a broken or slow client costs only its own connection
    finally:
        await stream.aclose()


async def listen(host: str, port: int) -> tuple[list[trio.SocketListener], str]:
    """Bind the port (port 0: any free one): the listeners, and the bound ``HOST:PORT``."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    return listeners, f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"


async def serve_on(listeners: list[trio.SocketListener], status: Status, render: Render | None = None) -> None:
    """Serve bound ``listeners`` until cancelled (then they are closed). ``render`` makes ``/`` from
    the status document (a node: ``page``); without it there is no ``/``."""
    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _handle(stream, status, render)
        except Exception:  # noqa: BLE001 - a page that fails to render must not stop the port
            log.exception("http request failed")

    await trio.serve_listeners(handler, listeners)


async def serve(host: str, port: int, status: Status, *, render: Render | None = None,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; ``task_status.started`` gets the bound ``HOST:PORT``."""
    listeners, bound = await listen(host, port)
    task_status.started(bound)
    await serve_on(listeners, status, render)


# -- the page ------------------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse}td,th{padding:.2em .7em;border-bottom:1px solid #ddd;text-align:left}
.bar{background:#eee;width:12em;height:.9em;display:inline-block;vertical-align:middle}
.bar>div{background:#4a8;height:100%}.bar>div.full{background:#c44}
.healthy,.up{color:#181}.degraded,.waiting{color:#b60}.down,.unavailable,.missing{color:#c22;font-weight:bold}
.m td{text-align:center;min-width:2.5em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _size(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _bar(used: float, capacity: float) -> str:
    pct = 100.0 * used / capacity if capacity else 0.0
    cls = ' class="full"' if pct >= 90 else ""
    return f'<span class="bar"><div{cls} style="width:{min(pct, 100):.0f}%"></div></span> {pct:.0f}%'


def _mounts(mounts: list[dict[str, Any]]) -> str:
    """How many, each linked to its /metrics (a mount's port is usually loopback of its own host)."""
    links = [f'<a href="http://{_e(m["http"])}/metrics">{_e(m["id"])}</a>' if m.get("http") else ""
             for m in mounts]
    return f"{len(mounts)} " + " ".join(x for x in links if x)


def page(status: dict[str, Any]) -> str:
    """The cluster page from a ``pxfs status --json`` document."""
    cluster, nodes, vols = status.get("cluster", {}), status.get("nodes", []), status.get("volumes", [])
    out = [f"<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>"
           f"<title>pxfs {_e(cluster.get('name', ''))}</title><style>{_STYLE}</style></head><body>",
           f'<h1>pxfs cluster "{_e(cluster.get("name", ""))}": <span class="{_e(status.get("health", ""))}">'
           f'{_e(status.get("health", ""))}</span></h1>',
           f"<p>store {_e(cluster.get('store', ''))} &middot; {sum(n['state'] == 'up' for n in nodes)} of "
           f"{len(nodes)} nodes up &middot; {len(vols)} volumes</p>",
           "<h2>Nodes and pools</h2><table><tr><th>node</th><th>address</th><th>state</th><th>labels</th>"
           "<th>pool</th><th>usage</th><th>used / capacity</th><th>chunks</th></tr>"]
    for n in nodes:
        pools = n.get("pools") or [{}]
        for i, p in enumerate(pools):
            head = (f'<td>{_e(n["id"])}{" (seed)" if n.get("seed") else ""}</td><td>{_e(n["address"])}</td>'
                    f'<td class="{_e(n["state"])}">{_e(n["state"])}</td>'
                    f'<td>{_e(", ".join(f"{k}={v}" for k, v in n.get("labels", {}).items()))}</td>'
                    if i == 0 else "<td></td>" * 4)
            out.append(f"<tr>{head}<td>{_e(p.get('path', ''))}</td><td>{_bar(p.get('used', 0), p.get('capacity', 0))}"
                       f"</td><td>{_size(p.get('used', 0))} / {_size(p.get('capacity', 0))}</td>"
                       f"<td>{_e(p.get('chunks', ''))}</td></tr>")
    out.append("</table><h2>Volumes</h2><table><tr><th>volume</th><th>state</th><th>size</th><th>used</th>"
               "<th>repl</th><th>coordinator</th><th>mounts</th><th>repair</th></tr>")
    for v in vols:
        repair = v.get("repair") or {}
        done = (f"{_size(repair.get('copied_bytes', 0))} copied" if repair.get("copied_bytes") else
                _e(repair.get("state", "")) if repair else "")
        out.append(f'<tr><td>{_e(v["name"])}</td><td class="{_e(v["state"])}">{_e(v["state"])}</td>'
                   f'<td>{_size(v["size"])}</td><td>{_size(v["used"])}</td><td>{_e(v["repl"])}</td>'
                   f'<td>{_e(v["coordinator"])}</td><td>{_mounts(v["mounts"])}</td><td>{done}</td></tr>')
    out.append("</table><h2>Replicas</h2><p>C coordinator &middot; &#9679; in sync &middot; L lagging &middot; "
               "M missing</p><table class=m><tr><th>volume</th>"
               + "".join(f"<th>{_e(n['id'])}</th>" for n in nodes) + "</tr>")
    for v in vols:
        cells = []
        for n in nodes:
            nid = n["id"]
            if nid not in v["replicas"]:
                cells.append("<td></td>")
            elif nid in v.get("missing_replicas", []):
                cells.append('<td class="missing">M</td>')
            elif nid in v.get("lagging", []) or (v.get("in_sync") and nid not in v["in_sync"]):
                cells.append('<td class="degraded">L</td>')
            elif nid == v["coordinator"]:
                cells.append('<td class="healthy">C</td>')
            else:
                cells.append('<td class="healthy">&#9679;</td>')
        out.append(f"<tr><td>{_e(v['name'])}</td>{''.join(cells)}</tr>")
    out.append("</table></body></html>")
    return "\n".join(out)
