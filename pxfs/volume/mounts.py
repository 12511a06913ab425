"""A coordinator's view of a volume's mounts: who is registered, who may still hold orphans or retry.

Mounts register as ``mounts/<volume>/<mount id>`` in the control store (renewed by their keepalive
at the coordinator, deleted when they detach). A new coordinator reads those registrations to know
whom a deferred orphan purge waits for (``pxfs.meta.handles.PendingPurge``); later rounds forget
the handles and op records of mounts that have been silent far longer than any retry can take.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from pxfs.cluster import records
from pxfs.cluster.admin import MOUNT_TTL
from pxfs.cluster.store import ControlStore
from pxfs.meta.fs import Meta

log = logging.getLogger(__name__)
T = TypeVar("T")

# A mount retries a call for 60 s (pxfs.cluster.volume_session.FAILOVER_TIMEOUT) after its
# coordinator went silent; one whose registration is ten times older has given up every retry.
FORGET_AFTER = 600.0
STALE_PER_ROUND = 16  # mounts whose op records one round forgets



class Call(Protocol):
    """The coordinator's call path for one volume: run a Meta operation, acknowledged like any other."""

    def __call__(self, fn: Callable[[Meta], T], /) -> Awaitable[T]: ...


def mount_prefix(volume: str) -> str:
    return f"mounts/{volume}/"


async def registered(store: ControlStore, volume: str) -> dict[str, float]:
    """mount id -> time (``time.time``) its registration was last renewed; bad records are skipped."""
    prefix = mount_prefix(volume)
    return {m["id"]: m["ts"] for m in records.mounts(await store.range(prefix), prefix)}


def defer_purge(meta: Meta) -> None:
    """At activation: orphans wait for the mounts (read by ``tend``), instead of being freed at once."""
    meta.defer_orphan_purge(None, MOUNT_TTL, time.time)


async def tend(meta: Meta, call: Call, store: ControlStore, volume: str) -> int:
    """One supervision round: feed a deferred purge the registrations, and run it once due.
    Returns the orphans freed.

    ``call`` runs a Meta operation through the coordinator's call path, so that what it writes is
    acknowledged by the in-sync replicas like any other batch.
    """
    pending = meta.purge_pending()
    if pending is None:
        return 0
    if pending is False:
        meta.mounts_registered(await registered(store, volume))
    freed = 0
    while True:  # a bounded batch per call: the loop is free between them
        n = await call(lambda m: m.purge_due())
        freed += n
        if not n or meta.purge_pending() is None:
            break
    if freed:
        log.info("volume=%s freed %d orphan inode(s) no mount reopened after the coordinator changed", volume, freed)
    return freed


async def forget_silent(meta: Meta, call: Call, store: ControlStore, volume: str, now: float | None = None,
                        heard: dict[str, float] | None = None) -> int:
    """Forget mounts whose registration is gone or older than FORGET_AFTER, and that this coordinator
    has not ``heard`` from in that time either: their open handles (an orphan they held is freed)
    and op records. Returns how many mounts were forgotten."""
    now = time.time() if now is None else now
    seen = dict(heard or {})
    for m, ts in (await registered(store, volume)).items():
        seen[m] = max(ts, seen.get(m, 0.0))
    live = [m for m, ts in seen.items() if now - ts < FORGET_AFTER]
    if heard is not None:
        for m in [m for m, ts in heard.items() if now - ts >= FORGET_AFTER]:
            del heard[m]
    silent = [m for m in meta.handles.mounts() if m not in live]
    for mount in silent:
        log.info("volume=%s forgets the handles of mount=%s, silent for over %gs", volume, mount, FORGET_AFTER)
        await call(lambda m, mount=mount: m.forget_mount(mount))
    forgotten = len(silent)
    for _ in range(STALE_PER_ROUND):
        # One mount's op records a batch (up to OP_SLOTS keys): sixteen at once made a batch, and a
        # step of the event loop, of 65536 deletes.
        n = await call(lambda m: m.forget_stale_mounts(live, 1))
        if not n:
            break
        forgotten += n
    return forgotten
