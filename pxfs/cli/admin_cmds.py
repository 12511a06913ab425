"""``pxfs status``, ``node list``, ``pool list`` and ``volume ...``: Admin RPC calls and their output."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pxfs.cli.output import emit_json, line, progress, table
from pxfs.client import volumes
from pxfs.client.connect import cluster_admin, open_cluster
from pxfs.cluster import status
from pxfs.cluster.backends import direct_store
from pxfs.cluster.config import load_config
from pxfs.errors import Invalid, PxfsError, Unavailable
from pxfs.model import NodeInfo, VolumeInfo
from pxfs.sizes import format_size, parse_size


def _labels(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise Invalid(f"label {item!r}", "expected KEY=VALUE")
        out[k] = v
    return out


def _fmt_labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _node_rows(nodes: list[NodeInfo]) -> list[list[str]]:
    rows = []
    for n in nodes:
        cap = sum(p.capacity for p in n.pools)
        used = sum(p.used for p in n.pools)
        rows.append([n.id + (" (seed)" if n.seed else ""), n.address, n.state, _fmt_labels(n.labels),
                     str(len(n.pools)), format_size(cap), format_size(used)])
    return rows


MEMBER_COLUMNS = ["MEMBER", "HEALTH", "ROLE", "VERSION", "ERROR"]
NODE_COLUMNS = ["NODE", "ADDRESS", "STATE", "LABELS", "POOLS", "CAPACITY", "USED"]
VOLUME_COLUMNS = ["VOLUME", "SIZE", "USED", "REPL", "STATE", "REPLICAS", "COORDINATOR"]


def _volume_rows(vols: list[VolumeInfo]) -> list[list[str]]:
    return [[v.name, format_size(v.size), format_size(v.used), str(v.repl), v.state, ",".join(v.replicas),
             v.coordinator] for v in vols]


async def _store_members(cluster_dir: Path) -> list[dict[str, Any]] | None:
    """The health of each member of a store the CLI reaches itself (etcd), None for embedded."""
    store = direct_store(load_config(cluster_dir), cluster_dir)
    if store is None:
        return None
    try:
        return await store.members()
    finally:
        await store.aclose()


def _member_rows(members: list[dict[str, Any]]) -> list[list[str]]:
    return [[m["endpoint"], "healthy" if m["healthy"] else "unhealthy", "leader" if m.get("leader") else "-",
             m.get("version", "") or "-", m.get("error", "") or "-"] for m in members]


async def cmd_status(args: argparse.Namespace) -> int:
    # Asked first and by the CLI itself: when the store is what is broken, its members' health is
    # what the operator needs, and no node could report it then.
    members = await _store_members(args.cluster)
    try:
        async with cluster_admin(args.cluster) as (admin, conn, _b, cfg):
            info = await admin.cluster_info()
            nodes = await admin.list_nodes()
            vols = await admin.list_volumes()
            store = await admin.store_check()
    except PxfsError:
        if members is not None and not args.json:
            line(f"control store {load_config(args.cluster).store}: "
                 f"{sum(m['healthy'] for m in members)} of {len(members)} member(s) healthy")
            table(None, MEMBER_COLUMNS, _member_rows(members))
        raise
    doc = status.report(info, nodes, vols, store, members)
    health, problem = doc["health"], store.get("problem", "")
    up = sum(1 for n in nodes if n.state == "up")
    degraded = [v.name for v in vols if v.state != "healthy"]
    sick = [m["endpoint"] for m in members or [] if not m["healthy"]]
    if args.json:
        emit_json(doc)
        return 1 if problem else 0
    where = f" at {info['seed']}" if members is None else ""
    line(f'cluster "{info["name"]}" ({info["id"]}), store {info["store"]}{where}: {health}')
    if problem:
        line(problem)
    if members is not None:
        line(f"store members: {len(members) - len(sick)} of {len(members)} healthy")
        table(None, MEMBER_COLUMNS, _member_rows(members))
        line("")
    line(f"nodes: {up} up of {len(nodes)}; volumes: {len(vols)}" + (f", degraded: {', '.join(degraded)}"
                                                                       if degraded else ""))
    table(None, NODE_COLUMNS, _node_rows(nodes))
    if vols:
        line("")
        table(None, VOLUME_COLUMNS, _volume_rows(vols))
    return 1 if problem else 0


async def cmd_cluster_recover(args: argparse.Namespace) -> int:
    async with cluster_admin(args.cluster) as (admin, *_):
        report = await admin.recover()
    if args.json:
        emit_json(report)
        return 0
    rebuilt = report["rebuilt"]
    line(f"asked nodes {','.join(report['nodes'])}; rebuilt {len(rebuilt)} volume record(s); "
         f"control store generation {report['generation']}")
    if rebuilt:
        table(None, ["VOLUME", "UID", "COORDINATOR", "EPOCH", "SEQ", "REPLICAS", "IN SYNC"],
              [[v["name"], v["uid"], v["coordinator"], str(v["epoch"]), str(v["seq"]), ",".join(v["replicas"]),
                ",".join(v["in_sync"])] for v in rebuilt])
    return 0


async def cmd_node_list(args: argparse.Namespace) -> int:
    async with cluster_admin(args.cluster) as (admin, *_):
        nodes = await admin.list_nodes()
    if args.json:
        emit_json([n.to_json() for n in nodes])
    else:
        table(None, NODE_COLUMNS, _node_rows(nodes))
    return 0


async def cmd_pool_list(args: argparse.Namespace) -> int:
    async with cluster_admin(args.cluster) as (admin, *_):
        nodes = await admin.list_nodes()
    pools = [(n, p) for n in nodes for p in n.pools]
    if args.json:
        emit_json([dict(p.to_json(), state=n.state) for n, p in pools])
    else:
        table(None, ["NODE", "PATH", "CLASS", "CAPACITY", "USED", "FREE", "CHUNKS", "STATE"],
              [[n.id, p.path, p.klass, format_size(p.capacity), format_size(p.used), format_size(p.free),
                str(p.chunks), n.state] for n, p in pools])
    return 0


async def cmd_volume_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "size")
    block = parse_size(args.block_size, "block size") if args.block_size else 0
    spec = volumes.VolumeSpec(args.name, size, args.repl, block, _labels(args.label), args.min_replicas,
                              args.max_inodes)
    async with open_cluster(args.cluster) as c:
        vol = await volumes.create_volume(c, spec)
    if args.json:
        emit_json(vol.to_json())
    else:
        line(f'volume "{vol.name}" created: {format_size(vol.size)}, repl {vol.repl}, '
             f'replicas {",".join(vol.replicas)}, coordinator {vol.coordinator}')
    return 0


async def cmd_volume_promote(args: argparse.Namespace) -> int:
    if not args.accept_data_loss:
        raise Invalid(f'volume "{args.name}"', f"promoting {args.node} gives up every acknowledged write it may "
                      "lack; pass --accept-data-loss to do it")
    async with cluster_admin(args.cluster) as (admin, *_):
        vol = await admin.promote_volume(args.name, args.node)
    if args.json:
        emit_json(vol.to_json())
    else:
        line(f'volume "{vol.name}": {vol.coordinator} is coordinator at epoch {vol.epoch}, the only in-sync replica')
    return 0


async def cmd_volume_list(args: argparse.Namespace) -> int:
    async with cluster_admin(args.cluster) as (admin, *_):
        vols = await admin.list_volumes()
    if args.json:
        emit_json([v.to_json() for v in vols])
    else:
        table(None, VOLUME_COLUMNS, _volume_rows(vols))
    return 0


def _fmt_mounts(v: VolumeInfo) -> str:
    shown = [f"{m['id']} at {m['http'] or 'no http'}" for m in v.detail.get("mounts", [])]
    return f"{v.mounts}" + (f" ({'; '.join(shown)})" if shown else "")


async def cmd_volume_inspect(args: argparse.Namespace) -> int:
    async with cluster_admin(args.cluster) as (admin, *_):
        v = await admin.get_volume(args.name, replicas=True)
        nodes = {n.id: n for n in await admin.list_nodes()}
    if args.json:
        emit_json(v.to_json())
        return 0
    line(f'volume "{v.name}"')
    meta = v.detail.get("meta_bytes", 0)
    table(None, ["FIELD", "VALUE"], [
        ["size", f"{format_size(v.size)} ({v.size} bytes)"], ["used", f"{format_size(v.used)} ({v.used} bytes)"],
        ["metadata", f"{format_size(meta)} ({meta} bytes of names, xattrs, symlinks; counted in the size)"],
        ["inodes", f"{v.detail.get('inodes', 0)} of {v.inode_limit}"],
        ["repl", str(v.repl)], ["block size", format_size(v.block_size)], ["labels", _fmt_labels(v.labels)],
        ["state", v.state], ["epoch", str(v.epoch)], ["mounts", _fmt_mounts(v)],
        ["in sync", ", ".join(v.in_sync) or "none"], ["min replicas", str(v.min_replicas)],
    ] + ([["waiting", v.waiting]] if v.waiting else []))
    lagging = set(v.detail.get("lagging", []))
    repair = v.detail.get("repair", {})
    missing = repair.get("missing", {})
    line("")
    on_disk = v.detail.get("replica_meta") or {}
    table(None, ["REPLICA", "ADDRESS", "STATE", "ROLE", "METADATA", "ON DISK", "LOG", "CHUNKS MISSING"], [
        [r, nodes[r].address if r in nodes else "?", nodes[r].state if r in nodes else "unknown",
         "coordinator" if r == v.coordinator else "follower",
         "lagging" if r in lagging else ("-" if r not in nodes or nodes[r].state != "up" else
                                         "in sync" if r in v.in_sync else "catching up"),
         format_size(on_disk[r]["disk_bytes"]) if r in on_disk else "?",
         str(on_disk[r]['log_entries']) if r in on_disk else "?",
         str(missing.get(r, 0))] for r in v.replicas])
    space = v.detail.get("space") or {}
    if space:
        line("")
        line(f"space: logical {format_size(space.get('logical', 0))}, unique {format_size(space.get('unique', 0))} "
             f"(dedup ratio {space.get('dedup_ratio', 1.0):.2f}), shared with snapshots "
             f"{format_size(space.get('shared_with_snapshots', 0))}, in snapshots only "
             f"{format_size(space.get('snapshot_only', 0))}")
    snaps = v.detail.get("snapshots") or []
    if snaps:
        line("snapshots: " + ", ".join(f"{s['name']} ({format_size(s.get('unique', 0))} unique)" for s in snaps))
    if v.source:
        line(f"cloned from {v.source}")
    if repair:
        line("")
        rate = repair.get("rate", 0) / 1e6
        line(f"repair: {repair.get('state', 'idle')}, {repair.get('done', 0)}/{repair.get('total', 0)} chunks copied "
             f"({format_size(repair.get('bytes', 0))} at {rate:.1f} MB/s), rounds {repair.get('rounds', 0)}"
             + (f", LOST {repair['lost']} chunk(s) with no good copy" if repair.get("lost") else ""))
    return 0


async def cmd_volume_resize(args: argparse.Namespace) -> int:
    if not args.size and not args.max_inodes:
        raise Invalid(f'volume "{args.name}"', "nothing to change: give --size, --max-inodes or both")
    size = parse_size(args.size, "size") if args.size else 0
    async with open_cluster(args.cluster) as c:
        vol = await volumes.resize_volume(c, args.name, size, args.max_inodes)
    if args.json:
        emit_json(vol.to_json())
    else:
        line(f'volume "{vol.name}" resized to {format_size(vol.size)}, {vol.inode_limit} inodes')
    return 0


async def cmd_volume_delete(args: argparse.Namespace) -> int:
    async with open_cluster(args.cluster) as c:
        await volumes.delete_volume(c, args.name, args.force)
    if args.json:
        emit_json({"name": args.name, "deleted": True})
    else:
        line(f'volume "{args.name}" deleted')
    return 0


def cluster_dir(value: str | None) -> Path:
    return Path(value).resolve() if value else Path()


async def cmd_volume_ha_update(args: argparse.Namespace) -> int:
    async with cluster_admin(args.cluster) as (admin, *_):
        vol = await admin.ha_update(args.name, args.repl)
        if args.wait:
            vol = await _wait_healthy(admin, args.name, args.json, lambda v: len(v.replicas) == args.repl)
    if args.json:
        emit_json(vol.to_json())
    else:
        line(f'volume "{vol.name}": repl {vol.repl}, replicas {",".join(vol.replicas)} ({vol.state})')
    return 0


async def cmd_volume_repair(args: argparse.Namespace) -> int:
    async with cluster_admin(args.cluster) as (admin, *_):
        asked = await admin.repair_volume(args.name)
        vol = await admin.get_volume(args.name)
        if args.wait:
            vol = await _wait_healthy(admin, args.name, args.json, lambda v: True, after=asked)
    if args.json:
        emit_json(vol.to_json())
    else:
        line(f'volume "{vol.name}": {vol.state}')
    return 0 if vol.state == "healthy" or not args.wait else 1


def _repair_detail(v: VolumeInfo) -> str:
    """What a repair is doing, for its progress line."""
    rep = v.detail.get("repair", {})
    if rep.get("state") == "copying":
        return f"{rep.get('done', 0)}/{rep.get('total', 0)} chunks at {rep.get('rate', 0) / 1e6:.1f} MB/s"
    waits = v.detail.get("missing_replicas", [])
    why = f", waiting for {', '.join(waits)} (down)" if waits else ""
    return f"{rep.get('state', 'not started')}, round {rep.get('rounds', 0)}{why}"


async def _wait_healthy(admin: object, name: str, quiet: bool, done: object, after: float | None = None,
                        timeout: float = 3600, fail: bool = True) -> VolumeInfo:
    """Poll the volume until it is healthy (and ``done(v)``), showing repair progress; with ``after``
    (a repair request's stamp), only once a round that began after that request has finished."""
    import trio
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    start_rounds = None
    with progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                  TimeElapsedColumn(), json_output=quiet) as bar:
        task = bar.add_task(f"repair {name}", total=None, detail="")
        with trio.move_on_after(timeout):
            while True:
                v: VolumeInfo = await admin.get_volume(name)  # type: ignore[attr-defined]
                rep = v.detail.get("repair", {})
                rounds = rep.get("rounds", 0)
                if start_rounds is None:
                    start_rounds = rounds
                bar.update(task, total=rep.get("total") or None, completed=rep.get("done", 0),
                           detail=_repair_detail(v), description=f"repair {name}: {v.state}")
                fresh = after is None or rep.get("asked", 0) >= after
                settled = v.state == "healthy" or (not fail and (rep.get("converged") or rep.get("lost")
                                                                  or rounds > (start_rounds or 0) + 5))
                if fresh and rep.get("state") == "idle" and settled and done(v):  # type: ignore[operator]
                    return v
                await trio.sleep(0.5)
    if not fail:
        return v
    raise Unavailable(f'volume "{name}"', f"not healthy after {timeout:g}s")


async def cmd_node_remove(args: argparse.Namespace) -> int:
    async with cluster_admin(args.cluster) as (admin, *_):
        await admin.remove_node(args.id, args.force)
    if args.json:
        emit_json({"id": args.id, "removed": True})
    else:
        line(f"node {args.id} removed: its replicas are being re-created on other nodes "
             "(watch with `pxfs volume list`)")
    return 0
