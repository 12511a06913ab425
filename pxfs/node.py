"""The ``pxfs node`` daemon: wires pools, the control store, the RPC server and heartbeats together."""

from __future__ import annotations

import logging
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from pxfs.chunks.local import LocalChunkStore
from pxfs.chunks.pool import Pool
from pxfs.cluster import records, status
from pxfs.cluster.admin import ClusterAdmin
from pxfs.cluster.backends import NodeContext, open_node_store
from pxfs.cluster.config import check_commit_window, check_gc_grace, load_config
from pxfs.cluster.etcd_store import ALIVE_PREFIX
from pxfs.cluster.gc import Collector
from pxfs.cluster.guard import StoreGuard
from pxfs.cluster.manager import Manager, Settings
from pxfs.cluster.peers import Peers, store_resolver
from pxfs.cluster.store import ControlStore
from pxfs.cluster.wakeup import Wakeups
from pxfs.durable import replace_file
from pxfs.errors import NoSpace, PxfsError, Unavailable
from pxfs.loopwatch import LoopWatch
from pxfs.model import NodeInfo, PoolInfo
from pxfs.observe import metrics, web
from pxfs.observe.activity import Activity, Totals
from pxfs.observe.page import page
from pxfs.rpc import pki
from pxfs.rpc.bridge import open_bridge
from pxfs.rpc.client import split_address
from pxfs.rpc.server import RpcServer, Services
from pxfs.volume.host import VolumeHost

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
REVOCATION_INTERVAL = 2.0  # "within seconds" of `pxfs credential revoke`


@dataclass
class PoolSpec:
    path: Path
    capacity: int
    klass: str = "medium"


@dataclass
class NodeConfig:
    cluster_dir: Path
    listen: str
    pools: list[PoolSpec]
    labels: dict[str, str] = field(default_factory=dict)
    node_id: str = ""
    state_dir: Path | None = None
    seed: bool | None = None  # None: seed when listening on the cluster's seed address
    credential: Path | None = None  # None: STATE/credential, issued at first start where the CA key is
    http: str | None = None  # HOST:PORT for /metrics and the page; None: the listen host, any port; "": none


class ChunkService:
    """The node's pools as the ChunkStore RPC sees them: LocalChunkStore plus per-pool stats and GC."""

    def __init__(self, node_id: str, store: LocalChunkStore) -> None:
        self.node_id, self.store = node_id, store
        self.collector: Collector | None = None
        self.totals = Totals()  # what the cluster page's rates are computed from

    async def collect(self, dry_run: bool, grace: float) -> dict[str, Any]:
        if self.collector is None:
            raise Unavailable(f"node {self.node_id}", "garbage collection is not running yet")
        return await self.collector.collect(dry_run, grace)

    async def put(self, h: bytes, data: bytes) -> bool:
        try:
            with metrics.CHUNK_PUT_SECONDS.time():
                stored = await self.store.put(h, data)
        except NoSpace:
            if self.collector is not None:
                self.collector.wake("a pool is full")
            raise
        metrics.CHUNK_PUT_BYTES.inc(len(data))
        self.totals.put_bytes += len(data)
        if stored and self.collector is not None:
            self.collector.added(len(data), self._capacity())
        return stored

    def _capacity(self) -> int:
        return sum(p.capacity for p in self.store.pools)

    async def get(self, h: bytes) -> bytes:
        with metrics.CHUNK_GET_SECONDS.time():
            data = await self.store.get(h)
        metrics.CHUNK_GET_BYTES.inc(len(data))
        self.totals.get_bytes += len(data)
        return data

    async def has_many(self, hashes: list[bytes]) -> list[bool]:
        return await self.store.has_many(hashes)

    async def verify(self, hashes: list[bytes]) -> list[int]:
        found = await self.store.verify(hashes)
        bad = sum(1 for s in found if s)
        metrics.VERIFY_FAILURES.inc(bad)
        self.totals.verified += len(found)
        self.totals.bad += bad
        self.totals.last_verify = time.time()
        return found

    async def list_hashes(self, after: bytes, limit: int) -> list[bytes]:
        return await self.store.list_hashes(after, limit)

    async def stats(self) -> list[PoolInfo]:
        return [PoolInfo(node=self.node_id, path=str(p.path), klass=p.klass, capacity=p.capacity, used=p.used,
                         free=p.free, chunks=p.chunk_count) for p in self.store.pools]


def _node_id(state: Path, wanted: str) -> str:
    path = state / "node-id"
    if path.exists():
        existing = path.read_text().strip()
        if wanted and wanted != existing:
            raise PxfsError(f"node state {str(state)!r}", f"belongs to node {existing!r}, not {wanted!r}")
        return existing
    import secrets

    node_id = wanted or f"n-{secrets.token_hex(3)}"
    replace_file(path, (node_id + "\n").encode())  # the node's identity: a crash must not lose it
    return node_id


