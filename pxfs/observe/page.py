"""The cluster page (``/`` of every node) from the status document and every node's activity:
nodes and pools, volumes with their repair progress, the replica matrix, I/O and scrub rates per
node, and the cluster's recent events. Server-rendered HTML that reloads itself every 5 s.
"""

from __future__ import annotations

import html
import time
from typing import Any

EVENTS_SHOWN = 30

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse}td,th{padding:.2em .7em;border-bottom:1px solid #ddd;text-align:left}
.bar{background:#eee;width:12em;height:.9em;display:inline-block;vertical-align:middle}
.bar>div{background:#4a8;height:100%}.bar>div.full{background:#c44}
.healthy,.up{color:#181}.degraded,.waiting,.warning{color:#b60}
.down,.unavailable,.missing,.error,.critical{color:#c22;font-weight:bold}
.m td{text-align:center;min-width:2.5em}td.num{text-align:right}.events td:first-child{white-space:nowrap}
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


def _repair(r: dict[str, Any]) -> str:
    """A volume's repair (the coordinator's report, ``pxfs.cluster.repair``): progress while it copies."""
    if not r:
        return ""
    lost = f' <span class="error">LOST {_e(r["lost"])} chunk(s)</span>' if r.get("lost") else ""
    if r.get("state") == "copying":
        return (f'copying {_bar(r.get("done", 0), r.get("total", 0))} {_e(r.get("done", 0))}/{_e(r.get("total", 0))}'
                f' chunks, {_size(r.get("bytes", 0))} at {_size(r.get("rate", 0))}/s{lost}')
    if r.get("state") == "checking":
        return f"checking the replicas{lost}"
    missing = sum(r.get("missing", {}).values())
    if r.get("converged"):
        what = "complete"
    elif not r.get("rounds"):
        what = "not checked yet"
    else:
        what = f"{missing} chunk copies missing" if missing else "incomplete"
    copied = f", last round copied {r.get('done', 0)} ({_size(r.get('bytes', 0))})" if r.get("done") else ""
    return f"{what} (round {_e(r.get('rounds', 0))}{copied}){lost}"


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _activity(acts: list[dict[str, Any]]) -> list[str]:
    out = ["<h2>I/O and scrub</h2><p>rates over the last 10 s; totals since the node started</p>"
           "<table class=io><tr><th>node</th><th>write</th><th>read</th><th>written</th><th>read total</th>"
           "<th>scrub</th><th>verified</th><th>bad found</th></tr>"]
    for a in acts:
        node = _e(a.get("node", "?"))
        if "error" in a:
            out.append(f'<tr><td>{node}</td><td colspan=7 class="down">{_e(a["error"])}</td></tr>')
            continue
        rates, totals = a.get("rates", {}), a.get("totals", {})
        ago = a.get("last_verify_ago")
        scrub = (f'scrubbing {rates["verified"]:.0f} chunks/s' if rates.get("verified") else
                 f"last verified {_ago(ago)} ago" if ago is not None else "none since start")
        bad = totals.get("bad", 0)
        out.append(f'<tr><td>{node}</td><td class=num>{_size(rates.get("put_bytes", 0))}/s</td>'
                   f'<td class=num>{_size(rates.get("get_bytes", 0))}/s</td>'
                   f'<td class=num>{_size(totals.get("put_bytes", 0))}</td>'
                   f'<td class=num>{_size(totals.get("get_bytes", 0))}</td><td>{scrub}</td>'
                   f'<td class=num>{_e(totals.get("verified", 0))}</td>'
                   f'<td class="num{" error" if bad else ""}">{_e(bad)}</td></tr>')
    out.append("</table>")
    return out


def _events(acts: list[dict[str, Any]]) -> list[str]:
    events = sorted(((e, a.get("node", "?")) for a in acts for e in a.get("events", [])),
                    key=lambda x: -float(x[0].get("ts", 0)))[:EVENTS_SHOWN]
    out = ["<h2>Recent events</h2>"]
    if not events:
        return [*out, "<p>none since the nodes started</p>"]
    out.append("<table class=events><tr><th>time</th><th>node</th><th>level</th><th>from</th><th>event</th></tr>")
    for e, node in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(e.get("ts", 0))))
        level = str(e.get("level", ""))
        out.append(f'<tr><td>{when}</td><td>{_e(node)}</td><td class="{_e(level)}">{_e(level)}</td>'
                   f'<td>{_e(e.get("source", ""))}</td><td>{_e(e.get("message", ""))}</td></tr>')
    out.append("</table>")
    return out


def page(status: dict[str, Any], activity: list[dict[str, Any]] | None = None) -> str:
    """The cluster page from a ``pxfs status --json`` document and the nodes' ``/api/activity``."""
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
        out.append(f'<tr><td>{_e(v["name"])}</td><td class="{_e(v["state"])}">{_e(v["state"])}</td>'
                   f'<td>{_size(v["size"])}</td><td>{_size(v["used"])}</td><td>{_e(v["repl"])}</td>'
                   f'<td>{_e(v["coordinator"])}</td><td>{_mounts(v["mounts"])}</td>'
                   f'<td>{_repair(v.get("repair") or {})}</td></tr>')
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
    out.append("</table>")
    if activity is not None:
        out += _activity(activity) + _events(activity)
    out.append("</body></html>")
    return "\n".join(out)
