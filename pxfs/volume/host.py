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

from pxfs.cluster import records
from pxfs.cluster.admin import VOLUME_NAME, check_volume_name
from pxfs.cluster.repair import ChunkRepair
from pxfs.cluster.store import ControlStore
from pxfs.errors import Conflict, Invalid, NotFound, PxfsError, Unavailable
from pxfs.meta import keys, snapshots
from pxfs.meta.fs import Meta, Op
from pxfs.meta.fsck import fsck
from pxfs.meta.kv import Batch, RocksKV
from pxfs.model import Changed, VolumeInfo
from pxfs.volume import mounts
from pxfs.volume.insync import MIN_REPLICAS_WAIT, REJOIN_LAG, Deposed, InSync
from pxfs.volume.replicator import Replicator

log = logging.getLogger(__name__)
T = TypeVar("T")

SUPERVISE_INTERVAL = 1.0
CLONE_DONE = b"cloneDone"
REPAIR_PERIOD = 60.0
SPACE_PERIOD = 30.0
FRESH_WINDOW = 20.0  # longer than a mount's refresh interval
WARN_EVERY = 60.0


class HostedVolume:
    """One volume's keyspace on this node, and, when this node coordinates it, its Meta."""

    def __init__(self, name: str, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.path = path
        self.snapshots: dict[str, HostedSnapshot] = {}
        self.kv = self._open_kv()
        self.epoch = self._read_epoch()
        # The record this copy belongs to, as this node last saw it: its uid decides what may delete it.
        self.local: VolumeInfo | None = records.read_local_spec(path)
        self.meta: Meta | None = None
        self.replicator: Replicator | None = None
        self.insync: InSync | None = None
        # The fencing token this replica follows: (coordinator, epoch) as the store last said.
        self.token: tuple[str, int] | None = None
        self.converged_round_started = -1.0  # when the last repair round that found all complete began
        self.repair: ChunkRepair | None = None
        self.repair_wanted = True
        self.repair_running = False
        self.last_repair = 0.0
        self.repair_asked = 0.0
        self.repair_not_before = 0.0
        self.space_due = 0.0
        self.known_replicas: list[str] = []
        self.former_replicas: set[str] = set()  # repair sources until a round converges without them
        self.fresh_replicas: dict[str, float] = {}
        self.space: dict[str, Any] = {}
        self.snap_due = 0.0
        self.spec: VolumeInfo | None = None
        self.mounts: dict[str, float] = {}
        self.lock = trio.Lock()  # serialises apply() of batches arriving from the coordinator
        self.changed_keys: list[bytes] | None = None  # keys written by the operation VolumeHost.call runs
        # mount id -> its Volume server, which holds the mount's Watcher (capnp thread only)
        self.watchers: dict[str, Any] = {}

    def _open_kv(self) -> RocksKV:
        kv = RocksKV(str(self.path / "meta"))
        kv.after_commit = self._after_commit
        return kv

    def _after_commit(self, seq: int, batch: Batch) -> None:
        if self.changed_keys is not None:
            self.changed_keys.extend(k for k, _ in batch.ops)
        for name, created in snapshots.changed_names(batch):
            where = self.path / "snapshots" / name
            self.close_snapshot(name)
            shutil.rmtree(where, ignore_errors=True)
            if created:
                where.parent.mkdir(exist_ok=True)
                self.kv.checkpoint(str(where))
                log.info("volume=%s snapshot=%s taken at seq %d", self.name, name, seq)

    def snapshot_kv(self, name: str) -> RocksKV:
        hs = self.snapshots.get(name)
        if hs is None:
            where = self.path / "snapshots" / name
            if self.kv.get(keys.snapshot_key(name)) is None or not where.exists():
                raise NotFound(f'snapshot "{self.name}@{name}"', "no such snapshot")
            hs = self.snapshots[name] = HostedSnapshot(f"{self.name}@{name}", RocksKV(str(where)))
        return hs.kv

    def close_snapshot(self, name: str) -> None:
        hs = self.snapshots.pop(name, None)
        if hs is not None:
            hs.kv.close()

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
        self.insync = None
        if self.replicator is not None:
            self.replicator.stop()
            self.replicator = None

    def wipe(self) -> None:
        """Start this replica's copy over (it diverged); the coordinator resends the whole log.

        The old copy is moved aside, never deleted: it holds only batches no in-sync replica
        acknowledged, but an operator who promoted a replica with --accept-data-loss may want them.
        """
        self.demote()
        self.kv.close()
        for name in list(self.snapshots):
            self.close_snapshot(name)
        aside = self.path / "diverged"
        shutil.rmtree(aside, ignore_errors=True)  # only the newest diverged copy is kept
        aside.mkdir()
        for part in ("meta", "snapshots"):
            if (self.path / part).exists():
                (self.path / part).rename(aside / part)
        self.kv = self._open_kv()

    def close(self) -> None:
        self.demote()
        for name in list(self.snapshots):
            self.close_snapshot(name)
        self.kv.close()


class HostedSnapshot:
    """A read-only view of one snapshot, served to mounts of ``VOLUME@NAME`` by the coordinator."""

    def __init__(self, name: str, kv: RocksKV) -> None:
        self.name = name
        self.kv = kv
        self.meta: Meta | None = None
        self.replicator: Replicator | None = None
        self.mounts: dict[str, float] = {}
        self.changed_keys: list[bytes] | None = None
        self.watchers: dict[str, Any] = {}  # a snapshot never changes: nobody is told anything


class VolumeHost:
    """The trio service behind the ``VolumeService`` RPC of a node."""

    def __init__(self, node_id: str, state_dir: Path, store: ControlStore, peers: Any,
                 repair_rate: float = 200e6) -> None:
        self.node_id = node_id
        self._dir = state_dir / "volumes"
        self._store = store
        self._peers = peers  # pxfs.cluster.peers.Peers: logged-in connections to other nodes
        self._repair_rate = repair_rate
        self._state = state_dir
        self._volumes: dict[str, HostedVolume] = {}
        self._nursery: trio.Nursery | None = None
        self.guard: Any = None  # pxfs.cluster.guard.StoreGuard, set by the node: no round on a refused store
        self._warned: dict[str, float] = {}

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
        key = records.volume_key(name)
        raw = await self._store.get(key)
        if raw is None:
            raise NotFound(f'volume "{name}"', "no such volume")
        return records.decode_volume(key, raw)

    def held(self) -> dict[str, str]:
        """Every volume with a copy on this node's disk -> the uid of that copy ("" when unknown)."""
        out: dict[str, str] = {}
        for d in sorted(self._dir.iterdir()) if self._dir.exists() else []:
            if not d.is_dir() or not VOLUME_NAME.match(d.name):
                continue
            hv = self._volumes.get(d.name)
            local = hv.local if hv is not None else records.read_local_spec(d)
            out[d.name] = local.uid if local is not None else ""
        return out

    def holds_data(self) -> bool:
        return bool(self.held())

    def _warn(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_EVERY) >= WARN_EVERY:
            self._warned[key] = now
            log.warning(msg, *args)

    def _claim(self, spec: VolumeInfo) -> HostedVolume:
        """This node's copy of ``spec``'s volume, keeping its spec.json current; refuses a copy of
        another volume of the same name (another uid) that no tombstone lets go yet."""
        hv = self._hosted(spec.name)
        local = hv.local
        if local is not None and local.uid != spec.uid:
            raise Conflict(f'volume "{spec.name}"', f"node {self.node_id} holds a copy with uid {local.uid}, the "
                           f"record names uid {spec.uid}, and no tombstone names {local.uid}: nothing deleted")
        if local is None or records.encode_volume(local) != records.encode_volume(spec):
            records.write_local_spec(hv.path, spec)
            hv.local = records.decode_volume(records.volume_key(spec.name), records.encode_volume(spec))
        return hv

    async def local_replicas(self) -> str:
        """The copies on this disk with the record each last saw (``VolumeService.localReplicas``)."""
        out = []
        for name, uid in self.held().items():
            if not uid:
                log.warning("node=%s volume=%s: copy without spec.json, its uid is unknown: not reported",
                            self.node_id, name)
                continue
            hv = self._hosted(name)
            assert hv.local is not None
            last = hv.kv.log_entry(hv.kv.seq) if hv.kv.seq else None
            out.append(records.LocalReplica(node=self.node_id, spec=hv.local, seq=hv.kv.seq, epoch=hv.epoch,
                                            last_hash=blake3.blake3(last).hexdigest() if last is not None else ""))
        return records.encode_local_replicas(records.read_generation(self._state), out)

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
        hv = self._claim(spec)
        if hv.epoch > spec.epoch:
            raise Conflict(f'volume "{name}"', f"local epoch {hv.epoch} is newer than the cluster's {spec.epoch}")
        if hv.epoch != spec.epoch:
            hv.demote()
            hv.set_epoch(spec.epoch)
        hv.spec = spec
        if hv.meta is None and spec.source and hv.kv.get(keys.counter_key(CLONE_DONE)) is None:
            self._clone(hv, spec)
        if hv.meta is None:
            hv.meta = Meta(hv.kv, spec.size, spec.block_size)
            # Orphans may still be open in mounts that have not reconnected yet: freed once they have
            # (or their registrations expired), by mounts.tend() in the supervision rounds.
            mounts.defer_purge(hv.meta)
            hv.meta.init_root()
            hv.repair_wanted = True
            log.info("node=%s coordinates volume=%s epoch=%d seq=%d", self.node_id, name, spec.epoch, hv.kv.seq)
        hv.meta.capacity = spec.size
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
                                       on_caught_up=lambda _f, hv=hv: setattr(hv, "repair_wanted", True))
            self._nursery.start_soon(hv.replicator.run)
        hv.replicator.set_in_sync(hv.insync.followers())
        hv.insync.on_change = hv.replicator.set_in_sync
        if hv.repair is None:
            hv.repair = ChunkRepair(name, self._peers, self._repair_rate)
        return hv

    def _clone(self, hv: HostedVolume, spec: VolumeInfo) -> None:
        """Fill a new clone from the source snapshot held on this node (clones share their source's
        replicas, so every replica has it), then mark it done; a half-made clone starts over."""
        src_volume, _, snap = spec.source.partition("@")
        if hv.kv.seq:
            hv.wipe()
        source = self._volumes.get(src_volume) or self._hosted(src_volume)
        try:
            src_kv = source.snapshot_kv(snap)
        except NotFound:
            raise Unavailable(f'volume "{spec.name}"', f"source snapshot {spec.source} is not on node "
                              f"{self.node_id}") from None
        n = snapshots.copy_into(hv.kv, src_kv)
        done = Batch()
        done.put(keys.counter_key(CLONE_DONE), keys.encode_u64(1))
        hv.kv.write(done)
        log.info("volume=%s cloned from %s: %d keys", spec.name, spec.source, n)

    async def open(self, name: str, mount_id: str) -> tuple[Any, VolumeInfo]:
        """Called when a mount opens a volume (or ``VOLUME@SNAPSHOT``) here: this node must coordinate it."""
        volume, _, snap = name.partition("@")
        spec = await self._spec(volume)
        if snap:
            hv = self._activate(spec)
            hv.snapshot_kv(snap)
            hs = hv.snapshots[snap]
            if hs.meta is None:
                hs.meta = Meta(hs.kv, spec.size, spec.block_size)
            return hs, spec
        name = volume
        if self.node_id not in spec.replicas:
            raise Conflict(f'volume "{name}"', f"node {self.node_id} is not one of its replicas")
        hv = self._activate(spec)
        await self.keepalive(hv, mount_id, force=True)
        return hv, spec

    async def call(self, hv: HostedVolume, fn: Callable[[Meta], T], changed: Changed | None = None) -> T:
        """Run one Meta operation; if it wrote a batch, return only once the live followers hold it.

        ``changed`` receives the inodes and entries the operation wrote, for the other mounts' caches.
        """
        if hv.meta is None:
            raise Unavailable(f'volume "{hv.name}"', f"no longer coordinated by node {self.node_id}; reopen")
        before, meta = hv.kv.seq, hv.meta
        replays = meta.replays
        hv.changed_keys = [] if changed is not None else None
        try:
            result = fn(meta)  # synchronous: no other operation's batch can land in changed_keys
        finally:
            written, hv.changed_keys = hv.changed_keys, None
        if changed is not None and written:
            inodes, entries = keys.touched(written)
            changed.inodes |= inodes
            changed.entries |= entries
        # An answer from an op record (a retry) is owed the same guarantee as the first run: the
        # batch that holds it may so far be on this replica only, so wait for the in-sync set too.
        if hv.kv.seq != before or meta.replays != replays:
            await self._acknowledge(hv, hv.kv.seq)
        return result

    async def _acknowledge(self, hv: Any, seq: int) -> None:
        """Return once every in-sync replica holds batch ``seq``, taking the slow ones out of the set
        first; fail (EIO) after MIN_REPLICAS_WAIT when that would leave fewer than min_replicas."""
        rep, insync = hv.replicator, getattr(hv, "insync", None)
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

    async def fsck(self, hv: HostedVolume, repair: bool) -> str:
        """Run fsck on the coordinator's keyspace; a repair batch ships to followers like any other.

        It runs on the trio thread on purpose: no metadata operation may interleave with the scan
        that the repair batch is computed from.
        """
        def run(meta: Meta) -> str:
            report = fsck(hv.kv, block_size=meta.block_size, repair=repair, is_open=meta._is_open)
            return json.dumps(report.to_json())

        return await self.call(hv, run)

    # -- snapshots -------------------------------------------------------------------------------

    def _volume_only(self, hv: Any) -> HostedVolume:
        if not isinstance(hv, HostedVolume):
            raise Invalid(f'snapshot "{hv.name}"', "is read-only; name the volume itself")
        return hv

    async def snapshot_create(self, hv: Any, name: str) -> None:
        hv = self._volume_only(hv)
        await self.call(hv, lambda m: snapshots.create(m.kv, hv.name, name, time.time_ns()))
        hv.space_due = 0.0

    async def snapshot_delete(self, hv: Any, name: str) -> None:
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

    async def snapshot_list(self, hv: Any) -> list[tuple[str, int]]:
        return snapshots.listing(self._volume_only(hv).kv)

    async def restore(self, hv: Any, name: str) -> None:
        hv = self._volume_only(hv)
        snap_kv = hv.snapshot_kv(name)
        ops = await self.call(hv, lambda m: snapshots.restore(m.kv, snap_kv))
        log.warning("volume=%s restored to snapshot %s (%d keys changed)", hv.name, name, ops)
        hv.space_due = 0.0

    async def detach(self, hv: HostedVolume, mount_id: str) -> None:
        hv.mounts.pop(mount_id, None)
        await self._store.delete(f"mounts/{hv.name}/{mount_id}")

    async def commit(self, hv: Any, ino: int, blocks: dict[int, tuple[bytes, int]], size: int,
                     mtime_ns: int | None, changed: Changed | None = None, held: set[str] | None = None,
                     op: Op | None = None) -> Any:
        insync = getattr(hv, "insync", None)
        hashes = [h for h, n in blocks.values() if n]  # length 0 punches a hole: no chunk
        if insync is not None and hashes and hv.meta is not None:
            hv.meta.commit_blocks(ino, blocks, size, mtime_ns, dry_run=True, op=op)  # a bad commit costs no copies
            # Before the block map names the chunks: every in-sync replica holds them, or leaves the set.
            try:
                await insync.ensure_chunks(hashes, held or set())
            except Deposed:
                hv.demote()
                raise
        attr = await self.call(hv, lambda m: m.commit_blocks(ino, blocks, size, mtime_ns, op=op), changed)
        now = time.monotonic()
        fresh = [r for r, until in getattr(hv, "fresh_replicas", {}).items() if until > now]
        if fresh and blocks:
            await self._complete_on(hv, fresh, [h for h, _n in blocks.values()])
        return attr

    async def _complete_on(self, hv: HostedVolume, nodes: list[str], hashes: list[bytes]) -> None:
        """Copy any of ``hashes`` that ``nodes`` lack from another replica (best effort: repair follows)."""
        assert hv.spec is not None
        for node in nodes:
            try:
                chunks = await self._peers.chunks(node)
                have = await chunks.has_many(hashes)
                for h, ok in zip(hashes, have, strict=True):
                    if ok:
                        continue
                    for src in hv.spec.replicas:
                        if src == node:
                            continue
                        try:
                            data = await (await self._peers.chunks(src)).get(h)
                        except PxfsError:
                            continue
                        await chunks.put(h, data)
                        break
            except PxfsError as err:
                log.info("volume=%s new replica %s not completed inline: %s", hv.name, node, err)

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

    async def _health(self, hv: HostedVolume) -> None:
        assert hv.meta is not None and hv.spec is not None and hv.repair is not None
        now = time.monotonic()
        asked = await self._store.get(f"repair/{hv.name}")
        if asked is not None:
            try:
                ts = float(records.decode_json(f"repair/{hv.name}", asked).get("ts", 0))
            except (PxfsError, TypeError, ValueError) as err:
                records.skip_bad(f"repair/{hv.name}", err)
                ts = 0.0
            if ts > hv.repair_asked:
                hv.repair_asked = ts
                hv.repair_wanted = True
        if not hv.repair_running and now >= hv.repair_not_before and (
                hv.repair_wanted or now - hv.last_repair > REPAIR_PERIOD):
            hv.repair_wanted = False
            hv.repair_running = True
            assert self._nursery is not None
            self._nursery.start_soon(self._repair, hv)
        await self._rejoin(hv)
        if hv.spec.source and not hv.spec.clone_done and hv.kv.get(keys.counter_key(CLONE_DONE)) is not None \
                and hv.insync is not None:
            # The record says so too: from now on the source snapshot may be deleted.
            def done(s: VolumeInfo) -> None:
                s.clone_done = True

            hv.spec = await hv.insync.update(done)
        await self._scheduled_snapshots(hv)
        meta = hv.meta

        async def call(fn: Callable[[Meta], T]) -> T:
            return await self.call(hv, fn)

        await mounts.tend(meta, call, self._store, hv.name)
        if time.monotonic() >= hv.space_due:
            hv.space_due = time.monotonic() + SPACE_PERIOD
            hv.space = await trio.to_thread.run_sync(self._space, hv)
            await mounts.forget_silent(meta, call, self._store, hv.name)
        st = hv.meta.statfs()
        rep = hv.replicator
        detail = {"used": st["used"], "inodes": st["inodes"], "seq": hv.kv.seq, "epoch": hv.epoch,
                  "coordinator": self.node_id, "replicas": sorted(hv.known_replicas),
                  "lagging": sorted(rep.lagging) if rep else [],
                  "repair": hv.repair.status.to_json(), "ts": time.time(),
                  "space": {k: v for k, v in hv.space.items() if k != "snapshots"},
                  "snapshots": hv.space.get("snapshots", [])}
        await self._store.put(f"usage/{hv.name}", json.dumps(detail).encode())

    async def _rejoin(self, hv: HostedVolume) -> None:
        rep, insync = hv.replicator, hv.insync
        if rep is None or insync is None:
            return
        for r in list(insync.replicas):
            if r not in insync.members and r in rep.acked:
                acked = rep.acked.get(r)
                if (acked is not None and hv.kv.seq - acked <= REJOIN_LAG
                        and insync.missed_at.get(r, 0.0) >= hv.converged_round_started):
                    # Caught up on metadata: a repair round that begins now can prove it holds the
                    # chunks too, so it need not wait for the periodic one to rejoin.
                    hv.repair_wanted = True
                    continue
                try:
                    await insync.rejoin(r, lambda r=r: rep.acked.get(r), lambda: hv.kv.seq,
                                        lambda seq, r=r: rep.reach(r, seq), hv.converged_round_started)
                except Deposed:
                    hv.demote()
                    return

    def _space(self, hv: HostedVolume) -> dict[str, Any]:
        """Dedup accounting: logical bytes, unique chunk bytes, what the snapshots share and hold alone."""
        live, logical = snapshots.chunk_refs(hv.kv)
        snaps = []
        for name, created in snapshots.listing(hv.kv):
            try:
                refs, snap_logical = snapshots.chunk_refs(hv.snapshot_kv(name))
            except NotFound:
                continue
            snaps.append((name, created, refs, snap_logical))
        shared = {h for _n, _c, refs, _l in snaps for h in refs}
        out: list[dict[str, Any]] = []
        for name, created, refs, snap_logical in snaps:
            others = {h for n2, _c, r2, _l in snaps if n2 != name for h in r2}
            alone = sum(n for h, n in refs.items() if h not in live and h not in others)
            out.append({"name": name, "created_ns": created, "logical": snap_logical, "unique": alone})
        unique = sum(live.values())
        return {"logical": logical, "unique": unique,
                "shared_with_snapshots": sum(n for h, n in live.items() if h in shared),
                "snapshot_only": sum(n for h, n in {h: n for _n, _c, r, _l in snaps for h, n in r.items()}.items()
                                     if h not in live),
                "dedup_ratio": round(logical / unique, 3) if unique else 1.0, "snapshots": out}

    async def chunk_refs(self, hv: Any) -> list[bytes]:
        if isinstance(hv, HostedVolume):
            return await trio.to_thread.run_sync(self.all_chunk_refs, hv)
        return list(snapshots.chunk_refs(hv.kv)[0])

    def all_chunk_refs(self, hv: HostedVolume) -> list[bytes]:
        """Every chunk the volume and its snapshots name: what GC must keep."""
        refs, _ = snapshots.chunk_refs(hv.kv)
        out = set(refs)
        for name, _created in snapshots.listing(hv.kv):
            out.update(snapshots.chunk_refs(hv.snapshot_kv(name))[0])
        return list(out)

    async def _scheduled_snapshots(self, hv: HostedVolume) -> None:
        raw = await self._store.get(f"schedules/{hv.name}")
        if raw is None:
            return
        try:
            sched = records.decode_json(f"schedules/{hv.name}", raw)
            every, keep = int(sched.get("every", 0)), int(sched.get("keep", 0))
        except (PxfsError, TypeError, ValueError) as err:
            records.skip_bad(f"schedules/{hv.name}", err)
            return
        autos = sorted((c, n) for n, c in snapshots.listing(hv.kv) if n.startswith("auto-"))
        now = time.time_ns()
        if every > 0 and (not autos or now - autos[-1][0] >= every * 1e9):
            name = "auto-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            if any(n == name for _c, n in autos):
                name += f"-{now % 1000000}"
            await self.snapshot_create(hv, name)
            autos.append((now, name))
        for _c, name in autos[:max(0, len(autos) - keep)] if keep > 0 else []:
            await self.snapshot_delete(hv, name)

    async def _repair(self, hv: HostedVolume) -> None:
        try:
            if hv.meta is None or hv.spec is None or hv.repair is None:
                return
            asked = hv.repair_asked  # requests read before this round began: it covers them
            started = time.monotonic()
            refs = dict.fromkeys(await trio.to_thread.run_sync(self.all_chunk_refs, hv), 0)
            former = sorted(hv.former_replicas)
            st = await hv.repair.run(refs, list(hv.spec.replicas), former)
            st.asked = max(st.asked, asked)
            if st.converged:
                hv.former_replicas -= set(former)
                # Every chunk committed before ``started`` is on every replica: replicas out of the
                # in-sync set that have not missed a chunk since may rejoin (see InSync.rejoin).
                hv.converged_round_started = started
            if not st.converged:
                # Chunks committed while this round ran were not in its list: go again until a
                # round finds nothing to copy, and only then call the replicas complete. A replica
                # that cannot be reached is retried less eagerly.
                hv.repair_wanted = True
                hv.repair_not_before = time.monotonic() + (0.0 if st.total else 5.0)
        except PxfsError as err:
            log.warning("volume=%s repair failed: %s", hv.name, err)
        finally:
            hv.repair_running = False
            hv.last_repair = time.monotonic()

    # -- follower side -------------------------------------------------------------------------

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

    async def apply_many(self, name: str, epoch: int, first: int, batches: list[bytes], peer: str) -> int:
        """Apply batches ``first``, ``first + 1``, ... in order (a catching-up follower gets many at once)."""
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
                elif seq <= hv.kv.seq:
                    ours = hv.kv.log_entry(seq)
                    if ours is not None and ours != batch:
                        raise Conflict(f'volume "{name}"', f"batch {seq} differs from the one this replica holds")
                else:
                    break  # a gap: the coordinator resends from our seq
            return hv.kv.seq

    async def last_seq(self, name: str) -> tuple[int, int, bytes]:
        check_volume_name(name)
        spec = await self._spec(name)
        if self.node_id not in spec.replicas:
            raise NotFound(f'volume "{name}"', f"node {self.node_id} is not one of its replicas")
        hv = self._claim(spec)
        last = hv.kv.log_entry(hv.kv.seq) if hv.kv.seq else None
        return hv.kv.seq, hv.epoch, blake3.blake3(last).digest() if last is not None else b""

    async def reset(self, name: str, epoch: int, peer: str) -> None:
        hv = await self._follower(name, epoch, peer)
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
