"""The manifest-style fault-test kit, checked without a fault: the writer's records hold up through the
mount and on every replica, and the replica verifier does catch one damaged chunk on one node."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import trio

from pxfs.meta import slices
from pxfs.meta.slices import BlockMap
from tests.conftest import Cluster, mounted
from tests.system.manifest import (
    Entry,
    ManifestWriter,
    Problem,
    verify_on_replicas,
    verify_session,
    verify_through_mount,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE")

N_FILES = 20


def chunk_file(cluster: Cluster, node: str, h: bytes) -> Path:
    """Where ``node``'s (single) pool keeps chunk ``h`` (see ``pxfs.chunks.pool``)."""
    hx = h.hex()
    return cluster.dir / "nodes" / node / "pool" / "chunks" / hx[:2] / hx


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


async def block_maps(cluster: Cluster, volume: str, directory: Path,
                     entries: list[Entry]) -> tuple[int, list[str], dict[str, BlockMap]]:
    """The volume's block size and replica nodes, and each entry's block map at the coordinator."""
    async with verify_session(cluster, volume) as s:
        maps = {}
        for e in entries:
            ino = (await trio.to_thread.run_sync(os.stat, directory / e.name)).st_ino
            maps[e.name] = (await s.block_map(ino))[1]
        return s.info.block_size, list(s.info.replicas), maps


def test_writer_manifest_verifies_and_a_bad_replica_is_caught(shared_cluster: Cluster, tmp_path: Path) -> None:
    vol = f"manifest-{uuid.uuid4().hex[:8]}"
    shared_cluster.cli("volume", "create", vol, "--size", "1G", "--repl", "3")
    with mounted(shared_cluster, vol, tmp_path / "mnt") as m:
        target = m.path / "w"
        writer = ManifestWriter(target, tmp_path / "writer", seed=1)
        try:
            writer.start()
            writer.wait_for(N_FILES, timeout=120)
            writer.stop()
        finally:
            writer.kill()
        entries = writer.entries()
        assert len(entries) >= N_FILES
        assert writer.errors() == [], "the application saw errors"
        # A healthy cluster: report the stall for comparison with the fault tests' numbers.
        print(f"{len(entries)} files, {sum(e.size for e in entries)} bytes, max stall {writer.max_stall():.2f}s")

        assert verify_through_mount(target, entries) == []
        assert trio.run(verify_on_replicas, shared_cluster, vol, target, entries) == []

        bs, replicas, maps = trio.run(block_maps, shared_cluster, vol, target, entries)
        assert len(replicas) == 3
        # The run must have exercised the verifier's hole path: a block inside the size with no chunk.
        assert any(set(range(-(-e.size // bs))) - set(maps[e.name]) for e in entries), "no file with a hole"

        # Negative check: one flipped byte in one replica's copy of one chunk must be reported for that
        # replica and that file only (the node refuses to serve bytes that fail their BLAKE3 name).
        # Victim: the largest file's first stored block, ~1 MiB of random bytes that no other file
        # shares (a one-byte chunk, by contrast, may well be deduplicated with another file's tail).
        victim: Entry = max(entries, key=lambda e: e.size)
        h = maps[victim.name][min(maps[victim.name])][0][0]
        assert [e.name for e in entries
                if any(h in slices.hashes(b) for b in maps[e.name].values())] == [victim.name]
        node = replicas[-1]
        path = chunk_file(shared_cluster, node, h)
        assert path.exists(), f"chunk {h.hex()} not in node {node}'s pool"
        flip_byte(path, path.stat().st_size // 2)
        try:
            problems: list[Problem] = trio.run(verify_on_replicas, shared_cluster, vol, target, entries)
            assert problems, "the replica verifier missed a corrupt chunk"
            assert {(p.file, p.node) for p in problems} == {(victim.name, node)}, [str(p) for p in problems]
            assert all("Corrupt" in p.what for p in problems), [str(p) for p in problems]
        finally:
            if path.exists():
                flip_byte(path, path.stat().st_size // 2)
        # The node quarantined the bad copy when it was read; repair puts a good one back.
        assert not path.exists()
        assert list((shared_cluster.dir / "nodes" / node / "pool" / "corrupt").iterdir())
        shared_cluster.cli("volume", "repair", vol, "--wait", timeout=300)
        assert trio.run(verify_on_replicas, shared_cluster, vol, target, entries) == []
