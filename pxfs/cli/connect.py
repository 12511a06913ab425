"""Reaching a cluster from the CLI: read the cluster directory, log in to the first node that answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

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
        for address in cfg.addresses():
            try:
                conn = await Connection.open(bridge, address, credential, peer="cli", timeout=3)
                break
            except Unauthorized:
                raise
            except PxfsError as err:
                errors.append(str(err))
        if conn is None:
            raise Unavailable(f'cluster "{cfg.name}"', "no node answers (" + "; ".join(errors) + ")")
        try:
            yield await conn.admin(), conn, bridge, cfg
        finally:
            await conn.close()
