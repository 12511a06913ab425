"""Tool sessions: a session at a volume's coordinator that does not count as a mount (snapshots,
restore, fsck, scrub)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pxfs.cluster.config import load_credential
from pxfs.cluster.volume_session import VolumeSession
from pxfs.rpc.volume_client import VolumeClient


@asynccontextmanager
async def tool_session(cluster: Path, bridge: Any, volume: str, read_only: bool = False,
                       kind: str = "cli") -> AsyncIterator[VolumeSession]:
    """A connected session at the volume's coordinator, named ``tool:KIND-...`` (not a mount), for
    tools that also need the replicas (``held_by_replicas``)."""
    session = VolumeSession(bridge, cluster, load_credential(cluster), volume,
                            f"tool:{kind}-{os.getpid()}-{uuid.uuid4().hex[:6]}", read_only)
    try:
        await session.connect()
        assert session.meta is not None
        yield session
    finally:
        await session.close()


@asynccontextmanager
async def volume_tool(cluster: Path, bridge: Any, volume: str, read_only: bool = False) -> AsyncIterator[VolumeClient]:
    """A session at the volume's coordinator that does not count as a mount."""
    async with tool_session(cluster, bridge, volume, read_only) as session:
        assert session.meta is not None
        yield session.meta
