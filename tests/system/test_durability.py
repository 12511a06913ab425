"""Named cases of issue 10, "Acknowledged means durable": each reproduces one thing the issue saw and
asserts the REQUIRED behaviour. A case that fails on today's code is marked ``xfail(strict=True)``
with the reason it fails; the fix removes the mark.

Interfaces the fix brings: `volume inspect --json` fields ``in_sync`` (node ids), ``min_replicas`` and
``waiting`` (why no coordinator serves; empty when one does), `pxfs volume promote NAME NODE
--accept-data-loss` and `pxfs cluster recover [--json]`.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from rocksdict import Options, Rdict

from pxfs.client.connect import cluster_admin
from pxfs.client.procs import alive
from pxfs.client.tools import volume_tool
from pxfs.cluster.config import MIN_GC_GRACE
from pxfs.errors import Invalid, PxfsError
from tests.conftest import eventually, mounted, node_connection
from tests.system.faults import (
    FAILOVER_TIMEOUT,
    SEED,
    FaultCluster,
    fault_cluster,
    healthy,
    inspect,
    node_state,
    wait_volume,
)
from tests.system.manifest import Entry, _write_one, verify_on_replicas, verify_through_mount
from tests.system.nemesis_workload import Workload, fsync_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE")

KiB = 1 << 10
RECOVER_HINT = "pxfs cluster recover"
PLACEMENT_TRIES = 3
EXCL_NAMES = 200


def status_text(cluster: FaultCluster) -> str:
    """What `pxfs status` prints, on either stream, whatever its exit code."""
    proc = cluster.cli("status", check=False)
    return proc.stdout + proc.stderr


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[FaultCluster]:
    yield from fault_cluster(tmp_path, 3)


def new_volume(cluster: FaultCluster, repl: int = 3) -> str:
    vol = f"dur-{uuid.uuid4().hex[:8]}"
    cluster.cli("volume", "create", vol, "--size", "1G", "--repl", str(repl))
    return vol


def write_durably(directory: Path, name: str, size: int, seed: int = 0) -> Entry:
    """Create ``name`` with O_EXCL, write, fsync it, close, fsync the directory: acknowledged."""
    data = random.Random(seed).randbytes(size)
    _write_one(directory / name, data, None)
    fsync_dir(directory)
    return Entry(name, size, hashlib.sha256(data).hexdigest(), 0.0, 0.0)


def write_files(directory: Path, n: int) -> list[Entry]:
    return [write_durably(directory, f"file{i:03d}", 1000 + i * 97 * KiB, seed=i) for i in range(n)]


def verify_fresh(cluster: FaultCluster, vol: str, mountpoint: Path, entries: list[Entry]) -> list[str]:
    """Every entry through a fresh mount at ``mountpoint`` and on every replica."""
    with mounted(cluster, vol, mountpoint) as m:
        problems = [str(p) for p in verify_through_mount(m.path, entries)]
        problems += [str(p) for p in trio.run(verify_on_replicas, cluster, vol, m.path, entries)]
    return problems


def volume_off_seed(cluster: FaultCluster) -> tuple[str, str, str]:
    """A healthy repl-2 volume whose replicas exclude the seed: (name, coordinator, follower).

    Volumes are created until placement puts one off the seed (bounded tries), the others deleted.
    Placement goes by free pool bytes, so on a fresh cluster the tries tend to land alike; the last
    one then goes 2 -> 3 -> 2 replicas, which drops a follower (never the coordinator).
    """
    tried: list[str] = []
    for _ in range(PLACEMENT_TRIES):
        vol = new_volume(cluster, repl=2)
        info = wait_volume(cluster, vol, healthy(), "new volume healthy")
        if SEED not in info["replicas"]:
            break
        tried.append(vol)
    else:
        vol = tried.pop()
        if info["coordinator"] != SEED:
            cluster.cli("volume", "ha-update", vol, "--repl", "3")
            wait_volume(cluster, vol, healthy(lambda v: len(v["replicas"]) == 3), "three replicas")
            cluster.cli("volume", "ha-update", vol, "--repl", "2")
            info = wait_volume(cluster, vol, healthy(lambda v: len(v["replicas"]) == 2), "two replicas again")
    for other in tried:
        cluster.cli("volume", "delete", other)
    assert SEED not in info["replicas"], f"could not place a repl-2 volume off {SEED}: {vol} {info}"
    coordinator = info["coordinator"]
    follower = next(r for r in info["replicas"] if r != coordinator)
    return vol, coordinator, follower


def kill_coordinator_and_wait_failover(cluster: FaultCluster, vol: str) -> tuple[str, dict[str, Any]]:
    before = inspect(cluster, vol)
    old = before["coordinator"]
    assert old != SEED, f"the seed coordinates {vol}: {before}"
    cluster.kill(old)
    moved = wait_volume(cluster, vol, lambda v: v["coordinator"] != old, "failover", timeout=FAILOVER_TIMEOUT)
    return old, moved


# ------------------------------------------------------------------------------------------------
# a. fsync'd data lost at failover


def test_lagging_follower_never_becomes_coordinator(cluster3: FaultCluster, tmp_path: Path) -> None:
    """SIGSTOP follower F; an fsync'd file is acknowledged by C alone; SIGKILL C, SIGCONT F: F must
    not take over (it lacks an acknowledged write); the volume waits for C, says why, and when C is
    back it serves the file, F catches up and both are in sync."""
    vol, c, f = volume_off_seed(cluster3)
    with mounted(cluster3, vol, tmp_path / "mnt") as m:
        os.kill(cluster3.pid(f), signal.SIGSTOP)
        try:
            # Returns once C gave up waiting for F (marked lagging, out of the in-sync set).
            entry = write_durably(m.path, "precious", 300 * KiB, seed=10)
        except BaseException:
            cluster3.resume_all()
            raise
    try:
        cluster3.kill(c)
    finally:
        cluster3.resume_all()

    def waits_for_c(v: dict[str, Any]) -> bool:
        if v["coordinator"] == f:
            raise AssertionError(f"{f} became coordinator without the acknowledged write: {v}")
        return bool(v.get("waiting")) and v.get("in_sync") == [c]

    waiting = wait_volume(cluster3, vol, waits_for_c, f"volume waiting for {c}, in_sync == [{c}]",
                          timeout=FAILOVER_TIMEOUT)
    assert isinstance(waiting["waiting"], str), waiting
    cluster3.up()
    served = wait_volume(cluster3, vol, lambda v: v["coordinator"] == c and v.get("waiting") == "",
                         f"{c} serving again")
    assert served["coordinator"] == c
    with mounted(cluster3, vol, tmp_path / "fresh") as fresh:
        problems = [str(p) for p in verify_through_mount(fresh.path, [entry])]
        final = wait_volume(cluster3, vol, healthy(lambda v: sorted(v.get("in_sync", [])) == sorted([c, f])),
                            "healthy with both replicas in sync")
        problems += [str(p) for p in trio.run(verify_on_replicas, cluster3, vol, fresh.path, [entry])]
    assert problems == [], f"volume {final}"


# ------------------------------------------------------------------------------------------------
# b. losing the control store must not delete anything


def volume_dirs(cluster: FaultCluster) -> dict[str, list[str]]:
    """node -> the volume directories it holds under state/volumes (each with a metadata store)."""
    out = {}
    for nd in sorted((cluster.dir / "nodes").iterdir()):
        vols = nd / "state" / "volumes"
        out[nd.name] = sorted(v.name for v in vols.iterdir() if (v / "meta" / "CURRENT").exists()) \
            if vols.exists() else []
    return out


def pool_chunks(cluster: FaultCluster) -> dict[str, int]:
    return {nd.name: sum(1 for p in (nd / "pool").rglob("*") if p.is_file())
            for nd in sorted((cluster.dir / "nodes").iterdir())}


def test_lost_control_store_deletes_nothing_and_is_recovered(cluster3: FaultCluster, tmp_path: Path) -> None:
    vol = new_volume(cluster3, repl=3)
    with mounted(cluster3, vol, tmp_path / "mnt") as m:
        entries = write_files(m.path, 6)
    wait_volume(cluster3, vol, healthy(), "healthy before the loss")
    dirs, chunks = volume_dirs(cluster3), pool_chunks(cluster3)
    assert all(vol in d for d in dirs.values()), dirs
    cluster3.down()
    control = cluster3.dir / "nodes" / SEED / "state" / "control"
    control.rename(tmp_path / "control.lost")
    up = cluster3.up_unchecked()  # may refuse to go on (exit 1); it must still say why and what to do
    said = up.stdout + up.stderr
    eventually(lambda: all(node_state(cluster3, n) == "up" for n in ("n1", "n2", "n3")), timeout=30,
               what="all nodes up against the empty store")
    problems = []
    try:
        eventually(lambda: RECOVER_HINT in said or RECOVER_HINT in status_text(cluster3), timeout=20,
                   what=f"`pxfs up` or `pxfs status` naming `{RECOVER_HINT}`")
    except AssertionError as err:
        problems.append(f"{err}; up said {said!r}; status says {status_text(cluster3)!r}")
    if volume_dirs(cluster3) != dirs:
        problems.append(f"volume directories before {dirs}, after {volume_dirs(cluster3)}")
    lost = {n: (chunks[n], k) for n, k in pool_chunks(cluster3).items() if k < chunks[n]}
    if lost:
        problems.append(f"chunks deleted (before, after): {lost}")
    assert problems == [], "\n".join(problems)
    cluster3.cli("cluster", "recover")
    listed = cluster3.json("volume", "list")
    assert isinstance(listed, list) and vol in [v["name"] for v in listed], listed
    wait_volume(cluster3, vol, healthy(), "healthy after recover")
    assert verify_fresh(cluster3, vol, tmp_path / "fresh", entries) == []


# ------------------------------------------------------------------------------------------------
# c. a malformed control-store record crashes nothing


async def test_control_store_refuses_a_malformed_volume_record(cluster3: FaultCluster) -> None:
    async with node_connection(cluster3, 0) as conn:
        control = await conn.control()
        try:
            with pytest.raises(Invalid):
                await control.put("volumes/x", b"garbage")
        finally:
            await control.delete("volumes/x")  # a put that was (wrongly) taken must not outlive the test
            await control.drop()


def test_garbage_record_in_the_control_store_crashes_nothing(cluster3: FaultCluster, tmp_path: Path) -> None:
    good = new_volume(cluster3, repl=2)
    with mounted(cluster3, good, tmp_path / "mnt") as m:
        entries = write_files(m.path, 2)
    cluster3.down()
    db = Rdict(str(cluster3.dir / "nodes" / SEED / "state" / "control"), options=Options(raw_mode=True))
    try:
        db[b"volumes/bad"] = b"{"
    finally:
        db.close()
    up = cluster3.up_unchecked()
    try:
        eventually(lambda: all(node_state(cluster3, n) == "up" for n in ("n1", "n2", "n3")), timeout=30,
                   what="all nodes up with the garbage record")
    except AssertionError as err:
        raise AssertionError(f"{err}; `pxfs up` rc={up.returncode}: {up.stdout}{up.stderr}") from None
    listed = cluster3.cli("volume", "list", "--json", check=False)
    assert listed.returncode == 0, f"`pxfs volume list` failed: {listed.stdout}{listed.stderr}"
    with mounted(cluster3, good, tmp_path / "again") as m:
        problems = [str(p) for p in verify_through_mount(m.path, entries)]
        more = write_durably(m.path, "after", 200 * KiB, seed=7)
        problems += [str(p) for p in verify_through_mount(m.path, [more])]
    dead = [n for n in ("n1", "n2", "n3") if not alive(cluster3.pid(n))]
    assert (problems, dead) == ([], []), f"problems {problems}; nodes that died: {dead}"


# ------------------------------------------------------------------------------------------------
# d. exclusive creates and unlinked-but-open files across a failover


def test_unlinked_open_file_survives_failover(cluster3: FaultCluster, tmp_path: Path) -> None:
    """An fsync'd, unlinked file still open in a mount keeps its data across a coordinator failover,
    and after the old coordinator is back and the volume healthy again."""
    vol = new_volume(cluster3)
    wait_volume(cluster3, vol, healthy(), "healthy")
    data = random.Random(3).randbytes(200 * KiB)

    def read_back(when: str) -> None:
        try:
            got = os.pread(fd, len(data) + 1, 0)
        except OSError as exc:
            raise AssertionError(f"reading the open, unlinked file {when}: {exc}") from None
        assert got == data, f"the open, unlinked file lost its data {when}: {len(got)} bytes, not {len(data)}"

    with mounted(cluster3, vol, tmp_path / "mnt") as m:
        fd = os.open(m.path / "doomed", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
            os.unlink(m.path / "doomed")
            fsync_dir(m.path)
            old, _moved = kill_coordinator_and_wait_failover(cluster3, vol)
            read_back("after the failover")
            cluster3.up()
            wait_volume(cluster3, vol, healthy(lambda v: old in v["replicas"]), "healthy with the old coordinator back")
            read_back("once the volume is healthy again")
        finally:
            os.close(fd)
        assert not (m.path / "doomed").exists()


# Not strict: exclusivity holds now (op ids), but about 1 run in 50 one name still read back empty
# through the losing mount right after the failover, with the winner's data seen by the winner:
# not yet explained (a stale attribute in the loser's kernel, or the winner's own cache).
@pytest.mark.xfail(strict=False, reason="issue 10: rarely the winner's content reads back empty through the other "
                                        "mount right after the failover")
def test_exclusive_create_stays_exclusive_across_failover(cluster3: FaultCluster, tmp_path: Path) -> None:
    """Two mounts both create x00000 ... x00199 with O_EXCL while the coordinator is killed: for every
    name exactly one succeeded and the other saw EEXIST (any other error, EIO included, is a failure),
    and the file holds the winner's tag."""
    vol = new_volume(cluster3)
    wait_volume(cluster3, vol, healthy(), "healthy")
    with mounted(cluster3, vol, tmp_path / "a") as a, mounted(cluster3, vol, tmp_path / "b") as b:
        (a.path / "x").mkdir()
        fsync_dir(a.path)
        workers = {tag: Workload(m.path / "x", tmp_path / f"worker-{tag}", excl_tag=tag, count=EXCL_NAMES)
                   for tag, m in (("A", a), ("B", b))}
        try:
            for w in workers.values():
                w.start()
            eventually(lambda: sum(len(w.records()) for w in workers.values()) >= 40, timeout=60,
                       what="40 create attempts before the fault")
            kill_coordinator_and_wait_failover(cluster3, vol)
            for w in workers.values():
                w.wait_done(timeout=180)
        finally:
            for w in workers.values():
                w.kill()
        outcomes = {tag: {r["name"]: r for r in w.records()} for tag, w in workers.items()}
        problems = []
        for i in range(EXCL_NAMES):
            name = f"x{i:05d}"
            by = {tag: outcomes[tag].get(name) for tag in workers}
            if any(r is None for r in by.values()):
                problems.append(f"{name}: no outcome logged by {[t for t, r in by.items() if r is None]}")
                continue
            winners = [tag for tag, r in by.items() if r["ok"]]
            losers = [r for r in by.values() if not r["ok"]]
            if len(winners) != 1 or losers[0]["errno"] != "EEXIST":
                problems.append(f"{name}: want one success and one EEXIST, got {by}")
                continue
            content = (a.path / "x" / name).read_bytes()
            if content != winners[0].encode():
                problems.append(f"{name}: {winners[0]} won but the file holds {content!r}")
    cluster3.up()
    assert problems == [], f"{len(problems)} of {EXCL_NAMES} names:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# e. clones


