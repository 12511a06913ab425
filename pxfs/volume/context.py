"""What every role of a node's ``VolumeHost`` shares: the copies on disk and the records they follow."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import blake3
import trio

from pxfs.cluster import records
from pxfs.cluster.admin import check_volume_name
from pxfs.cluster.config import COMMIT_WINDOW
from pxfs.cluster.guard import StoreGuard
from pxfs.cluster.peers import Peers
from pxfs.cluster.store import ControlStore
from pxfs.cluster.wakeup import Wakeup
from pxfs.errors import Conflict, NotFound, Unavailable
from pxfs.model import VolumeInfo
from pxfs.paths import is_name, under
from pxfs.volume.replica import HostedVolume

log = logging.getLogger(__name__)

WARN_EVERY = 60.0
REPLICA_OF_TTL = 30.0


class HostContext:
    """The node's hosted volumes by name, the control store and the peers; the roles build on it."""

    def __init__(self, node_id: str, state_dir: Path, store: ControlStore, peers: Peers,
                 repair_rate: float = 200e6, commit_window: float = COMMIT_WINDOW) -> None:
        self.node_id = node_id
        self.commit_window = commit_window  # pxfs.cluster.config.COMMIT_WINDOW
        self._dir = state_dir / "volumes"
        self._store = store
        self._peers = peers  # pxfs.cluster.peers.Peers: logged-in connections to other nodes
        self._repair_rate = repair_rate
        self._state = state_dir
        self._volumes: dict[str, HostedVolume] = {}
        self._nursery: trio.Nursery | None = None
        self.guard: StoreGuard | None = None  # set by the node: no round on a refused store
        self.wakeup: Wakeup | None = None  # set by the node on a store that watches: rounds start early
        self._warned: dict[str, float] = {}
        self._replica_of: dict[frozenset[str], float] = {}  # mount volumes -> until when "yes" holds

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

    async def _serving_spec(self, name: str) -> VolumeInfo:
        """The record of a volume a mount asks this node to serve. While the control store cannot be
        reached, the one this node coordinates by is used: only map changes need the store, and a
        coordinator deposed meanwhile still gets nothing acknowledged (its followers fence on the
        newer token, and taking them out of the in-sync set needs the store)."""
        try:
            return await self._spec(name)
        except Unavailable as err:
            hv = self._volumes.get(name)
            if hv is None or hv.meta is None or hv.spec is None or hv.spec.coordinator != self.node_id:
                raise
            self._warn(f"nostore/{name}", "node=%s volume=%s: control store unreachable (%s); serving from the "
                       "record held at epoch %d", self.node_id, name, err, hv.spec.epoch)
            return hv.spec

    def held(self) -> dict[str, str]:
        """Every volume with a copy on this node's disk -> the uid of that copy ("" when unknown)."""
        out: dict[str, str] = {}
        for d in sorted(self._dir.iterdir()) if self._dir.exists() else []:
            if not d.is_dir() or not is_name(d.name):
                continue
            hv = self._volumes.get(d.name)
            local = hv.local if hv is not None else records.read_local_spec(d)
            out[d.name] = local.uid if local is not None else ""
        return out

    async def replicates_any(self, wanted: frozenset[str] | None) -> bool:
        """Whether this node is a replica of one of ``wanted`` (None: of any volume): a mount may put
        chunks only where its volumes live. Copies on disk answer at once; a volume created moments
        ago (its copy not made yet) is found in its record, remembered for a while."""
        held = self.held()
        if any(wanted is None or name in wanted for name in held):
            return True
        now = time.monotonic()
        key = wanted or frozenset()
        if self._replica_of.get(key, 0.0) > now:
            return True
        try:
            specs = records.volumes(await self._store.range(records.VOLUME_PREFIX))
        except Unavailable:
            return False
        if any(self.node_id in v.replicas and (wanted is None or v.name in wanted) for v in specs):
            self._replica_of[key] = now + REPLICA_OF_TTL
            return True
        return False

    def coordinated(self) -> list[tuple[str, HostedVolume]]:
        """The volumes this node coordinates now (what its metrics describe)."""
        return [(n, hv) for n, hv in sorted(self._volumes.items())
                if hv.meta is not None and hv.spec is not None and hv.spec.coordinator == self.node_id]

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
                                            last_hash=blake3.blake3(last).hexdigest() if last is not None else "",
                                            meta_bytes=hv.kv.disk_bytes(), log_entries=hv.kv.seq - hv.kv.trimmed))
        return records.encode_local_replicas(records.read_generation(self._state), out)

    def _hosted(self, name: str) -> HostedVolume:
        hv = self._volumes.get(name)
        if hv is None:
            check_volume_name(name)  # it becomes a directory name: never a path
            hv = HostedVolume(name, under(self._dir, name, f'volume "{name}"'))
            self._volumes[name] = hv
        return hv

    async def drop(self, name: str) -> None:
        hv = self._volumes.pop(name, None)
        if hv is not None:
            hv.close()
        shutil.rmtree(under(self._dir, name, f'volume "{name}"'), ignore_errors=True)
