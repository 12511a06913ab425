"""Snapshots of a volume's metadata: records in the keyspace, copies of it, and roll-backs.

A snapshot is named by a ``N<name>`` key written as one batch. Every replica, when it commits that
batch, takes a checkpoint of its keyspace (``KV.after_commit``): since all replicas apply the same
batches in the same order, their checkpoints hold the same state, exactly the writes acknowledged
before the snapshot and none after. Chunks are shared, never copied.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from pxfs.errors import Exists, Invalid, NotFound
from pxfs.meta import keys, maintenance, slices
from pxfs.meta.kv import KV, Batch
from pxfs.paths import is_name


def check_name(volume: str, name: str) -> str:
    if not is_name(name):
        raise Invalid(f'snapshot "{volume}@{name}"', "name must be 1-63 letters, digits, '_', '.', '-' "
                      "starting with a letter or digit")
    return name


def create(kv: KV, volume: str, name: str, created_ns: int) -> None:
    check_name(volume, name)
    if kv.get(keys.snapshot_key(name)) is not None:
        raise Exists(f'snapshot "{volume}@{name}"', "exists")
    b = Batch()
    b.put(keys.snapshot_key(name), json.dumps({"created_ns": created_ns}).encode())
    kv.write(b)


def delete(kv: KV, volume: str, name: str) -> None:
    if kv.get(keys.snapshot_key(name)) is None:
        raise NotFound(f'snapshot "{volume}@{name}"', "no such snapshot")
    b = Batch()
    b.delete(keys.snapshot_key(name))
    kv.write(b)


def _name(raw: bytes) -> str:
    key = keys.decode_key(raw)
    if not isinstance(key, keys.SnapshotKey):
        raise keys.BadKey(raw, "not a snapshot key")
    return key.name


def listing(kv: KV) -> list[tuple[str, int]]:
    return [(_name(k), json.loads(v).get("created_ns", 0)) for k, v in kv.scan(keys.SNAPSHOT_PREFIX)]


def changed_names(batch: Batch) -> Iterator[tuple[str, bool]]:
    """(snapshot name, created?) for each snapshot key a batch creates or deletes."""
    for key, value in batch.ops:
        if key.startswith(keys.SNAPSHOT_PREFIX):
            try:
                name = _name(key)
            except keys.BadKey:
                continue  # create() never writes one: no checkpoint can be named by it
            yield name, value is not None


def check_batch(batch: Batch) -> None:
    """Refuse a batch naming a snapshot no ``create`` could have made: its name becomes a directory
    on every replica, and a replicated batch comes off the wire."""
    for name, _ in changed_names(batch):
        if not is_name(name):
            raise Invalid(f"snapshot {name!r}", "refused in a replicated batch: not a snapshot name (never a path)")


def _data_keys(kv: KV) -> Iterator[tuple[bytes, bytes]]:
    """Everything but the snapshot and op records (they belong to the volume and its mounts now,
    not to a point in time: a clone has other mounts) and a maintenance mark (a job of the volume)."""
    for key, value in kv.scan(b""):
        if not key.startswith((keys.SNAPSHOT_PREFIX, keys.OP_PREFIX, keys.MAINTENANCE_KEY)):
            yield key, value


def copy_into(target: KV, snapshot: KV) -> int:
    """Fill an empty keyspace (a new clone) from a snapshot, in bounded batches; returns keys copied.

    A roll-back of a volume to one of its snapshots is ``pxfs.meta.maintenance.restore_step``.
    """
    n = 0
    for b in maintenance.batches(_data_keys(snapshot)):
        target.write(b)
        n += len(b)
    return n


def chunk_refs(kv: KV) -> tuple[dict[bytes, int], int]:
    """Distinct chunks a keyspace's block maps name (hash -> bytes in use), and the logical bytes."""
    refs: dict[bytes, int] = {}
    logical = 0
    for _key, block in keys.block_entries(kv.scan(keys.INODE_PREFIX)):
        logical += slices.extent(block)
        for digest, _off, length in block:
            if length > refs.get(digest, -1):
                refs[digest] = length
    return refs, logical
