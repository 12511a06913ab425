"""Cap'n Proto servers of VolumeService (per node) and Volume (per mounted volume at its coordinator)."""

from __future__ import annotations

import bisect
import errno
import logging
import re
from typing import Any

from pxfs.errors import FsError, Invalid
from pxfs.meta.opids import Op
from pxfs.model import Changed
from pxfs.rpc import convert
from pxfs.rpc.auth import require, require_volume
from pxfs.rpc.bridge import Bridge, within
from pxfs.rpc.errors import served
from pxfs.rpc.pki import Identity
from pxfs.rpc.schema import pxfs_capnp

log = logging.getLogger(__name__)

MAX_BATCH = 64 << 20
MAX_RELEASES = 65536
MAX_BATCHES = 4096
REFS_PAGE = 65536  # chunk hashes per message: ~2.5 MB
BLOCK_PAGE = 16384  # block map entries per message: ~1 MB, whatever the size of the file
LOCATE_PAGE = 16384  # places per message, and
PAGE_BYTES = 1 << 20  # about this many bytes of them (paths are up to 4 KiB)
LOCATE_HASHES = 65536  # hashes a locate call may ask about: ~2.5 MB
MAX_LOAD_ITEMS = 1 << 17  # keys in one part of a full copy (the coordinator sends 20000)
WATCHER_TIMEOUT = 5.0
MAX_DATA = 1 << 20  # xattr values, symlink targets and names are far smaller; refuse absurd payloads
MAX_HANDLES = 1 << 20  # open handles a mount re-registers at once: more than a process may hold
_HTTP = re.compile(r"(|[\w.\-]{1,253}:\d{1,5}|\[[0-9a-fA-F:.]{2,45}\]:\d{1,5})")  # shown on pages: nothing else

Place = tuple[bytes, bytes, int, int]  # hash, path, offset, length


def _data(value: Any, what: str, limit: int = MAX_DATA) -> bytes:
    b = bytes(value)
    if len(b) > limit:
        raise Invalid(what, f"{len(b)} bytes is too large")
    return b


