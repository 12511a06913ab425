"""Trio-side clients of VolumeService and Volume: ``VolumeClient`` is the vfs layer's MetaPort."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pxfs.meta.slices import BlockMap, BlockWrite, as_write
from pxfs.model import Attr, VolumeInfo
from pxfs.rpc import convert
from pxfs.rpc.client import _Caller
from pxfs.rpc.schema import pxfs_capnp

LOCATE_HASHES = 65536  # what a Volume server takes in one locate call

Invalidate = Callable[[list[int], list[tuple[int, bytes]]], Awaitable[None]]


class WatcherServer(pxfs_capnp.Watcher.Server):
    """The mount's end of the coordinator's invalidation callbacks."""

    def __init__(self, bridge: Any, on_invalidate: Invalidate) -> None:
        self._b, self._fn = bridge, on_invalidate

    async def invalidate(self, inodes: Any, entries: Any, **_: Any) -> None:
        inos = [int(i) for i in inodes]
        names = [(int(e.parent), bytes(e.name)) for e in entries]
        await self._b.to_trio(self._fn, inos, names)


class VolumeServiceClient(_Caller):
    def __init__(self, bridge: Any, peer: str, cap: Any) -> None:
        super().__init__(bridge, peer)
        self.cap = cap

    async def open(self, name: str, mount_id: str, read_only: bool, on_invalidate: Invalidate | None = None,
                   handles: list[int] | None = None, http: str = "") -> tuple[VolumeClient, VolumeInfo]:
        """Open the volume at its coordinator; ``on_invalidate`` hears what other mounts change.

        ``handles``: the inodes the mount holds open (one entry per handle), counted there anew.
        ``http``: where the mount serves its /metrics, registered with it.
        """
        async def go() -> tuple[Any, VolumeInfo]:
            req = self.cap.open_request()
            req.name, req.mountId, req.readOnly, req.http = name, mount_id, read_only, http
            if on_invalidate is not None:
                req.watcher = WatcherServer(self.bridge, on_invalidate)
            held = req.init("handles", len(handles or []))
            for i, ino in enumerate(handles or []):
                held[i] = ino
            r = await req.send()
            return r.volume.cast_as(pxfs_capnp.Volume), convert.volume_from(r.info)
        cap, info = await self.call(go)
        return VolumeClient(self.bridge, self.peer, cap), info

    async def apply(self, name: str, epoch: int, seq: int, batch: bytes) -> int:
        async def go() -> int:
            return (await self.cap.apply(name, epoch, seq, batch)).seq
        return await self.call(go)

    async def apply_many(self, name: str, epoch: int, first: int, batches: list[bytes], trimmed: int = 0) -> int:
        async def go() -> int:
            return (await self.cap.applyMany(name, epoch, first, batches, trimmed)).seq
        return await self.call(go)

    async def load(self, name: str, epoch: int, snapshot: str, items: list[tuple[bytes, bytes]], seq: int,
                   last_batch: bytes) -> None:
        async def go() -> None:
            req = self.cap.load_request()
            req.name, req.epoch, req.snapshot, req.seq, req.lastBatch = name, epoch, snapshot, seq, last_batch
            out = req.init("items", len(items))
            for i, (key, value) in enumerate(items):
                out[i].key, out[i].value = key, value
            await req.send()
        await self.call(go)

    async def last_seq(self, name: str) -> tuple[int, int, bytes]:
        async def go() -> tuple[int, int, bytes]:
            r = await self.cap.lastSeq(name)
            return r.seq, r.epoch, bytes(r.lastHash)
        return await self.call(go)

    async def local_replicas(self) -> str:
        async def go() -> str:
            return (await self.cap.localReplicas()).replicas
        return await self.call(go)

    async def reset(self, name: str, epoch: int) -> None:
        async def go() -> None:
            await self.cap.reset(name, epoch)
        await self.call(go)


class VolumeClient(_Caller):
    """One volume's metadata at its coordinator (implements ``pxfs.vfs.ports.MetaPort``)."""

    def __init__(self, bridge: Any, peer: str, cap: Any) -> None:
        super().__init__(bridge, peer)
        self.cap = cap

    async def _attr(self, method: str, *args: Any) -> Attr:
        async def go() -> Attr:
            return convert.attr_from((await getattr(self.cap, method)(*args)).attr)
        return await self.call(go)

    async def _void(self, method: str, *args: Any) -> None:
        async def go() -> None:
            await getattr(self.cap, method)(*args)
        await self.call(go)

    async def getattr(self, ino: int) -> Attr:
        return await self._attr("getattr", ino)

    async def lookup(self, parent: int, name: bytes) -> Attr:
        return await self._attr("lookup", parent, name)

    # Mutations take ``op_id`` (see ``pxfs.meta.opids``): the same id on a retry gets the first answer.
    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
                    op_id: bytes = b"") -> Attr:
        return await self._attr("mknod", parent, name, mode, rdev, uid, gid, op_id)

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int, op_id: bytes = b"") -> Attr:
        return await self._attr("mkdir", parent, name, mode, uid, gid, op_id)

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int,
                      op_id: bytes = b"") -> Attr:
        return await self._attr("symlink", parent, name, target, uid, gid, op_id)

    async def readlink(self, ino: int) -> bytes:
        async def go() -> bytes:
            return bytes((await self.cap.readlink(ino)).target)
        return await self.call(go)

    async def link(self, ino: int, new_parent: int, new_name: bytes, op_id: bytes = b"") -> Attr:
        return await self._attr("link", ino, new_parent, new_name, op_id)

    async def unlink(self, parent: int, name: bytes, op_id: bytes = b"") -> None:
        await self._void("unlink", parent, name, op_id)

    async def rmdir(self, parent: int, name: bytes, op_id: bytes = b"") -> None:
        await self._void("rmdir", parent, name, op_id)

    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int,
                     op_id: bytes = b"") -> None:
        await self._void("rename", parent, name, new_parent, new_name, flags, op_id)

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                      size: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None,
                      ctime_ns: int | None = None, op_id: bytes = b"") -> Attr:
        async def go() -> Attr:
            req = self.cap.setattr_request()
            req.ino, req.opId = ino, op_id
            a = req.init("attr")
            for field, flag, value in (("mode", "setMode", mode), ("uid", "setUid", uid), ("gid", "setGid", gid),
                                       ("size", "setSize", size), ("atimeNs", "setAtime", atime_ns),
                                       ("mtimeNs", "setMtime", mtime_ns), ("ctimeNs", "setCtime", ctime_ns)):
                if value is not None:
                    setattr(a, field, value)
                    setattr(req, flag, True)
            return convert.attr_from((await req.send()).attr)
        return await self.call(go)

    async def readdir(self, ino: int, after: bytes, limit: int) -> list[tuple[bytes, Attr]]:
        async def go() -> list[tuple[bytes, Attr]]:
            r = await self.cap.readdir(ino, after, limit)
            return [(bytes(e.name), convert.attr_from(e.attr)) for e in r.entries]
        return await self.call(go)

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int, op_id: bytes = b"") -> None:
        await self._void("setxattr", ino, name, value, flags, op_id)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        async def go() -> bytes:
            return bytes((await self.cap.getxattr(ino, name)).value)
        return await self.call(go)

    async def listxattr(self, ino: int) -> list[bytes]:
        async def go() -> list[bytes]:
            return [bytes(n) for n in (await self.cap.listxattr(ino)).names]
        return await self.call(go)

    async def removexattr(self, ino: int, name: bytes, op_id: bytes = b"") -> None:
        await self._void("removexattr", ino, name, op_id)

    async def open(self, ino: int) -> tuple[Attr, BlockMap]:
        """Count a handle and read the whole block map, page by page (each page its own call: the
        later ones are reads, safe to retry at another coordinator)."""
        async def go() -> tuple[Attr, BlockMap, bool]:
            r = await self.cap.open(ino)
            return convert.attr_from(r.attr), convert.blocks_from(r.blocks), r.more
        attr, blocks, more = await self.call(go)
        while more:
            page, more = await self.block_page(ino, max(blocks) + 1, 0)
            blocks.update(page)
        return attr, blocks

    async def block_page(self, ino: int, start: int, limit: int) -> tuple[BlockMap, bool]:
        """Block map entries from index ``start`` on (``limit`` 0: the server's page size); True: more."""
        async def go() -> tuple[BlockMap, bool]:
            r = await self.cap.blocks(ino, start, limit)
            return convert.blocks_from(r.blocks), r.more
        return await self.call(go)

    async def release(self, ino: int) -> None:
        await self._void("release", ino)

    async def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, op_id: bytes = b"") -> Attr:
        return await self._attr("create", parent, name, mode, uid, gid, op_id)

    async def release_many(self, inos: list[int]) -> None:
        await self._void("releaseMany", inos)

    async def commit(self, ino: int, blocks: Mapping[int, BlockWrite | tuple[bytes, int]], size: int, mtime_ns: int,
                     held: list[str] | None = None, op_id: bytes = b"", put_age: float = 0.0) -> Attr:
        async def go() -> Attr:
            req = self.cap.commit_request()
            req.ino, req.size, req.mtimeNs, req.opId = ino, size, mtime_ns, op_id
            req.putAgeMs = min(2**32 - 1, max(0, int(put_age * 1000)))
            hl = req.init("held", len(held or []))
            for i, node in enumerate(held or []):
                hl[i] = node
            convert.writes_to(lambda n: req.init("blocks", n), {i: as_write(w) for i, w in blocks.items()})
            return convert.attr_from((await req.send()).attr)
        return await self.call(go)

    async def statfs(self) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            r = await self.cap.statfs()
            return {"capacity": r.capacity, "used": r.used, "inodes": r.inodes, "block_size": r.blockSize,
                    "max_inodes": r.maxInodes, "meta_bytes": r.metaBytes}
        return await self.call(go)

    async def fsck(self, repair: bool) -> dict[str, Any]:
        async def go() -> str:
            return (await self.cap.fsck(repair)).report
        return json.loads(await self.call(go))

    async def snapshot_create(self, name: str) -> None:
        await self._void("snapshotCreate", name)

    async def snapshot_delete(self, name: str) -> None:
        await self._void("snapshotDelete", name)

    async def snapshot_list(self) -> list[tuple[str, int]]:
        async def go() -> list[tuple[str, int]]:
            return [(x.name, x.createdNs) for x in (await self.cap.snapshotList()).snapshots]
        return await self.call(go)

    async def restore(self, name: str) -> None:
        await self._void("restore", name)

    async def detach(self) -> None:
        await self._void("detach")

    async def chunk_refs(self, page: int = 0) -> list[bytes]:
        """Every chunk the volume and its snapshots name, read ``page`` at a time (0: the server's)."""
        out: list[bytes] = []
        more = True
        while more:
            after = out[-1] if out else b""

            async def go(after: bytes = after) -> tuple[list[bytes], bool]:
                r = await self.cap.chunkRefs(after, page)
                return [bytes(h) for h in r.hashes], r.more
            hashes, more = await self.call(go)
            out.extend(hashes)
        return out

    async def locate(self, hashes: list[bytes], page: int = 0) -> list[tuple[bytes, bytes, int, int]]:
        """(hash, path, offset, length) of the blocks that use ``hashes``: LOCATE_HASHES of them per
        pass, each pass read ``page`` places at a time (0: the server's page)."""
        out: list[tuple[bytes, bytes, int, int]] = []
        for i in range(0, len(hashes), LOCATE_HASHES):
            part = hashes[i : i + LOCATE_HASHES]
            after: tuple[bytes, int] = (b"", 0)
            more = True
            while more:
                async def go(after: tuple[bytes, int] = after, part: list[bytes] = part
                             ) -> tuple[list[tuple[bytes, bytes, int, int]], bool]:
                    r = await self.cap.locate(part, after[0], after[1], page)
                    return [(bytes(p.hash), bytes(p.path), p.offset, p.length) for p in r.places], r.more
                places, more = await self.call(go)
                out.extend(places)
                if places:
                    after = (places[-1][1], places[-1][2])
        return out

    async def info(self) -> VolumeInfo:
        async def go() -> VolumeInfo:
            return convert.volume_from((await self.cap.info()).info)
        return await self.call(go)
