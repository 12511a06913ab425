"""``pxfs snapshot ...``, ``pxfs volume clone`` and ``pxfs volume restore``."""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable

from pxfs.cli.output import emit_json, line, table
from pxfs.client import volumes
from pxfs.client.connect import cluster_admin, open_cluster
from pxfs.client.volumes import split_ref
from pxfs.errors import Invalid
from pxfs.sizes import format_size

_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    m = _DURATION.match(text.strip())
    if not m:
        raise Invalid(f"duration {text!r}", "expected a number with s, m, h or d (e.g. 30m, 1h)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


async def cmd_snapshot_create(args: argparse.Namespace) -> int:
    async with open_cluster(args.cluster) as c:
        start = time.monotonic()
        snap = await volumes.create_snapshot(c, args.volume, args.name)
        took = time.monotonic() - start
    if args.json:
        emit_json({"volume": args.volume, "name": snap.name, "seconds": round(took, 3)})
    else:
        line(f'snapshot "{snap.ref}" created in {took:.2f}s')
    return 0


async def cmd_snapshot_list(args: argparse.Namespace) -> int:
    async with open_cluster(args.cluster) as c:
        snaps = await volumes.list_snapshots(c, args.volume)
    if args.json:
        emit_json([{"volume": s.volume, "name": s.name, "created_ns": s.created_ns, "logical": s.logical,
                    "unique": s.unique} for s in snaps])
    else:
        table(None, ["SNAPSHOT", "CREATED", "LOGICAL", "UNIQUE"],
              [[s.ref, _when(s.created_ns), format_size(s.logical) if s.logical is not None else "-",
                format_size(s.unique) if s.unique is not None else "-"] for s in snaps])
    return 0


async def cmd_snapshot_delete(args: argparse.Namespace) -> int:
    volume, snap = split_ref(args.ref)
    async with open_cluster(args.cluster) as c:
        await volumes.delete_snapshot(c, volume, snap)
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
    async with open_cluster(args.cluster) as c:
        new = await volumes.clone_volume(c, args.ref, args.name)
    if args.json:
        emit_json(new.to_json())
    else:
        line(f'volume "{new.name}" cloned from {args.ref} (replicas {",".join(new.replicas)})')
    return 0


async def cmd_volume_restore(args: argparse.Namespace) -> int:
    volume, snap = split_ref(args.ref)
    async with open_cluster(args.cluster) as c:
        await volumes.restore_volume(c, args.ref, args.force)
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
