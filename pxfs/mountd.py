"""The mount daemon: one FUSE mount of one volume, wired to the cluster (like ``node.py`` for nodes).

It finds the volume through any node, opens it at the coordinator (``Volume`` RPC: the vfs layer's
MetaPort), reaches the replicas' chunk stores (``ReplicaChunks``: the ChunkPort), mounts with
pyfuse3 and serves until the kernel unmounts it or SIGTERM arrives; either way, it flushes every
buffered write before it exits, and while that fails it stays and retries. ``pxfs umount`` asks it
to flush before unmounting (``pxfs.mountctl``), so a flush that fails leaves the mount in place.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from pxfs.cluster.config import load_credential
from pxfs.cluster.volume_session import VolumeSession
from pxfs.errors import Invalid, PxfsError
from pxfs.fuse.operations import Operations
from pxfs.mountctl import ControlServer
from pxfs.observe import metrics, web
from pxfs.rpc.bridge import open_bridge
from pxfs.vfs.vfs import Vfs

log = logging.getLogger(__name__)

KEEPALIVE_INTERVAL = 5.0
# The kernel may answer stat and lookups from its cache this long. The coordinator tells every mount
# what the others change (Watcher), so this only bounds staleness when such a callback is lost.
ATTR_TIMEOUT = 30.0
READ_AHEAD_KB = 4096
FLUSH_RETRY = 5.0  # seconds between flushes of data left after the unmount
DEFAULT_HTTP = "127.0.0.1:0"  # loopback: a mount's port is for this host's scraper, not the network


@dataclass
class MountConfig:
    cluster_dir: Path
    volume: str
    mountpoint: Path
    fuse_options: set[str] = field(default_factory=set)
    read_only: bool = False
    attr_timeout: float = ATTR_TIMEOUT
    control: Path | None = None  # the Unix socket ``pxfs umount`` talks to (pxfs.mountctl)
    # HOST:PORT of the mount's /metrics and /api/status (port 0: any free one); "": none, and no
    # metrics are kept at all (``-o http=off``)
    http: str = DEFAULT_HTTP


def _raise_readahead(mountpoint: Path) -> None:
    """Let the kernel send 1 MiB+ reads (default readahead gives 128 KiB requests)."""
    dev = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        path.write_text(str(READ_AHEAD_KB))
    except OSError as exc:
        log.info("mount=%s readahead unchanged: %s", mountpoint, exc)


Gauge = tuple[str, str, list[str], list[tuple[list[str], float]]]


def mount_gauges(cfg: MountConfig, vfs: Vfs) -> list[Gauge]:
    """Scrape-time values of this mount, read from the vfs (which knows nothing of Prometheus)."""
    wb, cache = vfs.writeback, vfs.cache
    return [
        ("pxfs_mount_info", "The volume this mount serves, and where", ["volume", "mountpoint"],
         [([cfg.volume, str(cfg.mountpoint)], 1.0)]),
        ("pxfs_writeback_dirty_bytes", "Bytes written but not yet stored on the replicas (buffered and in flight)",
         [], [([], wb.dirty_bytes + wb.flying_bytes)]),
        ("pxfs_writeback_limit_bytes", "Write-back buffer bound: writers wait beyond it", [], [([], wb.limit)]),
        ("pxfs_read_cache_bytes", "Bytes of chunks in the mount's read cache", [], [([], cache.size)]),
        ("pxfs_read_cache_total", "Chunks that reads needed, found in the read cache (hit) or fetched (miss)",
         ["result"], [(["hit"], cache.hits), (["miss"], cache.misses)]),
    ]


async def mount_status(cfg: MountConfig, session: VolumeSession, vfs: Vfs) -> dict[str, Any]:
    """The mount's ``/api/status``: which volume, at which coordinator, what it holds in memory."""
    info = session.info
    wb, cache = vfs.writeback, vfs.cache
    return {"volume": cfg.volume, "mountpoint": str(cfg.mountpoint), "read_only": cfg.read_only,
            "mount_id": session.mount_id, "coordinator": info.coordinator if info else "",
            "epoch": info.epoch if info else 0, "replicas": list(info.replicas) if info else [],
            "writeback": {"dirty_bytes": wb.dirty_bytes, "flying_bytes": wb.flying_bytes, "limit": wb.limit},
            "read_cache": {"bytes": cache.size, "hits": cache.hits, "misses": cache.misses}}


