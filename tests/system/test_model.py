"""Model-based test: random POSIX operations on a pxfs mount and on a local directory must agree.

A hypothesis state machine runs every operation twice, once under a FUSE mount of a repl-3 volume and
once under a local (ext4) temporary directory, and compares after every step what the calls returned
and how they failed (``OSError.errno``), and at invariant time the whole tree: names, types, mode bits,
file sizes, content hashes, symlink targets, the link counts of files and of directories, and the
``user.*`` xattrs. Open file handles live across steps, so writes through a handle meet renames,
unlinks, truncates and path writes of the same file, and a "close and reopen" rule checks what a new
open sees. Names come from a tiny alphabet so that creates, renames and links collide often.

Not compared, because they legitimately differ: times and inode numbers; ``st_blocks`` (pxfs reports
the size rounded up, ext4 the allocation); directory sizes (ext4 counts directory blocks).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import os
import random
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import Cluster, Mount, mounted

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE")

MiB = 1 << 20
BS = MiB  # the volume's block size (the default)
NAMES = ["a", "b", "c", "d"]
SLOTS = range(3)  # open file handles kept across steps
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
XATTR_CREATE, XATTR_REPLACE = os.XATTR_CREATE, os.XATTR_REPLACE
_libc = ctypes.CDLL(None, use_errno=True)
_examples = itertools.count()

# -- strategies -------------------------------------------------------------------------------------
# A third of the paths at the top level, a third in the skeleton's directories, a third anywhere one
# level down: most operations then meet an existing entry, and a fair share a missing one.
paths = st.one_of(st.sampled_from(NAMES),
                  st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(NAMES)).map("/".join),
                  st.tuples(st.sampled_from(NAMES), st.sampled_from(NAMES)).map("/".join))
# Block-boundary sizes and offsets are where a block map goes wrong; small ones keep the tree cheap.
edges = [0, 1, 4095, 4096, 4097, BS - 1, BS, BS + 1, 2 * BS - 1, 2 * BS, 2 * BS + 1, 3 * BS - 1, 3 * BS]
sizes = st.one_of(st.sampled_from(edges), st.integers(0, 8192), st.integers(0, 3 * BS))
offsets = st.one_of(st.sampled_from(edges), st.integers(0, 8192), st.integers(0, 3 * BS + 1))
# Random bytes of any size without putting megabytes through hypothesis: a size and a seed.
payloads = st.tuples(sizes, st.integers(0, 1 << 16))
modes = st.one_of(st.sampled_from([0o644, 0o600, 0o755, 0o000, 0o777]), st.integers(0, 0o7777))
open_flags = st.sampled_from([os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_APPEND,
                              os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_CREAT, os.O_RDWR | os.O_TRUNC])
link_targets = st.one_of(paths, st.sampled_from(NAMES).map(lambda n: "../" + n), st.just("missing"))
xattr_names = st.sampled_from(["user.x", "user.y", "user.z"])


def payload(p: tuple[int, int]) -> bytes:
    size, seed = p
    return random.Random(seed).randbytes(size)


def renameat2(old: str, new: str, flags: int) -> None:
    at_fdcwd = -100
    if _libc.renameat2(at_fdcwd, old.encode(), at_fdcwd, new.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def write_all(fd: int, data: bytes) -> int:
    done = 0
    view = memoryview(data)
    while done < len(data):
        done += os.write(fd, view[done:])
    return done


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


# -- the two sides ----------------------------------------------------------------------------------
@dataclass
class Side:
    """One tree the operations run on: the example's directory and this side's open handles."""

    name: str
    root: str
    fds: dict[int, tuple[int, str, int]] = field(default_factory=dict)  # slot -> (fd, path, flags)

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)


Outcome = tuple[str, Any]


def run(op: Callable[[Side], Any], side: Side) -> Outcome:
    try:
        return ("ok", op(side))
    except OSError as e:
        return ("errno", errno.errorcode.get(e.errno, e.errno))


def snapshot(root: str) -> dict[str, tuple]:
    """Everything compared about a tree, keyed by relative path."""
    out: dict[str, tuple] = {}

    def walk(rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        st_ = os.lstat(full)
        mode = stat.S_IMODE(st_.st_mode)
        xattrs = {} if stat.S_ISLNK(st_.st_mode) else {
            n: os.getxattr(full, n, follow_symlinks=False)
            for n in sorted(os.listxattr(full, follow_symlinks=False)) if n.startswith("user.")}
        if stat.S_ISDIR(st_.st_mode):
            names = sorted(os.listdir(full))
            out[rel] = ("dir", mode, st_.st_nlink, names, xattrs)
            for n in names:
                walk(os.path.join(rel, n))
        elif stat.S_ISREG(st_.st_mode):
            out[rel] = ("file", mode, st_.st_nlink, st_.st_size, file_hash(full), xattrs)
        elif stat.S_ISLNK(st_.st_mode):
            out[rel] = ("symlink", os.readlink(full))
        else:
            out[rel] = ("other", stat.S_IFMT(st_.st_mode), mode, st_.st_nlink)

    walk("")
    return out


class FsModel(RuleBasedStateMachine):
    """Set ``pxfs_root`` and ``local_root`` on a subclass before running it."""

    pxfs_root: str
    local_root: str
    # Paths that some rule created (they may be gone since): operations on existing entries draw from
    # them or from all paths, so that most renames, links and writes meet an entry.
    entries = Bundle("entries")
    known = st.one_of(entries, paths)

    def __init__(self) -> None:
        super().__init__()
        n = next(_examples)
        self.sides = [Side("pxfs", os.path.join(self.pxfs_root, f"ex{n}")),
                      Side("local", os.path.join(self.local_root, f"ex{n}"))]
        for s in self.sides:
            os.mkdir(s.root)

    def both(self, op: Callable[[Side], Any]) -> Outcome:
        got = [run(op, s) for s in self.sides]
        assert got[0] == got[1], f"pxfs {got[0]!r} != local {got[1]!r}"
        return got[0]

    @initialize(target=entries, c=payloads, ad=payloads, ba=payloads)
    def skeleton(self, c: tuple[int, int], ad: tuple[int, int], ba: tuple[int, int]) -> Any:
        """A starting tree, so that the first operations meet existing names: a/ a/d b/ b/a c, and
        handles open on two of the files (slots 0 and 1)."""
        self.mkdir("a", 0o755)
        self.mkdir("b", 0o755)
        self.create_file("c", c)
        self.create_file("a/d", ad)
        self.create_file("b/a", ba)
        self._open(0, "c", os.O_RDWR)
        self._open(1, "a/d", os.O_RDWR)
        return multiple("a", "b", "c", "a/d", "b/a")

    # -- open handles -----------------------------------------------------------------------------
    def _close(self, slot: int) -> None:
        def op(s: Side) -> None:
            entry = s.fds.pop(slot, None)
            if entry is not None:
                os.close(entry[0])
        self.both(op)

    def _open(self, slot: int, path: str, flags: int) -> None:
        def op(s: Side) -> None:
            s.fds[slot] = (os.open(s.p(path), flags, 0o644), path, flags)
        self.both(op)

    @rule(slot=st.sampled_from(SLOTS), path=known, flags=open_flags)
    def open_handle(self, slot: int, path: str, flags: int) -> None:
        self._close(slot)
        self._open(slot, path, flags)

    @rule(slot=st.sampled_from(SLOTS))
    def close_and_reopen(self, slot: int) -> None:
        entry = self.sides[0].fds.get(slot)
        self._close(slot)
        if entry is not None:
            self._open(slot, entry[1], entry[2] & ~(os.O_TRUNC | os.O_CREAT))

    def _fd_op(self, slot: int, op: Callable[[int], Any]) -> None:
        if slot in self.sides[0].fds:
            self.both(lambda s: op(s.fds[slot][0]))

    @rule(slot=st.sampled_from(SLOTS), off=offsets, data=payloads)
    def pwrite_handle(self, slot: int, off: int, data: tuple[int, int]) -> None:
        buf = payload(data)
        self._fd_op(slot, lambda fd: os.pwrite(fd, buf, off))

    @rule(slot=st.sampled_from(SLOTS), data=payloads)
    def write_handle(self, slot: int, data: tuple[int, int]) -> None:
        buf = payload(data)
        self._fd_op(slot, lambda fd: write_all(fd, buf))

    @rule(slot=st.sampled_from(SLOTS), off=offsets, whence=st.sampled_from([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END]))
    def seek_handle(self, slot: int, off: int, whence: int) -> None:
        local = self.sides[1].fds.get(slot)
        # Only files: a directory's offsets are the filesystem's own cookies (ext4: htree hashes).
        if local is not None and stat.S_ISREG(os.fstat(local[0]).st_mode):
            self._fd_op(slot, lambda fd: os.lseek(fd, off if whence == os.SEEK_SET else off - BS, whence))

    @rule(slot=st.sampled_from(SLOTS), off=offsets, n=sizes)
    def pread_handle(self, slot: int, off: int, n: int) -> None:
        self._fd_op(slot, lambda fd: hashlib.sha256(os.pread(fd, n, off)).hexdigest())

    @rule(slot=st.sampled_from(SLOTS), size=offsets)
    def ftruncate_handle(self, slot: int, size: int) -> None:
        self._fd_op(slot, lambda fd: os.ftruncate(fd, size))

    @rule(slot=st.sampled_from(SLOTS))
    def fsync_handle(self, slot: int) -> None:
        self._fd_op(slot, os.fsync)

    @rule(slot=st.sampled_from(SLOTS))
    def fstat_handle(self, slot: int) -> None:
        def op(fd: int) -> tuple:
            s = os.fstat(fd)
            return (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode),
                    s.st_size if stat.S_ISREG(s.st_mode) else None,
                    s.st_nlink if stat.S_ISREG(s.st_mode) else None)
        self._fd_op(slot, op)

    # -- whole files by path ----------------------------------------------------------------------
    @rule(target=entries, path=paths, data=payloads)
    def create_file(self, path: str, data: tuple[int, int]) -> str:
        buf = payload(data)

        def op(s: Side) -> int:
            fd = os.open(s.p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                return write_all(fd, buf)
            finally:
                os.close(fd)
        self.both(op)
        return path

    @rule(path=known, off=offsets, data=payloads)
    def pwrite_path(self, path: str, off: int, data: tuple[int, int]) -> None:
        buf = payload(data)

        def op(s: Side) -> int:
            fd = os.open(s.p(path), os.O_WRONLY)
            try:
                return os.pwrite(fd, buf, off)
            finally:
                os.close(fd)
        self.both(op)

    @rule(path=known, data=payloads)
    def append_path(self, path: str, data: tuple[int, int]) -> None:
        buf = payload(data)

        def op(s: Side) -> int:
            fd = os.open(s.p(path), os.O_WRONLY | os.O_APPEND)
            try:
                return write_all(fd, buf)
            finally:
                os.close(fd)
        self.both(op)

    @rule(path=known, off=offsets, n=sizes)
    def read_path(self, path: str, off: int, n: int) -> None:
        def op(s: Side) -> str:
            fd = os.open(s.p(path), os.O_RDONLY)
            try:
                return hashlib.sha256(os.pread(fd, n, off)).hexdigest()
            finally:
                os.close(fd)
        self.both(op)

    @rule(path=known, size=offsets)
    def truncate_path(self, path: str, size: int) -> None:
        self.both(lambda s: os.truncate(s.p(path), size))

    # -- names ------------------------------------------------------------------------------------
    @rule(target=entries, path=paths, mode=st.sampled_from([0o755, 0o700, 0o777]))
    def mkdir(self, path: str, mode: int) -> str:
        self.both(lambda s: os.mkdir(s.p(path), mode))
        return path

    @rule(path=known)
    def rmdir(self, path: str) -> None:
        self.both(lambda s: os.rmdir(s.p(path)))

    @rule(path=known)
    def unlink(self, path: str) -> None:
        self.both(lambda s: os.unlink(s.p(path)))

    @rule(target=entries, src=known, dst=known,
          flags=st.sampled_from([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, src: str, dst: str, flags: int) -> str:
        self.both(lambda s: renameat2(s.p(src), s.p(dst), flags))
        return dst

    @rule(target=entries, src=known, dst=paths)
    def link(self, src: str, dst: str) -> str:
        self.both(lambda s: os.link(s.p(src), s.p(dst), follow_symlinks=False))
        return dst

    @rule(target=entries, dest=link_targets, path=paths)
    def symlink(self, dest: str, path: str) -> str:
        self.both(lambda s: os.symlink(dest, s.p(path)))
        return path

    @rule(path=known)
    def stat_path(self, path: str) -> None:
        def op(s: Side) -> tuple:
            st_ = os.stat(s.p(path))
            return (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode),
                    st_.st_size if stat.S_ISREG(st_.st_mode) else None, st_.st_nlink)
        self.both(op)

    @rule(path=known)
    def listdir(self, path: str) -> None:
        self.both(lambda s: sorted(os.listdir(s.p(path))))

    @rule(path=known, mode=modes)
    def chmod(self, path: str, mode: int) -> None:
        self.both(lambda s: os.chmod(s.p(path), mode))

    # -- xattrs -----------------------------------------------------------------------------------
    @rule(path=known, name=xattr_names, value=st.none() | st.binary(max_size=64),
          flags=st.sampled_from([0, 0, XATTR_CREATE, XATTR_REPLACE]))
    def setxattr(self, path: str, name: str, value: bytes | None, flags: int) -> None:
        """Set (with XATTR_CREATE / XATTR_REPLACE) or, for ``None``, remove an xattr."""
        if value is None:
            self.both(lambda s: os.removexattr(s.p(path), name))
        else:
            self.both(lambda s: os.setxattr(s.p(path), name, value, flags))

    @rule(path=known, name=xattr_names)
    def getxattr(self, path: str, name: str) -> None:
        self.both(lambda s: sorted(n for n in os.listxattr(s.p(path)) if n.startswith("user.")))
        self.both(lambda s: os.getxattr(s.p(path), name))

    # -- the whole tree ---------------------------------------------------------------------------
    @invariant()
    def trees_agree(self) -> None:
        theirs, ours = (snapshot(s.root) for s in self.sides)
        assert theirs == ours, _diff(theirs, ours)

    def teardown(self) -> None:
        for s in self.sides:
            for fd, _, _ in s.fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            s.fds.clear()
            shutil.rmtree(s.root, ignore_errors=True)


def _diff(pxfs: dict[str, tuple], local: dict[str, tuple]) -> str:
    lines = []
    for k in sorted(set(pxfs) | set(local)):
        if pxfs.get(k) != local.get(k):
            lines.append(f"{k or '.'}: pxfs={pxfs.get(k)!r} local={local.get(k)!r}")
    return "trees differ:\n" + "\n".join(lines)


@pytest.fixture(scope="module")
def model_mount(shared_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    shared_cluster.cli("volume", "create", "model", "--size", "1G", "--repl", "3")
    with mounted(shared_cluster, "model", tmp_path_factory.mktemp("model") / "mnt") as m:
        yield m


def test_pxfs_agrees_with_local_fs(model_mount: Mount, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()

    class Machine(FsModel):
        pxfs_root = str(model_mount.path)
        local_root = str(local)

    run_state_machine_as_test(Machine, settings=settings(
        max_examples=25, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]))
