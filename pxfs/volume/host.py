"""A node's share of volume metadata: coordinator of some volumes, follower of others.

Each volume this node replicates has a RocksDB keyspace in ``STATE/volumes/<name>/meta``. As the
coordinator (named, with an epoch, in the volume's record in the control store), the node runs
``pxfs.meta.Meta`` over it for every mount, ships each batch to the followers (``Replicator``)
before the mount gets its answer, repairs the replicas' chunks (``ChunkRepair``) and publishes the
volume's health. As a follower it applies the batches it receives in sequence order and refuses any
from an older epoch, so a deposed coordinator can never get a write acknowledged by a follower.

The roles live in their own files: ``coordinator`` (Meta for the mounts, acknowledgement by the
in-sync set), ``jobs`` (restore and fsck under the maintenance mark, whole-keyspace reads in worker
threads), ``health`` (repair, rejoin, space, scheduled snapshots), ``follower`` (fenced apply),
on ``context`` (the copies on disk) and ``replica`` (one copy). This file decides, every round,
which role the node plays for each volume, and deletes a copy only when the store says so.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from pxfs.cluster import records
from pxfs.errors import Conflict, PxfsError
from pxfs.volume.coordinator import Filling
from pxfs.volume.follower import Follower
from pxfs.volume.health import Health
from pxfs.volume.replica import HostedSnapshot, HostedVolume

__all__ = ["HostedSnapshot", "HostedVolume", "VolumeHost"]

log = logging.getLogger(__name__)

SUPERVISE_INTERVAL = 1.0
# Compaction of a replica's keyspace (see _tidy): after this much churn since the last one, relative
# to what it left, once the replica has been quiet this long, and not more often than every TIDY_GAP.
TIDY_BYTES = 1 << 20
TIDY_DELETES = 256
TIDY_QUIET = 2.0
TIDY_GAP = 10.0


class VolumeHost(Health, Follower):
    """The trio service behind the ``VolumeService`` RPC of a node: its roles, and the rounds that
    decide which one it plays for each volume."""

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                try:
                    await self._supervise()
                except PxfsError as err:
                    log.info("node=%s volume supervision skipped a round: %s", self.node_id, err)
                await self._tidy()
                if self.wakeup is not None:
                    await self.wakeup.sleep(SUPERVISE_INTERVAL)
                else:
                    await trio.sleep(SUPERVISE_INTERVAL)

    async def _tidy(self) -> None:
        """Compact the replicas whose files hold much that was deleted or trimmed since the last
        compaction: RocksDB keeps such records in its memtable, write-ahead log and files until
        one, so without it a replica's metadata on disk would grow with everything ever written
        (issue 13) instead of staying near its live metadata. One replica at a time, in a thread."""
        now = time.monotonic()
        for hv in list(self._volumes.values()):
            kv = hv.kv
            if now - hv.tidied_at < TIDY_GAP or now - hv.last_commit < TIDY_QUIET:
                continue
            if kv.churn_bytes < max(TIDY_BYTES, hv.tidied_size // 2) and \
                    kv.churn_deletes < max(TIDY_DELETES, kv.estimate_keys() // 4):
                continue
            before = kv.disk_bytes()
            await trio.to_thread.run_sync(kv.compact)
            hv.tidied_at, hv.tidied_size = time.monotonic(), kv.disk_bytes()
            log.info("node=%s volume=%s compacted: %d -> %d bytes on disk (log trimmed to seq %d of %d)",
                     self.node_id, hv.name, before, hv.tidied_size, kv.trimmed, kv.seq)

    # -- supervision: role changes, repair, health -----------------------------------------------

    async def _supervise(self) -> None:
        if self.guard is not None and await self.guard.check():
            return  # a store this node refuses (the guard logged why): nothing here may act on it
        specs = {v.name: v for v in records.volumes(await self._store.range(records.VOLUME_PREFIX))}
        deleted = records.tombstones(await self._store.range(records.TOMBSTONE_PREFIX))
        # A copy goes only when the store says so about THIS copy (its uid): a tombstone, or its own
        # record without this node. A record that is merely missing deletes nothing.
        for name, uid in self.held().items():
            spec = specs.get(name)
            if uid and uid in deleted.get(name, set()):
                log.info("node=%s drops its copy of volume=%s uid=%s (deleted)", self.node_id, name, uid)
                await self.drop(name)
            elif spec is not None and uid and spec.uid == uid and self.node_id not in spec.replicas:
                log.info("node=%s drops its copy of volume=%s uid=%s (no longer a replica)", self.node_id, name, uid)
                await self.drop(name)
            elif spec is None:
                self._warn(f"norecord/{name}", 'node=%s: volume %s (uid %s) is held here but has no record: '
                           'kept, nothing deleted (run "pxfs cluster recover")', self.node_id, name, uid or "?")
            elif uid and spec.uid != uid:
                self._warn(f"uid/{name}", "node=%s: volume %s: the copy here is uid %s, the record names uid %s "
                           "and no tombstone names %s: kept, nothing deleted", self.node_id, name, uid, spec.uid, uid)
        for name, spec in specs.items():
            if name in self._volumes:
                self._volumes[name].token = (spec.coordinator, spec.epoch)
            if spec.coordinator == self.node_id and self.node_id in spec.replicas:
                try:
                    hv = self._activate(spec)
                except Conflict as err:
                    log.warning("node=%s volume=%s: %s", self.node_id, name, err)
                    continue
                except Filling:
                    continue  # a new clone: its copy runs, the next round finds it done
                try:
                    await self._health(hv)
                except PxfsError as err:  # one volume's trouble never stops the others' supervision
                    log.warning("node=%s volume=%s health round failed: %s", self.node_id, name, err)
                continue
            if name in self._volumes and self._volumes[name].meta is not None:
                log.info("node=%s no longer coordinates volume=%s (now %s)", self.node_id, name, spec.coordinator)
                self._volumes[name].demote()
            if self.node_id in spec.replicas and (self._dir / name).is_dir():
                try:
                    self._claim(spec)  # a follower keeps its copy of the record current too
                except Conflict as err:
                    self._warn(f"claim/{name}", "node=%s volume=%s: %s", self.node_id, name, err)