class VolumeServiceServer(pxfs_capnp.VolumeService.Server):
    """open: any role, for the volumes its credential names. Replication (apply, reset, lastSeq,
    localReplicas): nodes only, and the sender is the node its certificate names."""

    def __init__(self, bridge: Bridge, host: Any, who: Identity) -> None:
        self._b, self._h, self._who = bridge, host, who
        self._peer = who.name if who.role == "node" else ""

    def _node(self, what: str) -> None:
        require(self._who, what, "node")

    @served
    async def open(self, name: str, mountId: str, readOnly: bool, watcher: Any, handles: Any,  # noqa: N803
                   _context: Any, http: str = "", **_: Any) -> None:
        if not mountId or len(mountId) > 128 or "/" in mountId:
            raise Invalid("mount id", "must be 1-128 characters without '/'")
        if not _HTTP.fullmatch(http):
            raise Invalid(f"mount http address {http[:80]!r}", "not HOST:PORT")
        if not name or len(name) > 200 or "\0" in name or "/" in name:
            raise Invalid(f"volume {name[:80]!r}", "not a volume name")
        if len(handles) > MAX_HANDLES:
            raise Invalid("open", f"{len(handles)} open handles at once is more than {MAX_HANDLES}")
        require_volume(self._who, name, f'volume "{name}"')
        held = [int(i) for i in handles]
        hv, info = await self._b.to_trio(self._h.open, name, mountId, http)
        if "@" not in name and (held or not mountId.startswith("tool:")):
            # Counted anew here (the mount's handles at its previous coordinator are gone with it);
            # this also tells a deferred orphan purge that the mount has come back. A tool holds
            # nothing and no purge waits for it: it connects even while a restore is under way.
            await self._b.to_trio(self._h.call, hv, lambda m: m.reopen(mountId, held))
        # A snapshot is read-only whatever the mount asked for.
        server = VolumeServer(self._b, self._h, hv, mountId, readOnly or "@" in name, "@" in name, self._who, http)
        server.in_flight = getattr(self, "in_flight", None)  # the connection's budget (pxfs.rpc.server)
        if _context.params._has("watcher") and "@" not in name:  # scrub, fsck and tools pass none
            server.watch(watcher)
        _context.results.volume = server
        convert.volume_to(_context.results.init("info"), info)

    @served
    async def apply(self, name: str, epoch: int, seq: int, batch: Any, _context: Any, **_: Any) -> None:
        self._node("replication")
        _context.results.seq = await self._b.to_trio(self._h.apply, name, epoch, seq, _data(batch, "batch", MAX_BATCH),
                                                      self._peer)

    @served
    async def applyMany(self, name: str, epoch: int, first: int, batches: Any, trimmed: int,  # noqa: N802
                        _context: Any, **_: Any) -> None:
        self._node("replication")
        if len(batches) > MAX_BATCHES:
            raise Invalid("applyMany", f"{len(batches)} batches at once is more than {MAX_BATCHES}")
        todo = [bytes(b) for b in batches]
        if sum(map(len, todo)) > MAX_BATCH:
            raise Invalid("applyMany", f"batches of more than {MAX_BATCH} bytes in one call")
        _context.results.seq = await self._b.to_trio(self._h.apply_many, name, epoch, first, todo, self._peer,
                                                      trimmed)

    @served
    async def load(self, name: str, epoch: int, snapshot: str, items: Any, seq: int, lastBatch: Any,  # noqa: N803
                   _context: Any, **_: Any) -> None:
        self._node("replication")
        if len(items) > MAX_LOAD_ITEMS:
            raise Invalid("load", f"{len(items)} keys in one part is more than {MAX_LOAD_ITEMS}")
        pairs = [(bytes(kv.key), bytes(kv.value)) for kv in items]
        if sum(len(k) + len(v) for k, v in pairs) > MAX_BATCH:
            raise Invalid("load", f"a part of more than {MAX_BATCH} bytes")
        await self._b.to_trio(self._h.load, name, epoch, snapshot, pairs, seq,
                              _data(lastBatch, "last batch", MAX_BATCH), self._peer)

    @served
    async def lastSeq(self, name: str, _context: Any, **_: Any) -> None:  # noqa: N802
        self._node("replication")
        seq, epoch, last_hash = await self._b.to_trio(self._h.last_seq, name)
        _context.results.seq, _context.results.epoch, _context.results.lastHash = seq, epoch, last_hash

    @served
    async def localReplicas(self, _context: Any, **_: Any) -> None:  # noqa: N802
        self._node("local replicas")
        _context.results.replicas = await self._b.to_trio(self._h.local_replicas)

    @served
    async def reset(self, name: str, epoch: int, _context: Any, **_: Any) -> None:
        self._node("replication")
        await self._b.to_trio(self._h.reset, name, epoch, self._peer)


