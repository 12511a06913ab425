"""Chunk repair: bring every replica of a volume back to holding every chunk its block maps name.

Run by the volume's coordinator: after a follower comes back, after the replica set changed, on
request (``pxfs volume repair``) and periodically. Missing chunks are copied from a replica that has
a verified copy; the copy rate is throttled so repair traffic never starves the application.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from pxfs.errors import Corrupt, NotFound, PxfsError

log = logging.getLogger(__name__)

HAS_BATCH = 4096


@dataclass
class RepairStatus:
    state: str = "idle"          # idle / checking / copying
    total: int = 0               # chunks to copy in this round
    done: int = 0
    bytes: int = 0
    rate: float = 0.0            # bytes/s over the round so far
    missing: dict[str, int] = field(default_factory=dict)   # replica -> chunks it lacks
    lost: int = 0                # chunks no replica has a good copy of
    rounds: int = 0
    converged: bool = False      # the last finished round found every replica complete
    asked: float = 0.0           # the newest repair request that a finished round began after
    last_error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "total": self.total, "done": self.done, "bytes": self.bytes,
                "rate": round(self.rate), "missing": dict(self.missing), "lost": self.lost, "rounds": self.rounds,
                "converged": self.converged, "last_error": self.last_error,
                "asked": self.asked}


class Throttle:
    """A token bucket in bytes per second (0 = unlimited)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._allowance = rate
        self._last = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self._allowance = min(self.rate, self._allowance + (now - self._last) * self.rate)
        self._last = now
        self._allowance -= n
        if self._allowance < 0:
            await trio.sleep(-self._allowance / self.rate)


class ChunkRepair:
    def __init__(self, volume: str, peers: Any, rate: float) -> None:
        self.volume = volume
        self._peers = peers
        self.throttle = Throttle(rate)
        self.status = RepairStatus()

    async def _has(self, node: str, hashes: list[bytes]) -> set[bytes] | None:
        """The subset of ``hashes`` that ``node`` holds, or None when it cannot be asked."""
        present: set[bytes] = set()
        try:
            chunks = await self._peers.chunks(node)
            for i in range(0, len(hashes), HAS_BATCH):
                part = hashes[i:i + HAS_BATCH]
                for h, ok in zip(part, await chunks.has_many(part), strict=True):
                    if ok:
                        present.add(h)
        except PxfsError as err:
            log.info("volume=%s repair: replica %s unreachable: %s", self.volume, node, err)
            await self._peers.forget(node)
            return None
        return present

    async def run(self, refs: dict[bytes, int], replicas: list[str], former: list[str] = ()) -> RepairStatus:
        """One round: find what each reachable replica lacks and copy it there.

        ``former``: nodes that were replicas until lately; they may still hold a chunk that no current
        replica has (it left before a round converged), so they serve as sources, never as targets.
        """
        st = self.status
        st.state, st.done, st.total, st.bytes, st.rate, st.lost = "checking", 0, 0, 0, 0.0, 0
        hashes = list(refs)
        holdings: dict[str, set[bytes]] = {}
        for node in replicas:
            have = await self._has(node, hashes)
            if have is not None:
                holdings[node] = have
        st.missing = {n: len(hashes) - len(h) for n, h in holdings.items() if len(h) < len(hashes)}
        todo = [(h, n) for n, have in holdings.items() for h in hashes if h not in have]
        for node in former:
            if node not in holdings and todo:
                have = await self._has(node, hashes)
                if have:
                    holdings[node] = have
        st.total = len(todo)
        st.state = "copying" if todo else "idle"
        started = time.monotonic()
        for h, target in todo:
            sources = [n for n, have in holdings.items() if h in have and n != target]
            data = None
            for src in sources:
                try:
                    data = await (await self._peers.chunks(src)).get(h)
                    break
                except (NotFound, Corrupt) as err:
                    log.warning("volume=%s repair: replica %s has no good copy of %s: %s", self.volume, src,
                                h.hex()[:16], err)
                except PxfsError as err:
                    st.last_error = str(err)
            if data is None:
                st.lost += 1
                continue
            await self.throttle.take(len(data))
            try:
                await (await self._peers.chunks(target)).put(h, data)
            except PxfsError as err:
                st.last_error = str(err)
                log.warning("volume=%s repair: put to %s failed: %s", self.volume, target, err)
                continue
            holdings[target].add(h)
            st.done += 1
            st.bytes += len(data)
            st.missing[target] = st.missing.get(target, 1) - 1
            st.rate = st.bytes / max(time.monotonic() - started, 1e-6)
        st.missing = {n: c for n, c in st.missing.items() if c > 0 and n in replicas}
        st.state = "idle"
        st.rounds += 1
        st.converged = not st.total and not st.missing and not st.lost and set(replicas) <= set(holdings)
        if st.total:
            log.info("volume=%s repair round: copied %d chunks (%d bytes) at %.1f MB/s, lost %d", self.volume,
                     st.done, st.bytes, st.rate / 1e6, st.lost)
        return st
