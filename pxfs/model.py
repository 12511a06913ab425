"""Plain records that cross layers: what the cluster map and the volume metadata talk about.

They are wire-independent: pxfs.rpc converts them to and from Cap'n Proto structs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Inodes a volume gets without --max-inodes: one per 4 KiB of its size, mke2fs's ratio for small
# filesystems. An inode and its names cost some 100-300 bytes on each replica's state disk, so the
# metadata of a volume stays a few percent of its size however small its files are.
BYTES_PER_INODE = 4096


@dataclass
class PoolInfo:
    node: str
    path: str
    klass: str
    capacity: int
    used: int
    free: int
    chunks: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "path": self.path, "class": self.klass, "capacity": self.capacity,
                "used": self.used, "free": self.free, "chunks": self.chunks}


@dataclass
class NodeInfo:
    id: str
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    state: str = "down"
    pools: list[PoolInfo] = field(default_factory=list)
    last_seen_ms: int = 0
    seed: bool = False
    http: str = ""  # HOST:PORT of its /metrics, /api/status and cluster page ("" when it serves none)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "address": self.address, "labels": dict(self.labels), "state": self.state,
                "seed": self.seed, "last_seen_ms": self.last_seen_ms, "http": self.http,
                "pools": [p.to_json() for p in self.pools]}


@dataclass
class VolumeInfo:
    name: str
    size: int
    repl: int
    block_size: int
    labels: dict[str, str] = field(default_factory=dict)
    replicas: list[str] = field(default_factory=list)
    coordinator: str = ""
    epoch: int = 1
    created_ns: int = 0
    used: int = 0
    state: str = "healthy"
    mounts: int = 0
    detail: dict[str, Any] = field(default_factory=dict)  # from the coordinator: lagging, repair progress
    source: str = ""  # "VOLUME@SNAPSHOT" for a clone
    # Replicas known to hold every acknowledged batch and chunk: only they may be elected.
    in_sync: list[str] = field(default_factory=list)
    min_replicas: int = 1  # acknowledgements wait while fewer in-sync replicas remain
    uid: str = ""  # unique per volume ever created: a tombstone names it, never just the name
    clone_done: bool = False  # a clone's coordinator has copied its source snapshot in
    waiting: str = ""  # why no coordinator serves the volume (judged from liveness; not stored)
    max_inodes: int = 0  # set by --max-inodes; 0: one per BYTES_PER_INODE of the size (inode_limit)

    @property
    def inode_limit(self) -> int:
        """How many inodes the volume may hold: creates past it are ENOSPC."""
        return self.max_inodes or max(1, self.size // BYTES_PER_INODE)

    def to_json(self) -> dict[str, Any]:
        repair = self.detail.get("repair", {})
        return {"name": self.name, "size": self.size, "used": self.used, "repl": self.repl,
                "block_size": self.block_size, "labels": dict(self.labels), "state": self.state,
                "replicas": list(self.replicas), "coordinator": self.coordinator, "epoch": self.epoch,
                "mounts": self.detail.get("mounts", []), "missing_replicas": self.detail.get("missing_replicas", []),
                "lagging": self.detail.get("lagging", []), "repair": repair, "source": self.source,
                "space": self.detail.get("space", {}), "snapshots": self.detail.get("snapshots", []),
                "in_sync": list(self.in_sync), "min_replicas": self.min_replicas, "uid": self.uid,
                "waiting": self.waiting, "inodes": self.detail.get("inodes", 0), "max_inodes": self.inode_limit,
                "meta_bytes": self.detail.get("meta_bytes", 0), "replica_meta": self.detail.get("replica_meta", {})}


@dataclass
class Changed:
    """What one metadata operation wrote: the kernel caches of the other mounts must forget these."""

    inodes: set[int] = field(default_factory=set)
    entries: set[tuple[int, bytes]] = field(default_factory=set)


@dataclass
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
