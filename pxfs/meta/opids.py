"""Op ids: a mutation retried after a failover gets the answer of its first run, and runs once.

A mount numbers its mutations (``new_session``/``OpIds.next``: a random session prefix and a
counter) and sends the same id again when it retries a call at a new coordinator. ``Meta`` writes
the id with the result into the very batch of the mutation, so every replica that holds the
mutation also holds its record, and a coordinator that finds the record answers with it and
changes nothing: an O_EXCL create stays exclusive (it never adopts another mount's file), an
unlink that was applied reports success instead of ENOENT.

Records are kept per mount in a ring of ``keys.OP_SLOTS`` slots (the counter modulo OP_SLOTS),
so a mount never has more than OP_SLOTS of them: a retry comes within a failover, long before the
mount has issued OP_SLOTS newer mutations. A mount's whole ring goes when it detaches or its
registration expires (``ring_keys``, ``stale_mounts``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from pxfs.errors import Invalid
from pxfs.meta import keys
from pxfs.meta.keys import Attr
from pxfs.meta.kv import KV
from pxfs.meta.txn import Txn


@dataclass(frozen=True)
class Op:
    """Who asks (the mount id the coordinator knows it by) and which of its mutations this is.

    An empty ``id`` (an old caller, a tool) still names the mount, for its open handles, but
    records nothing: such a call is not idempotent.
    """

    mount: str
    id: bytes = b""

    def __post_init__(self) -> None:
        if self.id and len(self.id) != keys.OP_ID_LEN:
            raise Invalid("op id", f"{len(self.id)} bytes; must be empty or {keys.OP_ID_LEN}")


class OpIds:
    """A mount's op id source: 8 random bytes for this session, then a counter (never reused)."""

    def __init__(self, prefix: bytes | None = None) -> None:
        self.prefix = prefix if prefix is not None else os.urandom(8)
        if len(self.prefix) != 8:
            raise Invalid("op id prefix", f"{len(self.prefix)} bytes; must be 8")
        self._count = itertools.count(1)

    def next(self) -> bytes:
        return self.prefix + next(self._count).to_bytes(8, "big")


def find(kv: KV, op: Op | None) -> tuple[bool, Attr | None]:
    """(recorded?, result) of ``op``: a slot holding another op id is another (older) operation."""
    if op is None or not op.id:
        return False, None
    raw = kv.get(keys.op_key(op.mount, op.id))
    if raw is None:
        return False, None
    op_id, attr = keys.decode_op_record(raw)
    return (True, attr) if op_id == op.id else (False, None)


def record(txn: Txn, op: Op | None, attr: Attr | None) -> None:
    """Put ``op``'s answer into ``txn``: it commits with the mutation or not at all."""
    if op is not None and op.id:
        txn.put(keys.op_key(op.mount, op.id), keys.encode_op_record(op.id, attr))


def ring_keys(kv: KV, mount: str) -> list[bytes]:
    """Every op-record key of ``mount`` (at most OP_SLOTS)."""
    return [k for k, _ in kv.scan(keys.op_prefix(mount))]


def _mount_hashes(kv: KV) -> Iterator[bytes]:
    """The distinct mount hashes that have records: one seek per mount, not one step per record."""
    start = keys.OP_PREFIX
    while True:
        found = next(iter(kv.scan(keys.OP_PREFIX, start, 1)), None)
        if found is None:
            return
        try:
            key = keys.decode_key(found[0])
        except keys.BadKey:
            start = found[0] + b"\0"  # fsck's to report; the rings after it still count
            continue
        assert isinstance(key, keys.OpKey)  # the only valid keys under OP_PREFIX
        yield key.mount
        start = keys.OP_PREFIX + key.mount + b"\xff\xff\xff"  # past every slot of this mount


def stale_mounts(kv: KV, live: Collection[str], limit: int) -> list[bytes]:
    """Prefixes of up to ``limit`` mounts with records that are not among ``live`` (their rings can go)."""
    keep = {keys.mount_hash(m) for m in live}
    out = []
    for h in _mount_hashes(kv):
        if h not in keep:
            out.append(keys.OP_PREFIX + h)
            if len(out) >= limit:
                break
    return out
