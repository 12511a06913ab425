"""The jobs a coordinator runs under the maintenance mark (``pxfs.meta.maintenance``): a restore to a
snapshot and an fsck repair, each in bounded replicated batches, finished by whichever coordinator
finds the mark (a supervision round, ``Health._maintain``); and the whole-keyspace reads that run in
worker threads instead of the event loop: the fsck check and ``locate``.
"""

from __future__ import annotations

import json
import logging

import trio

from pxfs.errors import Unavailable
from pxfs.meta import maintenance as jobs
from pxfs.meta.fsck import FsckReport, check
from pxfs.volume.coordinator import Coordinator
from pxfs.volume.replica import HostedVolume, Served

log = logging.getLogger(__name__)


class Jobs(Coordinator):
    """Restore, fsck and locate of the volumes this node coordinates."""

    async def _finish_job(self, hv: HostedVolume, steps: int = 0) -> bool:
        """Drive the job the mark names, ``steps`` steps at most (0: to its end); True once no mark
        is left. The caller holds ``hv.job_lock``."""
        done = 0
        while steps == 0 or done < steps:
            pending = jobs.pending(hv.kv)
            if pending is None:
                return True
            if pending.job == jobs.RESTORE:
                snap = hv.snapshot_kv(pending.snapshot)
                await self.call(hv, lambda m, snap=snap: jobs.restore_step(m.kv, snap), job=True)
            else:
                await self._fsck_repair(hv)
            done += 1
            await trio.lowlevel.checkpoint()  # a volume without followers acknowledges at once
        return jobs.pending(hv.kv) is None

    async def _fsck_repair(self, hv: HostedVolume) -> FsckReport:
        """Under the mark: check in a worker thread (nothing else writes), then the repairs as
        bounded batches, then the end of the mark. Run again in full after a crash half way."""
        meta = hv.meta
        if meta is None:
            raise Unavailable(f'volume "{hv.name}"', f"no longer coordinated by node {self.node_id}; reopen")
        report, ops = await trio.to_thread.run_sync(
            lambda: check(hv.kv, block_size=meta.block_size, repair=True, is_open=meta._is_open))
        for batch in jobs.batches(ops):
            await self.call(hv, lambda m, b=batch: m.kv.write(b), job=True)
        await self.call(hv, lambda m: jobs.end(m.kv), job=True)
        return report

    async def fsck(self, hv: HostedVolume, repair: bool) -> str:
        """Run fsck on the coordinator's keyspace, in a worker thread: a check reads one consistent
        scan (one RocksDB iterator) while mounts go on; a repair runs under the maintenance mark
        (no metadata operation may interleave with the scan its writes are computed from), and its
        batches ship to the followers like any other."""
        meta = hv.meta
        if meta is None:
            raise Unavailable(f'volume "{hv.name}"', f"no longer coordinated by node {self.node_id}; reopen")
        self._not_in_maintenance(hv)
        if not repair:
            report, _ = await trio.to_thread.run_sync(
                lambda: check(hv.kv, block_size=meta.block_size, is_open=meta._is_open))
            return json.dumps(report.to_json())
        async with hv.job_lock:
            await self.call(hv, lambda m: jobs.begin_fsck(m.kv), job=True)
            report = await self._fsck_repair(hv)
        return json.dumps(report.to_json())

    async def locate(self, hv: Served, hashes: set[bytes]) -> list[tuple[bytes, bytes, int, int]]:
        """Where ``hashes`` are used (``Meta.locate_chunks``), found in a worker thread: it reads
        the whole keyspace, and mounts go on meanwhile."""
        meta = hv.meta
        if meta is None:
            raise Unavailable(f'volume "{hv.name}"', f"no longer coordinated by node {self.node_id}; reopen")
        self._not_in_maintenance(hv)
        return await trio.to_thread.run_sync(meta.locate_chunks, hashes)

    async def restore(self, hv: Served, name: str) -> None:
        """Roll the volume back to snapshot ``name`` in bounded batches under the maintenance mark
        (any job half done is superseded: a restore sets every key)."""
        hv = self._volume_only(hv)
        snap_kv = hv.snapshot_kv(name)
        async with hv.job_lock:
            await self.call(hv, lambda m: jobs.begin_restore(m.kv, name, snap_kv), job=True)
            before = hv.kv.seq
            await self._finish_job(hv)
        log.warning("volume=%s restored to snapshot %s (%d batches)", hv.name, name, hv.kv.seq - before + 1)
        hv.space_due = 0.0
