""""Hosts" for multi-host tests: network namespaces on a bridge, each with its own address, node
and/or mount processes (issue 11).

The test process stays in the root namespaces and reaches every host through the bridge's own
address; processes are put into a host with ``nsenter --net`` (not ``ip netns exec``, which would
also give them a private mount namespace and hide their FUSE mounts). Killing a host kills every
process in its network namespace; cutting it takes its link down (both directions, at once).
Everything made here carries a random tag and is removed by ``close``, also after a failed test.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pxfs.cluster.config import init_cluster, load_config, save_config
from tests.conftest import PXFS, Cluster, eventually, pxfs_env

PORT = 7700


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass
class Host:
    name: str
    netns: str
    address: str
    veth: str  # the root side of its link
    procs: list[subprocess.Popen] = field(default_factory=list)

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", *argv]

    def pids(self) -> list[int]:
        proc = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        return [int(p) for p in proc.stdout.split()]


class Net:
    """A bridge with hosts on 10.X.Y.0/24; the root namespace is 10.X.Y.1."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        rnd = random.Random(self.tag)
        self.prefix = f"10.{rnd.randint(100, 250)}.{rnd.randint(0, 250)}"
        self.bridge = f"pxb{self.tag}"
        self.hosts: dict[str, Host] = {}
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.prefix}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add(self, name: str) -> Host:
        i = len(self.hosts) + 1
        netns, veth = f"pxh{self.tag}{i}", f"pxv{self.tag}{i}"
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", f"pxp{self.tag}{i}")
        _ip("link", "set", f"pxp{self.tag}{i}", "netns", netns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "link", "set", f"pxp{self.tag}{i}", "name", "eth0")
        _ip("-n", netns, "addr", "add", f"{self.prefix}.{10 + i}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        host = Host(name, netns, f"{self.prefix}.{10 + i}", veth)
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Partition: the host reaches nobody and nobody reaches it."""
        _ip("link", "set", host.veth, "down")

    def heal(self, host: Host) -> None:
        _ip("link", "set", host.veth, "up")

    def kill(self, host: Host) -> None:
        """The host dies: every process in it, at once (SIGKILL), waited for."""
        for pid in host.pids():
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                select.select([fd], [], [], 30)
            except ProcessLookupError:
                pass
            finally:
                os.close(fd)
        for p in host.procs:
            p.wait(30)

    def close(self) -> None:
        for host in self.hosts.values():
            self.kill(host)
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class HostCluster(Cluster):
    """A pxfs cluster whose nodes run one per host (embedded store on the first, the seed)."""

    def __init__(self, net: Net, directory: Path, hosts: list[Host]) -> None:
        super().__init__(dir=directory, base_port=PORT, nodes=len(hosts))
        self.net, self.node_hosts = net, {f"n{i + 1}": h for i, h in enumerate(hosts)}
        cfg = init_cluster(directory, f"hosts-{net.tag}", f"{hosts[0].address}:{PORT}")
        cfg.nodes = [f"{h.address}:{PORT}" for h in hosts]
        cfg.failover_after = 2.0
        save_config(directory, cfg)

    def start(self, node: str) -> None:
        host = self.node_hosts[node]
        nd = self.dir / "nodes" / node
        nd.mkdir(parents=True, exist_ok=True)
        log = open(nd / "node.log", "ab")  # noqa: SIM115 - the node's stderr for its whole life
        args = ["node", "start", "--cluster", str(self.dir), "--listen", f"{host.address}:{PORT}", "--id", node,
                "--pool", f"{nd / 'pool'},size=2G", "--state", str(nd / "state"), "--label", f"zone={host.name}"]
        if node == "n1":
            args.append("--seed")
        proc = subprocess.Popen(host.argv(*PXFS, *args), stdout=log, stderr=log, env=pxfs_env(),
                                stdin=subprocess.DEVNULL)
        log.close()
        host.procs.append(proc)
        (nd / "pid").write_text(f"{proc.pid}\n")

    def start_all(self) -> None:
        for node in self.node_hosts:
            self.start(node)

        def up() -> bool:
            try:
                nodes = self.json("node", "list")
            except AssertionError:
                return False
            return isinstance(nodes, list) and sorted(n["id"] for n in nodes if n["state"] == "up") == sorted(
                self.node_hosts)

        eventually(up, 60, "every node up")

    def mount_on(self, host: Host, volume: str, path: Path) -> None:
        """``pxfs mount`` run inside ``host``: the mount daemon lives in that host's network."""
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(host.argv(*PXFS, "mount", volume, str(path), "--cluster", str(self.dir)),
                              capture_output=True, text=True, env=pxfs_env(), timeout=90)
        if proc.returncode != 0:
            raise AssertionError(f"mount on {host.name}: {proc.stderr}")

    def host_of(self, node: str) -> Host:
        return self.node_hosts[node]

    def addresses(self) -> list[str]:
        return load_config(self.dir).addresses()


def have_netns() -> bool:
    if os.geteuid() != 0 or sys.platform != "linux":
        return False
    probe = f"pxprobe{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok
