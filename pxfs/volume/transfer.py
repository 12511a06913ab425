"""Full copies of a replica, for a follower whose next batch is no longer in the coordinator's log.

The coordinator freezes its keyspace and every snapshot at one instant (RocksDB checkpoints: hard
links, no data copied) into a ``CopyView``, resets the follower and streams the view to it in parts
(``VolumeService.load``): each snapshot first, then the volume's own keyspace, each ending with the
sequence number it stands at and that batch's log entry. The follower's keyspace says it is partial
until its last part is in (``KV.loading``): a copy cut short is reset and sent again, never served.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pxfs.errors import Corrupt
from pxfs.meta.kv import RocksKV

log = logging.getLogger(__name__)

PART_BYTES = 4 << 20  # per load call: well under the RPC message limit, a few ms of the loop to read
PART_ITEMS = 20000


@dataclass
class Part:
    """Some keys of one keyspace (``snapshot`` "" is the volume's own); ``seq`` > 0 ends it."""

    snapshot: str
    items: list[tuple[bytes, bytes]]
    seq: int = 0
    last_batch: bytes = b""


class CopyView:
    """A frozen copy of a replica's keyspace and snapshots, in ``where`` (removed by ``close``)."""

    def __init__(self, where: Path, kv: RocksKV, snapshots: dict[str, RocksKV]) -> None:
        self.where, self.kv, self.snapshots = where, kv, snapshots
        self.seq = kv.seq

    def parts(self) -> Iterator[Part]:
        for name, snap in sorted(self.snapshots.items()):
            yield from _parts(name, snap)
        yield from _parts("", self.kv)

    def close(self) -> None:
        for kv in (self.kv, *self.snapshots.values()):
            kv.close()
        shutil.rmtree(self.where, ignore_errors=True)


def _parts(name: str, kv: RocksKV) -> Iterator[Part]:
    last = kv.log_entry(kv.seq)
    if kv.seq < 1 or last is None:
        raise Corrupt(f"keyspace {name or 'of the volume'}", f"at seq {kv.seq} without its log entry: cannot be copied")
    items: list[tuple[bytes, bytes]] = []
    size = 0
    for key, value in kv.scan(b""):
        items.append((key, value))
        size += len(key) + len(value)
        if size >= PART_BYTES or len(items) >= PART_ITEMS:
            yield Part(name, items)
            items, size = [], 0
    yield Part(name, items, kv.seq, last)
