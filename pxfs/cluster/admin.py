"""Cluster administration over a control store: the trio service behind the ``Admin`` RPC."""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any

from pxfs.cluster import placement, records
from pxfs.cluster.config import ClusterConfig
from pxfs.cluster.store import ControlStore
from pxfs.errors import Conflict, Exists, Invalid, NotFound, PxfsError, Unavailable
from pxfs.model import NodeInfo, VolumeInfo
from pxfs.paths import is_name

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$")
MIN_SIZE = 1 << 20
MAX_SIZE = 1 << 60
MAX_INODES = 1 << 48
DEFAULT_BLOCK = 1 << 20
MIN_BLOCK, MAX_BLOCK = 4096, 16 << 20
MOUNT_TTL = 15.0


def check_volume_name(name: str) -> str:
    if not is_name(name):
        raise Invalid(f"volume {name!r}", "name must be 1-63 characters of letters, digits, '_', '.', '-' "
                      "starting with a letter or digit (no '/', no path)")
    return name


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for k, v in labels.items():
        if not LABEL.match(k) or (v and not LABEL.match(v)):
            raise Invalid(f"label {k}={v}", "keys and values are up to 63 letters, digits, '_', '.', '/', '-'")
    return labels


_vol_key = records.volume_key


class ClusterAdmin:
    """Validates and records volumes; judges health from node liveness."""

    def __init__(self, store: ControlStore, config: ClusterConfig,
                 overcommit: float = placement.OVERCOMMIT, peers: Any = None) -> None:
        self._store = store
        self._config = config
        self._overcommit = overcommit
        self._peers = peers  # pxfs.cluster.peers.Peers: asks nodes for their local replicas

    async def _local_replicas(self) -> tuple[list[records.LocalReplica], list[int], list[str], dict[str, str]]:
        """Every registered node's copies: (copies, generations the nodes accepted, nodes asked, failures)."""
        if self._peers is None:
            raise Unavailable("cluster recovery", "this admin service has no connections to the nodes")
        removed = await self._removed()
        nodes = sorted(n.id for n in await self._store.liveness() if n.id not in removed)
        copies: list[records.LocalReplica] = []
        gens: list[int] = []
        failed: dict[str, str] = {}
        for node in nodes:
            try:
                gen, mine = records.decode_local_replicas(node, await self._peers.local_replicas(node))
            except PxfsError as err:
                failed[node] = str(err)
                continue
            gens.append(gen)
            copies.extend(mine)
        return copies, gens, nodes, failed

    async def revoke_credential(self, serial: int, name: str) -> None:
        """Every node refuses this credential within a revocation round (``pxfs.node``)."""
        await self._store.put(records.revoked_key(serial), records.encode_revoked(name, time.time()))

    async def revoked_credentials(self) -> list[dict[str, Any]]:
        found = records.revoked(await self._store.range(records.REVOKED_PREFIX))
        return [{"serial": f"{s:x}", "name": r.get("name", ""), "at": r.get("ts", 0)} for s, r in sorted(found.items())]

    async def store_check(self) -> dict[str, Any]:
        """Whether the store knows every volume the nodes hold; ``problem`` says what to do when not."""
        raw = await self._store.get(records.IDENTITY_KEY)
        names = {v.name for v in await self._specs()}
        deleted = records.tombstones(await self._store.range(records.TOMBSTONE_PREFIX))
        copies, _gens, nodes, failed = await self._local_replicas()
        orphans: dict[str, list[str]] = {}
        for c in copies:
            if c.spec.name not in names and c.spec.uid not in deleted.get(c.spec.name, set()):
                orphans.setdefault(c.spec.name, []).append(c.node)
        holders = sorted({n for ns in orphans.values() for n in ns})
        why = records.identity_problem(raw, self._config.id, 0, bool(copies))
        problem = ""
        if orphans:
            what = "empty" if raw is None and not names else "volume records missing"
            problem = (f"control store: {what}, but nodes {','.join(holders)} hold replicas of volumes "
                       f'{", ".join(sorted(orphans))}: run "pxfs cluster recover"')
        elif why:
            problem = f"control store: {why}"
        identity = None
        if raw is not None:
            try:
                cid, gen = records.decode_identity(raw)
                identity = {"id": cid, "generation": gen}
            except PxfsError as err:
                identity = {"error": str(err)}
        return {"identity": identity, "problem": problem, "orphans": {k: sorted(v) for k, v in orphans.items()},
                "nodes": nodes, "unreachable": failed}

    async def recover(self) -> dict[str, Any]:
        """Rebuild every volume record the store lacks from the copies the nodes hold, then name the
        store this cluster's at a new generation (so the nodes act on it again). Records already in
        the store are left alone; a foreign store is refused."""
        raw = await self._store.get(records.IDENTITY_KEY)
        gen = 0
        if raw is not None:
            cid, gen = records.decode_identity(raw)
            if cid != self._config.id:
                raise Conflict("control store", f"belongs to cluster {cid}, not {self._config.id}: not recovering "
                               "into it")
        copies, gens, nodes, failed = await self._local_replicas()
        if failed:
            # A node that does not answer may hold the newest copy of a volume: a record rebuilt
            # without it could name a stale coordinator.
            raise Unavailable("cluster recovery", "nodes did not answer: " +
                              "; ".join(f"{n}: {e}" for n, e in sorted(failed.items())))
        names = {v.name for v in await self._specs()}
        deleted = records.tombstones(await self._store.range(records.TOMBSTONE_PREFIX))
        rebuilt: list[dict[str, Any]] = []
        for name in sorted({c.spec.name for c in copies} - names):
            mine = [c for c in copies if c.spec.name == name]
            vol = records.rebuild_volume(name, mine, deleted.get(name, set()))
            if vol is None:
                continue
            if await self._store.cas(_vol_key(name), None, records.encode_volume(vol)):
                seq = max(c.seq for c in mine if c.node == vol.coordinator and c.spec.uid == vol.uid)
                rebuilt.append({"name": name, "uid": vol.uid, "replicas": vol.replicas, "coordinator": vol.coordinator,
                                "in_sync": vol.in_sync, "epoch": vol.epoch, "seq": seq})
        generation = max([gen, *gens]) + 1
        await self._store.put(records.IDENTITY_KEY, records.encode_identity(self._config.id, generation))
        return {"rebuilt": rebuilt, "generation": generation, "nodes": nodes}

    async def cluster_info(self) -> dict[str, str]:
        c = self._config
        return {"id": c.id, "name": c.name, "seed": c.seed, "store": c.store}

    async def _removed(self) -> set[str]:
        """Node ids an operator took out with ``pxfs node remove``."""
        return {k.removeprefix("removed/") for k, _ in await self._store.range("removed/")}

    async def list_nodes(self) -> list[NodeInfo]:
        nodes = await self._store.liveness()
        removed = await self._removed()
        for n in nodes:
            if n.id in removed:
                n.state = "removed"
        return sorted(nodes, key=lambda n: n.id)

    async def _specs(self) -> list[VolumeInfo]:
        return records.volumes(await self._store.range(records.VOLUME_PREFIX))

    async def _spec(self, name: str) -> tuple[VolumeInfo, bytes]:
        key = _vol_key(check_volume_name(name))
        raw = await self._store.get(key)
        if raw is None:
            raise NotFound(f'volume "{name}"', "no such volume")
        return records.decode_volume(key, raw), raw

    async def _decorate(self, vols: list[VolumeInfo], nodes: list[NodeInfo] | None = None) -> list[VolumeInfo]:
        nodes = nodes if nodes is not None else await self._store.liveness()
        removed = await self._removed()
        up = {n.id for n in nodes if n.state == "up"} - removed
        now = time.time()
        for v in vols:
            key = f"usage/{v.name}"
            raw = await self._store.get(key)
            try:
                detail = records.decode_json(key, raw) if raw else {}
            except PxfsError as err:
                records.skip_bad(key, err)
                detail = {}
            # Published by this coordinator for this replica set: a report from before a replica
            # change says nothing about the new replica.
            fresh = (detail.get("coordinator") == v.coordinator and detail.get("epoch") == v.epoch
                     and detail.get("replicas") == sorted(v.replicas))
            v.used = detail.get("used", 0)
            missing = [r for r in v.replicas if r not in up]
            lagging = [r for r in detail.get("lagging", []) if r not in missing] if fresh else []
            repair = detail.get("repair", {}) if fresh else {}
            v.detail = {"missing_replicas": missing, "lagging": lagging, "repair": repair,
                        "space": detail.get("space", {}), "snapshots": detail.get("snapshots", []),
                        "inodes": detail.get("inodes", 0), "meta_bytes": detail.get("meta_bytes", 0)}
            short = len(v.replicas) < v.repl
            # Until a repair round has checked the replicas, only an empty volume is known complete.
            # A report from before the last failover or replica change: unknown, so not healthy yet.
            incomplete = (bool(detail) and not fresh) or (bool(repair) and not repair.get("converged", False) and (
                repair.get("rounds", 0) > 0 or v.used > 0))
            # Replicas out of the in-sync set hold an old copy: they catch up, then rejoin.
            behind = [r for r in v.replicas if r not in v.in_sync and r not in missing and r not in lagging]
            v.detail["lagging"] = lagging + behind
            v.waiting = self._waiting(v, up)
            v.state = "degraded" if missing or lagging or behind or short or incomplete or v.waiting else "healthy"
            if v.waiting:
                v.state = "unavailable"
            prefix = f"mounts/{v.name}/"
            live = [m for m in records.mounts(await self._store.range(prefix), prefix) if now - m["ts"] <= MOUNT_TTL]
            v.mounts = len(live)
            v.detail["mounts"] = [{"id": m["id"], "node": m["node"], "http": m["http"]} for m in live]
        return vols

    @staticmethod
    def _waiting(v: VolumeInfo, up: set[str]) -> str:
        """Why nobody can serve the volume, or "": its coordinator is down and no in-sync replica is up."""
        if v.coordinator in up:
            return ""
        electable = [r for r in v.in_sync if r != v.coordinator and r in up]
        if electable:
            return ""  # the manager fails over to one of them
        behind = [r for r in v.replicas if r not in v.in_sync and r in up]
        why = (f"coordinator {v.coordinator} is down and no other in-sync replica is up "
               f"(in sync: {', '.join(v.in_sync) or 'none'})")
        if behind:
            why += (f"; {', '.join(behind)} may lack acknowledged writes: bring {v.coordinator} back, or "
                    f"`pxfs volume promote {v.name} {behind[0]} --accept-data-loss`")
        return why

    async def list_volumes(self) -> list[VolumeInfo]:
        return await self._decorate(sorted(await self._specs(), key=lambda v: v.name))

    async def get_volume(self, name: str) -> VolumeInfo:
        spec, _raw = await self._spec(name)
        return (await self._decorate([spec]))[0]

    async def inspect_volume(self, name: str) -> VolumeInfo:
        """``get_volume`` and, from each replica's node, its copy's metadata on disk: bytes of its
        files and batches in its log (``replica_meta``; a node that does not answer is left out)."""
        v = await self.get_volume(name)
        if self._peers is None:
            return v
        found: dict[str, dict[str, int]] = {}
        for node in v.replicas:
            try:
                _gen, copies = records.decode_local_replicas(node, await self._peers.local_replicas(node))
            except PxfsError:
                continue
            for c in copies:
                if c.spec.name == name and c.spec.uid == v.uid:
                    found[node] = {"disk_bytes": c.meta_bytes, "log_entries": c.log_entries, "seq": c.seq}
        v.detail["replica_meta"] = found
        return v

    def _check_size(self, name: str, size: int) -> None:
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise Invalid(f'volume "{name}"', f"size {size} out of range (1M to 1E bytes)")

    @staticmethod
    def _check_inodes(name: str, max_inodes: int) -> None:
        if not 0 <= max_inodes <= MAX_INODES:
            raise Invalid(f'volume "{name}"', f"max inodes {max_inodes} out of range (1 to {MAX_INODES})")

    async def _committed(self, skip: str = "") -> dict[str, int]:
        committed: dict[str, int] = {}
        for v in await self._specs():
            if v.name != skip:
                for r in v.replicas:
                    committed[r] = committed.get(r, 0) + v.size
        return committed

    async def create_volume(self, name: str, size: int, repl: int, block_size: int,
                            labels: dict[str, str], min_replicas: int = 1, max_inodes: int = 0) -> VolumeInfo:
        """``max_inodes`` 0: the default for the size (``VolumeInfo.inode_limit``)."""
        check_volume_name(name)
        check_labels(labels)
        self._check_size(name, size)
        self._check_inodes(name, max_inodes)
        if not 1 <= repl <= 3:
            raise Invalid(f'volume "{name}"', f"repl must be 1, 2 or 3 (got {repl})")
        min_replicas = min_replicas or 1
        if not 1 <= min_replicas <= repl:
            raise Invalid(f'volume "{name}"', f"min-replicas must be from 1 to repl={repl} (got {min_replicas})")
        block_size = block_size or DEFAULT_BLOCK
        if block_size & (block_size - 1) or not MIN_BLOCK <= block_size <= MAX_BLOCK:
            raise Invalid(f'volume "{name}"', f"block size {block_size} must be a power of two from 4K to 16M")
        if await self._store.get(_vol_key(name)) is not None:
            raise Exists(f'volume "{name}"', "a volume with this name exists")
        removed = await self._removed()
        nodes = [n for n in await self._store.liveness() if n.id not in removed]
        # Keep the seed out of the replicas and coordinator duty when others can serve: losing it
        # already freezes the cluster map, it should not also stall the volume. Then spread the duty.
        seeds = frozenset(n.id for n in nodes if n.seed)
        replicas = placement.place(name, nodes, repl, size, await self._committed(), self._overcommit, avoid=seeds)
        duty = {r: 0 for r in replicas}
        for v in await self._specs():
            if v.coordinator in duty:
                duty[v.coordinator] += 1
        coordinator = min(replicas, key=lambda r: (r in seeds, duty[r], replicas.index(r)))
        replicas.remove(coordinator)
        replicas.insert(0, coordinator)
        vol = VolumeInfo(name=name, size=size, repl=repl, block_size=block_size, labels=labels,
                         replicas=replicas, coordinator=coordinator, epoch=1, created_ns=time.time_ns(),
                         in_sync=list(replicas), min_replicas=min_replicas, uid=secrets.token_hex(8),
                         max_inodes=max_inodes)
        if not await self._store.cas(_vol_key(name), None, records.encode_volume(vol)):
            raise Exists(f'volume "{name}"', "a volume with this name exists")
        return (await self._decorate([vol], nodes))[0]

    async def resize_volume(self, name: str, size: int, max_inodes: int = 0) -> VolumeInfo:
        """New size and, unless 0, inode limit. Neither may go below what is in use (as the
        coordinator last reported it); growth stays within the thin-provisioning limit."""
        spec, raw = await self._spec(name)
        size = size or spec.size
        self._check_size(name, size)
        self._check_inodes(name, max_inodes)
        vol = (await self._decorate([spec]))[0]
        in_use = vol.used + vol.detail.get("meta_bytes", 0)
        if size < in_use:
            raise Invalid(f'volume "{name}"', f"cannot shrink to {size} bytes below the {in_use} bytes in use "
                          "(data and metadata)")
        inodes = vol.detail.get("inodes", 0)
        if max_inodes and max_inodes < inodes:
            raise Invalid(f'volume "{name}"', f"cannot limit to {max_inodes} inodes: {inodes} are in use")
        if size > spec.size:
            nodes = {n.id: n for n in await self._store.liveness()}
            committed = await self._committed(skip=name)
            for r in spec.replicas:
                n = nodes.get(r)
                if n and committed.get(r, 0) + size > self._overcommit * placement.node_capacity(n):
                    raise Invalid(f'volume "{name}"', f"size {size} exceeds the thin-provisioning limit "
                                  f"({self._overcommit:g}x pool capacity) of replica node {r}")
        spec.size = size
        spec.max_inodes = max_inodes or spec.max_inodes
        if not max_inodes and spec.inode_limit < inodes:
            raise Invalid(f'volume "{name}"', f"{size} bytes give {spec.inode_limit} inodes, {inodes} are in use: "
                          "give --max-inodes too")
        if not await self._store.cas(_vol_key(name), raw, records.encode_volume(spec)):
            raise Conflict(f'volume "{name}"', "changed concurrently; retry")
        return await self.get_volume(name)

    async def delete_volume(self, name: str, force: bool) -> None:
        vol = await self.get_volume(name)
        if vol.mounts and not force:
            raise Invalid(f'volume "{name}"', f"mounted {vol.mounts} time(s); unmount it first or use --force")
        spec, _raw = await self._spec(name)
        # Replicas and chunks go only on an explicit tombstone naming this volume's uid: a record
        # that is merely missing (a lost control store) must never delete anything.
        await self._store.put(records.tombstone_key(name, spec.uid or "none"), records.encode_tombstone(time.time()))
        await self._store.delete(_vol_key(name))
        await self._store.delete(f"usage/{name}")
        await self._store.delete(f"schedules/{name}")
        for key, _raw in await self._store.range(f"mounts/{name}/"):
            await self._store.delete(key)

    async def ha_update(self, name: str, repl: int) -> VolumeInfo:
        if not 1 <= repl <= 3:
            raise Invalid(f'volume "{name}"', f"repl must be 1, 2 or 3 (got {repl})")
        spec, _raw = await self._spec(name)
        if repl > spec.repl:
            live = [n for n in await self._store.liveness() if n.state == "up"]
            removed = await self._removed()
            candidates = [n for n in live if n.id not in removed and n.id not in spec.replicas]
            if len(candidates) < repl - len(spec.replicas):
                raise Invalid(f'volume "{name}"', f"not enough nodes for repl={repl} "
                              f"(have {len(candidates) + len(spec.replicas)} up)")

        def change(s: VolumeInfo) -> None:
            s.repl = repl

        await self.update_volume(name, change)
        return await self.get_volume(name)

    async def remove_node(self, node_id: str, force: bool) -> None:
        nodes = {n.id: n for n in await self._store.liveness()}
        if node_id not in nodes:
            raise NotFound(f"node {node_id}", "not registered in the cluster map")
        if nodes[node_id].seed:
            raise Invalid(f"node {node_id}", "holds the embedded control store (the seed) and cannot be removed")
        others_up = [n for n in nodes.values() if n.id != node_id and n.state == "up"]
        for v in await self._specs():
            if node_id in v.replicas and not force:
                survivors = [r for r in v.replicas if r != node_id and r in {n.id for n in others_up}]
                if not survivors:
                    raise Invalid(f"node {node_id}", f'holds the only live replica of volume "{v.name}"; '
                                  "removing it loses data (use --force to accept that)")
        await self._store.put(f"removed/{node_id}", json.dumps({"ts": time.time()}).encode())

    async def repair_volume(self, name: str) -> float:
        """Ask the coordinator for a repair round; returns the request's stamp (see RepairStatus.asked)."""
        await self._spec(name)
        ts = time.time()
        await self._store.put(f"repair/{name}", json.dumps({"ts": ts}).encode())
        return ts

    async def clone_volume(self, source: str, name: str) -> VolumeInfo:
        """A writable volume from ``VOLUME@SNAPSHOT``, on the source's replicas (they hold the snapshot
        and its chunks, so a clone costs metadata only); its coordinator copies the snapshot in."""
        src_name, sep, snap = source.partition("@")
        if not sep or not snap:
            raise Invalid(f"snapshot {source!r}", "expected VOLUME@SNAPSHOT")
        check_volume_name(name)
        src, _raw = await self._spec(src_name)
        # The snapshot's existence is checked by the caller at the coordinator (the CLI does); the
        # usage record here can be seconds old, too stale to refuse a snapshot taken just now.
        if await self._store.get(_vol_key(name)) is not None:
            raise Exists(f'volume "{name}"', "a volume with this name exists")
        vol = VolumeInfo(name=name, size=src.size, repl=src.repl, block_size=src.block_size, labels=dict(src.labels),
                         replicas=list(src.replicas), coordinator=src.coordinator, epoch=1,
                         created_ns=time.time_ns(), source=source, in_sync=list(src.replicas),
                         min_replicas=src.min_replicas, uid=secrets.token_hex(8), max_inodes=src.max_inodes)
        if not await self._store.cas(_vol_key(name), None, records.encode_volume(vol)):
            raise Exists(f'volume "{name}"', "a volume with this name exists")
        return (await self._decorate([vol]))[0]

    async def schedule_snapshots(self, name: str, every: int, keep: int) -> None:
        await self._spec(name)
        if every == 0:
            await self._store.delete(f"schedules/{name}")
            return
        if every < 10 or keep < 1:
            raise Invalid(f'volume "{name}"', "a snapshot schedule needs --every of at least 10s and --keep of 1+")
        await self._store.put(f"schedules/{name}", json.dumps({"every": every, "keep": keep}).encode())

    async def update_volume(self, name: str, change: Any) -> VolumeInfo:
        """Apply ``change(spec)`` with compare-and-swap (used by failover and repair)."""
        for _ in range(20):
            spec, raw = await self._spec(name)
            change(spec)
            if await self._store.cas(_vol_key(name), raw, records.encode_volume(spec)):
                return spec
        raise Conflict(f'volume "{name}"', "too many concurrent changes")

    async def promote_volume(self, name: str, node: str) -> VolumeInfo:
        """Make ``node`` coordinator and sole in-sync replica: the operator accepts losing whatever
        acknowledged writes only the other replicas held (the way out when none of them returns)."""
        spec, _raw = await self._spec(name)
        if node not in spec.replicas:
            raise Invalid(f'volume "{name}"', f"node {node} is not one of its replicas ({', '.join(spec.replicas)})")
        up = {n.id for n in await self._store.liveness() if n.state == "up"}
        if node not in up:
            raise Unavailable(f"node {node}", f'is down; it cannot coordinate volume "{name}"')

        def change(s: VolumeInfo) -> None:
            s.coordinator = node
            s.in_sync = [node]
            s.epoch += 1

        await self.update_volume(name, change)
        return await self.get_volume(name)
