"""``pxfs gc [--dry-run] [--grace S]``: collect unreferenced chunks on every node now."""

from __future__ import annotations

import argparse
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from pxfs.cli.output import emit_json, line, progress, table
from pxfs.client.connect import cluster_admin
from pxfs.cluster.config import MIN_GC_GRACE, check_gc_grace, load_config, load_credential
from pxfs.errors import PxfsError
from pxfs.rpc.client import Connection
from pxfs.sizes import format_size


async def cmd_gc(args: argparse.Namespace) -> int:
    cfg = load_config(args.cluster)
    grace = cfg.gc_grace if args.grace is None else args.grace
    # Refused here already, before any node is asked: one line, not a table of the same refusal.
    check_gc_grace(grace, "gc_grace in cluster.json" if args.grace is None else f"--grace {grace:g}",
                   cfg.commit_window)
    credential = load_credential(args.cluster)
    reports: list[dict[str, Any]] = []
    failed = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("nodes"),
               TimeElapsedColumn())
    async with cluster_admin(args.cluster) as (admin, _conn, bridge, _cfg):
        nodes = await admin.list_nodes()
        with progress(*columns, json_output=args.json) as bar:
            task = bar.add_task("gc", total=len(nodes))
            for n in nodes:
                # One call per node does its whole mark and sweep: the bar moves node by node.
                bar.update(task, description=f"gc: {'marking' if args.dry_run else 'collecting'} on {n.id}")
                if n.state != "up":
                    reports.append({"node": n.id, "error": f"node is {n.state}"})
                    failed += 1
                    bar.advance(task)
                    continue
                try:
                    conn = await Connection.open(bridge, n.address, credential, peer="gc")
                    try:
                        reports.append(await (await conn.chunks()).collect(args.dry_run, grace))
                    finally:
                        await conn.close()
                except PxfsError as err:
                    reports.append({"node": n.id, "error": str(err)})
                    failed += 1
                bar.advance(task)
    if args.json:
        emit_json({"grace": grace, "dry_run": args.dry_run, "nodes": reports})
    else:
        verb = "would delete" if args.dry_run else "deleted"
        table(None, ["NODE", "SCANNED", verb.upper(), "FREED", "CHUNKS/S", "NOTE"],
              [[r["node"], r.get("scanned", "-"), r.get("deleted", "-"), format_size(r.get("bytes_freed", 0)),
                r.get("chunks_per_second", "-"), r.get("error", "")] for r in reports])
        line(f"grace period {grace:g}s: chunks younger than that are kept" + (" (dry run)" if args.dry_run else ""))
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction, client: Any) -> None:
    p = client(sub.add_parser("gc", help="delete chunks no volume or snapshot references (all nodes)"))
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--grace", type=float, default=None,
                   help=f"seconds, at least twice the cluster's commit window and 20 s ({MIN_GC_GRACE:g} for "
                   "the default window; default: the cluster's gc_grace)")
    p.set_defaults(run=cmd_gc)
