"""The Docker/podman volume plugin: its HTTP API over the unix socket against a real cluster, and
real podman (Debian's; the plugin named in a containers.conf of the test's own, an image made here
with `podman import` from busybox-static, storage in the test's directory) creating a volume,
writing it from one container, reading it from a second, and removing it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from pxfs.client.mounts import read_registry
from tests.conftest import PXFS, Cluster, is_mounted, pxfs_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE")

ACCEPT = {"Accept": "application/vnd.docker.plugins.v1+json"}


@dataclass
class Plugin:
    proc: subprocess.Popen
    sock: Path
    root: Path
    client: httpx.Client

    def call(self, endpoint: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        r = self.client.post(f"http://plugin/{endpoint}", json=body or {}, headers=ACCEPT, timeout=120)
        return r.status_code, r.json()

    def ok(self, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        status, answer = self.call(endpoint, body)
        assert status == 200 and not answer.get("Err"), (endpoint, status, answer)
        return answer

    def err(self, endpoint: str, body: dict[str, Any]) -> str:
        status, answer = self.call(endpoint, body)
        assert status != 200 and answer.get("Err"), (endpoint, status, answer)
        assert "Traceback" not in answer["Err"]
        return answer["Err"]


def start_plugin(cluster: Cluster, work: Path) -> Plugin:
    sock = work / "pxfs.sock"
    log = open(work / "plugin.log", "ab")  # noqa: SIM115 - the plugin's log outlives this call
    proc = subprocess.Popen([*PXFS, "volume-plugin", "--socket", str(sock), "--mount-root", str(work / "volumes"),
                             "--state-dir", str(work / "state"), "--log-dir", str(work / "logs"),
                             "--cluster", str(cluster.dir)], stdout=log, stderr=log, env=pxfs_env())
    log.close()
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)))
    deadline = time.monotonic() + 30
    while True:
        try:
            client.post("http://plugin/Plugin.Activate", json={}, timeout=5)
            return Plugin(proc, sock, work / "volumes", client)
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("plugin did not come up: " + (work / "plugin.log").read_text()[-2000:]) from None
            time.sleep(0.05)


def stop_plugin(p: Plugin, sig: int = signal.SIGTERM) -> None:
    p.client.close()
    p.proc.send_signal(sig)
    p.proc.wait(timeout=30)


@pytest.fixture
def work() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vp", dir="/tmp"))  # short: unix socket paths
    try:
        yield d
    finally:
        for mp in (d / "volumes").iterdir() if (d / "volumes").exists() else []:
            if is_mounted(mp):
                subprocess.run([*PXFS, "umount", str(mp)], capture_output=True, env=pxfs_env())
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def plugin(shared_cluster: Cluster, work: Path) -> Iterator[Plugin]:
    p = start_plugin(shared_cluster, work)
    holder = [p]
    try:
        yield p
    finally:
        stop_plugin(holder[-1])
        assert not (work / "pxfs.sock").exists(), "the plugin left its socket behind"


def test_protocol(shared_cluster: Cluster, plugin: Plugin, work: Path) -> None:
    assert plugin.ok("Plugin.Activate") == {"Implements": ["VolumeDriver"]}
    assert plugin.ok("VolumeDriver.Capabilities") == {"Capabilities": {"Scope": "global"}}
    assert "no such volume" in plugin.err("VolumeDriver.Get", {"Name": "vp-a"})
    opts = {"size": "256M", "repl": "3", "blockSize": "64K", "label": "app=db,tier=1"}
    plugin.ok("VolumeDriver.Create", {"Name": "vp-a", "Opts": opts})
    plugin.ok("VolumeDriver.Create", {"Name": "vp-a", "Opts": opts})  # the same volume again
    plugin.ok("VolumeDriver.Create", {"Name": "vp-a"})  # no options: the one that exists
    assert "repl" in plugin.err("VolumeDriver.Create", {"Name": "vp-a", "Opts": {"size": "256M", "repl": "1"}})
    assert "unknown" in plugin.err("VolumeDriver.Create", {"Name": "vp-b", "Opts": {"colour": "red"}})
    assert "size" in plugin.err("VolumeDriver.Create", {"Name": "vp-b", "Opts": {"size": "lots"}})
    assert "name" in plugin.err("VolumeDriver.Create", {"Name": "../etc", "Opts": {}})
    info = shared_cluster.json("volume", "inspect", "vp-a")
    assert (info["size"], info["repl"], info["block_size"], info["labels"]) == (256 << 20, 3, 64 << 10,
                                                                               {"app": "db", "tier": "1"})
    got = plugin.ok("VolumeDriver.Get", {"Name": "vp-a"})["Volume"]
    assert got["Name"] == "vp-a" and "Mountpoint" not in got and got["Status"]["repl"] == 3
    assert "vp-a" in [v["Name"] for v in plugin.ok("VolumeDriver.List")["Volumes"]]
    assert plugin.ok("VolumeDriver.Path", {"Name": "vp-a"})["Mountpoint"] == ""

    # Mount and Unmount count callers: one mount for both, gone with the last.
    mp = Path(plugin.ok("VolumeDriver.Mount", {"Name": "vp-a", "ID": "c1"})["Mountpoint"])
    assert mp == plugin.root / "vp-a" and is_mounted(mp)
    pid = read_registry(mp).pid  # type: ignore[union-attr]
    assert Path(plugin.ok("VolumeDriver.Mount", {"Name": "vp-a", "ID": "c2"})["Mountpoint"]) == mp
    assert read_registry(mp).pid == pid  # type: ignore[union-attr]
    (mp / "f").write_bytes(b"from the plugin's mount\n")
    assert plugin.ok("VolumeDriver.Path", {"Name": "vp-a"})["Mountpoint"] == str(mp)
    assert plugin.ok("VolumeDriver.Get", {"Name": "vp-a"})["Volume"]["Mountpoint"] == str(mp)
    assert "in use" in plugin.err("VolumeDriver.Remove", {"Name": "vp-a"})
    plugin.ok("VolumeDriver.Unmount", {"Name": "vp-a", "ID": "c1"})
    assert is_mounted(mp)
    # The plugin killed and started again still knows c2 holds the volume.
    plugin.proc.kill()
    plugin.proc.wait(timeout=30)
    plugin.client.close()
    again = start_plugin(shared_cluster, work)
    plugin.proc, plugin.client = again.proc, again.client
    assert is_mounted(mp) and (mp / "f").read_bytes() == b"from the plugin's mount\n"
    plugin.ok("VolumeDriver.Unmount", {"Name": "vp-a", "ID": "c2"})
    assert not is_mounted(mp)
    plugin.ok("VolumeDriver.Unmount", {"Name": "vp-a", "ID": "c2"})  # unmounted already
    assert "no such volume" in plugin.err("VolumeDriver.Mount", {"Name": "vp-none", "ID": "c3"})
    plugin.ok("VolumeDriver.Remove", {"Name": "vp-a"})
    assert "no such volume" in plugin.err("VolumeDriver.Remove", {"Name": "vp-a"})
    assert "no such volume" in plugin.err("VolumeDriver.Get", {"Name": "vp-a"})
    status, answer = plugin.call("VolumeDriver.Bogus", {})
    assert status == 404 and answer["Err"]


def _podman_env(work: Path, sock: Path) -> dict[str, str]:
    (work / "storage").mkdir()
    (work / "storage.conf").write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{work}/storage/root"\n'
                                       f'runroot = "{work}/storage/run"\n')
    (work / "containers.conf").write_text(
        f'[engine]\ntmp_dir = "{work}/storage/tmp"\nvolume_path = "{work}/storage/volumes"\n'
        'events_logger = "none"\nvolume_plugin_timeout = 60\n'
        f'[engine.volume_plugins]\npxfs = "{sock}"\n'
        f'[network]\nnetwork_config_dir = "{work}/storage/networks"\n')
    return dict(os.environ, CONTAINERS_CONF=str(work / "containers.conf"),
                CONTAINERS_STORAGE_CONF=str(work / "storage.conf"))


@pytest.mark.skipif(shutil.which("podman") is None or not Path("/bin/busybox").exists(),
                    reason="podman and busybox-static not installed (scripts/setup installs them)")
def test_podman(shared_cluster: Cluster, plugin: Plugin, work: Path) -> None:
    env = _podman_env(work, plugin.sock)

    def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=180)
        assert not check or proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr}"
        return proc

    # An image without any registry: busybox-static's one binary, imported as a root filesystem.
    rootfs = work / "image.tar"
    with tarfile.open(rootfs, "w") as tar:
        tar.add("/bin/busybox", "bin/busybox")
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(link)
    podman("import", str(rootfs), "localhost/pxfs-bb:1")
    # This sandbox: crun cannot run here (cgroups in hybrid mode), no CAP_SYS_RESOURCE for the limits.
    run = ["run", "--rm", "--runtime", "runc", "--network", "none", "--ulimit", "nofile=1024:1024",
           "--ulimit", "nproc=1024:1024", "-v", "vp-podman:/data", "localhost/pxfs-bb:1", "/bin/sh", "-c"]
    try:
        podman("volume", "create", "--driver", "pxfs", "--opt", "size=1G", "--opt", "repl=3", "vp-podman")
        info = shared_cluster.json("volume", "inspect", "vp-podman")
        assert info["size"] == 1 << 30 and info["repl"] == 3
        assert "vp-podman" in podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
        podman(*run, "echo written by the first container > /data/hello && mkdir /data/d && echo x > /data/d/y")
        assert not is_mounted(plugin.root / "vp-podman")  # the container gone, its mount is too
        out = podman(*run, "cat /data/hello /data/d/y").stdout
        assert out == "written by the first container\nx\n"
        podman("volume", "rm", "vp-podman")
        assert "vp-podman" not in [v["name"] for v in shared_cluster.json("volume", "list")]  # type: ignore[union-attr]
    finally:
        podman("volume", "rm", "--force", "vp-podman", check=False)
        podman("rmi", "--force", "localhost/pxfs-bb:1", check=False)
