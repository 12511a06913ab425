"""Ships a coordinator's metadata batches to its followers, in sequence order, one task per follower.

Every follower gets every batch, but ``wait_acked`` waits only for the followers in the in-sync set
(``in_sync``, kept by ``pxfs.volume.insync.InSync``): it returns those that did not acknowledge in
time, and the coordinator must take them out of the set (compare-and-swap on the volume's record)
before it may acknowledge without them. A follower out of the set is caught up from the log in the
background and rejoins once it holds everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import blake3
import trio

from pxfs.errors import Conflict, PxfsError
from pxfs.meta.kv import KV

log = logging.getLogger(__name__)

ACK_TIMEOUT = 5.0
GROUP_BATCHES = 1024  # per replication call
GROUP_BYTES = 8 << 20
RETRY_MAX = 2.0


def _groups(entries: list[tuple[int, bytes]]) -> Iterator[tuple[int, list[bytes]]]:
    """Consecutive log entries in runs of at most GROUP_BATCHES batches and about GROUP_BYTES bytes."""
    run: list[bytes] = []
    first = size = 0
    for seq, batch in entries:
        if run and (len(run) >= GROUP_BATCHES or size + len(batch) > GROUP_BYTES):
            yield first, run
            run, size = [], 0
        if not run:
            first = seq
        run.append(batch)
        size += len(batch)
    if run:
        yield first, run


class Replicator:
    def __init__(self, volume: str, kv: KV, epoch: int, followers: list[str], peers: Any,
                 on_caught_up: Callable[[str], None] | None = None) -> None:
        self.volume, self.kv, self.epoch, self.followers = volume, kv, epoch, list(followers)
        self._peers = peers
        self._on_caught_up = on_caught_up
        self.acked: dict[str, int | None] = {f: None for f in followers}
        self.lagging: set[str] = set()  # unreachable or refusing: shown by inspect
        self.in_sync: set[str] = set(followers)  # the followers wait_acked waits for
        # Followers whose last call failed (refused, reset, unreachable): a wait does not sit out
        # its whole timeout for them, the answer is already in.
        self.failing: set[str] = set()
        self._kick = trio.Event()
        self._progress = trio.Event()
        self._scope = trio.CancelScope()
        self.deposed = False

    def stop(self) -> None:
        self._scope.cancel()

    async def run(self) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                for f in self.followers:
                    nursery.start_soon(self._follow, f)

    def _notify_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _follow(self, follower: str) -> None:
        delay = 0.05
        while True:
            try:
                if self.acked[follower] is None:
                    seq, epoch, last_hash = await self._peers.last_seq(follower, self.volume)
                    if epoch > self.epoch:
                        self.deposed = True
                        log.warning("volume=%s follower=%s is at epoch %d > ours %d: deposed",
                                    self.volume, follower, epoch, self.epoch)
                        self._notify_progress()
                        return
                    if self._diverged(seq, last_hash):
                        await self._peers.reset(follower, self.volume, self.epoch)
                        seq = 0
                    self.acked[follower] = seq
                    self.failing.discard(follower)
                    self._notify_progress()
                acked = self.acked[follower]
                assert acked is not None
                if acked >= self.kv.seq:
                    if follower in self.lagging:
                        self.lagging.discard(follower)
                        log.info("volume=%s follower=%s caught up at seq %d", self.volume, follower, acked)
                        if self._on_caught_up is not None:
                            self._on_caught_up(follower)
                    kick = self._kick
                    await kick.wait()
                    continue
                for first, batches in _groups(self.kv.log_since(acked)):
                    last = first + len(batches) - 1
                    got = await self._peers.apply_many(follower, self.volume, self.epoch, first, batches)
                    self.acked[follower] = got
                    self._notify_progress()
                    if got != last:
                        break
                delay = 0.05
            except Conflict as err:
                # Typically a newer epoch at the follower: this coordinator must stop writing.
                log.warning("volume=%s follower=%s refused: %s", self.volume, follower, err)
                self.lagging.add(follower)
                self.acked[follower] = None
                self._notify_progress()
                await trio.sleep(RETRY_MAX)
            except PxfsError as err:
                if follower not in self.lagging:
                    log.warning("volume=%s follower=%s unreachable, volume degraded: %s", self.volume, follower, err)
                self.lagging.add(follower)
                self.failing.add(follower)
                self.acked[follower] = None
                self._notify_progress()
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    def _diverged(self, seq: int, last_hash: bytes) -> bool:
        """True when the follower holds a batch we do not: a tail written under an older coordinator."""
        if seq == 0:
            return False
        if seq > self.kv.seq:
            return True
        ours = self.kv.log_entry(seq)
        return ours is None or blake3.blake3(ours).digest() != last_hash

    async def wait_acked(self, seq: int, timeout: float = ACK_TIMEOUT) -> set[str]:
        """Wait up to ``timeout`` for every in-sync follower to hold ``seq``; returns those that do not
        (the caller takes them out of the in-sync set before it acknowledges)."""
        self._kick.set()
        self._kick = trio.Event()

        def pending() -> set[str]:
            return {f for f in self.followers if f in self.in_sync and (self.acked[f] or 0) < seq}

        with trio.move_on_after(timeout):
            while pending() - self.failing and not self.deposed:
                await self._progress.wait()
        slow = pending()
        for f in slow:
            log.warning("volume=%s follower=%s did not acknowledge seq %d within %gs", self.volume, f, seq, timeout)
            self.lagging.add(f)
        return slow

    async def reach(self, follower: str, seq: int, timeout: float = ACK_TIMEOUT) -> bool:
        """Wait until ``follower`` holds ``seq``; False if it does not within ``timeout``."""
        self._kick.set()
        self._kick = trio.Event()
        with trio.move_on_after(timeout):
            while (self.acked.get(follower) or 0) < seq and not self.deposed:
                await self._progress.wait()
        return (self.acked.get(follower) or 0) >= seq

    def set_in_sync(self, followers: set[str]) -> None:
        self.in_sync = set(followers)
        self._notify_progress()  # a waiter whose slow follower just left the set may go on
