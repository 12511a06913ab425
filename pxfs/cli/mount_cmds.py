"""``pxfs mount``, ``pxfs umount`` and ``pxfs install-mount-helper``.

``pxfs mount`` forks once the arguments are checked: the child mounts and serves; the parent waits
on a pipe for "ok" or the child's error and exits 0 or 1 (mount(8) waits for its helper to exit).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import select
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from pxfs.cli.output import error, line
from pxfs.errors import Invalid, NotFound, PxfsError, Unavailable

RUN_DIR = Path("/run/pxfs/mounts")  # one registry file per mountpoint
CONTROL_DIR = Path("/run/pxfs/control")  # the daemons' control sockets (pxfs.mountctl), by pid
UMOUNT_TIMEOUT = 60.0

# Passed to the kernel/libfuse as they are.
FUSE_FLAGS = {"allow_other", "auto_unmount", "nodev", "nosuid", "noexec", "dev", "suid", "exec", "noatime",
              "atime", "relatime", "strictatime", "nodiratime", "sync", "async", "dirsync"}
# Accepted for fstab/mount(8) compatibility and ignored here.
IGNORED = {"rw", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail", "default_permissions"}


def parse_options(opts: list[str]) -> dict[str, object]:
    """Split ``-o`` options into pxfs's own and the FUSE ones; unknown options are an error."""
    from pxfs.mountd import ATTR_TIMEOUT

    out: dict[str, object] = {"fuse": set(), "ro": False, "rw": False, "cluster": None, "credential": None,
                              "attr_timeout": ATTR_TIMEOUT}
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
            elif key == "attr_timeout" and sep:
                try:
                    out["attr_timeout"] = float(value)
                except ValueError:
                    raise Invalid(f"mount option {opt!r}", "attr_timeout takes seconds, e.g. attr_timeout=1") from None
                if not 0 <= out["attr_timeout"] <= 3600:  # type: ignore[operator]
                    raise Invalid(f"mount option {opt!r}", "attr_timeout must be 0-3600 seconds")
            else:
                raise Invalid(f"mount option {opt!r}", "unknown option (pxfs: cluster=DIR, credential=DIR, ro, "
                              "attr_timeout=S; "
                              "FUSE: allow_other, nosuid, nodev, noexec, noatime, ...)")
    return out


def _registry(mountpoint: Path) -> Path:
    return RUN_DIR / (str(mountpoint).strip("/").replace("/", "_") or "root")


