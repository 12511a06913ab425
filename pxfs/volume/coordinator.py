"""The coordinator role: Meta over the volume's keyspace for every mount, acknowledged by the in-sync set.

A mutation returns to the mount only once every in-sync replica holds its batch (``_acknowledge``)
and, for a commit, every chunk it names (``InSync.ensure_chunks``): acknowledged means durable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import trio

from pxfs.cluster import records
from pxfs.cluster.repair import ChunkRepair
from pxfs.errors import Conflict, Invalid, NotFound, PutsExpired, PxfsError, Unavailable
from pxfs.meta import keys, slices, snapshots
from pxfs.meta import maintenance as jobs
from pxfs.meta.fs import Meta, Op
from pxfs.meta.kv import KV, Batch
from pxfs.meta.slices import BlockWrite
from pxfs.model import Attr, Changed, VolumeInfo
from pxfs.observe import metrics
from pxfs.volume import mounts
from pxfs.volume.context import HostContext
from pxfs.volume.insync import MIN_REPLICAS_WAIT, Deposed, InSync
from pxfs.volume.replica import HostedVolume, Served
from pxfs.volume.replicator import Replicator

log = logging.getLogger(__name__)
T = TypeVar("T")

CLONE_DONE = b"cloneDone"
FRESH_WINDOW = 20.0  # longer than a mount's refresh interval
# Keys one Meta call may read and write: a restore step reads up to 2 x STEP_SCAN and writes
# STEP_OPS, a page of the block map is 16384 entries, a purge step 2 x PURGE_BATCH; twice the most.
STEP_KEYS = 1 << 15


class Filling(Unavailable):
    """A new clone is being filled from its snapshot: served once ``done`` is set."""

    def __init__(self, obj: str, cause: str, done: trio.Event) -> None:
        super().__init__(obj, cause)
        self.done = done


class Coordinator(HostContext):
    """The volumes this node coordinates (the record names it, with an epoch)."""

    def _activate(self, spec: VolumeInfo) -> HostedVolume:
        """Become (or stay) the coordinator of ``spec``: Meta open, replicator on the right followers."""
        name = spec.name
        if spec.coordinator != self.node_id:
            raise Conflict(f'volume "{name}"', f"coordinated by node {spec.coordinator}, not {self.node_id}")
        hv = self._claim(spec)
        if hv.epoch > spec.epoch:
            raise Conflict(f'volume "{name}"', f"local epoch {hv.epoch} is newer than the cluster's {spec.epoch}")
        if hv.epoch != spec.epoch:
            hv.demote()
            hv.set_epoch(spec.epoch)
        hv.spec = spec
        if hv.meta is None and spec.source and hv.kv.get(keys.counter_key(CLONE_DONE)) is None:
            raise Filling(f'volume "{name}"', f"being filled from snapshot {spec.source}; retry in a moment",
                          self._start_clone(hv, spec))
        if hv.meta is None:
            hv.meta = Meta(hv.kv, spec.size, spec.block_size, max_inodes=spec.inode_limit)
            # Orphans may still be open in mounts that have not reconnected yet: freed once they have
            # (or their registrations expired), by mounts.tend() in the supervision rounds.
            mounts.defer_purge(hv.meta)
            hv.meta.init_root()
            hv.repair_wanted = True
            log.info("node=%s coordinates volume=%s epoch=%d seq=%d", self.node_id, name, spec.epoch, hv.kv.seq)
        hv.meta.capacity = spec.size
        hv.meta.max_inodes = spec.inode_limit
        if hv.known_replicas and set(spec.replicas) - set(hv.known_replicas):
            # Mounts learn of a new replica only at their next refresh: until then the coordinator
            # itself makes sure what they commit reaches it (see commit()).
            for r in set(spec.replicas) - set(hv.known_replicas):
                hv.fresh_replicas[r] = time.monotonic() + FRESH_WINDOW
        if hv.known_replicas:
            hv.former_replicas |= set(hv.known_replicas) - set(spec.replicas)
        hv.former_replicas -= set(spec.replicas)
        hv.known_replicas = list(spec.replicas)
        followers = [r for r in spec.replicas if r != self.node_id]
        if hv.insync is None or hv.insync.epoch != spec.epoch:
            hv.insync = InSync(name, self.node_id, spec, self._store, self._peers)
        else:
            hv.insync.refresh(spec)
        rep = hv.replicator
        if rep is None or rep.followers != followers or rep.epoch != spec.epoch or rep.deposed:
            if rep is not None:
                rep.stop()
                hv.repair_wanted = True
            if hv.repair is not None:
                # A new replica set is complete only once a repair round has checked it.
                hv.repair.status.converged = False
            hv.converged_round_started = -1.0
            assert self._nursery is not None
            hv.replicator = Replicator(name, hv.kv, spec.epoch, followers, self._peers,
                                       on_caught_up=lambda _f, hv=hv: setattr(hv, "repair_wanted", True),
                                       copy_view=hv.copy_view)
            self._nursery.start_soon(hv.replicator.run)
        hv.replicator.set_in_sync(hv.insync.followers())
        hv.insync.on_change = hv.replicator.set_in_sync
        if hv.repair is None:
            hv.repair = ChunkRepair(name, self._peers, self._repair_rate)
        return hv

    def _start_clone(self, hv: HostedVolume, spec: VolumeInfo) -> trio.Event:
        """Fill a new clone from the source snapshot held on this node (clones share their source's
        replicas, so every replica has it), then mark it done; a half-made clone starts over. The
        copy runs in a worker thread (a snapshot of a million files takes many seconds, which the
        event loop must not wait: heartbeats and every other volume go on); returns its end."""
        if hv.cloned is not None:
            return hv.cloned
        src_volume, _, snap = spec.source.partition("@")
        source = self._volumes.get(src_volume) or self._hosted(src_volume)
        try:
            src_kv = source.snapshot_kv(snap)
        except NotFound:
            raise Unavailable(f'volume "{spec.name}"', f"source snapshot {spec.source} is not on node "
                              f"{self.node_id}") from None
        if hv.kv.seq:
            hv.wipe()
        done = hv.cloned = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._clone, hv, spec, src_kv, done)
        return done

    async def _clone(self, hv: HostedVolume, spec: VolumeInfo, src_kv: KV, done: trio.Event) -> None:
        try:
            # Nothing else writes the keyspace meanwhile: the clone is served by nobody until it is done.
            n = await trio.to_thread.run_sync(snapshots.copy_into, hv.kv, src_kv)
            mark = Batch()
            mark.put(keys.counter_key(CLONE_DONE), keys.encode_u64(1))
            hv.kv.write(mark)
            log.info("volume=%s cloned from %s: %d keys", spec.name, spec.source, n)
        except PxfsError as err:
            log.warning("volume=%s not cloned from %s: %s (tried again at the next open)", spec.name, spec.source,
                        err)
        finally:
            hv.cloned = None
            done.set()

    async def _activated(self, spec: VolumeInfo) -> HostedVolume:
        """``_activate``, waiting first (the loop free) for a new clone to be filled."""
        try:
            return self._activate(spec)
        except Filling as filling:
            await filling.done.wait()
        return self._activate(spec)

    async def open(self, name: str, mount_id: str, http: str = "") -> tuple[Served, VolumeInfo]:
        """Called when a mount opens a volume (or ``VOLUME@SNAPSHOT``) here: this node must coordinate it."""
        volume, _, snap = name.partition("@")
        spec = await self._serving_spec(volume)
        if snap:
            hv = await self._activated(spec)
            hv.snapshot_kv(snap)
            hs = hv.snapshots[snap]
            if hs.meta is None:
                hs.meta = Meta(hs.kv, spec.size, spec.block_size)
            return hs, spec
        name = volume
        if self.node_id not in spec.replicas:
            raise Conflict(f'volume "{name}"', f"node {self.node_id} is not one of its replicas")
        hv = await self._activated(spec)
        await self.keepalive(hv, mount_id, force=True, http=http)
        return hv, spec

    async def call(self, hv: Served, fn: Callable[[Meta], T], changed: Changed | None = None, *,
                   job: bool = False) -> T:
        """Run one Meta operation; if it wrote a batch, return only once the live followers hold it.

        ``changed`` receives the inodes and entries the operation wrote, for the other mounts' caches.
        ``job``: a step of the maintenance job under way (the only calls served while there is one).
        """
        if hv.meta is None:
            raise Unavailable(f'volume "{hv.name}"', f"no longer coordinated by node {self.node_id}; reopen")
        if not job:
            self._not_in_maintenance(hv)
        before, meta = hv.kv.seq, hv.meta
        replays = meta.replays
        hv.changed_keys = [] if changed is not None else None
        touched, started = hv.kv.touched, time.perf_counter()
        try:
            result = fn(meta)  # synchronous: no other operation's batch can land in changed_keys
        finally:
            written, hv.changed_keys = hv.changed_keys, None
            self._weigh(hv, fn, hv.kv.touched - touched, time.perf_counter() - started)
        if changed is not None and written:
            inodes, entries = keys.touched(written)
            changed.inodes |= inodes
            changed.entries |= entries
        # An answer from an op record (a retry) is owed the same guarantee as the first run: the
        # batch that holds it may so far be on this replica only, so wait for the in-sync set too.
        if hv.kv.seq != before or meta.replays != replays:
            with metrics.METADATA_BATCH_SECONDS.labels(hv.name.split("@", 1)[0]).time():
                await self._held_everywhere(hv, hv.kv.seq)
        return result

    async def _held_everywhere(self, hv: Served, seq: int) -> None:
        """This replica's disk and the in-sync followers at once: the slower of the two, not both."""
        failed: list[PxfsError] = []

        async def here() -> None:
            if not isinstance(hv, HostedVolume):
                return  # a snapshot view writes nothing
            try:
                await hv.durable(seq)
            except PxfsError as err:
                failed.append(err)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(here)
            try:
                await self._acknowledge(hv, seq)
            except PxfsError as err:
                failed.append(err)
                nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]

    def _weigh(self, hv: Served, fn: Callable[..., object], touched: int, seconds: float) -> None:
        """Every Meta call holds the node's event loop while it runs: say so when one reads and
        writes more keys than any bounded step does (a page, a purge step, a restore step). Keys,
        not time, are the measure: a loaded machine makes any step slow, only a step that grows
        with the volume touches more keys."""
        if touched <= STEP_KEYS:
            return
        code = getattr(fn, "__code__", None)
        where = f"{fn.__module__}:{code.co_firstlineno}" if code is not None else repr(fn)
        self._warn(f"heavy/{hv.name}", "node=%s volume=%s one call touched %d keys of the keyspace in %.0f ms "
                   "(%s): more than the %d of any bounded step, a step that grows with the volume (issue 13)",
                   self.node_id, hv.name, touched, seconds * 1e3, where, STEP_KEYS)

    async def _acknowledge(self, hv: Served, seq: int) -> None:
        """Return once every in-sync replica holds batch ``seq``, taking the slow ones out of the set
        first; fail (EIO) after MIN_REPLICAS_WAIT when that would leave fewer than min_replicas."""
        rep, insync = hv.replicator, hv.insync
        if rep is None or insync is None:
            return  # a snapshot view writes nothing
        deadline = trio.current_time() + MIN_REPLICAS_WAIT
        while True:
            slow = await rep.wait_acked(seq)
            if rep.deposed:
                hv.demote()
                raise Unavailable(f'volume "{hv.name}"', "this coordinator was deposed by a newer epoch; reopen")
            if not slow:
                return
            try:
                if await insync.shrink(slow, f"did not acknowledge batch {seq}"):
                    return
            except Deposed:
                hv.demote()
                raise
            if trio.current_time() > deadline:
                raise Unavailable(f'volume "{hv.name}"', f"batch {seq} not acknowledged: replica(s) "
                                  f"{','.join(sorted(slow))} do not answer and fewer than min-replicas "
                                  f"{insync.min_replicas} would stay in sync (waited {MIN_REPLICAS_WAIT:g}s)")

    def _not_in_maintenance(self, hv: Served) -> None:
        """Refuse what is not a step of the job under way (pxfs.volume.jobs): the keyspace is a mix."""
        if isinstance(hv, HostedVolume):
            pending = jobs.pending(hv.kv)
            if pending is not None:
                raise Unavailable(f'volume "{hv.name}"', f"{pending.describe()} is under way; the volume is "
                                  "served again once it is finished")

    # -- snapshots -------------------------------------------------------------------------------

    def _volume_only(self, hv: Served) -> HostedVolume:
        if not isinstance(hv, HostedVolume):
            raise Invalid(f'snapshot "{hv.name}"', "is read-only; name the volume itself")
        return hv

    async def snapshot_create(self, hv: Served, name: str) -> None:
        hv = self._volume_only(hv)
        await self.call(hv, lambda m: snapshots.create(m.kv, hv.name, name, time.time_ns()))
        hv.space_due = 0.0

    async def snapshot_delete(self, hv: Served, name: str) -> None:
        hv = self._volume_only(hv)
        source = f"{hv.name}@{name}"
        for v in records.volumes(await self._store.range(records.VOLUME_PREFIX)):
            if v.source == source and not v.clone_done:
                # The clone's coordinator copies the snapshot in when it first activates it; until
                # then the snapshot is the clone's only content.
                raise Invalid(f'snapshot "{source}"', f'clone "{v.name}" has not copied it in yet; '
                              "retry in a moment")
        await self.call(hv, lambda m: snapshots.delete(m.kv, hv.name, name))
        hv.space_due = 0.0

    async def snapshot_list(self, hv: Served) -> list[tuple[str, int]]:
        return snapshots.listing(self._volume_only(hv).kv)

    async def detach(self, hv: HostedVolume, mount_id: str) -> None:
        hv.mounts.pop(mount_id, None)
        hv.heard.pop(mount_id, None)
        await self._store.delete(f"mounts/{hv.name}/{mount_id}")

    async def commit(self, hv: Served, ino: int, blocks: Mapping[int, BlockWrite], size: int,
                     mtime_ns: int | None, changed: Changed | None = None, held: set[str] | None = None,
                     op: Op | None = None, put_age: float = 0.0) -> Attr:
        insync = hv.insync
        hashes = [h for w in blocks.values() for h in slices.hashes(w.slices)]
        started = time.monotonic() - put_age
        if insync is not None and hashes and hv.meta is not None:
            hv.meta.commit_blocks(ino, blocks, size, mtime_ns, dry_run=True, op=op)  # a bad commit costs no copies
            # Before the block map names the chunks: every in-sync replica holds them, or leaves the set.
            try:
                await insync.ensure_chunks(hashes, held or set())
            except Deposed:
                hv.demote()
                raise
        if hashes and time.monotonic() - started > self.commit_window:
            # Collection counts on it: no chunk is named later than the window after its put.
            raise PutsExpired(f"inode {ino}", f"chunks put {time.monotonic() - started:.0f} s ago, longer than "
                              f"the commit window of {self.commit_window:g} s: put them again")
        attr = await self.call(hv, lambda m: m.commit_blocks(ino, blocks, size, mtime_ns, op=op), changed)
        now = time.monotonic()
        fresh = [r for r, until in hv.fresh_replicas.items() if until > now]
        if fresh and blocks:
            await self._complete_on(hv, fresh, hashes)
        return attr

    async def cut_ahead(self, hv: Served, ino: int, size: int, changed: Changed | None = None) -> None:
        """Before a truncate: the blocks it drops beyond one batch's worth go first, in bounded
        replicated batches (``Meta.cut_ahead``), so that the truncate itself stays one small batch."""
        while await self.call(hv, lambda m: m.cut_ahead(ino, size), changed):
            pass

    async def _complete_on(self, hv: HostedVolume, nodes: list[str], hashes: list[bytes]) -> None:
        """Copy any of ``hashes`` that ``nodes`` lack from another replica (best effort: repair follows)."""
        assert hv.spec is not None and hv.insync is not None
        for node in nodes:
            try:
                have = await (await self._peers.chunks(node)).has_many(hashes)
            except PxfsError as err:
                log.info("volume=%s new replica %s not completed inline: %s", hv.name, node, err)
                continue
            todo = [h for h, ok in zip(hashes, have, strict=True) if not ok]
            sources = [r for r in hv.spec.replicas if r != node]
            if todo:
                await hv.insync.copy_to(node, todo, dict.fromkeys(todo, sources))

    async def keepalive(self, hv: HostedVolume, mount_id: str, force: bool = False, http: str = "") -> None:
        """Renew the mount's registration (what orphan purges and forgetting wait for), at most every
        3 s. The coordinator remembers when it heard each mount, so a store that was unreachable
        for a while cannot make its mounts look silent (see ``mounts.forget_silent``)."""
        if mount_id.startswith("tool:"):
            return  # scrub, fsck and test verifiers are sessions, not mounts
        now = time.time()
        hv.heard[mount_id] = now
        if force or now - hv.mounts.get(mount_id, 0) > 3:
            try:
                await self._store.put(f"mounts/{hv.name}/{mount_id}", records.encode_mount(now, self.node_id, http))
            except Unavailable as err:
                self._warn(f"keepalive/{hv.name}", "node=%s volume=%s: mount registrations not renewed: %s",
                           self.node_id, hv.name, err)
                return
            hv.mounts[mount_id] = now

    async def request_repair(self, name: str) -> None:
        spec = await self._spec(name)
        hv = self._activate(spec)
        hv.repair_wanted = True
