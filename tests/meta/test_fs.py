"""POSIX semantics of Meta: every operation and its errors, on MemKV (plus a few on RocksKV)."""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from pxfs.errors import FsError, NoSpace
from pxfs.meta.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE, Attr, Meta
from pxfs.meta.kv import MemKV, RocksKV
from pxfs.meta.slices import whole

ROOT = 1
BLOCK = 4096  # the block size of the Meta fixtures in conftest.py
H1, H2 = b"\x01" * 32, b"\x02" * 32


def fails(code: int, fn: Callable[..., object], *args: object, **kw: object) -> None:
    with pytest.raises(FsError) as exc:
        fn(*args, **kw)
    assert exc.value.errno == code, errno.errorcode[exc.value.errno]


def mkfile(m: Meta, parent: int, name: bytes, mode: int = 0o644) -> Attr:
    return m.mknod(parent, name, stat.S_IFREG | mode, 0, 1000, 1000)


def mkdir(m: Meta, parent: int, name: bytes) -> Attr:
    return m.mkdir(parent, name, 0o755, 1000, 1000)


def names(m: Meta, ino: int) -> list[bytes]:
    return [n for n, _ in m.readdir(ino)]


def used(m: Meta) -> int:
    return m.statfs()["used"]


# -- root, lookup, getattr ------------------------------------------------------------------------
def test_init_root_is_idempotent(meta: Meta) -> None:
    root = meta.getattr(ROOT)
    assert stat.S_ISDIR(root.mode) and stat.S_IMODE(root.mode) == 0o755
    assert root.nlink == 2 and root.parent == ROOT
    seq = meta.kv.seq
    assert meta.init_root(uid=5, mode=0o700) == root
    assert meta.kv.seq == seq
    assert meta.statfs()["inodes"] == 1


def test_lookup_dot_and_dotdot(meta: Meta) -> None:
    d = mkdir(meta, ROOT, b"d")
    assert meta.lookup(ROOT, b".").ino == ROOT
    assert meta.lookup(ROOT, b"..").ino == ROOT
    assert meta.lookup(d.ino, b".").ino == d.ino
    assert meta.lookup(d.ino, b"..").ino == ROOT
    assert meta.lookup(ROOT, b"d") == meta.getattr(d.ino)


def test_lookup_errors(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    fails(errno.ENOENT, meta.lookup, ROOT, b"missing")
    fails(errno.ENOTDIR, meta.lookup, f.ino, b"x")
    fails(errno.ENOENT, meta.lookup, 999, b"x")
    fails(errno.ENAMETOOLONG, meta.lookup, ROOT, b"x" * 256)
    fails(errno.ENOENT, meta.getattr, 999)


# -- creating -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ftype,rdev,want_rdev",
    [(stat.S_IFREG, 0, 0), (stat.S_IFIFO, 7, 0), (stat.S_IFSOCK, 0, 0), (stat.S_IFCHR, 0x0501, 0x0501),
     (stat.S_IFBLK, 0x0803, 0x0803), (0, 0, 0)],
)  # fmt: skip
def test_mknod_types(meta: Meta, ftype: int, rdev: int, want_rdev: int) -> None:
    a = meta.mknod(ROOT, b"n", ftype | 0o640, rdev, 7, 8)
    assert stat.S_IFMT(a.mode) == (ftype or stat.S_IFREG)
    assert stat.S_IMODE(a.mode) == 0o640
    assert (a.nlink, a.uid, a.gid, a.rdev, a.size) == (1, 7, 8, want_rdev, 0)
    assert meta.lookup(ROOT, b"n") == a
    assert meta.statfs()["inodes"] == 2


@pytest.mark.parametrize("ftype", [stat.S_IFDIR, stat.S_IFLNK])
def test_mknod_refuses_dirs_and_symlinks(meta: Meta, ftype: int) -> None:
    fails(errno.EINVAL, meta.mknod, ROOT, b"n", ftype | 0o755, 0, 0, 0)


def test_create_updates_parent_times(meta: Meta) -> None:
    before = meta.getattr(ROOT)
    mkfile(meta, ROOT, b"f")
    after = meta.getattr(ROOT)
    assert after.mtime_ns > before.mtime_ns and after.ctime_ns > before.ctime_ns
    assert after.nlink == 2


