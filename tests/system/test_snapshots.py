"""Snapshots, clones, restore, schedules, dedup accounting and GC on a real cluster."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import blake3
import pytest
import trio

from pxfs.cluster.config import MIN_GC_GRACE
from tests.conftest import Cluster, age_chunks, eventually, mounted, node_connection
from tests.system.manifest import ManifestWriter, verify_through_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root and FUSE")
MiB = 1 << 20


def pool_used(cluster: Cluster) -> dict[str, int]:
    """Bytes in each node's pools, asked of the nodes themselves (the cluster map lags a heartbeat)."""
    async def ask() -> dict[str, int]:
        out = {}
        for i in range(cluster.nodes):
            async with node_connection(cluster, i) as conn:
                for p in await (await conn.chunks()).stats():
                    out[p.node] = out.get(p.node, 0) + p.used
        return out
    return trio.run(ask)


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        os.fsync(fh.fileno())


def test_snapshot_while_writing_shows_the_snapshot_point(shared_cluster: Cluster, tmp_path: Path) -> None:
    c = shared_cluster
    c.cli("volume", "create", "snapw", "--size", "2G", "--repl", "3")
    with mounted(c, "snapw", tmp_path / "mnt") as m:
        writer = ManifestWriter(m.path, tmp_path / "writer", max_size=512 << 10)
        writer.start()
        try:
            writer.wait_for(6, timeout=120)
            before = writer.entries()  # acknowledged before the snapshot: all must be in it
            c.cli("snapshot", "create", "snapw", "--name", "s1")
            writer.wait_for(len(before) + 4, timeout=120)
        finally:
            writer.stop()
        after = writer.entries()
    with mounted(c, "snapw@s1", tmp_path / "snap") as s:
        assert verify_through_mount(s.path, before) == []
        present = set(os.listdir(s.path))
        later = [e for e in after if e.started > after[len(before) - 1].acked + 5]
        assert all(e.name not in present for e in later)
        with pytest.raises(OSError):
            (s.path / "new").write_bytes(b"x")
    proc = c.cli("mount", "snapw@s1", str(tmp_path), "-o", "rw", check=False)
    assert proc.returncode == 1 and "read-only" in proc.stderr
    listing = c.json("snapshot", "list", "snapw")
    assert [r["name"] for r in listing] == ["s1"]


