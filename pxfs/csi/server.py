"""``pxfs csi``: the gRPC server on a unix socket, bridged to trio.

grpcio's server is synchronous: its worker threads call into the driver. Controller calls need the
cluster (capnp RPC through the bridge, on trio): a worker hands each to the one trio loop with
``trio.from_thread.run``. Node calls block on the host (mount daemons, umount, statvfs) and stay in
the worker thread. Every failure becomes one status code and one line naming object and cause.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import trio
from google.protobuf.wrappers_pb2 import BoolValue

import pxfs
from pxfs.csi import NAME
from pxfs.csi import csi_pb2 as pb
from pxfs.csi import csi_pb2_grpc as rpc
from pxfs.csi.controller import CAPABILITIES as CONTROLLER_CAPS
from pxfs.csi.controller import Controller
from pxfs.csi.errors import CsiError, code_of
from pxfs.csi.node import CAPABILITIES as NODE_CAPS
from pxfs.csi.node import Node
from pxfs.errors import Invalid, PxfsError
from pxfs.paths import claim_socket
from pxfs.rpc.bridge import open_bridge

log = logging.getLogger(__name__)

WORKERS = 8
VERSION = getattr(pxfs, "__version__", "0.1.0")


@dataclass
class CsiConfig:
    endpoint: str
    node_id: str
    cluster_dir: Path
    controller: bool = True
    node: bool = True
    zone: str = ""  # the topology zone of this host ('' : from the pxfs node named node_id)
    log_dir: Path = Path("/var/log/pxfs")
    env: dict[str, str] | None = None  # of the mount daemons (default: this process's)


def socket_path(endpoint: str) -> Path:
    for prefix in ("unix://", "unix:"):
        if endpoint.startswith(prefix):
            path = endpoint[len(prefix):]
            if path.startswith("/"):
                return Path(path)
    raise Invalid(f"endpoint {endpoint!r}", "expected unix:///ABSOLUTE/PATH")


def _answer(context: grpc.ServicerContext, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except CsiError as err:
        log.info("%s: %s %s", what, err.code.name, err.message)
        context.abort(err.code, err.message)
    except PxfsError as err:
        log.info("%s: %s", what, err)
        context.abort(code_of(err), str(err))
    except OSError as err:  # the host said no (a path, a dead mount): name it, no traceback
        code = grpc.StatusCode.UNAVAILABLE if err.errno in (errno.ENOTCONN, errno.EIO) else grpc.StatusCode.INTERNAL
        message = f"{err.filename or what}: {err.strerror or err}"
        log.warning("%s: %s", what, message)
        context.abort(code, message)


class Identity(rpc.IdentityServicer):
    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def GetPluginInfo(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb.GetPluginInfoResponse(name=NAME, vendor_version=VERSION)

    def GetPluginCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        cap = pb.PluginCapability
        caps = [cap(volume_expansion=cap.VolumeExpansion(type=cap.VolumeExpansion.ONLINE))]
        if self.driver.controller is not None:
            caps.insert(0, cap(service=cap.Service(type=cap.Service.CONTROLLER_SERVICE)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def probe() -> Any:
            if self.driver.controller is not None:
                try:
                    self.driver.trio(self.driver.controller.probe)
                except PxfsError as err:
                    raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, f"cluster unreachable: {err}") from None
            return pb.ProbeResponse(ready=BoolValue(value=True))
        return _answer(context, "Probe", probe)


class ControllerService(rpc.ControllerServicer):
    def __init__(self, driver: Driver, controller: Controller) -> None:
        self.driver, self.c = driver, controller

    def _call(self, context: grpc.ServicerContext, what: str, fn: Callable[[Any], Awaitable[Any]],
              request: Any) -> Any:
        return _answer(context, what, lambda: self.driver.trio(fn, request))

    def CreateVolume(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._call(context, f"CreateVolume {request.name}", self.c.create_volume, request)

    def DeleteVolume(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._call(context, f"DeleteVolume {request.volume_id}", self.c.delete_volume, request)

    def ControllerExpandVolume(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._call(context, f"ControllerExpandVolume {request.volume_id}", self.c.expand_volume, request)

    def ValidateVolumeCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._call(context, f"ValidateVolumeCapabilities {request.volume_id}", self.c.validate, request)

    def ListVolumes(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._call(context, "ListVolumes", self.c.list_volumes, request)

    def GetCapacity(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._call(context, "GetCapacity", self.c.get_capacity, request)

    def ControllerGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        cap = pb.ControllerServiceCapability
        return pb.ControllerGetCapabilitiesResponse(capabilities=[cap(rpc=cap.RPC(type=t)) for t in CONTROLLER_CAPS])

    def CreateSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._call(context, f"CreateSnapshot {request.name}", self.c.create_snapshot, request)

    def DeleteSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._call(context, f"DeleteSnapshot {request.snapshot_id}", self.c.delete_snapshot, request)

    def ListSnapshots(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._call(context, "ListSnapshots", self.c.list_snapshots, request)


class NodeService(rpc.NodeServicer):
    def __init__(self, node: Node) -> None:
        self.n = node

    def NodeStageVolume(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _answer(context, f"NodeStageVolume {request.volume_id}", lambda: self.n.stage(request))

    def NodeUnstageVolume(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _answer(context, f"NodeUnstageVolume {request.volume_id}", lambda: self.n.unstage(request))

    def NodePublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _answer(context, f"NodePublishVolume {request.volume_id}", lambda: self.n.publish(request))

    def NodeUnpublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _answer(context, f"NodeUnpublishVolume {request.volume_id}", lambda: self.n.unpublish(request))

    def NodeGetVolumeStats(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _answer(context, f"NodeGetVolumeStats {request.volume_id}", lambda: self.n.stats(request))

    def NodeExpandVolume(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _answer(context, f"NodeExpandVolume {request.volume_id}", lambda: self.n.expand(request))

    def NodeGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        cap = pb.NodeServiceCapability
        return pb.NodeGetCapabilitiesResponse(capabilities=[cap(rpc=cap.RPC(type=t)) for t in NODE_CAPS])

    def NodeGetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self.n.info()


class Driver:
    """The running driver: its trio loop (for the gRPC threads) and the services it offers."""

    def __init__(self, token: trio.lowlevel.TrioToken, controller: Controller | None, node: Node | None) -> None:
        self.token, self.controller, self.node = token, controller, node

    def trio(self, fn: Callable[[Any], Awaitable[Any]] | Callable[[], Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self.token)


async def _zone(cfg: CsiConfig, controller: Controller | None, bridge: Any) -> str:
    """This host's zone: --zone, else the ``zone`` label of the pxfs node named like this CSI node."""
    if cfg.zone:
        return cfg.zone
    from pxfs.client.connect import open_cluster

    try:
        async with open_cluster(cfg.cluster_dir, bridge, peer="csi") as c:
            for n in await c.admin.list_nodes():
                if n.id == cfg.node_id:
                    return n.labels.get("zone", "")
    except PxfsError as err:
        log.warning("node=%s zone unknown (cluster unreachable: %s); no topology reported", cfg.node_id, err)
    return ""