class VolumeServer(pxfs_capnp.Volume.Server):
    """One mount's view of one volume; every call is one Meta operation at the coordinator."""

    def __init__(self, bridge: Bridge, host: Any, hv: Any, mount_id: str, read_only: bool,
                 snapshot: bool, who: Identity, http: str = "") -> None:
        self._b, self._h, self._hv, self._mount, self._ro = bridge, host, hv, mount_id, read_only
        self._http = http  # renewed with the mount's registration
        self._who = who  # a mount may change files; snapshots, restore and fsck repair are admin work
        self._snapshot = snapshot  # a snapshot's keyspace is never written, not even to forget a mount
        self._watcher: Any = None
        self._refs: list[bytes] | None = None  # the chunk hashes a chunkRefs pass is paging through
        # The places a locate pass is paging through: for which hashes, the places, their (path, offset).
        self._places: tuple[frozenset[bytes], list[Place], list[tuple[bytes, int]]] | None = None

    # -- telling the other mounts ---------------------------------------------------------------
    def watch(self, watcher: Any) -> None:
        self._watcher = watcher
        self._hv.watchers[self._mount] = self  # a remount under the same id replaces the old one

    def _unwatch(self) -> None:
        if self._hv.watchers.get(self._mount) is self:
            del self._hv.watchers[self._mount]
        self._watcher = None

    def _tell_others(self, changed: Changed) -> None:
        if changed.inodes or changed.entries:
            for mount, server in list(self._hv.watchers.items()):
                if mount != self._mount:
                    self._b.background(server._invalidate, changed)

    async def _invalidate(self, changed: Changed) -> None:
        watcher = self._watcher
        if watcher is None:
            return
        req = watcher.invalidate_request()
        inodes = req.init("inodes", len(changed.inodes))
        for i, ino in enumerate(changed.inodes):
            inodes[i] = ino
        entries = req.init("entries", len(changed.entries))
        for i, (parent, name) in enumerate(changed.entries):
            entries[i].parent, entries[i].name = parent, name
        try:
            await within(WATCHER_TIMEOUT, req.send())
        except Exception as err:  # noqa: BLE001 - a gone mount: stop telling it; its TTLs still bound staleness
            log.info("volume=%s mount=%s no longer takes invalidations: %s", self._hv.name, self._mount, err)
            self._unwatch()

    async def _call(self, fn: Any) -> Any:
        changed = Changed()
        result = await self._b.to_trio(self._h.call, self._hv, fn, changed)
        self._tell_others(changed)
        return result

    def _rw(self, op_id: Any = b"") -> Op:
        """A mutation may go ahead: who asks and its op id (see ``pxfs.meta.opids``)."""
        if self._ro:
            raise FsError(errno.EROFS, f'volume "{self._hv.name}"', "mounted read-only")
        return Op(self._mount, bytes(op_id))

    async def _attr(self, ctx: Any, fn: Any) -> None:
        convert.attr_to(ctx.results.init("attr"), await self._call(fn))

    @served
    async def getattr(self, ino: int, _context: Any, **_: Any) -> None:
        await self._attr(_context, lambda m: m.getattr(ino))

    @served
    async def lookup(self, parent: int, name: Any, _context: Any, **_: Any) -> None:
        n = _data(name, "name")
        await self._attr(_context, lambda m: m.lookup(parent, n))

    @served
    async def mknod(self, parent: int, name: Any, mode: int, rdev: int, uid: int, gid: int, opId: Any,  # noqa: N803
                    _context: Any, **_: Any) -> None:
        op = self._rw(opId)
        n = _data(name, "name")
        await self._attr(_context, lambda m: m.mknod(parent, n, mode, rdev, uid, gid, op=op))

    @served
    async def mkdir(self, parent: int, name: Any, mode: int, uid: int, gid: int, opId: Any,  # noqa: N803
                    _context: Any, **_: Any) -> None:
        op = self._rw(opId)
        n = _data(name, "name")
        await self._attr(_context, lambda m: m.mkdir(parent, n, mode, uid, gid, op=op))

    @served
    async def symlink(self, parent: int, name: Any, target: Any, uid: int, gid: int, opId: Any,  # noqa: N803
                      _context: Any, **_: Any) -> None:
        op = self._rw(opId)
        n, t = _data(name, "name"), _data(target, "symlink target")
        await self._attr(_context, lambda m: m.symlink(parent, n, t, uid, gid, op=op))

    @served
    async def readlink(self, ino: int, _context: Any, **_: Any) -> None:
        _context.results.target = await self._call(lambda m: m.readlink(ino))

    @served
    async def link(self, ino: int, newParent: int, newName: Any, opId: Any, _context: Any,  # noqa: N803
                   **_: Any) -> None:
        op = self._rw(opId)
        n = _data(newName, "name")
        await self._attr(_context, lambda m: m.link(ino, newParent, n, op=op))

    @served
    async def unlink(self, parent: int, name: Any, opId: Any, _context: Any, **_: Any) -> None:  # noqa: N803
        op = self._rw(opId)
        n = _data(name, "name")
        await self._call(lambda m: m.unlink(parent, n, op=op))

    @served
    async def rmdir(self, parent: int, name: Any, opId: Any, _context: Any, **_: Any) -> None:  # noqa: N803
        op = self._rw(opId)
        n = _data(name, "name")
        await self._call(lambda m: m.rmdir(parent, n, op=op))

    @served
    async def rename(self, parent: int, name: Any, newParent: int, newName: Any, flags: int,  # noqa: N803
                     opId: Any, _context: Any, **_: Any) -> None:  # noqa: N803
        op = self._rw(opId)
        n, nn = _data(name, "name"), _data(newName, "name")
        await self._call(lambda m: m.rename(parent, n, newParent, nn, flags, op=op))

    @served
    async def setattr(self, ino: int, attr: Any, setMode: bool, setUid: bool, setGid: bool,  # noqa: N803
                      setSize: bool, setAtime: bool, setMtime: bool, setCtime: bool, opId: Any,
                      _context: Any, **_: Any) -> None:
        op = self._rw(opId)
        kw = {}
        for flag, key, value in ((setMode, "mode", attr.mode), (setUid, "uid", attr.uid), (setGid, "gid", attr.gid),
                                 (setSize, "size", attr.size), (setAtime, "atime_ns", attr.atimeNs),
                                 (setMtime, "mtime_ns", attr.mtimeNs), (setCtime, "ctime_ns", attr.ctimeNs)):
            if flag:
                kw[key] = value
        if setSize:
            changed = Changed()
            await self._b.to_trio(self._h.cut_ahead, self._hv, ino, attr.size, changed)
            self._tell_others(changed)
        await self._attr(_context, lambda m: m.setattr(ino, op=op, **kw))

    @served
    async def readdir(self, ino: int, after: Any, limit: int, _context: Any, **_: Any) -> None:
        a = _data(after, "name")
        entries = await self._call(lambda m: m.readdir(ino, a, max(1, min(limit or 1000, 4096))))
        out = _context.results.init("entries", len(entries))
        for i, (name, attr) in enumerate(entries):
            out[i].name = name
            convert.attr_to(out[i].init("attr"), attr)

    @served
    async def setxattr(self, ino: int, name: Any, value: Any, flags: int, opId: Any, _context: Any,  # noqa: N803
                       **_: Any) -> None:
        op = self._rw(opId)
        n, v = _data(name, "xattr name"), _data(value, "xattr value")
        await self._call(lambda m: m.setxattr(ino, n, v, flags, op=op))

    @served
    async def getxattr(self, ino: int, name: Any, _context: Any, **_: Any) -> None:
        n = _data(name, "xattr name")
        _context.results.value = await self._call(lambda m: m.getxattr(ino, n))

    @served
    async def listxattr(self, ino: int, _context: Any, **_: Any) -> None:
        names = await self._call(lambda m: m.listxattr(ino))
        out = _context.results.init("names", len(names))
        for i, n in enumerate(names):
            out[i] = n

    @served
    async def removexattr(self, ino: int, name: Any, opId: Any, _context: Any, **_: Any) -> None:  # noqa: N803
        op = self._rw(opId)
        n = _data(name, "xattr name")
        await self._call(lambda m: m.removexattr(ino, n, op=op))

    @served
    async def open(self, ino: int, _context: Any, **_: Any) -> None:
        def go(m: Any) -> Any:
            m.open(ino, self._mount)
            return m.block_page(ino, 0, BLOCK_PAGE)

        attr, blocks, more = await self._call(go)
        convert.attr_to(_context.results.init("attr"), attr)
        convert.blocks_to(lambda n: _context.results.init("blocks", n), blocks)
        _context.results.more = more

    @served
    async def blocks(self, ino: int, start: int, limit: int, _context: Any, **_: Any) -> None:
        _attr, blocks, more = await self._call(lambda m: m.block_page(ino, start, min(limit or BLOCK_PAGE, BLOCK_PAGE)))
        convert.blocks_to(lambda n: _context.results.init("blocks", n), blocks)
        _context.results.more = more

    @served
    async def release(self, ino: int, _context: Any, **_: Any) -> None:
        await self._call(lambda m: m.release(ino, self._mount))

    @served
    async def create(self, parent: int, name: Any, mode: int, uid: int, gid: int, opId: Any,  # noqa: N803
                     _context: Any, **_: Any) -> None:
        op = self._rw(opId)
        n = _data(name, "name")
        await self._attr(_context, lambda m: m.create(parent, n, mode, uid, gid, op=op))

    @served
    async def releaseMany(self, inos: Any, _context: Any, **_: Any) -> None:  # noqa: N802
        todo = list(inos)
        if len(todo) > MAX_RELEASES:
            raise Invalid("releaseMany", f"{len(todo)} inodes at once is more than {MAX_RELEASES}")

        def go(m: Any) -> None:
            for ino in todo:
                m.release(ino, self._mount)

        await self._call(go)

    @served
    async def commit(self, ino: int, blocks: Any, size: int, mtimeNs: int, held: Any, opId: Any,  # noqa: N803
                     putAgeMs: int, _context: Any, **_: Any) -> None:  # noqa: N803
        op = self._rw(opId)
        bm = convert.writes_from(blocks)
        held = {str(n)[:64] for n in list(held)[:16]}
        changed = Changed()
        attr = await self._b.to_trio(self._h.commit, self._hv, ino, bm, size, mtimeNs or None, changed, held, op,
                                     putAgeMs / 1000)
        self._tell_others(changed)
        convert.attr_to(_context.results.init("attr"), attr)

    @served
    async def statfs(self, _context: Any, **_: Any) -> None:
        await self._b.to_trio(self._h.keepalive, self._hv, self._mount, False, self._http)
        st = await self._call(lambda m: m.statfs())
        r = _context.results
        r.capacity, r.used, r.inodes, r.blockSize = st["capacity"], st["used"], st["inodes"], st["block_size"]
        r.maxInodes, r.metaBytes = st["max_inodes"], st["meta_bytes"]

    @served
    async def fsck(self, repair: bool, _context: Any, **_: Any) -> None:
        if repair:
            require(self._who, "fsck --repair")
            self._rw()
        _context.results.report = await self._b.to_trio(self._h.fsck, self._hv, repair)

    @served
    async def snapshotCreate(self, name: str, _context: Any, **_: Any) -> None:  # noqa: N802
        require(self._who, "snapshot create")
        self._rw()
        await self._b.to_trio(self._h.snapshot_create, self._hv, name)

    @served
    async def snapshotDelete(self, name: str, _context: Any, **_: Any) -> None:  # noqa: N802
        require(self._who, "snapshot delete")
        self._rw()
        await self._b.to_trio(self._h.snapshot_delete, self._hv, name)

    @served
    async def snapshotList(self, _context: Any, **_: Any) -> None:
        snaps = await self._b.to_trio(self._h.snapshot_list, self._hv)
        out = _context.results.init("snapshots", len(snaps))
        for i, (name, created) in enumerate(snaps):
            out[i].name, out[i].createdNs = name, created

    @served
    async def restore(self, name: str, _context: Any, **_: Any) -> None:
        require(self._who, "volume restore")
        self._rw()
        await self._b.to_trio(self._h.restore, self._hv, name)

    @served
    async def detach(self, _context: Any, **_: Any) -> None:
        self._unwatch()
        if not self._snapshot:
            await self._call(lambda m: m.forget_mount(self._mount))  # its handles and op records
        await self._b.to_trio(self._h.detach, self._hv, self._mount)

    @served
    async def chunkRefs(self, after: Any, limit: int, _context: Any, **_: Any) -> None:  # noqa: N802
        start = _data(after, "hash", 64)
        if not start or self._refs is None:
            # Listed once per pass (from its first page) and kept for the pages that follow.
            self._refs = sorted(set(await self._b.to_trio(self._h.chunk_refs, self._hv)))
        refs = self._refs
        first = bisect.bisect_right(refs, start) if start else 0
        n = min(limit or REFS_PAGE, REFS_PAGE)
        page = refs[first : first + n]
        out = _context.results.init("hashes", len(page))
        for i, h in enumerate(page):
            out[i] = h
        _context.results.more = first + n < len(refs)

    @served
    async def locate(self, hashes: Any, afterPath: Any, afterOffset: int, limit: int,  # noqa: N803
                     _context: Any, **_: Any) -> None:
        if len(hashes) > LOCATE_HASHES:
            raise Invalid("locate", f"{len(hashes)} hashes at once is more than {LOCATE_HASHES}")
        wanted = frozenset(_data(h, "hash", 64) for h in hashes)
        after = (_data(afterPath, "path"), afterOffset)
        if not after[0] or self._places is None or self._places[0] != wanted:
            # Found once per pass (from its first page, in a worker thread) and kept for the pages
            # that follow; a pass that goes on at another coordinator finds them there anew.
            found = await self._b.to_trio(self._h.locate, self._hv, set(wanted))
            self._places = (wanted, found, [(path, offset) for _h, path, offset, _n in found])
        _wanted, found, order = self._places
        first = bisect.bisect_right(order, after) if after[0] else 0
        n, size = 0, 0
        while first + n < len(found) and n < min(limit or LOCATE_PAGE, LOCATE_PAGE) and size < PAGE_BYTES:
            size += len(found[first + n][1]) + 64
            n += 1
        out = _context.results.init("places", n)
        for i, (h, path, offset, length) in enumerate(found[first : first + n]):
            out[i].hash, out[i].path, out[i].offset, out[i].length = h, path, offset, length
        _context.results.more = first + n < len(found)

    @served
    async def info(self, _context: Any, **_: Any) -> None:
        _h, spec = await self._b.to_trio(self._h.open, self._hv.name, self._mount, self._http)
        convert.volume_to(_context.results.init("info"), spec)
