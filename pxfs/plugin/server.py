"""``pxfs volume-plugin``: serve the volume plugin protocol on a unix socket until signalled; the
mounts it made keep serving (a restarted plugin finds them again through the mount registry)."""

from __future__ import annotations

import logging
import signal

import trio

from pxfs.plugin.http import serve_unix
from pxfs.plugin.volumes import Plugin, PluginConfig
from pxfs.rpc.bridge import open_bridge

log = logging.getLogger(__name__)


async def serve(cfg: PluginConfig, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async with open_bridge() as bridge, trio.open_nursery() as nursery:
        plugin = Plugin(cfg, bridge)
        await nursery.start(serve_unix, cfg.socket, plugin.handle)
        log.info("volume plugin serving %s (mounts under %s)", cfg.socket, cfg.mount_root)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log.info("volume plugin stopping on %s", signal.Signals(signum).name)
                break
        nursery.cancel_scope.cancel()
