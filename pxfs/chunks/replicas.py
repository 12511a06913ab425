"""A volume's chunks across its replica nodes: put to every live replica in parallel, get from any.

This is the ``ChunkPort`` of a mount. A put succeeds when at least one replica stored the chunk and
none refused it for lack of space (a refusal fails the write with ENOSPC before replicas diverge);
replicas that cannot be reached leave the volume degraded for the repair loop to fix. Which
replicas answered "stored" is remembered per chunk (``held_by``) and sent with the commit that names
it: the coordinator must not count a replica as holding a write it never stored. A get reads a
replica's chunk file directly when the replica runs on this host, else asks the replicas (spread by
hash), and never returns bytes that do not match their hash.
"""

from __future__ import annotations

import logging
from typing import Any

import blake3
import trio

from pxfs.chunks.local_read import LocalPools
from pxfs.errors import Corrupt, NoSpace, NotFound, PxfsError, Unavailable

log = logging.getLogger(__name__)

PUT_TIMEOUT = 10.0
SUSPECT_FOR = 5.0  # a replica that timed out is skipped this long (degraded), not waited on per chunk
HELD_MAX = 1 << 16  # chunks put but not yet committed whose holders we remember (oldest forgotten first)


class ReplicaChunks:
    def __init__(self, volume: str, replicas: list[str], peers: Any, local: LocalPools | None = None) -> None:
        self.volume = volume
        self.replicas = list(replicas)
        self.local = local or LocalPools()  # replicas on this host: their chunk files are read directly
        self._peers = peers
        self.degraded: set[str] = set()
        self._suspect: dict[str, float] = {}
        self._held: dict[bytes, frozenset[str]] = {}

    def _live(self) -> list[str]:
        now = trio.current_time()
        return [n for n in self.replicas if self._suspect.get(n, 0) <= now]

    def _suspect_node(self, node: str) -> None:
        self._suspect[node] = trio.current_time() + SUSPECT_FOR

    async def put(self, h: bytes, data: bytes) -> None:
        results: dict[str, PxfsError | None] = {}

        async def one(node: str) -> None:
            try:
                with trio.fail_after(PUT_TIMEOUT):
                    await (await self._peers.chunks(node)).put(h, data)
                results[node] = None
            except trio.TooSlowError:
                results[node] = Unavailable(f"node {node}", f"chunk put took over {PUT_TIMEOUT:g}s")
                self._suspect_node(node)
            except PxfsError as err:
                results[node] = err
                if isinstance(err, Unavailable):
                    self._suspect_node(node)
                    await self._peers.forget(node)

        live = self._live() or list(self.replicas)
        for node in self.replicas:
            if node not in live:
                results[node] = Unavailable(f"node {node}", "recently unresponsive; skipped")
        async with trio.open_nursery() as nursery:
            for node in live:
                nursery.start_soon(one, node)
        errors = {n: e for n, e in results.items() if e is not None}
        for node, err in errors.items():
            if isinstance(err, NoSpace):
                raise NoSpace(f'volume "{self.volume}"', f"replica node {node} is out of space: {err.cause}")
        if len(errors) == len(self.replicas):
            first = next(iter(errors.values()))
            raise Unavailable(f'volume "{self.volume}"', f"no replica stored the chunk ({first})")
        for node, err in errors.items():
            if node not in self.degraded:
                log.warning("volume=%s replica=%s missed a chunk, degraded: %s", self.volume, node, err)
            self.degraded.add(node)
        for node in results:
            if results[node] is None:
                self.degraded.discard(node)
        self._held.pop(h, None)  # re-inserted last: eviction takes the oldest put first
        self._held[h] = frozenset(n for n, e in results.items() if e is None)
        if len(self._held) > HELD_MAX:
            del self._held[next(iter(self._held))]

    def held_by(self, hashes: list[bytes]) -> list[str]:
        """The replicas that stored every one of ``hashes`` (for a chunk we did not put: none)."""
        held: set[str] | None = None
        for h in hashes:
            nodes = self._held.get(h, frozenset())
            held = set(nodes) if held is None else held & nodes
        return sorted(held if held is not None else self.replicas)

    def committed(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self._held.pop(h, None)

    async def get(self, h: bytes) -> bytes:
        rotten: list[str] = []
        for node in self.replicas:
            if node in self.local:
                try:
                    data = await trio.to_thread.run_sync(self.local.read, node, h)
                except Corrupt:
                    rotten.append(node)
                    break
                if data is not None:
                    return data
        last: PxfsError | None = None
        bad: list[str] = []
        live = self._live()
        # Spread reads over the live replicas by hash, so a sequential read keeps all of them busy.
        k = h[0] % len(live) if live else 0
        order = rotten + [n for n in live[k:] + live[:k] + self.replicas if n not in rotten]
        order = list(dict.fromkeys(order))
        for node in order:
            try:
                with trio.fail_after(PUT_TIMEOUT):
                    data = await (await self._peers.chunks(node)).get(h)
            except trio.TooSlowError:
                self._suspect_node(node)
                last = Unavailable(f"node {node}", f"chunk get took over {PUT_TIMEOUT:g}s")
                continue
            except (NotFound, Corrupt) as err:
                # The node quarantined a corrupt copy; either way it lacks a good one.
                last = err
                bad.append(node)
                continue
            except Unavailable as err:
                await self._peers.forget(node)
                last = err
                continue
            if blake3.blake3(data).digest() != h:  # the wire is not trusted either
                last = Corrupt(f"chunk {h.hex()[:16]}", f"bytes from node {node} do not match the hash")
                continue
            await self._heal(h, data, bad)
            return data
        raise last or NotFound(f"chunk {h.hex()[:16]}", "no replica has it")

    async def _heal(self, h: bytes, data: bytes, nodes: list[str]) -> None:
        """Put a verified copy back where a replica lacked one; the read never waits on failure."""
        for node in nodes:
            try:
                with trio.move_on_after(PUT_TIMEOUT):
                    await (await self._peers.chunks(node)).put(h, data)
                    log.warning("volume=%s chunk=%s healed on replica %s from a good copy", self.volume,
                                h.hex()[:16], node)
            except PxfsError as err:
                log.warning("volume=%s chunk=%s could not be healed on %s: %s", self.volume, h.hex()[:16], node, err)
