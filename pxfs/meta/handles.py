"""Open handles per mount, and when the orphans they keep alive may be freed.

Open counts live in the coordinator's memory, not in the keyspace: a handle is opened and closed
far more often than metadata changes, and a batch per open would cost a replicated write. What is
in the keyspace is the orphan mark (``O<ino>``) of a file unlinked while open. A new coordinator
therefore starts with no counts at all, and must not free an orphan while a mount that held it
before the failover has not yet told it so: the mounts re-register their handles when they
reconnect (``OpenHandles.replace``), and ``PendingPurge`` keeps every orphan until every mount
registered for the volume has reconnected or let its registration expire. Until then any inode
may be open somewhere, so an unlink orphans instead of freeing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from pxfs.meta import keys
from pxfs.meta.keys import OP_SLOTS
from pxfs.meta.txn import Txn

ORPHAN_BATCH = 256  # orphans one batch frees at most (each up to PURGE_BATCH keys)


class PendingPurge:
    """The mounts a new coordinator waits for before it frees orphans nobody reopened.

    ``registered`` maps each mount id registered for the volume to the time (on ``clock``) its
    registration was last renewed; it expires ``ttl`` later. A mount is settled when it reconnected
    (its handles are counted here) or its registration expired (it is gone, or cut off for so long
    that its handles are stale anyway). The registrations may come later than the purge is
    deferred (``learn``): a coordinator takes the role before it has read the control store, and
    mounts that reconnect meanwhile are remembered.
    """

    def __init__(self, registered: Mapping[str, float] | None, ttl: float, clock: Callable[[], float]) -> None:
        self._ttl, self._clock = ttl, clock
        self._back: set[str] = set()
        self._expires: dict[str, float] | None = None
        if registered is not None:
            self.learn(registered)

    @property
    def known(self) -> bool:
        """Whether the registered mounts have been given (``learn``)."""
        return self._expires is not None

    def learn(self, registered: Mapping[str, float]) -> None:
        self._expires = {m: ts + self._ttl for m, ts in registered.items() if m not in self._back}

    def reconnected(self, mount: str) -> None:
        self._back.add(mount)
        if self._expires is not None:
            self._expires.pop(mount, None)

    def waiting(self) -> list[str] | None:
        """Mounts neither reconnected nor expired (None: not known yet); no orphan is freed until none."""
        if self._expires is None:
            return None
        now = self._clock()
        for m in [m for m, t in self._expires.items() if t <= now]:
            del self._expires[m]
        return sorted(self._expires)


class OpenHandles:
    """Open counts per (mount, inode); an inode is open while any mount holds it."""

    def __init__(self) -> None:
        self._by_mount: dict[str, Counter[int]] = {}
        self._total: Counter[int] = Counter()
        # The op ids whose create counted a handle here, per mount: a replayed create must not
        # count its handle twice. Cleared with the mount's counts by ``replace``.
        self._created: dict[str, dict[bytes, None]] = {}
        self.pending: PendingPurge | None = None

    def is_open(self, ino: int) -> bool:
        """Whether ``ino`` may be open: counted here, or held by a mount that has not reconnected yet."""
        return self._total[ino] > 0 or self.pending is not None

    def counted(self, ino: int) -> bool:
        return self._total[ino] > 0

    def hold(self, mount: str, ino: int, op_id: bytes = b"") -> None:
        if op_id:
            created = self._created.setdefault(mount, {})
            if op_id in created:
                return  # the create this replays already counted its handle here
            created[op_id] = None
            if len(created) > OP_SLOTS:
                del created[next(iter(created))]
        self._by_mount.setdefault(mount, Counter())[ino] += 1
        self._total[ino] += 1

    def drop(self, mount: str, ino: int) -> bool:
        """Count one close; True when that was the inode's last handle anywhere."""
        mine = self._by_mount.get(mount)
        if mine is None or mine[ino] <= 0:
            return False  # opened at a previous coordinator (and not re-registered): nothing to undo
        self._take(mount, mine, ino, 1)
        return self._total[ino] == 0

    def replace(self, mount: str, inos: Iterable[int]) -> list[int]:
        """``mount`` holds exactly ``inos`` now (a reconnect); returns inodes left with no handle."""
        closed = self.forget(mount)
        for ino in inos:
            self.hold(mount, ino)
        return [ino for ino in closed if self._total[ino] == 0]

    def forget(self, mount: str) -> list[int]:
        """Drop every handle of ``mount`` (it detached or expired); returns inodes left with none."""
        self._created.pop(mount, None)
        mine = self._by_mount.get(mount)
        if mine is None:
            return []
        closed = []
        for ino, n in list(mine.items()):
            self._take(mount, mine, ino, n)
            if self._total[ino] == 0:
                closed.append(ino)
        return closed

    def _take(self, mount: str, mine: Counter[int], ino: int, n: int) -> None:
        mine[ino] -= n
        if mine[ino] <= 0:
            del mine[ino]
        if not mine:
            del self._by_mount[mount]
        self._total[ino] -= n
        if self._total[ino] <= 0:
            del self._total[ino]

    def mounts(self) -> list[str]:
        return sorted(self._by_mount)


def free_unopened(txn: Txn, handles: OpenHandles, inos: list[int]) -> None:
    """Free those of ``inos`` that are unlinked and may not be open anywhere; commits ``txn``."""
    for ino in inos:
        a = txn.find(ino)
        if a is not None and a.nlink == 0 and not handles.is_open(ino):
            txn.purge(a)
    txn.commit()


def reopen(txn: Txn, handles: OpenHandles, mount: str, inos: list[int]) -> list[int]:
    """``mount`` holds exactly ``inos`` now; returns those that no longer exist (their handles are dropped)."""
    gone = sorted({ino for ino in inos if txn.find(ino) is None})
    closed = handles.replace(mount, [ino for ino in inos if ino not in gone])
    if handles.pending is not None:
        handles.pending.reconnected(mount)
    free_unopened(txn, handles, closed)
    return gone


def purge_orphans(txn: Txn, handles: OpenHandles) -> tuple[int, bool]:
    """Free the orphans that no handle counted here holds, as one bounded batch (a few hundred
    inodes, or PURGE_BATCH keys: a file's blocks past that go to the purge list); commits ``txn``.
    Returns how many were freed and whether some are left for the next batch."""
    count = 0
    for key, _ in txn.kv.scan(keys.ORPHAN_PREFIX):
        if count >= ORPHAN_BATCH or txn.size >= keys.PURGE_BATCH:
            txn.commit()
            return count, True
        ino = keys.orphan_ino(key)
        if handles.counted(ino):
            continue
        a = txn.find(ino)
        if a is None:
            txn.delete(key)
        else:
            txn.purge(a)
        count += 1
    txn.commit()
    return count, False