def _own_credential(cluster_dir: Path, state: Path, node_id: str) -> pki.Credential:
    """STATE/credential; issued for ``node_id`` at first start when the cluster directory holds the CA key."""
    path = state / "credential"
    if not (path / "cert.pem").exists():
        if not (cluster_dir / "ca.key").exists():
            raise PxfsError(f"node {node_id}", "has no credential and the cluster directory holds no CA key: run "
                            f"`pxfs credential issue --role node --name {node_id} --out DIR` where the cluster was "
                            "initialised, copy DIR here and pass --credential DIR")
        pki.issue(cluster_dir, path, node_id, "node")
        log.info("node=%s credential issued into %s", node_id, path)
    return pki.load(path)


def private_dir(path: Path, what: str) -> None:
    """Chunks, metadata and keys under ``path`` are for this node's user only: 0700, fixed when not."""
    path.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, 0o700)
        log.warning("%s %s was mode %o: set to 0700 (its data is readable by this node's user only)", what, path, mode)


def raise_fd_limit() -> None:
    """Raise the soft fd limit to the hard one: connections must not starve pools and RocksDB of fds
    (the accept gate keeps connections well below it, pxfs.rpc.tls.TOTAL)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, want, exc)


async def watch_revocations(store: ControlStore, server: RpcServer) -> None:
    """Every node refuses a revoked credential within one round (and closes its open connections)."""
    while True:
        try:
            await server.revoke(set(records.revoked(await store.range(records.REVOKED_PREFIX))))
        except PxfsError as err:
            log.debug("revocations not refreshed: %s", err)
        await trio.sleep(REVOCATION_INTERVAL)


Gauge = tuple[str, str, list[str], list[tuple[list[str], float]]]


def node_gauges(node_id: str, chunks: ChunkService, volumes: VolumeHost) -> list[Gauge]:
    """Scrape-time gauges: this node's pools, and the volumes it coordinates."""
    pools = chunks.store.pools
    out: list[Gauge] = [
        ("pxfs_pool_capacity_bytes", "Pool capacity", ["node", "pool"], [([node_id, str(p.path)], p.capacity)
                                                                          for p in pools]),
        ("pxfs_pool_used_bytes", "Bytes of chunks stored in the pool", ["node", "pool"],
         [([node_id, str(p.path)], p.used) for p in pools]),
        ("pxfs_pool_chunks", "Chunks stored in the pool", ["node", "pool"],
         [([node_id, str(p.path)], p.chunk_count) for p in pools]),
    ]
    size, used, state, in_sync, missing, lag = [], [], [], [], [], []
    for name, hv in volumes.coordinated():
        spec = hv.spec
        assert spec is not None and hv.meta is not None
        st = hv.meta.statfs()
        size.append(([name], spec.size))
        used.append(([name], st["used"]))
        members = hv.insync.members if hv.insync is not None else set(spec.replicas)
        now = "healthy" if set(spec.replicas) <= members else "degraded"
        state += [([name, s], 1.0 if s == now else 0.0) for s in metrics.VOLUME_STATES]
        in_sync.append(([name], len(members & set(spec.replicas))))
        missing.append(([name], max(0, spec.repl - len(members & set(spec.replicas)))))
        if hv.replicator is not None:
            for f, acked in hv.replicator.acked.items():
                lag.append(([name, f], max(0, hv.kv.seq - (acked or 0))))
    out += [("pxfs_volume_size_bytes", "Volume size", ["volume"], size),
            ("pxfs_volume_used_bytes", "Bytes of file data in the volume", ["volume"], used),
            ("pxfs_volume_state", "Volume state, one-hot", ["volume", "state"], state),
            ("pxfs_volume_replicas_in_sync", "Replicas holding every acknowledged write", ["volume"], in_sync),
            ("pxfs_volume_replicas_missing", "Replicas short of the replication factor in sync", ["volume"],
             missing),
            ("pxfs_volume_follower_lag_batches", "Metadata batches a follower lacks", ["volume", "node"], lag)]
    return out


def node_pages(admin: ClusterAdmin, activity: Activity) -> web.Pages:
    """The node's HTTP pages beside /metrics."""
    async def cluster_page() -> str:
        doc = await status.of_admin(admin)
        return page(doc, await activity.gather(doc["nodes"]))

    async def local() -> dict[str, Any]:
        return activity.local()

    return {"/api/status": web.json_page(lambda: status.of_admin(admin)), "/api/activity": web.json_page(local),
            "/": web.html_page(cluster_page)}


