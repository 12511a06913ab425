"""The follower role: apply the coordinator's batches in order, fenced by the token the store issued."""

from __future__ import annotations

import logging

import blake3
import trio

from pxfs.cluster.admin import check_volume_name
from pxfs.errors import Conflict, NotFound
from pxfs.volume.context import HostContext
from pxfs.volume.replica import HostedVolume
from pxfs.volume.replicator import LOADING

log = logging.getLogger(__name__)


class Follower(HostContext):
    """The volumes this node replicates for another node's coordinator."""

    async def _follower(self, name: str, epoch: int, peer: str) -> HostedVolume:
        """The replication calls come only from the volume's current coordinator, at its epoch.

        A stale or misdirected peer (a deposed coordinator, a node that lost track) must neither
        write into a replica nor bump its epoch: the control store says who may. Every batch is
        checked against the fencing token this replica holds, (coordinator, epoch) as the store last
        issued it (refreshed by every supervision round); a token it does not hold is looked up in
        the store, never taken from the sender. A coordinator deposed since the last refresh cannot
        get a write acknowledged through this: it would first have to take the new coordinator (an
        in-sync replica that refuses its epoch) out of the in-sync set, and its compare-and-swap on
        the record fails.
        """
        check_volume_name(name)
        hv = self._volumes.get(name)
        if hv is not None and hv.token == (peer, epoch) and peer != self.node_id:
            return hv
        spec = await self._spec(name)
        if self.node_id not in spec.replicas:
            raise NotFound(f'volume "{name}"', f"node {self.node_id} is not one of its replicas")
        hv = self._claim(spec)
        hv.token = (spec.coordinator, spec.epoch)
        if peer != spec.coordinator or epoch != spec.epoch:
            raise Conflict(f'volume "{name}"', f"replication from {peer or '?'} at epoch {epoch} refused: the "
                           f"coordinator is {spec.coordinator} at epoch {spec.epoch}")
        if spec.coordinator == self.node_id:
            raise Conflict(f'volume "{name}"', f"node {self.node_id} coordinates it and takes no batches")
        return hv

    async def apply(self, name: str, epoch: int, seq: int, batch: bytes, peer: str) -> int:
        """Apply batch ``seq`` from the coordinator of ``epoch``; returns this replica's seq after it."""
        return await self.apply_many(name, epoch, seq, [batch], peer)

    async def apply_many(self, name: str, epoch: int, first: int, batches: list[bytes], peer: str,
                         trimmed: int = 0) -> int:
        """Apply batches ``first``, ``first + 1``, ... in order (a catching-up follower gets many at once),
        then drop the log entries up to ``trimmed``, which the coordinator dropped from its log."""
        hv = await self._follower(name, epoch, peer)
        async with hv.lock:
            if epoch < hv.epoch:
                raise Conflict(f'volume "{name}"', f"batch from epoch {epoch} refused: this replica is at "
                               f"epoch {hv.epoch}")
            if epoch > hv.epoch:
                if hv.meta is not None:
                    log.info("node=%s deposed as coordinator of volume=%s by epoch %d", self.node_id, name, epoch)
                hv.demote()
                hv.set_epoch(epoch)
            for seq, batch in enumerate(batches, first):
                if seq == hv.kv.seq + 1:
                    hv.kv.apply(seq, batch)
                    # A follower catching up gets up to GROUP_BATCHES batches in one call: one loop
                    # step each, not one for all (a clone's copy, 40 batches of 2048 keys, held it 400 ms).
                    await trio.lowlevel.checkpoint()
                elif seq <= hv.kv.seq:
                    ours = hv.kv.log_entry(seq)
                    if ours is not None and ours != batch:
                        raise Conflict(f'volume "{name}"', f"batch {seq} differs from the one this replica holds")
                else:
                    break  # a gap: the coordinator resends from our seq
            if trimmed:
                hv.kv.trim_to(trimmed)  # never our newest entry: it names our history
            seq = hv.kv.seq
        # Held means on disk; outside the lock, so that batches arriving meanwhile share the sync.
        await hv.durable(seq)
        return seq

    async def last_seq(self, name: str) -> tuple[int, int, bytes]:
        check_volume_name(name)
        spec = await self._spec(name)
        if self.node_id not in spec.replicas:
            raise NotFound(f'volume "{name}"', f"node {self.node_id} is not one of its replicas")
        hv = self._claim(spec)
        if hv.kv.loading:
            return 0, hv.epoch, LOADING  # half a full copy: the coordinator resets it and starts over
        last = hv.kv.log_entry(hv.kv.seq) if hv.kv.seq else None
        return hv.kv.seq, hv.epoch, blake3.blake3(last).digest() if last is not None else b""

    async def load(self, name: str, epoch: int, snapshot: str, items: list[tuple[bytes, bytes]], seq: int,
                   last_batch: bytes, peer: str) -> None:
        """One part of a full copy from the coordinator of ``epoch`` (``pxfs.volume.transfer``)."""
        hv = await self._follower(name, epoch, peer)
        async with hv.lock:
            if epoch != hv.epoch:
                raise Conflict(f'volume "{name}"', f"full copy from epoch {epoch} refused: this replica is at "
                               f"epoch {hv.epoch} (a copy follows a reset at its epoch)")
            hv.load_part(snapshot, items, seq, last_batch)
            if seq and not snapshot:
                log.info("node=%s volume=%s: full copy loaded, at seq %d", self.node_id, name, seq)

    async def reset(self, name: str, epoch: int, peer: str) -> None:
        hv = await self._follower(name, epoch, peer)
        async with hv.lock:
            if epoch < hv.epoch:
                raise Conflict(f'volume "{name}"', f"reset from epoch {epoch} refused (at {hv.epoch})")
            log.warning("node=%s volume=%s: copy diverged from the coordinator's, starting over", self.node_id, name)
            hv.wipe()
            hv.set_epoch(epoch)
