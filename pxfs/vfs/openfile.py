"""Per-inode state of the files open in one mount, and their handles.

Every handle of an inode shares one ``OpenInode``: the block map fetched at open (close-to-open: it is
fetched again by the first open after all handles were released), the dirty blocks written since the
last flush, and the local size and mtime, which run ahead of the metadata while data is dirty.

A dirty block stays in ``OpenInode.dirty`` until the commit naming its chunk has succeeded. While an
upload holds it, its buffer is frozen (immutable ``bytes``): readers still see it, and a writer
replaces it with a writable copy, so the bytes hashed are the bytes put and the newer bytes stay dirty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from pxfs.errors import NoSpace, PxfsError
from pxfs.meta import slices
from pxfs.meta.slices import BlockWrite
from pxfs.model import Attr
from pxfs.vfs.ports import BlockMap


@dataclass(eq=False)
class DirtyBlock:
    buf: bytearray | bytes  # block_size bytes; bytes past EOF stay zero
    # Bytes [0, valid) are file content (written, or a hole's zeros below EOF) when ``based``: a block
    # is worth uploading before fsync once the writer has filled it and moved on.
    valid: int
    since: float  # trio clock time of the oldest write to it not yet committed
    # based: ``buf`` is the whole block (it was a hole, or is being written whole). Otherwise only the
    # bytes of ``ranges`` are in ``buf``: a partial write of a stored block is never a read of it;
    # the upload adds ``ranges`` to the block as slices.
    based: bool = True
    ranges: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # written since the commit

    @property
    def frozen(self) -> bool:
        return isinstance(self.buf, bytes)

    @property
    def complete(self) -> bool:
        bs = len(self.buf)
        return (self.based and self.valid == bs) or self.ranges == [(0, bs)]

    def wrote(self, lo: int, hi: int) -> None:
        self.ranges = slices.union(self.ranges, lo, hi)

    def clip(self, keep: int) -> None:
        """Forget what was written at or past ``keep`` (a truncate)."""
        self.ranges = [(a, min(b, keep)) for a, b in self.ranges if a < keep]


class OpenInode:
    def __init__(self, attr: Attr, blocks: BlockMap, block_size: int) -> None:
        self.ino = attr.ino
        self.block_size = block_size
        self.handles = 0
        self.dirty: dict[int, DirtyBlock] = {}
        self.dirty_since: float | None = None  # trio clock time of the oldest unflushed write
        # Write-back failures, as Linux's errseq: every handle open on the file reports each failure
        # it has not seen at its next fsync or close, once (``Handle.unreported``).
        self.error: PxfsError | None = None  # the latest (an unreported ENOSPC stays: it says more)
        self.error_seq = 0  # failures so far
        self.error_seen = True  # some handle reported the latest one
        self.retry_at = 0.0  # after a failed upload, background uploads wait until then (trio clock)
        self.last_write = 0.0  # trio clock time of the latest write to it (the timer waits for a pause)
        # One upload (or truncate) at a time per inode: commits of one file land in order, and a
        # truncate never races an upload of the blocks it cuts.
        self.lock = trio.Lock()
        self.refresh(attr, blocks)

    def failed(self, err: PxfsError) -> None:
        """Writing this file's data back failed (the data stays dirty): every handle must hear of it."""
        if self.error_seen or not isinstance(self.error, NoSpace) or isinstance(err, NoSpace):
            self.error = err
        self.error_seq += 1
        self.error_seen = False

    def forget_errors(self) -> None:
        """The file is gone with its dirty data: nothing left to report."""
        self.error = None
        self.error_seen = True

    def refresh(self, attr: Attr, blocks: BlockMap) -> None:
        """Take a fresh block map from the metadata; dirty blocks (not yet committed) still win."""
        self.attr = attr
        self.blocks = dict(blocks)
        if self.dirty:
            self.size = max(self.size, attr.size)
            self.mtime_ns = max(self.mtime_ns, attr.mtime_ns)
        else:
            self.size = attr.size
            self.mtime_ns = attr.mtime_ns

    def committed(self, attr: Attr, writes: Mapping[int, BlockWrite]) -> None:
        """Record a successful commit of ``writes``, as the metadata applied them."""
        self.attr = attr
        for idx, w in writes.items():
            block = slices.add(self.blocks.get(idx, ()) if w.append else (), w.slices)
            if block:
                self.blocks[idx] = block
            else:
                self.blocks.pop(idx, None)
        self.size = max(self.size, attr.size)
        if not self.dirty:
            self.mtime_ns = attr.mtime_ns

    def cut(self, size: int) -> None:
        """Mirror a truncate to ``size`` on the cached block map (as the metadata does: the block
        cut in the middle keeps its chunk, with a shorter length)."""
        bs = self.block_size
        for idx in [i for i in self.blocks if i * bs >= size]:
            del self.blocks[idx]
        idx, keep = divmod(size, bs)
        if keep and idx in self.blocks:
            self.blocks[idx] = slices.cut(self.blocks[idx], keep)

    def patch(self, attr: Attr) -> Attr:
        """``attr`` as this mount must show it: dirty data makes the file longer and newer."""
        if not self.dirty:
            return attr
        return dataclasses.replace(attr, size=max(attr.size, self.size), mtime_ns=max(attr.mtime_ns, self.mtime_ns))


@dataclass(eq=False)
class Handle:
    fh: int
    inode: OpenInode
    flags: int
    next_off: int = 0  # where a sequential reader reads next: drives readahead
    seen_error: int = -1  # the inode's error_seq this handle has reported up to (set at open)

    def __post_init__(self) -> None:
        st = self.inode
        # As errseq_sample: a failure nobody reported yet is reported to a handle opened after it too.
        if self.seen_error < 0:
            self.seen_error = st.error_seq if st.error_seen else st.error_seq - 1

    def unreported(self) -> PxfsError | None:
        """The file's write-back failure this handle has not reported yet, if any; now reported."""
        st = self.inode
        if self.seen_error == st.error_seq:
            return None
        self.seen_error = st.error_seq
        st.error_seen = True
        return st.error
