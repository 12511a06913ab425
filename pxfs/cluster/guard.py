"""Whether this node may act on the control store it reaches: its cluster identity and generation.

A node that holds replicas must not take an empty store (a lost or replaced disk on the seed), another
cluster's store, or an older copy of its own for the truth: acting on one would drop replicas,
sweep chunks and re-place volumes that the store merely does not know. While the guard refuses, the
node keeps serving RPC (chunks, lastSeq, heartbeats, localReplicas) but runs no supervision round,
no GC and no manager. ``pxfs cluster recover`` rebuilds the records and writes a new identity; the
next check accepts it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pxfs.cluster import records
from pxfs.cluster.store import ControlStore
from pxfs.errors import Corrupt, Unavailable

log = logging.getLogger(__name__)


class StoreGuard:
    def __init__(self, node_id: str, cluster_id: str, state: Path, store: ControlStore, is_seed: bool,
                 holds_data: Callable[[], bool]) -> None:
        self.node_id, self.cluster_id, self._state, self._store = node_id, cluster_id, state, store
        self._is_seed, self._holds_data = is_seed, holds_data
        self.refused = ""  # why the last check refused the store, "" when it accepted it
        self._logged = ""

    async def check(self) -> str:
        """Read the identity; returns "" when this node may act on the store, else why not (logged once)."""
        raw = await self._store.get(records.IDENTITY_KEY)
        holds = self._holds_data()
        if raw is None and self._is_seed and not holds:
            # A new cluster (or a seed that never held data): nothing here can tell it the store
            # was lost, so it names the store. A node holding data refuses it until recovery.
            fresh = records.encode_identity(self.cluster_id, 1)
            if await self._store.cas(records.IDENTITY_KEY, None, fresh):
                log.info("node=%s control store: identity written (cluster %s, generation 1)", self.node_id,
                         self.cluster_id)
            raw = await self._store.get(records.IDENTITY_KEY)
        recorded = records.read_generation(self._state)
        why = records.identity_problem(raw, self.cluster_id, recorded, holds)
        if not why and raw is not None:
            try:
                _cid, gen = records.decode_identity(raw)
            except Corrupt:
                gen = recorded  # undecodable, accepted only by a node without data: nothing to record
            if gen != recorded:
                records.write_generation(self._state, gen)
        if why and why != self._logged:
            log.error("pxfs: node %s: %s; no supervision, GC or failover until then (RPC still served)",
                      self.node_id, why)
        elif not why and self._logged:
            log.info("node=%s control store accepted again", self.node_id)
        self._logged = why
        self.refused = why
        return why

    async def require(self, what: str) -> None:
        """Raise Unavailable naming ``what`` when the store is refused."""
        why = await self.check()
        if why:
            raise Unavailable(f"{what} on node {self.node_id}", f"{why}; nothing deleted")
