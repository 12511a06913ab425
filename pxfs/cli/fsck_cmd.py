"""``pxfs fsck VOLUME [--repair]``: metadata against itself and against the chunks on the replicas.

The coordinator checks the keyspace (dangling entries, orphan inodes, nlink counts, sizes, block maps
past EOF, counters) and, with ``--repair``, fixes what is safe in one replicated batch; this command
then checks that every chunk the block maps name is held by at least one replica, and names the
files of those that are not. Exit status: 0 clean (or fully repaired), 1 problems remain.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from pxfs.cli.output import emit_json, line, progress, table
from pxfs.client.connect import cluster_admin
from pxfs.client.tools import tool_session


async def cmd_fsck(args: argparse.Namespace) -> int:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
               TimeElapsedColumn())
    async with cluster_admin(args.cluster) as (admin, _conn, bridge, _cfg):
        vol = await admin.get_volume(args.volume)
        with progress(*columns, json_output=args.json) as bar:
            # Each step is one call to the coordinator or the replicas: the bar says which is running.
            task = bar.add_task(f"fsck {vol.name}: checking the metadata", total=3)
            async with tool_session(args.cluster, bridge, vol.name, not args.repair, "fsck") as session:
                assert session.meta is not None
                report: dict[str, Any] = await session.meta.fsck(args.repair)
                bar.update(task, advance=1, description=f"fsck {vol.name}: listing the chunks")
                refs = await session.meta.chunk_refs()
                bar.update(task, advance=1, description=f"fsck {vol.name}: {len(refs)} chunks on the replicas")
                present, unreachable = await session.held_by_replicas(vol.replicas, refs)
                missing = [h for h in refs if h not in present]
                places = await session.meta.locate(missing) if missing else []
                bar.advance(task)
    for h, path, offset, length in places:
        report["problems"].append({"kind": "missing-chunk", "ino": 0, "repaired": False,
                                   "detail": f"{path.decode(errors='replace')} bytes {offset}-{offset + length}: "
                                             f"chunk {h.hex()[:16]} on no replica"})
    report["unreachable_replicas"] = unreachable
    remaining = [p for p in report["problems"] if not p["repaired"]]
    report["ok"] = not remaining
    if args.json:
        emit_json(report)
    else:
        line(f'volume "{vol.name}": {report["inodes"]} inodes, {report["entries"]} entries, {report["blocks"]} '
             f'blocks, {report["chunks"]} chunks' + (f"; replicas not checked: {', '.join(unreachable)}"
                                                     if unreachable else ""))
        if report["problems"]:
            table(None, ["PROBLEM", "INODE", "DETAIL", "REPAIRED"],
                  [[p["kind"], p["ino"] or "-", p["detail"], "yes" if p["repaired"] else "no"]
                   for p in report["problems"]])
        line("clean" if not report["problems"] else
             ("all problems repaired" if not remaining else f"{len(remaining)} problem(s) remain"
              + ("" if args.repair else " (run with --repair to fix what is safe)")))
    return 0 if not remaining else 1
