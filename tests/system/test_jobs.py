"""Restore and fsck repair of a volume with many keys, through real `pxfs node` processes (issue 13):
each goes in bounded replicated batches under the maintenance mark; a restore stopped half way on
every replica (a crash) is finished by the coordinator before it serves anyone, and one that cannot
be finished keeps the volume refusing until a restore to another snapshot ends it."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import trio

from pxfs.errors import Conflict, Unavailable
from pxfs.meta import keys, maintenance
from pxfs.meta.kv import Batch, RocksKV
from pxfs.meta.slices import whole
from tests.cluster.test_hostile import BLOCK, create_volume, get_volume, opened, put_everywhere
from tests.cluster.test_opids import seqs
from tests.system.faults import FaultCluster, fault_cluster, healthy, wait_volume

REG = stat.S_IFREG | 0o644
DATA = [b"job chunk %d" % i for i in range(4)]
HASHES = [blake3.blake3(d).digest() for d in DATA]
N = 12000  # block entries of the big file: some six restore steps
SMALL = 20


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[FaultCluster]:
    yield from fault_cluster(tmp_path, 3)


def blocks() -> dict[int, tuple[bytes, int]]:
    return {i: (HASHES[i % len(HASHES)], 1) for i in range(N)}


async def populate(c: FaultCluster, vol: str) -> None:
    """A big sparse file and small ones, snapshot ``s``; then the big file unlinked (and purged)
    and other files made: the restore has N block entries and more to put back."""
    await create_volume(c, vol)
    async with opened(c, vol) as (_vs, v, info):
        await put_everywhere(c, info, DATA)
        f = await v.create(1, b"big", REG, 0, 0)
        want = blocks()
        for lo in range(0, N, N // 2):
            part = {i: want[i] for i in range(lo, lo + N // 2)}
            await v.commit(f.ino, part, (lo + N // 2 - 1) * BLOCK + 1, 0, held=list(info.replicas))
        await v.release(f.ino)
        for i in range(SMALL):
            a = await v.create(1, b"small%02d" % i, REG, 0, 0)
            await v.release(a.ino)
        await v.snapshot_create("s")
        await v.unlink(1, b"big")
        for i in range(SMALL):
            await v.unlink(1, b"small%02d" % i)
            a = await v.create(1, b"later%02d" % i, REG, 0, 0)
            await v.release(a.ino)
        with trio.fail_after(60):
            while (await v.statfs())["used"]:
                await trio.sleep(0.2)  # the purge steps of the supervision rounds, observed


async def check_restored(c: FaultCluster, vol: str) -> int:
    """The volume shows snapshot ``s`` (and hands out no inode number again); returns its seq."""
    async with opened(c, vol) as (_vs, v, info):
        names = [n for n, _a in await v.readdir(1, b"", 1000)]
        assert names == [b"big"] + [b"small%02d" % i for i in range(SMALL)], names
        big = await v.lookup(1, b"big")
        attr, got = await v.open(big.ino)
        assert got == {i: whole(h, n) for i, (h, n) in blocks().items()} and attr.size == (N - 1) * BLOCK + 1
        await v.release(big.ino)
        fresh = await v.create(1, b"fresh", REG, 0, 0)
        assert fresh.ino > big.ino + 2 * SMALL  # past every inode made after the snapshot
        await v.release(fresh.ino)
        await v.unlink(1, b"fresh")
        return (await seqs(c, vol, [info.coordinator]))[info.coordinator]


def fsck_clean(c: FaultCluster, vol: str) -> None:
    proc = c.cli("fsck", vol, "--json", check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True, proc.stdout + proc.stderr


def replica_kvs(c: FaultCluster, vol: str) -> list[Path]:
    paths = sorted(c.dir.glob(f"nodes/*/state/volumes/{vol}/meta"))
    assert len(paths) == 3, paths
    return paths


def on_every_replica(c: FaultCluster, vol: str, step: object) -> None:
    """With the cluster down: the same batches on every replica's keyspace, as the coordinator's
    replication would have made them before it died."""
    seen = set()
    for path in replica_kvs(c, vol):
        kv = RocksKV(str(path))
        snap = RocksKV(str(path.parent / "snapshots" / "s"))
        try:
            step(kv, snap)  # type: ignore[operator]
            seen.add((kv.seq, kv.log_entry(kv.seq)))
        finally:
            snap.close()
            kv.close()
    assert len(seen) == 1, "the replicas were not in step"


def test_restore_of_many_keys_goes_in_bounded_batches(cluster3: FaultCluster) -> None:
    c, vol = cluster3, "jobs-restore"

    async def run() -> None:
        await populate(c, vol)
        info = await get_volume(c, vol)
        before = (await seqs(c, vol, [info.coordinator]))[info.coordinator]
        async with opened(c, vol) as (_vs, v, _info):
            await v.restore("s")
        after = await check_restored(c, vol)
        # The mark, then a batch per STEP_OPS keys put back at most, then the fresh file's create
        # and unlink: not one batch (nor two).
        assert after - before >= N // maintenance.STEP_OPS + 2

    trio.run(run)
    wait_volume(c, vol, healthy(), "healthy after the restore")
    fsck_clean(c, vol)
    repaired = json.loads(c.cli("fsck", vol, "--repair", "--json").stdout)
    assert repaired["ok"] is True and repaired["blocks"] == N


def test_a_restore_killed_half_way_is_finished_before_anything_is_served(cluster3: FaultCluster) -> None:
    c, vol = cluster3, "jobs-crash"
    trio.run(populate, c, vol)
    wait_volume(c, vol, healthy(), "healthy before the crash")

    # Killed after two steps on every replica: the keyspaces are a mix, with the mark saying so.
    c.down()

    def half(kv: RocksKV, snap: RocksKV) -> None:
        maintenance.begin_restore(kv, "s", snap)
        assert not maintenance.restore_step(kv, snap)
        assert not maintenance.restore_step(kv, snap)

    on_every_replica(c, vol, half)
    c.up()

    async def served() -> None:
        with trio.fail_after(60):
            while True:
                try:
                    await check_restored(c, vol)
                    return
                except (Unavailable, Conflict):
                    await trio.sleep(0.2)  # starting, or the supervision round is finishing the restore

    trio.run(served)
    fsck_clean(c, vol)

    # A mark no replica can finish (its snapshot is gone): refused until a restore ends it.
    c.down()

    def unfinishable(kv: RocksKV, _snap: RocksKV) -> None:
        b = Batch()
        b.put(keys.MAINTENANCE_KEY, maintenance.Job(maintenance.RESTORE, "lost").encode())
        kv.write(b)

    on_every_replica(c, vol, unfinishable)
    c.up()

    async def refused() -> None:
        with trio.fail_after(60):
            while True:
                try:
                    async with opened(c, vol) as (_vs, v, _info):
                        await v.getattr(1)
                except (Unavailable, Conflict) as err:
                    if "restore to snapshot lost is under way" in str(err):
                        return
                    await trio.sleep(0.2)  # still starting
                    continue
                raise AssertionError("a volume with an unfinished restore was served")

    trio.run(refused)
    c.cli("volume", "restore", f"{vol}@s", "--force")
    trio.run(check_restored, c, vol)
    fsck_clean(c, vol)
