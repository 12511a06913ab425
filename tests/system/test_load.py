"""Sustained load: 16 processes of mixed operations on one volume; no error, data checks out, memory flat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster, make_cluster, mounted
from tests.system.test_mount_crash import mount_pid

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root and FUSE")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    # Every overwrite of a block stores a new chunk and the old one waits out the GC grace (issue 16),
    # so a minute of this load can use ~2 GiB per pool; room enough that space is not what is tested.
    yield from make_cluster(tmp_path, pool_size="8G")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_load(cluster: Cluster, tmp_path: Path, seconds: float, workers: int = 16) -> None:
    cluster.cli("volume", "create", "load", "--size", "4G", "--repl", "3")
    with mounted(cluster, "load", tmp_path / "mnt") as m:
        mount = mount_pid(m.path)
        node_pids = {n: cluster.pid(n) for n in ("n1", "n2", "n3")}
        # Warm up first, so the baseline includes caches that fill once (read cache, buffers).
        warm = subprocess.run([sys.executable, "-m", "tests.system.load_worker", str(m.path), "5", "999"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert warm.returncode == 0, warm.stderr
        before = {"mount": rss_mib(mount), **{n: rss_mib(p) for n, p in node_pids.items()}}
        procs = [subprocess.Popen([sys.executable, "-m", "tests.system.load_worker", str(m.path), str(seconds),
                                   str(i)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(workers)]
        results = []
        for p in procs:
            out, err = p.communicate(timeout=seconds + 300)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        after = {"mount": rss_mib(mount), **{n: rss_mib(p) for n, p in node_pids.items()}}
    total = sum(sum(r["ops"].values()) for r in results)
    print(f"\nload: {workers} processes x {seconds:g}s: {total} ops ({total / seconds:.0f} ops/s)")
    for k in before:
        print(f"  RSS {k}: {before[k]:.0f} MiB -> {after[k]:.0f} MiB")
    errors = [e for r in results for e in r["errors"]]
    assert errors == [], errors
    for k in before:
        assert after[k] < 256, f"{k} RSS {after[k]:.0f} MiB"
        assert after[k] - before[k] < 96, f"{k} RSS grew {before[k]:.0f} -> {after[k]:.0f} MiB"


def test_sixteen_processes_one_minute(cluster: Cluster, tmp_path: Path) -> None:
    run_load(cluster, tmp_path, seconds=60)


@pytest.mark.long
def test_sixteen_processes_ten_minutes(cluster: Cluster, tmp_path: Path) -> None:
    run_load(cluster, tmp_path, seconds=600)
