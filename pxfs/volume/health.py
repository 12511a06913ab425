"""The coordinator's supervision of one volume: repair rounds, rejoining replicas, space, schedules, usage."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from pxfs.cluster import records
from pxfs.errors import NotFound, PxfsError
from pxfs.meta import keys, snapshots
from pxfs.meta import maintenance as jobs
from pxfs.meta.fs import Meta
from pxfs.model import VolumeInfo
from pxfs.volume import mounts
from pxfs.volume.coordinator import CLONE_DONE
from pxfs.volume.insync import REJOIN_LAG, Deposed
from pxfs.volume.jobs import Jobs
from pxfs.volume.replica import HostedVolume, Served

log = logging.getLogger(__name__)
T = TypeVar("T")

REPAIR_PERIOD = 60.0
SPACE_PERIOD = 30.0
PURGE_STEPS = 256  # purge batches per supervision round: ~1M block entries a second
JOB_STEPS = 256  # steps of an unfinished restore or fsck repair per round (pxfs.meta.maintenance)


class Health(Jobs):
    """Run by every supervision round for each volume this node coordinates."""

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
        meta = hv.meta
        if await self._maintain(hv):
            await self._scheduled_snapshots(hv)

            async def call(fn: Callable[[Meta], T]) -> T:
                return await self.call(hv, fn)

            await mounts.tend(meta, call, self._store, hv.name)
            for _ in range(PURGE_STEPS):
                # Freed inodes' block entries, one bounded batch at a time, each replicated before
                # the next: mounts' operations go on between them.
                if not meta.purging() or not await call(lambda m: m.purge_step()):
                    break
            if time.monotonic() >= hv.space_due:
                hv.space_due = time.monotonic() + SPACE_PERIOD
                hv.space = await trio.to_thread.run_sync(self._space, hv)
                await mounts.forget_silent(meta, call, self._store, hv.name, heard=hv.heard)
        st = hv.meta.statfs()
        rep = hv.replicator
        detail = {"used": st["used"], "inodes": st["inodes"], "meta_bytes": st["meta_bytes"],
                  "seq": hv.kv.seq, "epoch": hv.epoch,
                  "coordinator": self.node_id, "replicas": sorted(hv.known_replicas),
                  "lagging": sorted(rep.lagging) if rep else [],
                  "repair": hv.repair.status.to_json(), "ts": time.time(),
                  "space": {k: v for k, v in hv.space.items() if k != "snapshots"},
                  "snapshots": hv.space.get("snapshots", [])}
        await self._store.put(f"usage/{hv.name}", json.dumps(detail).encode())

    async def _maintain(self, hv: HostedVolume) -> bool:
        """Go on with a job a coordinator began and did not finish (it crashed, or the caller went):
        JOB_STEPS of it per round. True when the volume has no job: the round's other work may run."""
        if jobs.pending(hv.kv) is None:
            return True
        if hv.job_lock.locked():
            return False  # its driver is at it
        async with hv.job_lock:
            try:
                return await self._finish_job(hv, JOB_STEPS)
            except NotFound as err:
                self._warn(f"job/{hv.name}", "node=%s volume=%s: the job under way cannot go on here: %s "
                           "(restore another snapshot to end it)", self.node_id, hv.name, err)
                return False

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

    async def chunk_refs(self, hv: Served) -> list[bytes]:
        """Listed in a worker thread: a scan of every block entry, too long for the event loop."""
        if isinstance(hv, HostedVolume):
            return await trio.to_thread.run_sync(self.all_chunk_refs, hv)
        return await trio.to_thread.run_sync(lambda: list(snapshots.chunk_refs(hv.kv)[0]))

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
