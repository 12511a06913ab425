"""kill -9 of a mount process mid-write: remount at once, every fsync'd file intact, metadata consistent."""

from __future__ import annotations

import json
import os
import select
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Cluster, is_mounted, mounted
from tests.system.manifest import ManifestWriter, verify_through_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root and FUSE")


def mount_pid(mountpoint: Path) -> int:
    reg = Path("/run/pxfs/mounts") / str(mountpoint).strip("/").replace("/", "_")
    return int(json.loads(reg.read_text())["pid"])


def test_kill_mount_mid_write_then_remount(shared_cluster: Cluster, tmp_path: Path) -> None:
    shared_cluster.cli("volume", "create", "crash", "--size", "2G", "--repl", "3")
    mp = tmp_path / "mnt"
    mp.mkdir()
    shared_cluster.cli("mount", "crash", str(mp))
    writer = ManifestWriter(mp, tmp_path / "writer")
    writer.start()
    try:
        writer.wait_for(12, timeout=120)
        pid = mount_pid(mp)
        fd = os.pidfd_open(pid)
        os.kill(pid, signal.SIGKILL)
        ready, _, _ = select.select([fd], [], [], 30)  # the kill is complete once the process is gone
        os.close(fd)
        assert ready, f"mount daemon {pid} still running 30 s after SIGKILL"
    finally:
        writer.kill()
    acked = writer.entries()
    assert len(acked) >= 12
    # The dead daemon leaves "Transport endpoint is not connected" behind; pxfs mount clears it itself.
    start = time.monotonic()
    with mounted(shared_cluster, "crash", mp) as m:
        remount_s = time.monotonic() - start
        print(f"remount after kill -9 took {remount_s:.2f}s")
        assert verify_through_mount(m.path, acked) == []
    assert not is_mounted(mp)
    fsck = shared_cluster.cli("fsck", "crash", "--json", check=False)
    if fsck.returncode == 2 and "invalid choice" in fsck.stderr:
        pytest.skip("fsck not available")
    report = json.loads(fsck.stdout)
    assert fsck.returncode == 0, report
