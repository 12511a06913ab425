"""``pxfs cluster init``, ``pxfs node start``, ``pxfs up`` and ``pxfs down``: running nodes on this host."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import trio

from pxfs.cli import etcd_local
from pxfs.cli.output import line
from pxfs.client.procs import alive
from pxfs.cluster.backends import check_store, direct_store, kind_of, name_store
from pxfs.cluster.config import (
    COMMIT_WINDOW,
    ClusterConfig,
    check_commit_window,
    check_gc_grace,
    init_cluster,
    load_config,
    load_credential,
    save_config,
)
from pxfs.errors import Exists, Invalid, PxfsError, Unavailable
from pxfs.node import NodeConfig, PoolSpec, run_node
from pxfs.rpc.bridge import open_bridge
from pxfs.rpc.client import Connection, split_address
from pxfs.rpc.pki import Credential
from pxfs.sizes import parse_size

CLASSES = ("high", "medium", "low")
UP_TIMEOUT = 30.0
SETTLE_TIMEOUT = 15.0
DOWN_TIMEOUT = 15.0


def parse_pool(text: str) -> PoolSpec:
    path, *opts = text.split(",")
    if not path:
        raise Invalid(f"pool {text!r}", "expected PATH[,size=SIZE][,class=high|medium|low]")
    p = Path(path).resolve()
    size = 0
    klass = "medium"
    for opt in opts:
        k, sep, v = opt.partition("=")
        if k == "size" and sep:
            size = parse_size(v, f"pool {path} size")
        elif k == "class" and v in CLASSES:
            klass = v
        else:
            raise Invalid(f"pool {text!r}", f"unknown option {opt!r} (size=SIZE, class=high|medium|low)")
    p.mkdir(parents=True, exist_ok=True)
    if not size:
        st = os.statvfs(p)
        size = st.f_blocks * st.f_frsize
    return PoolSpec(path=p, capacity=size, klass=klass)


def _etcd_settings(args: argparse.Namespace) -> dict[str, str]:
    """cluster.json's ``etcd`` block from ``--etcd-ca`` and friends (paths kept as given)."""
    out = {}
    for name in ("ca", "cert", "key", "user", "password_file"):
        value = getattr(args, f"etcd_{name}", None)
        if value:
            out[name] = value if name == "user" else str(Path(value).resolve())
    return out


def _name_new_store(d: Path, cfg: ClusterConfig) -> None:
    """A new cluster on etcd: write its identity there first. No node is a seed that would do it,
    and a node that finds an empty store later cannot tell a new cluster from a lost store."""

    async def go() -> None:
        store = direct_store(cfg, d)
        assert store is not None
        try:
            await name_store(store, cfg.id, f"control store {cfg.store}")
        finally:
            await store.aclose()

    trio.run(go)


def cmd_cluster_init(args: argparse.Namespace) -> int:
    d = Path(args.dir).resolve()
    store = args.store or "embedded"
    kind = kind_of(store)
    seed = args.seed if args.seed is not None else ("127.0.0.1:7700" if kind == "embedded" else "")
    if seed:
        split_address(seed)
    if (d / "cluster.json").exists():
        raise Exists(f"cluster directory {str(d)!r}", "already initialised (cluster.json exists)")
    probe = ClusterConfig(id=str(uuid.uuid4()), name=args.name or d.name, seed=seed, store=store,
                          etcd=_etcd_settings(args))
    if kind != "embedded":
        check_store(probe, d)
        _name_new_store(d, probe)
    cfg = init_cluster(d, probe.name, seed, store, cluster_id=probe.id, etcd=probe.etcd)
    if args.json:
        from pxfs.cli.output import emit_json

        emit_json({"id": cfg.id, "name": cfg.name, "seed": cfg.seed, "store": cfg.store, "dir": str(d)})
    elif kind == "embedded":
        line(f'cluster "{cfg.name}" ({cfg.id}) initialised in {d}; seed node address {cfg.seed}')
    else:
        line(f'cluster "{cfg.name}" ({cfg.id}) initialised in {d}; control store {cfg.store}')
    return 0


