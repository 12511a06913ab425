"""A local etcd cluster on loopback for ``pxfs up --store etcd``: its members' processes under DIR/etcd.

Layout: ``DIR/etcd/e<i>/`` holds ``member.json`` (name, client and peer ports), ``data/`` (etcd's
data directory), ``etcd.log`` and ``pid``. Member ``i`` (from 1) listens for clients on
``base + 2(i-1)`` and for its peers on the port after it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from pxfs.client.procs import alive
from pxfs.errors import Invalid, Unavailable

HEALTH_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class Member:
    name: str
    client: int
    peer: int
    dir: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer}"


def etcd_binary() -> str:
    found = shutil.which("etcd")
    if found is None:
        raise Unavailable("etcd", "not installed (Debian package etcd-server; scripts/setup installs it)")
    return found


def plan(d: Path, count: int, base_port: int) -> list[Member]:
    """The members of DIR's local etcd cluster: as recorded, or ``count`` new ones from ``base_port``."""
    existing = load(d)
    if existing:
        if len(existing) != count:
            raise Invalid(f"--etcd-members {count}", f"the local etcd cluster in {d / 'etcd'} has "
                          f"{len(existing)} member(s); it cannot be resized here")
        return existing
    if not 1 <= count <= 7 or count % 2 == 0:
        raise Invalid(f"--etcd-members {count}", "a local etcd cluster has 1, 3, 5 or 7 members (a majority "
                      "must survive a loss)")
    if not 1024 <= base_port <= 65535 - 2 * count:
        raise Invalid(f"--etcd-base-port {base_port}", "must be between 1024 and 65535 minus twice the member count")
    members = [Member(f"e{i}", base_port + 2 * (i - 1), base_port + 2 * (i - 1) + 1, d / "etcd" / f"e{i}")
               for i in range(1, count + 1)]
    for m in members:
        m.dir.mkdir(parents=True, exist_ok=True)
        (m.dir / "member.json").write_text(json.dumps({"name": m.name, "client": m.client, "peer": m.peer}) + "\n")
    return members


def load(d: Path) -> list[Member]:
    root = d / "etcd"
    out = []
    for md in sorted(root.iterdir(), key=lambda p: p.name) if root.exists() else []:
        try:
            spec = json.loads((md / "member.json").read_text())
            out.append(Member(spec["name"], int(spec["client"]), int(spec["peer"]), md))
        except (OSError, ValueError, KeyError):
            continue
    return out


def store_url(members: list[Member]) -> str:
    return "etcd://" + ",".join(m.endpoint for m in members)


def running(m: Member) -> int | None:
    """The pid of this member's etcd, if it runs (the pid file and a matching command line)."""
    try:
        pid = int((m.dir / "pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if str(m.dir / "data").encode() in cmdline and alive(pid) else None


def spawn(m: Member, members: list[Member], token: str) -> subprocess.Popen:
    client = f"http://127.0.0.1:{m.client}"
    argv = [etcd_binary(), "--name", m.name, "--data-dir", str(m.dir / "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", ",".join(f"{x.name}={x.peer_url}" for x in members),
            "--initial-cluster-token", token, "--initial-cluster-state", "new",
            # The map is rewritten by heartbeats and usage reports: keep an hour of history, not all.
            "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h"]
    log = open(m.dir / "etcd.log", "ab")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, cwd="/")
    (m.dir / "pid").write_text(f"{proc.pid}\n")
    return proc


async def wait_healthy(members: list[Member], procs: dict[str, subprocess.Popen],
                       timeout: float = HEALTH_TIMEOUT) -> None:
    """Until every member answers /health with true (a leader elected and reachable)."""
    async with httpx.AsyncClient(timeout=2) as client:
        with trio.move_on_after(timeout):
            while True:
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        logf = next(m.dir for m in members if m.name == name) / "etcd.log"
                        lines = logf.read_text(errors="replace").strip().splitlines()[-1:] if logf.exists() else []
                        raise Unavailable(f"etcd member {name}", f"exited with status {proc.returncode}: "
                                          f"{lines[0] if lines else 'no log'} (log: {logf})")
                healthy = 0
                for m in members:
                    try:
                        r = await client.get(f"http://{m.endpoint}/health")
                        healthy += r.status_code == 200 and r.json().get("health") == "true"
                    except (httpx.HTTPError, ValueError):
                        pass
                if healthy == len(members):
                    return
                await trio.sleep(0.2)
    raise Unavailable(f"local etcd cluster {store_url(members)}",
                      f"not healthy after {timeout:g}s; see {members[0].dir.parent}/*/etcd.log")


def stop(d: Path) -> tuple[list[str], list[str]]:
    """SIGTERM every running member, SIGKILL what is left after STOP_TIMEOUT: (stopped, killed)."""
    pids = {m.name: pid for m in load(d) if (pid := running(m)) is not None}
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)

    async def wait() -> list[str]:
        with trio.move_on_after(STOP_TIMEOUT):
            while any(alive(p) for p in pids.values()):
                await trio.sleep(0.05)
        return [n for n, p in pids.items() if alive(p)]

    stuck = trio.run(wait)
    for name in stuck:
        os.kill(pids[name], signal.SIGKILL)
    for m in load(d):
        (m.dir / "pid").unlink(missing_ok=True)
    return sorted(pids), stuck
