"""Faults injected for real while an application writes (issue 4): nodes SIGKILLed, stopped, removed,
the replication factor changed under load.

Every test runs a ``ManifestWriter`` (fsynced files, one manifest line per acknowledged file) against
a mounted volume while the fault happens, then checks that the writer saw no error, made progress
after the fault, and that every acknowledged file verifies byte for byte through the mount AND on
each replica's own chunks once the volume is healthy again. The longest time the application saw no
progress (``writer.max_stall()``) is printed and recorded as the ``max_stall_s`` property.

Never kill ``n1``: the seed holds the embedded control store and cannot fail over (documented).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from pxfs.meta.kv import RocksKV
from tests.conftest import Cluster, Mount, eventually, mount, mounted
from tests.system.faults import (
    FAILOVER_TIMEOUT,
    SEED,
    FaultCluster,
    fault_cluster,
    followers,
    healthy,
    inspect,
    node_state,
    wait_volume,
)
from tests.system.manifest import ManifestWriter, MiB, verify_on_replicas, verify_through_mount
from tests.system.test_mount_crash import mount_pid

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE")

# Small files keep a run short on 2 cores; still above one 1 MiB block now and then, so holes and
# multi-block files are part of every run.
MAX_SIZE = 3 * MiB // 2
# Files the writer must acknowledge after a fault: proof the application carries on, not just survives.
PROGRESS = 8


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[FaultCluster]:
    yield from fault_cluster(tmp_path, 3)


@pytest.fixture
def cluster4(tmp_path: Path) -> Iterator[FaultCluster]:
    # A follower that stays away 5 s (after the 3 s heartbeat window) is replaced.
    yield from fault_cluster(tmp_path, 4, "--replace-after", "5")


# ------------------------------------------------------------------------------------------------
# Helpers


@dataclass
class Run:
    cluster: Cluster
    vol: str
    mount: Mount
    writer: ManifestWriter

    @property
    def target(self) -> Path:
        return self.mount.path / "w"

    def progress(self, n: int = PROGRESS, timeout: float = 90.0) -> None:
        """The writer acknowledges ``n`` more files (it carries on after the fault)."""
        self.writer.wait_for(len(self.writer.entries()) + n, timeout=timeout)


@contextmanager
def writing(cluster: Cluster, tmp_path: Path, repl: int = 3, seed: int = 0) -> Iterator[Run]:
    """A fresh volume, mounted, with a writer running (a few files acknowledged already)."""
    vol = f"faults-{uuid.uuid4().hex[:8]}"
    cluster.cli("volume", "create", vol, "--size", "1G", "--repl", str(repl))
    with mounted(cluster, vol, tmp_path / "mnt") as m:
        writer = ManifestWriter(m.path / "w", tmp_path / "writer", seed=seed, max_size=MAX_SIZE)
        try:
            writer.start()
            writer.wait_for(5, timeout=60)
            yield Run(cluster, vol, m, writer)
        finally:
            writer.kill()


def finish(run: Run, record_property: Callable[[str, object], None], label: str) -> dict[str, Any]:
    """Stop the writer; no errors; every entry verifies through the mount and on every replica of the
    (healthy) volume. All checks run before one assertion, so a failure says everything that broke.
    Returns the final ``volume inspect``."""
    run.writer.stop()
    entries = run.writer.entries()
    stall = run.writer.max_stall()
    record_property("max_stall_s", round(stall, 3))
    record_property("files", len(entries))
    print(f"\n[{label}] {len(entries)} files, {sum(e.size for e in entries)} bytes, "
          f"max stall {stall:.2f}s")
    failures = [f"the application saw an error: {line}" for line in run.writer.errors()]
    failures += [str(p) for p in verify_through_mount(run.target, entries)]
    info = wait_volume(run.cluster, run.vol, healthy(), "volume healthy before the replica check")
    failures += [str(p) for p in trio.run(verify_on_replicas, run.cluster, run.vol, run.target, entries)]
    assert failures == [], f"replicas {info['replicas']}"
    return info


# ------------------------------------------------------------------------------------------------
# The faults



def test_follower_killed_and_back(cluster3: FaultCluster, tmp_path: Path,
                                  record_property: Callable[[str, object], None]) -> None:
    """SIGKILL a follower during writes: degraded with it named; it returns and catches up by itself."""
    with writing(cluster3, tmp_path) as run:
        before = inspect(cluster3, run.vol)
        victim = followers(before)[0]
        cluster3.kill(victim)
        wait_volume(cluster3, run.vol, lambda v: v["state"] == "degraded" and victim in v["missing_replicas"],
                    "degraded with the killed follower missing", timeout=20)
        run.progress()  # writes go on while it is away: the follower misses batches and chunks
        cluster3.up()
        after = wait_volume(cluster3, run.vol, healthy(lambda v: victim in v["replicas"]),
                            "healthy again after the follower returned")
        assert (after["coordinator"], after["epoch"]) == (before["coordinator"], before["epoch"])
        assert sorted(after["replicas"]) == sorted(before["replicas"])
        run.progress()
        info = finish(run, record_property, "follower SIGKILL")
    cluster3.down()
    assert_replicas_identical(cluster3, run.vol, info["replicas"])


def test_coordinator_killed_fails_over(cluster3: FaultCluster, tmp_path: Path,
                                       record_property: Callable[[str, object], None]) -> None:
    """SIGKILL the coordinator: a follower takes over under epoch + 1, the mount follows it without
    an error; the old coordinator comes back as a follower."""
    with writing(cluster3, tmp_path) as run:
        before = inspect(cluster3, run.vol)
        old = before["coordinator"]
        assert old != SEED
        cluster3.kill(old)
        moved = wait_volume(cluster3, run.vol, lambda v: v["coordinator"] != old, "failover",
                            timeout=FAILOVER_TIMEOUT)
        assert moved["epoch"] == before["epoch"] + 1
        assert moved["coordinator"] in before["replicas"]
        run.progress()
        cluster3.up()
        after = wait_volume(cluster3, run.vol, healthy(lambda v: old in v["replicas"]),
                            "healthy with the old coordinator back as a follower")
        assert (after["coordinator"], after["epoch"]) == (moved["coordinator"], moved["epoch"])
        run.progress()
        info = finish(run, record_property, "coordinator SIGKILL")
    cluster3.down()
    assert_replicas_identical(cluster3, run.vol, info["replicas"])


def test_two_nodes_lost_one_after_another(cluster4: FaultCluster, tmp_path: Path,
                                          record_property: Callable[[str, object], None]) -> None:
    """Kill follower A: it is replaced and the volume healthy again; bring A back (now spare), kill a
    second replica B: replaced again (on A, from scratch). All data on the final replica set."""
    with writing(cluster4, tmp_path) as run:
        first = inspect(cluster4, run.vol)
        a = followers(first)[0]
        cluster4.kill(a)
        second = wait_volume(cluster4, run.vol, healthy(lambda v: a not in v["replicas"]),
                             "A replaced and healthy", timeout=90)
        assert second["coordinator"] == first["coordinator"]
        run.progress()
        cluster4.up()  # A returns as a spare: no longer a replica of the volume
        eventually(lambda: node_state(cluster4, a) == "up", timeout=20, what=f"{a} up again")
        candidates = followers(second)
        b = candidates[0] if candidates else second["coordinator"]
        cluster4.kill(b)
        final = wait_volume(cluster4, run.vol, healthy(lambda v: b not in v["replicas"]),
                            "B replaced and healthy", timeout=90)
        assert a in final["replicas"], "the only spare node left was A"
        run.progress()
        info = finish(run, record_property, "two nodes, repair between")
        assert b not in info["replicas"] and len(info["replicas"]) == 3


def test_node_removed_for_good(cluster4: FaultCluster, tmp_path: Path,
                               record_property: Callable[[str, object], None]) -> None:
    """`pxfs node remove` of a live follower: its replica moves elsewhere; node list says removed."""
    with writing(cluster4, tmp_path) as run:
        before = inspect(cluster4, run.vol)
        gone = followers(before)[0]
        cluster4.cli("node", "remove", gone)
        after = wait_volume(cluster4, run.vol, healthy(lambda v: gone not in v["replicas"]),
                            "a new replica set without the removed node", timeout=90)
        assert len(after["replicas"]) == 3
        assert after["coordinator"] == before["coordinator"]
        assert node_state(cluster4, gone) == "removed"
        run.progress()
        info = finish(run, record_property, "node remove")
        assert gone not in info["replicas"]


def test_ha_update_up_and_down_under_load(cluster3: FaultCluster, tmp_path: Path,
                                          record_property: Callable[[str, object], None]) -> None:
    """`volume ha-update --repl 3` on a repl-2 volume while writing, then back to 2."""
    with writing(cluster3, tmp_path, repl=2) as run:
        before = inspect(cluster3, run.vol)
        assert len(before["replicas"]) == 2
        cluster3.cli("volume", "ha-update", run.vol, "--repl", "3")
        up = wait_volume(cluster3, run.vol, healthy(lambda v: v["repl"] == 3 and len(v["replicas"]) == 3),
                         "three healthy replicas")
        assert set(before["replicas"]) < set(up["replicas"])
        run.progress()
        # The new replica got everything written before and during the change.
        entries = run.writer.entries()
        assert [str(p) for p in trio.run(verify_on_replicas, cluster3, run.vol, run.target, entries)] == []
        cluster3.cli("volume", "ha-update", run.vol, "--repl", "2")
        down = wait_volume(cluster3, run.vol, healthy(lambda v: v["repl"] == 2 and len(v["replicas"]) == 2),
                           "two healthy replicas")
        assert down["coordinator"] == up["coordinator"]
        assert set(down["replicas"]) < set(up["replicas"])
        run.progress()
        info = finish(run, record_property, "ha-update 2->3->2")
        assert len(info["replicas"]) == 2


def replica_metadata(cluster: Cluster, vol: str, node: str) -> tuple[int, dict[bytes, bytes], list[bytes | None]]:
    """A stopped node's copy of the volume's metadata: last seq, the whole keyspace, the batch log."""
    kv = RocksKV(str(cluster.dir / "nodes" / node / "state" / "volumes" / vol / "meta"))
    try:
        return kv.seq, dict(kv.scan(b"")), [kv.log_entry(s) for s in range(1, kv.seq + 1)]
    finally:
        kv.close()


def assert_replicas_identical(cluster: Cluster, vol: str, replicas: list[str]) -> None:
    """After `pxfs down`: every replica holds the same batches and the same keyspace, byte for byte
    (a follower that kept a batch of a deposed coordinator has silently diverged)."""
    copies = {r: replica_metadata(cluster, vol, r) for r in replicas}
    ref, (seq, keys, log) = replicas[0], copies[replicas[0]]
    for r in replicas[1:]:
        rseq, rkeys, rlog = copies[r]
        assert rseq == seq, f"replica {r} at seq {rseq}, {ref} at {seq}"
        bad = [i + 1 for i, (a, b) in enumerate(zip(log, rlog, strict=True)) if a != b]
        assert not bad, f"replica {r} holds other batches than {ref} at seq {bad[:10]}"
        differ = sorted(k for k in keys.keys() | rkeys.keys() if keys.get(k) != rkeys.get(k))
        assert not differ, f"replica {r} keyspace differs from {ref} at {len(differ)} keys, e.g. {differ[:5]}"


def _stop_and_wait_failover(cluster: FaultCluster, run: Run) -> tuple[dict[str, Any], dict[str, Any], int]:
    """SIGSTOP the coordinator (its process keeps the old epoch's state) and wait for the failover."""
    before = inspect(cluster, run.vol)
    old = before["coordinator"]
    assert old != SEED
    pid = cluster.pid(old)
    os.kill(pid, signal.SIGSTOP)
    moved = wait_volume(cluster, run.vol, lambda v: v["coordinator"] != old, "failover", timeout=FAILOVER_TIMEOUT)
    assert moved["epoch"] == before["epoch"] + 1
    assert moved["coordinator"] in before["replicas"]
    return before, moved, pid


def test_stopped_coordinator_is_deposed_and_returns_as_follower(
        cluster3: FaultCluster, tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    """SIGSTOP the coordinator until a follower took over; SIGCONT: the deposed one (whatever the mount
    had queued at it) must not get a write acknowledged for the old epoch nor leave a batch of its
    epoch on any replica; it rejoins as a follower, and all acknowledged data verifies."""
    with writing(cluster3, tmp_path) as run:
        try:
            before, moved, pid = _stop_and_wait_failover(cluster3, run)
            frozen_at = len(run.writer.entries())
        finally:
            cluster3.resume_all()
        old = before["coordinator"]
        run.progress()
        after = wait_volume(cluster3, run.vol, healthy(lambda v: old in v["replicas"]),
                            "healthy with the old coordinator back as a follower")
        assert (after["coordinator"], after["epoch"]) == (moved["coordinator"], moved["epoch"])
        run.progress()
        info = finish(run, record_property, "coordinator SIGSTOP/SIGCONT")
        print(f"[coordinator SIGSTOP/SIGCONT] {frozen_at} files before the failover")
        assert (info["coordinator"], info["epoch"]) == (moved["coordinator"], moved["epoch"])
        assert old in info["replicas"] and old != info["coordinator"]
    cluster3.down()  # the copies on disk, compared with the nodes stopped
    assert_replicas_identical(cluster3, run.vol, [info["coordinator"]] + [r for r in info["replicas"]
                                                                          if r != info["coordinator"]])


def test_mount_moves_on_while_old_coordinator_is_frozen(
        cluster3: FaultCluster, tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    """After the failover the application must make progress against the new coordinator even while
    the deposed one is still stopped (a hung node, not a dead one)."""
    with writing(cluster3, tmp_path) as run:
        try:
            _stop_and_wait_failover(cluster3, run)
            run.progress(timeout=35)  # the chunk put timeout is 30 s: allow for one
        finally:
            cluster3.resume_all()
        finish(run, record_property, "frozen coordinator")


def test_unlinked_open_files_survive_a_failover(cluster3: FaultCluster, tmp_path: Path) -> None:
    """A file unlinked while open lives on at the new coordinator, which its mount tells that it holds
    it; an orphan whose only holder (a killed mount) never comes back is freed once that mount's
    registration has expired, and the survivor when its last handle closes."""
    c = cluster3
    c.cli("volume", "create", "orphans", "--size", "1G", "--repl", "3")
    old = inspect(c, "orphans")["coordinator"]
    assert old != SEED
    kept, lost = os.urandom(2 * MiB), os.urandom(3 * MiB)
    fd = -1
    with mounted(c, "orphans", tmp_path / "a", "-o", "attr_timeout=0") as a:
        b = mount(c, "orphans", tmp_path / "b")
        try:
            for path, data in ((a.path / "kept", kept), (b.path / "lost", lost)):
                with open(path, "wb") as fh:
                    fh.write(data)
                    os.fsync(fh.fileno())
            fd = os.open(a.path / "kept", os.O_RDWR)
            held_by_b = os.open(b.path / "lost", os.O_RDONLY)
            os.unlink(a.path / "kept")
            os.unlink(b.path / "lost")
            wait_volume(c, "orphans", lambda v: v["used"] == len(kept) + len(lost), "both files orphans, in use")
            pid = mount_pid(b.path)
            pidfd = os.pidfd_open(pid)
            os.kill(pid, signal.SIGKILL)  # b never reconnects: only its registration's expiry frees "lost"
            assert select.select([pidfd], [], [], 30)[0], "mount b still running"
            os.close(pidfd)
            with contextlib.suppress(OSError):
                os.close(held_by_b)  # ENOTCONN from the dead mount; the descriptor is gone anyway
            c.kill(old)
            wait_volume(c, "orphans", lambda v: v["coordinator"] not in (old, ""), "failover",
                        timeout=FAILOVER_TIMEOUT)
            # The next call finds the new coordinator; the open handle goes along with the reconnect.
            st = os.fstat(fd)  # attr_timeout=0: asked of the coordinator
            assert (st.st_nlink, st.st_size) == (0, len(kept))
            wait_volume(c, "orphans", lambda v: v["used"] == len(kept),
                        "the killed mount's orphan freed, the reopened one kept", timeout=60)
            assert os.pread(fd, len(kept), 0) == kept
            os.pwrite(fd, b"more", len(kept))
            os.fsync(fd)  # its metadata is still there to commit to
            assert os.fstat(fd).st_size == len(kept) + 4
            os.close(fd)
            fd = -1
            wait_volume(c, "orphans", lambda v: v["used"] == 0, "the last close frees it")
            with pytest.raises(FileNotFoundError):
                os.stat(a.path / "kept")
        finally:
            if fd >= 0:
                os.close(fd)
            # b's dead mountpoint ("Transport endpoint is not connected") is cleared by mounting it again.
            with mounted(c, "orphans", tmp_path / "b") as again:
                assert os.listdir(again.path) == []
