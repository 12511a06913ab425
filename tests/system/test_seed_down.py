"""Embedded control store (issue 11): the seed holds the cluster map, but its loss stops only map changes.

A volume whose replicas do not include the seed keeps serving its mounts while the seed is down: the
coordinator answers from the record it holds, followers fence on the token they hold, keepalives and
``df`` do not need the store. New volumes keep the seed out of their replica set and coordinator duty
when other nodes can take them.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import eventually, mounted
from tests.system.faults import SEED, FaultCluster, fault_cluster, healthy, inspect, wait_volume
from tests.system.manifest import ManifestWriter, max_stall, verify_through_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root and FUSE")

# Past a mount's refresh (info + statfs) and several supervision rounds of the nodes.
SERVE_WITHOUT_SEED = 20.0


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[FaultCluster]:
    yield from fault_cluster(tmp_path, 3)


def test_new_volumes_keep_off_the_seed(cluster3: FaultCluster) -> None:
    c = cluster3
    for i in range(3):
        c.cli("volume", "create", f"r2-{i}", "--size", "1G", "--repl", "2")
        info = inspect(c, f"r2-{i}")
        assert SEED not in info["replicas"], info
    for i in range(4):
        c.cli("volume", "create", f"r3-{i}", "--size", "1G", "--repl", "3")
        info = inspect(c, f"r3-{i}")
        assert info["coordinator"] != SEED, info


def test_writes_go_on_while_the_seed_is_down(cluster3: FaultCluster, tmp_path: Path) -> None:
    c = cluster3
    c.cli("volume", "create", "svc", "--size", "2G", "--repl", "2")
    info = wait_volume(c, "svc", healthy(), "healthy")
    assert SEED not in info["replicas"], info
    with mounted(c, "svc", tmp_path / "m") as m:
        writer = ManifestWriter(m.path, tmp_path / "writer", max_size=256 << 10)
        try:
            writer.start()
            before = len(writer.wait_for(10))
            c.kill(SEED, signal.SIGKILL)
            killed = time.monotonic()
            # Acknowledged (fsync'd) files keep coming well past the mount's refresh: no error, no stall.
            eventually(lambda: any(e.acked > killed + SERVE_WITHOUT_SEED for e in writer.entries()), timeout=90,
                       what=f"files acknowledged {SERVE_WITHOUT_SEED:g}s after the seed died")
            assert writer.errors() == [], writer.errors()
            st = os.statvfs(m.path)  # df answers without the store
            assert st.f_blocks > 0
            after = [e for e in writer.entries() if e.acked > killed]
            stall = max_stall([e for e in writer.entries()[before - 1:]])
            print(f"seed down: {len(after)} files acknowledged in {time.monotonic() - killed:.1f}s after the kill, "
                  f"longest stall {stall:.2f}s")
            writer.stop()
        finally:
            writer.kill()
        assert writer.errors() == [], writer.errors()
        entries = writer.entries()
    c.up()  # the seed back: map changes and new mounts work again
    wait_volume(c, "svc", healthy(), "healthy with the seed back")
    with mounted(c, "svc", tmp_path / "again") as m2:
        assert [str(p) for p in verify_through_mount(m2.path, entries)] == []
