"""``pxfs top``: the cluster page in the terminal (rich Live), refreshed every --every seconds."""

from __future__ import annotations

import argparse
import time
from typing import Any

import trio
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pxfs.cli.admin_cmds import NODE_COLUMNS, VOLUME_COLUMNS, _node_rows, _volume_rows
from pxfs.client.connect import cluster_admin
from pxfs.cluster import status
from pxfs.errors import PxfsError

STYLE = {"healthy": "green", "up": "green", "degraded": "yellow", "waiting": "yellow", "down": "bold red",
         "unavailable": "bold red", "needs recovery": "bold red"}


def _table(columns: list[str], rows: list[list[str]]) -> Table:
    t = Table(box=None, header_style="bold", pad_edge=False)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[Text(x, style=STYLE.get(x, "")) for x in r])
    return t


def _matrix(doc: dict[str, Any]) -> Table:
    nodes = [n["id"] for n in doc["nodes"]]
    t = Table(box=None, header_style="bold", pad_edge=False, title="replicas: C coordinator, * in sync, "
              "L lagging, M missing", title_justify="left")
    t.add_column("VOLUME")
    for n in nodes:
        t.add_column(n, justify="center")
    for v in doc["volumes"]:
        cells = []
        for n in nodes:
            if n not in v["replicas"]:
                cells.append(Text(""))
            elif n in v["missing_replicas"]:
                cells.append(Text("M", style="bold red"))
            elif n in v["lagging"] or (v["in_sync"] and n not in v["in_sync"]):
                cells.append(Text("L", style="yellow"))
            else:
                cells.append(Text("C" if n == v["coordinator"] else "*", style="green"))
        t.add_row(v["name"], *cells)
    return t


def render(doc: dict[str, Any], nodes: list[Any], vols: list[Any], note: str = "") -> Group:
    head = Text.assemble((f'pxfs cluster "{doc["cluster"]["name"]}": ', "bold"),
                         (doc["health"], STYLE.get(doc["health"], "bold")),
                         f"  {time.strftime('%H:%M:%S')}  {note}")
    return Group(head, Text(""), _table(NODE_COLUMNS, _node_rows(nodes)), Text(""),
                 _table(VOLUME_COLUMNS, _volume_rows(vols)), Text(""), _matrix(doc))


async def cmd_top(args: argparse.Namespace) -> int:
    with Live(Text("connecting..."), auto_refresh=False, screen=not args.once) as live:
        while True:
            try:
                async with cluster_admin(args.cluster) as (admin, *_):
                    while True:
                        info, nodes, vols = await admin.cluster_info(), await admin.list_nodes(), \
                            await admin.list_volumes()
                        doc = status.report(info, nodes, vols, await admin.store_check())
                        live.update(render(doc, nodes, vols), refresh=True)
                        if args.once:
                            return 0
                        await trio.sleep(args.every)
            except PxfsError as err:
                if args.once:
                    raise
                live.update(Text(f"{time.strftime('%H:%M:%S')} no answer: {err}; retrying", style="red"),
                            refresh=True)
                await trio.sleep(args.every)


def register(sub: argparse._SubParsersAction, client: Any) -> None:
    p = client(sub.add_parser("top", help="nodes, volumes and replicas, refreshing in the terminal"))
    p.add_argument("--every", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--once", action="store_true", help="draw once and exit (no full-screen mode)")
    p.set_defaults(run=cmd_top)
