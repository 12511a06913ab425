"""Random name-space operations on Meta, checked step by step against a plain dict model of the tree."""

from __future__ import annotations

import errno
import stat

from hypothesis import given, settings
from hypothesis import strategies as st

from pxfs.errors import FsError
from pxfs.meta.fs import RENAME_EXCHANGE, Meta
from pxfs.meta.kv import MemKV

ROOT = 1
NAMES = [b"a", b"b", b"c"]
# Weighted towards mkdir and rename so that deep trees and moves into subtrees come up often.
OPS = ["create", "mkdir", "mkdir", "unlink", "rmdir", "rename", "rename", "rename", "exchange", "link",
       "open", "release"]  # fmt: skip


class Model:
    """The tree as dicts: what Meta must agree with after every operation."""

    def __init__(self) -> None:
        self.dirs: dict[int, dict[bytes, int]] = {ROOT: {}}
        self.parent: dict[int, int] = {ROOT: ROOT}
        self.files: set[int] = set()
        self.opened: dict[int, int] = {}
        self.dead: set[int] = set()

    def refs(self, ino: int) -> int:
        return sum(list(entries.values()).count(ino) for entries in self.dirs.values())

    def nlink(self, ino: int) -> int:
        if ino in self.dirs:
            return 2 + sum(1 for child in self.dirs[ino].values() if child in self.dirs)
        return self.refs(ino)

    def is_ancestor(self, ancestor: int, ino: int) -> bool:
        while ino != ROOT:
            if ino == ancestor:
                return True
            ino = self.parent[ino]
        return ancestor == ROOT

    def forget(self, ino: int) -> None:
        """``ino`` just lost a name: drop it once nothing refers to it (dirs go at once)."""
        if ino in self.dirs:
            del self.dirs[ino]
            del self.parent[ino]
            self.dead.add(ino)
        elif self.refs(ino) == 0 and not self.opened.get(ino):
            self.files.discard(ino)
            self.dead.add(ino)

    def remove_check(self, d: int, name: bytes, want_dir: bool) -> int | None:
        ino = self.dirs[d].get(name)
        if ino is None:
            return errno.ENOENT
        if want_dir and ino not in self.dirs:
            return errno.ENOTDIR
        if not want_dir and ino in self.dirs:
            return errno.EISDIR
        if want_dir and self.dirs[ino]:
            return errno.ENOTEMPTY
        return None

    def rename_check(self, d1: int, n1: bytes, d2: int, n2: bytes) -> int | None:
        src, dst = self.dirs[d1].get(n1), self.dirs[d2].get(n2)
        if src is None:
            return errno.ENOENT
        if dst == src:
            return None
        if src in self.dirs and d1 != d2 and self.is_ancestor(src, d2):
            return errno.EINVAL
        if dst is not None:
            if dst in self.dirs:
                if src not in self.dirs:
                    return errno.EISDIR
                if self.dirs[dst]:
                    return errno.ENOTEMPTY
            elif src in self.dirs:
                return errno.ENOTDIR
        return None

    def rename(self, d1: int, n1: bytes, d2: int, n2: bytes) -> None:
        src, dst = self.dirs[d1][n1], self.dirs[d2].get(n2)
        if dst == src:
            return
        del self.dirs[d1][n1]
        self.dirs[d2][n2] = src
        if src in self.dirs:
            self.parent[src] = d2
        if dst is not None:
            self.forget(dst)

    def exchange_check(self, d1: int, n1: bytes, d2: int, n2: bytes) -> int | None:
        src, dst = self.dirs[d1].get(n1), self.dirs[d2].get(n2)
        if src is None or dst is None:
            return errno.ENOENT
        if src != dst and d1 != d2:
            for moving, into in ((src, d2), (dst, d1)):
                if moving in self.dirs and self.is_ancestor(moving, into):
                    return errno.EINVAL
        return None

    def exchange(self, d1: int, n1: bytes, d2: int, n2: bytes) -> None:
        src, dst = self.dirs[d1][n1], self.dirs[d2][n2]
        self.dirs[d1][n1], self.dirs[d2][n2] = dst, src
        for ino, new_parent in ((src, d2), (dst, d1)):
            if ino in self.dirs:
                self.parent[ino] = new_parent


