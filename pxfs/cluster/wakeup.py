"""Rounds that poll the control store, woken early when a key they read changes.

The manager and the volume supervision run a round a second. With a store that can watch (etcd),
a round also starts as soon as a key under one of its prefixes changes: a node's alive key gone
(its lease expired), a volume record's new coordinator. The interval stays as a backstop, for a
watch that broke unnoticed and for what a round does on its own schedule.
"""

from __future__ import annotations

import trio

# A round that wrote a watched key itself is woken by its own write: not sooner than this after it.
MIN_GAP = 0.05


class Wakeup:
    """One round's sleep: until ``seconds`` pass or a watched key changes (whichever is first)."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes
        self._event = trio.Event()

    def wake(self) -> None:
        self._event.set()

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(min(MIN_GAP, seconds))
        with trio.move_on_after(max(0.0, seconds - MIN_GAP)):
            await self._event.wait()
        # A change during the round that follows sets the new event: the next sleep ends at once.
        self._event = trio.Event()


class Wakeups:
    """Hands each changed key to the rounds that watch its prefix."""

    def __init__(self) -> None:
        self._subscribers: list[Wakeup] = []

    def subscribe(self, *prefixes: str) -> Wakeup:
        w = Wakeup(prefixes)
        self._subscribers.append(w)
        return w

    def changed(self, keys: list[str]) -> None:
        """``[]``: the watch was (re)established and may have missed changes: every round runs."""
        for w in self._subscribers:
            if not keys or any(k.startswith(w.prefixes) for k in keys):
                w.wake()
