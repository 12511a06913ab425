"""A pool: content-addressed chunks in one directory on a node's disk.

Layout under the pool directory::

    chunks/ab/abcdef...   one file per chunk, named by the hex BLAKE3-256 of its bytes,
                          fanned out by the first byte so no directory grows past ~1/256 of the pool
    chunks/ab/.tmp-*      a put in progress; left over only by a crash, removed by ``open()``
    corrupt/              chunks moved aside by ``quarantine()``, kept for a human to look at

A chunk is durable before ``put`` returns: temp file, fsync, rename, fsync of the directory.
The rename makes a chunk appear whole or not at all, so a crash never leaves a torn chunk
under its real name, and every read re-hashes the bytes anyway.

The class is synchronous on purpose: callers (``pxfs.chunks.local``) run it in worker threads,
so all state shared between threads (``used``, the count, puts in flight) sits behind one lock.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import blake3

from pxfs.durable import fsync_dir
from pxfs.errors import Corrupt, Invalid, NoSpace, NotFound

log = logging.getLogger(__name__)

HASH_LEN = 32
KLASSES = ("high", "medium", "low")
MiB = 1 << 20
GiB = 1 << 30
TMP_PREFIX = ".tmp-"
_HEX = frozenset("0123456789abcdef")


def default_reserve(capacity: int) -> int:
    """1% of the capacity, at least 4 MiB and at most 1 GiB, and never more than half the capacity.

    The reserve is headroom a pool never fills: it keeps the disk from running dry under the
    node's RocksDB, logs and temp files (which share the disk), and leaves room for the rename
    and directory blocks a put needs. 1% scales with big disks, the 1 GiB cap keeps it from
    wasting terabyte disks, the 4 MiB floor covers a few in-flight chunks, and the half-capacity
    cap lets a tiny pool (tests, demos) still hold something.
    """
    return min(max(capacity // 100, 4 * MiB), GiB, capacity // 2)


def chunk_file(pool: Path, h: bytes) -> Path:
    """Where the chunk named ``h`` lives under the pool directory ``pool``."""
    if len(h) != HASH_LEN:
        raise Invalid(f"chunk {bytes(h).hex()[:16]}", f"hash is {len(h)} bytes, not {HASH_LEN}")
    hx = h.hex()
    return pool / "chunks" / hx[:2] / hx


def chunk_name(h: bytes) -> str:
    """The short printable name of a chunk used in errors and logs."""
    return f"chunk {h.hex()[:16]}"


def check_chunk(h: bytes, data: bytes | memoryview) -> None:
    """Raise ``Invalid`` unless ``h`` is a 32-byte hash and ``data`` hashes to it."""
    if len(h) != HASH_LEN:
        raise Invalid(f"chunk {bytes(h).hex()[:16]}", f"hash is {len(h)} bytes, not {HASH_LEN}")
    if blake3.blake3(data).digest() != h:
        raise Invalid(chunk_name(h), "hash mismatch: bytes do not match their BLAKE3 name")


class Pool:
    """Chunks on one disk directory, bounded by ``capacity - reserve`` and by the disk itself."""

    def __init__(
        self, path: str | Path, capacity: int, reserve: int | None = None, klass: str = "medium"
    ) -> None:
        self._path = Path(path)
        if capacity <= 0:
            raise Invalid(f"pool {self._path}", f"capacity must be positive, got {capacity}")
        if reserve is None:
            reserve = default_reserve(capacity)
        if not 0 <= reserve < capacity:
            raise Invalid(
                f"pool {self._path}", f"reserve {reserve} must be >= 0 and below capacity {capacity}"
            )
        if klass not in KLASSES:
            raise Invalid(f"pool {self._path}", f"class {klass!r} is not one of {', '.join(KLASSES)}")
        self._capacity = capacity
        self._reserve = reserve
        self._klass = klass
        self._chunks = self._path / "chunks"
        self._corrupt = self._path / "corrupt"
        self._cond = threading.Condition()
        # Hashes with a put, delete or quarantine in progress: operations on one hash take turns,
        # which keeps `used` exact when two threads put or delete the same chunk at once.
        self._busy: set[bytes] = set()
        self._used = 0
        self._count = 0
        self._opened = False

    def __repr__(self) -> str:
        return f"Pool({str(self._path)!r}, capacity={self._capacity}, klass={self._klass!r})"

    # -- properties -------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def klass(self) -> str:
        return self._klass

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def reserve(self) -> int:
        return self._reserve

    @property
    def used(self) -> int:
        """Bytes of chunk data stored (file sizes, not disk blocks)."""
        with self._cond:
            return self._used

    @property
    def chunk_count(self) -> int:
        with self._cond:
            return self._count

    @property
    def free(self) -> int:
        """Bytes a put may still add: the quota left, bounded by the disk's free space above the reserve.

        A put of ``n`` bytes succeeds exactly when ``n <= free`` (barring races with other writers).
        """
        with self._cond:
            quota_left = self._capacity - self._reserve - self._used
        return max(0, min(quota_left, self._disk_free() - self._reserve))

    def _disk_free(self) -> int:
        st = os.statvfs(self._path)
        return st.f_bavail * st.f_frsize

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        """Create the layout if missing, drop crash leftovers and count what is stored."""
        self._chunks.mkdir(parents=True, exist_ok=True)
        self._corrupt.mkdir(exist_ok=True)
        for i in range(256):
            (self._chunks / f"{i:02x}").mkdir(exist_ok=True)
        fsync_dir(self._chunks)
        fsync_dir(self._path)
        used = count = leftovers = 0
        for i in range(256):
            fan = self._chunks / f"{i:02x}"
            with os.scandir(fan) as it:
                for entry in it:
                    if entry.name.startswith(TMP_PREFIX):
                        os.unlink(entry.path)
                        leftovers += 1
                    elif entry.is_file(follow_symlinks=False):
                        used += entry.stat(follow_symlinks=False).st_size
                        count += 1
            if leftovers:
                fsync_dir(fan)
        with self._cond:
            self._used = used
            self._count = count
            self._opened = True
        if leftovers:
            log.warning("pool=%s removed %d temp files left by a crash", self._path, leftovers)
        log.info("pool=%s opened chunks=%d used=%d capacity=%d", self._path, count, used, self._capacity)

    def _check_open(self) -> None:
        if not self._opened:
            raise Invalid(f"pool {self._path}", "not open: call open() first")

    def _file(self, h: bytes) -> Path:
        return chunk_file(self._path, h)

    @contextmanager
    def _turn(self, h: bytes) -> Iterator[None]:
        with self._cond:
            while h in self._busy:
                self._cond.wait()
            self._busy.add(h)
        try:
            yield
        finally:
            with self._cond:
                self._busy.discard(h)
                self._cond.notify_all()

    # -- chunks -----------------------------------------------------------------------------

    def put(self, h: bytes, data: bytes | memoryview) -> bool:
        """Store a chunk durably; False if it was already here (dedup), True if stored now.

        Raises ``Invalid`` for a bad hash (nothing written) and ``NoSpace`` past the reserve.
        """
        check_chunk(h, data)
        return self._store(h, data)

    def _store(self, h: bytes, data: bytes | memoryview) -> bool:
        """``put`` without the hash check, for callers that have just checked it (LocalChunkStore)."""
        self._check_open()
        final = self._file(h)
        if final.exists():
            return False
        n = len(data) if isinstance(data, bytes) else data.nbytes
        with self._turn(h):
            # Another thread may have stored it while we waited for our turn.
            if final.exists():
                return False
            self._claim(h, n)
            try:
                self._write(final, data)
            except BaseException:
                with self._cond:
                    self._used -= n
                raise
            with self._cond:
                self._count += 1
        return True

    def _claim(self, h: bytes, n: int) -> None:
        # Counted before writing so concurrent puts cannot overcommit together; undone on failure.
        with self._cond:
            if self._used + n > self._capacity - self._reserve:
                raise NoSpace(
                    f"pool {self._path}",
                    f"{chunk_name(h)} of {n} bytes does not fit: {self._used} of "
                    f"{self._capacity - self._reserve} usable bytes used (reserve {self._reserve})",
                )
            disk_free = self._disk_free()
            if disk_free - n < self._reserve:
                raise NoSpace(
                    f"pool {self._path}",
                    f"{chunk_name(h)} of {n} bytes does not fit: the disk has {disk_free} bytes free "
                    f"and the pool keeps {self._reserve} in reserve",
                )
            self._used += n

    def _write(self, final: Path, data: bytes | memoryview) -> None:
        # The temp file lives next to its final name so the rename stays within one directory;
        # a unique suffix keeps concurrent writers (and a dead one's leftovers) apart.
        tmp = final.with_name(f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:12]}")
        view = memoryview(data).cast("B")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)  # owner only
            try:
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"pool {self._path}", f"disk full writing chunk {final.name[:16]}: {e}") from e
            raise
        fsync_dir(final.parent)

    def get(self, h: bytes) -> bytes:
        """The chunk's bytes, verified; ``NotFound`` if absent, ``Corrupt`` if they do not hash to ``h``."""
        self._check_open()
        try:
            with open(self._file(h), "rb", buffering=0) as f:
                data = f.read()
        except FileNotFoundError:
            raise NotFound(chunk_name(h), f"not in pool {self._path}") from None
        if blake3.blake3(data).digest() != h:
            # Left in place: the caller decides whether to quarantine it and repair from a replica.
            raise Corrupt(chunk_name(h), f"bytes in pool {self._path} do not match their BLAKE3 name")
        return data

    def has(self, h: bytes) -> bool:
        return self._file(h).exists()

    def touch(self, h: bytes) -> bool:
        """Mark an existing chunk as just written (GC's grace period counts from here); False if absent.

        A put that dedups against a chunk nobody references yet must keep GC from sweeping it
        before the write's commit lands.
        """
        with self._turn(h):  # never between sweep's age check and its unlink
            try:
                os.utime(self._file(h))
                return True
            except FileNotFoundError:
                return False

    def sweep(self, keep: set[bytes], older_than: float, dry_run: bool,
              until: float = math.inf) -> tuple[int, int, int]:
        """Delete chunks not in ``keep`` whose files are older than ``older_than`` (epoch seconds),
        stopping at ``until`` (epoch seconds: past it, ``keep`` may miss newly named chunks).

        Returns (scanned, deleted, bytes freed). Safe to stop at any point and run again.
        """
        scanned = deleted = freed = 0
        for h in list(self.iter_hashes()):
            if time.time() >= until:
                break
            scanned += 1
            if h in keep:
                continue
            size = self._sweep_one(h, older_than, dry_run)
            if size is not None:
                deleted += 1
                freed += size
        return scanned, deleted, freed

    def _sweep_one(self, h: bytes, older_than: float, dry_run: bool) -> int | None:
        path = self._file(h)
        with self._turn(h):
            try:
                st = path.stat()
            except FileNotFoundError:
                return None
            if st.st_mtime >= older_than:
                return None
            if dry_run:
                return st.st_size
            try:
                os.unlink(path)
            except FileNotFoundError:
                return None
            with self._cond:
                self._used -= st.st_size
                self._count -= 1
            return st.st_size

    def has_many(self, hs: list[bytes]) -> list[bool]:
        return [self.has(h) for h in hs]

    def size_of(self, h: bytes) -> int | None:
        try:
            return os.stat(self._file(h)).st_size
        except FileNotFoundError:
            return None

    def delete(self, h: bytes) -> bool:
        """Remove a chunk; False if it was not here."""
        self._check_open()
        path = self._file(h)
        with self._turn(h):
            try:
                size = os.stat(path).st_size
                os.unlink(path)
            except FileNotFoundError:
                return False
            with self._cond:
                self._used -= size
                self._count -= 1
        fsync_dir(path.parent)
        return True

    def quarantine(self, h: bytes) -> Path | None:
        """Move a (corrupt) chunk out of the store into ``corrupt/``; its new path, or None if absent.

        The chunk stops counting as stored, so a repair can put a good copy under the same name.
        """
        self._check_open()
        path = self._file(h)
        dest = self._corrupt / f"{path.name}.{time.time_ns()}"
        with self._turn(h):
            try:
                size = os.stat(path).st_size
                os.rename(path, dest)
            except FileNotFoundError:
                return None
            with self._cond:
                self._used -= size
                self._count -= 1
        fsync_dir(self._corrupt)
        fsync_dir(path.parent)
        log.warning("pool=%s quarantined %s to %s", self._path, chunk_name(h), dest)
        return dest

    def iter_hashes(self) -> Iterator[bytes]:
        """Every stored chunk's hash, in no order; puts and deletes meanwhile may or may not show."""
        for i in range(256):
            with os.scandir(self._chunks / f"{i:02x}") as it:
                names = [e.name for e in it]
            for name in names:
                if len(name) == 2 * HASH_LEN and _HEX.issuperset(name):
                    yield bytes.fromhex(name)
