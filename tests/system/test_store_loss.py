"""A lost, replaced or foreign control store deletes nothing; ``pxfs cluster recover`` rebuilds it.

Real nodes on loopback. A replica goes only by a tombstone naming its uid or by its own record no
longer listing the node; a missing record keeps the replica and stops GC on that node.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import trio

from pxfs.cluster import records
from pxfs.cluster.config import MIN_GC_GRACE, load_config
from tests.conftest import Cluster, age_chunks, eventually, mounted, node_connection

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE")

NODES = ("n1", "n2", "n3")


def replica_dir(c: Cluster, node: str, vol: str) -> Path:
    return c.dir / "nodes" / node / "state" / "volumes" / vol


def local_uid(c: Cluster, node: str, vol: str) -> str | None:
    spec = records.read_local_spec(replica_dir(c, node, vol))
    return spec.uid if spec is not None else None


def node_log(c: Cluster, node: str) -> str:
    return (c.dir / "nodes" / node / "node.log").read_text(errors="replace")


def create(c: Cluster, vol: str, repl: int = 3) -> str:
    """Create ``vol``; wait until each replica holds its copy of the record; returns the uid."""
    c.cli("volume", "create", vol, "--size", "1G", "--repl", str(repl))
    info = c.json("volume", "inspect", vol)
    assert isinstance(info, dict)
    eventually(lambda: all(local_uid(c, r, vol) == info["uid"] for r in info["replicas"]), 20,
               f"spec.json of {vol} on every replica")
    return str(info["uid"])


def write_files(root: Path, n: int, tag: str) -> dict[str, str]:
    sums = {}
    for i in range(n):
        data = hashlib.sha256(f"{tag}-{i}".encode()).digest() * (4096 * (i + 1))  # up to a few MiB
        with open(root / f"f{i}", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        sums[f"f{i}"] = hashlib.sha256(data).hexdigest()
    return sums


def verify(root: Path, sums: dict[str, str]) -> None:
    for name, digest in sums.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


def up(c: Cluster) -> object:
    return c.cli("up", "--dir", str(c.dir), "--nodes", str(c.nodes), "--base-port", str(c.base_port),
                 "--pool-size", c.pool_size, check=False)


def volume_names(c: Cluster) -> set[str]:
    vols = c.json("volume", "list")
    assert isinstance(vols, list)
    return {v["name"] for v in vols}


def healthy(c: Cluster, vol: str) -> bool:
    info = c.json("volume", "inspect", vol)
    return isinstance(info, dict) and info["state"] == "healthy"


def store_put(c: Cluster, key: str, value: bytes | None) -> None:
    """Write (or delete, value None) a control-store key directly, as a damaged store would hold it."""
    async def go() -> None:
        async with node_connection(c) as conn:
            store = await conn.control()
            if value is None:
                await store.delete(key)
            else:
                await store.put(key, value)
    trio.run(go)


def gc_errors(c: Cluster) -> dict[str, str]:
    """Run ``pxfs gc`` with every chunk aged past the grace (every unreferenced chunk would go); node ->
    its error ("" when it ran). No write is in flight when the tests call it."""
    age_chunks(c)
    proc = c.cli("gc", "--grace", f"{MIN_GC_GRACE:g}", "--json", check=False)
    reports = json.loads(proc.stdout)["nodes"]
    errors = {r["node"]: r.get("error", "") for r in reports}
    assert (proc.returncode == 1) == any(errors.values()), proc.stdout
    return errors


def tree(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in d.rglob("*") if p.is_file()}


def test_lost_control_store_deletes_nothing_and_is_recovered(cluster: Cluster, tmp_path: Path) -> None:
    uid_a = create(cluster, "a", 3)
    create(cluster, "b", 2)
    with mounted(cluster, "a", tmp_path / "m1") as m:
        sums = write_files(m.path, 6, "a")
    cluster.down()
    before = {(n, v.name): v for n in NODES for v in (cluster.dir / "nodes" / n / "state" / "volumes").iterdir()}
    specs = {k: (v / "spec.json").read_bytes() for k, v in before.items()}
    sst = {k: {f for f in tree(v) if f.endswith(".sst")} for k, v in before.items()}
    control = cluster.dir / "nodes" / "n1" / "state" / "control"
    control.rename(control.with_name("control.lost"))  # the seed's disk was replaced

    proc = up(cluster)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'control store: empty, but nodes n1,n2,n3 hold replicas of volumes a, b: run "pxfs cluster recover"' \
        in proc.stdout, proc.stdout
    # Every node saw the empty store and refused it, rather than acting on it.
    eventually(lambda: all("no cluster identity" in node_log(cluster, n) for n in NODES), 20, "refusal logged")
    for (n, name), d in before.items():
        assert d.is_dir(), f"{n}: replica of {name} deleted"
        assert (d / "spec.json").read_bytes() == specs[(n, name)]
        assert sst[(n, name)] <= set(tree(d)), f"{n}: metadata of {name} lost"
    errors = gc_errors(cluster)
    assert set(errors) == set(NODES) and all("nothing deleted" in e for e in errors.values()), errors

    report = cluster.json("cluster", "recover")
    assert isinstance(report, dict)
    rebuilt = {v["name"]: v for v in report["rebuilt"]}
    assert set(rebuilt) == {"a", "b"}
    assert rebuilt["a"]["uid"] == uid_a and sorted(rebuilt["a"]["replicas"]) == list(NODES)
    assert len(rebuilt["b"]["replicas"]) == 2
    assert volume_names(cluster) == {"a", "b"}
    eventually(lambda: healthy(cluster, "a"), 60, "volume a healthy after recovery")
    with mounted(cluster, "a", tmp_path / "m2") as m:
        verify(m.path, sums)
    assert cluster.cli("status", check=False).returncode == 0
    # Recovered twice: nothing missing, nothing rebuilt, records left alone.
    again = cluster.json("cluster", "recover")
    assert isinstance(again, dict) and again["rebuilt"] == [] and again["generation"] > report["generation"]


def test_delete_removes_replicas_by_tombstone_and_new_uid_is_fresh(cluster: Cluster, tmp_path: Path) -> None:
    old = create(cluster, "d", 3)
    with mounted(cluster, "d", tmp_path / "m1") as m:
        write_files(m.path, 2, "old")
    cluster.cli("volume", "delete", "d")
    eventually(lambda: not any(replica_dir(cluster, n, "d").exists() for n in NODES), 20,
               "replicas of d removed on every node")
    new = create(cluster, "d", 3)
    assert new != old
    with mounted(cluster, "d", tmp_path / "m2") as m:
        assert list(m.path.iterdir()) == []  # nothing of the old volume shows through
        sums = write_files(m.path, 1, "new")
        verify(m.path, sums)
    # The tombstone of the old uid does not touch the new volume.
    assert all(local_uid(cluster, n, "d") == new for n in NODES)


def test_foreign_store_is_refused_by_a_node_holding_data(cluster: Cluster, tmp_path: Path) -> None:
    create(cluster, "f", 3)
    cid = load_config(cluster.dir).id
    store_put(cluster, records.IDENTITY_KEY, records.encode_identity("someone-else", 9))
    try:
        why = f"the control store belongs to cluster someone-else, not to this cluster {cid}"
        eventually(lambda: all(why in node_log(cluster, n) for n in NODES), 20, "foreign store refused")
        status = cluster.cli("status", check=False)
        assert status.returncode == 1 and why in status.stdout, status.stdout
        errors = gc_errors(cluster)
        assert all(f"{why}; nothing deleted" in errors[n] for n in NODES), errors
        rec = cluster.cli("cluster", "recover", check=False)
        assert rec.returncode != 0 and "belongs to cluster someone-else" in rec.stderr, rec.stderr
        assert all(replica_dir(cluster, n, "f").is_dir() for n in NODES)
    finally:
        store_put(cluster, records.IDENTITY_KEY, records.encode_identity(cid, 1))
    eventually(lambda: all("control store accepted again" in node_log(cluster, n) for n in NODES), 20,
               "own store accepted again")


def test_gc_abandons_its_round_when_a_held_volume_has_no_record(cluster: Cluster, tmp_path: Path) -> None:
    uid = create(cluster, "g", 3)
    with mounted(cluster, "g", tmp_path / "m1") as m:
        sums = write_files(m.path, 3, "g")
    store_put(cluster, records.volume_key("g"), None)  # gone without a tombstone
    errors = gc_errors(cluster)
    assert all(f'gc on node {n}: volume "g" is held here but has no record: nothing deleted' in errors[n]
               for n in NODES), errors
    eventually(lambda: all("is held here but has no record" in node_log(cluster, n) for n in NODES), 20,
               "kept copy logged")
    assert all(local_uid(cluster, n, "g") == uid for n in NODES)
    status = cluster.cli("status", check=False)
    assert status.returncode == 1 and "volume records missing, but nodes n1,n2,n3 hold replicas of volumes g" \
        in status.stdout, status.stdout
    report = cluster.json("cluster", "recover")
    assert isinstance(report, dict) and [v["name"] for v in report["rebuilt"]] == ["g"]
    eventually(lambda: healthy(cluster, "g"), 60, "volume g healthy after recovery")
    with mounted(cluster, "g", tmp_path / "m2") as m:
        verify(m.path, sums)
    assert gc_errors(cluster) == dict.fromkeys(NODES, "")
    with mounted(cluster, "g", tmp_path / "m3") as m:
        verify(m.path, sums)  # the sweep that ran kept every chunk the rebuilt record names

