"""``pxfs snapshot ...``, ``pxfs volume clone`` and ``pxfs volume restore``."""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from typing import Any

from pxfs.cli.output import emit_json, line, table
from pxfs.cli.sizes import format_size
from pxfs.client.connect import cluster_admin
from pxfs.client.tools import volume_tool
from pxfs.errors import Invalid

_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    m = _DURATION.match(text.strip())
    if not m:
        raise Invalid(f"duration {text!r}", "expected a number with s, m, h or d (e.g. 30m, 1h)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def split_ref(ref: str) -> tuple[str, str]:
    volume, sep, snap = ref.partition("@")
    if not sep or not volume or not snap:
        raise Invalid(f"snapshot {ref!r}", "expected VOLUME@SNAPSHOT")
    return volume, snap


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


async def cmd_snapshot_create(args: argparse.Namespace) -> int:
    name = args.name or "snap-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    async with cluster_admin(args.cluster) as (_admin, _conn, bridge, _cfg):
        async with volume_tool(args.cluster, bridge, args.volume) as vol:
            start = time.monotonic()
            await vol.snapshot_create(name)
            took = time.monotonic() - start
    if args.json:
        emit_json({"volume": args.volume, "name": name, "seconds": round(took, 3)})
    else:
        line(f'snapshot "{args.volume}@{name}" created in {took:.2f}s')
    return 0


async def cmd_snapshot_list(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    async with cluster_admin(args.cluster) as (admin, _conn, bridge, _cfg):
        vols = [await admin.get_volume(args.volume)] if args.volume else await admin.list_volumes()
        for v in vols:
            sizes = {s["name"]: s for s in v.detail.get("snapshots", [])} if v.detail else {}
            async with volume_tool(args.cluster, bridge, v.name, read_only=True) as vol:
                for name, created in await vol.snapshot_list():
                    s = sizes.get(name, {})
                    rows.append({"volume": v.name, "name": name, "created_ns": created,
                                 "logical": s.get("logical"), "unique": s.get("unique")})
    if args.json:
        emit_json(rows)
    else:
        table(None, ["SNAPSHOT", "CREATED", "LOGICAL", "UNIQUE"],
              [[f'{r["volume"]}@{r["name"]}', _when(r["created_ns"]),
                format_size(r["logical"]) if r["logical"] is not None else "-",
                format_size(r["unique"]) if r["unique"] is not None else "-"] for r in rows])
    return 0


async def cmd_snapshot_delete(args: argparse.Namespace) -> int:
    volume, snap = split_ref(args.ref)
    async with cluster_admin(args.cluster) as (_admin, _conn, bridge, _cfg):
        async with volume_tool(args.cluster, bridge, volume) as vol:
            await vol.snapshot_delete(snap)
    if args.json:
        emit_json({"volume": volume, "name": snap, "deleted": True})
    else:
        line(f'snapshot "{volume}@{snap}" deleted (its unique chunks go at the next gc)')
    return 0


async def cmd_snapshot_schedule(args: argparse.Namespace) -> int:
    every = 0 if args.every in ("0", "off", "none") else parse_duration(args.every)
    async with cluster_admin(args.cluster) as (admin, *_):
        await admin.schedule_snapshots(args.volume, every, args.keep)
    if args.json:
        emit_json({"volume": args.volume, "every": every, "keep": args.keep})
    else:
        line(f'volume "{args.volume}": ' + (f"a snapshot every {args.every}, keeping {args.keep}" if every
                                           else "snapshot schedule removed"))
    return 0


async def cmd_volume_clone(args: argparse.Namespace) -> int:
    volume, snap = split_ref(args.ref)
    async with cluster_admin(args.cluster) as (admin, _conn, bridge, _cfg):
        async with volume_tool(args.cluster, bridge, volume, read_only=True) as vol:
            if snap not in {n for n, _c in await vol.snapshot_list()}:
                raise Invalid(f'snapshot "{args.ref}"', "no such snapshot")
        new = await admin.clone_volume(args.ref, args.name)
    if args.json:
        emit_json(new.to_json())
    else:
        line(f'volume "{new.name}" cloned from {args.ref} (replicas {",".join(new.replicas)})')
    return 0


async def cmd_volume_restore(args: argparse.Namespace) -> int:
    volume, snap = split_ref(args.ref)
    async with cluster_admin(args.cluster) as (admin, _conn, bridge, _cfg):
        v = await admin.get_volume(volume)
        if v.mounts and not args.force:
            raise Invalid(f'volume "{volume}"', f"mounted {v.mounts} time(s): unmount it first or use --force "
                          "(open files would see their data change under them)")
        async with volume_tool(args.cluster, bridge, volume) as vol:
            await vol.restore(snap)
    if args.json:
        emit_json({"volume": volume, "restored_to": snap})
    else:
        line(f'volume "{volume}" restored to snapshot {snap}')
    return 0


def register(sub: argparse._SubParsersAction, vol: argparse._SubParsersAction,
             client: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    sn = sub.add_parser("snapshot", help="snapshots").add_subparsers(dest="sub", required=True, metavar="SUB")
    p = client(sn.add_parser("create", help="read-only point-in-time copy of a volume (chunks shared)"))
    p.add_argument("volume")
    p.add_argument("--name", default="")
    p.set_defaults(run=cmd_snapshot_create)
    p = client(sn.add_parser("list", help="snapshots of one or all volumes"))
    p.add_argument("volume", nargs="?", default="")
    p.set_defaults(run=cmd_snapshot_list)
    p = client(sn.add_parser("delete", help="delete VOLUME@NAME"))
    p.add_argument("ref", metavar="VOLUME@NAME")
    p.set_defaults(run=cmd_snapshot_delete)
    p = client(sn.add_parser("schedule", help="periodic snapshots with retention (--every 0 to stop)"))
    p.add_argument("volume")
    p.add_argument("--every", required=True, help="e.g. 30m, 1h, 1d")
    p.add_argument("--keep", type=int, default=24)
    p.set_defaults(run=cmd_snapshot_schedule)
    p = client(vol.add_parser("clone", help="writable volume from a snapshot"))
    p.add_argument("ref", metavar="VOLUME@NAME")
    p.add_argument("name", metavar="NEWVOLUME")
    p.set_defaults(run=cmd_volume_clone)
    p = client(vol.add_parser("restore", help="roll a volume back to a snapshot"))
    p.add_argument("ref", metavar="VOLUME@NAME")
    p.add_argument("--force", action="store_true", help="even while mounted")
    p.set_defaults(run=cmd_volume_restore)
