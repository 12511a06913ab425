"""Jobs that rewrite much of a keyspace, in many bounded batches: a restore to a snapshot, an fsck repair.

One batch per job would be simple and atomic, but a volume of millions of keys makes it a batch
past any message or replication limit, and a step that holds the coordinator's event loop for
seconds. So a job is cut into steps of at most ``STEP_OPS`` ops, ``STEP_BYTES`` bytes and
``STEP_SCAN`` keys read, each its own replicated batch. In between, the keyspace is a mix (part
restored, part repaired): the job's first batch writes the maintenance mark (``M``, see
``pxfs.meta.keys``) and its last deletes it, and while the mark is there the coordinator serves no
mount and finishes the job first, whoever began it and whatever crashed on the way (a failover
included: the mark is replicated like everything else). The mark holds what the job needs to go
on: a restore's names its snapshot and its cursor (the keys up to it are the snapshot's already),
and a step moves the cursor in the very batch that writes the keys it settles.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

from pxfs.errors import Corrupt
from pxfs.meta import keys, quota
from pxfs.meta.kv import KV, Batch, Op

# Measured on a loaded 2-core machine (tests/system/test_loop.py): a restore step of 4096 ops and
# 8192 keys read took up to 60 ms of CPU, half of that stays under the ~50 ms a step may hold the loop.
STEP_OPS = 2048  # a batch of ~50 KB of small records
STEP_BYTES = 4 << 20  # big xattr values: well under the 64 MiB a replication message may carry
STEP_SCAN = 4096  # keys read per step, changed or not (two keyspaces that mostly agree)

RESTORE, FSCK = "restore", "fsck"

# Kept as they are by a restore: they belong to the volume and its mounts now, not to a point in
# time (a restore keeps answering today's retries; snapshots stay), and the mark is the job's own.
_NOT_RESTORED = (keys.SNAPSHOT_PREFIX, keys.OP_PREFIX, keys.MAINTENANCE_KEY)
# Restored at the end, by rule rather than copied (see ``restore_step``).
_NEXT = keys.counter_key(keys.NEXT_INODE)
_META = keys.counter_key(keys.META_BYTES)


@dataclass
class Job:
    """What the mark says: the job, and for a restore where it is."""

    job: str
    snapshot: str = ""
    after: str = ""  # hex of the last key a restore step settled ("": none yet)
    count_meta: bool = False  # the snapshot predates the metaBytes counter: count it on the way
    meta_bytes: int = 0  # counted so far

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def describe(self) -> str:
        return f"a restore to snapshot {self.snapshot}" if self.job == RESTORE else "an fsck repair"


def pending(kv: KV) -> Job | None:
    """The job half done in ``kv``, if any."""
    raw = kv.get(keys.MAINTENANCE_KEY)
    if raw is None:
        return None
    try:
        fields = json.loads(raw)
        job = Job(**fields)
        bytes.fromhex(job.after)
    except (ValueError, TypeError) as err:
        raise Corrupt("maintenance mark", f"unreadable ({err})") from None
    if job.job not in (RESTORE, FSCK):
        raise Corrupt("maintenance mark", f"unknown job {job.job!r}")
    return job


def _mark(b: Batch, job: Job) -> None:
    b.put(keys.MAINTENANCE_KEY, job.encode())


def begin_restore(kv: KV, snapshot_name: str, snapshot: KV) -> None:
    """The first batch of a restore: the mark, from the start (any job half done before is
    superseded: a restore sets every key anyway)."""
    b = Batch()
    _mark(b, Job(RESTORE, snapshot_name, count_meta=snapshot.get(_META) is None))
    kv.write(b)


def begin_fsck(kv: KV) -> None:
    b = Batch()
    _mark(b, Job(FSCK))
    kv.write(b)


def end(kv: KV) -> None:
    """The last batch of an fsck repair (a restore ends in its last step)."""
    b = Batch()
    b.delete(keys.MAINTENANCE_KEY)
    kv.write(b)


def _items(kv: KV, after: bytes) -> Iterator[tuple[bytes, bytes]]:
    start = after + b"\0" if after else None
    for key, value in kv.scan(b"", start):
        if not key.startswith(_NOT_RESTORED) and key not in (_NEXT, _META):
            yield key, value


def restore_step(kv: KV, snapshot: KV) -> bool:
    """One bounded batch of the restore the mark names: the keys after its cursor made the
    snapshot's, up to the step's limits; True once done (the last batch also deletes the mark).

    Two counters are not the snapshot's: ``nextInode`` never goes back (an inode number handed out
    since may still be cached by a mount, or held open: reusing it would show that file another's
    contents), and a snapshot from before metadata counted against the quota gets it counted.
    """
    job = pending(kv)
    if job is None or job.job != RESTORE:
        return True
    b = Batch()
    size = scanned = 0
    last = b""
    live, snap = _items(kv, bytes.fromhex(job.after)), _items(snapshot, bytes.fromhex(job.after))
    a, s = next(live, None), next(snap, None)
    while scanned < STEP_SCAN and len(b) < STEP_OPS and size < STEP_BYTES:
        if a is None and s is None:
            break
        if s is None or a is not None and a[0] < s[0]:
            assert a is not None
            b.delete(a[0])
            size += len(a[0])
            last, a = a[0], next(live, None)
            scanned += 1
            continue
        if a is None or s[0] < a[0]:
            b.put(*s)
            size += len(s[0]) + len(s[1])
        elif a[1] != s[1]:
            b.put(*s)
            size += len(s[0]) + len(s[1])
        if a is not None and a[0] == s[0]:
            a = next(live, None)
        if job.count_meta:
            job.meta_bytes += quota.record_bytes(*s)
        last, s = s[0], next(snap, None)
        scanned += 1
    done = a is None and s is None
    if done:
        nxt = max(keys.decode_u64(snapshot.get(_NEXT)), keys.decode_u64(kv.get(_NEXT)))
        b.put(_NEXT, keys.encode_u64(nxt))
        meta = job.meta_bytes if job.count_meta else keys.decode_u64(snapshot.get(_META))
        b.put(_META, keys.encode_u64(meta))
        b.delete(keys.MAINTENANCE_KEY)
    else:
        job.after = last.hex()
        _mark(b, job)
    kv.write(b)
    return done


def restore(kv: KV, snapshot_name: str, snapshot: KV) -> int:
    """A whole restore, step after step (tests, tools on a local keyspace); returns the batches."""
    begin_restore(kv, snapshot_name, snapshot)
    n = 1
    while not restore_step(kv, snapshot):
        n += 1
    return n + 1


def batches(ops: Iterable[Op]) -> Iterator[Batch]:
    """``ops`` cut into batches of at most STEP_OPS ops and about STEP_BYTES bytes."""
    b = Batch()
    size = 0
    for key, value in ops:
        if value is None:
            b.delete(key)
        else:
            b.put(key, value)
        size += len(key) + len(value or b"")
        if len(b) >= STEP_OPS or size >= STEP_BYTES:
            yield b
            b, size = Batch(), 0
    if len(b):
        yield b
