"""Observability (issue 15): every node's /metrics scraped during writes, its /api/status, and the
live cluster page loaded in headless Chromium (a screenshot is left as a test artefact) for a
degraded volume after a node is killed."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import blake3
import httpx
import pytest

from tests.conftest import PXFS, Cluster, eventually, mounted, pxfs_env
from tests.system.faults import wait_volume

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE")

MiB = 1 << 20
ARTEFACTS = Path(os.environ.get("PXFS_ARTEFACTS", "/tmp/pxfs-artefacts"))
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(http: str) -> tuple[dict[str, str], dict[str, float]]:
    """(metric family -> type, 'name{labels}' -> value) of one /metrics page."""
    text = httpx.get(f"http://{http}/metrics", timeout=10).text
    types, values = {}, {}
    for ln in text.splitlines():
        if ln.startswith("# TYPE "):
            _, _, name, kind = ln.split(" ", 3)
            types[name] = kind
        elif ln and not ln.startswith("#"):
            m = SAMPLE.match(ln)
            assert m, ln
            values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return types, values


def total(values: dict[str, float], name: str) -> float:
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def nodes_http(cluster: Cluster) -> dict[str, str]:
    nodes = cluster.json("node", "list")
    assert isinstance(nodes, list)
    return {n["id"]: n["http"] for n in nodes}


def test_metrics_move_with_writes(shared_cluster: Cluster, tmp_path: Path) -> None:
    cluster = shared_cluster
    vol = f"obs-{uuid.uuid4().hex[:6]}"
    cluster.cli("volume", "create", vol, "--size", "1G", "--repl", "3")
    info = cluster.json("volume", "inspect", vol)
    http = nodes_http(cluster)
    assert all(re.fullmatch(r"[\d.]+:\d+", h) for h in http.values()), http
    before = {n: scrape(h)[1] for n, h in http.items()}
    with mounted(cluster, vol, tmp_path / "mnt") as m:
        for i in range(4):
            with open(m.path / f"f{i}", "wb") as f:
                f.write(os.urandom(2 * MiB))
                f.flush()
                os.fsync(f.fileno())
    types, coord = scrape(http[info["coordinator"]])
    for name, kind in {"pxfs_chunk_put_seconds": "histogram", "pxfs_chunk_get_seconds": "histogram",
                       "pxfs_chunk_put_bytes_total": "counter", "pxfs_metadata_batch_seconds": "histogram",
                       "pxfs_pool_capacity_bytes": "gauge", "pxfs_pool_used_bytes": "gauge",
                       "pxfs_pool_chunks": "gauge",
                       "pxfs_volume_size_bytes": "gauge", "pxfs_volume_used_bytes": "gauge",
                       "pxfs_volume_state": "gauge", "pxfs_volume_replicas_in_sync": "gauge",
                       "pxfs_volume_replicas_missing": "gauge", "pxfs_verify_failures_total": "counter",
                       "pxfs_process_resident_memory_bytes": "gauge",
                       "pxfs_process_cpu_seconds_total": "counter"}.items():
        assert types.get(name) == kind, (name, types.get(name))
    assert not [k for k in coord if k.endswith("_created") or "_created{" in k]
    for node, h in http.items():
        after = scrape(h)[1]
        # Every replica took the 8 MiB (4 files x 2 MiB in 1 MiB blocks), and its pool grew.
        assert total(after, "pxfs_chunk_put_bytes_total") - total(before[node], "pxfs_chunk_put_bytes_total") >= 8 * MiB
        assert total(after, "pxfs_pool_used_bytes") >= total(before[node], "pxfs_pool_used_bytes") + 8 * MiB
    assert coord[f'pxfs_volume_size_bytes{{volume="{vol}"}}'] == 1 << 30
    assert coord[f'pxfs_volume_used_bytes{{volume="{vol}"}}'] == 8 * MiB
    assert coord[f'pxfs_volume_state{{state="healthy",volume="{vol}"}}'] == 1.0
    assert coord[f'pxfs_volume_replicas_in_sync{{volume="{vol}"}}'] == 3.0
    assert coord[f'pxfs_metadata_batch_seconds_count{{volume="{vol}"}}'] >= 8
    status = httpx.get(f"http://{http[info['coordinator']]}/api/status", timeout=10).json()
    cli = cluster.json("status")
    assert status.keys() == cli.keys() and status["health"] == cli["health"]
    assert {v["name"] for v in status["volumes"]} == {v["name"] for v in cli["volumes"]}
    assert httpx.get(f"http://{http['n1']}/nope", timeout=10).status_code == 404


def ops(values: dict[str, float], op: str) -> float:
    """FUSE requests of ``op`` the mount answered so far."""
    return values.get(f'pxfs_fuse_op_seconds_count{{op="{op}"}}', 0.0)


def mount_http(cluster: Cluster, vol: str) -> list[str]:
    """The http of each live mount of ``vol``, as the coordinator registered them."""
    info = cluster.json("volume", "inspect", vol)
    assert isinstance(info, dict)
    return [m["http"] for m in info["mounts"]]


def test_mount_serves_metrics(shared_cluster: Cluster, tmp_path: Path) -> None:
    """Every mount serves /metrics on a loopback port the volume's record names: FUSE op durations,
    write-back bytes, read cache hits and misses, its RSS and CPU; `-o http=off` serves none."""
    cluster = shared_cluster
    vol = f"mobs-{uuid.uuid4().hex[:6]}"
    cluster.cli("volume", "create", vol, "--size", "1G", "--repl", "3")
    data = os.urandom(4 * MiB)
    with mounted(cluster, vol, tmp_path / "quiet", "-o", "http=off") as m:
        assert mount_http(cluster, vol) == [""]
        (m.path / "f").write_bytes(data)
    with mounted(cluster, vol, tmp_path / "mnt") as m:
        [http] = mount_http(cluster, vol)
        assert re.fullmatch(r"127\.0\.0\.1:\d+", http), http
        types, before = scrape(http)
        for name, kind in {"pxfs_fuse_op_seconds": "histogram", "pxfs_writeback_dirty_bytes": "gauge",
                           "pxfs_writeback_limit_bytes": "gauge", "pxfs_read_cache_bytes": "gauge",
                           "pxfs_read_cache_total": "counter", "pxfs_mount_info": "gauge",
                           "pxfs_process_resident_memory_bytes": "gauge",
                           "pxfs_process_cpu_seconds_total": "counter"}.items():
            assert types.get(name) == kind, (name, types.get(name))
        assert before[f'pxfs_mount_info{{mountpoint="{m.path}",volume="{vol}"}}'] == 1.0
        assert before["pxfs_process_resident_memory_bytes"] > 10 * MiB
        # Written by the other mount: the first read fetches every block; once the kernel's page cache
        # lets go of the file, the second read reaches the mount again and finds them in its cache.
        assert (m.path / "f").read_bytes() == data
        mid = scrape(http)[1]
        assert mid['pxfs_read_cache_total{result="miss"}'] - before['pxfs_read_cache_total{result="miss"}'] >= 4
        with open(m.path / "f", "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert f.read() == data
        after_reads = scrape(http)[1]
        assert after_reads['pxfs_read_cache_total{result="hit"}'] - mid['pxfs_read_cache_total{result="hit"}'] >= 4
        assert ops(after_reads, "read") > ops(before, "read")
        with open(m.path / "g", "wb") as f:
            for _ in range(8):
                f.write(os.urandom(256 << 10))
            f.flush()
            os.fsync(f.fileno())
        after = scrape(http)[1]
        assert ops(after, "write") - ops(before, "write") >= 2  # 2 MiB in requests of at most 1 MiB
        assert ops(after, "fsync") >= 1
        assert after["pxfs_writeback_dirty_bytes"] == 0  # fsync returned: nothing is buffered
        assert after["pxfs_writeback_limit_bytes"] > 0
        status = httpx.get(f"http://{http}/api/status", timeout=10).json()
        assert status["volume"] == vol and status["mountpoint"] == str(m.path)
        assert status["coordinator"] == cluster.json("volume", "inspect", vol)["coordinator"]  # type: ignore[index]
        assert httpx.get(f"http://{http}/", timeout=10).status_code == 404  # the cluster page is the nodes'
    assert mount_http(cluster, vol) == []  # unmounting deregistered it


IO_ROW = re.compile(r'<tr><td>(n\d)</td><td class="num">([^<]*)/s</td><td class="num">([^<]*)/s</td>'
                    r'<td class="num">([^<]*)</td><td class="num">([^<]*)</td><td>([^<]*)</td>'
                    r'<td class="num">(\d+)</td><td class="num[^"]*">(\d+)</td></tr>')


def size_of(text: str) -> float:
    """The page's sizes (``2.0M``) back in bytes."""
    units = "BKMGT"
    return float(text[:-1]) * 1024 ** units.index(text[-1])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_cluster_page_shows_a_degraded_volume(cluster: Cluster, tmp_path: Path) -> None:
    """Writes, a chunk rotted on one replica and healed by a scrub, then a replica killed: the page
    shows the degraded volume, the dead node, every node's I/O and scrub totals, the repair state,
    and the quarantine among the recent events of the cluster."""
    vol = f"page-{uuid.uuid4().hex[:6]}"
    cluster.cli("volume", "create", vol, "--size", "1G", "--repl", "3")
    info = cluster.json("volume", "inspect", vol)
    data = os.urandom(2 * MiB)
    with mounted(cluster, vol, tmp_path / "mnt") as m:
        with open(m.path / "f", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
    victim = next(r for r in info["replicas"] if r not in ("n1", info["coordinator"]))
    rotten = next(r for r in info["replicas"] if r != victim)
    h = blake3.blake3(data[:MiB]).hexdigest()
    chunk = cluster.dir / "nodes" / rotten / "pool" / "chunks" / h[:2] / h
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    report = json.loads(cluster.cli("scrub", vol, "--json").stdout)
    assert report["replicas"][rotten]["corrupt"] == 1, report
    cluster.kill(victim)
    wait_volume(cluster, vol, lambda v: v["state"] != "healthy", "the volume degraded")
    page_of = nodes_http(cluster)["n1"]
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / "cluster-page.png"
    shot.unlink(missing_ok=True)
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chromium'}"]
    dom = subprocess.run([*base, "--dump-dom", f"http://{page_of}/"], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert vol in html and "degraded" in html, html[:2000]
    row = next(ln for ln in html.splitlines() if vol in ln and "<td" in ln and "class=\"m\"" not in ln)
    assert "degraded" in row, row
    assert 'class="down"' in html  # the killed node is shown down
    # The replica matrix marks the dead replica missing (M) or lagging (L) on the volume's row.
    matrix = [ln for ln in html.splitlines() if ln.startswith(f"<tr><td>{vol}</td>") and "&#9679;" in ln
              or ln.startswith(f"<tr><td>{vol}</td>") and ">C<" in ln]
    assert matrix and any(">M<" in ln or ">L<" in ln for ln in matrix), matrix
    # I/O and scrub: every node that answers took the 2 MiB and verified its 2 chunks; one bad copy.
    io = {r[0]: r for r in IO_ROW.findall(html)}
    assert set(io) == {"n1", "n2", "n3"} - {victim}, html[html.find("I/O"):][:3000]
    assert f'<tr><td>{victim}</td><td colspan="7" class="down">' in html  # down, or no answer
    for node in set(info["replicas"]) - {victim}:
        _, _write, _read, written, _read_total, scrub, verified, bad = io[node]
        assert size_of(written) >= 2 * MiB and int(verified) >= 2 and scrub.startswith(("scrubbing", "last verified"))
        assert int(bad) == (1 if node == rotten else 0), io[node]
    # The repair column says how far the coordinator's repair got.
    assert "round " in row, row
    # The quarantine is among the cluster's events, from the node that found it.
    events = html[html.index("Recent events"):]
    assert any(f"<td>{rotten}</td>" in ln and "quarantined" in ln for ln in events.splitlines()), events[:3000]
    proc = subprocess.run([*base, "--window-size=1280,1400", f"--screenshot={shot}", f"http://{page_of}/"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    print(f"\n[page] screenshot: {shot}")
    eventually(lambda: json.loads(httpx.get(f"http://{page_of}/api/status", timeout=10).text)["health"] == "degraded",
               30, "api/status degraded")


@contextmanager
def in_tmux(cluster: Cluster, *args: str) -> Iterator[Callable[[], str]]:
    """``pxfs ARGS`` in a detached tmux terminal (160x50); yields what its screen shows now."""
    session = f"pxfs-{uuid.uuid4().hex[:6]}"
    env = " ".join(f"{k}={v}" for k, v in {"PXFS_CLUSTER": str(cluster.dir),
                                           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}.items())
    cmd = f"env {env} {sys.executable} -m pxfs {' '.join(args)}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50", cmd], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

    try:
        yield screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def on_a_terminal(cluster: Cluster, *args: str, timeout: float = 120) -> str:
    """``pxfs ARGS`` with stdout and stderr on one pseudo-terminal: everything it wrote there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*PXFS, *args], stdin=slave, stdout=slave, stderr=slave,
                            env=pxfs_env(PXFS_CLUSTER=str(cluster.dir)))
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"pxfs {' '.join(args)} still running after {timeout}s: {out[-2000:]!r}"
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process exited and closed the terminal
                break
            if not data:
                break
            out += data
        assert proc.wait(timeout=timeout) == 0, out[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return out.decode().replace("\r\n", "\n")


def test_json_output_stays_pure_json_on_a_terminal(shared_cluster: Cluster, tmp_path: Path) -> None:
    """Long commands draw progress on a terminal, but never under --json: a script that runs them
    in a terminal (a CI shell, `script`) still reads one JSON document."""
    cluster = shared_cluster
    vol = f"pj-{uuid.uuid4().hex[:6]}"
    cluster.cli("volume", "create", vol, "--size", "1G", "--repl", "3")
    with mounted(cluster, vol, tmp_path / "mnt") as m:
        (m.path / "f").write_bytes(os.urandom(3 * MiB))
    for args in (("scrub", vol), ("fsck", vol), ("volume", "repair", vol, "--wait"), ("gc", "--dry-run")):
        out = on_a_terminal(cluster, *args, "--json")
        assert "\x1b" not in out, (args, out[:500])
        doc = json.loads(out)
        assert isinstance(doc, dict), (args, out[:500])
    assert json.loads(on_a_terminal(cluster, "scrub", vol, "--json"))["volumes"][vol]["state"] == "healthy"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_repair_progress_in_a_terminal(cluster: Cluster, tmp_path: Path) -> None:
    """`pxfs volume repair --wait` in tmux while a replica is down: a progress line says what the
    repair waits for, and stays until the volume is healthy (here: until the test stops it)."""
    vol = f"rp-{uuid.uuid4().hex[:6]}"
    cluster.cli("volume", "create", vol, "--size", "1G", "--repl", "3")
    with mounted(cluster, vol, tmp_path / "mnt") as m:
        (m.path / "f").write_bytes(os.urandom(MiB))
    info = cluster.json("volume", "inspect", vol)
    assert isinstance(info, dict)
    victim = next(r for r in info["replicas"] if r not in ("n1", info["coordinator"]))
    cluster.kill(victim)
    wait_volume(cluster, vol, lambda v: victim in v["missing_replicas"], "the replica seen missing")
    with in_tmux(cluster, "volume", "repair", vol, "--wait") as screen:
        def progress_line() -> str | None:
            return next((ln for ln in screen().splitlines() if ln.startswith(f"repair {vol}: degraded")), None)

        row = eventually(progress_line, 30, "a progress line")
        assert f"waiting for {victim} (down)" in row and re.search(r"\d+:\d\d:\d\d", row), row
        first = row
        eventually(lambda: (ln := progress_line()) is not None and ln != first, 10, "the elapsed time moved")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_pxfs_top_in_a_terminal(shared_cluster: Cluster) -> None:
    """`pxfs top` driven in tmux: the screen shows the nodes, a volume and its replica matrix, and refreshes."""
    cluster = shared_cluster
    vol = f"top-{uuid.uuid4().hex[:6]}"
    cluster.cli("volume", "create", vol, "--size", "1G", "--repl", "3")
    with in_tmux(cluster, "top", "--every", "1") as screen:
        def drawn() -> str | None:
            s = screen()
            return s if vol in s and "replicas:" in s else None

        first = eventually(drawn, 30, "pxfs top drew")
        assert 'pxfs cluster "' in first and all(f"n{i}" in first for i in (1, 2, 3)), first
        row = next(ln for ln in first.splitlines() if ln.startswith(vol) and "C" in ln)
        assert row.count("*") == 2, row  # two followers in sync beside the coordinator
        stamp = re.search(r"\d\d:\d\d:\d\d", first)
        assert stamp
        def refreshed() -> bool:
            m = re.search(r"\d\d:\d\d:\d\d", screen())
            return bool(m) and m.group(0) != stamp.group(0)

        eventually(refreshed, 10, "pxfs top refreshed")
