"""The coordinator's view of the mounts (pxfs.volume.mounts) over a real embedded control store."""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pxfs.cluster.admin import MOUNT_TTL
from pxfs.cluster.store import EmbeddedStore
from pxfs.meta import keys
from pxfs.meta.fs import Meta, Op
from pxfs.meta.kv import MemKV
from pxfs.meta.opids import OpIds
from pxfs.volume import mounts
from tests.meta.test_fs import BLOCK, ROOT, fails, mkfile
from tests.meta.test_handles import orphan

T = TypeVar("T")


async def register(store: EmbeddedStore, mount: str, ts: float) -> None:
    await store.put(f"mounts/v/{mount}", json.dumps({"ts": ts, "node": "n2"}).encode())


def caller(meta: Meta) -> mounts.Call:
    """The coordinator's call path, minus the replicas: run the Meta operation."""
    async def call(fn: Callable[[Meta], T]) -> T:
        return fn(meta)
    return call


async def test_a_new_coordinator_frees_orphans_once_the_registered_mounts_are_settled(tmp_path: Path) -> None:
    store = EmbeddedStore(str(tmp_path / "store"))
    try:
        old = Meta(MemKV(), 1 << 30, BLOCK)
        old.init_root()
        reopened, abandoned = orphan(old, b"x", "a"), orphan(old, b"y", "b")
        now = time.time()
        await register(store, "a", now)
        await register(store, "b", now - MOUNT_TTL - 1)  # a mount that died before the failover
        await register(store, "c", now)
        await store.put("mounts/other/d", json.dumps({"ts": now}).encode())  # another volume's mount
        new = Meta(old.kv, old.capacity, BLOCK)
        mounts.defer_purge(new)
        assert await mounts.tend(new, caller(new), store, "v") == 0  # a and c not back yet
        new.reopen("a", [reopened])
        assert await mounts.tend(new, caller(new), store, "v") == 0  # c may hold y
        new.reopen("c", [])
        assert await mounts.tend(new, caller(new), store, "v") == 1
        fails(errno.ENOENT, new.getattr, abandoned)
        assert new.getattr(reopened).nlink == 0
        assert new.purge_pending() is None
        assert await mounts.tend(new, caller(new), store, "v") == 0
    finally:
        store.close()


async def test_silent_mounts_lose_their_handles_and_op_records(tmp_path: Path) -> None:
    store = EmbeddedStore(str(tmp_path / "store"))
    try:
        meta = Meta(MemKV(), 1 << 30, BLOCK)
        meta.init_root()
        held = orphan(meta, b"held", "gone")
        for mount in ("gone", "never", "live"):
            mkfile(meta, ROOT, mount.encode())
            meta.setattr(ROOT, mode=0o755, op=Op(mount, OpIds().next()))
        now = time.time()
        await register(store, "gone", now - mounts.FORGET_AFTER - 1)
        await register(store, "live", now - MOUNT_TTL - 1)  # expired for a purge, still within its retries
        assert await mounts.forget_silent(meta, caller(meta), store, "v") == 2  # gone and never
        assert [k for k, _ in meta.kv.scan(keys.OP_PREFIX)] == [k for k, _ in meta.kv.scan(keys.op_prefix("live"))]
        assert meta.statfs()["inodes"] == 4  # "held" freed: its only holder is gone
        assert held not in [a.ino for _n, a in meta.readdir(ROOT)]
        assert await mounts.forget_silent(meta, caller(meta), store, "v") == 0
    finally:
        store.close()
