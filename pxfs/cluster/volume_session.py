"""A mount's session with its volume: finds the coordinator and follows it through failovers.

This is the MetaPort the mount's vfs talks to. A call that fails because the coordinator is gone or
no longer holds the role is retried, after finding the current coordinator through any node, for up
to ``FAILOVER_TIMEOUT`` seconds; the application sees a stall, not an error. Open files are
registered again with the new coordinator so its open counts (unlinked-but-open files) stay right.
Every mutation carries an op id, the same on each retry: a coordinator that already holds the
mutation (the old one applied and replicated it, then died before answering) answers with the
recorded result instead of running it again (``pxfs.meta.opids``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import trio

from pxfs.chunks.local_read import LocalPools, is_local_address
from pxfs.chunks.replicas import ReplicaChunks
from pxfs.cluster.backends import node_addresses
from pxfs.cluster.config import load_config
from pxfs.cluster.peers import Peers
from pxfs.errors import Conflict, NotFound, PxfsError, Unauthorized, Unavailable
from pxfs.meta import slices
from pxfs.meta.opids import OpIds
from pxfs.meta.slices import BlockMap, BlockWrite
from pxfs.model import Attr, NodeInfo, VolumeInfo
from pxfs.rpc.bridge import Bridge
from pxfs.rpc.client import Connection
from pxfs.rpc.pki import Credential
from pxfs.rpc.volume_client import VolumeClient

log = logging.getLogger(__name__)
T = TypeVar("T")

FAILOVER_TIMEOUT = 60.0
CALL_TIMEOUT = 10.0
MAX_RELEASES = 4096
RELEASE_DELAY = 0.05  # a coordinator silent this long (frozen, partitioned) is looked up again


def local_pools(nodes: list[NodeInfo]) -> LocalPools:
    """The pools of the nodes that run on this host, whose chunk files a mount may read directly."""
    local = {n.id: [Path(p.path) for p in n.pools] for n in nodes
             if is_local_address(n.address.rpartition(":")[0].strip("[]"))}
    found = LocalPools(local)
    if found.pools:
        log.info("short-circuit reads from the pools of local node(s) %s", ",".join(sorted(found.pools)))
    return found


class VolumeSession:
    def __init__(self, bridge: Bridge, cluster_dir: Path, credential: Credential, volume: str, mount_id: str,
                 read_only: bool) -> None:
        self._bridge, self._cluster_dir, self._credential = bridge, cluster_dir, credential
        self.volume, self.mount_id, self.read_only = volume, mount_id, read_only
        self._addresses: dict[str, str] = {}
        self.peers = Peers(bridge, credential, f"mount:{mount_id}", self._resolve)
        self.meta: VolumeClient | None = None
        self.info: VolumeInfo | None = None
        self.chunks: ReplicaChunks | None = None
        self._open: dict[int, int] = {}
        self.local: LocalPools | None = None  # pools of the nodes on this host (short-circuit reads)
        self._releases: list[int] = []  # closes the coordinator has not heard of yet
        # Set by the mount: what other mounts changed, for the kernel's caches to forget.
        self.on_invalidate: Callable[[list[int], list[tuple[int, bytes]]], Awaitable[None]] | None = None
        self.on_reconnect: Callable[[], None] | None = None  # callbacks may have been lost meanwhile
        self._release_kick = trio.Event()
        self._lock = trio.Lock()
        self._ops = OpIds()  # a random prefix per session: ids never repeat across remounts
        self.http = ""  # where the mount serves /metrics: registered at every coordinator it opens at

    async def _resolve(self, node_id: str) -> str:
        if node_id not in self._addresses:
            raise NotFound(f"node {node_id}", "not in the cluster map")
        return self._addresses[node_id]

    async def _lookup(self) -> VolumeInfo:
        """The volume's record and the node addresses, from the first node that answers."""
        cfg = load_config(self._cluster_dir)
        errors: list[str] = []
        known = list(dict.fromkeys(list(self._addresses.values()) + cfg.addresses()))
        for address in known:
            info = await self._ask(address, errors)
            if info is not None:
                return info
        # Nodes only the store knows (etcd: a host without a node whose cluster.json lists none).
        for address in await node_addresses(cfg, self._cluster_dir):
            if address not in known:
                info = await self._ask(address, errors)
                if info is not None:
                    return info
        if self.info is not None:
            # No node can read the cluster map (the embedded store's seed is down): the coordinator
            # this mount knows serves from the record it holds, so try it again rather than fail.
            log.warning("volume=%s: cluster map unreadable (%s); retrying coordinator %s", self.volume,
                        "; ".join(errors), self.info.coordinator)
            return self.info
        raise Unavailable(f'volume "{self.volume}"', "no node answers (" + "; ".join(errors) + ")")

    async def _ask(self, address: str, errors: list[str]) -> VolumeInfo | None:
        """The volume's record from the node at ``address`` (and the node addresses it knows), or None
        with why not appended to ``errors``."""
        try:
            conn = await Connection.open(self._bridge, address, self._credential, peer=f"mount:{self.mount_id}",
                                         timeout=3)
        except Unauthorized:
            raise
        except PxfsError as err:
            errors.append(str(err))
            return None
        try:
            admin = await conn.admin()
            info = await admin.get_volume(self.volume.partition("@")[0])  # VOLUME@SNAPSHOT: its volume
            nodes = await admin.list_nodes()
            self._addresses.update({n.id: n.address for n in nodes})
            if self.local is None:
                self.local = await trio.to_thread.run_sync(local_pools, nodes)
            return info
        except (Unavailable, Conflict) as err:
            errors.append(str(err))
            return None
        finally:
            await conn.close()

    async def connect(self) -> None:
        """First open: errors (unknown volume, wrong credential) go straight to the caller."""
        info = await self._lookup()
        volumes = await self.peers.volumes(info.coordinator)
        self.meta, self.info = await volumes.open(self.volume, self.mount_id, self.read_only, self._invalidated,
                                                  handles=[], http=self.http)
        self.chunks = ReplicaChunks(self.volume, self.info.replicas, self.peers, self.local)

    async def _reconnect(self, failed: VolumeClient | None, cause: PxfsError, deadline: float) -> None:
        async with self._lock:
            if self.meta is not failed:
                return  # another task already found the new coordinator
            delay = 0.1
            while True:
                try:
                    info = await self._lookup()
                    await self.peers.forget(info.coordinator)
                    # The new coordinator counts what is open now, given with the open itself (and
                    # frees no orphan a mount registered before it has not reopened); closes queued
                    # for the old one would take away handles it never counted.
                    handles = [ino for ino, count in self._open.items() for _ in range(count)]
                    with trio.fail_after(CALL_TIMEOUT):
                        volumes = await self.peers.volumes(info.coordinator)
                        meta, info = await volumes.open(self.volume, self.mount_id, self.read_only,
                                                        self._invalidated, handles=handles, http=self.http)
                    self._releases.clear()
                    old, self.meta, self.info = self.meta, meta, info
                    if self.on_reconnect is not None:
                        self.on_reconnect()
                    if self.chunks is not None:
                        self.chunks.replicas = list(info.replicas)
                    if old is not None:
                        await old.drop()
                    log.warning("volume=%s reconnected to coordinator %s (epoch %d) after: %s", self.volume,
                                info.coordinator, info.epoch, cause)
                    return
                except (Unavailable, Conflict, trio.TooSlowError) as err:
                    if time.monotonic() > deadline:
                        raise Unavailable(f'volume "{self.volume}"',
                                          f"no coordinator for {FAILOVER_TIMEOUT:g}s (last: {err})") from None
                    await trio.sleep(delay)
                    delay = min(delay * 2, 1.0)

    async def _call(self, fn: Callable[[VolumeClient], Awaitable[T]]) -> T:
        """One metadata call, retried at the current coordinator when the old one is gone or stuck.

        A mutation passes the same op id on every try (``fn`` closes over it), so a retry of one
        the old coordinator already applied gets its recorded result, not EEXIST or ENOENT.
        """
        deadline = time.monotonic() + FAILOVER_TIMEOUT
        while True:
            meta = self.meta
            if meta is None:
                raise Unavailable(f'volume "{self.volume}"', "not connected")
            try:
                with trio.fail_after(CALL_TIMEOUT):
                    return await fn(meta)
            except trio.TooSlowError:
                err2: PxfsError = Unavailable(f'volume "{self.volume}"', f"coordinator silent for {CALL_TIMEOUT:g}s")
            except (Unavailable, Conflict) as err:
                err2 = err
            if time.monotonic() > deadline:
                raise err2
            await self._reconnect(meta, err2, deadline)

    async def _invalidated(self, inodes: list[int], entries: list[tuple[int, bytes]]) -> None:
        if self.on_invalidate is not None:
            await self.on_invalidate(inodes, entries)

    async def refresh(self) -> None:
        """Keepalive: tells the coordinator this mount lives, and picks up replica set changes."""
        info = await self._call(lambda m: m.info())
        self.info = info
        if self.chunks is not None and self.chunks.replicas != info.replicas:
            log.info("volume=%s replicas now %s", self.volume, ",".join(info.replicas))
            self.chunks.replicas = list(info.replicas)
        await self._call(lambda m: m.statfs())

    async def held_by_replicas(self, replicas: list[str], hashes: list[bytes]) -> tuple[set[bytes], list[str]]:
        """Which of ``hashes`` at least one replica holds, and which replicas could not be asked."""
        present: set[bytes] = set()
        unreachable = []
        for r in replicas:
            try:
                chunks = await self.peers.chunks(r)
                for i in range(0, len(hashes), 4096):
                    part = hashes[i:i + 4096]
                    present.update(h for h, ok in zip(part, await chunks.has_many(part), strict=True) if ok)
            except PxfsError:
                unreachable.append(r)
        return present, unreachable

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            if self.meta is not None:
                try:
                    with trio.move_on_after(3):
                        await self.flush_releases()
                        await self.meta.detach()
                except PxfsError:
                    pass  # the coordinator forgets a silent mount after MOUNT_TTL anyway
                await self.meta.drop()
            await self.peers.close()

    # -- MetaPort ------------------------------------------------------------------------------

    async def getattr(self, ino: int) -> Attr:
        return await self._call(lambda m: m.getattr(ino))

    async def lookup(self, parent: int, name: bytes) -> Attr:
        return await self._call(lambda m: m.lookup(parent, name))

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        op = self._ops.next()
        return await self._call(lambda m: m.mknod(parent, name, mode, rdev, uid, gid, op))

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        op = self._ops.next()
        return await self._call(lambda m: m.mkdir(parent, name, mode, uid, gid, op))

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        op = self._ops.next()
        return await self._call(lambda m: m.symlink(parent, name, target, uid, gid, op))

    async def readlink(self, ino: int) -> bytes:
        return await self._call(lambda m: m.readlink(ino))

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        op = self._ops.next()
        return await self._call(lambda m: m.link(ino, new_parent, new_name, op))

    async def unlink(self, parent: int, name: bytes) -> None:
        op = self._ops.next()
        await self._call(lambda m: m.unlink(parent, name, op))

    async def rmdir(self, parent: int, name: bytes) -> None:
        op = self._ops.next()
        await self._call(lambda m: m.rmdir(parent, name, op))

    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int) -> None:
        op = self._ops.next()
        await self._call(lambda m: m.rename(parent, name, new_parent, new_name, flags, op))

    async def setattr(self, ino: int, **changes: Any) -> Attr:
        op = self._ops.next()
        return await self._call(lambda m: m.setattr(ino, op_id=op, **changes))

    async def readdir(self, ino: int, after: bytes, limit: int) -> list[tuple[bytes, Attr]]:
        return await self._call(lambda m: m.readdir(ino, after, limit))

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        op = self._ops.next()
        await self._call(lambda m: m.setxattr(ino, name, value, flags, op))

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        return await self._call(lambda m: m.getxattr(ino, name))

    async def listxattr(self, ino: int) -> list[bytes]:
        return await self._call(lambda m: m.listxattr(ino))

    async def removexattr(self, ino: int, name: bytes) -> None:
        op = self._ops.next()
        await self._call(lambda m: m.removexattr(ino, name, op))

    async def open(self, ino: int) -> tuple[Attr, BlockMap]:
        result = await self._call(lambda m: m.open(ino))
        self._open[ino] = self._open.get(ino, 0) + 1
        return result

    async def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        # O_EXCL stays exclusive across a failover: a retry gets our own create's answer (and its
        # handle counted at the new coordinator), never another mount's file of the same name.
        op = self._ops.next()
        attr = await self._call(lambda m: m.create(parent, name, mode, uid, gid, op))
        self._open[attr.ino] = self._open.get(attr.ino, 0) + 1
        return attr

    async def release(self, ino: int) -> None:
        """Queue the close for the background sender: close(2) does not wait for the coordinator.

        Only an unlinked file's space depends on it, and that is freed a moment later instead.
        """
        n = self._open.get(ino, 0) - 1
        if n > 0:
            self._open[ino] = n
        else:
            self._open.pop(ino, None)
        self._releases.append(ino)
        self._release_kick.set()

    async def send_releases(self) -> None:
        """Background task: tell the coordinator about closes, as many per call as have queued up."""
        while True:
            await self._release_kick.wait()
            # Let closes gather: a loop of open/close would otherwise send one call per close.
            await trio.sleep(RELEASE_DELAY)
            self._release_kick = trio.Event()
            await self.flush_releases()

    async def flush_releases(self) -> None:
        while self._releases:
            todo, self._releases = self._releases[:MAX_RELEASES], self._releases[MAX_RELEASES:]
            meta = self.meta
            if meta is None:
                return
            try:
                # Not retried at a new coordinator: it counts only the handles open when we reconnected.
                with trio.fail_after(CALL_TIMEOUT):
                    await meta.release_many(todo)
            except (PxfsError, trio.TooSlowError) as err:
                # Lost closes only delay freeing unlinked files until the coordinator restarts.
                log.warning("volume=%s could not send %d closes: %s", self.volume, len(todo), err)

    async def commit(self, ino: int, blocks: Mapping[int, BlockWrite], size: int, mtime_ns: int,
                     put_started: float | None = None) -> Attr:
        """``put_started``: trio clock time the chunks' puts began; each try says how long ago."""
        hashes = [h for w in blocks.values() for h in slices.hashes(w.slices)]
        held = self.chunks.held_by(hashes) if self.chunks is not None else []
        op = self._ops.next()

        def age() -> float:
            return 0.0 if put_started is None else trio.current_time() - put_started

        attr = await self._call(lambda m: m.commit(ino, blocks, size, mtime_ns, held, op, age()))
        if self.chunks is not None:
            self.chunks.committed(hashes)
        return attr

    async def statfs(self) -> dict[str, Any]:
        return await self._call(lambda m: m.statfs())
