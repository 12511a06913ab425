"""A node's share of volume metadata: coordinator of some volumes, follower of others.

Each volume this node replicates has a RocksDB keyspace in ``STATE/volumes/<name>/meta``. As the
coordinator (named, with an epoch, in the volume's record in the control store), the node runs
``pxfs.meta.Meta`` over it for every mount, ships each batch to the followers (``Replicator``)
before the mount gets its answer, repairs the replicas' chunks (``ChunkRepair``) and publishes the
volume's health. As a follower it applies the batches it receives in sequence order and refuses any
from an older epoch, so a deposed coordinator can never get a write acknowledged by a follower.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import blake3
import trio

from pxfs.cluster.admin import check_volume_name
from pxfs.cluster.repair import ChunkRepair
from pxfs.cluster.replicator import Replicator
from pxfs.cluster.store import ControlStore
from pxfs.errors import Conflict, NotFound, PxfsError, Unavailable
from pxfs.meta.fs import Meta
from pxfs.meta.fsck import fsck
from pxfs.meta.kv import RocksKV
from pxfs.model import VolumeInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

SUPERVISE_INTERVAL = 1.0
REPAIR_PERIOD = 60.0


class HostedVolume:
    """One volume's keyspace on this node, and, when this node coordinates it, its Meta."""

    def __init__(self, name: str, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.path = path
        self.kv = RocksKV(str(path / "meta"))
        self.epoch = self._read_epoch()
        self.meta: Meta | None = None
        self.replicator: Replicator | None = None
        self.repair: ChunkRepair | None = None
        self.repair_wanted = True
        self.repair_running = False
        self.last_repair = 0.0
        self.repair_asked = 0.0
        self.spec: VolumeInfo | None = None
        self.mounts: dict[str, float] = {}
        self.lock = trio.Lock()  # serialises apply() of batches arriving from the coordinator

    def _read_epoch(self) -> int:
        try:
            return int((self.path / "epoch").read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            tmp = self.path / "epoch.tmp"
            tmp.write_text(str(epoch))
            tmp.replace(self.path / "epoch")
            self.epoch = epoch

    def demote(self) -> None:
        self.meta = None
        if self.replicator is not None:
            self.replicator.stop()
            self.replicator = None

    def wipe(self) -> None:
        """Drop this replica's copy entirely (it diverged); the coordinator resends the whole log."""
        self.demote()
        self.kv.close()
        shutil.rmtree(self.path / "meta", ignore_errors=True)
        self.kv = RocksKV(str(self.path / "meta"))

    def close(self) -> None:
        self.demote()
        self.kv.close()


class VolumeHost:
    """The trio service behind the ``VolumeService`` RPC of a node."""

    def __init__(self, node_id: str, state_dir: Path, store: ControlStore, peers: Any,
                 repair_rate: float = 200e6) -> None:
        self.node_id = node_id
        self._dir = state_dir / "volumes"
        self._store = store
        self._peers = peers  # pxfs.cluster.peers.Peers: logged-in connections to other nodes
        self._repair_rate = repair_rate
        self._volumes: dict[str, HostedVolume] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                try:
                    await self._supervise()
                except PxfsError as err:
                    log.info("node=%s volume supervision skipped a round: %s", self.node_id, err)
                await trio.sleep(SUPERVISE_INTERVAL)

    def close(self) -> None:
        for hv in self._volumes.values():
            hv.close()
        self._volumes.clear()

    async def _spec(self, name: str) -> VolumeInfo:
        raw = await self._store.get(f"volumes/{name}")
        if raw is None:
            raise NotFound(f'volume "{name}"', "no such volume")
        return VolumeInfo(**json.loads(raw))

    def _hosted(self, name: str) -> HostedVolume:
        hv = self._volumes.get(name)
        if hv is None:
            check_volume_name(name)  # it becomes a directory name: never a path
            hv = HostedVolume(name, self._dir / name)
            self._volumes[name] = hv
        return hv

    # -- coordinator side ----------------------------------------------------------------------

    def _activate(self, spec: VolumeInfo) -> HostedVolume:
        """Become (or stay) the coordinator of ``spec``: Meta open, replicator on the right followers."""
        name = spec.name
        if spec.coordinator != self.node_id:
            raise Conflict(f'volume "{name}"', f"coordinated by node {spec.coordinator}, not {self.node_id}")
        hv = self._hosted(name)
        if hv.epoch > spec.epoch:
            raise Conflict(f'volume "{name}"', f"local epoch {hv.epoch} is newer than the cluster's {spec.epoch}")
        if hv.epoch != spec.epoch:
            hv.demote()
            hv.set_epoch(spec.epoch)
        hv.spec = spec
        if hv.meta is None:
            hv.meta = Meta(hv.kv, spec.size, spec.block_size)
            purged = hv.meta.purge_orphans()
            if purged:
                log.info("volume=%s purged %d orphan inode(s) left by a previous coordinator", name, purged)
            hv.meta.init_root()
            hv.repair_wanted = True
            log.info("node=%s coordinates volume=%s epoch=%d seq=%d", self.node_id, name, spec.epoch, hv.kv.seq)
        hv.meta.capacity = spec.size
        followers = [r for r in spec.replicas if r != self.node_id]
        rep = hv.replicator
        if rep is None or rep.followers != followers or rep.epoch != spec.epoch or rep.deposed:
            if rep is not None:
                rep.stop()
                hv.repair_wanted = True
            assert self._nursery is not None
            hv.replicator = Replicator(name, hv.kv, spec.epoch, followers, self._peers,
                                       on_caught_up=lambda _f, hv=hv: setattr(hv, "repair_wanted", True))
            self._nursery.start_soon(hv.replicator.run)
        if hv.repair is None:
            hv.repair = ChunkRepair(name, self._peers, self._repair_rate)
        return hv

    async def open(self, name: str, mount_id: str) -> tuple[HostedVolume, VolumeInfo]:
        """Called when a mount opens a volume here: this node must be its coordinator."""
        spec = await self._spec(name)
        if self.node_id not in spec.replicas:
            raise Conflict(f'volume "{name}"', f"node {self.node_id} is not one of its replicas")
        hv = self._activate(spec)
        await self.keepalive(hv, mount_id, force=True)
        return hv, spec

    async def call(self, hv: HostedVolume, fn: Callable[[Meta], T]) -> T:
        """Run one Meta operation; if it wrote a batch, return only once the live followers hold it."""
        if hv.meta is None:
            raise Unavailable(f'volume "{hv.name}"', f"no longer coordinated by node {self.node_id}; reopen")
        before = hv.kv.seq
        result = fn(hv.meta)
        rep = hv.replicator
        if hv.kv.seq != before and rep is not None:
            await rep.wait_acked(hv.kv.seq)
            if rep.deposed:
                hv.demote()
                raise Unavailable(f'volume "{hv.name}"', "this coordinator was deposed by a newer epoch; reopen")
            if rep.lagging:
                # Acknowledged by fewer than all replicas: make sure we still hold the role, so a
                # coordinator cut off from its followers cannot go on acknowledging writes alone.
                spec = await self._spec(hv.name)
                if spec.coordinator != self.node_id or spec.epoch != hv.epoch:
                    hv.demote()
                    raise Unavailable(f'volume "{hv.name}"', f"coordinator is now {spec.coordinator}; reopen")
        return result

    async def fsck(self, hv: HostedVolume, repair: bool) -> str:
        """Run fsck on the coordinator's keyspace; a repair batch ships to followers like any other.

        It runs on the trio thread on purpose: no metadata operation may interleave with the scan
        that the repair batch is computed from.
        """
        def run(meta: Meta) -> str:
            report = fsck(hv.kv, block_size=meta.block_size, repair=repair, is_open=meta._is_open)
            return json.dumps(report.to_json())

        return await self.call(hv, run)

    async def detach(self, hv: HostedVolume, mount_id: str) -> None:
        hv.mounts.pop(mount_id, None)
        await self._store.delete(f"mounts/{hv.name}/{mount_id}")

    async def keepalive(self, hv: HostedVolume, mount_id: str, force: bool = False) -> None:
        if mount_id.startswith("tool:"):
            return  # scrub, fsck and test verifiers are sessions, not mounts
        now = time.time()
        if force or now - hv.mounts.get(mount_id, 0) > 3:
            hv.mounts[mount_id] = now
            await self._store.put(f"mounts/{hv.name}/{mount_id}", json.dumps({"ts": now,
                                                                              "node": self.node_id}).encode())

    async def request_repair(self, name: str) -> None:
        spec = await self._spec(name)
        hv = self._activate(spec)
        hv.repair_wanted = True

    # -- supervision: role changes, repair, health -----------------------------------------------

    async def _supervise(self) -> None:
        specs = {name.removeprefix("volumes/"): VolumeInfo(**json.loads(raw))
                 for name, raw in await self._store.range("volumes/")}
        for name, spec in specs.items():
            if spec.coordinator == self.node_id and self.node_id in spec.replicas:
                try:
                    hv = self._activate(spec)
                except Conflict as err:
                    log.warning("node=%s volume=%s: %s", self.node_id, name, err)
                    continue
                await self._health(hv)
            elif name in self._volumes and self._volumes[name].meta is not None:
                log.info("node=%s no longer coordinates volume=%s (now %s)", self.node_id, name, spec.coordinator)
                self._volumes[name].demote()
        for name in list(self._volumes):
            spec = specs.get(name)
            if spec is None or self.node_id not in spec.replicas:
                log.info("node=%s drops its copy of volume=%s (%s)", self.node_id, name,
                         "deleted" if spec is None else "no longer a replica")
                await self.drop(name)
        if not self._volumes and self._dir.exists():
            for stale in self._dir.iterdir():
                spec = specs.get(stale.name)
                if spec is None or self.node_id not in spec.replicas:
                    shutil.rmtree(stale, ignore_errors=True)

    async def _health(self, hv: HostedVolume) -> None:
        assert hv.meta is not None and hv.spec is not None and hv.repair is not None
        now = time.monotonic()
        asked = await self._store.get(f"repair/{hv.name}")
        if asked is not None:
            ts = json.loads(asked).get("ts", 0)
            if ts > hv.repair_asked:
                hv.repair_asked = ts
                hv.repair_wanted = True
        if not hv.repair_running and (hv.repair_wanted or now - hv.last_repair > REPAIR_PERIOD):
            hv.repair_wanted = False
            hv.repair_running = True
            assert self._nursery is not None
            self._nursery.start_soon(self._repair, hv)
        st = hv.meta.statfs()
        rep = hv.replicator
        detail = {"used": st["used"], "inodes": st["inodes"], "seq": hv.kv.seq, "epoch": hv.epoch,
                  "coordinator": self.node_id, "lagging": sorted(rep.lagging) if rep else [],
                  "repair": hv.repair.status.to_json(), "ts": time.time()}
        await self._store.put(f"usage/{hv.name}", json.dumps(detail).encode())

    async def _repair(self, hv: HostedVolume) -> None:
        try:
            if hv.meta is None or hv.spec is None or hv.repair is None:
                return
            refs = await trio.to_thread.run_sync(hv.meta.chunk_refs)
            await hv.repair.run(refs, list(hv.spec.replicas))
        except PxfsError as err:
            log.warning("volume=%s repair failed: %s", hv.name, err)
        finally:
            hv.repair_running = False
            hv.last_repair = time.monotonic()

    # -- follower side -------------------------------------------------------------------------

    async def apply(self, name: str, epoch: int, seq: int, batch: bytes) -> int:
        """Apply batch ``seq`` from the coordinator of ``epoch``; returns this replica's seq after it."""
        hv = self._hosted(name)
        async with hv.lock:
            if epoch < hv.epoch:
                raise Conflict(f'volume "{name}"', f"batch from epoch {epoch} refused: this replica is at "
                               f"epoch {hv.epoch}")
            if epoch > hv.epoch:
                if hv.meta is not None:
                    log.info("node=%s deposed as coordinator of volume=%s by epoch %d", self.node_id, name, epoch)
                hv.demote()
                hv.set_epoch(epoch)
            if seq == hv.kv.seq + 1:
                hv.kv.apply(seq, batch)
            return hv.kv.seq

    async def last_seq(self, name: str) -> tuple[int, int, bytes]:
        hv = self._hosted(name)
        last = hv.kv.log_entry(hv.kv.seq) if hv.kv.seq else None
        return hv.kv.seq, hv.epoch, blake3.blake3(last).digest() if last is not None else b""

    async def reset(self, name: str, epoch: int) -> None:
        hv = self._hosted(name)
        async with hv.lock:
            if epoch < hv.epoch:
                raise Conflict(f'volume "{name}"', f"reset from epoch {epoch} refused (at {hv.epoch})")
            log.warning("node=%s volume=%s: copy diverged from the coordinator's, starting over", self.node_id, name)
            hv.wipe()
            hv.set_epoch(epoch)

    async def drop(self, name: str) -> None:
        hv = self._volumes.pop(name, None)
        if hv is not None:
            hv.close()
        shutil.rmtree(self._dir / name, ignore_errors=True)
