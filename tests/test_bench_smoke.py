"""Smoke checks of the benchmarks: ``scripts/bench --quick`` end to end, ``pxfs bench --json`` on a plain directory.

No speed is asserted anywhere: these only check that the tools run, report and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["big_write", "big_read", "small_write", "small_read", "stat", "create_unlink"]


def _bench_cmd() -> list[str]:
    """``python -m pxfs bench`` once main.py has it, else the module itself."""
    wired = subprocess.run([sys.executable, "-m", "pxfs", "bench", "--help"], capture_output=True, cwd=ROOT)
    if wired.returncode == 0:
        return [sys.executable, "-m", "pxfs", "bench"]
    return [sys.executable, "-m", "pxfs.cli.bench_cmd"]


def _mounts_under(d: Path) -> list[str]:
    prefix = str(d.resolve()).rstrip("/") + "/"
    with open("/proc/mounts") as f:
        return [m for m in (line.split()[1] for line in f) if m.startswith(prefix)]


def _processes_mentioning(d: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(d.resolve()) in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def test_pxfs_bench_json(tmp_path: Path) -> None:
    proc = subprocess.run([*_bench_cmd(), str(tmp_path), "--big-file-size", "8M", "--small-files", "20", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["dir"] == str(tmp_path.resolve())
    assert (doc["threads"], doc["big_file_size"], doc["small_files"], doc["small_file_size"]) == (1, 8 << 20, 20,
                                                                                                   16 << 10)
    assert isinstance(doc["caches_dropped"], bool) and isinstance(doc["notes"], list)
    assert doc["caches_dropped"] == (os.geteuid() == 0)
    results = {r["test"]: r for r in doc["results"]}
    assert list(results) == TESTS
    for name, r in results.items():
        assert r["unit"] == ("MiB/s" if name.startswith("big") else "files/s" if name.startswith("small") else "ops/s")
        assert r["value"] > 0 and r["seconds"] > 0, r
        assert set(r["latency_ms"]) == {"avg", "p50", "p99", "max"}
        assert 0 <= r["latency_ms"]["p50"] <= r["latency_ms"]["max"]
    assert results["big_write"]["bytes"] == results["big_read"]["bytes"] == 8 << 20
    assert results["big_write"]["ops"] == 8 and results["big_write"]["fsync_s"] >= 0
    assert results["small_write"]["ops"] == results["stat"]["ops"] == results["create_unlink"]["ops"] == 20
    assert list(tmp_path.iterdir()) == []  # its temp subdirectory is gone


def test_pxfs_bench_errors_are_one_line(tmp_path: Path) -> None:
    missing = subprocess.run([*_bench_cmd(), str(tmp_path / "nope")], capture_output=True, text=True, timeout=60,
                             cwd=ROOT)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [f"pxfs: directory '{tmp_path.resolve() / 'nope'}': does not exist"]
    huge = subprocess.run([*_bench_cmd(), str(tmp_path), "--big-file-size", "1E", "--json"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert huge.returncode == 1 and huge.stdout == ""
    assert len(huge.stderr.strip().splitlines()) == 1 and "free, the benchmark needs" in huge.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists() or not shutil.which("bindfs"),
                    reason="needs root, FUSE and bindfs")
def test_scripts_bench_quick(tmp_path: Path) -> None:
    proc = subprocess.run([str(ROOT / "scripts" / "bench"), "--quick", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    header = next((line for line in out.splitlines() if line.startswith("| test")), "")
    for col in ("native", "bindfs", "pxfs-r1", "pxfs-r3", "pxfs-r3/native", "r3/target"):
        assert f" {col} " in header, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| test")]
    assert len(rows) >= 2, out
    assert _mounts_under(tmp_path) == [], proc.stderr
    assert list(tmp_path.iterdir()) == [], proc.stderr  # the temp directory is removed
    assert _processes_mentioning(tmp_path) == []
