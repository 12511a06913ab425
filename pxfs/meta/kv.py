"""The tiny transactional key-value store under the metadata, and its two engines.

The meta layer needs little from storage: point reads, ordered prefix scans and one atomic batch
per mutation. Keeping the interface that small lets the same POSIX code run on an in-memory engine
(tests, scratch volumes) and on RocksDB (the coordinator and its followers).

Replication rides on the same atomic write: every batch gets the next sequence number and is
appended, encoded, to a replication log inside the very write that applies it, so the log can
never disagree with the data after a crash. Followers feed the coordinator's entries to
``apply``, which insists on gap-free sequence numbers.

The counter and the log live under ``RESERVED`` (keys starting with ``0xff``), a prefix the
metadata schema in ``pxfs.meta.keys`` never uses; batches may not touch it and scans hide it.

The log is trimmed (``trim_to``) once every replica that needs its entries holds them; a follower
that fell behind the trimmed point gets a full copy instead (``load`` then ``finish_load``: the
keyspace as of one sequence number, written raw, marked as partial until it is complete).
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

from rocksdict import Checkpoint, Options, Rdict, WriteBatch, WriteOptions

from pxfs.errors import Conflict, Corrupt, Invalid

RESERVED = b"\xff"
SEQ_KEY = RESERVED + b"seq"  # last applied sequence number
TRIM_KEY = RESERVED + b"trim"  # highest sequence number dropped from the log
LOAD_KEY = RESERVED + b"load"  # present while a full copy is being loaded: the keyspace is partial
LOG_PREFIX = RESERVED + b"L"  # + seq:8 big-endian -> encoded batch

_U64 = struct.Struct(">Q")
_OP = struct.Struct(">BI")  # op tag, key length
_LEN = struct.Struct(">I")
_PUT, _DELETE = 1, 2

# One primitive write: (key, value) puts, (key, None) deletes.
Op = tuple[bytes, bytes | None]


class Batch:
    """An ordered list of puts and deletes applied all-or-nothing; later ops on a key win."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def put(self, key: bytes, value: bytes) -> None:
        self.ops.append((bytes(key), bytes(value)))

    def delete(self, key: bytes) -> None:
        self.ops.append((bytes(key), None))

    def __len__(self) -> int:
        return len(self.ops)

    def __repr__(self) -> str:
        return f"Batch({len(self.ops)} ops)"

    def encode(self) -> bytes:
        """Compact binary form shipped to followers: per op a tag, a length-prefixed key and value."""
        parts: list[bytes] = []
        for key, value in self.ops:
            parts.append(_OP.pack(_DELETE if value is None else _PUT, len(key)))
            parts.append(key)
            if value is not None:
                parts.append(_LEN.pack(len(value)))
                parts.append(value)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Batch:
        """Parse ``encode`` output; a truncated or garbled batch is ``Corrupt``, never half-read."""
        batch = cls()
        view = memoryview(data)
        pos = 0
        try:
            while pos < len(view):
                tag, klen = _OP.unpack_from(view, pos)
                pos += _OP.size
                key = bytes(view[pos : pos + klen])
                pos += klen
                if tag == _DELETE:
                    value = None
                elif tag == _PUT:
                    (vlen,) = _LEN.unpack_from(view, pos)
                    pos += _LEN.size
                    value = bytes(view[pos : pos + vlen])
                    pos += vlen
                else:
                    raise Corrupt("batch", f"unknown op tag {tag} at offset {pos - _OP.size}")
                if pos > len(view):
                    raise Corrupt("batch", "truncated")
                batch.ops.append((key, value))
        except struct.error as e:
            raise Corrupt("batch", f"truncated: {e}") from None
        return batch


def _log_key(seq: int) -> bytes:
    return LOG_PREFIX + _U64.pack(seq)


