"""Op ids through real `pxfs node` processes: a repeated op id runs once, also at a new coordinator.

A mount retries a mutation with the same op id when its coordinator died before answering; these
cases make those calls by hand on the Volume RPC, as such a mount would, and watch the replicas'
sequence numbers to see how many batches each call wrote.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from pxfs.errors import FsError, Invalid
from pxfs.meta.opids import OpIds
from pxfs.rpc.volume_client import VolumeClient
from tests.cluster.test_hostile import create_volume, expect, node_index, service
from tests.conftest import Cluster, eventually

REG = stat.S_IFREG | 0o644


async def seqs(cluster: Cluster, name: str, replicas: list[str]) -> dict[str, int]:
    out = {}
    for r in replicas:
        async with service(cluster, node_index(r)) as (_conn, vs):
            out[r] = (await vs.last_seq(name))[0]
    return out


async def replicated(cluster: Cluster, name: str, replicas: list[str], seq: int) -> None:
    """Every replica holds batch ``seq`` (followers get it right after the coordinator answers)."""
    with trio.fail_after(30):
        while set((await seqs(cluster, name, replicas)).values()) != {seq}:
            await trio.sleep(0.1)


@asynccontextmanager
async def mounted_at(cluster: Cluster, name: str, node: str, mount_id: str) -> AsyncIterator[VolumeClient]:
    async with service(cluster, node_index(node)) as (_conn, vs):
        vol, _info = await vs.open(name, mount_id, False)
        try:
            yield vol
        finally:
            await vol.drop()


async def test_a_repeated_op_id_runs_once(shared_cluster: Cluster) -> None:
    c = shared_cluster
    info = await create_volume(c, "op-once")
    ops = OpIds()
    async with mounted_at(c, "op-once", info.coordinator, "op-mount") as vol:
        seq0 = (await seqs(c, "op-once", [info.coordinator]))[info.coordinator]
        create = ops.next()
        first = await vol.create(1, b"f", REG, 1000, 1000, op_id=create)
        again = await vol.create(1, b"f", REG, 1000, 1000, op_id=create)
        assert again == first
        mkdir = ops.next()
        d = await vol.mkdir(1, b"d", 0o755, 0, 0, op_id=mkdir)
        assert await vol.mkdir(1, b"d", 0o755, 0, 0, op_id=mkdir) == d
        rename = ops.next()
        await vol.rename(1, b"f", d.ino, b"g", 0, op_id=rename)
        await vol.rename(1, b"f", d.ino, b"g", 0, op_id=rename)  # no ENOENT: it was done
        unlink = ops.next()
        await vol.unlink(d.ino, b"g", op_id=unlink)
        await vol.unlink(d.ino, b"g", op_id=unlink)
        # Four mutations, eight calls: four batches, on every replica.
        await replicated(c, "op-once", info.replicas, seq0 + 4)
        # A new op id is a new operation; a malformed one is refused.
        await expect(FsError, vol.mkdir(1, b"d", 0o755, 0, 0, op_id=ops.next()), (errno.EEXIST,))
        await expect(Invalid, vol.mkdir(1, b"e", 0o755, 0, 0, op_id=b"12345"))
        # Without an op id a call is not idempotent (old callers): the repeat fails.
        await vol.symlink(1, b"s", b"t", 0, 0)
        await expect(FsError, vol.symlink(1, b"s", b"t", 0, 0), (errno.EEXIST,))
        await vol.detach()  # the mount goes: its records go with it
    async with mounted_at(c, "op-once", info.coordinator, "op-mount") as vol:
        await expect(FsError, vol.mkdir(1, b"d", 0o755, 0, 0, op_id=mkdir), (errno.EEXIST,))


async def test_a_new_coordinator_answers_a_retry_from_the_record(cluster: Cluster) -> None:
    """The mount's first coordinator applies and replicates the create, then dies unanswered."""
    c = cluster
    info = await create_volume(c, "op-failover")
    assert info.coordinator != "n1"  # the seed cannot fail over; placement keeps it off coordinator duty
    ops = OpIds()
    create, mkdir, unlink = ops.next(), ops.next(), ops.next()
    async with mounted_at(c, "op-failover", info.coordinator, "op-mount") as vol:
        mine = await vol.create(1, b"excl", REG, 1000, 1000, op_id=create)
        d = await vol.mkdir(1, b"d", 0o755, 0, 0, op_id=mkdir)
        await vol.unlink(1, b"excl", op_id=unlink)
        seq = (await seqs(c, "op-failover", [info.coordinator]))[info.coordinator]
    await replicated(c, "op-failover", info.replicas, seq)
    c.kill(info.coordinator)
    new = await trio.to_thread.run_sync(lambda: eventually(
        lambda: (v := c.json("volume", "inspect", "op-failover"))["coordinator"] != info.coordinator and v,
        timeout=60, what="a failover"))
    async with mounted_at(c, "op-failover", new["coordinator"], "other-mount") as theirs:
        # Another mount takes the name meanwhile: a retry of our create must not adopt its file.
        other = await theirs.create(1, b"excl", REG, 2000, 2000, op_id=OpIds().next())
    async with mounted_at(c, "op-failover", new["coordinator"], "op-mount") as vol:
        before = (await seqs(c, "op-failover", [new["coordinator"]]))[new["coordinator"]]
        assert await vol.create(1, b"excl", REG, 1000, 1000, op_id=create) == mine != other
        assert await vol.mkdir(1, b"d", 0o755, 0, 0, op_id=mkdir) == d
        await vol.unlink(1, b"excl", op_id=unlink)  # applied before the failover: success, not ENOENT
        assert (await seqs(c, "op-failover", [new["coordinator"]]))[new["coordinator"]] == before
        assert (await vol.lookup(1, b"excl")).ino == other.ino  # and the other mount's file is untouched
        await expect(FsError, vol.create(1, b"excl", REG, 1000, 1000, op_id=ops.next()), (errno.EEXIST,))
