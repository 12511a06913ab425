"""Garbage collection of chunks: mark what every volume and snapshot on this node names, sweep the rest.

Each node collects its own pools. The mark asks the coordinator of every volume this node replicates
for the chunks its block maps and its snapshots name; if any coordinator cannot answer, the round is
abandoned (a partial mark would sweep live data). So is it when this node holds a copy of a volume
the store has no record of (and no tombstone for): its chunks are named only by that copy, and a
missing record is no proof of deletion. No round runs on a store the node's guard refuses. The sweep
deletes only chunks older than the grace
period: a chunk put for a write whose commit is still in flight is young, and a put that finds the
chunk already there refreshes its age (``Pool.touch``), so dedup against a dying chunk is safe too.
A round killed halfway leaves nothing inconsistent: deletes are independent and the next round redoes
the rest.

Why the grace suffices: coordinators refuse a commit more than the commit window after its puts
began (``PutsExpired``), so a chunk that a commit names after this round's mark was put at most a
window before that commit, i.e. after mark start minus a window. The sweep stops at mark start plus
the grace minus the window (the sweep's ``until``): by then such a chunk is still younger than the grace.

When: every ``interval`` seconds, and sooner when woken: a put found no room (a full pool collects
at once, as far as the grace allows), or this node stored a tenth of its capacity since the last
round, or 64 MiB (replaced blocks and merged slices are garbage from the moment their commit lands).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import trio

from pxfs.cluster import records
from pxfs.cluster.config import COMMIT_WINDOW, check_gc_grace
from pxfs.cluster.store import ControlStore
from pxfs.errors import PxfsError, Unavailable
from pxfs.model import VolumeInfo

log = logging.getLogger(__name__)

SWEEP_SLACK = 5.0  # seconds of clock and message delay the sweep's deadline leaves
ROUND_SPACING = 10.0  # seconds between automatic rounds at least, however often woken
STORED_WAKE = 64 << 20


class Collector:
    def __init__(self, node_id: str, store: ControlStore, peers: Any, chunks: Any,
                 held: Callable[[], dict[str, str]] = dict, guard: Any = None, window: float = COMMIT_WINDOW) -> None:
        self.node_id, self._store, self._peers, self._chunks = node_id, store, peers, chunks
        self._held, self._guard = held, guard  # VolumeHost.held, StoreGuard
        self._window = window
        self._lock = trio.Lock()
        self.last: dict[str, Any] = {}
        self._woken = trio.Event()
        self._why = ""
        self._stored = 0  # bytes of new chunks since the last round

    def wake(self, why: str) -> None:
        """Start an automatic round now (if rounds run at all) rather than at the next interval."""
        if not self._woken.is_set():
            self._why = why
            self._woken.set()

    def added(self, n: int, capacity: int) -> None:
        """A put stored ``n`` new bytes; past STORED_WAKE (or a tenth of the node's capacity), a round
        is due: overwrites make garbage as fast as they store."""
        self._stored += n
        if self._stored > min(STORED_WAKE, max(1, capacity // 10)):
            self.wake(f"{self._stored} bytes stored since the last round")

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

    def _check_held(self, specs: dict[str, VolumeInfo], deleted: dict[str, set[str]]) -> None:
        for name, uid in self._held().items():
            if uid and uid in deleted.get(name, set()):
                continue  # deleted: its copy goes, and so may the chunks only it named
            spec = specs.get(name)
            if spec is None:
                raise Unavailable(f"gc on node {self.node_id}", f'volume "{name}" is held here but has no record: '
                                  'nothing deleted (run "pxfs cluster recover")')
            if uid and spec.uid != uid:
                raise Unavailable(f"gc on node {self.node_id}", f'volume "{name}": the copy held here is uid {uid}, '
                                  f"the record names uid {spec.uid}: nothing deleted")

    async def collect(self, dry_run: bool, grace: float) -> dict[str, Any]:
        # Whoever asks: a shorter grace could sweep a chunk whose commit is still on its way.
        check_gc_grace(grace, f"gc on node {self.node_id} with grace {grace:g} s", self._window)
        async with self._lock:
            start = time.monotonic()
            if self._guard is not None:
                await self._guard.require("gc")
            specs = records.volumes(await self._store.range(records.VOLUME_PREFIX))
            self._check_held({s.name: s for s in specs},
                             records.tombstones(await self._store.range(records.TOMBSTONE_PREFIX)))
            mine = [s for s in specs if self.node_id in s.replicas]
            self._stored = 0
            marked = time.time()
            keep: set[bytes] = set()
            for spec in mine:
                keep |= await self._refs(spec)
            older_than = time.time() - grace
            until = marked + grace - self._window - SWEEP_SLACK
            if time.time() >= until:
                raise Unavailable(f"gc on node {self.node_id}", f"the mark took {time.time() - marked:.0f} s, "
                                  f"past the {grace - self._window - SWEEP_SLACK:.0f} s the grace allows a round; "
                                  "nothing deleted (use a longer grace)")
            scanned, deleted, freed = await self._chunks.sweep(keep, older_than, dry_run, until)
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
        last = trio.current_time()
        while True:
            with trio.move_on_at(last + interval):
                await self._woken.wait()
                # Not more often than every ROUND_SPACING: a full pool stays full until chunks age.
                await trio.sleep_until(last + min(interval, ROUND_SPACING))
                log.info("node=%s gc round early: %s", self.node_id, self._why)
            self._woken = trio.Event()
            last = trio.current_time()
            try:
                await self.collect(False, grace)
            except PxfsError as err:
                log.warning("node=%s gc round skipped: %s", self.node_id, err)
