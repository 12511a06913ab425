"""``pxfs scrub [VOLUME | --node ID]``: verify every chunk, heal what can be healed, report the rest.

Each replica re-reads and re-hashes its copies (a bad copy is quarantined on the spot), the volume's
coordinator then copies good copies back (repair), and chunks left with no good copy anywhere are
reported as the files and byte ranges that use them: content addressing makes that report cheap.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pxfs.cli.admin_cmds import _wait_healthy
from pxfs.cli.output import emit_json, line, progress, table
from pxfs.client.connect import cluster_admin
from pxfs.client.tools import tool_session
from pxfs.cluster.config import load_credential
from pxfs.errors import Invalid, PxfsError
from pxfs.rpc.client import Connection
from pxfs.rpc.pki import Credential

BATCH = 256


async def _verify(bridge: Any, credential: Credential, address: str, hashes: list[bytes], bar: Progress, task: Any
                  ) -> dict[str, int]:
    counts = {"good": 0, "missing": 0, "corrupt": 0, "unreachable": 0}
    try:
        conn = await Connection.open(bridge, address, credential, peer="scrub")
    except PxfsError:
        counts["unreachable"] = len(hashes)
        bar.advance(task, len(hashes))
        return counts
    try:
        chunks = await conn.chunks()
        for i in range(0, len(hashes), BATCH):
            part = hashes[i:i + BATCH]
            for st in await chunks.verify(part):
                counts[("good", "missing", "corrupt")[st]] += 1
            bar.advance(task, len(part))
    finally:
        await conn.close()
    return counts


async def cmd_scrub(args: argparse.Namespace) -> int:
    if bool(args.volume) == bool(args.node):
        raise Invalid("scrub", "name a VOLUME or pass --node ID (one of them)")
    credential = load_credential(args.cluster)
    report: dict[str, Any] = {"replicas": {}, "volumes": {}}
    async with cluster_admin(args.cluster) as (admin, _conn, bridge, _cfg):
        nodes = {n.id: n for n in await admin.list_nodes()}
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with progress(*columns, json_output=args.json) as bar:
            if args.node:
                if args.node not in nodes:
                    raise Invalid(f"node {args.node}", "not in the cluster map")
                conn = await Connection.open(bridge, nodes[args.node].address, credential, peer="scrub")
                try:
                    chunks = await conn.chunks()
                    hashes: list[bytes] = []
                    after = b""
                    while True:
                        page = await chunks.list_hashes(after, 4096)
                        if not page:
                            break
                        hashes += page
                        after = page[-1]
                finally:
                    await conn.close()
                task = bar.add_task(f"scrub node {args.node}", total=len(hashes))
                report["replicas"][args.node] = await _verify(bridge, credential, nodes[args.node].address, hashes,
                                                              bar, task)
                volumes = [v.name for v in await admin.list_volumes() if args.node in v.replicas]
            else:
                vol = await admin.get_volume(args.volume)
                async with tool_session(args.cluster, bridge, vol.name, True, "scrub") as session:
                    assert session.meta is not None
                    refs = await session.meta.chunk_refs()
                for r in vol.replicas:
                    task = bar.add_task(f"scrub {vol.name} on {r}", total=len(refs))
                    address = nodes[r].address if r in nodes else ""
                    report["replicas"][r] = await _verify(bridge, credential, address, refs, bar, task)
                volumes = [vol.name]
        worst = 0
        for name in volumes:
            asked = await admin.repair_volume(name)
            v = await _wait_healthy(admin, name, args.json, lambda v: True, after=asked, timeout=args.timeout,
                                    fail=False)
            entry: dict[str, Any] = {"state": v.state, "repaired": v.detail.get("repair", {}).get("done", 0),
                                     "lost": []}
            lost_count = v.detail.get("repair", {}).get("lost", 0)
            if lost_count:
                entry["lost"] = await _lost(bridge, args.cluster, credential, name, v.replicas)
                worst = 1
            elif v.state != "healthy":
                worst = 1
            report["volumes"][name] = entry
    if args.json:
        emit_json(report)
        return worst
    table(None, ["REPLICA", "GOOD", "MISSING", "CORRUPT (quarantined)", "UNREACHABLE"],
          [[n, c["good"], c["missing"], c["corrupt"], c["unreachable"]] for n, c in report["replicas"].items()])
    for name, entry in report["volumes"].items():
        line(f'volume "{name}": {entry["state"]}, {entry["repaired"]} chunk copies restored by repair')
        if entry["lost"]:
            line(f'volume "{name}": {len(entry["lost"])} block(s) have no good copy on any replica:')
            table(None, ["FILE", "BYTES", "CHUNK"],
                  [[p["path"], f'{p["offset"]}-{p["offset"] + p["length"]}', p["hash"][:16]] for p in entry["lost"]])
    return worst


async def _lost(bridge: Any, cluster: Any, credential: Credential, name: str,
                replicas: list[str]) -> list[dict[str, Any]]:
    """Chunks no replica holds after repair, as files and byte ranges."""
    async with tool_session(cluster, bridge, name, True, "scrub") as session:
        assert session.meta is not None
        refs = await session.meta.chunk_refs()
        present, _unreachable = await session.held_by_replicas(replicas, refs)
        lost = [h for h in refs if h not in present]
        places = await session.meta.locate(lost) if lost else []
    return [{"path": p.decode(errors="replace"), "offset": off, "length": ln, "hash": h.hex()}
            for h, p, off, ln in places]
