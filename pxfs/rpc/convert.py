"""Cap'n Proto structs <-> pxfs.model records. Runs on the capnp thread only."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pxfs.meta.slices import BlockMap, BlockWrite, Slice
from pxfs.model import Attr, NodeInfo, PoolInfo, VolumeInfo


def labels_to(builder_list: Any, labels: dict[str, str]) -> None:
    for i, (k, v) in enumerate(sorted(labels.items())):
        builder_list[i].key = k
        builder_list[i].value = v


def labels_from(reader_list: Any) -> dict[str, str]:
    return {lb.key: lb.value for lb in reader_list}


def pool_to(b: Any, p: PoolInfo) -> None:
    b.node, b.path, b.capacity, b.used, b.free, b.chunks = p.node, p.path, p.capacity, p.used, p.free, p.chunks
    setattr(b, "class", p.klass)


def pool_from(r: Any) -> PoolInfo:
    return PoolInfo(node=r.node, path=r.path, klass=getattr(r, "class"), capacity=r.capacity, used=r.used,
                    free=r.free, chunks=r.chunks)


def node_to(b: Any, n: NodeInfo) -> None:
    b.id, b.address, b.state, b.lastSeenMs, b.seed, b.http = n.id, n.address, n.state, n.last_seen_ms, n.seed, n.http
    labels_to(b.init("labels", len(n.labels)), n.labels)
    pools = b.init("pools", len(n.pools))
    for i, p in enumerate(n.pools):
        pool_to(pools[i], p)


def node_from(r: Any) -> NodeInfo:
    return NodeInfo(id=r.id, address=r.address, labels=labels_from(r.labels), state=r.state,
                    pools=[pool_from(p) for p in r.pools], last_seen_ms=r.lastSeenMs, seed=r.seed, http=r.http)


def volume_to(b: Any, v: VolumeInfo) -> None:
    b.name, b.size, b.used, b.repl, b.blockSize = v.name, v.size, v.used, v.repl, v.block_size
    b.state, b.coordinator, b.epoch, b.createdNs, b.mounts = v.state, v.coordinator, v.epoch, v.created_ns, v.mounts
    b.detail = json.dumps(v.detail)
    b.source, b.minReplicas, b.uid, b.waiting, b.cloneDone = v.source, v.min_replicas, v.uid, v.waiting, v.clone_done
    b.maxInodes = v.max_inodes
    ins = b.init("inSync", len(v.in_sync))
    for i, r in enumerate(v.in_sync):
        ins[i] = r
    labels_to(b.init("labels", len(v.labels)), v.labels)
    reps = b.init("replicas", len(v.replicas))
    for i, r in enumerate(v.replicas):
        reps[i] = r


def volume_from(r: Any) -> VolumeInfo:
    return VolumeInfo(name=r.name, size=r.size, used=r.used, repl=r.repl, block_size=r.blockSize,
                      labels=labels_from(r.labels), state=r.state, replicas=list(r.replicas),
                      coordinator=r.coordinator, epoch=r.epoch, created_ns=r.createdNs, mounts=r.mounts,
                      detail=json.loads(r.detail) if r.detail else {}, source=r.source, in_sync=list(r.inSync),
                      min_replicas=r.minReplicas or 1, uid=r.uid, waiting=r.waiting, clone_done=r.cloneDone,
                      max_inodes=r.maxInodes)


def attr_to(b: Any, a: Any) -> None:
    b.ino, b.mode, b.nlink, b.uid, b.gid, b.rdev, b.size = a.ino, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.size
    b.atimeNs, b.mtimeNs, b.ctimeNs = a.atime_ns, a.mtime_ns, a.ctime_ns


def attr_from(r: Any) -> Attr:
    return Attr(ino=r.ino, mode=r.mode, nlink=r.nlink, uid=r.uid, gid=r.gid, rdev=r.rdev, size=r.size,
                atime_ns=r.atimeNs, mtime_ns=r.mtimeNs, ctime_ns=r.ctimeNs)


def blocks_to(init: Any, blocks: BlockMap) -> Any:
    """``init(n)`` makes the list of n ``BlockRef``: one per slice, a block's slices in order."""
    refs = [(idx, s) for idx, block in sorted(blocks.items()) for s in block]
    out = init(len(refs))
    for i, (idx, (h, off, n)) in enumerate(refs):
        out[i].index, out[i].hash, out[i].offset, out[i].length = idx, h, off, n
    return out


def blocks_from(refs: Any) -> BlockMap:
    out: dict[int, list[Slice]] = {}
    for r in refs:
        out.setdefault(r.index, []).append((bytes(r.hash), r.offset, r.length))
    return {idx: tuple(ss) for idx, ss in out.items()}


def writes_to(init: Any, writes: Mapping[int, BlockWrite]) -> None:
    """A commit's writes: a replace of no slices (a hole) is one ref of length 0."""
    refs = [(idx, w.append, s) for idx, w in sorted(writes.items())
            for s in (w.slices or ((b"", 0, 0),))]
    out = init(len(refs))
    for i, (idx, append, (h, off, n)) in enumerate(refs):
        out[i].index, out[i].hash, out[i].offset, out[i].length, out[i].append = idx, h, off, n, append


def writes_from(refs: Any) -> dict[int, BlockWrite]:
    out: dict[int, tuple[bool, list[Slice]]] = {}
    for r in refs:
        append, ss = out.setdefault(r.index, (r.append, []))
        if r.length:
            ss.append((bytes(r.hash), r.offset, r.length))
    return {idx: BlockWrite(tuple(ss), append) for idx, (append, ss) in out.items()}
