"""The CSI Controller service: volumes and snapshots through ``pxfs.client`` (runs on trio).

Ids: a volume's id is its pxfs name; a snapshot's is ``VOLUME@SNAPSHOT``. CSI names that are not
pxfs names map to a stable digest (``params.pxfs_name``). A clone of a volume is made through a
snapshot of it named ``csi-clone-<new volume>``, deleted with the clone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import Int64Value

from pxfs.client import volumes
from pxfs.client.connect import ClusterClient, open_cluster
from pxfs.cluster.admin import MIN_SIZE
from pxfs.csi import csi_pb2 as pb
from pxfs.csi import params
from pxfs.csi.errors import CsiError, invalid, require
from pxfs.errors import Exists, Invalid, NotFound, PxfsError
from pxfs.model import VolumeInfo
from pxfs.paths import is_name
from pxfs.rpc.bridge import Bridge

log = logging.getLogger(__name__)

CLONE_PREFIX = "csi-clone-"
Rpc = pb.ControllerServiceCapability.RPC
CAPABILITIES = [Rpc.CREATE_DELETE_VOLUME, Rpc.LIST_VOLUMES, Rpc.GET_CAPACITY, Rpc.CREATE_DELETE_SNAPSHOT,
                Rpc.LIST_SNAPSHOTS, Rpc.CLONE_VOLUME, Rpc.EXPAND_VOLUME]


def _volume(v: VolumeInfo, source: Any = None) -> Any:
    out = pb.Volume(capacity_bytes=v.size, volume_id=v.name,
                    volume_context={"repl": str(v.repl), "blockSize": str(v.block_size)})
    if source is not None:
        out.content_source.CopyFrom(source)
    return out


def _snapshot(s: volumes.SnapshotInfo, size: int) -> Any:
    ts = Timestamp()
    ts.FromNanoseconds(s.created_ns)
    return pb.Snapshot(size_bytes=size, snapshot_id=s.ref, source_volume_id=s.volume, creation_time=ts,
                       ready_to_use=True)


def _page(items: list[Any], key: Any, max_entries: int, token: str) -> tuple[list[Any], str]:
    """One page of ``items`` (sorted by ``key``) from ``token`` (the key of its first item) on."""
    if max_entries < 0:
        raise invalid(f"max_entries {max_entries}: negative")
    if token:
        keys = [key(i) for i in items]
        if token not in keys and not any(k > token for k in keys):
            raise CsiError(grpc.StatusCode.ABORTED, f"starting_token {token!r}: no such entry (not from this "
                           "listing)")
        items = [i for i in items if key(i) >= token]
    if max_entries and len(items) > max_entries:
        return items[:max_entries], key(items[max_entries])
    return items, ""


def _split_snapshot_id(snapshot_id: str) -> tuple[str, str] | None:
    volume, sep, snap = snapshot_id.partition("@")
    if not sep or not is_name(volume) or not is_name(snap):
        return None
    return volume, snap


class Controller:
    def __init__(self, cluster_dir: Path, bridge: Bridge) -> None:
        self.cluster_dir, self.bridge = cluster_dir, bridge

    def _cluster(self) -> Any:
        return open_cluster(self.cluster_dir, self.bridge, peer="csi")

    async def probe(self) -> None:
        async with self._cluster() as c:
            await c.admin.cluster_info()

    # -- volumes ------------------------------------------------------------------------------
    async def create_volume(self, req: Any) -> Any:
        require(req.name, "name")
        params.check_capabilities(req.volume_capabilities)
        size, required, limit = params.capacity(req.capacity_range)
        repl, block, labels, min_replicas = params.volume_parameters(dict(req.parameters))
        name = params.pxfs_name(req.name)
        spec = volumes.VolumeSpec(name, size, repl, block, labels, min_replicas)
        kind = req.volume_content_source.WhichOneof("type") if req.HasField("volume_content_source") else None
        async with self._cluster() as c:
            source = ""
            if kind == "snapshot":
                snapshot_id = req.volume_content_source.snapshot.snapshot_id
                ref = _split_snapshot_id(snapshot_id)
                if ref is None:
                    raise CsiError(grpc.StatusCode.NOT_FOUND, f"snapshot {snapshot_id!r}: no such snapshot")
                source = snapshot_id
            elif kind == "volume":
                src = req.volume_content_source.volume.volume_id
                if not is_name(src) or await volumes.find_volume(c, src) is None:
                    raise CsiError(grpc.StatusCode.NOT_FOUND, f'volume "{src}": no such volume to clone')
                source = f"{src}@{CLONE_PREFIX}{name}"
                if await volumes.find_volume(c, name) is None:
                    await volumes.create_snapshot(c, src, CLONE_PREFIX + name, exist_ok=True)
            try:
                v, made = await volumes.ensure_volume(c, spec, source,
                                                      size_ok=lambda s: params.fits(s, required, limit))
            except NotFound as err:
                raise CsiError(grpc.StatusCode.NOT_FOUND, str(err)) from None
            except Invalid as err:
                if source and "size" in err.cause:
                    raise CsiError(grpc.StatusCode.OUT_OF_RANGE, str(err)) from None
                raise
            if source and v.size > size and limit and v.size > limit:
                raise CsiError(grpc.StatusCode.OUT_OF_RANGE, f'volume "{name}": its source is {v.size} bytes, '
                               f"more than limit_bytes {limit}")
        if made:
            log.info("volume=%s created for %s (%d bytes, repl %d%s)", name, req.name, v.size, v.repl,
                     f", from {source}" if source else "")
        return pb.CreateVolumeResponse(volume=_volume(v, req.volume_content_source if kind else None))

    async def delete_volume(self, req: Any) -> Any:
        require(req.volume_id, "volume_id")
        if not is_name(req.volume_id):
            return pb.DeleteVolumeResponse()  # no pxfs volume has that id: deleted already
        async with self._cluster() as c:
            v = await volumes.find_volume(c, req.volume_id)
            if v is None:
                return pb.DeleteVolumeResponse()
            if v.mounts:
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f'volume "{v.name}": mounted {v.mounts} time(s); unstage it first')
            await volumes.delete_volume(c, v.name, missing_ok=True)
            src, _, snap = v.source.partition("@")
            if snap == CLONE_PREFIX + v.name:
                try:
                    await volumes.delete_snapshot(c, src, snap, missing_ok=True)
                except PxfsError as err:  # the clone is gone; its source's snapshot is only space
                    log.info("volume=%s snapshot %s kept: %s", src, snap, err)
        log.info("volume=%s deleted", req.volume_id)
        return pb.DeleteVolumeResponse()

    async def expand_volume(self, req: Any) -> Any:
        require(req.volume_id, "volume_id")
        require(req.HasField("capacity_range"), "capacity_range")
        size, _required, limit = params.capacity(req.capacity_range)
        async with self._cluster() as c:
            v = await self._existing(c, req.volume_id)
            if v.size < size:
                try:
                    v = await volumes.resize_volume(c, v.name, size)
                except Invalid as err:
                    raise CsiError(grpc.StatusCode.OUT_OF_RANGE, str(err)) from None
            elif limit and v.size > limit:
                raise CsiError(grpc.StatusCode.OUT_OF_RANGE, f'volume "{v.name}": {v.size} bytes already, more '
                               f"than limit_bytes {limit} (pxfs does not shrink through CSI)")
        # statfs on every mount follows the volume's size at once: nothing to do on the nodes.
        return pb.ControllerExpandVolumeResponse(capacity_bytes=v.size, node_expansion_required=False)

    async def _existing(self, c: ClusterClient, volume_id: str) -> VolumeInfo:
        v = await volumes.find_volume(c, volume_id) if is_name(volume_id) else None
        if v is None:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f'volume "{volume_id}": no such volume')
        return v

    async def validate(self, req: Any) -> Any:
        require(req.volume_id, "volume_id")
        require(req.volume_capabilities, "volume_capabilities")
        async with self._cluster() as c:
            await self._existing(c, req.volume_id)
        if req.parameters:
            params.volume_parameters(dict(req.parameters))
        for cap in req.volume_capabilities:
            why = params.check_capability(cap)
            if why:
                return pb.ValidateVolumeCapabilitiesResponse(message=why)
        confirmed = pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=req.volume_context, volume_capabilities=req.volume_capabilities,
            parameters=req.parameters)
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    async def list_volumes(self, req: Any) -> Any:
        async with self._cluster() as c:
            vols = sorted(await c.admin.list_volumes(), key=lambda v: v.name)
        page, token = _page(vols, lambda v: v.name, req.max_entries, req.starting_token)
        return pb.ListVolumesResponse(entries=[pb.ListVolumesResponse.Entry(volume=_volume(v)) for v in page],
                                      next_token=token)

    async def get_capacity(self, req: Any) -> Any:
        if req.volume_capabilities:
            params.check_capabilities(req.volume_capabilities)
        repl = params.volume_parameters(dict(req.parameters))[0] if req.parameters else 1
        async with self._cluster() as c:
            nodes = await c.admin.list_nodes()
        free = sum(p.free for n in nodes if n.state == "up" for p in n.pools)
        # Each byte is stored repl times; volumes are thin, so this is what can still be written.
        return pb.GetCapacityResponse(available_capacity=free // max(1, repl),
                                      minimum_volume_size=Int64Value(value=MIN_SIZE))

    # -- snapshots ----------------------------------------------------------------------------
    async def create_snapshot(self, req: Any) -> Any:
        require(req.source_volume_id, "source_volume_id")
        require(req.name, "name")
        name = params.pxfs_name(req.name)
        async with self._cluster() as c:
            v = await self._existing(c, req.source_volume_id)
            for s in await volumes.list_snapshots(c):
                if s.name == name and s.volume != v.name:
                    raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                                   f'snapshot "{req.name}": exists, of volume "{s.volume}"')
            try:
                snap = await volumes.create_snapshot(c, v.name, name, exist_ok=True)
            except Exists as err:
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS, str(err)) from None
        return pb.CreateSnapshotResponse(snapshot=_snapshot(snap, v.used))

    async def delete_snapshot(self, req: Any) -> Any:
        require(req.snapshot_id, "snapshot_id")
        ref = _split_snapshot_id(req.snapshot_id)
        if ref is None:
            return pb.DeleteSnapshotResponse()
        async with self._cluster() as c:
            if await volumes.find_volume(c, ref[0]) is not None:
                try:
                    await volumes.delete_snapshot(c, ref[0], ref[1], missing_ok=True)
                except Invalid as err:  # a clone still copying it in
                    raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from None
        return pb.DeleteSnapshotResponse()

    async def list_snapshots(self, req: Any) -> Any:
        async with self._cluster() as c:
            if req.snapshot_id:
                ref = _split_snapshot_id(req.snapshot_id)
                if ref is None or (req.source_volume_id and req.source_volume_id != ref[0]):
                    return pb.ListSnapshotsResponse()
                volume = ref[0]
            else:
                volume = req.source_volume_id
            if volume and (not is_name(volume) or await volumes.find_volume(c, volume) is None):
                return pb.ListSnapshotsResponse()
            snaps = await volumes.list_snapshots(c, volume)
            used = {v.name: v.used for v in await c.admin.list_volumes()}
        if req.snapshot_id:
            snaps = [s for s in snaps if s.ref == req.snapshot_id]
        snaps = sorted((s for s in snaps if not s.name.startswith(CLONE_PREFIX) or req.snapshot_id),
                       key=lambda s: s.ref)
        page, token = _page(snaps, lambda s: s.ref, req.max_entries, req.starting_token)
        entries = [pb.ListSnapshotsResponse.Entry(
            snapshot=_snapshot(s, s.logical if s.logical is not None else used.get(s.volume, 0))) for s in page]
        return pb.ListSnapshotsResponse(entries=entries, next_token=token)
