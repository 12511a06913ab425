"""The cluster manager: on the seed next to the embedded control store, or with etcd on whichever
node holds the manager election (so any node may die: another takes the election once the lease of
the dead one expires, and goes on from the records in the store).

Once a second it compares every volume's record with node liveness and acts:
* **failover**: the coordinator has been down for ``failover_after`` seconds (or was removed): the
  live *in-sync* replica holding the most batches becomes coordinator under epoch + 1. Only an
  in-sync replica holds every acknowledged batch and chunk; when none is live the volume waits (see
  ``ClusterAdmin._waiting``) until one returns or an operator runs ``pxfs volume promote``.
  Followers refuse batches from older epochs, so the old coordinator cannot get a write
  acknowledged again.
* **replacement**: a follower down for ``replace_after`` seconds, or removed by an operator, is
  replaced by a node chosen by the placement rules; the coordinator then ships it the metadata log
  and copies the chunks (repair).
* **replication factor**: fewer replicas than ``repl`` (``ha-update`` up) get new ones; more
  (``ha-update`` down) lose followers, down ones first.
pxfs grows no consensus of its own: the control store's compare-and-swap orders these changes, so
even two nodes that both believe they lead for a moment (a lease expiring mid-round) cannot
interleave a change: each one is made only if the record is still the one it was computed from.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import trio

from pxfs.cluster import placement, records
from pxfs.cluster.store import ControlStore, Election
from pxfs.cluster.wakeup import Wakeup
from pxfs.errors import PxfsError
from pxfs.model import NodeInfo, VolumeInfo

log = logging.getLogger(__name__)


@dataclass
class Settings:
    failover_after: float = 2.0      # seconds a coordinator is down (after the 3 s heartbeat window)
    replace_after: float = 600.0     # seconds a follower is down before its replica is re-created elsewhere
    startup_grace: float = 6.0       # after the seed starts, nodes need a heartbeat or two to show up
    interval: float = 1.0


class Manager:
    def __init__(self, store: ControlStore, admin: Any, peers: Any, settings: Settings) -> None:
        self._store, self._admin, self._peers, self.settings = store, admin, peers, settings
        self._down_since: dict[str, float] = {}
        self._started = time.monotonic()
        self.guard: Any = None  # pxfs.cluster.guard.StoreGuard: no failover on a store it refuses
        self.election: Election | None = None  # None: this node always runs it (the embedded seed)
        self.wakeup: Wakeup | None = None  # a store that watches: a round as soon as a node goes down

    async def run(self) -> None:
        while True:
            if self.wakeup is not None:
                await self.wakeup.sleep(self.settings.interval)
            else:
                await trio.sleep(self.settings.interval)
            if time.monotonic() - self._started < self.settings.startup_grace:
                continue
            try:
                if self.guard is not None and await self.guard.check():
                    # The guard logged why; re-placing volumes on its say-so could lose them. Nor may
                    # this node hold the election meanwhile: a node that accepts the store would manage.
                    if self.election is not None:
                        await self.election.resign()
                    continue
                if self.election is not None and not await self.election.lead():
                    # Another node manages. What this one saw go down is stale by the time it leads:
                    # it counts down time again from its own first round.
                    self._down_since.clear()
                    continue
                await self.round()
            except PxfsError as err:
                log.warning("manager round failed: %s", err)

    async def removed(self) -> set[str]:
        return {k.removeprefix("removed/") for k, _ in await self._store.range("removed/")}

    async def round(self) -> None:
        nodes = await self._store.liveness()
        now = time.monotonic()
        for n in nodes:
            if n.state == "up":
                self._down_since.pop(n.id, None)
            else:
                self._down_since.setdefault(n.id, now)
        removed = await self.removed()
        gone = {n.id for n in nodes if n.state != "up"} | removed

        def down_for(node: str) -> float:
            if node in removed:
                return float("inf")
            since = self._down_since.get(node)
            return now - since if since is not None else (0.0 if node in {n.id for n in nodes} else float("inf"))

        for spec in records.volumes(await self._store.range(records.VOLUME_PREFIX)):
            if down_for(spec.coordinator) >= self.settings.failover_after:
                await self._failover(spec, gone)
                continue
            stale = [r for r in spec.replicas if r != spec.coordinator
                     and down_for(r) >= self.settings.replace_after]
            if stale or len(spec.replicas) != spec.repl:
                await self._reshape(spec, nodes, stale, removed)

    async def _failover(self, spec: VolumeInfo, gone: set[str]) -> None:
        best: tuple[int, str] | None = None
        for r in spec.replicas:
            if r == spec.coordinator or r in gone or r not in spec.in_sync:
                continue
            try:
                with trio.fail_after(5):
                    seq, _epoch, _h = await self._peers.last_seq(r, spec.name)
            except (PxfsError, trio.TooSlowError) as err:
                log.info("volume=%s failover: replica %s not answering: %s", spec.name, r, err)
                continue
            if best is None or seq > best[0]:
                best = (seq, r)
        if best is None:
            log.warning("volume=%s coordinator %s is down and no other in-sync replica (%s) is live: waiting",
                        spec.name, spec.coordinator, ",".join(spec.in_sync))
            return
        old, epoch = spec.coordinator, spec.epoch

        def change(s: VolumeInfo) -> None:
            # Only if nothing moved meanwhile: the coordinator may have shrunk the in-sync set.
            if s.coordinator == old and s.epoch == epoch and best[1] in s.in_sync:
                s.coordinator = best[1]
                s.epoch += 1
                # The down members (the old coordinator first) leave the set with the same swap: the
                # new coordinator would otherwise hold its first write for the 5 s acknowledgement
                # timeout of each. Dropping a member never breaks "in sync holds every acknowledged
                # batch"; it rejoins once caught up. Kept when min_replicas forbids it.
                live = [r for r in s.in_sync if r not in gone]
                if len(live) >= s.min_replicas:
                    s.in_sync = live

        new = await self._admin.update_volume(spec.name, change)
        log.warning("volume=%s failover: coordinator %s -> %s (seq %d), epoch %d", spec.name, old, new.coordinator,
                    best[0], new.epoch)

    async def _reshape(self, spec: VolumeInfo, nodes: list[NodeInfo], stale: list[str], removed: set[str]) -> None:
        keep = [r for r in spec.replicas if r not in stale]
        live = {n.id for n in nodes if n.state == "up"}
        if len(keep) > spec.repl:
            # Lower the replication factor: drop followers, down ones first, never the coordinator.
            followers = sorted((r for r in keep if r != spec.coordinator),
                               key=lambda r: (r in live, r in spec.in_sync, r))
            keep = [r for r in keep if r not in followers[:len(keep) - spec.repl]]
        need = spec.repl - len(keep)
        added: list[str] = []
        if need > 0:
            committed = await self._admin._committed(skip=spec.name)
            candidates = [n for n in nodes if n.id not in removed]
            try:
                added = placement.place(spec.name, candidates, need, spec.size, committed,
                                        exclude=frozenset(spec.replicas), zones_taken=self._zones(nodes, keep),
                                        avoid=frozenset(n.id for n in nodes if n.seed))
            except PxfsError as err:
                log.warning("volume=%s cannot place %d new replica(s): %s", spec.name, need, err)
                if not stale and len(keep) == len(spec.replicas):
                    return
        target = keep + added
        if target == spec.replicas:
            return
        if not any(r in spec.in_sync for r in target):
            log.warning("volume=%s would keep no in-sync replica of %s: not reshaped", spec.name,
                        ",".join(spec.in_sync))
            return

        def change(s: VolumeInfo) -> None:
            if s.replicas == spec.replicas:
                s.replicas = list(target)
                # New replicas join the in-sync set only once their coordinator has caught them up.
                s.in_sync = [r for r in s.in_sync if r in target]

        await self._admin.update_volume(spec.name, change)
        log.warning("volume=%s replicas %s -> %s", spec.name, ",".join(spec.replicas), ",".join(target))

    @staticmethod
    def _zones(nodes: list[NodeInfo], ids: list[str]) -> set[str]:
        by_id = {n.id: n for n in nodes}
        return {by_id[i].labels.get("zone", f"node:{i}") for i in ids if i in by_id}
