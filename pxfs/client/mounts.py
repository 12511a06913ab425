"""Mounts on this host: spawn a mount daemon and wait until it serves, its registry, unmount.

Each mount daemon (``pxfs.mountd``) is its own session leader and outlives whoever started it; the
registry (one JSON file per mountpoint under ``RUN_DIR``) says which daemon serves which mountpoint,
of which volume and cluster, and where its control socket is (``pxfs.mountctl``). ``spawn`` starts
the daemon once the arguments are checked and waits on a pipe for "ok" or the daemon's error
(mount(8) waits for its helper to exit).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from pxfs.errors import Invalid, NotFound, PxfsError, Unavailable

if TYPE_CHECKING:  # the daemon (pyfuse3) is imported only where a mount is made
    from pxfs.mountd import MountConfig

RUN_DIR = Path("/run/pxfs/mounts")  # one registry file per mountpoint
CONTROL_DIR = Path("/run/pxfs/control")  # the daemons' control sockets (pxfs.mountctl), by pid
UMOUNT_TIMEOUT = 60.0
# Passed to the kernel/libfuse as they are.
FUSE_FLAGS = {"allow_other", "auto_unmount", "nodev", "nosuid", "noexec", "dev", "suid", "exec", "noatime",
              "atime", "relatime", "strictatime", "nodiratime", "sync", "async", "dirsync"}


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


@dataclass
class MountRecord:
    """One registry entry: the daemon ``pid`` serves ``volume`` of ``cluster`` at ``mountpoint``."""

    pid: int
    volume: str
    cluster: Path
    mountpoint: Path
    control: Path | None

    def serving(self) -> bool:
        """The daemon still has /dev/fuse open and the kernel still has the mount."""
        from pxfs.client.procs import holds_fuse

        return holds_fuse(self.pid) and os.path.ismount(self.mountpoint)


def read_registry(mp: Path) -> MountRecord | None:
    return _record(registry_path(mp))


def _record(reg: Path) -> MountRecord | None:
    try:
        d = json.loads(reg.read_text())
        return MountRecord(int(d["pid"]), str(d["volume"]), Path(d["cluster"]), Path(d["mountpoint"]),
                           Path(d["control"]) if d.get("control") else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def registered(cluster: Path | None = None) -> list[MountRecord]:
    """Every mount this host's registry holds (of ``cluster`` when given), by mountpoint."""
    out = []
    for reg in sorted(RUN_DIR.iterdir()) if RUN_DIR.exists() else []:
        rec = _record(reg)
        if rec is not None and (cluster is None or rec.cluster == cluster):
            out.append(rec)
    return out


def mount(cluster: Path, volume: str, mountpoint: Path, read_only: bool = False,
          fuse_options: set[str] | None = None, attr_timeout: float | None = None, log_path: Path | None = None,
          env: dict[str, str] | None = None) -> MountRecord:
    """Mount ``volume`` at ``mountpoint`` in a daemon of its own and return once it serves (a dead
    mount left there is cleared first; a live one is an error)."""
    from pxfs.cluster.config import load_config
    from pxfs.mountd import ATTR_TIMEOUT, MountConfig

    mp = mountpoint.resolve()
    check_mountpoint(mp)
    load_config(cluster)
    cfg = MountConfig(cluster_dir=cluster, volume=volume, mountpoint=mp, fuse_options=set(fuse_options or ()),
                      read_only=read_only, attr_timeout=ATTR_TIMEOUT if attr_timeout is None else attr_timeout)
    if log_path is None:
        log_dir = cluster / "logs"
        log_dir.mkdir(exist_ok=True)
        log_path = log_dir / f"mount-{volume.replace('@', '_at_')}.log"
    pid = spawn(cfg, log_path, env)
    return MountRecord(pid, volume, cluster, mp, control_path(pid))


def control_path(pid: int) -> Path:
    return CONTROL_DIR / str(pid)  # short: a Unix socket path has at most 107 bytes


def write_registry(mp: Path, pid: int, volume: str, cluster: Path, control: Path | None) -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    registry_path(mp).write_text(json.dumps({"pid": pid, "volume": volume, "cluster": str(cluster),
                                             "mountpoint": str(mp), "control": str(control or "")}))


def spawn(cfg: MountConfig, log_path: Path, env: dict[str, str] | None = None, timeout: float = 120.0) -> int:
    """Start the mount daemon (``pxfs.client.mount_main``) and return its pid once the mount is
    usable; raise its error otherwise. It is a fresh process (fork and exec, so that a caller with
    threads, such as the CSI driver, can spawn safely) that detaches at once: it outlives the caller
    and is never the caller's child to reap."""
    r, w = os.pipe()
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            argv = [sys.executable, "-m", "pxfs.client.mount_main", "--ready-fd", str(w), json.dumps(config_json(cfg))]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, cwd="/", pass_fds=(w,),
                                    start_new_session=True, env=_same_code(env))
        finally:
            os.close(fd)
        os.close(w)
        w = -1
        proc.wait()  # the first process only forks the daemon off and exits
        msg = _read_all(r, timeout, cfg)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    word, _, pid = msg.partition(" ")
    if word == "ok" and pid.isdigit():
        return int(pid)
    raise PxfsError("", msg or f"mount process exited before the mount was ready (see {log_path})")


def _same_code(env: dict[str, str] | None) -> dict[str, str]:
    """The daemon imports the pxfs its caller runs, wherever that came from (mount(8) runs its
    helper with an empty environment, and cwd "/" of the daemon finds no checkout)."""
    import pxfs

    out = dict(os.environ if env is None else env)
    root = str(Path(pxfs.__file__).resolve().parents[1])
    out["PYTHONPATH"] = os.pathsep.join(p for p in (root, out.get("PYTHONPATH", "")) if p)
    return out


def _read_all(r: int, timeout: float, cfg: MountConfig) -> str:
    chunks = []
    while True:
        ready, _, _ = select.select([r], [], [], timeout)
        if not ready:
            raise Unavailable(f'volume "{cfg.volume}"', f"mount at {cfg.mountpoint} not ready after {timeout:g}s")
        data = os.read(r, 4096)
        if not data:
            return b"".join(chunks).decode(errors="replace").strip()
        chunks.append(data)


def config_json(cfg: MountConfig) -> dict[str, object]:
    return {"cluster_dir": str(cfg.cluster_dir), "volume": cfg.volume, "mountpoint": str(cfg.mountpoint),
            "fuse_options": sorted(cfg.fuse_options), "read_only": cfg.read_only, "attr_timeout": cfg.attr_timeout,
            "http": cfg.http}


def config_from(data: dict[str, object]) -> MountConfig:
    from pxfs.mountd import DEFAULT_HTTP, MountConfig

    return MountConfig(cluster_dir=Path(str(data["cluster_dir"])), volume=str(data["volume"]),
                       mountpoint=Path(str(data["mountpoint"])),
                       fuse_options=set(data.get("fuse_options") or []),  # type: ignore[call-overload]
                       read_only=bool(data.get("read_only")), attr_timeout=float(data["attr_timeout"]),  # type: ignore[arg-type]
                       http=str(data.get("http", DEFAULT_HTTP)))


def serve_detached(cfg: MountConfig, w: int) -> int:
    """The daemon's side of ``spawn``: serve the mount, telling ``w`` "ok PID" once it is usable or
    the error that stopped it; its registry entry lives as long as it serves."""
    from pxfs.mountd import serve_mount

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
        report(f"ok {os.getpid()}")

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
