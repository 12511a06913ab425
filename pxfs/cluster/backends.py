"""Control-store backends, registered by name; cluster.json's ``store`` chooses one.

  ``embedded``                          RocksDB in the seed node (``EmbeddedStore``); the other nodes
                                        reach it over the ControlStore RPC (``RemoteStore``); the seed
                                        names an empty store and runs the manager
  ``etcd://H1:2379,H2:2379[/PREFIX]``   an etcd cluster every node talks to directly (``EtcdStore``):
                                        liveness by leases, the manager on whichever node holds the
                                        election; no node has a special role

A backend opens the store as a node uses it (``open_node_store``) and, when it can be read without a
node, as a client does (``direct_store``: where the nodes are, the store's own health).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from pxfs.cluster import records
from pxfs.cluster.config import ClusterConfig
from pxfs.cluster.etcd_store import EtcdElection, EtcdStore, settings_from
from pxfs.cluster.remote_store import RemoteStore
from pxfs.cluster.store import ControlStore, Election, EmbeddedStore, LeadAlways
from pxfs.errors import Exists, Invalid, PxfsError
from pxfs.rpc.bridge import Bridge
from pxfs.rpc.pki import Credential

MANAGER_ELECTION = "manager"


@dataclass
class NodeContext:
    """What a backend needs to open the store inside one node."""

    cluster: ClusterConfig
    cluster_dir: Path
    state: Path
    node_id: str
    listen: str
    bridge: Bridge
    credential: Credential
    seed_flag: bool | None = None  # `pxfs node start --seed`; None: decided by the backend


@dataclass
class NodeStore:
    """The store as one node holds it, and the roles the backend gives that node."""

    store: ControlStore
    served: EmbeddedStore | None = None   # served to the other nodes over the ControlStore RPC
    seed: bool = False                    # holds the embedded store: names an empty one, kept out of placement
    election: Election | None = None      # the manager runs here while it leads; None: never here
    # Calls back with the keys that change under a prefix (etcd's watch); None: rounds only poll.
    watch: Callable[[str, Callable[[list[str]], None]], Awaitable[None]] | None = None
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        for close in self.closers:
            await close()


@dataclass(frozen=True)
class Backend:
    open_node: Callable[[NodeContext], NodeStore]
    # A store a client (CLI, mount) reads itself, or None when only the nodes reach it.
    direct: Callable[[ClusterConfig, Path], EtcdStore | None]


_BACKENDS: dict[str, Backend] = {}


def register(kind: str, backend: Backend) -> None:
    _BACKENDS[kind] = backend


def kind_of(store: str) -> str:
    """The backend name of a ``store`` setting: ``embedded`` or ``etcd``; Invalid naming it otherwise."""
    kind = store.partition("://")[0] if "://" in store else store
    if kind not in _BACKENDS:
        raise Invalid(f"control store {store!r}", "unknown backend (embedded or etcd://HOST:PORT[,HOST:PORT...])")
    return kind


def open_node_store(ctx: NodeContext) -> NodeStore:
    return _BACKENDS[kind_of(ctx.cluster.store)].open_node(ctx)


def direct_store(cfg: ClusterConfig, cluster_dir: Path) -> EtcdStore | None:
    """The control store as a client may read it without a node (etcd), or None (embedded)."""
    return _BACKENDS[kind_of(cfg.store)].direct(cfg, cluster_dir)


def check_store(cfg: ClusterConfig, cluster_dir: Path) -> None:
    """Refuse a cluster.json whose store setting cannot be opened (before any process starts)."""
    kind = kind_of(cfg.store)
    if kind == "etcd":
        settings_from(cfg.store, cfg.etcd, cluster_dir)


async def name_store(store: ControlStore, cluster_id: str, what: str) -> bool:
    """Write a new cluster's identity into an empty store (``pxfs cluster init`` / ``pxfs up`` with
    etcd, where no node is the seed that would do it): True when written, False when it was already
    this cluster's; Exists naming the store when it belongs to another cluster."""
    if await store.cas(records.IDENTITY_KEY, None, records.encode_identity(cluster_id, 1)):
        return True
    raw = await store.get(records.IDENTITY_KEY)
    try:
        cid, _gen = records.decode_identity(raw) if raw is not None else (cluster_id, 0)
    except PxfsError as err:
        raise Exists(what, f"holds an unreadable cluster identity ({err.cause})") from None
    if cid != cluster_id:
        raise Exists(what, f"already holds cluster {cid}: use an empty etcd or another prefix (etcd://HOST:PORT/NAME)")
    return False


async def node_addresses(cfg: ClusterConfig, cluster_dir: Path) -> list[str]:
    """The node addresses a direct store knows, live ones first; [] when there is none to ask or it
    does not answer (the caller then has only what cluster.json lists)."""
    store = direct_store(cfg, cluster_dir)
    if store is None:
        return []
    try:
        nodes = await store.liveness()
    except PxfsError:
        return []
    finally:
        await store.aclose()
    return [n.address for n in sorted(nodes, key=lambda n: (n.state != "up", n.id))]


# -- embedded -----------------------------------------------------------------------------------


def _open_embedded(ctx: NodeContext) -> NodeStore:
    seed = ctx.seed_flag if ctx.seed_flag is not None else ctx.listen == ctx.cluster.seed
    if seed:
        embedded = EmbeddedStore(str(ctx.state / "control"))

        async def close_embedded() -> None:
            embedded.close()

        return NodeStore(embedded, served=embedded, seed=True, election=LeadAlways(), closers=[close_embedded])
    remote = RemoteStore(ctx.bridge, ctx.cluster.seed, ctx.credential, ctx.node_id)
    return NodeStore(remote, closers=[remote.close])


register("embedded", Backend(open_node=_open_embedded, direct=lambda _cfg, _dir: None))


# -- etcd ---------------------------------------------------------------------------------------


def _etcd(cfg: ClusterConfig, cluster_dir: Path) -> EtcdStore:
    return EtcdStore(settings_from(cfg.store, cfg.etcd, cluster_dir))


def _open_etcd(ctx: NodeContext) -> NodeStore:
    if ctx.seed_flag:
        raise Invalid(f"node {ctx.node_id} --seed", f"the control store is {ctx.cluster.store}: no node holds it")
    store = _etcd(ctx.cluster, ctx.cluster_dir)
    # revoke first: a node that stops cleanly is down at once, and its election free for the next.
    return NodeStore(store, election=EtcdElection(store, MANAGER_ELECTION, ctx.node_id), watch=store.watch,
                     closers=[store.revoke, store.aclose])


register("etcd", Backend(open_node=_open_etcd, direct=_etcd))
