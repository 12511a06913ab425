"""Mounts on this host: spawn a mount daemon and wait until it serves, its registry, unmount.

Each mount daemon (``pxfs.mountd``) is its own session leader and outlives whoever started it; the
registry (one JSON file per mountpoint under ``RUN_DIR``) says which daemon serves which mountpoint,
of which volume and cluster, and where its control socket is (``pxfs.mountctl``). ``spawn`` forks
once the arguments are checked: the child mounts and serves; the parent waits on a pipe for "ok" or
the child's error (mount(8) waits for its helper to exit).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from pxfs.errors import Invalid, NotFound, PxfsError, Unavailable

if TYPE_CHECKING:  # the daemon (pyfuse3) is imported only where a mount is made
    from pxfs.mountd import MountConfig

RUN_DIR = Path("/run/pxfs/mounts")  # one registry file per mountpoint
CONTROL_DIR = Path("/run/pxfs/control")  # the daemons' control sockets (pxfs.mountctl), by pid
UMOUNT_TIMEOUT = 60.0


def registry_path(mountpoint: Path) -> Path:
    return RUN_DIR / (str(mountpoint).strip("/").replace("/", "_") or "root")


def check_mountpoint(mp: Path) -> None:
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
        reg = registry_path(mp)
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


def control_path(pid: int) -> Path:
    return CONTROL_DIR / str(pid)  # short: a Unix socket path has at most 107 bytes


def write_registry(mp: Path, pid: int, volume: str, cluster: Path, control: Path | None) -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    registry_path(mp).write_text(json.dumps({"pid": pid, "volume": volume, "cluster": str(cluster),
                                             "mountpoint": str(mp), "control": str(control or "")}))


def spawn(cfg: MountConfig, log_path: Path) -> int:
    """Fork the mount daemon and return its pid once the mount is usable; its error otherwise."""
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
        return pid
    os.waitpid(pid, 0)
    raise PxfsError("", msg or f"mount process exited before the mount was ready (see {log_path})")


def _child(cfg: MountConfig, w: int, log_path: Path) -> int:
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
        write_registry(cfg.mountpoint, os.getpid(), cfg.volume, cfg.cluster_dir, cfg.control)
        report("ok")

    cfg.control = control_path(os.getpid())

    try:
        trio.run(serve_mount, cfg, ready)
        return 0
    except PxfsError as err:
        logging.getLogger("pxfs.mount").error("%s", err)
        report(str(err))
        return 1
    except BaseException as exc:  # noqa: BLE001 - the daemon's last word goes to its log and the parent
        logging.getLogger("pxfs.mount").exception("mount failed")
        report(f'volume "{cfg.volume}": mount failed: {type(exc).__name__}: {exc}')
        return 1
    finally:
        registry_path(cfg.mountpoint).unlink(missing_ok=True)


def unmount(mp: Path) -> None:
    """Flush (through the daemon's control socket), unmount, and wait for the daemon's last flush;
    raises whenever data write(2) accepted is not stored, which the daemon then still holds."""
    from pxfs.mountctl import ControlClient

    reg = registry_path(mp)
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