def http_address(value: str) -> tuple[str, int]:
    """``-o http=HOST:PORT`` (port 0: any free one) as (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise Invalid(f"mount option http={value}", "expected HOST:PORT (port 0: any free port) or off")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _listen(cfg: MountConfig) -> tuple[list[trio.SocketListener], str]:
    """Bound before the volume is opened, so that the registration names the port; served once mounted."""
    if not cfg.http:
        return [], ""
    try:
        return await web.listen(*http_address(cfg.http))
    except OSError as exc:
        raise PxfsError(f"mount option http={cfg.http}", f"cannot listen: {exc.strerror or exc}") from None


async def serve_mount(cfg: MountConfig, ready: Callable[[], None]) -> None:
    """Mount, call ``ready()`` once the mount exists, serve until unmounted or signalled."""
    credential = load_credential(cfg.cluster_dir)
    mount_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    listeners, http = await _listen(cfg)
    async with open_bridge() as bridge:
        session = VolumeSession(bridge, cfg.cluster_dir, credential, cfg.volume, mount_id, cfg.read_only)
        session.http = http  # registered with the coordinator: `pxfs volume inspect` shows it
        try:
            await session.connect()
            assert session.info is not None and session.chunks is not None
            info = session.info
            vfs = Vfs(session, session.chunks, info.block_size)
            if http:
                metrics.register(partial(mount_gauges, cfg, vfs))
            ops = Operations(vfs, attr_timeout=cfg.attr_timeout, entry_timeout=cfg.attr_timeout,
                             read_only=cfg.read_only, op_timer=metrics.fuse_op_timer() if http else None)
            session.on_invalidate = ops.invalidate

            def reconnected() -> None:
                vfs.forget_caches()
                ops.forget_attributes()

            session.on_reconnect = reconnected
            options = set(cfg.fuse_options) | {f"fsname={cfg.volume}", "subtype=pxfs", "default_permissions"}
            if cfg.read_only:
                options.add("ro")
            try:
                pyfuse3.init(ops, str(cfg.mountpoint), options)
            except RuntimeError as exc:
                raise PxfsError(f"mountpoint {str(cfg.mountpoint)!r}", f"FUSE mount failed: {exc}") from None
            control = ControlServer(vfs.close)
            async with trio.open_nursery() as outer:  # the control socket outlives the mount
                if listeners:
                    outer.start_soon(web.serve_on, listeners,
                                     {"/api/status": web.json_page(partial(mount_status, cfg, session, vfs))})
                    log.info("volume=%s http=%s (/metrics, /api/status)", cfg.volume, http)
                if cfg.control is not None:
                    try:
                        await outer.start(control.serve, cfg.control)
                    except OSError as exc:  # umount then unmounts without asking for a flush first
                        log.warning("volume=%s no control socket at %s: %s", cfg.volume, cfg.control, exc)
                unmount = True
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(vfs.run)

                        async def keepalive() -> None:
                            while True:
                                await trio.sleep(KEEPALIVE_INTERVAL)
                                try:
                                    await session.refresh()
                                except PxfsError as err:
                                    log.warning("volume=%s keepalive failed: %s", cfg.volume, err)

                        async def on_signal() -> None:
                            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                                async for signum in signals:
                                    log.info("volume=%s stopping on %s", cfg.volume, signal.Signals(signum).name)
                                    pyfuse3.terminate()
                                    return

                        async def after_init() -> None:
                            # The first stat completes only once the kernel's INIT handshake is done;
                            # readahead set before it would be reset (notes: pyfuse3 pitfall 8).
                            await trio.to_thread.run_sync(_raise_readahead, cfg.mountpoint)

                        nursery.start_soon(keepalive)
                        nursery.start_soon(session.send_releases)
                        nursery.start_soon(on_signal)
                        nursery.start_soon(after_init)
                        ready()
                        log.info("volume=%s mounted at %s (coordinator %s, replicas %s)", cfg.volume,
                                 cfg.mountpoint, info.coordinator, ",".join(info.replicas))
                        await pyfuse3.main()
                        # main() returns on terminate() (we unmount) or when the kernel unmounted us.
                        unmount = os.path.ismount(cfg.mountpoint)
                        nursery.cancel_scope.cancel()
                finally:
                    with trio.CancelScope(shield=True):
                        failure = await _flush(vfs, cfg.volume)
                        control.finished(failure)
                        pyfuse3.close(unmount=unmount)
                        if failure is not None:
                            await _keep_flushing(vfs, cfg.volume)
                        await control.drain()
                    outer.cancel_scope.cancel()
        finally:
            for listener in listeners:  # serve_on closed them if it ran; a failed mount never served
                await listener.aclose()
            await session.close()


async def _flush(vfs: Vfs, volume: str) -> PxfsError | None:
    try:
        await vfs.close()
    except PxfsError as err:
        log.error("volume=%s buffered writes could not be flushed at unmount: %s", volume, err)
        return err
    return None


async def _keep_flushing(vfs: Vfs, volume: str) -> None:
    """The kernel let go but data write(2) accepted is still here: keep it and retry until it is
    stored, or until a signal says to give up (then it is lost, and the log says so)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        while True:
            with trio.move_on_after(FLUSH_RETRY):
                async for signum in signals:
                    log.error("volume=%s stopping on %s with buffered writes not stored", volume,
                              signal.Signals(signum).name)
                    return
            if await _flush(vfs, volume) is None:
                log.info("volume=%s buffered writes stored after the unmount", volume)
                return


def mount_state(mountpoint: Path) -> str:
    """``free``, ``mounted`` or ``stale`` (a dead FUSE daemon left ENOTCONN behind)."""
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return "stale"
        raise
    return "mounted" if os.path.ismount(mountpoint) else "free"
