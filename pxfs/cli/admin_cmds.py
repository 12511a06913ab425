"""``pxfs status``, ``node list``, ``pool list`` and ``volume ...``: Admin RPC calls and their output."""

from __future__ import annotations

import argparse
from pathlib import Path

from pxfs.cli.connect import cluster_admin
from pxfs.cli.output import emit_json, line, table
from pxfs.cli.sizes import format_size, parse_size
from pxfs.errors import Invalid
from pxfs.model import NodeInfo, VolumeInfo


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


NODE_COLUMNS = ["NODE", "ADDRESS", "STATE", "LABELS", "POOLS", "CAPACITY", "USED"]
VOLUME_COLUMNS = ["VOLUME", "SIZE", "USED", "REPL", "STATE", "REPLICAS", "COORDINATOR"]


def _volume_rows(vols: list[VolumeInfo]) -> list[list[str]]:
    return [[v.name, format_size(v.size), format_size(v.used), str(v.repl), v.state, ",".join(v.replicas),
             v.coordinator] for v in vols]


async def cmd_status(args: argparse.Namespace) -> int:
    async with cluster_admin(args.cluster) as (admin, conn, _b, cfg):
        info = await admin.cluster_info()
        nodes = await admin.list_nodes()
        vols = await admin.list_volumes()
    up = sum(1 for n in nodes if n.state == "up")
    degraded = [v.name for v in vols if v.state != "healthy"]
    health = "healthy" if up == len(nodes) and not degraded else "degraded"
    if args.json:
        emit_json({"cluster": info, "health": health, "nodes": [n.to_json() for n in nodes],
                   "volumes": [v.to_json() for v in vols]})
        return 0
    line(f'cluster "{info["name"]}" ({info["id"]}), store {info["store"]} at {info["seed"]}: {health}')
    line(f"nodes: {up} up of {len(nodes)}; volumes: {len(vols)}" + (f", degraded: {', '.join(degraded)}"
                                                                       if degraded else ""))
    table(None, NODE_COLUMNS, _node_rows(nodes))
    if vols:
        line("")
        table(None, VOLUME_COLUMNS, _volume_rows(vols))
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
    async with cluster_admin(args.cluster) as (admin, *_):
        vol = await admin.create_volume(args.name, size, args.repl, block, _labels(args.label))
    if args.json:
        emit_json(vol.to_json())
    else:
        line(f'volume "{vol.name}" created: {format_size(vol.size)}, repl {vol.repl}, '
             f'replicas {",".join(vol.replicas)}, coordinator {vol.coordinator}')
    return 0


async def cmd_volume_list(args: argparse.Namespace) -> int:
    async with cluster_admin(args.cluster) as (admin, *_):
        vols = await admin.list_volumes()
    if args.json:
        emit_json([v.to_json() for v in vols])
    else:
        table(None, VOLUME_COLUMNS, _volume_rows(vols))
    return 0


async def cmd_volume_inspect(args: argparse.Namespace) -> int:
    async with cluster_admin(args.cluster) as (admin, *_):
        v = await admin.get_volume(args.name)
        nodes = {n.id: n for n in await admin.list_nodes()}
    if args.json:
        emit_json(v.to_json())
        return 0
    line(f'volume "{v.name}"')
    table(None, ["FIELD", "VALUE"], [
        ["size", f"{format_size(v.size)} ({v.size} bytes)"], ["used", f"{format_size(v.used)} ({v.used} bytes)"],
        ["repl", str(v.repl)], ["block size", format_size(v.block_size)], ["labels", _fmt_labels(v.labels)],
        ["state", v.state], ["epoch", str(v.epoch)], ["mounts", str(v.mounts)],
    ])
    line("")
    table(None, ["REPLICA", "ADDRESS", "STATE", "ROLE"], [
        [r, nodes[r].address if r in nodes else "?", nodes[r].state if r in nodes else "unknown",
         "coordinator" if r == v.coordinator else "follower"] for r in v.replicas])
    return 0


async def cmd_volume_resize(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "size")
    async with cluster_admin(args.cluster) as (admin, *_):
        vol = await admin.resize_volume(args.name, size)
    if args.json:
        emit_json(vol.to_json())
    else:
        line(f'volume "{vol.name}" resized to {format_size(vol.size)}')
    return 0


async def cmd_volume_delete(args: argparse.Namespace) -> int:
    async with cluster_admin(args.cluster) as (admin, *_):
        await admin.delete_volume(args.name, args.force)
    if args.json:
        emit_json({"name": args.name, "deleted": True})
    else:
        line(f'volume "{args.name}" deleted')
    return 0


def cluster_dir(value: str | None) -> Path:
    return Path(value).resolve() if value else Path()