def step(meta: Meta, model: Model, op: str, i: int, j: int, k: int, m: int) -> None:
    """Run one operation on both, insisting on the same outcome (errno or success)."""
    dirs = sorted(model.dirs)
    d1, d2 = dirs[i % len(dirs)], dirs[k % len(dirs)]
    n1, n2 = NAMES[j % len(NAMES)], NAMES[m % len(NAMES)]
    files = sorted(model.files)
    want: int | None = None
    if op in ("create", "mkdir"):
        want = errno.EEXIST if n1 in model.dirs[d1] else None
        call = (lambda: meta.mkdir(d1, n1, 0o755, 0, 0)) if op == "mkdir" else (
            lambda: meta.mknod(d1, n1, stat.S_IFREG | 0o644, 0, 0, 0))  # fmt: skip
    elif op in ("unlink", "rmdir"):
        want = model.remove_check(d1, n1, want_dir=op == "rmdir")
        call = (lambda: meta.rmdir(d1, n1)) if op == "rmdir" else (lambda: meta.unlink(d1, n1))
    elif op == "rename":
        want = model.rename_check(d1, n1, d2, n2)
        call = lambda: meta.rename(d1, n1, d2, n2)  # noqa: E731
    elif op == "exchange":
        want = model.exchange_check(d1, n1, d2, n2)
        call = lambda: meta.rename(d1, n1, d2, n2, RENAME_EXCHANGE)  # noqa: E731
    elif op == "link":
        if not files:
            return
        f = files[i % len(files)]
        want = errno.EEXIST if n2 in model.dirs[d2] else None
        if want is None and model.refs(f) == 0:
            want = errno.ENOENT  # an open orphan cannot get its name back
        call = lambda: meta.link(f, d2, n2)  # noqa: E731
    elif op == "open":
        if not files:
            return
        f = files[i % len(files)]
        meta.open(f)
        model.opened[f] = model.opened.get(f, 0) + 1
        return
    else:  # release
        opened = sorted(model.opened)
        if not opened:
            return
        f = opened[i % len(opened)]
        meta.release(f)
        model.opened[f] -= 1
        if not model.opened[f]:
            del model.opened[f]
            model.forget(f)
        return

    try:
        result = call()
    except FsError as e:
        assert want == e.errno, f"{op}: model expects {want}, Meta raised {errno.errorcode[e.errno]}"
        return
    assert want is None, f"{op}: model expects {errno.errorcode[want]}, Meta succeeded"
    if op in ("create", "mkdir"):
        assert result is not None
        model.dirs[d1][n1] = result.ino
        if op == "mkdir":
            model.dirs[result.ino] = {}
            model.parent[result.ino] = d1
        else:
            model.files.add(result.ino)
    elif op in ("unlink", "rmdir"):
        model.forget(model.dirs[d1].pop(n1))
    elif op == "rename":
        model.rename(d1, n1, d2, n2)
    elif op == "exchange":
        model.exchange(d1, n1, d2, n2)
    else:  # link
        model.dirs[d2][n2] = f


def check(meta: Meta, model: Model) -> None:
    for d, entries in model.dirs.items():
        assert {name: a.ino for name, a in meta.readdir(d)} == entries
        assert meta.getattr(d).nlink == model.nlink(d)
        assert meta.lookup(d, b"..").ino == model.parent[d]
    for f in model.files:
        assert meta.getattr(f).nlink == model.nlink(f)
    for ino in model.dead:
        try:
            meta.getattr(ino)
        except FsError as e:
            assert e.errno == errno.ENOENT
        else:
            raise AssertionError(f"inode {ino} should be gone")
    assert meta.statfs()["inodes"] == len(model.dirs) + len(model.files)
    # Every name is metadata in the quota (pxfs.meta.quota), counted as it changes.
    assert meta.statfs()["meta_bytes"] == sum(len(n) for entries in model.dirs.values() for n in entries)


OP = st.tuples(st.sampled_from(OPS), *(st.integers(0, 3) for _ in range(4)))


@settings(max_examples=200, deadline=None)
@given(st.lists(OP, max_size=50))
def test_meta_agrees_with_dict_model(ops: list[tuple[str, int, int, int, int]]) -> None:
    meta = Meta(MemKV(), capacity=1 << 20, block_size=4096)
    meta.init_root()
    model = Model()
    for op, i, j, k, m in ops:
        step(meta, model, op, i, j, k, m)
        check(meta, model)