async def serve(cfg: CsiConfig, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGTERM or SIGINT (or cancellation); the mounts it staged keep running."""
    path = socket_path(cfg.endpoint)
    claim_socket(path, f"endpoint {str(path)!r}", "driver")
    async with open_bridge() as bridge:
        controller = Controller(cfg.cluster_dir, bridge) if cfg.controller else None
        node = None
        if cfg.node:
            node = Node(cfg.cluster_dir, cfg.node_id, await _zone(cfg, controller, bridge), cfg.log_dir, cfg.env)
        driver = Driver(trio.lowlevel.current_trio_token(), controller, node)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="csi"))
        rpc.add_IdentityServicer_to_server(Identity(driver), server)
        if controller is not None:
            rpc.add_ControllerServicer_to_server(ControllerService(driver, controller), server)
        if node is not None:
            rpc.add_NodeServicer_to_server(NodeService(node), server)
        if server.add_insecure_port(f"unix://{path}") == 0:
            raise Invalid(f"endpoint {cfg.endpoint!r}", "cannot listen there")
        os.chmod(path, 0o600)
        server.start()
        log.info("csi driver %s node=%s serving %s (%s)", NAME, cfg.node_id, cfg.endpoint,
                 "+".join(s for s, on in (("controller", controller), ("node", node)) if on is not None))
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                task_status.started()
                async for signum in signals:
                    log.info("csi driver stopping on %s", signal.Signals(signum).name)
                    break
        finally:
            with trio.CancelScope(shield=True):
                # Calls in flight may be waiting on this loop: stop() must not block it.
                await trio.to_thread.run_sync(lambda: server.stop(grace=5).wait())
            path.unlink(missing_ok=True)