def test_clone_restore_and_bad_input(shared_cluster: Cluster, tmp_path: Path) -> None:
    c = shared_cluster
    c.cli("volume", "create", "orig", "--size", "1G", "--repl", "2")
    big = os.urandom(8 * MiB)
    with mounted(c, "orig", tmp_path / "o") as m:
        write(m.path / "big", big)
        write(m.path / "small", b"v1")
    c.cli("snapshot", "create", "orig", "--name", "base")
    used_before = pool_used(c)
    c.cli("volume", "clone", "orig@base", "copy")
    with mounted(c, "copy", tmp_path / "c") as m:
        assert (m.path / "big").read_bytes() == big
        with open(m.path / "big", "r+b") as fh:  # modify ~1%: one 1 MiB block... of 8: a tenth of it
            fh.seek(3 * MiB)
            fh.write(os.urandom(80_000))
            os.fsync(fh.fileno())
        write(m.path / "small", b"clone")
    # Only the rewritten block is new on the clone's replicas: about 1 MiB, not 8.
    grown = {n: pool_used(c)[n] - used_before[n] for n in used_before}
    assert all(g <= 2 * MiB for g in grown.values()), grown
    with mounted(c, "orig", tmp_path / "o2") as m:
        assert (m.path / "small").read_bytes() == b"v1"
        write(m.path / "small", b"v2")
        (m.path / "extra").write_bytes(b"e")
        proc = c.cli("volume", "restore", "orig@base", check=False)
        assert proc.returncode == 1 and "unmount it first" in proc.stderr
    c.cli("volume", "restore", "orig@base")
    with mounted(c, "orig", tmp_path / "o3") as m:
        assert (m.path / "small").read_bytes() == b"v1"
        assert not (m.path / "extra").exists()
        assert hashlib.sha256((m.path / "big").read_bytes()).digest() == hashlib.sha256(big).digest()
    # The snapshot's own record (N<name>) is part of a clean volume (issue 13: it was a bad-key).
    proc = c.cli("fsck", "orig", "--json", check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True, proc.stdout
    for args, msg in [
        (["snapshot", "delete", "orig@nope"], 'snapshot "orig@nope": no such snapshot'),
        (["snapshot", "create", "orig", "--name", "base"], 'snapshot "orig@base": exists'),
        (["snapshot", "create", "orig", "--name", "a/b"], "name must be"),
        (["volume", "clone", "orig@nope", "x"], "no such snapshot"),
        (["volume", "clone", "orig", "x"], "expected VOLUME@SNAPSHOT"),
        (["volume", "restore", "orig@nope"], "no such snapshot"),
        (["mount", "orig@nope", str(tmp_path)], "no such snapshot"),
    ]:
        proc = c.cli(*args, check=False)
        assert proc.returncode == 1, (args, proc.stdout)
        assert msg in proc.stderr, (args, proc.stderr)
    # A clone is independent once made: its snapshot may go.
    c.cli("snapshot", "delete", "orig@base")
    with mounted(c, "copy", tmp_path / "c2") as m:
        assert (m.path / "small").read_bytes() == b"clone"


def test_dedup_and_accounting(shared_cluster: Cluster, tmp_path: Path) -> None:
    c = shared_cluster
    c.cli("volume", "create", "dd", "--size", "1G", "--repl", "2")
    data = os.urandom(16 * MiB)
    before = pool_used(c)
    with mounted(c, "dd", tmp_path / "m") as m:
        write(m.path / "one", data)
        write(m.path / "two", data)  # the same bytes again: stored once per replica
    replicas = c.json("volume", "inspect", "dd")["replicas"]

    def grown() -> dict[str, int]:
        now = pool_used(c)
        return {n: now[n] - before[n] for n in before}

    g = grown()
    for r in replicas:
        assert 16 * MiB <= g[r] < 17 * MiB, g
    c.cli("snapshot", "create", "dd", "--name", "s")

    def space() -> dict:
        return c.json("volume", "inspect", "dd")["space"]

    eventually(lambda: space().get("logical") == 32 * MiB and space().get("shared_with_snapshots") == 16 * MiB,
               timeout=60, what="space accounting")
    sp = space()
    assert sp["unique"] == 16 * MiB and sp["dedup_ratio"] == 2.0


def test_gc_returns_space_and_spares_live_data(shared_cluster: Cluster, tmp_path: Path) -> None:
    c = shared_cluster
    c.cli("volume", "create", "gcv", "--size", "1G", "--repl", "2")
    doomed = os.urandom(6 * MiB)
    with mounted(c, "gcv", tmp_path / "m") as m:
        write(m.path / "doomed", doomed)
        (m.path / "live").mkdir()
        writer = ManifestWriter(m.path / "live", tmp_path / "w", max_size=256 << 10)
        writer.start()
        try:
            writer.wait_for(5, timeout=120)
            (m.path / "doomed").unlink()
            # Age the deleted file's chunks past the grace period (as an hour of waiting would).
            old = time.time() - 3600
            for i in range(0, len(doomed), MiB):
                h = blake3.blake3(doomed[i:i + MiB]).hexdigest()
                for f in c.dir.glob(f"nodes/*/pool/chunks/{h[:2]}/{h}"):
                    os.utime(f, (old, old))
            # The writer is running: its chunks put but not yet committed are younger than the grace.
            report = c.json("gc", "--grace", f"{MIN_GC_GRACE:g}")
            writer.wait_for(len(writer.entries()) + 3, timeout=120)
        finally:
            writer.stop()
        assert writer.errors() == []
        assert verify_through_mount(m.path / "live", writer.entries()) == []
    freed = sum(n.get("bytes_freed", 0) for n in report["nodes"])
    assert freed >= 2 * 6 * MiB - 4096, report  # both replicas gave the deleted file's space back
    dry = c.json("gc", "--dry-run", "--grace", f"{MIN_GC_GRACE:g}")
    assert all(n.get("deleted", 0) == 0 for n in dry["nodes"]), dry  # nothing left to collect


def test_gc_killed_midway_then_rerun(shared_cluster: Cluster, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    c = shared_cluster
    c.cli("volume", "create", "gck", "--size", "1G", "--repl", "2")
    with mounted(c, "gck", tmp_path / "m") as m:
        for i in range(40):
            write(m.path / f"f{i}", os.urandom(200_000))
        keep = os.urandom(300_000)
        write(m.path / "keep", keep)
        for i in range(40):
            (m.path / f"f{i}").unlink()
    age_chunks(c)  # as an hour of waiting would: no write is in flight
    env = dict(os.environ, PXFS_CLUSTER=str(c.dir))
    proc = subprocess.Popen([sys.executable, "-m", "pxfs", "gc", "--grace", f"{MIN_GC_GRACE:g}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)  # the CLI dies; nodes finish or abandon their rounds safely
    proc.wait()
    report = c.json("gc", "--grace", f"{MIN_GC_GRACE:g}")
    assert all("error" not in n for n in report["nodes"]), report
    again = c.json("gc", "--grace", f"{MIN_GC_GRACE:g}")
    assert sum(n["deleted"] for n in again["nodes"]) == 0
    with mounted(c, "gck", tmp_path / "m2") as m:
        assert (m.path / "keep").read_bytes() == keep
    assert json.loads(c.cli("fsck", "gck", "--json").stdout)["ok"] is True


def test_scheduled_snapshots_keep_the_newest(shared_cluster: Cluster) -> None:
    c = shared_cluster
    c.cli("volume", "create", "sched", "--size", "1G", "--repl", "1")
    c.cli("snapshot", "schedule", "sched", "--every", "10s", "--keep", "2")
    names = eventually(lambda: [r["name"] for r in c.json("snapshot", "list", "sched")]
                       if len(c.json("snapshot", "list", "sched")) >= 2 else None, timeout=60, what="2 snapshots")
    assert all(n.startswith("auto-") for n in names)
    first = set(names)
    eventually(lambda: {r["name"] for r in c.json("snapshot", "list", "sched")} - first, timeout=60,
               what="a newer snapshot")
    assert len(c.json("snapshot", "list", "sched")) <= 2
    c.cli("snapshot", "schedule", "sched", "--every", "0")
    proc = c.cli("snapshot", "schedule", "sched", "--every", "1s", check=False)
    assert proc.returncode == 1 and "at least 10s" in proc.stderr