def cmd_node_start(args: argparse.Namespace) -> int:
    if not args.pool:
        raise Invalid("node", "at least one --pool PATH is required")
    labels = {}
    for item in args.label or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise Invalid(f"label {item!r}", "expected KEY=VALUE")
        labels[k] = v
    cfg = NodeConfig(cluster_dir=args.cluster, listen=args.listen, pools=[parse_pool(p) for p in args.pool],
                     labels=labels, node_id=args.id or "", state_dir=Path(args.state).resolve() if args.state else None,
                     seed=True if args.seed else None,
                     credential=Path(args.credential).resolve() if args.credential else None,
                     http=None if not args.http else "" if args.http == "off" else args.http)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    trio.run(run_node, cfg)
    return 0


# -- local clusters -----------------------------------------------------------------------------


def _pid_alive(pid_file: Path, marker: str) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    if marker not in cmdline or not alive(pid):
        return None
    return pid


def _node_dirs(d: Path) -> list[Path]:
    nodes = d / "nodes"
    return sorted((p for p in nodes.iterdir() if (p / "node.json").exists()), key=lambda p: int(p.name[1:])
                  if p.name[1:].isdigit() else 0) if nodes.exists() else []


def _spawn(cluster: Path, nd: Path) -> subprocess.Popen:
    spec = json.loads((nd / "node.json").read_text())
    argv = [sys.executable, "-m", "pxfs", "node", "start", "--cluster", str(cluster), "--listen", spec["listen"],
            "--id", spec["id"], "--state", str(nd / "state")]
    for p in spec["pools"]:
        argv += ["--pool", p]
    for k, v in spec["labels"].items():
        argv += ["--label", f"{k}={v}"]
    log = open(nd / "node.log", "ab")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                            cwd="/")
    (nd / "pid").write_text(f"{proc.pid}\n")
    return proc


async def _wait_up(cluster: Path, expected: list[str], procs: dict[str, subprocess.Popen]) -> None:
    cfg = load_config(cluster)
    credential = load_credential(cluster)
    async with open_bridge() as bridge:
        with trio.move_on_after(UP_TIMEOUT) as scope:
            while True:
                for nid, proc in procs.items():
                    if proc.poll() is not None:
                        logf = cluster / "nodes" / nid / "node.log"
                        tail = logf.read_text(errors="replace").strip().splitlines()[-1:] if logf.exists() else []
                        raise Unavailable(f"node {nid}", f"exited with status {proc.returncode}: "
                                          f"{tail[0] if tail else 'no log'} (log: {logf})")
                try:
                    conn = await Connection.open(bridge, cfg.seed, credential, peer="cli", timeout=2)
                    try:
                        nodes = await (await conn.admin()).list_nodes()
                    finally:
                        await conn.close()
                    up = {n.id for n in nodes if n.state == "up"}
                    if all(e in up for e in expected):
                        await _settle(bridge, cfg.seed, credential)
                        return
                except PxfsError:
                    pass
                await trio.sleep(0.2)
        if scope.cancelled_caught:
            raise Unavailable(f"cluster in {cluster}", f"nodes not all up after {UP_TIMEOUT:g}s; see nodes/*/node.log")


async def _settle(bridge: object, seed: str, credential: Credential) -> None:
    """Give restarted replicas a moment to be caught up, so the status printed next is not a
    transient 'degraded'; a volume still degraded after SETTLE_TIMEOUT is shown as it is."""
    with trio.move_on_after(SETTLE_TIMEOUT):
        while True:
            try:
                conn = await Connection.open(bridge, seed, credential, peer="cli", timeout=2)  # type: ignore[arg-type]
                try:
                    vols = await (await conn.admin()).list_volumes()
                finally:
                    await conn.close()
                if all(v.state == "healthy" for v in vols):
                    return
            except PxfsError:
                pass
            await trio.sleep(0.5)


def _holds_replicas(d: Path) -> bool:
    """Whether any local node of DIR keeps a replica (its state has a volume directory)."""
    return any(v.is_dir() for v in d.glob("nodes/*/state/volumes/*"))


