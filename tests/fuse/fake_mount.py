"""Mount ``Operations`` over the in-process fakes: ``python -m tests.fuse.fake_mount MOUNTPOINT``.

pyfuse3 allows one mount per process, so tests run this in a subprocess. It prints ``ready`` once
the kernel has finished the INIT handshake (a stat of the mountpoint from another thread answered),
and unmounts cleanly either way a mount ends: ``fusermount3 -u`` from outside (``main()`` returns,
the kernel has already unmounted) or SIGTERM/SIGINT (terminate, then unmount ourselves).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import pyfuse3
import trio

from pxfs.fuse.operations import Operations
from pxfs.vfs.vfs import Vfs
from tests.vfs.fakes import FakeChunks, FakeMeta

log = logging.getLogger("tests.fuse.fake_mount")

MOUNT_OPTIONS = {"fsname=pxfs-test", "subtype=pxfs", "default_permissions"}


async def _announce(mountpoint: str) -> None:
    # Never touch the mount from the trio thread that serves it (it would deadlock): use a worker.
    await trio.to_thread.run_sync(os.stat, mountpoint)
    print("ready", flush=True)


async def _on_signal(stopped: list[bool]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            stopped.append(True)
            pyfuse3.terminate()
            return


async def serve(vfs: Vfs, mountpoint: str, stopped: list[bool]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(vfs.run)
        nursery.start_soon(_on_signal, stopped)
        nursery.start_soon(_announce, mountpoint)
        await pyfuse3.main()
        await vfs.close()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mountpoint")
    parser.add_argument("--block-size", type=int, default=128 << 10)
    parser.add_argument("--capacity", type=int, default=64 << 20)
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--allow-other", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    vfs = Vfs(FakeMeta(args.capacity, args.block_size), FakeChunks(), args.block_size)
    ops = Operations(vfs, read_only=args.read_only)
    stopped: list[bool] = []
    pyfuse3.init(ops, args.mountpoint, MOUNT_OPTIONS | ({"allow_other"} if args.allow_other else set()))
    unmounted_outside = False
    try:
        trio.run(serve, vfs, args.mountpoint, stopped)
        unmounted_outside = not stopped
    finally:
        # After fusermount3 -u the kernel has unmounted already; after a signal or a crash it is ours.
        pyfuse3.close(unmount=not unmounted_outside)
    return 0


if __name__ == "__main__":
    sys.exit(main())
