"""The umount <-> mount daemon line (pxfs.mountctl): a flush before the unmount, the outcome after."""

from __future__ import annotations

from pathlib import Path

import trio

from pxfs.errors import NoSpace
from pxfs.mountctl import ControlClient, ControlServer


class Flusher:
    def __init__(self) -> None:
        self.failure: NoSpace | None = None
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        if self.failure is not None:
            raise self.failure


async def test_a_failed_flush_is_the_answer_and_nothing_follows(tmp_path: Path) -> None:
    flush = Flusher()
    flush.failure = NoSpace('volume "v"', "quota: 10 + 4 bytes > capacity 12")
    server = ControlServer(flush)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, tmp_path / "c.ctl")
        client = await trio.to_thread.run_sync(ControlClient, tmp_path / "c.ctl", 42, 10.0)
        try:
            answer = await trio.to_thread.run_sync(client.flush)
        finally:
            client.close()
        assert answer is not None and "capacity 12" in answer and flush.calls == 1
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "c.ctl").exists()


async def test_after_the_unmount_the_last_flush_is_reported(tmp_path: Path) -> None:
    for final in (None, NoSpace('volume "v"', "full")):
        server = ControlServer(Flusher())
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, tmp_path / "c.ctl")
            client = await trio.to_thread.run_sync(ControlClient, tmp_path / "c.ctl", 42, 10.0)
            try:
                assert await trio.to_thread.run_sync(client.flush) is None
                # The daemon's last flush, after the kernel unmounted (umount waits for it).
                server.finished(final)
                outcome = await trio.to_thread.run_sync(client.outcome)
            finally:
                client.close()
            await server.drain()
            nursery.cancel_scope.cancel()
        assert outcome == (None if final is None else str(final))
