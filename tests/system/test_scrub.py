"""Bit rot: corrupt chunk files on disk, then read through the mount and scrub."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import blake3
import pytest

from tests.conftest import Cluster, mounted

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root and FUSE")


def chunk_file(cluster: Cluster, node: str, data: bytes) -> Path:
    h = blake3.blake3(data).hexdigest()
    return cluster.dir / "nodes" / node / "pool" / "chunks" / h[:2] / h


def flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_read_serves_good_copy_and_heals_bad_one(shared_cluster: Cluster, tmp_path: Path) -> None:
    shared_cluster.cli("volume", "create", "rot1", "--size", "1G", "--repl", "3")
    data = os.urandom(700_000)  # one block: one chunk
    with mounted(shared_cluster, "rot1", tmp_path / "a") as m:
        with open(m.path / "f", "wb") as fh:
            fh.write(data)
            os.fsync(fh.fileno())
    replicas = shared_cluster.json("volume", "inspect", "rot1")["replicas"]
    bad = chunk_file(shared_cluster, replicas[0], data)
    flip(bad)
    # A fresh mount has no cached copy: the read goes to the replicas, the first of which is bad.
    with mounted(shared_cluster, "rot1", tmp_path / "b") as m:
        assert hashlib.sha256((m.path / "f").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert bad.read_bytes() == data, "the corrupt copy was not replaced by a good one"
    quarantined = list((shared_cluster.dir / "nodes" / replicas[0] / "pool" / "corrupt").iterdir())
    assert quarantined


def test_scrub_heals_one_bad_copy_and_reports_what_is_lost(shared_cluster: Cluster, tmp_path: Path) -> None:
    shared_cluster.cli("volume", "create", "rot2", "--size", "1G", "--repl", "2")
    keep = os.urandom(2 << 20)
    doomed = os.urandom(100_000)
    with mounted(shared_cluster, "rot2", tmp_path / "a") as m:
        (m.path / "dir").mkdir()
        for name, data in (("dir/keep", keep), ("doomed", doomed)):
            with open(m.path / name, "wb") as fh:
                fh.write(data)
                os.fsync(fh.fileno())
    r1, r2 = shared_cluster.json("volume", "inspect", "rot2")["replicas"]
    first_block = keep[: 1 << 20]
    flip(chunk_file(shared_cluster, r1, first_block))
    proc = shared_cluster.cli("scrub", "rot2", "--json", timeout=240)
    report = json.loads(proc.stdout)
    assert report["replicas"][r1]["corrupt"] == 1 and report["replicas"][r2]["corrupt"] == 0
    assert report["volumes"]["rot2"]["state"] == "healthy" and report["volumes"]["rot2"]["lost"] == []
    assert chunk_file(shared_cluster, r1, first_block).read_bytes() == first_block

    for node in (r1, r2):
        flip(chunk_file(shared_cluster, node, doomed))
    proc = shared_cluster.cli("scrub", "rot2", "--json", check=False, timeout=240)
    assert proc.returncode == 1
    lost = json.loads(proc.stdout)["volumes"]["rot2"]["lost"]
    assert [(p["path"], p["offset"], p["length"]) for p in lost] == [("/doomed", 0, 100_000)]
    text = shared_cluster.cli("scrub", "rot2", check=False, timeout=240).stdout
    assert "/doomed" in text and "no good copy" in text
    # Never returned: a read of the lost block fails with EIO instead of handing out wrong bytes.
    with mounted(shared_cluster, "rot2", tmp_path / "c") as m:
        with pytest.raises(OSError):
            (m.path / "doomed").read_bytes()
        assert (m.path / "dir" / "keep").read_bytes() == keep


def test_fsck_clean_then_missing_chunks_named(shared_cluster: Cluster, tmp_path: Path) -> None:
    shared_cluster.cli("volume", "create", "fsck1", "--size", "1G", "--repl", "2")
    data = os.urandom(300_000)
    with mounted(shared_cluster, "fsck1", tmp_path / "a") as m:
        (m.path / "d").mkdir()
        with open(m.path / "d" / "x", "wb") as fh:
            fh.write(data)
            os.fsync(fh.fileno())
        os.link(m.path / "d" / "x", m.path / "y")
    clean = shared_cluster.cli("fsck", "fsck1", "--json")
    assert json.loads(clean.stdout)["ok"] is True
    assert shared_cluster.cli("fsck", "fsck1", "--repair").returncode == 0
    for node in shared_cluster.json("volume", "inspect", "fsck1")["replicas"]:
        chunk_file(shared_cluster, node, data).unlink()
    proc = shared_cluster.cli("fsck", "fsck1", "--json", check=False)
    assert proc.returncode == 1
    problems = json.loads(proc.stdout)["problems"]
    assert [p["kind"] for p in problems] == ["missing-chunk"]
    assert "/d/x bytes 0-300000" in problems[0]["detail"] or "/y bytes 0-300000" in problems[0]["detail"]
