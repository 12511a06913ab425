"""``pxfs mount``, ``pxfs umount`` and ``pxfs install-mount-helper``.

The mount daemon, its registry and unmounting live in ``pxfs.client.mounts``; this module parses
the arguments and prints.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from pxfs.cli.output import line
from pxfs.client import mounts
from pxfs.client.mounts import FUSE_FLAGS
from pxfs.errors import Invalid

# Accepted for fstab/mount(8) compatibility and ignored here.
IGNORED = {"rw", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail", "default_permissions"}


def parse_options(opts: list[str]) -> dict[str, object]:
    """Split ``-o`` options into pxfs's own and the FUSE ones; unknown options are an error."""
    from pxfs.mountd import ATTR_TIMEOUT, DEFAULT_HTTP, http_address

    out: dict[str, object] = {"fuse": set(), "ro": False, "rw": False, "cluster": None, "credential": None,
                              "attr_timeout": ATTR_TIMEOUT, "http": DEFAULT_HTTP}
    for group in opts:
        for opt in filter(None, group.split(",")):
            key, sep, value = opt.partition("=")
            if opt in FUSE_FLAGS:
                out["fuse"].add(opt)  # type: ignore[union-attr]
            elif opt == "ro":
                out["ro"] = True
            elif opt == "rw":
                out["rw"] = True
            elif opt in IGNORED or key.startswith("x-") or key in ("comment",):
                continue
            elif key == "cluster" and sep and value:
                out["cluster"] = value
            elif key == "credential" and sep and value:
                out["credential"] = value
            elif key == "http" and sep:
                # off: no port and no metrics kept (their cost on the request path is then nil)
                out["http"] = "" if value == "off" else value
                if value != "off":
                    http_address(value)
            elif key == "attr_timeout" and sep:
                try:
                    out["attr_timeout"] = float(value)
                except ValueError:
                    raise Invalid(f"mount option {opt!r}", "attr_timeout takes seconds, e.g. attr_timeout=1") from None
                if not 0 <= out["attr_timeout"] <= 3600:  # type: ignore[operator]
                    raise Invalid(f"mount option {opt!r}", "attr_timeout must be 0-3600 seconds")
            else:
                raise Invalid(f"mount option {opt!r}", "unknown option (pxfs: cluster=DIR, credential=DIR, ro, "
                              "attr_timeout=S, http=HOST:PORT|off; "
                              "FUSE: allow_other, nosuid, nodev, noexec, noatime, ...)")
    return out


def cmd_mount(args: argparse.Namespace) -> int:
    from pxfs.cluster.admin import check_volume_name
    from pxfs.mountd import MountConfig, serve_mount

    opts = parse_options(args.o or [])
    if opts["cluster"]:
        args.cluster = Path(str(opts["cluster"])).resolve()
    if args.cluster is None:
        raise Invalid("cluster", "no cluster directory: pass --cluster DIR, -o cluster=DIR or set PXFS_CLUSTER")
    credential = opts.get("credential") or args.credential
    if credential:
        from pxfs.cluster.config import CREDENTIAL_ENV

        os.environ[CREDENTIAL_ENV] = str(Path(str(credential)).resolve())  # the daemon inherits it
    base, at, snap = args.volume.partition("@")
    check_volume_name(base)
    if at:
        from pxfs.meta.snapshots import check_name

        check_name(base, snap)
        if opts["rw"]:
            raise Invalid(f'snapshot "{args.volume}"', "snapshots are read-only; clone it for a writable copy")
        opts["ro"] = True
    volume = args.volume
    mp = Path(args.mountpoint).resolve()
    mounts.check_mountpoint(mp)
    from pxfs.cluster.config import load_config, load_credential

    load_config(args.cluster)
    load_credential(args.cluster)
    cfg = MountConfig(cluster_dir=args.cluster, volume=volume, mountpoint=mp, fuse_options=opts["fuse"],  # type: ignore[arg-type]
                      read_only=bool(opts["ro"]), attr_timeout=float(opts["attr_timeout"]),  # type: ignore[arg-type]
                      http=str(opts["http"]))
    log_dir = args.cluster / "logs"
    log_dir.mkdir(exist_ok=True)
    log_path = Path(args.log) if args.log else log_dir / f"mount-{volume.replace('@', '_at_')}.log"

    if args.foreground:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        cfg.control = mounts.control_path(os.getpid())
        mounts.write_registry(mp, os.getpid(), volume, args.cluster, cfg.control)
        try:
            trio.run(serve_mount, cfg, lambda: line(f'volume "{volume}" mounted at {mp}'))
        finally:
            mounts.registry_path(mp).unlink(missing_ok=True)
        return 0

    pid = mounts.spawn(cfg, log_path)
    line(f'volume "{volume}" mounted at {mp} (pid {pid}, log {log_path})')
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    """Flush (through the daemon's control socket), unmount, and wait for the daemon's last flush;
    non-zero whenever data write(2) accepted is not stored, which the daemon then still holds."""
    mp = Path(args.mountpoint).resolve()
    mounts.unmount(mp)
    line(f"unmounted {mp}")
    return 0


def cmd_install_helper(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[2]
    helper = root / "mount.pxfs"
    script = ("#!/bin/sh\n# Installed by `pxfs install-mount-helper`: mount(8) clears PATH, so name the "
              f'interpreter.\nexec {sys.executable} {helper} "$@"\n')
    targets = [Path(args.prefix) / "mount.fuse.pxfs", Path(args.prefix) / "mount.pxfs"]
    for t in targets:
        tmp = t.with_suffix(".tmp")
        tmp.write_text(script)
        tmp.chmod(0o755)
        tmp.replace(t)
    line("installed " + ", ".join(str(t) for t in targets))
    return 0


def register(sub: argparse._SubParsersAction, client: Callable[[argparse.ArgumentParser], object]) -> None:
    p = sub.add_parser("mount", help="mount a volume with FUSE (returns once the mount is usable)")
    p.add_argument("volume", metavar="NAME")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--cluster", metavar="DIR")
    p.add_argument("--credential", metavar="DIR",
                   help="mount credential (default: $PXFS_CREDENTIAL, else CLUSTER/admin)")
    p.add_argument("-o", action="append", metavar="OPTIONS",
                   help="cluster=DIR,credential=DIR,ro,allow_other,attr_timeout=S,http=HOST:PORT|off "
                   "(/metrics; default 127.0.0.1, any free port),...")
    p.add_argument("--foreground", "-f", action="store_true", help="serve in the foreground (debugging, systemd)")
    p.add_argument("--log", default="", help="daemon log file (default: CLUSTER/logs/mount-NAME.log)")
    p.set_defaults(run=cmd_mount, sync=True, optional_cluster=True)

    p = sub.add_parser("umount", help="flush and unmount a pxfs mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(run=cmd_umount, sync=True)

    p = sub.add_parser("install-mount-helper", help="install /sbin/mount.fuse.pxfs and /sbin/mount.pxfs")
    p.add_argument("--prefix", default="/sbin")
    p.set_defaults(run=cmd_install_helper, sync=True)
