"""Ships a coordinator's metadata batches to its followers, in sequence order, one task per follower.

Every follower gets every batch, but ``wait_acked`` waits only for the followers in the in-sync set
(``in_sync``, kept by ``pxfs.volume.insync.InSync``): it returns those that did not acknowledge in
time, and the coordinator must take them out of the set (compare-and-swap on the volume's record)
before it may acknowledge without them. A follower out of the set is caught up from the log in the
background and rejoins once it holds everything.

The log is trimmed (``trim``) once every in-sync follower holds a batch, keeping the entry each of
them stands at (histories are compared by it) and, for followers out of the set, at most
``LOG_SLACK_ENTRIES`` / ``LOG_SLACK_BYTES`` more. A follower that comes back behind the trimmed
point gets a full copy (``pxfs.volume.transfer``); while one is sent the log keeps what it will need
next. Followers drop what the coordinator dropped: each replication call says how far that is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import blake3
import trio

from pxfs.errors import Conflict, PxfsError
from pxfs.meta.kv import KV
from pxfs.volume.transfer import CopyView

log = logging.getLogger(__name__)

ACK_TIMEOUT = 5.0
GROUP_BATCHES = 1024  # per replication call
GROUP_BYTES = 8 << 20
RETRY_MAX = 2.0
LOG_SLACK_ENTRIES = 1024  # kept for a follower out of the in-sync set, rather than a full copy
LOG_SLACK_BYTES = 8 << 20
TRIM_EVERY = 64  # batches between trims while writes go on (a trim is a write of its own)
IDLE_TRIM = 1.0  # seconds without a write after which the log is trimmed to the in-sync set
LOADING = b"loading"  # lastSeq's hash of a replica holding half a full copy


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
                 on_caught_up: Callable[[str], None] | None = None,
                 copy_view: Callable[[], CopyView] | None = None) -> None:
        self.volume, self.kv, self.epoch, self.followers = volume, kv, epoch, list(followers)
        self._peers = peers
        self._on_caught_up = on_caught_up
        self._copy_view = copy_view  # None: no full copies (a follower behind the trim stays behind)
        self.acked: dict[str, int | None] = {f: None for f in followers}
        self._told: dict[str, int] = dict.fromkeys(followers, 0)  # the trim point each follower last heard
        self._holds: dict[str, int] = {}  # follower -> seq a full copy to it stands at: not trimmed past
        self.copies = 0  # full copies sent (inspect, tests)
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
                if acked < self.kv.trimmed and self._copy_view is not None:
                    await self._copy(follower)
                    continue
                if acked >= self.kv.seq:
                    if follower in self.lagging:
                        self.lagging.discard(follower)
                        log.info("volume=%s follower=%s caught up at seq %d", self.volume, follower, acked)
                        if self._on_caught_up is not None:
                            self._on_caught_up(follower)
                    kick = self._kick
                    with trio.move_on_after(IDLE_TRIM):
                        await kick.wait()
                    if kick.is_set():
                        continue
                    # Nothing written for a while: trim all the in-sync set holds, and tell the
                    # follower, whose log shrinks with ours, even without a batch to carry it.
                    self.trim(idle=True)
                    if self._told[follower] < self.kv.trimmed:
                        await self._send(follower, acked + 1, [])
                    else:
                        await kick.wait()
                    continue
                for first, batches in _groups(self.kv.log_since(acked)):
                    if not await self._send(follower, first, batches):
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

    async def _send(self, follower: str, first: int, batches: list[bytes]) -> bool:
        """Batches ``first``... with our trim point; True when the follower took all of them."""
        trimmed = self.kv.trimmed
        got = await self._peers.apply_many(follower, self.volume, self.epoch, first, batches, trimmed)
        self._told[follower] = trimmed
        self.acked[follower] = got
        self._notify_progress()
        self.trim()
        return got == first + len(batches) - 1

    async def _copy(self, follower: str) -> None:
        """The follower is behind our trimmed log: reset it and send it everything, as of now."""
        assert self._copy_view is not None
        view = self._copy_view()
        self._holds[follower] = view.seq
        try:
            log.warning("volume=%s follower=%s is at seq %s, behind the log trimmed to %d: sending a full copy "
                        "as of seq %d", self.volume, follower, self.acked[follower], self.kv.trimmed, view.seq)
            await self._peers.reset(follower, self.volume, self.epoch)
            self.acked[follower] = 0
            sent = 0
            for part in view.parts():
                await self._peers.load(follower, self.volume, self.epoch, part.snapshot, part.items, part.seq,
                                       part.last_batch)
                sent += len(part.items)
            self.acked[follower] = view.seq
            self.copies += 1
            log.info("volume=%s follower=%s got a full copy: %d keys, %d snapshot(s), seq %d", self.volume, follower,
                     sent, len(view.snapshots), view.seq)
        finally:
            del self._holds[follower]
            view.close()
        self._notify_progress()

    def trim(self, idle: bool = False) -> int:
        """Drop the log entries every follower that matters holds; returns the new trim point.

        In-sync followers bound it (each keeps the entry it stands at), a full copy being sent holds
        it at the copy's seq, and followers out of the set keep at most the slack. While writes go
        on (not ``idle``) it trims only every TRIM_EVERY batches.
        """
        seq = self.kv.seq
        if seq - self.kv.trimmed <= TRIM_EVERY and not idle:
            return self.kv.trimmed
        upto = seq - 1
        behind: list[int] = []
        for f in self.followers:
            acked = self.acked.get(f)
            if f in self.in_sync:
                if acked is None:
                    return self.kv.trimmed  # an in-sync follower we have not heard from yet
                upto = min(upto, acked - 1)
            else:
                behind.append(-1 if acked is None else acked - 1)
        if behind:
            upto = min(upto, max(min(behind), self.kv.log_floor(LOG_SLACK_ENTRIES, LOG_SLACK_BYTES)))
        for held in self._holds.values():
            upto = min(upto, held)
        if upto > self.kv.trimmed:
            self.kv.trim_to(upto)
        return self.kv.trimmed

    def _diverged(self, seq: int, last_hash: bytes) -> bool:
        """True when the follower holds a batch we do not: a tail written under an older coordinator
        (or half a full copy, which it must start over)."""
        if seq == 0:
            return bool(last_hash)
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
        if not slow and not self.followers:
            self.trim()  # no follower task to do it: a volume with one replica
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
