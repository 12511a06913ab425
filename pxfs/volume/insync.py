"""The coordinator's side of a volume's in-sync set: who must hold a write before it is acknowledged.

The volume's record names, with the epoch, the replicas known to hold every acknowledged batch and
chunk (``in_sync``); only they may be elected coordinator. So a mutation is acknowledged only once
every member holds it, and a member that is slow, down or missed a chunk is first taken out of the
set with a compare-and-swap on the record (which also proves this node still coordinates at its
epoch); only then may the coordinator acknowledge without it. A removal that would leave fewer than
``min_replicas`` members is not made: the write waits, and fails after ``MIN_REPLICAS_WAIT``.

A replica rejoins once it holds every batch (the replicator caught it up) and every chunk: a repair
round that began after its last missed chunk found it complete, and every commit since named it
among the replicas that stored the commit's chunks. It is added locally first, so that from that
moment acknowledgements wait for it, and then in the record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from pxfs.cluster import records
from pxfs.cluster.peers import Peers
from pxfs.cluster.store import ControlStore
from pxfs.errors import Conflict, Invalid, NotFound, PxfsError, Unavailable
from pxfs.model import VolumeInfo

log = logging.getLogger(__name__)

MIN_REPLICAS_WAIT = 30.0  # a write that cannot keep min_replicas in sync fails (EIO) after this long
CHUNK_CHECK_TIMEOUT = 3.0  # asking a replica for / copying to it the chunks of one commit
REJOIN_LAG = 256  # batches a replica may still be behind when its rejoin starts (it must then catch up)


class _TooFew(Exception):
    pass


class Deposed(Unavailable):
    """The record names another coordinator or a newer epoch: this node must stop acknowledging."""


class InSync:
    def __init__(self, volume: str, node_id: str, spec: VolumeInfo, store: ControlStore, peers: Peers) -> None:
        self.volume, self.node_id = volume, node_id
        self.epoch = spec.epoch
        self.members: set[str] = set(spec.in_sync) | {node_id}
        self.replicas = list(spec.replicas)
        self.min_replicas = spec.min_replicas
        self.missed_at: dict[str, float] = {}  # replica -> when it last missed a batch or a chunk
        self._store, self._peers = store, peers
        self._lock = trio.Lock()
        self.on_change: Callable[[set[str]], None] | None = None  # the replicator follows the set

    def followers(self) -> set[str]:
        return self.members - {self.node_id}

    def refresh(self, spec: VolumeInfo) -> None:
        """The record as the supervision round read it (replicas may have changed)."""
        self.replicas = list(spec.replicas)
        self.min_replicas = spec.min_replicas
        gone = self.members - set(spec.replicas)
        if gone:
            self._set(self.members - gone)

    def _set(self, members: set[str]) -> None:
        self.members = members | {self.node_id}
        if self.on_change is not None:
            self.on_change(self.followers())

    async def update(self, change: Callable[[VolumeInfo], None]) -> VolumeInfo:
        """Change the volume's record by compare-and-swap, only while it names us at our epoch."""
        key = records.volume_key(self.volume)
        for _ in range(20):
            raw = await self._store.get(key)
            if raw is None:
                raise Deposed(f'volume "{self.volume}"', "its record is gone from the control store")
            spec = records.decode_volume(key, raw)
            if spec.coordinator != self.node_id or spec.epoch != self.epoch:
                raise Deposed(f'volume "{self.volume}"', f"coordinated by {spec.coordinator} at epoch {spec.epoch} "
                              f"now, not by {self.node_id} at {self.epoch}; reopen")
            change(spec)
            if await self._store.cas(key, raw, records.encode_volume(spec)):
                return spec
        raise Conflict(f'volume "{self.volume}"', "record changed concurrently too often")

    async def shrink(self, nodes: set[str], why: str) -> bool:
        """Take ``nodes`` out of the in-sync set; False (nothing changed) if that leaves too few."""
        async with self._lock:
            nodes = (nodes & self.members) - {self.node_id}
            now = time.monotonic()
            for n in nodes:
                self.missed_at[n] = now
            if not nodes:
                return True
            if len(self.members - nodes) < self.min_replicas:
                return False

            def change(s: VolumeInfo) -> None:
                s.in_sync = [r for r in s.in_sync if r not in nodes]
                if len(s.in_sync) < s.min_replicas:
                    raise _TooFew

            try:
                spec = await self.update(change)
            except _TooFew:
                return False
            self._set(set(spec.in_sync))
            log.warning("volume=%s replica(s) %s out of the in-sync set (%s): %s", self.volume,
                        ",".join(sorted(nodes)), ",".join(sorted(self.members)), why)
            return True

    def missed(self, nodes: set[str]) -> None:
        """Replicas outside the set that missed a chunk: a rejoin must wait for a later repair round."""
        now = time.monotonic()
        for n in nodes:
            self.missed_at[n] = now

    async def ensure_chunks(self, hashes: list[bytes], held: set[str]) -> None:
        """Before a commit naming ``hashes`` is acknowledged: every member holds them (copied from a
        replica that does if needed) or is out of the set. ``held``: who stored them, per the mount."""
        if not hashes:
            return
        self.missed(set(self.replicas) - self.members - held)
        ask = sorted(self.members - held)
        if not ask:
            return
        wanted = list(dict.fromkeys(hashes))
        lacking: dict[str, list[bytes]] = {}
        holders: dict[bytes, list[str]] = {h: sorted(held) for h in wanted}
        for node in ask:
            try:
                with trio.fail_after(CHUNK_CHECK_TIMEOUT):
                    have = await (await self._peers.chunks(node)).has_many(wanted)
            except (PxfsError, trio.TooSlowError):
                lacking[node] = wanted
                continue
            lacking[node] = [h for h, ok in zip(wanted, have, strict=True) if not ok]
            for h, ok in zip(wanted, have, strict=True):
                if ok:
                    holders[h].append(node)
        lost = [h for h in wanted if not holders[h]]
        if lost and all(n in lacking and len(lacking[n]) == len(wanted) for n in ask) and not held:
            # Nobody could even be asked: the commit cannot be judged, so it is not acknowledged.
            raise Unavailable(f'volume "{self.volume}"', "no replica could be asked for the chunks of the commit")
        if lost:
            # Named by the mount but stored nowhere: its own mistake (or a hostile commit), which must
            # not cost the replicas their place in the set.
            raise Invalid(f'volume "{self.volume}"', f"commit names chunk {lost[0].hex()[:16]} that no replica stores")
        failed: set[str] = set()
        for node, todo in lacking.items():
            if todo and not await self.copy_to(node, todo, holders):
                failed.add(node)
        if self.node_id in failed:
            raise Unavailable(f'volume "{self.volume}"', f"coordinator {self.node_id} could not store the chunks "
                              "of the commit")
        if failed and not await self.shrink(failed, "missed chunks of a commit"):
            raise Unavailable(f'volume "{self.volume}"', f"replica(s) {','.join(sorted(failed))} lack chunks of the "
                              f"commit and only {len(self.members) - len(failed)} in-sync replica(s) would remain "
                              f"(min-replicas {self.min_replicas})")

    async def copy_to(self, node: str, todo: list[bytes], holders: dict[bytes, list[str]]) -> bool:
        with trio.move_on_after(CHUNK_CHECK_TIMEOUT):
            try:
                dest = await self._peers.chunks(node)
                for h in todo:
                    for src in holders[h]:
                        try:
                            data = await (await self._peers.chunks(src)).get(h)
                        except (NotFound, Unavailable):
                            continue
                        await dest.put(h, data)
                        break
                    else:
                        return False
                return True
            except PxfsError as err:
                log.info("volume=%s replica %s not completed inline: %s", self.volume, node, err)
                return False
        return False

    async def rejoin(self, node: str, acked: Callable[[], int | None], seq: Callable[[], int],
                     reach: Callable[[int], Awaitable[bool]], converged_round_started: float) -> bool:
        """Add ``node`` back if it holds every batch and every chunk; True when it did.

        ``reach(seq)`` waits (bounded) until the node holds batch ``seq``.
        """
        if node in self.members or node not in self.replicas:
            return False
        if self.missed_at.get(node, 0.0) >= converged_round_started:
            return False
        a = acked()
        if a is None or seq() - a > REJOIN_LAG:
            return False
        async with self._lock:
            self._set(self.members | {node})  # from here on, acknowledgements wait for it
            target = seq()  # ... and it must hold every batch up to here before the record says so
            if not await reach(target) or self.missed_at.get(node, 0.0) >= converged_round_started:
                self._set(self.members - {node})
                return False

            def change(s: VolumeInfo) -> None:
                if node in s.replicas and node not in s.in_sync:
                    s.in_sync.append(node)

            try:
                spec = await self.update(change)
            except PxfsError:
                self._set(self.members - {node})
                raise
            self._set(set(spec.in_sync))
            log.warning("volume=%s replica %s caught up and rejoined the in-sync set (%s)", self.volume, node,
                        ",".join(sorted(self.members)))
            return True
