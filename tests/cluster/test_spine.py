"""The cluster spine end to end: real node processes, the real CLI, real RocksDB and pools."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import blake3
import pytest
import trio

from tests.conftest import PXFS, Cluster, eventually, free_port_block, node_connection


def test_status_shows_three_nodes(cluster: Cluster) -> None:
    st = cluster.json("status")
    assert st["health"] == "healthy"
    nodes = st["nodes"]
    assert [n["id"] for n in nodes] == ["n1", "n2", "n3"]
    for n in nodes:
        assert set(n) >= {"id", "address", "labels", "state"}
        assert n["state"] == "up"
        assert n["address"].startswith("127.0.0.1:")
    pools = cluster.json("pool", "list")
    assert len(pools) == 3
    for p in pools:
        assert set(p) >= {"node", "path", "class", "capacity", "used", "free"}
        assert p["capacity"] == 2 << 30 and p["free"] <= p["capacity"]
    text = cluster.cli("status").stdout
    assert "n1" in text and "up" in text


def test_volume_lifecycle(cluster: Cluster) -> None:
    vol = cluster.json("volume", "create", "db1", "--size", "1G", "--repl", "3", "--label", "app=pg")
    assert vol["name"] == "db1" and vol["size"] == 1 << 30 and vol["repl"] == 3
    assert sorted(vol["replicas"]) == ["n1", "n2", "n3"] and vol["coordinator"] in vol["replicas"]
    assert vol["state"] == "healthy" and vol["used"] == 0
    cluster.cli("volume", "create", "small", "--size", "512M", "--block-size", "64K")
    assert [v["name"] for v in cluster.json("volume", "list")] == ["db1", "small"]
    inspected = cluster.json("volume", "inspect", "small")
    assert inspected["block_size"] == 64 << 10 and inspected["repl"] == 1
    text = cluster.cli("volume", "inspect", "db1").stdout
    assert "coordinator" in text and "app=pg" in text
    assert cluster.json("volume", "resize", "db1", "--size", "2G")["size"] == 2 << 30
    cluster.cli("volume", "delete", "small")
    assert [v["name"] for v in cluster.json("volume", "list")] == ["db1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["volume", "create", "dup", "--size", "1G"], 'volume "dup": a volume with this name exists'),
        (["volume", "create", "r0", "--size", "1G", "--repl", "0"], "repl must be 1, 2 or 3 (got 0)"),
        (["volume", "create", "r4", "--size", "1G", "--repl", "4"], "repl must be 1, 2 or 3 (got 4)"),
        (["volume", "create", "bad", "--size", "12Q"], "size '12Q'"),
        (["volume", "create", "bad", "--size=-5G"], "size '-5G'"),
        (["volume", "create", "a/b", "--size", "1G"], "no '/', no path"),
        (["volume", "create", "../etc", "--size", "1G"], "no '/', no path"),
        (["volume", "create", "huge", "--size", "1000T", "--repl", "2"], "thin-provisioning limit"),
        (["volume", "create", "bs", "--size", "1G", "--block-size", "3000"], "power of two"),
        (["volume", "inspect", "nope"], 'volume "nope": no such volume'),
        (["volume", "delete", "nope"], 'volume "nope": no such volume'),
        (["volume", "resize", "dup", "--size", "1K"], "out of range"),
    ],
)
def test_bad_volume_requests(cluster: Cluster, args: list[str], message: str) -> None:
    if not any(v["name"] == "dup" for v in cluster.json("volume", "list")):
        cluster.cli("volume", "create", "dup", "--size", "1G")
    proc = cluster.cli(*args, check=False)
    assert proc.returncode == 1, proc
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert cluster.json("status")["health"] == "healthy"


def test_repl_beyond_nodes_and_cli_errors(tmp_path: Path) -> None:
    from tests.conftest import make_cluster

    for c in make_cluster(tmp_path, nodes=2):
        proc = c.cli("volume", "create", "db1", "--size", "1G", "--repl", "3", check=False)
        assert proc.returncode == 1
        assert 'volume "db1": not enough nodes for repl=3 (have 2 up)' in proc.stderr
        missing = subprocess.run([*PXFS, "status"], capture_output=True, text=True,
                                 env={k: v for k, v in os.environ.items() if k != "PXFS_CLUSTER"})
        assert missing.returncode == 1 and "no cluster directory" in missing.stderr
        nodir = subprocess.run([*PXFS, "status", "--cluster", str(tmp_path / "nothing")], capture_output=True,
                               text=True)
        assert nodir.returncode == 1 and "no cluster.json" in nodir.stderr


def test_up_gc_settings_are_checked_and_kept(tmp_path: Path) -> None:
    d = tmp_path / "c"
    for bad, message in ((["--gc-grace", "10"], "--gc-grace 10: must be 140 s"),
                         (["--gc-interval", "-1"], "--gc-interval -1: must be 0")):
        proc = subprocess.run([*PXFS, "up", "--dir", str(d), *bad], capture_output=True, text=True)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not d.exists()  # refused before anything was made
    from tests.conftest import stop_and_check

    c = Cluster(dir=d, base_port=free_port_block(1), nodes=1, pool_size="1G")
    try:
        c.cli("up", "--dir", str(d), "--nodes", "1", "--base-port", str(c.base_port), "--pool-size", "1G",
              "--gc-interval", "30", "--gc-grace", "300")
        cfg = json.loads((d / "cluster.json").read_text())
        assert (cfg["gc_interval"], cfg["gc_grace"]) == (30, 300)
    finally:
        stop_and_check(c)


def test_placement_spreads_over_zones(tmp_path: Path, cluster: Cluster) -> None:
    # A fourth node shares zone-1 with n1; repl 3 must still land in three distinct zones.
    port = free_port_block(1)
    log = open(tmp_path / "n4.log", "wb")
    proc = subprocess.Popen([*PXFS, "node", "start", "--cluster", str(cluster.dir), "--listen", f"127.0.0.1:{port}",
                             "--pool", f"{tmp_path / 'p4'},size=8G", "--label", "zone=zone-1", "--id", "n4"],
                            stdout=log, stderr=log)
    try:
        eventually(lambda: any(n["id"] == "n4" and n["state"] == "up" for n in cluster.json("node", "list")),
                   what="n4 up")
        zones = {n["id"]: n["labels"]["zone"] for n in cluster.json("node", "list")}
        for i in range(4):
            vol = cluster.json("volume", "create", f"v{i}", "--size", "1G", "--repl", "3")
            assert len({zones[r] for r in vol["replicas"]}) == 3, vol
        # With more replicas than zones, replicas share zones but never nodes.
        vol = cluster.json("volume", "create", "wide", "--size", "1G", "--repl", "3")
        assert len(set(vol["replicas"])) == 3
    finally:
        proc.terminate()
        proc.wait(30)


def test_node_down_and_back(cluster: Cluster) -> None:
    cluster.cli("volume", "create", "db1", "--size", "1G", "--repl", "3")
    cluster.kill("n3")
    eventually(lambda: {n["id"]: n["state"] for n in cluster.json("node", "list")}["n3"] == "down",
               what="n3 shown down")
    assert cluster.json("volume", "inspect", "db1")["state"] == "degraded"
    cluster.up()
    nodes = {n["id"]: n["state"] for n in cluster.json("node", "list")}
    assert nodes == {"n1": "up", "n2": "up", "n3": "up"}
    # Healthy again with no operator action, once the coordinator has caught the follower up.
    eventually(lambda: cluster.json("volume", "inspect", "db1")["state"] == "healthy", what="db1 healthy")


def test_state_survives_restart_of_every_node(cluster: Cluster) -> None:
    cluster.cli("volume", "create", "keep", "--size", "3G", "--repl", "2", "--label", "tier=gold")
    before = cluster.json("volume", "inspect", "keep")
    data = os.urandom(1 << 20)
    h = blake3.blake3(data).digest()

    async def put_then_get(put: bool) -> bytes:
        async with node_connection(cluster, 1) as conn:
            chunks = await conn.chunks()
            if put:
                assert await chunks.put(h, data) is True
            return await chunks.get(h)

    trio.run(put_then_get, True)
    cluster.down()
    cluster.up()
    after = cluster.json("volume", "inspect", "keep")
    spec = ("name", "size", "repl", "block_size", "labels", "replicas", "coordinator", "epoch")
    assert {k: after[k] for k in spec} == {k: before[k] for k in spec}
    assert trio.run(put_then_get, False) == data