def test_mkdir_counts_links(meta: Meta) -> None:
    d = mkdir(meta, ROOT, b"d")
    assert stat.S_ISDIR(d.mode) and d.nlink == 2 and d.parent == ROOT
    assert meta.getattr(ROOT).nlink == 3
    mkdir(meta, d.ino, b"e")
    mkfile(meta, d.ino, b"f")
    assert meta.getattr(d.ino).nlink == 3


def test_create_errors(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    fails(errno.EEXIST, mkfile, meta, ROOT, b"f")
    fails(errno.EEXIST, mkdir, meta, ROOT, b"f")
    fails(errno.ENOTDIR, mkfile, meta, f.ino, b"x")
    fails(errno.ENOENT, mkdir, meta, 999, b"x")
    fails(errno.EEXIST, mkdir, meta, ROOT, b".")
    fails(errno.EEXIST, mkfile, meta, ROOT, b"..")


@pytest.mark.parametrize(
    "name,code",
    [(b"x" * 256, errno.ENAMETOOLONG), (b"", errno.EINVAL), (b"a/b", errno.EINVAL), (b"a\0b", errno.EINVAL)],
)
def test_bad_names(meta: Meta, name: bytes, code: int) -> None:
    seq = meta.kv.seq
    fails(code, mkfile, meta, ROOT, name)
    fails(code, mkdir, meta, ROOT, name)
    fails(code, meta.symlink, ROOT, name, b"t", 0, 0)
    assert meta.kv.seq == seq


def test_longest_name_is_fine(meta: Meta) -> None:
    mkfile(meta, ROOT, b"x" * 255)
    assert meta.lookup(ROOT, b"x" * 255).nlink == 1


def test_every_path_refuses_a_name_past_255_bytes(meta: Meta) -> None:
    """ENAMETOOLONG wherever a name enters, whether or not the rest of the request could succeed."""
    long = b"y" * 256
    f = mkfile(meta, ROOT, b"f")
    d = mkdir(meta, ROOT, b"d")
    seq = meta.kv.seq
    calls: list[tuple[Callable[..., object], tuple[object, ...]]] = [
        (meta.lookup, (ROOT, long)), (meta.lookup, (d.ino, long)),
        (meta.mknod, (ROOT, long, stat.S_IFREG | 0o644, 0, 0, 0)), (meta.mkdir, (ROOT, long, 0o755, 0, 0)),
        (meta.create, (ROOT, long, stat.S_IFREG | 0o644, 0, 0)), (meta.symlink, (ROOT, long, b"t", 0, 0)),
        (meta.link, (f.ino, ROOT, long)), (meta.unlink, (ROOT, long)), (meta.rmdir, (ROOT, long)),
        (meta.rename, (ROOT, long, ROOT, b"g")), (meta.rename, (ROOT, b"f", ROOT, long)),
        (meta.rename, (ROOT, b"f", d.ino, long, RENAME_EXCHANGE)),
    ]  # fmt: skip
    for fn, args in calls:
        fails(errno.ENAMETOOLONG, fn, *args)
    assert meta.kv.seq == seq


def test_sgid_directory_passes_on_its_group(meta: Meta) -> None:
    d = meta.mkdir(ROOT, b"shared", 0o2775, 1000, 50)
    assert d.mode & stat.S_ISGID
    f = mkfile(meta, d.ino, b"f")
    sub = meta.mkdir(d.ino, b"sub", 0o755, 1000, 1000)
    assert f.gid == 50 and not f.mode & stat.S_ISGID
    assert sub.gid == 50 and sub.mode & stat.S_ISGID
    plain = mkfile(meta, ROOT, b"plain")
    assert plain.gid == 1000


def test_symlink_and_readlink(meta: Meta) -> None:
    s = meta.symlink(ROOT, b"s", b"../some/where", 3, 4)
    assert stat.S_ISLNK(s.mode) and s.size == len(b"../some/where")
    assert meta.readlink(s.ino) == b"../some/where"
    f = mkfile(meta, ROOT, b"f")
    fails(errno.EINVAL, meta.readlink, f.ino)
    fails(errno.ENOENT, meta.symlink, ROOT, b"e", b"", 0, 0)
    fails(errno.ENAMETOOLONG, meta.symlink, ROOT, b"l", b"x" * 4096, 0, 0)
    fails(errno.ENOENT, meta.readlink, 999)


# -- links and removal ----------------------------------------------------------------------------
def test_link(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    d = mkdir(meta, ROOT, b"d")
    a = meta.link(f.ino, d.ino, b"g")
    assert a.nlink == 2 and a.ctime_ns > f.ctime_ns
    assert meta.lookup(d.ino, b"g").ino == f.ino
    assert meta.getattr(d.ino).mtime_ns == a.ctime_ns  # one transaction, one timestamp
    fails(errno.EPERM, meta.link, d.ino, ROOT, b"dd")
    fails(errno.EEXIST, meta.link, f.ino, ROOT, b"d")
    fails(errno.ENOTDIR, meta.link, f.ino, f.ino, b"x")
    fails(errno.ENOENT, meta.link, 999, ROOT, b"x")


def test_unlink_frees_the_last_link(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.link(f.ino, ROOT, b"g")
    meta.commit_blocks(f.ino, {0: (H1, 100)}, 100)
    meta.setxattr(f.ino, b"user.a", b"1")
    meta.unlink(ROOT, b"f")
    assert meta.getattr(f.ino).nlink == 1 and used(meta) == 100
    meta.unlink(ROOT, b"g")
    fails(errno.ENOENT, meta.getattr, f.ino)
    assert used(meta) == 0 and meta.statfs()["inodes"] == 1
    assert list(meta.kv.scan(b"A" + f.ino.to_bytes(8, "big"))) == []


def test_unlink_errors(meta: Meta) -> None:
    mkdir(meta, ROOT, b"d")
    fails(errno.ENOENT, meta.unlink, ROOT, b"nope")
    fails(errno.EISDIR, meta.unlink, ROOT, b"d")
    fails(errno.EINVAL, meta.unlink, ROOT, b".")


def test_rmdir(meta: Meta) -> None:
    d = mkdir(meta, ROOT, b"d")
    mkfile(meta, d.ino, b"f")
    mkfile(meta, ROOT, b"f")
    fails(errno.ENOTEMPTY, meta.rmdir, ROOT, b"d")
    fails(errno.ENOTDIR, meta.rmdir, ROOT, b"f")
    fails(errno.ENOENT, meta.rmdir, ROOT, b"nope")
    meta.unlink(d.ino, b"f")
    meta.rmdir(ROOT, b"d")
    assert meta.getattr(ROOT).nlink == 2
    fails(errno.ENOENT, meta.getattr, d.ino)
    assert names(meta, ROOT) == [b"f"]


# -- rename ---------------------------------------------------------------------------------------
def test_rename_moves_a_file(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    d = mkdir(meta, ROOT, b"d")
    seq = meta.kv.seq
    meta.rename(ROOT, b"f", d.ino, b"g")
    assert meta.kv.seq == seq + 1
    assert names(meta, ROOT) == [b"d"] and names(meta, d.ino) == [b"g"]
    moved = meta.getattr(f.ino)
    assert moved.ctime_ns > f.ctime_ns and moved.nlink == 1
    assert meta.getattr(d.ino).nlink == 2


def test_rename_over_a_file_frees_it(meta: Meta) -> None:
    a = mkfile(meta, ROOT, b"a")
    b = mkfile(meta, ROOT, b"b")
    meta.commit_blocks(b.ino, {0: (H2, 50)}, 50)
    meta.rename(ROOT, b"a", ROOT, b"b")
    assert meta.lookup(ROOT, b"b").ino == a.ino
    fails(errno.ENOENT, meta.getattr, b.ino)
    assert used(meta) == 0 and meta.statfs()["inodes"] == 2


def test_rename_over_a_linked_file_drops_one_link(meta: Meta) -> None:
    mkfile(meta, ROOT, b"a")
    b = mkfile(meta, ROOT, b"b")
    meta.link(b.ino, ROOT, b"c")
    meta.rename(ROOT, b"a", ROOT, b"b")
    assert meta.getattr(b.ino).nlink == 1


def test_rename_onto_itself_or_its_hard_link_is_a_noop(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.link(f.ino, ROOT, b"g")
    seq = meta.kv.seq
    meta.rename(ROOT, b"f", ROOT, b"f")
    meta.rename(ROOT, b"f", ROOT, b"g")
    assert meta.kv.seq == seq
    assert names(meta, ROOT) == [b"f", b"g"] and meta.getattr(f.ino).nlink == 2
    fails(errno.EEXIST, meta.rename, ROOT, b"f", ROOT, b"g", RENAME_NOREPLACE)


def test_rename_dir_over_empty_dir(meta: Meta) -> None:
    p = mkdir(meta, ROOT, b"p")
    a = mkdir(meta, ROOT, b"a")
    b = mkdir(meta, p.ino, b"b")
    meta.rename(ROOT, b"a", p.ino, b"b")
    fails(errno.ENOENT, meta.getattr, b.ino)
    assert meta.lookup(p.ino, b"b").ino == a.ino
    assert meta.lookup(a.ino, b"..").ino == p.ino
    assert meta.getattr(ROOT).nlink == 3 and meta.getattr(p.ino).nlink == 3
    assert meta.statfs()["inodes"] == 3


def test_rename_dir_over_empty_dir_in_same_parent(meta: Meta) -> None:
    mkdir(meta, ROOT, b"a")
    mkdir(meta, ROOT, b"b")
    meta.rename(ROOT, b"a", ROOT, b"b")
    assert meta.getattr(ROOT).nlink == 3 and names(meta, ROOT) == [b"b"]


def test_rename_dir_changes_dotdot(meta: Meta) -> None:
    x = mkdir(meta, ROOT, b"x")
    y = mkdir(meta, ROOT, b"y")
    d = mkdir(meta, x.ino, b"d")
    meta.rename(x.ino, b"d", y.ino, b"d")
    assert meta.getattr(x.ino).nlink == 2 and meta.getattr(y.ino).nlink == 3
    assert meta.lookup(d.ino, b"..").ino == y.ino


def test_rename_type_errors(meta: Meta) -> None:
    d = mkdir(meta, ROOT, b"d")
    mkdir(meta, d.ino, b"inner")
    mkdir(meta, ROOT, b"e")
    mkfile(meta, ROOT, b"f")
    fails(errno.ENOTEMPTY, meta.rename, ROOT, b"e", ROOT, b"d")
    fails(errno.EISDIR, meta.rename, ROOT, b"f", ROOT, b"e")
    fails(errno.ENOTDIR, meta.rename, ROOT, b"e", ROOT, b"f")
    fails(errno.ENOENT, meta.rename, ROOT, b"nope", ROOT, b"x")
    fails(errno.ENOTDIR, meta.rename, ROOT, b"f", meta.lookup(ROOT, b"f").ino, b"x")
    fails(errno.EINVAL, meta.rename, ROOT, b"f", ROOT, b"g", 4)
    fails(errno.EINVAL, meta.rename, ROOT, b"f", ROOT, b"g", RENAME_NOREPLACE | RENAME_EXCHANGE)


def test_rename_into_own_subtree_is_einval(meta: Meta) -> None:
    a = mkdir(meta, ROOT, b"a")
    b = mkdir(meta, a.ino, b"b")
    c = mkdir(meta, b.ino, b"c")
    fails(errno.EINVAL, meta.rename, ROOT, b"a", a.ino, b"x")
    fails(errno.EINVAL, meta.rename, ROOT, b"a", c.ino, b"x")
    fails(errno.ENOTEMPTY, meta.rename, b.ino, b"c", ROOT, b"a")  # target is an ancestor
    meta.rename(b.ino, b"c", ROOT, b"c")  # moving up is fine
    assert meta.lookup(c.ino, b"..").ino == ROOT


def test_rename_noreplace(meta: Meta) -> None:
    mkfile(meta, ROOT, b"a")
    mkfile(meta, ROOT, b"b")
    fails(errno.EEXIST, meta.rename, ROOT, b"a", ROOT, b"b", RENAME_NOREPLACE)
    meta.rename(ROOT, b"a", ROOT, b"c", RENAME_NOREPLACE)
    assert names(meta, ROOT) == [b"b", b"c"]


def test_rename_exchange_file_and_dir_across_dirs(meta: Meta) -> None:
    x = mkdir(meta, ROOT, b"x")
    y = mkdir(meta, ROOT, b"y")
    f = mkfile(meta, x.ino, b"f")
    d = mkdir(meta, y.ino, b"d")
    seq = meta.kv.seq
    meta.rename(x.ino, b"f", y.ino, b"d", RENAME_EXCHANGE)
    assert meta.kv.seq == seq + 1
    assert meta.lookup(x.ino, b"f").ino == d.ino and meta.lookup(y.ino, b"d").ino == f.ino
    assert meta.getattr(x.ino).nlink == 3 and meta.getattr(y.ino).nlink == 2
    assert meta.lookup(d.ino, b"..").ino == x.ino
    fails(errno.ENOENT, meta.rename, x.ino, b"f", y.ino, b"nope", RENAME_EXCHANGE)


def test_rename_exchange_refuses_a_cycle(meta: Meta) -> None:
    a = mkdir(meta, ROOT, b"a")
    mkdir(meta, a.ino, b"b")
    fails(errno.EINVAL, meta.rename, ROOT, b"a", a.ino, b"b", RENAME_EXCHANGE)


def test_rename_over_open_file_keeps_it_until_release(meta: Meta) -> None:
    mkfile(meta, ROOT, b"a")
    b = mkfile(meta, ROOT, b"b")
    meta.commit_blocks(b.ino, {0: (H1, 10)}, 10)
    meta.open(b.ino)
    meta.rename(ROOT, b"a", ROOT, b"b")
    attr, blocks = meta.get_blocks(b.ino)
    assert attr.nlink == 0 and blocks == {0: whole(H1, 10)}
    meta.release(b.ino)
    fails(errno.ENOENT, meta.getattr, b.ino)
    assert used(meta) == 0


# -- setattr --------------------------------------------------------------------------------------
def test_setattr_fields_and_ctime(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    a = meta.setattr(f.ino, mode=stat.S_IFDIR | 0o4711, uid=1, gid=2, atime_ns=5, mtime_ns=6)
    assert a.mode == stat.S_IFREG | 0o4711
    assert (a.uid, a.gid, a.atime_ns, a.mtime_ns) == (1, 2, 5, 6) and a.ctime_ns > f.ctime_ns
    assert meta.getattr(f.ino) == a
    assert meta.setattr(f.ino, ctime_ns=42).ctime_ns == 42
    fails(errno.ENOENT, meta.setattr, 999, mode=0o600)


def test_truncate_shrinks_the_block_map(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.commit_blocks(f.ino, {0: (H1, BLOCK), 1: (H2, BLOCK), 2: (H1, 100)}, 2 * BLOCK + 100)
    assert used(meta) == 2 * BLOCK + 100
    a = meta.setattr(f.ino, size=BLOCK + 10)
    assert a.size == BLOCK + 10 and a.mtime_ns == a.ctime_ns
    assert meta.get_blocks(f.ino)[1] == {0: whole(H1, BLOCK), 1: whole(H2, 10)}
    assert used(meta) == BLOCK + 10
    meta.setattr(f.ino, size=0)
    assert meta.get_blocks(f.ino)[1] == {} and used(meta) == 0


def test_truncate_grows_sparsely(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.commit_blocks(f.ino, {0: (H1, 10)}, 10)
    a = meta.setattr(f.ino, size=100 * BLOCK)
    assert a.size == 100 * BLOCK and meta.get_blocks(f.ino)[1] == {0: whole(H1, 10)} and used(meta) == 10


def test_truncate_errors(meta: Meta) -> None:
    d = mkdir(meta, ROOT, b"d")
    p = meta.mknod(ROOT, b"p", stat.S_IFIFO | 0o644, 0, 0, 0)
    f = mkfile(meta, ROOT, b"f")
    fails(errno.EISDIR, meta.setattr, d.ino, size=0)
    fails(errno.EINVAL, meta.setattr, p.ino, size=0)
    fails(errno.EINVAL, meta.setattr, f.ino, size=-1)


# -- readdir --------------------------------------------------------------------------------------
def test_readdir_order_cursor_limit(meta: Meta) -> None:
    for name in [b"b", b"a", b"c\xff", b"c", b"ab"]:
        mkfile(meta, ROOT, name)
    d = mkdir(meta, ROOT, b"dir")
    assert names(meta, ROOT) == [b"a", b"ab", b"b", b"c", b"c\xff", b"dir"]
    assert [n for n, _ in meta.readdir(ROOT, after=b"ab", limit=2)] == [b"b", b"c"]
    assert [n for n, _ in meta.readdir(ROOT, after=b"c")] == [b"c\xff", b"dir"]
    assert meta.readdir(ROOT, after=b"dir") == []
    entries = dict(meta.readdir(ROOT))
    assert entries[b"dir"] == meta.getattr(d.ino)
    assert meta.readdir(d.ino) == []
    fails(errno.ENOTDIR, meta.readdir, meta.lookup(ROOT, b"a").ino)


# -- xattrs ---------------------------------------------------------------------------------------
def test_xattrs(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.setxattr(f.ino, b"user.b", b"2")
    meta.setxattr(f.ino, b"user.a", b"")
    assert meta.getxattr(f.ino, b"user.b") == b"2"
    assert meta.getxattr(f.ino, b"user.a") == b""
    assert meta.listxattr(f.ino) == [b"user.a", b"user.b"]
    fails(errno.EEXIST, meta.setxattr, f.ino, b"user.a", b"x", XATTR_CREATE)
    fails(errno.ENODATA, meta.setxattr, f.ino, b"user.c", b"x", XATTR_REPLACE)
    meta.setxattr(f.ino, b"user.a", b"new", XATTR_REPLACE)
    meta.setxattr(f.ino, b"user.c", b"3", XATTR_CREATE)
    assert meta.getxattr(f.ino, b"user.a") == b"new"
    meta.removexattr(f.ino, b"user.b")
    fails(errno.ENODATA, meta.getxattr, f.ino, b"user.b")
    fails(errno.ENODATA, meta.removexattr, f.ino, b"user.b")
    assert meta.listxattr(f.ino) == [b"user.a", b"user.c"]
    fails(errno.ENOENT, meta.setxattr, 999, b"user.a", b"1")
    fails(errno.ENOENT, meta.listxattr, 999)
    fails(errno.ERANGE, meta.setxattr, f.ino, b"u" * 256, b"1")
    fails(errno.E2BIG, meta.setxattr, f.ino, b"user.big", b"x" * 65537)


# -- data and quota -------------------------------------------------------------------------------
def test_commit_blocks(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    a = meta.commit_blocks(f.ino, {0: (H1, BLOCK), 1: (H2, 5)}, BLOCK + 5, mtime_ns=77)
    assert a.size == BLOCK + 5 and a.mtime_ns == 77 and a.ctime_ns > f.ctime_ns
    assert used(meta) == BLOCK + 5
    a = meta.commit_blocks(f.ino, {0: (H2, 10)}, 10)  # overwrite; size never shrinks here
    assert a.size == BLOCK + 5 and used(meta) == 15
    meta.commit_blocks(f.ino, {0: (H2, 0)}, 0)  # a hole
    assert meta.get_blocks(f.ino)[1] == {1: whole(H2, 5)} and used(meta) == 5


def test_commit_blocks_errors(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    d = mkdir(meta, ROOT, b"d")
    fails(errno.EINVAL, meta.commit_blocks, f.ino, {0: (b"short", 1)}, 1)
    fails(errno.EINVAL, meta.commit_blocks, f.ino, {0: (H1, BLOCK + 1)}, 2 * BLOCK)
    fails(errno.EINVAL, meta.commit_blocks, f.ino, {-1: (H1, 1)}, 2 * BLOCK)
    fails(errno.EINVAL, meta.commit_blocks, f.ino, {1: (H1, 10)}, BLOCK)
    fails(errno.EISDIR, meta.commit_blocks, d.ino, {0: (H1, 1)}, 1)
    fails(errno.ENOENT, meta.commit_blocks, 999, {0: (H1, 1)}, 1)
    assert meta.getattr(f.ino).size == 0 and used(meta) == 0


def test_quota_refuses_with_nothing_changed(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.capacity = 10 * BLOCK + 1  # the name "f" is a byte of metadata, counted too
    full = {i: (H1, BLOCK) for i in range(10)}
    meta.commit_blocks(f.ino, full, 10 * BLOCK)
    seq = meta.kv.seq
    with pytest.raises(NoSpace):
        meta.commit_blocks(f.ino, {10: (H2, 1)}, 10 * BLOCK + 1)
    assert meta.kv.seq == seq and meta.getattr(f.ino).size == 10 * BLOCK
    meta.commit_blocks(f.ino, {0: (H2, BLOCK)}, BLOCK)  # same usage: fine at the limit
    meta.capacity = 5 * BLOCK  # shrunk below usage: freeing space must still work
    meta.commit_blocks(f.ino, {9: (H2, 10)}, 0)
    assert used(meta) == 9 * BLOCK + 10
    with pytest.raises(NoSpace):
        meta.commit_blocks(f.ino, {9: (H2, 11)}, 0)
    meta.capacity = 20 * BLOCK
    meta.commit_blocks(f.ino, {10: (H2, BLOCK)}, 11 * BLOCK)
    assert meta.statfs() == {
        "capacity": 20 * BLOCK,
        "used": 10 * BLOCK + 10,
        "inodes": 2,
        "block_size": BLOCK,
        "max_inodes": 0,
        "meta_bytes": 1,
    }


# -- open files and orphans -----------------------------------------------------------------------
def test_unlinked_open_file_lives_until_last_release(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.commit_blocks(f.ino, {0: (H1, 10)}, 10)
    meta.open(f.ino)
    meta.open(f.ino)
    meta.unlink(ROOT, b"f")
    fails(errno.ENOENT, meta.lookup, ROOT, b"f")
    assert meta.getattr(f.ino).nlink == 0 and meta.get_blocks(f.ino)[1] == {0: whole(H1, 10)}
    meta.commit_blocks(f.ino, {1: (H2, 10)}, BLOCK + 10)  # still writable through its handle
    fails(errno.ENOENT, meta.link, f.ino, ROOT, b"back")
    meta.release(f.ino)
    assert meta.getattr(f.ino).nlink == 0
    meta.release(f.ino)
    fails(errno.ENOENT, meta.getattr, f.ino)
    assert used(meta) == 0 and meta.statfs()["inodes"] == 1
    assert list(meta.kv.scan(b"O")) == []
    meta.release(f.ino)  # a stray release (e.g. from before a failover) is harmless


def test_release_of_a_linked_file_keeps_it(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    meta.open(f.ino)
    seq = meta.kv.seq
    meta.release(f.ino)
    assert meta.kv.seq == seq and meta.getattr(f.ino).nlink == 1
    fails(errno.ENOENT, meta.open, 999)


def test_purge_orphans_after_restart(meta: Meta) -> None:
    f = mkfile(meta, ROOT, b"f")
    g = mkfile(meta, ROOT, b"g")
    meta.commit_blocks(f.ino, {0: (H1, 10)}, 10)
    meta.open(f.ino)
    meta.open(g.ino)
    meta.unlink(ROOT, b"f")
    meta.unlink(ROOT, b"g")
    restarted = Meta(meta.kv, meta.capacity, BLOCK, meta.clock)
    restarted.open(g.ino)  # reopened at the new coordinator: keep it
    assert restarted.purge_orphans() == 1
    fails(errno.ENOENT, restarted.getattr, f.ino)
    assert restarted.getattr(g.ino).nlink == 0
    assert used(restarted) == 0 and restarted.statfs()["inodes"] == 2


# -- atomicity: every mutation is one batch -------------------------------------------------------
MUTATIONS: list[tuple[str, Callable[[Meta, Attr, Attr], object]]] = [
    ("mknod", lambda m, f, d: mkfile(m, ROOT, b"new")),
    ("mkdir", lambda m, f, d: mkdir(m, d.ino, b"new")),
    ("symlink", lambda m, f, d: m.symlink(ROOT, b"s", b"t", 0, 0)),
    ("link", lambda m, f, d: m.link(f.ino, d.ino, b"l")),
    ("unlink", lambda m, f, d: m.unlink(ROOT, b"f")),
    ("rmdir", lambda m, f, d: m.rmdir(ROOT, b"e")),
    ("rename", lambda m, f, d: m.rename(ROOT, b"f", d.ino, b"f")),
    ("exchange", lambda m, f, d: m.rename(ROOT, b"f", ROOT, b"d", RENAME_EXCHANGE)),
    ("setattr", lambda m, f, d: m.setattr(f.ino, size=1)),
    ("setxattr", lambda m, f, d: m.setxattr(f.ino, b"user.x", b"1")),
    ("removexattr", lambda m, f, d: m.removexattr(f.ino, b"user.a")),
    ("commit_blocks", lambda m, f, d: m.commit_blocks(f.ino, {1: (H1, 1)}, BLOCK + 1)),
]


@pytest.mark.parametrize("op", [fn for _, fn in MUTATIONS], ids=[name for name, _ in MUTATIONS])
def test_every_mutation_is_one_kv_write(meta: Meta, op: Callable[[Meta, Attr, Attr], object]) -> None:
    f = mkfile(meta, ROOT, b"f")
    d = mkdir(meta, ROOT, b"d")
    mkdir(meta, ROOT, b"e")
    meta.commit_blocks(f.ino, {0: (H1, 10)}, 10)
    meta.setxattr(f.ino, b"user.a", b"1")
    seq = meta.kv.seq
    op(meta, f, d)
    assert meta.kv.seq == seq + 1


# -- RocksDB-backed ---------------------------------------------------------------------------------
def test_rocks_tree_survives_reopen(rocks_meta: Meta, tmp_path: Path) -> None:
    m = rocks_meta
    d = mkdir(m, ROOT, b"d")
    f = mkfile(m, d.ino, b"f")
    m.commit_blocks(f.ino, {0: (H1, 10)}, 10)
    m.rename(d.ino, b"f", ROOT, b"g")
    m.kv.close()
    m2 = Meta(RocksKV(str(tmp_path / "meta")), 10 * BLOCK, BLOCK, m.clock)
    try:
        assert names(m2, ROOT) == [b"d", b"g"]
        assert m2.get_blocks(f.ino)[1] == {0: whole(H1, 10)}
        assert m2.statfs()["used"] == 10 and m2.statfs()["inodes"] == 3
        assert mkfile(m2, ROOT, b"h").ino == f.ino + 1
    finally:
        m2.kv.close()


def test_rocks_follower_replays_the_coordinator(rocks_meta: Meta) -> None:
    m = rocks_meta
    d = mkdir(m, ROOT, b"d")
    f = mkfile(m, d.ino, b"f")
    m.setxattr(f.ino, b"user.k", b"v")
    m.rename(d.ino, b"f", ROOT, b"f")
    follower_kv = MemKV()
    for seq, data in m.kv.log_since(0):
        follower_kv.apply(seq, data)
    follower = Meta(follower_kv, 10 * BLOCK, BLOCK, m.clock)
    assert follower.readdir(ROOT) == m.readdir(ROOT)
    assert follower.getxattr(f.ino, b"user.k") == b"v"
    assert list(follower_kv.scan(b"")) == list(m.kv.scan(b""))


def test_rocks_errors_leave_no_trace(rocks_meta: Meta) -> None:
    m = rocks_meta
    mkdir(m, ROOT, b"d")
    mkfile(m, m.lookup(ROOT, b"d").ino, b"f")
    before = list(m.kv.scan(b""))
    fails(errno.ENOTEMPTY, m.rmdir, ROOT, b"d")
    fails(errno.EINVAL, m.rename, ROOT, b"d", m.lookup(ROOT, b"d").ino, b"x")
    assert list(m.kv.scan(b"")) == before