async def clone_then_delete_snapshot(cluster: FaultCluster, vol: str, clone: str) -> str:
    """`pxfs volume clone VOL@s CLONE` and at once `pxfs snapshot delete VOL@s`: the commands' own calls
    over one connection, without the second command's start-up between them (which now and then let
    the clone finish first). '' if the delete was taken, else why it was refused."""
    async with cluster_admin(cluster.dir) as (admin, _conn, bridge, _cfg):
        await admin.clone_volume(f"{vol}@s", clone)
        try:
            async with volume_tool(cluster.dir, bridge, vol) as tool:
                await tool.snapshot_delete("s")
        except PxfsError as err:
            return str(err) or type(err).__name__
    return ""


def test_snapshot_deleted_right_after_clone(cluster3: FaultCluster, tmp_path: Path) -> None:
    """`pxfs volume clone V@s C2` then at once `pxfs snapshot delete V@s`: the delete is refused (the
    command exits 1) or taken; either way C2 mounts and holds V's data, and `pxfs gc --dry-run` succeeds."""
    vol = new_volume(cluster3, repl=2)
    with mounted(cluster3, vol, tmp_path / "mnt") as m:
        entries = write_files(m.path, 24)  # enough that the clone is still being set up at the delete
    cluster3.cli("snapshot", "create", vol, "--name", "s")
    clone = f"{vol}-c2"
    refused = trio.run(clone_then_delete_snapshot, cluster3, vol, clone)
    print(f"[clone] snapshot delete: {refused or 'taken'}")
    wait_volume(cluster3, clone, healthy(), "the clone healthy")
    problems = verify_fresh(cluster3, clone, tmp_path / "clone", entries)
    if refused:  # refused while the clone needed it: allowed once the clone is done
        cluster3.cli("snapshot", "delete", f"{vol}@s")
    gc = cluster3.cli("gc", "--dry-run", "--json", check=False)
    if gc.returncode != 0:
        problems.append(f"gc --dry-run failed rc={gc.returncode}: {gc.stdout}{gc.stderr}")
    assert problems == [], "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# f. a grace of 0 is refused by the node, not only by the CLI


def test_gc_grace_zero_refused_by_the_cli(cluster3: FaultCluster) -> None:
    proc = cluster3.cli("gc", "--grace", "0", check=False)
    said = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1, f"rc={proc.returncode}: {said}"
    assert len(said) == 1 and f"{MIN_GC_GRACE:g}" in said[0], said


async def test_gc_grace_zero_refused_by_the_node(cluster3: FaultCluster) -> None:
    async with node_connection(cluster3, 1) as conn:
        chunks = await conn.chunks()
        try:
            with pytest.raises(Invalid, match=f"{MIN_GC_GRACE:g}"):
                await chunks.collect(False, 0)
        finally:
            await chunks.drop()