def _prefix_end(prefix: bytes) -> bytes | None:
    """Smallest key greater than every key starting with ``prefix`` (None: no upper bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class KV(ABC):
    """Sequence-numbered, logged, atomic KV; engines supply only the four raw primitives."""

    def __init__(self) -> None:
        # Called after every committed batch (coordinator and followers alike), so a replica can
        # act on what the batch means (e.g. take a snapshot) at exactly that point of the log.
        self.after_commit: Callable[[int, Batch], None] | None = None
        # What the owner of the keyspace refuses in any batch, before it is committed (raises).
        self.check_batch: Callable[[Batch], None] | None = None
        raw = self._raw_get(SEQ_KEY)
        self._seq = _U64.unpack(raw)[0] if raw else 0
        raw = self._raw_get(TRIM_KEY)
        self._trimmed = _U64.unpack(raw)[0] if raw else 0
        # Since the last compaction (RocksKV.compact): bytes of batches written and trimmed, and
        # delete ops, what makes the files on disk larger than the live data.
        self.churn_bytes = 0
        self.churn_deletes = 0
        self._loading = self._raw_get(LOAD_KEY) is not None
        # Group commit: with deferred_sync, batches are written without waiting for the disk, and the
        # owner makes them durable with ``sync`` (in a worker thread, one sync for every batch written
        # before it) before it counts them as held; ``synced`` is the last seq known to be on disk.
        self.deferred_sync = False
        self.synced = self._seq
        # Keys read (gets, keys a scan yielded) and written by the thread that opened the store, the
        # owner's event loop: what one step costs there, so that a coordinator can tell a step that
        # grows with the volume (issue 13). Scans in worker threads hold no loop: not counted.
        self.touched = 0
        self._owner = threading.get_ident()

    # -- engine primitives -------------------------------------------------------------------
    @abstractmethod
    def _raw_get(self, key: bytes) -> bytes | None: ...

    @abstractmethod
    def _raw_iter(self, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        """Keys in ``[start, end)`` in byte order (``end`` None: to the last key)."""

    @abstractmethod
    def _raw_write(self, ops: list[Op], durable: bool) -> None:
        """Apply all ``ops`` atomically; ``durable`` asks for the write to be on disk on return."""

    @abstractmethod
    def close(self) -> None: ...

    # -- reads ----------------------------------------------------------------------------------
    @property
    def seq(self) -> int:
        """Sequence number of the last applied batch, 0 for an empty store."""
        return self._seq

    @property
    def trimmed(self) -> int:
        """Highest sequence number no longer in the log (0: the log is whole)."""
        return self._trimmed

    @property
    def loading(self) -> bool:
        """A full copy was begun here and not finished: the keyspace is partial, good for nothing."""
        return self._loading

    def get(self, key: bytes) -> bytes | None:
        if threading.get_ident() == self._owner:
            self.touched += 1
        return self._raw_get(key)

    def scan(
        self, prefix: bytes, start: bytes | None = None, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Keys starting with ``prefix`` in byte order, from ``start`` (inclusive) if given.

        Reserved keys are hidden unless the prefix itself asks for them.
        """
        lo = prefix if start is None or start < prefix else start
        end = _prefix_end(prefix)
        if not prefix.startswith(RESERVED) and (end is None or end > RESERVED):
            end = RESERVED
        if limit is not None and limit <= 0:
            return
        owner = threading.get_ident() == self._owner
        count = 0
        for key, value in self._raw_iter(lo, end):
            if owner:
                self.touched += 1
            yield key, value
            count += 1
            if limit is not None and count >= limit:
                return

    # -- writes ---------------------------------------------------------------------------------
    def write(self, batch: Batch) -> int:
        """Apply ``batch`` atomically as the next sequence number (returned), logging it."""
        self._check(batch)
        self._commit(self._seq + 1, batch, batch.encode())
        return self._seq

    def apply(self, seq: int, batch_bytes: bytes) -> None:
        """Follower side: apply the coordinator's batch ``seq``, which must follow ours exactly."""
        if self._loading:
            raise Conflict("kv", f"batch {seq} refused: a full copy is half loaded here (reset it first)")
        if seq != self._seq + 1:
            raise Conflict("kv", f"batch {seq} does not follow applied seq {self._seq}")
        batch = Batch.decode(batch_bytes)
        self._check(batch)
        self._commit(seq, batch, batch_bytes)

    def log_since(self, seq: int) -> list[tuple[int, bytes]]:
        """Logged batches with sequence numbers above ``seq``, for a follower catching up.

        Conflict when some of them were trimmed (the follower needs a full copy) or when ``seq``
        is ahead of ours (the follower has history we never had).
        """
        if seq < self._trimmed:
            raise Conflict("kv", f"log trimmed up to {self._trimmed}, cannot serve from {seq}")
        if seq > self._seq:
            raise Conflict("kv", f"seq {seq} is ahead of ours ({self._seq})")
        start = _log_key(seq + 1)
        return [(_U64.unpack(k[len(LOG_PREFIX) :])[0], v) for k, v in self.scan(LOG_PREFIX, start)]

    def log_entry(self, seq: int) -> bytes | None:
        """The logged batch with sequence number ``seq``, if still in the log."""
        return self._raw_get(_log_key(seq))

    def trim_log(self, keep: int) -> None:
        """Drop all but the last ``keep`` log entries (bounded log; older followers need a copy)."""
        if keep < 0:
            raise Invalid("kv", f"cannot keep {keep} log entries")
        self.trim_to(self._seq - keep)

    def trim_to(self, upto: int) -> int:
        """Drop the log entries up to ``upto`` (never the newest: a follower's last entry is how a
        coordinator tells whether their histories agree); returns the bytes dropped."""
        upto = min(upto, self._seq - 1)
        if upto <= self._trimmed:
            return 0
        ops: list[Op] = []
        dropped = 0
        for key, value in self.scan(LOG_PREFIX, _log_key(self._trimmed + 1)):
            if key > _log_key(upto):
                break
            ops.append((key, None))
            dropped += len(value)
        ops.append((TRIM_KEY, _U64.pack(upto)))
        # Not synced: losing a trim in a crash only keeps entries a little longer.
        self._raw_write(ops, durable=False)
        self.touched += len(ops)
        self._trimmed = upto
        self.churn_bytes += dropped
        self.churn_deletes += len(ops) - 1
        return dropped

    def log_floor(self, entries: int, nbytes: int) -> int:
        """The highest ``upto`` for ``trim_to`` that keeps the newest entries, up to ``entries`` of
        them and ``nbytes`` of batches: what a follower briefly out of sync may still be sent."""
        sizes = [(_U64.unpack(k[len(LOG_PREFIX) :])[0], len(v))
                 for k, v in self.scan(LOG_PREFIX, _log_key(max(self._trimmed, self._seq - entries) + 1))]
        kept = 0
        for seq, size in reversed(sizes):
            kept += size
            if kept > nbytes:
                return seq
        return max(self._trimmed, self._seq - entries)

    # -- full copies ------------------------------------------------------------------------------
    def load(self, items: list[tuple[bytes, bytes]]) -> None:
        """Write part of a full copy into an empty keyspace (or one a copy was begun in): raw puts,
        no sequence number, no log; the keyspace is marked partial until ``finish_load``."""
        if self._seq:
            raise Conflict("kv", f"a full copy goes into an empty keyspace, this one is at seq {self._seq}")
        batch = Batch()
        for key, value in items:
            batch.put(key, value)
        self._check(batch)
        self._raw_write([*batch.ops, (LOAD_KEY, b"")], durable=False)
        self._loading = True
        self.churn_bytes += sum(len(k) + len(v) for k, v in items)

    def finish_load(self, seq: int, last_batch: bytes) -> None:
        """The copy is complete as of batch ``seq``, whose encoded form is ``last_batch``: the log
        holds that one entry (for the next coordinator's comparison of histories) and nothing older."""
        if self._seq or not self.loading:
            raise Conflict("kv", f"no full copy is being loaded here (seq {self._seq})")
        if seq < 1:
            raise Invalid("kv", f"a full copy ends at a batch, not at seq {seq}")
        ops: list[Op] = [(_log_key(seq), last_batch), (SEQ_KEY, _U64.pack(seq)), (TRIM_KEY, _U64.pack(seq - 1)),
                         (LOAD_KEY, None)]
        self._raw_write(ops, durable=True)  # synced: covers the unsynced parts written before it
        self._seq, self._trimmed, self._loading = seq, seq - 1, False
        self.synced = seq

    def _check(self, batch: Batch) -> None:
        for key, _ in batch.ops:
            if key.startswith(RESERVED):
                raise Invalid("kv", f"batch touches reserved key {key!r}")
        if self.check_batch is not None:
            self.check_batch(batch)

    def sync(self) -> int:
        """Put every batch written so far on disk; returns the seq that is now durable. Safe in a
        worker thread while the owner writes (what it writes meanwhile may or may not be covered)."""
        seq = self._seq
        self._raw_sync()
        self.synced = max(self.synced, seq)
        return seq

    @abstractmethod
    def _raw_sync(self) -> None:
        """Make every write so far durable."""

    def _commit(self, seq: int, batch: Batch, encoded: bytes) -> None:
        ops = [*batch.ops, (SEQ_KEY, _U64.pack(seq)), (_log_key(seq), encoded)]
        self._raw_write(ops, durable=not self.deferred_sync)
        self._seq = seq
        if not self.deferred_sync:
            self.synced = seq
        self.touched += len(ops)
        self.churn_bytes += len(encoded)
        self.churn_deletes += sum(1 for _, v in batch.ops if v is None)
        if self.after_commit is not None:
            self.after_commit(seq, batch)