def _start_etcd(d: Path, members: list[etcd_local.Member], cluster_id: str) -> None:
    procs = {}
    for m in members:
        if etcd_local.running(m) is None:
            procs[m.name] = etcd_local.spawn(m, members, f"pxfs-{cluster_id}")
            line(f"started etcd member {m.name} on {m.endpoint} (pid {procs[m.name].pid})")
        else:
            line(f"etcd member {m.name} already running")
    trio.run(etcd_local.wait_healthy, members, procs)


def _store_choice(args: argparse.Namespace, d: Path) -> tuple[str, list[etcd_local.Member]]:
    """(the store URL, the local etcd members to run) for `pxfs up`, from --store and DIR."""
    wanted = args.store
    if (d / "cluster.json").exists():
        cfg = load_config(d)
        members = etcd_local.load(d) if kind_of(cfg.store) == "etcd" else []
        same = (wanted is None or wanted == cfg.store or (wanted == "etcd" and bool(members)
                                                          and cfg.store == etcd_local.store_url(members)))
        if not same:
            raise Invalid(f"--store {wanted}", f"the cluster in {d} uses the control store {cfg.store}; "
                          "a cluster cannot change its store")
        if members and args.etcd_members != len(members) and args.etcd_members_given:
            raise Invalid(f"--etcd-members {args.etcd_members}", f"the local etcd cluster in {d / 'etcd'} has "
                          f"{len(members)} member(s)")
        return cfg.store, members
    if wanted in (None, "embedded"):
        return "embedded", []
    if wanted == "etcd":
        base = args.etcd_base_port if args.etcd_base_port is not None else args.base_port + 100
        members = etcd_local.plan(d, args.etcd_members, base)
        return etcd_local.store_url(members), members
    kind_of(wanted)  # an etcd:// URL of an etcd cluster run elsewhere, or Invalid naming it
    return wanted, []


def cmd_up(args: argparse.Namespace) -> int:
    d = Path(args.dir).resolve()
    if not 1 <= args.nodes <= 16:
        raise Invalid(f"--nodes {args.nodes}", "a local cluster has 1 to 16 nodes")
    if not 1024 <= args.base_port <= 65535 - args.nodes:
        raise Invalid(f"--base-port {args.base_port}", "must be between 1024 and 65535 minus the node count")
    pool_size = args.pool_size
    parse_size(pool_size, "pool size")
    if args.gc_interval is not None and not 0 <= args.gc_interval <= 30 * 86400:
        raise Invalid(f"--gc-interval {args.gc_interval:g}", "must be 0 (no automatic GC) to 30 days")
    if args.commit_window is not None:
        check_commit_window(args.commit_window, f"--commit-window {args.commit_window:g}")
    if args.gc_grace is not None:
        check_gc_grace(args.gc_grace, f"--gc-grace {args.gc_grace:g}",
                       COMMIT_WINDOW if args.commit_window is None else args.commit_window)
    args.etcd_members_given = args.etcd_members is not None
    args.etcd_members = args.etcd_members if args.etcd_members is not None else 3
    store, members = _store_choice(args, d)
    fresh = not (d / "cluster.json").exists()
    cluster_id = str(uuid.uuid4()) if fresh else load_config(d).id
    if members:
        _start_etcd(d, members, cluster_id)
    if fresh:
        probe = ClusterConfig(id=cluster_id, name=args.name or d.name, seed=f"127.0.0.1:{args.base_port}",
                              store=store)
        if kind_of(store) != "embedded":
            _name_new_store(d, probe)
        init_cluster(d, probe.name, probe.seed, store, cluster_id=cluster_id)
        line(f"initialised cluster in {d}" + (f" on control store {store}" if store != "embedded" else ""))
    elif kind_of(store) != "embedded" and not _holds_replicas(d):
        # An earlier `up` may have stopped between init and naming the store: no node holds data
        # here, so an empty store is this cluster's new one, not a lost one.
        _name_new_store(d, load_config(d))
    cfg = load_config(d)
    if args.failover_after is not None:
        cfg.failover_after = args.failover_after
    if args.replace_after is not None:
        cfg.replace_after = args.replace_after
    if args.repair_rate is not None:
        cfg.repair_rate = float(parse_size(args.repair_rate, "repair rate"))
    if args.gc_interval is not None:
        cfg.gc_interval = args.gc_interval
    if args.commit_window is not None:
        cfg.commit_window = args.commit_window
    if args.gc_grace is not None:
        cfg.gc_grace = args.gc_grace
    check_gc_grace(cfg.gc_grace, "the cluster's gc_grace (set --gc-grace too)", cfg.commit_window)
    existing = _node_dirs(d)
    for i in range(len(existing) + 1, args.nodes + 1):
        nd = d / "nodes" / f"n{i}"
        nd.mkdir(parents=True, exist_ok=True)
        listen = f"127.0.0.1:{args.base_port + i - 1}"
        spec = {"id": f"n{i}", "listen": listen, "pools": [f"{nd / 'pool'},size={pool_size}"],
                "labels": {"zone": f"zone-{i}"}}
        (nd / "node.json").write_text(json.dumps(spec, indent=2) + "\n")
        if listen not in cfg.nodes:
            cfg.nodes.append(listen)
    save_config(d, cfg)
    procs: dict[str, subprocess.Popen] = {}
    ids = []
    for nd in _node_dirs(d):
        ids.append(nd.name)
        if _pid_alive(nd / "pid", str(d)) is None:
            procs[nd.name] = _spawn(d, nd)
            line(f"started node {nd.name} (pid {procs[nd.name].pid})")
        else:
            line(f"node {nd.name} already running")
    trio.run(_wait_up, d, ids, procs)
    args.cluster = d
    from pxfs.cli.admin_cmds import cmd_status

    return trio.run(cmd_status, args)