def _check_mountpoint(mp: Path) -> None:
    from pxfs.client.procs import holds_fuse
    from pxfs.mountd import mount_state

    try:
        state = mount_state(mp)
    except FileNotFoundError:
        raise NotFound(f"mountpoint {str(mp)!r}", "does not exist") from None
    except OSError as exc:
        raise Invalid(f"mountpoint {str(mp)!r}", exc.strerror or str(exc)) from None
    if state == "stale":
        # A mount process that died (kill -9) leaves ENOTCONN: clear it so the mount works again at once.
        subprocess.run(["umount", "-l", str(mp)], capture_output=True)
        logging.getLogger(__name__).info("cleared stale mount at %s", mp)
    elif state == "mounted":
        reg = _registry(mp)
        try:
            pid: int | None = int(json.loads(reg.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pid = None
        if pid is None or holds_fuse(pid):
            owner = f" (pxfs mount pid {pid})" if pid else ""
            raise Invalid(f"mountpoint {str(mp)!r}", f"already in use by another mount{owner}")
        # Our mount daemon is gone (or going) but the kernel still serves cached attributes: clear it.
        subprocess.run(["umount", "-l", str(mp)], capture_output=True)
        reg.unlink(missing_ok=True)
    if not mp.is_dir():
        raise Invalid(f"mountpoint {str(mp)!r}", "not a directory")


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
    _check_mountpoint(mp)
    from pxfs.cluster.config import load_config, load_credential

    load_config(args.cluster)
    load_credential(args.cluster)
    cfg = MountConfig(cluster_dir=args.cluster, volume=volume, mountpoint=mp, fuse_options=opts["fuse"],  # type: ignore[arg-type]
                      read_only=bool(opts["ro"]), attr_timeout=float(opts["attr_timeout"]))  # type: ignore[arg-type]
    log_dir = args.cluster / "logs"
    log_dir.mkdir(exist_ok=True)
    log_path = Path(args.log) if args.log else log_dir / f"mount-{volume.replace('@', '_at_')}.log"

    if args.foreground:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        cfg.control = _control_path(os.getpid())
        _write_registry(mp, os.getpid(), volume, args.cluster, cfg.control)
        try:
            trio.run(serve_mount, cfg, lambda: line(f'volume "{volume}" mounted at {mp}'))
        finally:
            _registry(mp).unlink(missing_ok=True)
        return 0

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os._exit(_child(cfg, w, log_path))
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    msg = b"".join(chunks).decode(errors="replace").strip()
    if msg == "ok":
        line(f'volume "{volume}" mounted at {mp} (pid {pid}, log {log_path})')
        return 0
    os.waitpid(pid, 0)
    error(msg or f"mount process exited before the mount was ready (see {log_path})")
    return 1


def _control_path(pid: int) -> Path:
    return CONTROL_DIR / str(pid)  # short: a Unix socket path has at most 107 bytes


def _write_registry(mp: Path, pid: int, volume: str, cluster: Path, control: Path | None) -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    _registry(mp).write_text(json.dumps({"pid": pid, "volume": volume, "cluster": str(cluster),
                                         "mountpoint": str(mp), "control": str(control or "")}))


def _child(cfg: object, w: int, log_path: Path) -> int:
    from pxfs.mountd import serve_mount

    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    os.chdir("/")
    faulthandler.enable()  # a native abort in a C library still leaves Python stacks in the log
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    reported = False

    def report(msg: str) -> None:
        nonlocal reported
        if not reported:
            reported = True
            try:
                os.write(w, msg.encode())
            finally:
                os.close(w)

    def ready() -> None:
        _write_registry(cfg.mountpoint, os.getpid(), cfg.volume, cfg.cluster_dir, cfg.control)  # type: ignore[attr-defined]
        report("ok")

    cfg.control = _control_path(os.getpid())  # type: ignore[attr-defined]

    try:
        trio.run(serve_mount, cfg, ready)
        return 0
    except PxfsError as err:
        logging.getLogger("pxfs.mount").error("%s", err)
        report(str(err))
        return 1
    except BaseException as exc:  # noqa: BLE001 - the daemon's last word goes to its log and the parent
        logging.getLogger("pxfs.mount").exception("mount failed")
        report(f'volume "{cfg.volume}": mount failed: {type(exc).__name__}: {exc}')  # type: ignore[attr-defined]
        return 1
    finally:
        _registry(cfg.mountpoint).unlink(missing_ok=True)  # type: ignore[attr-defined]


def cmd_umount(args: argparse.Namespace) -> int:
    """Flush (through the daemon's control socket), unmount, and wait for the daemon's last flush;
    non-zero whenever data write(2) accepted is not stored, which the daemon then still holds."""
    from pxfs.mountctl import ControlClient

    mp = Path(args.mountpoint).resolve()
    reg = _registry(mp)
    pid, control = None, ""
    if reg.exists():
        try:
            record = json.loads(reg.read_text())
            pid, control = int(record["pid"]), str(record.get("control") or "")
        except (ValueError, KeyError):
            pid = None
    pidfd = None
    if pid is not None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = None
    client = None
    if control and pidfd is not None:
        try:
            client = ControlClient(Path(control), pid, UMOUNT_TIMEOUT)
        except OSError as exc:  # a daemon without one (older, or it could not bind): unmount as before
            logging.getLogger(__name__).info("mount control %s: %s", control, exc)
    try:
        if client is not None:
            failure = client.flush()
            if failure is not None:
                raise Unavailable(f"mountpoint {str(mp)!r}", f"buffered writes could not be stored ({failure}); "
                                  f"still mounted, the data is kept (mount process {pid})")
        proc = subprocess.run(["umount", str(mp)], capture_output=True, text=True)
        if proc.returncode != 0:
            cause = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"umount exited {proc.returncode}"
            if "busy" in cause:
                cause = "target is busy (files are open or a process has its cwd there)"
            raise Invalid(f"mountpoint {str(mp)!r}", cause)
        if client is not None:
            failure = client.outcome()
            if failure is not None:
                raise Unavailable(f"mountpoint {str(mp)!r}", f"unmounted, but buffered writes could not be stored "
                                  f"({failure}); mount process {pid} keeps them and retries (SIGTERM gives up)")
    finally:
        if client is not None:
            client.close()
    if pidfd is not None:
        # umount returns once the kernel let go; the daemon then flushes and exits: wait for it.
        ready, _, _ = select.select([pidfd], [], [], UMOUNT_TIMEOUT)
        os.close(pidfd)
        if not ready:
            raise Unavailable(f"mount process {pid}", f"still running {UMOUNT_TIMEOUT:g}s after unmount")
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
                   help="cluster=DIR,credential=DIR,ro,allow_other,attr_timeout=S,...")
    p.add_argument("--foreground", "-f", action="store_true", help="serve in the foreground (debugging, systemd)")
    p.add_argument("--log", default="", help="daemon log file (default: CLUSTER/logs/mount-NAME.log)")
    p.set_defaults(run=cmd_mount, sync=True, optional_cluster=True)

    p = sub.add_parser("umount", help="flush and unmount a pxfs mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(run=cmd_umount, sync=True)

    p = sub.add_parser("install-mount-helper", help="install /sbin/mount.fuse.pxfs and /sbin/mount.pxfs")
    p.add_argument("--prefix", default="/sbin")
    p.set_defaults(run=cmd_install_helper, sync=True)
