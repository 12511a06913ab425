"""One volume's copy on this node: its RocksDB keyspace, epoch, snapshots, and the role state.

``HostedVolume`` is what every role of ``VolumeHost`` works on: the coordinator's Meta, replicator
and in-sync set, the follower's fencing token, and the repair and space bookkeeping of the
supervision rounds. ``HostedSnapshot`` is a read-only view of one snapshot, served to mounts.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import trio

from pxfs.cluster import records
from pxfs.cluster.repair import ChunkRepair
from pxfs.durable import replace_file
from pxfs.errors import Conflict, NotFound, Unavailable
from pxfs.meta import keys, snapshots
from pxfs.meta.fs import Meta
from pxfs.meta.kv import Batch, RocksKV
from pxfs.model import VolumeInfo
from pxfs.paths import under
from pxfs.volume.insync import InSync
from pxfs.volume.replicator import Replicator
from pxfs.volume.transfer import CopyView

log = logging.getLogger(__name__)


class HostedVolume:
    """One volume's keyspace on this node, and, when this node coordinates it, its Meta."""

    def __init__(self, name: str, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.path = path
        self.snapshots: dict[str, HostedSnapshot] = {}
        self.loading: dict[str, RocksKV] = {}  # snapshots a full copy is filling in (follower side)
        # Frozen views a full copy is sent from (coordinator side): none outlives its process.
        shutil.rmtree(self.path / "copies", ignore_errors=True)
        self._sync_running: trio.Event | None = None
        self.kv = self._open_kv()
        # Compaction bookkeeping (pxfs.volume.host): when the last one ran, what it left on disk,
        # and when a batch was last committed here (compactions wait for a quiet moment).
        self.tidied_at = 0.0
        self.tidied_size = 0
        self.last_commit = 0.0
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
        self.mounts: dict[str, float] = {}  # mount id -> when its registration was last written
        self.heard: dict[str, float] = {}  # mount id -> when it last called (time.time)
        self.lock = trio.Lock()  # serialises apply() of batches arriving from the coordinator
        # One driver at a time of the job under the maintenance mark (pxfs.meta.maintenance): a
        # restore or fsck repair asked for, or a supervision round finishing one.
        self.job_lock = trio.Lock()
        self.cloned: trio.Event | None = None  # set when the copy filling this new clone is done
        self.changed_keys: list[bytes] | None = None  # keys written by the operation VolumeHost.call runs
        # mount id -> its Volume server, which holds the mount's Watcher (capnp thread only)
        self.watchers: dict[str, Any] = {}

    def _open_kv(self) -> RocksKV:
        kv = RocksKV(str(self.path / "meta"))
        kv.after_commit = self._after_commit
        kv.check_batch = snapshots.check_batch
        # Batches are written at once and made durable by ``durable`` before anyone counts on them:
        # the event loop never waits for the disk, and one sync covers every batch before it.
        kv.deferred_sync = True
        return kv

    async def durable(self, seq: int) -> None:
        """Return once batches up to ``seq`` are on this replica's disk (group commit: one sync in a
        worker thread covers every batch written before it; a later caller waits for that one or
        starts the next)."""
        while self.kv.synced < seq:
            running = self._sync_running
            if running is not None:
                await running.wait()
                continue
            self._sync_running = done = trio.Event()
            try:
                await trio.to_thread.run_sync(self.kv.sync)
            except Exception as exc:  # noqa: BLE001 - the engine's error, named for the caller
                raise Unavailable(f'volume "{self.name}"', f"metadata not written to disk: {exc}") from exc
            finally:
                self._sync_running = None
                done.set()

    def _after_commit(self, seq: int, batch: Batch) -> None:
        self.last_commit = time.monotonic()
        if self.changed_keys is not None:
            self.changed_keys.extend(k for k, _ in batch.ops)
        for name, created in snapshots.changed_names(batch):
            where = under(self.path / "snapshots", name, f'snapshot "{self.name}@{name}"')
            self.close_snapshot(name)
            shutil.rmtree(where, ignore_errors=True)
            if created:
                where.parent.mkdir(exist_ok=True)
                self.kv.checkpoint(str(where))
                log.info("volume=%s snapshot=%s taken at seq %d", self.name, name, seq)

    def snapshot_kv(self, name: str) -> RocksKV:
        hs = self.snapshots.get(name)
        if hs is None:
            where = under(self.path / "snapshots", name, f'snapshot "{self.name}@{name}"')
            if self.kv.get(keys.snapshot_key(name)) is None or not where.exists():
                raise NotFound(f'snapshot "{self.name}@{name}"', "no such snapshot")
            hs = self.snapshots[name] = HostedSnapshot(f"{self.name}@{name}", RocksKV(str(where)))
        return hs.kv

    def copy_view(self) -> CopyView:
        """The keyspace and every snapshot as of now, frozen: the source of a full copy."""
        where = self.path / "copies" / secrets.token_hex(6)
        where.mkdir(parents=True)
        self.kv.checkpoint(str(where / "meta"))
        frozen: dict[str, RocksKV] = {}
        for name, _created in snapshots.listing(self.kv):
            try:
                source = self.snapshot_kv(name)
            except NotFound:
                log.warning("volume=%s snapshot=%s is missing on this replica: not in the full copy", self.name, name)
                continue
            dest = under(where / "snapshots", name, f'snapshot "{self.name}@{name}"')
            dest.parent.mkdir(exist_ok=True)
            source.checkpoint(str(dest))
            frozen[name] = RocksKV(str(dest))
        return CopyView(where, RocksKV(str(where / "meta")), frozen)

    def load_part(self, snapshot: str, items: list[tuple[bytes, bytes]], seq: int, last_batch: bytes) -> None:
        """Follower side of a full copy: one part for the volume's keyspace or one of its snapshots
        (all of those come first); ``seq`` > 0 ends that keyspace."""
        if not snapshot:
            self.kv.load(items)
            if seq:
                self.kv.finish_load(seq, last_batch)
            return
        if self.kv.seq:
            raise Conflict(f'snapshot "{self.name}@{snapshot}"', "a full copy sends snapshots before the volume")
        kv = self.loading.get(snapshot)
        if kv is None:
            where = under(self.path / "snapshots", snapshot, f'snapshot "{self.name}@{snapshot}"')
            if where.exists():
                raise Conflict(f'snapshot "{self.name}@{snapshot}"', "already on this replica: reset it first")
            where.parent.mkdir(exist_ok=True)
            kv = self.loading[snapshot] = RocksKV(str(where))
        kv.load(items)
        if seq:
            kv.finish_load(seq, last_batch)
            kv.close()
            del self.loading[snapshot]

    def _close_loading(self) -> None:
        for kv in self.loading.values():
            kv.close()
        self.loading.clear()

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
            # The fencing token a replica refuses older coordinators by: it must survive a crash.
            replace_file(self.path / "epoch", str(epoch).encode())
            self.epoch = epoch

    def demote(self) -> None:
        self.meta = None
        self.insync = None
        if self.replicator is not None:
            self.replicator.stop()
            self.replicator = None

    def wipe(self) -> None:
        """Start this replica's copy over (it diverged, or is behind the coordinator's trimmed log);
        the coordinator sends it again, from its log or as a full copy (``pxfs.volume.transfer``).

        The old copy is moved aside, never deleted: it holds only batches no in-sync replica
        acknowledged, but an operator who promoted a replica with --accept-data-loss may want them.
        """
        self.demote()
        self.kv.close()
        for name in list(self.snapshots):
            self.close_snapshot(name)
        self._close_loading()
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
        self._close_loading()
        self.kv.close()


class HostedSnapshot:
    """A read-only view of one snapshot, served to mounts of ``VOLUME@NAME`` by the coordinator."""

    def __init__(self, name: str, kv: RocksKV) -> None:
        self.name = name
        self.kv = kv
        self.meta: Meta | None = None
        self.replicator: Replicator | None = None
        self.insync: InSync | None = None  # a snapshot writes nothing: no batch to acknowledge
        self.fresh_replicas: dict[str, float] = {}
        self.mounts: dict[str, float] = {}
        self.heard: dict[str, float] = {}
        self.changed_keys: list[bytes] | None = None
        self.watchers: dict[str, Any] = {}  # a snapshot never changes: nobody is told anything


# What a mount's Volume capability serves: the live volume, or one of its snapshots read-only.
Served = HostedVolume | HostedSnapshot
