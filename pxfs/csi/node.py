"""The CSI Node service: stage = one pxfs mount of the volume per host (a mount daemon of its own,
found again through the host's mount registry, so it outlives this process), publish = a bind mount
of the staging path into the pod's target (read-only when asked).

These calls block (spawning a mount, umount, statvfs): they run in the gRPC worker threads.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from pxfs.client import mounts
from pxfs.csi import TOPOLOGY_ZONE, params
from pxfs.csi import csi_pb2 as pb
from pxfs.csi.errors import CsiError, invalid, require
from pxfs.errors import PxfsError

log = logging.getLogger(__name__)

Rpc = pb.NodeServiceCapability.RPC
CAPABILITIES = [Rpc.STAGE_UNSTAGE_VOLUME, Rpc.GET_VOLUME_STATS, Rpc.EXPAND_VOLUME]


def _state(path: Path) -> str:
    """``missing``, ``free``, ``mounted`` or ``stale`` (a dead FUSE daemon: ENOTCONN). statvfs, not
    stat: the kernel may answer stat of a dead mount's root from its attribute cache."""
    try:
        os.statvfs(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ESTALE, errno.EIO):
            return "stale"
        raise
    return "mounted" if os.path.ismount(path) else "free"


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        cause = (proc.stderr.strip().splitlines() or [f"{argv[0]} exited {proc.returncode}"])[-1]
        raise CsiError(grpc.StatusCode.INTERNAL, f"{what}: {cause}")


def _mount_source(path: Path) -> tuple[str, str, set[str]] | None:
    """(source, fstype, options) of the mount at ``path``, from /proc/self/mountinfo."""
    target = str(path)
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 6 and fields[4].encode().decode("unicode_escape") == target:
            fstype, source = right.split()[:2]
            found = (source, fstype, set(fields[5].split(",")))  # the last one is on top
    return found


