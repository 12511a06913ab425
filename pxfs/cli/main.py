"""The ``pxfs`` command: argument parsing and dispatch; failures become one line and exit code 1."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from pxfs.cli import admin_cmds, credential_cmds, local, top_cmd
from pxfs.cli.output import error
from pxfs.cluster.config import CREDENTIAL_ENV, MIN_GC_GRACE
from pxfs.errors import Invalid, PxfsError


def _client(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--cluster", metavar="DIR", help="cluster directory (default: $PXFS_CLUSTER)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--credential", metavar="DIR",
                   help="credential to connect with (default: $PXFS_CREDENTIAL, else CLUSTER/admin)")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pxfs", description="pxfs: a replicated filesystem for container clusters")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="start a local cluster of N nodes under DIR (init on first use)")
    p.add_argument("--dir", required=True)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--base-port", type=int, default=7700)
    p.add_argument("--pool-size", default="10G", help="capacity of each node's pool (default 10G)")
    p.add_argument("--name", default="")
    p.add_argument("--json", action="store_true")
    p.add_argument("--failover-after", type=float, help="seconds a coordinator may be down before failover")
    p.add_argument("--replace-after", type=float, help="seconds a replica node may be down before re-replication")
    p.add_argument("--repair-rate", help="repair throttle per coordinator, e.g. 100M (bytes/s)")
    p.add_argument("--gc-interval", type=float, help="seconds between automatic GC rounds (0: only `pxfs gc`)")
    p.add_argument("--gc-grace", type=float, help="seconds a new chunk is safe from GC (at least twice the commit "
                   f"window and 20 s: {MIN_GC_GRACE:g} for the default window)")
    p.add_argument("--commit-window", type=float, help="seconds a mount may take from its chunk puts to their "
                   "commit before it must put them again (default 60; a shorter one lets GC reclaim sooner)")
    p.add_argument("--store", help="control store of a new cluster: embedded (default), etcd (a local etcd "
                   "cluster under DIR/etcd) or etcd://HOST:PORT[,HOST:PORT...] (one run elsewhere)")
    p.add_argument("--etcd-members", type=int, help="members of the local etcd cluster (default 3)")
    p.add_argument("--etcd-base-port", type=int, help="first port of the local etcd members, two each "
                   "(default: base port + 100)")
    p.set_defaults(run=local.cmd_up, sync=True)

    p = sub.add_parser("down", help="stop the nodes of a local cluster")
    p.add_argument("--dir", required=True)
    p.set_defaults(run=local.cmd_down, sync=True)

    cl = sub.add_parser("cluster", help="cluster set-up").add_subparsers(dest="sub", required=True, metavar="SUB")
    p = cl.add_parser("init", help="new cluster: id, credential and client config in DIR")
    p.add_argument("--dir", required=True)
    p.add_argument("--name", default="")
    p.add_argument("--seed", help="address of the seed node (HOST:PORT; default 127.0.0.1:7700); with etcd "
                   "only an address clients try first")
    p.add_argument("--store", help="embedded (default: the seed holds it) or etcd://HOST:PORT[,HOST:PORT...]"
                   "[/PREFIX] (an etcd v3 cluster every node talks to)")
    p.add_argument("--etcd-ca", metavar="PEM", help="CA certificate of the etcd cluster (https)")
    p.add_argument("--etcd-cert", metavar="PEM", help="client certificate for etcd")
    p.add_argument("--etcd-key", metavar="PEM", help="key of the client certificate")
    p.add_argument("--etcd-user", help="etcd user (with --etcd-password-file)")
    p.add_argument("--etcd-password-file", metavar="FILE", help="file holding the etcd user's password")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=local.cmd_cluster_init, sync=True)
    p = _client(cl.add_parser("recover", help="rebuild volume records a lost control store no longer has, "
                                            "from the replicas the nodes hold"))
    p.set_defaults(run=admin_cmds.cmd_cluster_recover)

    nd = sub.add_parser("node", help="nodes").add_subparsers(dest="sub", required=True, metavar="SUB")
    p = nd.add_parser("start", help="run a node daemon in the foreground")
    p.add_argument("--cluster", metavar="DIR")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--pool", action="append", metavar="PATH[,size=SIZE][,class=CLASS]")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.add_argument("--id", default="")
    p.add_argument("--state", default="", help="node state directory (default: FIRST_POOL/node-state)")
    p.add_argument("--seed", action="store_true", help="hold the embedded control store")
    p.add_argument("--http", metavar="HOST:PORT", help="serve /metrics, /api/status and the cluster page here "
                   "(default: the --listen host, any free port, recorded in the cluster map; 'off': none)")
    p.add_argument("--credential", metavar="DIR", help="this node's credential (default: STATE/credential, "
                   "issued at first start when the cluster directory holds the CA key)")
    p.set_defaults(run=local.cmd_node_start, sync=True, needs_cluster=True)
    p = _client(nd.add_parser("list", help="nodes, addresses, labels, up/down"))
    p.set_defaults(run=admin_cmds.cmd_node_list)

    p = _client(sub.add_parser("status", help="cluster health"))
    p.set_defaults(run=admin_cmds.cmd_status)
    pl = sub.add_parser("pool", help="pools").add_subparsers(dest="sub", required=True, metavar="SUB")
    _client(pl.add_parser("list", help="pools with capacity, used, free")).set_defaults(run=admin_cmds.cmd_pool_list)

    vol = sub.add_parser("volume", help="volumes").add_subparsers(dest="sub", required=True, metavar="SUB")
    p = _client(vol.add_parser("create", help="create a volume"))
    p.add_argument("name")
    p.add_argument("--size", required=True)
    p.add_argument("--repl", type=int, default=1)
    p.add_argument("--block-size", default="")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.add_argument("--min-replicas", type=int, default=1,
                   help="acknowledge writes only while this many replicas are in sync (default 1)")
    p.add_argument("--max-inodes", type=int, default=0, metavar="N",
                   help="files, directories and symlinks it may hold (default: one per 4K of its size)")
    p.set_defaults(run=admin_cmds.cmd_volume_create)
    p = _client(vol.add_parser("promote", help="make a replica coordinator when no in-sync replica returns"))
    p.add_argument("name")
    p.add_argument("node")
    p.add_argument("--accept-data-loss", action="store_true",
                   help="required: writes acknowledged while NODE was out of sync are given up")
    p.set_defaults(run=admin_cmds.cmd_volume_promote)
    _client(vol.add_parser("list", help="list volumes")).set_defaults(run=admin_cmds.cmd_volume_list)
    p = _client(vol.add_parser("inspect", help="one volume in detail"))
    p.add_argument("name")
    p.set_defaults(run=admin_cmds.cmd_volume_inspect)
    p = _client(vol.add_parser("resize", help="change a volume's size (its quota) or inode limit"))
    p.add_argument("name")
    p.add_argument("--size", default="", help="new size (default: unchanged)")
    p.add_argument("--max-inodes", type=int, default=0, metavar="N", help="new inode limit (default: unchanged)")
    p.set_defaults(run=admin_cmds.cmd_volume_resize)
    p = _client(vol.add_parser("delete", help="delete a volume"))
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="even while mounted")
    p.set_defaults(run=admin_cmds.cmd_volume_delete)

    p = _client(vol.add_parser("ha-update", help="change the replication factor of a live volume"))
    p.add_argument("name")
    p.add_argument("--repl", type=int, required=True)
    p.add_argument("--wait", action="store_true", help="wait until the new replicas are complete")
    p.set_defaults(run=admin_cmds.cmd_volume_ha_update)
    p = _client(vol.add_parser("repair", help="check every replica's chunks now and copy what is missing"))
    p.add_argument("name")
    p.add_argument("--wait", action="store_true", help="show progress until the volume is healthy")
    p.set_defaults(run=admin_cmds.cmd_volume_repair)
    p = _client(nd.add_parser("remove", help="take a node out for good; its replicas move elsewhere"))
    p.add_argument("id")
    p.add_argument("--force", action="store_true", help="even if it holds the only copy of a volume")
    p.set_defaults(run=admin_cmds.cmd_node_remove)

    from pxfs.cli import gc_cmd, scrub_cmd, snapshot_cmds

    gc_cmd.register(sub, _client)

    snapshot_cmds.register(sub, vol, _client)

    p = _client(sub.add_parser("scrub", help="verify every chunk of a volume or node; heal; report what is lost"))
    p.add_argument("volume", nargs="?", default="")
    p.add_argument("--node", default="")
    p.add_argument("--timeout", type=float, default=3600)
    p.set_defaults(run=scrub_cmd.cmd_scrub)

    from pxfs.cli import fsck_cmd

    p = _client(sub.add_parser("fsck", help="check a volume's metadata against itself and its chunks"))
    p.add_argument("volume")
    p.add_argument("--repair", action="store_true", help="fix what is safe (one replicated batch)")
    p.set_defaults(run=fsck_cmd.cmd_fsck)

    credential_cmds.register(sub, _client)
    top_cmd.register(sub, _client)
    from pxfs.cli import driver_cmds

    driver_cmds.register(sub)
    _extend(sub, _client)
    return ap


def _extend(sub: argparse._SubParsersAction, client: Callable) -> None:
    """Commands of the FUSE layer (mount, umount, install-mount-helper), when present."""
    try:
        from pxfs.cli import mount_cmds
    except ImportError:
        return
    mount_cmds.register(sub, client)
    from pxfs.cli import bench_cmd

    bench_cmd.register(sub, client)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "cluster") and not isinstance(args.cluster, Path):
            value = args.cluster or os.environ.get("PXFS_CLUSTER")
            if not value and getattr(args, "optional_cluster", False):
                args.cluster = None
            elif not value:
                raise Invalid("cluster", "no cluster directory: pass --cluster DIR or set PXFS_CLUSTER")
            else:
                args.cluster = Path(value).resolve()
        if getattr(args, "credential", None) and getattr(args, "command", "") != "node":
            # Through the environment: a mount daemon started from here uses the same credential.
            os.environ[CREDENTIAL_ENV] = str(Path(args.credential).resolve())
        if getattr(args, "sync", False):
            return args.run(args)
        return trio.run(args.run, args)
    except PxfsError as err:
        error(str(err))
        return 1
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
