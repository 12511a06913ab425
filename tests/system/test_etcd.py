"""The etcd control store (issue 11): no node is special, so any one may die, and so may one etcd member.

A 3-node cluster on a local 3-member etcd cluster (`pxfs up --store etcd`), a repl-3 volume mounted
through FUSE, a writer that records only what fsync acknowledged. Each test kills one thing with
SIGKILL while the writer runs, checks that acknowledged writes go on (or resume after a failover,
as a stall rather than an error) and that every acknowledged file reads back, through the mount and
on every replica once the killed process is back.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from pxfs.cli import etcd_local
from pxfs.cluster.backends import MANAGER_ELECTION, direct_store
from pxfs.cluster.config import load_config
from tests.conftest import (
    PXFS,
    Cluster,
    _leftover_pids,
    _stray_mounts,
    eventually,
    free_port_block,
    mounted,
    pxfs_env,
    stop_and_check,
)
from tests.system.faults import FaultCluster, healthy, inspect, wait_volume
from tests.system.manifest import Entry, ManifestWriter, max_stall, verify_on_replicas, verify_through_mount

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE"),
    pytest.mark.skipif(etcd_local.shutil.which("etcd") is None, reason="needs etcd (etcd-server)"),
]

NODES = 3
ETCD_MEMBERS = 3
# Past a lease expiry (3 s), an election round, the failover delay and the mount's next lookup.
WRITES_AFTER = 15.0


@pytest.fixture
def ecluster(tmp_path: Path) -> Iterator[FaultCluster]:
    base = free_port_block(NODES + 2 * ETCD_MEMBERS)  # the nodes' ports, then two per etcd member
    c = FaultCluster(dir=tmp_path / "cluster", base_port=base, nodes=NODES, settings=(
        "--store", "etcd", "--etcd-members", str(ETCD_MEMBERS), "--etcd-base-port", str(base + NODES)))
    try:
        c.up()
        yield c
    finally:
        c.resume_all()
        stop_and_check(c)  # fails on any process left behind, etcd members included


def _on_store(c: Cluster, fn: Callable[[Any], Any]) -> Any:
    """``fn(store)`` on the cluster's etcd, as a client reaches it."""
    async def go() -> Any:
        store = direct_store(load_config(c.dir), c.dir)
        assert store is not None
        try:
            return await fn(store)
        finally:
            await store.aclose()
    return trio.run(go)


def manager(c: Cluster) -> str:
    return _on_store(c, lambda s: s.holder(MANAGER_ELECTION))


def members(c: FaultCluster) -> list[dict[str, Any]]:
    return _on_store(c, lambda s: s.members())


def kill_pid(pid: int) -> None:
    """SIGKILL a process that is not our child and wait for its exit on a pidfd."""
    fd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        select.select([fd], [], [], 30)
    finally:
        os.close(fd)


def write_through_fault(c: FaultCluster, tmp_path: Path, vol: str, fault: Callable[[], None]) -> list[Entry]:
    """Mount ``vol``, run the writer, inject ``fault``; returns the acknowledged files once writes
    went on for WRITES_AFTER seconds past it with no error, each checked through the mount."""
    with mounted(c, vol, tmp_path / f"m-{vol}") as m:
        writer = ManifestWriter(m.path, tmp_path / f"writer-{vol}", max_size=256 << 10)
        try:
            writer.start()
            before = len(writer.wait_for(10))
            fault()
            t0 = time.monotonic()
            eventually(lambda: any(e.acked > t0 + WRITES_AFTER for e in writer.entries()), timeout=90,
                       what=f"files acknowledged {WRITES_AFTER:g}s after the fault")
            writer.stop()
        finally:
            writer.kill()
        assert writer.errors() == [], writer.errors()
        entries = writer.entries()
        after = [e for e in entries if e.acked > t0]
        first = min(e.acked for e in after) - t0
        print(f"{vol}: {len(after)} files acknowledged after the fault; first {first:.2f}s after it; longest stall "
              f"{max_stall(entries[before - 1:]):.2f}s")
        assert [str(p) for p in verify_through_mount(m.path, entries)] == []
    return entries


def back_and_verified(c: FaultCluster, tmp_path: Path, vol: str, entries: list[Entry]) -> dict[str, Any]:
    """Restart what was killed; once the volume is healthy, every acknowledged file is on every replica."""
    c.up()
    info = wait_volume(c, vol, healthy(), "healthy with every process back", timeout=90)
    with mounted(c, vol, tmp_path / f"again-{vol}") as m:
        assert [str(p) for p in verify_through_mount(m.path, entries)] == []
        assert [str(p) for p in trio.run(verify_on_replicas, c, vol, m.path, entries)] == []
    return info


def test_kill_a_follower_node(ecluster: FaultCluster, tmp_path: Path) -> None:
    c = ecluster
    c.cli("volume", "create", "fol", "--size", "2G", "--repl", "3")
    info = wait_volume(c, "fol", healthy(), "healthy")
    boss = eventually(lambda: manager(c), what="a manager elected")
    # A follower that is not the manager: only the replica set changes (case b kills the manager).
    victim = next(r for r in info["replicas"] if r not in (info["coordinator"], boss))
    entries = write_through_fault(c, tmp_path, "fol", lambda: c.kill(victim))
    now = inspect(c, "fol")
    assert now["coordinator"] == info["coordinator"] and victim in now["missing_replicas"], now
    back_and_verified(c, tmp_path, "fol", entries)


