"""A node's share of volume metadata: coordinator of some volumes, follower of others.

Each volume this node replicates has a RocksDB keyspace in ``STATE/volumes/<name>/meta``. As the
coordinator, the node runs ``pxfs.meta.Meta`` over it for every mount and ships each batch to the
followers (``Replicator``) before the mount gets its answer; as a follower it applies the batches it
receives, in sequence order, refusing any from an older epoch (a deposed coordinator).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from pxfs.cluster.replicator import Replicator
from pxfs.cluster.store import ControlStore
from pxfs.errors import Conflict, NotFound, PxfsError, Unavailable
from pxfs.meta.fs import Meta
from pxfs.meta.kv import RocksKV
from pxfs.model import VolumeInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

USAGE_INTERVAL = 2.0


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

    def close(self) -> None:
        self.kv.close()


class VolumeHost:
    """The trio service behind the ``VolumeService`` RPC of a node."""

    def __init__(self, node_id: str, state_dir: Path, store: ControlStore, peers: Any) -> None:
        self.node_id = node_id
        self._dir = state_dir / "volumes"
        self._store = store
        self._peers = peers  # pxfs.cluster.peers.Peers: logged-in connections to other nodes
        self._volumes: dict[str, HostedVolume] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._report_usage)
            task_status.started()
            await trio.sleep_forever()

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
            hv = HostedVolume(name, self._dir / name)
            self._volumes[name] = hv
        return hv

    # -- coordinator side ----------------------------------------------------------------------

    async def open(self, name: str, mount_id: str) -> tuple[HostedVolume, VolumeInfo]:
        """Called when a mount opens a volume here: this node must be its coordinator."""
        spec = await self._spec(name)
        if spec.coordinator != self.node_id:
            raise Conflict(f'volume "{name}"', f"coordinated by node {spec.coordinator}, not {self.node_id}")
        if self.node_id not in spec.replicas:
            raise Conflict(f'volume "{name}"', f"node {self.node_id} is not one of its replicas")
        hv = self._hosted(name)
        if hv.epoch > spec.epoch:
            raise Conflict(f'volume "{name}"', f"local epoch {hv.epoch} is newer than the cluster's {spec.epoch}")
        hv.set_epoch(spec.epoch)
        if hv.meta is None:
            hv.meta = Meta(hv.kv, spec.size, spec.block_size)
            hv.meta.purge_orphans()
            hv.meta.init_root()
        hv.meta.capacity = spec.size
        followers = [r for r in spec.replicas if r != self.node_id]
        if hv.replicator is None or hv.replicator.followers != followers or hv.replicator.epoch != spec.epoch:
            if hv.replicator is not None:
                hv.replicator.stop()
            assert self._nursery is not None
            hv.replicator = Replicator(name, hv.kv, spec.epoch, followers, self._peers)
            self._nursery.start_soon(hv.replicator.run)
        hv.mounts[mount_id] = time.time()
        await self._store.put(f"mounts/{name}/{mount_id}", json.dumps({"ts": time.time(),
                                                                       "node": self.node_id}).encode())
        return hv, spec

    async def call(self, hv: HostedVolume, fn: Callable[[Meta], T]) -> T:
        """Run one Meta operation; if it wrote a batch, return only once the live followers hold it."""
        if hv.meta is None:
            raise Unavailable(f'volume "{hv.name}"', "no longer coordinated by this node; reopen")
        before = hv.kv.seq
        result = fn(hv.meta)
        if hv.kv.seq != before and hv.replicator is not None:
            await hv.replicator.wait_acked(hv.kv.seq)
        return result

    async def keepalive(self, hv: HostedVolume, mount_id: str) -> None:
        now = time.time()
        if now - hv.mounts.get(mount_id, 0) > 3:
            hv.mounts[mount_id] = now
            await self._store.put(f"mounts/{hv.name}/{mount_id}", json.dumps({"ts": now,
                                                                              "node": self.node_id}).encode())

    async def _report_usage(self) -> None:
        last: dict[str, dict[str, int]] = {}
        while True:
            await trio.sleep(USAGE_INTERVAL)
            for name, hv in list(self._volumes.items()):
                if hv.meta is None:
                    continue
                st = hv.meta.statfs()
                usage = {"used": st["used"], "inodes": st["inodes"]}
                if last.get(name) != usage:
                    try:
                        await self._store.put(f"usage/{name}", json.dumps(usage).encode())
                        last[name] = usage
                    except PxfsError as err:
                        log.warning("volume=%s usage report failed: %s", name, err)

    # -- follower side -------------------------------------------------------------------------

    async def apply(self, name: str, epoch: int, seq: int, batch: bytes) -> int:
        """Apply batch ``seq`` from the coordinator of ``epoch``; returns this replica's seq after it."""
        hv = self._hosted(name)
        async with hv.lock:
            if epoch < hv.epoch:
                raise Conflict(f'volume "{name}"', f"batch from epoch {epoch} refused: this replica is at "
                               f"epoch {hv.epoch}")
            if hv.meta is not None and epoch > hv.epoch:
                # A newer coordinator exists: this node was deposed and now follows.
                hv.meta = None
                if hv.replicator is not None:
                    hv.replicator.stop()
                    hv.replicator = None
            hv.set_epoch(epoch)
            if seq == hv.kv.seq + 1:
                hv.kv.apply(seq, batch)
            return hv.kv.seq

    async def last_seq(self, name: str) -> tuple[int, int]:
        hv = self._hosted(name)
        return hv.kv.seq, hv.epoch

    async def drop(self, name: str) -> None:
        hv = self._volumes.pop(name, None)
        if hv is not None:
            if hv.replicator is not None:
                hv.replicator.stop()
            hv.close()
        shutil.rmtree(self._dir / name, ignore_errors=True)