def cmd_down(args: argparse.Namespace) -> int:
    d = Path(args.dir).resolve()
    if not (d / "cluster.json").exists() and etcd_local.load(d):
        # An `up` that failed before initialising the cluster may have started its etcd members.
        stopped, _killed = etcd_local.stop(d)
        line(f"stopped etcd member(s) {', '.join(stopped)}" if stopped else "nothing running")
        return 0
    load_config(d)
    unmounted = _unmount_all(d)
    pids: dict[str, int] = {}
    for nd in _node_dirs(d):
        pid = _pid_alive(nd / "pid", str(d))
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            pids[nd.name] = pid
    stuck = trio.run(_wait_exit, pids)
    for nid in stuck:
        os.kill(pids[nid], signal.SIGKILL)
    for nd in _node_dirs(d):
        (nd / "pid").unlink(missing_ok=True)
    if unmounted:
        line(f"unmounted {', '.join(unmounted)}")
    line(f"stopped {len(pids)} node(s)" + (f"; killed {', '.join(stuck)} after {DOWN_TIMEOUT:g}s" if stuck else ""))
    # The local etcd last: the nodes give their leases back to it as they stop.
    stopped, killed = etcd_local.stop(d)
    if stopped:
        line(f"stopped etcd member(s) {', '.join(stopped)}" + (f"; killed {', '.join(killed)} after "
                                                                f"{etcd_local.STOP_TIMEOUT:g}s" if killed else ""))
    return 0


def _unmount_all(d: Path) -> list[str]:
    """Unmount this cluster's mounts first: stopping nodes under a live mount would strand its writes."""
    from pxfs.client.mounts import registered

    done = []
    pids: dict[str, int] = {}
    for rec in registered(d):
        mp = str(rec.mountpoint)
        if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True)
        pids[mp] = rec.pid
        done.append(mp)
    for mp in trio.run(_wait_exit, pids):
        # Still trying to store buffered writes, against a cluster about to stop: the whole cluster
        # going down is the operator's call, so it gives up (and logs what it could not store).
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[mp], signal.SIGTERM)
    return done


async def _wait_exit(pids: dict[str, int]) -> list[str]:
    with trio.move_on_after(DOWN_TIMEOUT):
        while any(alive(p) for p in pids.values()):
            await trio.sleep(0.05)
    return [n for n, p in pids.items() if alive(p)]