def test_kill_the_manager_node(ecluster: FaultCluster, tmp_path: Path) -> None:
    """The node holding the manager election also coordinates the volume: only a new manager, on
    another node, can fail the volume over, and the writes resume once it has."""
    c = ecluster
    boss = eventually(lambda: manager(c), what="a manager elected")
    # Coordinator duty is spread over the nodes: one of three repl-3 volumes is the manager's.
    for i in range(NODES):
        c.cli("volume", "create", f"mg{i}", "--size", "1G", "--repl", "3")
    vol = next(f"mg{i}" for i in range(NODES) if inspect(c, f"mg{i}")["coordinator"] == boss)
    before = wait_volume(c, vol, healthy(), "healthy")
    killed_at: list[float] = []

    def kill_manager() -> None:
        killed_at.append(time.monotonic())
        c.kill(boss)

    entries = write_through_fault(c, tmp_path, vol, kill_manager)
    new_boss = manager(c)
    assert new_boss not in ("", boss), new_boss
    now = inspect(c, vol)
    assert now["coordinator"] not in (boss, "") and now["epoch"] == before["epoch"] + 1, now
    first = min(e.acked for e in entries if e.started > killed_at[0])
    print(f"manager {boss} killed; manager now {new_boss}; {vol} coordinator {boss} -> {now['coordinator']}; "
          f"first write begun after the kill acknowledged {first - killed_at[0]:.2f}s after it")
    back_and_verified(c, tmp_path, vol, entries)
    assert manager(c) == new_boss  # the old manager, back, does not take the election back


def test_kill_one_etcd_member(ecluster: FaultCluster, tmp_path: Path) -> None:
    """The etcd leader, the member that hurts most: writes go on, nodes stay up, no failover."""
    c = ecluster
    c.cli("volume", "create", "em", "--size", "2G", "--repl", "3")
    before = wait_volume(c, "em", healthy(), "healthy")
    leader = eventually(lambda: next((m for m in members(c) if m.get("leader")), None), what="an etcd leader")
    member = next(m for m in etcd_local.load(c.dir) if m.endpoint == leader["endpoint"])
    pid = etcd_local.running(member)
    assert pid is not None
    entries = write_through_fault(c, tmp_path, "em", lambda: kill_pid(pid))
    now = inspect(c, "em")
    assert (now["coordinator"], now["epoch"]) == (before["coordinator"], before["epoch"]), now
    status = c.json("status")
    assert isinstance(status, dict)
    health = {m["endpoint"]: m["healthy"] for m in status["store"]["members"]}
    assert health[member.endpoint] is False and sum(health.values()) == ETCD_MEMBERS - 1, health
    assert status["health"] == "degraded"
    assert all(n["state"] == "up" for n in status["nodes"]), status["nodes"]
    back_and_verified(c, tmp_path, "em", entries)
    eventually(lambda: all(m["healthy"] for m in members(c)), what="the etcd member healthy again")


def test_cluster_init_on_etcd_and_nodes_started_by_hand(tmp_path: Path) -> None:
    """The several-machine set-up on one host: an etcd run apart from pxfs, `pxfs cluster init
    --store etcd://...`, `pxfs node start` per node; cluster.json lists no node, so the CLI and the
    mount find the nodes in etcd."""
    base = free_port_block(2 + 2)
    etcd_dir = tmp_path / "etcd-host"
    member = etcd_local.plan(etcd_dir, 1, base + 2)
    procs: list[subprocess.Popen] = []
    c = Cluster(dir=tmp_path / "cluster", base_port=base, nodes=2)
    url = f"etcd://{member[0].endpoint}/prod"
    try:
        etcd_proc = etcd_local.spawn(member[0], member, "test")
        trio.run(etcd_local.wait_healthy, member, {"e1": etcd_proc})
        out = subprocess.run([*PXFS, "cluster", "init", "--dir", str(c.dir), "--store", url, "--json"],
                             capture_output=True, text=True, env=pxfs_env(), timeout=60)
        assert out.returncode == 0, out.stderr
        cfg = load_config(c.dir)
        assert (cfg.store, cfg.seed, cfg.nodes) == (url, "", [])
        # The same prefix again: refused, naming the store and the cluster it holds.
        again = subprocess.run([*PXFS, "cluster", "init", "--dir", str(tmp_path / "other"), "--store", url],
                               capture_output=True, text=True, env=pxfs_env(), timeout=60)
        assert again.returncode == 1 and f"control store {url}: already holds cluster {cfg.id}" in again.stderr
        assert again.stderr.count("\n") == 1, again.stderr  # one line, no traceback
        for i in (1, 2):
            nd = tmp_path / f"host{i}"
            log = open(tmp_path / f"n{i}.log", "wb")
            procs.append(subprocess.Popen(
                [*PXFS, "node", "start", "--cluster", str(c.dir), "--listen", f"127.0.0.1:{base + i - 1}",
                 "--id", f"n{i}", "--pool", f"{nd / 'pool'},size=1G", "--state", str(nd / "state")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=pxfs_env(), cwd="/"))

        def both_up() -> dict[str, Any] | None:
            proc = c.cli("status", "--json", check=False)
            if proc.returncode != 0:
                # Until a node has registered in etcd the CLI knows no address to try.
                assert "no node answers" in proc.stderr, proc.stderr
                return None
            status = json.loads(proc.stdout)
            assert isinstance(status, dict)
            return status if sum(n["state"] == "up" for n in status["nodes"]) == 2 else None

        status = eventually(both_up, what="both nodes up")
        assert [m["healthy"] for m in status["store"]["members"]] == [True]
        eventually(lambda: manager(c), what="a manager elected")
        c.cli("volume", "create", "v", "--size", "1G", "--repl", "2")
        with mounted(c, "v", tmp_path / "mnt") as m:
            (m.path / "hello").write_text("from a host without a node\n")
            assert (m.path / "hello").read_text() == "from a host without a node\n"
    finally:
        _stray_mounts(c.dir)
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        etcd_local.stop(etcd_dir)
    assert _leftover_pids(tmp_path) == []
