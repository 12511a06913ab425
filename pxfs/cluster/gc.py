"""Garbage collection of chunks: mark what every volume and snapshot on this node names, sweep the rest.

Each node collects its own pools. The mark asks the coordinator of every volume this node replicates
for the chunks its block maps and its snapshots name; if any coordinator cannot answer, the round is
abandoned (a partial mark would sweep live data). The sweep deletes only chunks older than the grace
period: a chunk put for a write whose commit is still in flight is young, and a put that finds the
chunk already there refreshes its age (``Pool.touch``), so dedup against a dying chunk is safe too.
A round killed halfway leaves nothing inconsistent: deletes are independent and the next round redoes
the rest.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import trio

from pxfs.cluster import records
from pxfs.cluster.store import ControlStore
from pxfs.errors import PxfsError, Unavailable
from pxfs.model import VolumeInfo

log = logging.getLogger(__name__)


class Collector:
    def __init__(self, node_id: str, store: ControlStore, peers: Any, chunks: Any) -> None:
        self.node_id, self._store, self._peers, self._chunks = node_id, store, peers, chunks
        self._lock = trio.Lock()
        self.last: dict[str, Any] = {}

    async def _refs(self, spec: VolumeInfo) -> set[bytes]:
        try:
            with trio.fail_after(60):
                volumes = await self._peers.volumes(spec.coordinator)
                vol, _info = await volumes.open(spec.name, f"tool:gc-{self.node_id}-{os.getpid()}", True)
                try:
                    return set(await vol.chunk_refs())
                finally:
                    await vol.drop()
        except (PxfsError, trio.TooSlowError) as err:
            raise Unavailable(f"gc on node {self.node_id}", f'volume "{spec.name}" could not be marked '
                              f"(coordinator {spec.coordinator}): {err}; nothing deleted") from None

    async def collect(self, dry_run: bool, grace: float) -> dict[str, Any]:
        async with self._lock:
            start = time.monotonic()
            specs = records.volumes(await self._store.range(records.VOLUME_PREFIX))
            mine = [s for s in specs if self.node_id in s.replicas]
            keep: set[bytes] = set()
            for spec in mine:
                keep |= await self._refs(spec)
            older_than = time.time() - grace
            scanned, deleted, freed = await self._chunks.sweep(keep, older_than, dry_run)
            took = time.monotonic() - start
            self.last = {"node": self.node_id, "volumes": len(mine), "referenced": len(keep), "scanned": scanned,
                         "deleted": deleted, "bytes_freed": freed, "dry_run": dry_run, "grace": grace,
                         "seconds": round(took, 3), "chunks_per_second": round(scanned / took) if took else 0}
            if deleted and not dry_run:
                log.info("node=%s gc: deleted %d of %d chunks (%d bytes) in %.2fs", self.node_id, deleted, scanned,
                         freed, took)
            return self.last

    async def run(self, interval: float, grace: float) -> None:
        if interval <= 0:
            return
        while True:
            await trio.sleep(interval)
            try:
                await self.collect(False, grace)
            except PxfsError as err:
                log.warning("node=%s gc round skipped: %s", self.node_id, err)
