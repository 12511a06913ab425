"""Real FUSE: plain ``os`` calls on a mounted volume (Operations -> Vfs -> fakes, in a subprocess)."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.fuse.conftest import FakeMount, start_mount
from tests.posix_acl import check_acls, needs_acl_tools, reachable_dir

BLOCK = 128 << 10  # the fake mount's default block size
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def data(n: int, seed: int = 0) -> bytes:
    return bytes((i * 13 + seed + i // 997) % 256 for i in range(n))


def test_files_names_and_attributes(fake_mount: FakeMount) -> None:
    m = fake_mount.path
    big = data(3 * BLOCK + 1234)
    (m / "a").write_bytes(big)
    assert (m / "a").read_bytes() == big
    assert os.stat(m / "a").st_size == len(big)
    assert os.stat(m / "a").st_blksize == BLOCK

    fd = os.open(m / "a", os.O_RDWR)
    try:
        os.pwrite(fd, b"PATCH", BLOCK - 2)  # across a block boundary, into committed blocks
        os.fsync(fd)
        assert os.pread(fd, 9, BLOCK - 4) == big[BLOCK - 4:BLOCK - 2] + b"PATCH" + big[BLOCK + 3:BLOCK + 5]
    finally:
        os.close(fd)

    os.truncate(m / "a", 100)
    assert (m / "a").read_bytes() == big[:100]
    os.truncate(m / "a", 2 * BLOCK)
    assert (m / "a").read_bytes() == big[:100] + bytes(2 * BLOCK - 100)
    with open(m / "a", "ab") as f:
        f.write(b"end")
    assert os.stat(m / "a").st_size == 2 * BLOCK + 3

    os.rename(m / "a", m / "b")
    assert not (m / "a").exists()
    os.symlink("b", m / "s")
    assert os.readlink(m / "s") == "b"
    assert stat.S_ISLNK(os.lstat(m / "s").st_mode)
    os.link(m / "b", m / "h")
    assert os.stat(m / "b").st_nlink == 2
    assert os.stat(m / "h").st_ino == os.stat(m / "b").st_ino

    os.mkdir(m / "d")
    (m / "d" / "x").write_text("x")
    with pytest.raises(OSError) as info:
        os.rmdir(m / "d")
    assert info.value.errno == errno.ENOTEMPTY
    os.unlink(m / "d" / "x")
    os.rmdir(m / "d")
    with pytest.raises(FileNotFoundError):
        os.stat(m / "d")

    assert sorted(os.listdir(m)) == ["b", "h", "s"]
    ls = subprocess.run(["ls", "-a", str(m)], capture_output=True, text=True, check=True).stdout.split()
    assert ls == [".", "..", "b", "h", "s"]


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def test_rename_flags_and_special_files(fake_mount: FakeMount) -> None:
    m = fake_mount.path
    (m / "x").write_bytes(b"X")
    (m / "y").write_bytes(b"YY")
    with pytest.raises(OSError) as info:
        renameat2(m / "x", m / "y", RENAME_NOREPLACE)
    assert info.value.errno == errno.EEXIST
    renameat2(m / "x", m / "y", RENAME_EXCHANGE)
    assert ((m / "x").read_bytes(), (m / "y").read_bytes()) == (b"YY", b"X")
    os.mkfifo(m / "fifo", 0o600)
    assert stat.S_ISFIFO(os.stat(m / "fifo").st_mode)
    os.chmod(m / "x", 0o600)
    os.utime(m / "x", ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(m / "x")
    assert (stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns) == (0o600, 1_000_000_000, 2_000_000_000)


def test_xattrs(fake_mount: FakeMount) -> None:
    p = fake_mount.path / "f"
    p.write_bytes(b"")
    os.setxattr(p, "user.k", b"v1")
    assert os.getxattr(p, "user.k") == b"v1"
    with pytest.raises(OSError) as info:
        os.setxattr(p, "user.k", b"v2", os.XATTR_CREATE)
    assert info.value.errno == errno.EEXIST
    os.setxattr(p, "user.k", b"v2", os.XATTR_REPLACE)
    assert os.listxattr(p) == ["user.k"]
    assert os.getxattr(p, "user.k") == b"v2"
    os.removexattr(p, "user.k")
    with pytest.raises(OSError) as info:
        os.getxattr(p, "user.k")
    assert info.value.errno == errno.ENODATA
    # Namespaces as ext4 answers them (we are root here: trusted.* is ours).
    os.setxattr(p, "trusted.t", b"1")
    os.setxattr(p, "security.s", b"2")
    assert sorted(os.listxattr(p)) == ["security.s", "trusted.t"]
    os.mkfifo(fake_mount.path / "fifo")
    for name, target, code in (("foo.bar", p, errno.EOPNOTSUPP), ("system.foo", p, errno.EOPNOTSUPP),
                               ("user.x", fake_mount.path / "fifo", errno.EPERM)):
        with pytest.raises(OSError) as info:
            os.setxattr(target, name, b"v")
        assert info.value.errno == code, name


def test_statfs_and_quota(fake_mount: FakeMount) -> None:
    m = fake_mount.path
    st = os.statvfs(m)
    assert st.f_bsize == BLOCK and st.f_frsize == BLOCK
    assert st.f_blocks * st.f_frsize == 16 << 20
    assert st.f_namemax == 255
    (m / "small").write_bytes(data(BLOCK))
    # Its name is metadata, in the quota too: free is what data can still use, in whole blocks.
    assert os.statvfs(m).f_bfree == ((16 << 20) - BLOCK - len(b"small")) // BLOCK
    # Past the 16 MiB quota: buffered writes succeed, the commit at fsync/close reports ENOSPC.
    fd = os.open(m / "huge", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        chunk = data(1 << 20)
        for i in range(17):
            os.pwrite(fd, chunk, i << 20)
        with pytest.raises(OSError) as info:
            os.fsync(fd)
        assert info.value.errno == errno.ENOSPC
        os.ftruncate(fd, 1 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.stat(m / "huge").st_size == 1 << 20


def test_unlinked_open_file_stays_readable(fake_mount: FakeMount) -> None:
    p = fake_mount.path / "tmp"
    with open(p, "w+b") as f:
        f.write(data(BLOCK + 5))
        f.flush()
        os.unlink(p)
        f.seek(0)
        assert f.read() == data(BLOCK + 5)
    assert os.listdir(fake_mount.path) == []


def test_sigterm_unmounts(tmp_path: Path) -> None:
    m = start_mount(tmp_path / "mnt", tmp_path / "mount.log")
    (m.path / "f").write_bytes(b"x")
    m.unmount(signal.SIGTERM)


def test_read_only_mount(tmp_path: Path) -> None:
    m = start_mount(tmp_path / "mnt", tmp_path / "mount.log", "--read-only")
    try:
        with pytest.raises(OSError) as info:
            (m.path / "f").write_bytes(b"x")
        assert info.value.errno == errno.EROFS
        with pytest.raises(OSError) as info:
            os.mkdir(m.path / "d")
        assert info.value.errno == errno.EROFS
        assert os.listdir(m.path) == []
    finally:
        m.unmount()


def test_posix_acls_as_other_users(tmp_path: Path) -> None:
    needs_acl_tools()
    with reachable_dir() as d:
        m = start_mount(d / "mnt", tmp_path / "mount.log", "--allow-other")
        try:
            check_acls(m.path)
        finally:
            m.unmount()
