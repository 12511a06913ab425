"""``pxfs csi`` (the CSI driver) and ``pxfs volume-plugin`` (the Docker/podman volume plugin): the
arguments; the drivers themselves live in pxfs/csi and pxfs/plugin."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import trio


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def cmd_csi(args: argparse.Namespace) -> int:
    from pxfs.csi.server import CsiConfig, serve

    both = not args.controller and not args.node
    cfg = CsiConfig(endpoint=args.endpoint, node_id=args.node_id, cluster_dir=args.cluster,
                    controller=args.controller or both, node=args.node or both, zone=args.zone,
                    log_dir=Path(args.log_dir))
    _logging()
    trio.run(serve, cfg)
    return 0


def cmd_volume_plugin(args: argparse.Namespace) -> int:
    from pxfs.plugin.server import serve
    from pxfs.plugin.volumes import PluginConfig

    cfg = PluginConfig(socket=Path(args.socket), cluster_dir=args.cluster, mount_root=Path(args.mount_root),
                       state_dir=Path(args.state_dir), log_dir=Path(args.log_dir))
    _logging()
    trio.run(serve, cfg)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("csi", help="run the CSI driver (Kubernetes) on a unix socket")
    p.add_argument("--endpoint", default="unix:///run/pxfs/csi.sock", help="unix:///PATH (default %(default)s)")
    p.add_argument("--node-id", required=True, metavar="ID", help="this host's name for the orchestrator")
    p.add_argument("--controller", action="store_true", help="serve the Controller service")
    p.add_argument("--node", action="store_true", help="serve the Node service (neither flag: both)")
    p.add_argument("--zone", default="", help="topology zone of this host (default: the zone label of the "
                   "pxfs node named ID)")
    p.add_argument("--log-dir", default="/var/log/pxfs", help="logs of the mount daemons it starts")
    p.add_argument("--cluster", metavar="DIR", help="cluster directory (default: $PXFS_CLUSTER)")
    p.add_argument("--credential", metavar="DIR",
                   help="credential to connect with (default: $PXFS_CREDENTIAL, else CLUSTER/admin)")
    p.set_defaults(run=cmd_csi, sync=True)

    p = sub.add_parser("volume-plugin", help="run the Docker/podman volume plugin on a unix socket")
    p.add_argument("--socket", default="/run/docker/plugins/pxfs.sock", help="(default %(default)s)")
    p.add_argument("--mount-root", default="/var/lib/pxfs/plugin/volumes",
                   help="where volumes in use are mounted, one directory each (default %(default)s)")
    p.add_argument("--state-dir", default="/var/lib/pxfs/plugin",
                   help="the containers using each volume, kept across restarts (default %(default)s)")
    p.add_argument("--log-dir", default="/var/log/pxfs", help="logs of the mount daemons it starts")
    p.add_argument("--cluster", metavar="DIR", help="cluster directory (default: $PXFS_CLUSTER)")
    p.add_argument("--credential", metavar="DIR",
                   help="credential to connect with (default: $PXFS_CREDENTIAL, else CLUSTER/admin)")
    p.set_defaults(run=cmd_volume_plugin, sync=True)
