"""Shared fixtures: free loopback ports, a real local cluster of `pxfs node` processes, the CLI."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pxfs.cluster.config import load_config, load_credential
from pxfs.rpc.bridge import open_bridge
from pxfs.rpc.client import Connection
from pxfs.rpc.pki import Credential

PXFS = [sys.executable, "-m", "pxfs"]
# The checkout these tests belong to. `pxfs up` and `pxfs mount` start their daemons with cwd "/", where
# an editable install would import another checkout's pxfs: every pxfs process of a test imports this one.
REPO_ROOT = Path(__file__).resolve().parents[1]


def pxfs_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    """Adopt orphaned daemons without reaping them, as a container's init may: killed ones stay zombies."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


_become_subreaper()


def free_port_block(n: int) -> int:
    """A base port with ``n`` consecutive free loopback ports after it."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65000:
            continue
        socks = []
        try:
            for i in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free port block")


@dataclass
class Cluster:
    dir: Path
    base_port: int
    nodes: int
    pool_size: str = "2G"
    up_args: tuple[str, ...] = ()  # more options of `pxfs up` (GC settings, ...)

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        env = pxfs_env(PXFS_CLUSTER=str(self.dir))
        proc = subprocess.run([*PXFS, *args], capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"pxfs {' '.join(args)} failed rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "--json").stdout)

    def pid(self, node: str) -> int:
        return int((self.dir / "nodes" / node / "pid").read_text())

    def kill(self, node: str, sig: int = signal.SIGKILL) -> None:
        pid = self.pid(node)
        fd = os.pidfd_open(pid)
        try:
            os.kill(pid, sig)
            # The node is not our child: wait for its exit on a pidfd instead of polling.
            select.select([fd], [], [], 30)
        finally:
            os.close(fd)

    def up(self) -> subprocess.CompletedProcess:
        return self.cli("up", "--dir", str(self.dir), "--nodes", str(self.nodes), "--base-port",
                        str(self.base_port), "--pool-size", self.pool_size, *self.up_args)

    def down(self) -> None:
        subprocess.run([*PXFS, "down", "--dir", str(self.dir)], capture_output=True, timeout=60, env=pxfs_env())


def age_chunks(cluster: Cluster, seconds: float = 3600.0) -> int:
    """Make every chunk file in the cluster's pools ``seconds`` older, as that long a wait would:
    GC never sweeps a chunk younger than its grace (at least ``MIN_GC_GRACE``). Returns how many."""
    old = time.time() - seconds
    files = [f for f in cluster.dir.glob("nodes/*/pool/chunks/*/*") if f.is_file()]
    for f in files:
        os.utime(f, (old, old))
    return len(files)


def eventually(predicate, timeout: float = 20.0, what: str = "condition"):  # noqa: ANN001, ANN201
    """Re-check an observable condition until it holds (bounded): for states judged by heartbeats."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.2)


@asynccontextmanager
async def node_connection(cluster: Cluster, index: int = 0,
                          credential: Credential | None = None) -> AsyncIterator[Connection]:
    """A logged-in RPC connection to the cluster's ``index``-th node."""
    cfg = load_config(cluster.dir)
    async with open_bridge() as bridge:
        conn = await Connection.open(bridge, cfg.addresses()[index], credential or load_credential(cluster.dir),
                                     peer="test")
        try:
            yield conn
        finally:
            await conn.close()


def _stray_mounts(cluster_dir: Path) -> list[str]:
    """Mount daemons of this cluster still registered: unmount and kill them, and report them."""
    stray = []
    run = Path("/run/pxfs/mounts")
    for reg in run.iterdir() if run.exists() else []:
        try:
            info = json.loads(reg.read_text())
        except (OSError, ValueError):
            continue
        if info.get("cluster") != str(cluster_dir):
            continue
        stray.append(info["mountpoint"])
        subprocess.run(["umount", "-l", info["mountpoint"]], capture_output=True)
        try:
            os.kill(int(info["pid"]), signal.SIGKILL)
        except ProcessLookupError:
            pass
        reg.unlink(missing_ok=True)
        if info.get("control"):
            Path(info["control"]).unlink(missing_ok=True)  # a killed daemon leaves its socket
    return stray


def _leftover_pids(d: Path) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(d).encode() in (proc / "cmdline").read_bytes():
                    out.append(int(proc.name))
            except OSError:
                pass
    return out


def make_cluster(tmp_path: Path, nodes: int = 3, pool_size: str = "2G",
                 up_args: tuple[str, ...] = ()) -> Iterator[Cluster]:
    c = Cluster(dir=tmp_path / "cluster", base_port=free_port_block(nodes), nodes=nodes, pool_size=pool_size,
                up_args=up_args)
    try:
        c.up()
        yield c
    finally:
        stop_and_check(c)


def stop_and_check(c: Cluster) -> None:
    """Stop a test cluster and fail if it left a mount or a process behind (killing what it left)."""
    stray = _stray_mounts(c.dir)
    c.down()
    left = _leftover_pids(c.dir)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind after pxfs down: {left}"
    assert not stray, f"mounts left behind: {stray}"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A fresh 3-node local cluster (real processes on loopback), stopped and checked afterwards."""
    yield from make_cluster(tmp_path, 3)


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One 3-node cluster for a whole test module (tests must use their own volume names)."""
    yield from make_cluster(tmp_path_factory.mktemp("shared"), 3)


def mounted_pids(mountpoint: Path) -> list[int]:
    return [p for p in _leftover_pids(mountpoint) if p != os.getpid()]


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint).encode()
    return any(line.split()[1] == target for line in Path("/proc/mounts").read_bytes().splitlines())


@dataclass
class Mount:
    cluster: Cluster
    volume: str
    path: Path

    def umount(self) -> None:
        self.cluster.cli("umount", str(self.path))
        assert not is_mounted(self.path)


def mount(cluster: Cluster, volume: str, path: Path, *opts: str) -> Mount:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # a dead mount there (ENOTCONN): pxfs mount must clear it itself
    cluster.cli("mount", volume, str(path), *opts)
    assert is_mounted(path)
    return Mount(cluster, volume, path)


@contextmanager
def mounted(cluster: Cluster, volume: str, path: Path, *opts: str) -> Iterator[Mount]:
    """Mount in a separate daemon process (pyfuse3: one mount per process); always unmount."""
    m = mount(cluster, volume, path, *opts)
    try:
        yield m
    finally:
        if is_mounted(path):
            proc = cluster.cli("umount", str(path), check=False)
            if proc.returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)
                raise AssertionError(f"umount failed: {proc.stderr}")
