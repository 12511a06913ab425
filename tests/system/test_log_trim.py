"""The replication log is trimmed and every replica compacted (issue 13): metadata on each replica's
disk follows the live metadata, and a follower that slept past the trimmed log gets a full copy."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pxfs.meta.kv import RocksKV
from tests.conftest import mounted
from tests.system.faults import SEED, FaultCluster, fault_cluster, healthy, inspect, wait_volume
from tests.system.test_durability import KiB, verify_fresh, write_durably

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE")

MiB = 1 << 20
VALUE = 60000


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[FaultCluster]:
    yield from fault_cluster(tmp_path, 3)


def on_disk(info: dict[str, Any]) -> dict[str, dict[str, int]]:
    return info["replica_meta"]


def fill_xattrs(path: Path, n: int, tag: str = "x") -> None:
    for i in range(n):
        os.setxattr(path, f"user.{tag}{i:04d}", os.urandom(VALUE))


def test_metadata_on_each_replica_returns_to_its_live_size(cluster3: FaultCluster, tmp_path: Path) -> None:
    c, vol = cluster3, "churn"
    c.cli("volume", "create", vol, "--size", "1G", "--repl", "3")
    wait_volume(c, vol, healthy(), "volume healthy")
    with mounted(c, vol, tmp_path / "mnt") as m:
        f = m.path / "f"
        f.touch()
        fill_xattrs(f, 400)  # 24 MB of xattrs, in 400 batches of the log
        full = wait_volume(c, vol, lambda v: len(on_disk(v)) == 3 and v["meta_bytes"] > 20 * MiB, "usage report")
        assert all(r["disk_bytes"] > 20 * MiB for r in on_disk(full).values()), on_disk(full)
        for name in os.listxattr(f):
            os.removexattr(f, name)

        def small(v: dict[str, Any]) -> bool:
            return (len(on_disk(v)) == 3 and v["meta_bytes"] < KiB
                    and all(r["disk_bytes"] < 2 * MiB and r["log_entries"] < 100 for r in on_disk(v).values()))

        after = wait_volume(c, vol, small, "every replica back near its live metadata", timeout=90)
    print("metadata per replica, full:", {n: r["disk_bytes"] for n, r in on_disk(full).items()},
          "after the removal:", {n: r["disk_bytes"] for n, r in on_disk(after).items()})


def keyspace(path: Path) -> tuple[int, list[tuple[bytes, bytes]]]:
    kv = RocksKV(str(path))
    try:
        return kv.seq, list(kv.scan(b""))
    finally:
        kv.close()


def test_a_follower_behind_the_trimmed_log_gets_a_full_copy(cluster3: FaultCluster, tmp_path: Path) -> None:
    """F (not the seed: it holds the control store) is frozen while the others take more than the log
    keeps for it, and a snapshot. Resumed, it is behind the trimmed log: it gets a full copy (its
    snapshot too) and rejoins the in-sync set; its keyspace is then the coordinator's, key for key."""
    c, vol = cluster3, "sleeper"
    c.cli("volume", "create", vol, "--size", "1G", "--repl", "3")
    info = wait_volume(c, vol, healthy(), "volume healthy")
    coordinator = info["coordinator"]
    f = next(r for r in info["replicas"] if r not in (coordinator, SEED))
    with mounted(c, vol, tmp_path / "mnt") as m:
        entries = [write_durably(m.path, "before", 64 * KiB, seed=1)]
        stopped_at = on_disk(inspect(c, vol))[f]["seq"]
        os.kill(c.pid(f), signal.SIGSTOP)
        try:
            entries.append(write_durably(m.path, "during", 64 * KiB, seed=2))  # F leaves the in-sync set
            c.cli("snapshot", "create", vol, "--name", "nap")
            fill_xattrs(m.path / "during", 200)  # 12 MB: more than the log keeps for a follower out of sync
            entries.append(write_durably(m.path, "late", 64 * KiB, seed=3))
            trimmed = wait_volume(c, vol, lambda v: coordinator in on_disk(v) and
                                  on_disk(v)[coordinator]["seq"] - on_disk(v)[coordinator]["log_entries"] > stopped_at,
                                  "the coordinator's log trimmed past the frozen follower")
            assert f not in trimmed["in_sync"]
        finally:
            os.kill(c.pid(f), signal.SIGCONT)
        back = wait_volume(c, vol, healthy(lambda v: f in v["in_sync"] and len(on_disk(v)) == 3
                                           and len({r["seq"] for r in on_disk(v).values()}) == 1),
                           "the follower back in sync", timeout=120)
        assert f in back["in_sync"]
    log = (c.dir / "nodes" / f / "node.log").read_text()
    assert "full copy loaded" in log
    assert verify_fresh(c, vol, tmp_path / "fresh", entries) == []
    c.down()
    state = {n: c.dir / "nodes" / n / "state" / "volumes" / vol for n in info["replicas"]}
    copies = {n: keyspace(state[n] / "meta") for n in info["replicas"]}
    seqs = {n: seq for n, (seq, _) in copies.items()}
    assert len(set(seqs.values())) == 1, seqs
    assert copies[f][1] == copies[coordinator][1]
    snaps = {n: keyspace(state[n] / "snapshots" / "nap")[1] for n in (f, coordinator)}
    assert snaps[f] == snaps[coordinator] and snaps[f]