class Node:
    def __init__(self, cluster_dir: Path, node_id: str, zone: str, log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.cluster_dir, self.node_id, self.zone, self.log_dir = cluster_dir, node_id, zone, log_dir
        self.env = env
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def _exclusive(self, volume_id: str) -> Iterator[None]:
        """One call per volume at a time; another one meanwhile is ABORTED, as the spec asks."""
        with self._lock:
            if volume_id in self._busy:
                raise CsiError(grpc.StatusCode.ABORTED, f'volume "{volume_id}": another operation is in progress')
            self._busy.add(volume_id)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(volume_id)

    # -- stage: the volume's one mount on this host ---------------------------------------------
    def stage(self, req: Any) -> Any:
        require(req.volume_id, "volume_id")
        require(req.staging_target_path, "staging_target_path")
        require(req.HasField("volume_capability"), "volume_capability")
        why = params.check_capability(req.volume_capability)
        if why:
            raise invalid(f"volume capability: {why}")
        flags = set(req.volume_capability.mount.mount_flags)
        unknown = flags - mounts.FUSE_FLAGS - {"ro", "rw"}
        if unknown:
            raise invalid(f"mount_flags {','.join(sorted(unknown))}: not FUSE mount options")
        read_only = req.volume_capability.access_mode.mode in params.READ_ONLY_MODES or "ro" in flags
        staging = Path(req.staging_target_path)
        with self._exclusive(req.volume_id):
            rec = mounts.read_registry(staging)
            if rec is not None and rec.serving():
                if rec.volume != req.volume_id:
                    raise CsiError(grpc.StatusCode.ALREADY_EXISTS, f"staging path {staging}: volume "
                                   f'"{rec.volume}" is mounted there, not "{req.volume_id}"')
                return pb.NodeStageVolumeResponse()  # staged already: the same mount serves on
            if _state(staging) == "missing":
                staging.mkdir(parents=True)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # allow_other: the pods that use the volume run as any uid.
            options = (flags - {"ro", "rw"}) | {"allow_other"}
            try:
                rec = mounts.mount(self.cluster_dir, req.volume_id, staging, read_only=read_only,
                                   fuse_options=options, log_path=self.log_dir / f"mount-{req.volume_id}.log",
                                   env=self.env)
            except PxfsError as err:
                if "no such volume" in str(err):
                    raise CsiError(grpc.StatusCode.NOT_FOUND, str(err)) from None
                raise
        log.info("volume=%s staged at %s (mount pid %d)", req.volume_id, staging, rec.pid)
        return pb.NodeStageVolumeResponse()

    def unstage(self, req: Any) -> Any:
        require(req.volume_id, "volume_id")
        require(req.staging_target_path, "staging_target_path")
        staging = Path(req.staging_target_path)
        with self._exclusive(req.volume_id):
            state = _state(staging)
            if state == "stale":
                subprocess.run(["umount", "-l", str(staging)], capture_output=True)
            elif state == "mounted":
                try:
                    mounts.unmount(staging.resolve())
                except PxfsError as err:
                    raise CsiError(grpc.StatusCode.FAILED_PRECONDITION
                                   if "busy" in str(err) else grpc.StatusCode.UNAVAILABLE, str(err)) from None
        log.info("volume=%s unstaged from %s", req.volume_id, staging)
        return pb.NodeUnstageVolumeResponse()

    # -- publish: a bind mount into the pod -----------------------------------------------------
    def publish(self, req: Any) -> Any:
        require(req.volume_id, "volume_id")
        require(req.target_path, "target_path")
        require(req.staging_target_path, "staging_target_path")
        require(req.HasField("volume_capability"), "volume_capability")
        why = params.check_capability(req.volume_capability)
        if why:
            raise invalid(f"volume capability: {why}")
        staging, target = Path(req.staging_target_path), Path(req.target_path)
        read_only = req.readonly or req.volume_capability.access_mode.mode in params.READ_ONLY_MODES
        with self._exclusive(req.volume_id):
            rec = mounts.read_registry(staging.resolve()) if _state(staging) == "mounted" else None
            if rec is None or rec.volume != req.volume_id or not rec.serving():
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, f'volume "{req.volume_id}": not staged at '
                               f"{staging} (NodeStageVolume first)")
            state = _state(target)
            if state == "stale":
                subprocess.run(["umount", "-l", str(target)], capture_output=True)
                state = _state(target)
            if state == "mounted":
                source = _mount_source(target)
                if source is not None and source[0] == req.volume_id and ("ro" in source[2]) == read_only:
                    return pb.NodePublishVolumeResponse()  # published already
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS, f"target path {target}: something else is "
                               "mounted there (another volume, or the other read-only setting)")
            target.mkdir(parents=True, exist_ok=True)
            _run(["mount", "--bind", str(staging), str(target)], f"bind mount {staging} on {target}")
            if read_only:
                try:
                    _run(["mount", "-o", "remount,bind,ro", str(target)], f"read-only remount of {target}")
                except CsiError:
                    subprocess.run(["umount", str(target)], capture_output=True)
                    raise
        log.info("volume=%s published at %s%s", req.volume_id, target, " (ro)" if read_only else "")
        return pb.NodePublishVolumeResponse()

    def unpublish(self, req: Any) -> Any:
        require(req.volume_id, "volume_id")
        require(req.target_path, "target_path")
        target = Path(req.target_path)
        with self._exclusive(req.volume_id):
            state = _state(target)
            if state == "stale":
                subprocess.run(["umount", "-l", str(target)], capture_output=True)
            elif state == "mounted":
                _run(["umount", str(target)], f"unmount of {target}")
            if _state(target) == "free":
                try:
                    target.rmdir()  # the SP removes what NodePublish made
                except OSError as exc:
                    log.info("volume=%s target %s kept: %s", req.volume_id, target, exc.strerror)
        return pb.NodeUnpublishVolumeResponse()

    # -- stats and expansion --------------------------------------------------------------------
    def _statvfs(self, volume_id: str, path_text: str) -> os.statvfs_result:
        require(volume_id, "volume_id")
        require(path_text, "volume_path")
        path = Path(path_text)
        state = _state(path)
        if state == "missing":
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume path {path}: does not exist")
        if state == "free":
            raise CsiError(grpc.StatusCode.NOT_FOUND, f'volume path {path}: volume "{volume_id}" is not mounted '
                           "there")
        if state == "stale":
            raise CsiError(grpc.StatusCode.UNAVAILABLE, f"volume path {path}: its mount process is gone "
                           "(transport endpoint not connected)")
        source = _mount_source(path)
        if source is not None and source[0] != volume_id:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f'volume path {path}: holds "{source[0]}", not '
                           f'"{volume_id}"')
        return os.statvfs(path)

    def stats(self, req: Any) -> Any:
        st = self._statvfs(req.volume_id, req.volume_path)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        Usage = pb.VolumeUsage  # noqa: N806
        return pb.NodeGetVolumeStatsResponse(usage=[
            Usage(unit=Usage.BYTES, total=total, available=free, used=(st.f_blocks - st.f_bfree) * st.f_frsize),
            Usage(unit=Usage.INODES, total=st.f_files, available=st.f_favail, used=st.f_files - st.f_ffree),
        ])

    def expand(self, req: Any) -> Any:
        st = self._statvfs(req.volume_id, req.volume_path)
        # The controller resized the volume; statfs of the mount reports the new size already.
        return pb.NodeExpandVolumeResponse(capacity_bytes=st.f_blocks * st.f_frsize)

    def info(self) -> Any:
        topology = pb.Topology(segments={TOPOLOGY_ZONE: self.zone}) if self.zone else None
        return pb.NodeGetInfoResponse(node_id=self.node_id, accessible_topology=topology)