async def run_node(cfg: NodeConfig, ready: trio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT. Raises PxfsError on a configuration problem at start."""
    cluster = load_config(cfg.cluster_dir)
    check_commit_window(cluster.commit_window, "commit_window in cluster.json")
    # The automatic rounds use it.
    check_gc_grace(cluster.gc_grace, "gc_grace in cluster.json", cluster.commit_window)
    split_address(cfg.listen)
    state = cfg.state_dir or (cfg.pools[0].path / "node-state")
    state.mkdir(parents=True, exist_ok=True)
    given = pki.load(cfg.credential) if cfg.credential is not None else None
    node_id = _node_id(state, cfg.node_id or (given.identity.name if given is not None else ""))
    credential = given or _own_credential(cfg.cluster_dir, state, node_id)
    if credential.identity.role != "node" or credential.identity.name != node_id:
        raise PxfsError(f"node {node_id}", f"credential {str(credential.path)!r} is that of {credential.identity}, "
                        f"not of node {node_id!r}")
    for path, what in [(state, "state directory"), *((p.path, "pool") for p in cfg.pools)]:
        private_dir(path, what)
    raise_fd_limit()
    trio.lowlevel.add_instrument(LoopWatch(f"node={node_id}"))

    pools = [Pool(p.path, p.capacity, klass=p.klass) for p in cfg.pools]
    chunks = LocalChunkStore(pools)
    await chunks.open()
    chunk_service = ChunkService(node_id, chunks)

    async with open_bridge() as bridge:
        # The backend cluster.json names: which store, and whether this node serves it (embedded
        # seed) and may run the manager (the seed; with etcd, whoever holds the election).
        opened = open_node_store(NodeContext(cluster, cfg.cluster_dir, state, node_id, cfg.listen, bridge, credential,
                                             cfg.seed))
        store, is_seed = opened.store, opened.seed
        peers = Peers(bridge, credential, node_id, store_resolver(store))
        admin = ClusterAdmin(store, cluster, peers=peers)
        volumes = VolumeHost(node_id, state, store, peers, repair_rate=cluster.repair_rate,
                             commit_window=cluster.commit_window)
        guard = StoreGuard(node_id, cluster.id, state, store, is_seed, volumes.holds_data)
        volumes.guard = guard
        chunk_service.collector = Collector(node_id, store, peers, chunks, held=volumes.held, guard=guard,
                                            window=cluster.commit_window)
        services = Services(admin=admin, chunks=chunk_service, control=opened.served, volumes=volumes)
        server = RpcServer(bridge, services, credential, cluster.id, node_id)
        host, port = split_address(cfg.listen)
        try:
            await server.listen(host, port)
        except OSError as exc:
            raise PxfsError(f"node {node_id}", f"cannot listen on {cfg.listen}: {exc.strerror or exc}") from None
        log.info("node=%s listening=%s store=%s seed=%s pools=%d", node_id, cfg.listen, cluster.store, is_seed,
                 len(pools))

        http_address = ""

        async def heartbeat_loop() -> None:
            warned = False
            while True:
                info = NodeInfo(id=node_id, address=cfg.listen, labels=cfg.labels, pools=await chunk_service.stats(),
                                seed=is_seed, http=http_address)
                try:
                    await store.heartbeat(info)
                    if warned:
                        log.info("node=%s control store reachable again", node_id)
                    warned = False
                except PxfsError as err:
                    if not warned:
                        log.warning("node=%s heartbeat failed: %s", node_id, err)
                    warned = True
                await trio.sleep(HEARTBEAT_INTERVAL)

        wakeups = Wakeups()
        if opened.watch is not None:
            # Supervision acts on its volume records (a new coordinator starts serving at once); the
            # manager on liveness and the records (a round as soon as a lease expires).
            volumes.wakeup = wakeups.subscribe(records.VOLUME_PREFIX, records.TOMBSTONE_PREFIX)
        events_from = logging.getLogger("pxfs")  # the cluster page's events: this node's records
        activity: Activity | None = None
        try:
            async with trio.open_nursery() as nursery:
                if cfg.http != "":
                    web_host, web_port = split_address(cfg.http) if cfg.http else (host, 0)
                    activity = Activity(node_id, chunk_service.totals)
                    events_from.addHandler(activity.log)
                    nursery.start_soon(activity.rates.run)
                    http_address = await nursery.start(web.serve, web_host, web_port, node_pages(admin, activity))
                    metrics.register(lambda: node_gauges(node_id, chunk_service, volumes))
                    log.info("node=%s http=%s (/metrics, /api/status, /api/activity, /)", node_id, http_address)
                nursery.start_soon(heartbeat_loop)
                nursery.start_soon(watch_revocations, store, server)
                if opened.watch is not None:
                    nursery.start_soon(opened.watch, "", wakeups.changed)
                await nursery.start(volumes.run)
                nursery.start_soon(chunk_service.collector.run, cluster.gc_interval, cluster.gc_grace)
                if opened.election is not None:
                    manager = Manager(store, admin, peers, Settings(failover_after=cluster.failover_after,
                                                                   replace_after=cluster.replace_after))
                    manager.guard, manager.election = guard, opened.election
                    if opened.watch is not None:
                        manager.wakeup = wakeups.subscribe(ALIVE_PREFIX, records.VOLUME_PREFIX, "removed/")
                    nursery.start_soon(manager.run)
                if ready is not None:
                    ready.set()
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("node=%s stopping on signal %s", node_id, signal.Signals(signum).name)
                        break
                nursery.cancel_scope.cancel()
        finally:
            if activity is not None:
                events_from.removeHandler(activity.log)
            with trio.CancelScope(shield=True):
                await server.close()
                await peers.close()
                volumes.close()
                with trio.move_on_after(5):  # an etcd that does not answer must not hold up the stop
                    await opened.close()
