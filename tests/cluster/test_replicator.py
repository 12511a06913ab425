"""The replicator's log trimming and full copies, over real replicas on disk and a fake network."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import trio

from pxfs.errors import Unavailable
from pxfs.meta import snapshots
from pxfs.meta.kv import Batch
from pxfs.volume import replicator as rmod
from pxfs.volume.replica import HostedVolume
from pxfs.volume.replicator import LOADING, Replicator


class FakePeers:
    """The replication calls of pxfs.cluster.peers.Peers, straight into the followers' replicas."""

    def __init__(self, followers: dict[str, HostedVolume]) -> None:
        self.f = followers
        self.down: set[str] = set()
        self.loads = 0

    def _up(self, node: str) -> HostedVolume:
        if node in self.down:
            raise Unavailable(f"node {node}", "down")
        return self.f[node]

    async def last_seq(self, node: str, volume: str) -> tuple[int, int, bytes]:
        await trio.lowlevel.checkpoint()
        hv = self._up(node)
        if hv.kv.loading:
            return 0, hv.epoch, LOADING
        last = hv.kv.log_entry(hv.kv.seq)
        return hv.kv.seq, hv.epoch, blake3.blake3(last).digest() if last else b""

    async def apply_many(self, node: str, volume: str, epoch: int, first: int, batches: list[bytes],
                         trimmed: int = 0) -> int:
        await trio.lowlevel.checkpoint()
        hv = self._up(node)
        for seq, b in enumerate(batches, first):
            if seq == hv.kv.seq + 1:
                hv.kv.apply(seq, b)
        if trimmed:
            hv.kv.trim_to(trimmed)
        return hv.kv.seq

    async def reset(self, node: str, volume: str, epoch: int) -> None:
        await trio.lowlevel.checkpoint()
        self._up(node).wipe()

    async def load(self, node: str, volume: str, epoch: int, snapshot: str, items: list[tuple[bytes, bytes]],
                   seq: int, last_batch: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.loads += 1
        self._up(node).load_part(snapshot, items, seq, last_batch)


def put(hv: HostedVolume, i: int, size: int = 100) -> None:
    b = Batch()
    b.put(b"Ak%06d" % i, b"v" * size)
    hv.kv.write(b)


def data(hv: HostedVolume) -> list[tuple[bytes, bytes]]:
    return list(hv.kv.scan(b""))


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[dict[str, HostedVolume]]:
    out = {n: HostedVolume("v", tmp_path / n) for n in ("c", "a", "b")}
    yield out
    for hv in out.values():
        hv.close()


async def settle(rep: Replicator, hv: HostedVolume) -> None:
    """Until every in-sync follower holds everything and the idle trim went out."""
    while await rep.wait_acked(hv.kv.seq, timeout=60):
        pass
    await trio.sleep(rmod.IDLE_TRIM * 3)


async def test_the_log_is_trimmed_to_what_every_in_sync_follower_holds(
        replicas: dict[str, HostedVolume], autojump_clock: trio.testing.MockClock) -> None:
    c, a, b = replicas["c"], replicas["a"], replicas["b"]
    peers = FakePeers({"a": a, "b": b})
    rep = Replicator("v", c.kv, 1, ["a", "b"], peers, copy_view=c.copy_view)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rep.run)
        for i in range(300):
            put(c, i)
            assert await rep.wait_acked(c.kv.seq) == set()
        await settle(rep, c)
        # Each keeps the entry it stands at: that is how a coordinator compares histories.
        assert c.kv.trimmed == c.kv.seq - 1
        assert a.kv.trimmed == b.kv.trimmed == c.kv.seq - 1
        assert data(a) == data(b) == data(c)

        # b is away and out of the set: the log keeps the slack for it, not more.
        peers.down.add("b")
        rep.set_in_sync({"a"})
        kept_for_b = c.kv.seq
        for i in range(300, 500):
            put(c, i)
            await rep.wait_acked(c.kv.seq)
        await settle(rep, c)
        assert c.kv.trimmed < kept_for_b  # b can still be caught up from the log
        peers.down.discard("b")
        while b.kv.seq < c.kv.seq:
            await trio.sleep(0.5)
        assert rep.copies == 0 and data(b) == data(c)
        rep.stop()


async def test_a_follower_behind_the_trimmed_log_gets_a_full_copy_with_its_snapshots(
        replicas: dict[str, HostedVolume], autojump_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rmod, "LOG_SLACK_ENTRIES", 50)
    c, a, b = replicas["c"], replicas["a"], replicas["b"]
    peers = FakePeers({"a": a, "b": b})
    rep = Replicator("v", c.kv, 1, ["a", "b"], peers, copy_view=c.copy_view)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rep.run)
        for i in range(10):
            put(c, i)
        await settle(rep, c)
        peers.down.add("b")
        rep.set_in_sync({"a"})
        snapshots.create(c.kv, "v", "s1", 1)
        for i in range(10, 400):
            put(c, i, 1000)
            await rep.wait_acked(c.kv.seq)
        await settle(rep, c)
        assert c.kv.trimmed > b.kv.seq  # past b: only a copy can bring it back
        peers.down.discard("b")
        while b.kv.seq < c.kv.seq or b.kv.loading:
            await trio.sleep(0.5)
        assert rep.copies == 1 and peers.loads >= 2
        assert data(b) == data(c)
        assert list(b.snapshot_kv("s1").scan(b"")) == list(c.snapshot_kv("s1").scan(b""))
        # From here on b follows the log again.
        put(c, 1000)
        await rep.wait_acked(c.kv.seq)
        assert data(b) == data(c) and rep.copies == 1
        rep.stop()


async def test_a_half_loaded_copy_is_reset_and_sent_again(
        replicas: dict[str, HostedVolume], autojump_clock: trio.testing.MockClock) -> None:
    c, a = replicas["c"], replicas["a"]
    for i in range(5):
        put(c, i)
    c.kv.trim_to(c.kv.seq)
    a.kv.load([(b"Ajunk", b"half")])
    peers = FakePeers({"a": a})
    rep = Replicator("v", c.kv, 1, ["a"], peers, copy_view=c.copy_view)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rep.run)
        assert await rep.wait_acked(c.kv.seq) == set()
        assert not a.kv.loading and data(a) == data(c) and rep.copies == 1
        rep.stop()
