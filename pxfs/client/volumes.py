"""Volume and snapshot operations as a driver needs them: create idempotent by name, delete that
may find nothing to delete, resize, clone; snapshots created, listed and deleted."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pxfs.client.connect import ClusterClient
from pxfs.client.tools import volume_tool
from pxfs.errors import Exists, Invalid, NotFound
from pxfs.model import VolumeInfo


@dataclass
class VolumeSpec:
    """What a caller asks for; ``block_size`` 0 is the cluster's default."""

    name: str
    size: int
    repl: int = 1
    block_size: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    min_replicas: int = 1
    max_inodes: int = 0  # 0: the cluster's default (one inode per 4 KiB of size)


@dataclass
class SnapshotInfo:
    volume: str
    name: str
    created_ns: int
    logical: int | None = None  # bytes the snapshot's files hold (from the coordinator's usage report)
    unique: int | None = None  # bytes only this snapshot still references

    @property
    def ref(self) -> str:
        return f"{self.volume}@{self.name}"


def split_ref(ref: str) -> tuple[str, str]:
    volume, sep, snap = ref.partition("@")
    if not sep or not volume or not snap:
        raise Invalid(f"snapshot {ref!r}", "expected VOLUME@SNAPSHOT")
    return volume, snap


async def find_volume(c: ClusterClient, name: str) -> VolumeInfo | None:
    try:
        return await c.admin.get_volume(name)
    except NotFound:
        return None


async def create_volume(c: ClusterClient, spec: VolumeSpec) -> VolumeInfo:
    return await c.admin.create_volume(spec.name, spec.size, spec.repl, spec.block_size, spec.labels,
                                       spec.min_replicas, spec.max_inodes)


def _differences(v: VolumeInfo, spec: VolumeSpec, source: str, size_ok: Callable[[int], bool]) -> list[str]:
    out = []
    if not size_ok(v.size):
        out.append(f"size {v.size}")
    if v.repl != spec.repl:
        out.append(f"repl {v.repl}")
    if spec.block_size and v.block_size != spec.block_size:
        out.append(f"block size {v.block_size}")
    if any(v.labels.get(k) != val for k, val in spec.labels.items()):
        out.append("labels " + ",".join(f"{k}={val}" for k, val in sorted(v.labels.items())))
    if v.source != source:
        out.append(f"source {v.source or 'none'}")
    return out


async def ensure_volume(c: ClusterClient, spec: VolumeSpec, source: str = "",
                        size_ok: Callable[[int], bool] | None = None) -> tuple[VolumeInfo, bool]:
    """The volume named ``spec.name``, made now (True) or found with the same parameters (False);
    ``source`` (``VOLUME@SNAPSHOT``) makes it a clone of that snapshot, grown to ``spec.size`` when
    that is larger. A volume of that name with other parameters is ``Exists``, naming them."""
    fits = size_ok or (lambda size: size == spec.size)
    for _ in range(2):
        found = await find_volume(c, spec.name)
        if found is not None:
            diff = _differences(found, spec, source, fits)
            if diff:
                raise Exists(f'volume "{spec.name}"', "exists with other parameters: " + ", ".join(diff))
            return found, False
        try:
            if not source:
                return await create_volume(c, spec), True
            vol = await clone_volume(c, source, spec.name)
        except Exists:
            continue  # made concurrently: compare with what the other caller made
        if vol.size < spec.size:
            vol = await c.admin.resize_volume(spec.name, spec.size)
        return vol, True
    raise Exists(f'volume "{spec.name}"', "created and deleted concurrently; retry")


async def delete_volume(c: ClusterClient, name: str, force: bool = False, missing_ok: bool = False) -> bool:
    """Delete ``name``; False when it did not exist and ``missing_ok`` says that is fine."""
    try:
        await c.admin.delete_volume(name, force)
    except NotFound:
        if not missing_ok:
            raise
        return False
    return True


async def resize_volume(c: ClusterClient, name: str, size: int, max_inodes: int = 0) -> VolumeInfo:
    """``size`` 0 keeps the size, ``max_inodes`` 0 the inode limit."""
    return await c.admin.resize_volume(name, size, max_inodes)


async def clone_volume(c: ClusterClient, ref: str, name: str) -> VolumeInfo:
    """A writable volume ``name`` from snapshot ``ref`` (``VOLUME@SNAPSHOT``)."""
    volume, snap = split_ref(ref)
    async with volume_tool(c.cluster_dir, c.bridge, volume, read_only=True) as vol:
        if snap not in {n for n, _c in await vol.snapshot_list()}:
            raise NotFound(f'snapshot "{ref}"', "no such snapshot")
    return await c.admin.clone_volume(ref, name)


async def list_snapshots(c: ClusterClient, volume: str = "") -> list[SnapshotInfo]:
    """Snapshots of ``volume`` (every volume when empty), oldest first per volume."""
    vols = [await c.admin.get_volume(volume)] if volume else await c.admin.list_volumes()
    out: list[SnapshotInfo] = []
    for v in vols:
        sizes = {s["name"]: s for s in v.detail.get("snapshots", [])} if v.detail else {}
        async with volume_tool(c.cluster_dir, c.bridge, v.name, read_only=True) as tool:
            for name, created in await tool.snapshot_list():
                s = sizes.get(name, {})
                out.append(SnapshotInfo(v.name, name, created, s.get("logical"), s.get("unique")))
    return out


async def create_snapshot(c: ClusterClient, volume: str, name: str = "", exist_ok: bool = False) -> SnapshotInfo:
    """Snapshot ``volume`` as ``name`` (a time-stamped name when empty); with ``exist_ok`` an
    existing snapshot of that name is returned as it is."""
    name = name or "snap-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    async with volume_tool(c.cluster_dir, c.bridge, volume) as tool:
        try:
            await tool.snapshot_create(name)
        except Exists:
            if not exist_ok:
                raise
        for n, created in await tool.snapshot_list():
            if n == name:
                return SnapshotInfo(volume, name, created)
    raise NotFound(f'snapshot "{volume}@{name}"', "deleted right after it was made")


async def delete_snapshot(c: ClusterClient, volume: str, name: str, missing_ok: bool = False) -> bool:
    try:
        async with volume_tool(c.cluster_dir, c.bridge, volume) as tool:
            await tool.snapshot_delete(name)
    except NotFound:
        if not missing_ok:
            raise
        return False
    return True


async def restore_volume(c: ClusterClient, ref: str, force: bool = False) -> None:
    """Roll ``VOLUME`` back to ``VOLUME@SNAPSHOT``; refused while mounted unless ``force``."""
    volume, snap = split_ref(ref)
    v = await c.admin.get_volume(volume)
    if v.mounts and not force:
        raise Invalid(f'volume "{volume}"', f"mounted {v.mounts} time(s): unmount it first or use --force "
                      "(open files would see their data change under them)")
    async with volume_tool(c.cluster_dir, c.bridge, volume) as tool:
        await tool.restore(snap)