class MemKV(KV):
    """In-memory engine: a dict for values plus a sorted key list for scans (tests, scratch)."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []
        super().__init__()

    def _raw_get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def _raw_iter(self, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        # Restart the bisection after every yield so that writes between steps cannot skip keys.
        key = start
        i = bisect.bisect_left(self._keys, key)
        while i < len(self._keys):
            key = self._keys[i]
            if end is not None and key >= end:
                return
            yield key, self._data[key]
            i = bisect.bisect_right(self._keys, key)

    def _raw_write(self, ops: list[Op], durable: bool) -> None:
        for key, value in ops:
            if value is None:
                if self._data.pop(key, None) is not None:
                    del self._keys[bisect.bisect_left(self._keys, key)]
            else:
                if key not in self._data:
                    bisect.insort(self._keys, key)
                self._data[key] = value

    def _raw_sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class RocksKV(KV):
    """RocksDB engine (rocksdict, raw bytes mode); data and log writes are synced to disk."""

    def __init__(self, path: str) -> None:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self._db = Rdict(path, options=opts)
        self._sync = WriteOptions()
        self._sync.sync = True
        self._nosync = WriteOptions()
        self._closed = False
        self._syncing = threading.Lock()  # close() waits for a sync in a worker thread
        self.path = path
        # compact() runs in a worker thread; rocksdict refuses a close() during it ("Already
        # borrowed"), so close waits for it under this lock.
        self._compacting = threading.Lock()
        super().__init__()

    def _raw_get(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    def _raw_iter(self, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        it = self._db.iter()
        it.seek(start)
        while it.valid():
            key = it.key()
            if end is not None and key >= end:
                return
            yield key, it.value()
            it.next()

    def _raw_write(self, ops: list[Op], durable: bool) -> None:
        wb = WriteBatch(raw_mode=True)
        for key, value in ops:
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        self._db.write(wb, write_opt=self._sync if durable else self._nosync)

    def _raw_sync(self) -> None:
        with self._syncing:
            if not self._closed:
                self._db.flush_wal(True)

    def checkpoint(self, path: str) -> None:
        """A consistent copy of the store as of now, in ``path`` (hard links: cost ~ metadata, not data)."""
        Checkpoint(self._db).create_checkpoint(path)

    def compact(self) -> None:
        """Flush the memtable and compact everything: deleted and trimmed records leave the files
        (and the write-ahead log) only so. Blocking, safe in a worker thread while the owner reads
        and writes; resets the churn counters."""
        with self._compacting:
            if self._closed:
                return
            self.churn_bytes = self.churn_deletes = 0
            self._db.flush()
            self._db.compact_range(None, None)

    def estimate_keys(self) -> int:
        return int(self._db.property_int_value("rocksdb.estimate-num-keys") or 0)

    def disk_bytes(self) -> int:
        """Bytes of the files of the database (not of its snapshots: they are elsewhere)."""
        total = 0
        try:
            for entry in os.scandir(self.path):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            return 0  # moved aside or dropped since it was opened
        return total

    def close(self) -> None:
        """Close the database; closing twice is harmless (shutdown paths may overlap)."""
        with self._compacting, self._syncing:
            if not self._closed:
                self._closed = True
                self._db.flush_wal(True)  # batches written with deferred_sync and not yet synced
                self._db.close()
