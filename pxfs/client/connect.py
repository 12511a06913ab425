"""Reaching a cluster: read the cluster directory, log in to the first node that answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from pxfs.cluster.backends import node_addresses
from pxfs.cluster.config import ClusterConfig, load_config, load_credential
from pxfs.errors import PxfsError, Unauthorized, Unavailable
from pxfs.rpc.bridge import Bridge, open_bridge
from pxfs.rpc.client import AdminClient, Connection


@dataclass
class ClusterClient:
    """One logged-in connection to some node of a cluster, with what its callers need next to it."""

    cluster_dir: Path
    config: ClusterConfig
    bridge: Bridge
    conn: Connection
    admin: AdminClient


async def connect_any(bridge: Bridge, cluster_dir: Path, peer: str = "cli", timeout: float = 3) -> Connection:
    """Log in to the first node that answers: the addresses in cluster.json, then (etcd) the ones the
    store knows. A refused credential is final; an unreachable node is skipped."""
    cfg = load_config(cluster_dir)
    credential = load_credential(cluster_dir)
    errors: list[str] = []
    tried: set[str] = set()

    async def first(addresses: list[str]) -> Connection | None:
        for address in addresses:
            if address in tried:
                continue
            tried.add(address)
            try:
                return await Connection.open(bridge, address, credential, peer=peer, timeout=timeout)
            except Unauthorized:
                raise
            except PxfsError as err:
                errors.append(str(err))
        return None

    conn = await first(cfg.addresses())
    if conn is None:
        # With etcd the store itself knows where the nodes are (a host without a node may have
        # a cluster.json that lists none of them).
        conn = await first(await node_addresses(cfg, cluster_dir))
    if conn is None:
        raise Unavailable(f'cluster "{cfg.name}"', "no node answers (" + "; ".join(errors) + ")")
    return conn


@asynccontextmanager
async def open_cluster(cluster_dir: Path, bridge: Bridge | None = None, peer: str = "cli"
                       ) -> AsyncIterator[ClusterClient]:
    """A ``ClusterClient`` on ``bridge`` (a bridge of its own when None), closed on exit."""
    if bridge is None:
        async with open_bridge() as own, open_cluster(cluster_dir, own, peer) as client:
            yield client
        return
    conn = await connect_any(bridge, cluster_dir, peer)
    try:
        yield ClusterClient(cluster_dir, load_config(cluster_dir), bridge, conn, await conn.admin())
    finally:
        await conn.close()


@asynccontextmanager
async def cluster_admin(cluster_dir: Path) -> AsyncIterator[tuple[AdminClient, Connection, Bridge, ClusterConfig]]:
    async with open_cluster(cluster_dir) as c:
        yield c.admin, c.conn, c.bridge, c.config
