"""Reaching a cluster: read the cluster directory, log in to the first node that answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from pxfs.cluster.backends import node_addresses
from pxfs.cluster.config import ClusterConfig, load_config, load_credential
from pxfs.errors import PxfsError, Unauthorized, Unavailable
from pxfs.rpc.bridge import Bridge, open_bridge
from pxfs.rpc.client import AdminClient, Connection


@asynccontextmanager
async def cluster_admin(cluster_dir: Path) -> AsyncIterator[tuple[AdminClient, Connection, Bridge, ClusterConfig]]:
    cfg = load_config(cluster_dir)
    credential = load_credential(cluster_dir)
    async with open_bridge() as bridge:
        errors: list[str] = []
        conn: Connection | None = None
        tried: set[str] = set()

        async def first(addresses: list[str]) -> Connection | None:
            for address in addresses:
                if address in tried:
                    continue
                tried.add(address)
                try:
                    return await Connection.open(bridge, address, credential, peer="cli", timeout=3)
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
        try:
            yield await conn.admin(), conn, bridge, cfg
        finally:
            await conn.close()
