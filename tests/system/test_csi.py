"""The CSI driver over its unix socket against a real 3-node cluster, in the spirit of kubernetes-csi's
csi-sanity (Go, not buildable here): idempotency of every create/delete/stage/publish, the spec's
error codes, paging, snapshots and clones with their content, expansion seen by statfs; real mounts
(stage = a pxfs mount daemon, publish = bind mount) written by a sandbox as another uid while the
driver is killed with SIGKILL and started again."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from pxfs.client.mounts import read_registry
from pxfs.cluster.admin import MOUNT_TTL
from pxfs.csi import NAME
from pxfs.csi import csi_pb2 as pb
from pxfs.csi import csi_pb2_grpc as rpc
from tests.conftest import PXFS, Cluster, is_mounted, pxfs_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE")

MiB = 1 << 20
Code = grpc.StatusCode
Mode = pb.VolumeCapability.AccessMode


def cap(mode: int = Mode.MULTI_NODE_MULTI_WRITER, block: bool = False, fs_type: str = "") -> Any:
    if block:
        return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode))
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=fs_type), access_mode=Mode(mode=mode))


def rng(required: int = 0, limit: int = 0) -> Any:
    return pb.CapacityRange(required_bytes=required, limit_bytes=limit)


@dataclass
class Driver:
    """One `pxfs csi` process and stubs for its three services."""

    proc: subprocess.Popen
    sock: Path
    channel: grpc.Channel

    @property
    def identity(self) -> rpc.IdentityStub:
        return rpc.IdentityStub(self.channel)

    @property
    def ctl(self) -> rpc.ControllerStub:
        return rpc.ControllerStub(self.channel)

    @property
    def node(self) -> rpc.NodeStub:
        return rpc.NodeStub(self.channel)


def start_driver(cluster: Cluster, sock: Path, log: Path) -> Driver:
    out = open(log, "ab")  # noqa: SIM115 - the driver's log outlives this call
    proc = subprocess.Popen([*PXFS, "csi", "--endpoint", f"unix://{sock}", "--node-id", "host-1",
                             "--cluster", str(cluster.dir), "--log-dir", str(sock.parent / "logs"),
                             "--zone", "z1"], stdout=out, stderr=out, env=pxfs_env())
    out.close()
    channel = grpc.insecure_channel(f"unix://{sock}")
    deadline = time.monotonic() + 30
    while True:
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
            rpc.IdentityStub(channel).GetPluginInfo(pb.GetPluginInfoRequest(), timeout=5)
            return Driver(proc, sock, channel)
        except (grpc.FutureTimeoutError, grpc.RpcError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"csi driver did not come up: {log.read_text()[-2000:]}") from None


def stop_driver(d: Driver, sig: int = signal.SIGTERM) -> None:
    d.channel.close()
    d.proc.send_signal(sig)
    d.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="csi", dir="/tmp"))  # a unix socket path is at most 107 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def driver(shared_cluster: Cluster, workdir: Path) -> Iterator[Driver]:
    d = start_driver(shared_cluster, workdir / "csi.sock", workdir / "csi.log")
    holder = {"d": d}
    try:
        yield d
    finally:
        stop_driver(holder["d"])
        assert not (workdir / "csi.sock").exists(), "the driver left its socket behind"


def fails(code: grpc.StatusCode, call: Any, req: Any) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call(req, timeout=60)
    assert e.value.code() == code, f"{e.value.code()} {e.value.details()}"
    assert "Traceback" not in (e.value.details() or "")
    return e.value.details()


def create(d: Driver, name: str, size: int = 64 * MiB, **params: str) -> Any:
    return d.ctl.CreateVolume(pb.CreateVolumeRequest(name=name, capacity_range=rng(size), volume_capabilities=[cap()],
                                                     parameters=params), timeout=60).volume


def eventually(predicate: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.1)


def registry_pid(staging: Path) -> int:
    rec = read_registry(staging.resolve())
    assert rec is not None, f"no mount registered at {staging}"
    return rec.pid


class Staged:
    def __init__(self, d: Driver, workdir: Path, volume: str) -> None:
        self.d, self.volume = d, volume
        self.staging = workdir / "stage" / volume
        self.staging.mkdir(parents=True, exist_ok=True)
        self.targets: list[Path] = []

    def stage(self, mode: int = Mode.MULTI_NODE_MULTI_WRITER) -> None:
        self.d.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=self.volume, staging_target_path=str(self.staging), volume_capability=cap(mode)), timeout=120)

    def publish(self, name: str, readonly: bool = False) -> Path:
        target = self.staging.parent.parent / "pods" / name / "mount"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.d.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=self.volume, staging_target_path=str(self.staging), target_path=str(target),
            volume_capability=cap(), readonly=readonly), timeout=60)
        self.targets.append(target)
        return target

    def unpublish(self, target: Path) -> None:
        self.d.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=self.volume,
                                                                      target_path=str(target)), timeout=60)

    def unstage(self) -> None:
        self.d.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=self.volume,
                                                                  staging_target_path=str(self.staging)),
                                      timeout=120)

    def cleanup(self) -> None:
        for t in self.targets:
            if is_mounted(t):
                subprocess.run(["umount", "-l", str(t)], capture_output=True)
        if is_mounted(self.staging):
            self.unstage()


def test_identity(driver: Driver) -> None:
    info = driver.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
    assert info.name == NAME and info.vendor_version
    caps = driver.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=10).capabilities
    assert pb.PluginCapability.Service.CONTROLLER_SERVICE in [c.service.type for c in caps if c.HasField("service")]
    assert driver.identity.Probe(pb.ProbeRequest(), timeout=30).ready.value
    ctl = {c.rpc.type for c in driver.ctl.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest()).capabilities}
    R = pb.ControllerServiceCapability.RPC  # noqa: N806
    assert {R.CREATE_DELETE_VOLUME, R.CREATE_DELETE_SNAPSHOT, R.LIST_SNAPSHOTS, R.CLONE_VOLUME, R.EXPAND_VOLUME,
            R.LIST_VOLUMES, R.GET_CAPACITY} <= ctl
    node = {c.rpc.type for c in driver.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities}
    N = pb.NodeServiceCapability.RPC  # noqa: N806
    assert {N.STAGE_UNSTAGE_VOLUME, N.GET_VOLUME_STATS, N.EXPAND_VOLUME} <= node
    info = driver.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == "host-1" and dict(info.accessible_topology.segments) == {"topology.pxfs.io/zone": "z1"}
    assert driver.ctl.GetCapacity(pb.GetCapacityRequest(parameters={"repl": "3"})).available_capacity > 0


def test_create_is_idempotent_and_conflicts_are_refused(shared_cluster: Cluster, driver: Driver) -> None:
    v1 = create(driver, "csi-idem", 64 * MiB, repl="3", blockSize="64K", labels="team=a")
    assert v1.volume_id == "csi-idem" and v1.capacity_bytes == 64 * MiB
    v2 = create(driver, "csi-idem", 64 * MiB, repl="3", blockSize="64K", labels="team=a")
    assert v2 == v1
    info = shared_cluster.json("volume", "inspect", "csi-idem")
    assert info["repl"] == 3 and info["block_size"] == 64 << 10 and info["labels"] == {"team": "a"}
    # Same name, other parameters: ALREADY_EXISTS naming what differs.
    assert "size" in fails(Code.ALREADY_EXISTS, driver.ctl.CreateVolume, pb.CreateVolumeRequest(
        name="csi-idem", capacity_range=rng(128 * MiB), volume_capabilities=[cap()], parameters={"repl": "3"}))
    assert "repl" in fails(Code.ALREADY_EXISTS, driver.ctl.CreateVolume, pb.CreateVolumeRequest(
        name="csi-idem", capacity_range=rng(64 * MiB), volume_capabilities=[cap()], parameters={"repl": "1"}))
    # A range the existing size lies in is the same volume.
    again = driver.ctl.CreateVolume(pb.CreateVolumeRequest(name="csi-idem", capacity_range=rng(32 * MiB, 64 * MiB),
                                                           volume_capabilities=[cap()], parameters={"repl": "3"}))
    assert again.volume.volume_id == "csi-idem"
    # A name that is no pxfs name still finds the same volume each time.
    odd = create(driver, "PVC with spaces/and slashes")
    assert odd.volume_id.startswith("csi-") and create(driver, "PVC with spaces/and slashes") == odd
    for name in ("csi-idem", odd.volume_id):
        driver.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=name))
        driver.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=name))  # deleting twice is fine
    fails(Code.NOT_FOUND, driver.ctl.ValidateVolumeCapabilities,
          pb.ValidateVolumeCapabilitiesRequest(volume_id="csi-idem", volume_capabilities=[cap()]))


def test_bad_input_gets_the_spec_codes(driver: Driver) -> None:
    c = driver.ctl
    fails(Code.INVALID_ARGUMENT, c.CreateVolume, pb.CreateVolumeRequest(volume_capabilities=[cap()]))
    fails(Code.INVALID_ARGUMENT, c.CreateVolume, pb.CreateVolumeRequest(name="csi-bad"))
    fails(Code.INVALID_ARGUMENT, c.CreateVolume, pb.CreateVolumeRequest(name="csi-bad", volume_capabilities=[
        cap(block=True)]))
    fails(Code.INVALID_ARGUMENT, c.CreateVolume, pb.CreateVolumeRequest(name="csi-bad", volume_capabilities=[
        cap(fs_type="ext4")]))
    assert "unknown" in fails(Code.INVALID_ARGUMENT, c.CreateVolume, pb.CreateVolumeRequest(
        name="csi-bad", volume_capabilities=[cap()], parameters={"colour": "red"}))
    fails(Code.INVALID_ARGUMENT, c.CreateVolume, pb.CreateVolumeRequest(name="csi-bad", volume_capabilities=[cap()],
                                                                        parameters={"repl": "7"}))
    fails(Code.INVALID_ARGUMENT, c.CreateVolume, pb.CreateVolumeRequest(
        name="csi-bad", volume_capabilities=[cap()], capacity_range=rng(10 * MiB, 5 * MiB)))
    fails(Code.OUT_OF_RANGE, c.CreateVolume, pb.CreateVolumeRequest(
        name="csi-bad", volume_capabilities=[cap()], capacity_range=rng(1000, 2000)))
    fails(Code.INVALID_ARGUMENT, c.DeleteVolume, pb.DeleteVolumeRequest())
    c.DeleteVolume(pb.DeleteVolumeRequest(volume_id="csi-never-was"))
    c.DeleteVolume(pb.DeleteVolumeRequest(volume_id="../not a name"))
    fails(Code.INVALID_ARGUMENT, c.ValidateVolumeCapabilities, pb.ValidateVolumeCapabilitiesRequest(
        volume_capabilities=[cap()]))
    fails(Code.NOT_FOUND, c.ValidateVolumeCapabilities, pb.ValidateVolumeCapabilitiesRequest(
        volume_id="csi-never-was", volume_capabilities=[cap()]))
    fails(Code.INVALID_ARGUMENT, c.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(capacity_range=rng(MiB)))
    fails(Code.NOT_FOUND, c.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
        volume_id="csi-never-was", capacity_range=rng(64 * MiB)))
    fails(Code.INVALID_ARGUMENT, c.CreateSnapshot, pb.CreateSnapshotRequest(name="s"))
    fails(Code.INVALID_ARGUMENT, c.CreateSnapshot, pb.CreateSnapshotRequest(source_volume_id="csi-never-was"))
    fails(Code.NOT_FOUND, c.CreateSnapshot, pb.CreateSnapshotRequest(source_volume_id="csi-never-was", name="s"))
    fails(Code.INVALID_ARGUMENT, c.DeleteSnapshot, pb.DeleteSnapshotRequest())
    c.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id="csi-never-was@s"))
    c.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id="garbage"))
    src = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id="csi-never-was@s"))
    fails(Code.NOT_FOUND, c.CreateVolume, pb.CreateVolumeRequest(name="csi-bad", volume_capabilities=[cap()],
                                                                 volume_content_source=src))
    src = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id="csi-never-was"))
    fails(Code.NOT_FOUND, c.CreateVolume, pb.CreateVolumeRequest(name="csi-bad", volume_capabilities=[cap()],
                                                                 volume_content_source=src))
    n = driver.node
    fails(Code.INVALID_ARGUMENT, n.NodeStageVolume, pb.NodeStageVolumeRequest(
        staging_target_path="/tmp/x", volume_capability=cap()))
    fails(Code.INVALID_ARGUMENT, n.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id="v", volume_capability=cap()))
    fails(Code.INVALID_ARGUMENT, n.NodeStageVolume, pb.NodeStageVolumeRequest(volume_id="v", staging_target_path="/x"))
    fails(Code.INVALID_ARGUMENT, n.NodePublishVolume, pb.NodePublishVolumeRequest(
        volume_id="v", staging_target_path="/x", volume_capability=cap()))
    fails(Code.INVALID_ARGUMENT, n.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id="v"))
    fails(Code.INVALID_ARGUMENT, n.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(staging_target_path="/x"))
    fails(Code.INVALID_ARGUMENT, n.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id="v"))
    fails(Code.NOT_FOUND, n.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id="v",
                                                                             volume_path="/nonexistent/csi"))


def test_list_volumes_pages(driver: Driver) -> None:
    names = [f"csi-page-{i}" for i in range(5)]
    for n in names:
        create(driver, n, 8 * MiB)
    try:
        seen, token, pages = [], "", 0
        while True:
            r = driver.ctl.ListVolumes(pb.ListVolumesRequest(max_entries=2, starting_token=token))
            assert len(r.entries) <= 2
            seen += [e.volume.volume_id for e in r.entries]
            pages += 1
            token = r.next_token
            if not token:
                break
        assert [s for s in seen if s.startswith("csi-page-")] == names and pages >= 3
        assert len(seen) == len(set(seen))
        everything = driver.ctl.ListVolumes(pb.ListVolumesRequest())
        assert not everything.next_token and {e.volume.volume_id for e in everything.entries} >= set(names)
        # A page's token stays good when the volume it names is deleted meanwhile.
        r = driver.ctl.ListVolumes(pb.ListVolumesRequest(max_entries=2))
        driver.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=r.next_token))
        rest = driver.ctl.ListVolumes(pb.ListVolumesRequest(starting_token=r.next_token))
        assert r.next_token not in [e.volume.volume_id for e in rest.entries]
        fails(Code.ABORTED, driver.ctl.ListVolumes, pb.ListVolumesRequest(starting_token="zzzz-not-a-token"))
        fails(Code.INVALID_ARGUMENT, driver.ctl.ListVolumes, pb.ListVolumesRequest(max_entries=-1))
    finally:
        for n in names:
            driver.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=n))


def test_stage_publish_write_stats_expand(shared_cluster: Cluster, driver: Driver, workdir: Path) -> None:
    create(driver, "csi-rw", 64 * MiB, repl="3")
    s = Staged(driver, workdir, "csi-rw")
    try:
        fails(Code.FAILED_PRECONDITION, driver.node.NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id="csi-rw", staging_target_path=str(s.staging), target_path=str(workdir / "early"),
            volume_capability=cap()))
        s.stage()
        s.stage()  # staged already: the same mount
        assert is_mounted(s.staging)
        assert len([ln for ln in Path("/proc/mounts").read_text().splitlines() if f" {s.staging} " in ln]) == 1
        rw = s.publish("pod-a")
        assert s.publish("pod-a") == rw  # published already
        ro = s.publish("pod-b", readonly=True)
        (rw / "hello.txt").write_bytes(b"through the bind mount\n" * 1000)
        with open(rw / "hello.txt", "rb+") as f:
            os.fsync(f.fileno())
        assert (s.staging / "hello.txt").read_bytes() == (ro / "hello.txt").read_bytes()
        with pytest.raises(OSError) as e:
            (ro / "nope").write_bytes(b"x")
        assert e.value.errno == 30  # EROFS
        fails(Code.ALREADY_EXISTS, driver.node.NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id="csi-rw", staging_target_path=str(s.staging), target_path=str(ro), volume_capability=cap(),
            readonly=False))

        def usage() -> dict[int, Any]:
            r = driver.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="csi-rw", volume_path=str(rw)))
            return {u.unit: u for u in r.usage}

        u = usage()
        assert u[pb.VolumeUsage.BYTES].total == 64 * MiB
        assert 0 < u[pb.VolumeUsage.BYTES].used < 64 * MiB
        assert u[pb.VolumeUsage.BYTES].available == u[pb.VolumeUsage.BYTES].total - u[pb.VolumeUsage.BYTES].used
        assert u[pb.VolumeUsage.INODES].used >= 2 and u[pb.VolumeUsage.INODES].total > u[pb.VolumeUsage.INODES].used
        r = driver.ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(volume_id="csi-rw",
                                                                               capacity_range=rng(256 * MiB)))
        assert r.capacity_bytes == 256 * MiB and not r.node_expansion_required
        assert driver.ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id="csi-rw", capacity_range=rng(128 * MiB))).capacity_bytes == 256 * MiB  # never shrinks
        eventually(lambda: usage()[pb.VolumeUsage.BYTES].total == 256 * MiB, "statfs showing the new size")
        assert os.statvfs(rw).f_blocks * os.statvfs(rw).f_frsize == 256 * MiB
        n = driver.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(volume_id="csi-rw", volume_path=str(rw),
                                                                    capacity_range=rng(256 * MiB)))
        assert n.capacity_bytes == 256 * MiB
        fails(Code.NOT_FOUND, driver.node.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
            volume_id="csi-other", volume_path=str(rw)))
        # Deleting a staged volume is refused; the volume stays.
        fails(Code.FAILED_PRECONDITION, driver.ctl.DeleteVolume, pb.DeleteVolumeRequest(volume_id="csi-rw"))
        for t in (rw, ro):
            s.unpublish(t)
            s.unpublish(t)  # unpublished already
            assert not is_mounted(t) and not t.exists()
        s.unstage()
        s.unstage()  # unstaged already
        assert not is_mounted(s.staging)
    finally:
        s.cleanup()
    driver.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id="csi-rw"))


def test_snapshots_and_clones_keep_their_content(driver: Driver, workdir: Path) -> None:
    create(driver, "csi-src", 64 * MiB, repl="2")
    other = create(driver, "csi-other", 8 * MiB)
    s = Staged(driver, workdir, "csi-src")
    made: list[str] = []
    try:
        s.stage()
        rw = s.publish("snap-pod")
        (rw / "data").write_bytes(b"version 1\n")
        with open(rw / "data", "rb+") as f:
            os.fsync(f.fileno())
        snap = driver.ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id="csi-src", name="snap-1")).snapshot
        assert snap.snapshot_id == "csi-src@snap-1" and snap.ready_to_use and snap.source_volume_id == "csi-src"
        assert snap.creation_time.seconds > 0
        again = driver.ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id="csi-src", name="snap-1"))
        assert again.snapshot.snapshot_id == snap.snapshot_id  # idempotent
        fails(Code.ALREADY_EXISTS, driver.ctl.CreateSnapshot,
              pb.CreateSnapshotRequest(source_volume_id=other.volume_id, name="snap-1"))
        (rw / "data").write_bytes(b"version 2\n")
        with open(rw / "data", "rb+") as f:
            os.fsync(f.fileno())
        listed = driver.ctl.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id="csi-src"))
        assert [e.snapshot.snapshot_id for e in listed.entries] == ["csi-src@snap-1"]
        by_id = driver.ctl.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id="csi-src@snap-1"))
        assert [e.snapshot.snapshot_id for e in by_id.entries] == ["csi-src@snap-1"]
        assert not driver.ctl.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id="csi-src@nope")).entries
        assert not driver.ctl.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id="csi-never-was")).entries
        # A volume from the snapshot holds version 1; a clone of the volume holds version 2.
        from_snap = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))
        req = pb.CreateVolumeRequest(name="csi-from-snap", capacity_range=rng(128 * MiB), volume_capabilities=[cap()],
                                     parameters={"repl": "2"}, volume_content_source=from_snap)
        v = driver.ctl.CreateVolume(req).volume
        made.append(v.volume_id)
        assert v.capacity_bytes == 128 * MiB and v.content_source.snapshot.snapshot_id == snap.snapshot_id
        assert driver.ctl.CreateVolume(req).volume.volume_id == v.volume_id  # idempotent
        from_vol = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id="csi-src"))
        c = driver.ctl.CreateVolume(pb.CreateVolumeRequest(
            name="csi-clone", capacity_range=rng(64 * MiB), volume_capabilities=[cap()], parameters={"repl": "2"},
            volume_content_source=from_vol)).volume
        made.append(c.volume_id)
        for vol, want in (("csi-from-snap", b"version 1\n"), ("csi-clone", b"version 2\n")):
            t = Staged(driver, workdir, vol)
            try:
                t.stage()
                target = t.publish(f"{vol}-pod")
                assert (target / "data").read_bytes() == want
                (target / "data").write_bytes(b"changed in " + vol.encode())
                t.unpublish(target)
                t.unstage()
            finally:
                t.cleanup()
        assert (rw / "data").read_bytes() == b"version 2\n"  # the source is untouched by its copies
        # The clone's own snapshot of its source is not listed as the user's.
        assert [e.snapshot.snapshot_id for e in driver.ctl.ListSnapshots(
            pb.ListSnapshotsRequest(source_volume_id="csi-src")).entries] == ["csi-src@snap-1"]
        page = driver.ctl.ListSnapshots(pb.ListSnapshotsRequest(max_entries=1))
        assert len(page.entries) == 1
        s.unpublish(rw)
        s.unstage()
    finally:
        s.cleanup()
        for name in made:
            driver.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=name))
    eventually(lambda: _try_delete_snapshot(driver, "csi-src@snap-1"), "snapshot deletion once the clone copied it")
    driver.ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id="csi-src@snap-1"))  # deleted already
    assert not driver.ctl.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id="csi-src")).entries
    for name in ("csi-src", "csi-other"):
        driver.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=name))


def _try_delete_snapshot(d: Driver, snapshot_id: str) -> bool:
    try:
        d.ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id))
    except grpc.RpcError as err:
        assert err.code() == Code.FAILED_PRECONDITION, err.details()
        return False
    return True


@pytest.mark.skipif(not Path("/usr/bin/bwrap").exists(), reason="bubblewrap not installed")
def test_sandbox_writes_as_another_uid_while_the_driver_is_killed(shared_cluster: Cluster, driver: Driver,
                                                                   workdir: Path) -> None:
    create(driver, "csi-pod", 64 * MiB, repl="3")
    s = Staged(driver, workdir, "csi-pod")
    writer = None
    try:
        s.stage()
        target = s.publish("sandbox")
        os.chmod(target, 0o777)
        # A container stand-in: own pid/net/ipc/uts namespaces, uid 1000, the volume bound at /mnt.
        # It appends a numbered, fsync'd line 1000 times, then says so.
        script = ("i=0; while [ $i -lt 1000 ]; do echo line-$i >> /mnt/log.txt && sync /mnt/log.txt || exit 1; "
                  "i=$((i+1)); done; echo ok > /mnt/done")
        writer = subprocess.Popen(
            ["bwrap", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--bind", str(target), "/mnt",
             "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-net", "/usr/bin/setpriv", "--reuid",
             "1000", "--regid", "1000", "--clear-groups", "/bin/sh", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        def writing() -> bool:
            if writer.poll() is not None:
                raise AssertionError(f"the sandbox exited {writer.returncode}: {writer.stderr.read().decode()}")
            return (target / "log.txt").exists() and (target / "log.txt").stat().st_size > 0

        eventually(writing, "the sandbox writing")
        mount_pid = registry_pid(s.staging)
        assert writer.poll() is None, "the sandbox finished before the driver was killed"
        driver.proc.kill()  # SIGKILL: no clean-up of any kind
        driver.proc.wait(timeout=30)
        driver.channel.close()
        restarted = start_driver(shared_cluster, driver.sock, workdir / "csi.log")
        driver.proc, driver.channel = restarted.proc, restarted.channel
        # The kubelet retries what it had asked: both are no-ops on the mount that kept serving.
        s.stage()
        assert s.publish("sandbox") == target
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
        assert (target / "done").read_text() == "ok\n"
        assert (target / "log.txt").read_text() == "".join(f"line-{i}\n" for i in range(1000))
        assert os.stat(target / "log.txt").st_uid == 1000
        assert registry_pid(s.staging) == mount_pid  # the same mount daemon all along
        s.unpublish(target)
        s.unstage()
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        s.cleanup()
    driver.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id="csi-pod"))


def test_a_killed_mount_daemon_is_restaged(driver: Driver, workdir: Path) -> None:
    s = Staged(driver, workdir, "csi-restage")
    fails(Code.NOT_FOUND, driver.node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id="csi-restage", staging_target_path=str(s.staging), volume_capability=cap()))
    create(driver, "csi-restage", 32 * MiB)
    try:
        s.stage()
        (s.staging / "kept").write_bytes(b"fsync'd before the kill\n")
        with open(s.staging / "kept", "rb+") as f:
            os.fsync(f.fileno())
        pid = registry_pid(s.staging)
        fd = os.pidfd_open(pid)
        os.kill(pid, signal.SIGKILL)
        select.select([fd], [], [], 30)
        os.close(fd)
        # Its staging path is dead (ENOTCONN): stats say so, a publish is refused, a stage mounts again.
        fails(Code.UNAVAILABLE, driver.node.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
            volume_id="csi-restage", volume_path=str(s.staging)))
        fails(Code.FAILED_PRECONDITION, driver.node.NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id="csi-restage", staging_target_path=str(s.staging), target_path=str(workdir / "dead"),
            volume_capability=cap()))
        s.stage()
        assert registry_pid(s.staging) != pid
        assert (s.staging / "kept").read_bytes() == b"fsync'd before the kill\n"
        s.unstage()
    finally:
        s.cleanup()
    # The killed daemon counts as a mount until its registration expires (MOUNT_TTL): DeleteVolume
    # says FAILED_PRECONDITION meanwhile, and the provisioner retries, as here.
    eventually(lambda: _try_delete_volume(driver, "csi-restage"), "delete once the dead mount expired",
               timeout=MOUNT_TTL + 30)


def _try_delete_volume(d: Driver, volume_id: str) -> bool:
    try:
        d.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
    except grpc.RpcError as err:
        assert err.code() == Code.FAILED_PRECONDITION, err.details()
        return False
    return True
