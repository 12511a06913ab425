"""Volumes as real FUSE mounts of a real 3-node cluster: POSIX behaviour, persistence, mount handling."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from pxfs.rpc import pki
from tests.conftest import PXFS, Cluster, eventually, is_mounted, mount, mounted
from tests.posix_acl import check_acls, needs_acl_tools, reachable_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE")

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    AT_FDCWD = -100  # noqa: N806
    if _libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def vol(shared_cluster: Cluster) -> str:
    shared_cluster.cli("volume", "create", "posix", "--size", "1G", "--repl", "3")
    return "posix"


def test_files_dirs_links(shared_cluster: Cluster, vol: str, tmp_path: Path) -> None:
    with mounted(shared_cluster, vol, tmp_path / "mnt") as m:
        d = m.path / "t1"
        d.mkdir()
        f = d / "hello.txt"
        f.write_bytes(b"hello world\n")
        assert f.read_bytes() == b"hello world\n"
        assert sorted(os.listdir(d)) == ["hello.txt"]
        (d / "sub").mkdir()
        assert os.stat(d).st_nlink == 3
        os.symlink("hello.txt", d / "sym")
        assert os.readlink(d / "sym") == "hello.txt"
        assert (d / "sym").read_bytes() == b"hello world\n"
        os.link(f, d / "hard")
        assert os.stat(f).st_nlink == 2 and os.stat(d / "hard").st_ino == os.stat(f).st_ino
        os.mkfifo(d / "fifo")
        assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
        os.unlink(d / "hard")
        assert os.stat(f).st_nlink == 1
        with pytest.raises(OSError) as e:
            os.rmdir(d)
        assert e.value.errno == errno.ENOTEMPTY
        with pytest.raises(FileExistsError):
            os.mkdir(d / "sub")
        with pytest.raises(FileNotFoundError):
            os.stat(d / "missing")
        long = "x" * 255
        (d / long).write_bytes(b"1")
        assert long in os.listdir(d)
        # ENAMETOOLONG on every path, also in t1, a directory this mount made (whose every name
        # it knows and answers lookups for itself: issue 13, pjdfstest chmod/02.t and others).
        too_long = d / ("y" * 256)
        for call in (lambda: too_long.write_bytes(b"1"), lambda: os.stat(too_long),
                     lambda: os.lstat(m.path / ("y" * 256)), lambda: os.chmod(too_long, 0o600),
                     lambda: os.chown(too_long, 1, 1), lambda: os.truncate(too_long, 0),
                     lambda: os.mkdir(too_long), lambda: os.mknod(too_long), lambda: os.mkfifo(too_long),
                     lambda: os.symlink("t", too_long), lambda: os.link(f, too_long),
                     lambda: os.link(too_long, d / "z"), lambda: os.rename(f, too_long),
                     lambda: os.rename(too_long, d / "z"), lambda: os.unlink(too_long),
                     lambda: os.rmdir(too_long)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.ENAMETOOLONG


def test_posix_acls_and_xattr_namespaces_as_other_users(shared_cluster: Cluster, vol: str) -> None:
    """setfacl/getfacl through a real pxfs mount (the ACLs go over RPC to the coordinator's Meta),
    read back as uid 1000 and 1001."""
    needs_acl_tools()
    with reachable_dir() as d, mounted(shared_cluster, vol, d / "mnt", "-o", "allow_other") as m:
        check_acls(m.path)
        with pytest.raises(OSError) as e:
            os.setxattr(m.path / "acl" / "open", "system.foo", b"1")
        assert e.value.errno == errno.EOPNOTSUPP


def test_rename_variants(shared_cluster: Cluster, vol: str, tmp_path: Path) -> None:
    with mounted(shared_cluster, vol, tmp_path / "mnt") as m:
        d = m.path / "t2"
        d.mkdir()
        a, b = d / "a", d / "b"
        a.write_bytes(b"A")
        b.write_bytes(b"B")
        os.rename(a, b)  # over an existing target
        assert b.read_bytes() == b"A" and not a.exists()
        a.write_bytes(b"A2")
        with pytest.raises(FileExistsError):
            renameat2(a, b, RENAME_NOREPLACE)
        renameat2(a, b, RENAME_EXCHANGE)
        assert a.read_bytes() == b"A" and b.read_bytes() == b"A2"
        (d / "dir1").mkdir()
        (d / "dir1" / "x").write_bytes(b"x")
        os.rename(d / "dir1", d / "dir2")
        assert (d / "dir2" / "x").read_bytes() == b"x"
        with pytest.raises(OSError) as e:
            os.rename(d / "dir2", d / "dir2" / "inside")
        assert e.value.errno == errno.EINVAL


def test_attributes_truncate_sparse_xattrs_statfs(shared_cluster: Cluster, vol: str, tmp_path: Path) -> None:
    with mounted(shared_cluster, vol, tmp_path / "mnt") as m:
        f = m.path / "attrs"
        f.write_bytes(b"0123456789")
        os.chmod(f, 0o640)
        os.chown(f, 1234, 5678)
        os.utime(f, ns=(1_000_000_123, 2_000_000_456))
        st = os.stat(f)
        assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (1234, 5678)
        assert st.st_atime_ns == 1_000_000_123 and st.st_mtime_ns == 2_000_000_456
        os.truncate(f, 4)
        assert f.read_bytes() == b"0123"
        os.truncate(f, 8)
        assert f.read_bytes() == b"0123\0\0\0\0"
        sparse = m.path / "sparse"
        with open(sparse, "wb") as fh:
            fh.seek(5 << 20)
            fh.write(b"end")
        assert sparse.stat().st_size == (5 << 20) + 3
        with open(sparse, "rb") as fh:
            assert fh.read(4096) == bytes(4096)
            fh.seek(5 << 20)
            assert fh.read() == b"end"
        os.setxattr(f, "user.color", b"blue")
        assert os.getxattr(f, "user.color") == b"blue"
        assert "user.color" in os.listxattr(f)
        os.removexattr(f, "user.color")
        with pytest.raises(OSError) as e:
            os.getxattr(f, "user.color")
        assert e.value.errno == errno.ENODATA
        sv = os.statvfs(m.path)
        assert sv.f_blocks * sv.f_frsize == 1 << 30
        assert sv.f_namemax == 255


def test_unlinked_open_file_stays_readable(shared_cluster: Cluster, vol: str, tmp_path: Path) -> None:
    with mounted(shared_cluster, vol, tmp_path / "mnt") as m:
        f = m.path / "ghost"
        data = os.urandom(3 << 20)
        f.write_bytes(data)
        used = used_bytes(m.path)
        with open(f, "rb") as fh:
            os.unlink(f)
            assert not f.exists()
            assert fh.read() == data
            assert used_bytes(m.path) == used  # still open: its space is still taken
        # close(2) does not wait for the coordinator; the orphan goes once the close reaches it.
        eventually(lambda: used_bytes(m.path) <= used - len(data), timeout=10, what="orphan space freed")


def used_bytes(path: Path) -> int:
    sv = os.statvfs(path)
    return (sv.f_blocks - sv.f_bfree) * sv.f_frsize


def test_data_survives_remount(shared_cluster: Cluster, vol: str, tmp_path: Path) -> None:
    files = {f"f{i}": os.urandom(n) for i, n in enumerate([0, 1, 4095, 1 << 20, (1 << 20) + 1, 5 << 20])}
    with mounted(shared_cluster, vol, tmp_path / "mnt") as m:
        d = m.path / "persist"
        d.mkdir()
        for name, data in files.items():
            with open(d / name, "wb") as fh:
                fh.write(data)
                os.fsync(fh.fileno())
    with mounted(shared_cluster, vol, tmp_path / "mnt2") as m:
        for name, data in files.items():
            assert hashlib.sha256((m.path / "persist" / name).read_bytes()).digest() == hashlib.sha256(data).digest()


def test_two_mounts_close_to_open(shared_cluster: Cluster, vol: str, tmp_path: Path) -> None:
    with mounted(shared_cluster, vol, tmp_path / "a") as a, mounted(shared_cluster, vol, tmp_path / "b") as b:
        (a.path / "c2o").mkdir()
        data = os.urandom(2 << 20)
        with open(a.path / "c2o" / "x", "wb") as fh:
            fh.write(data)
        assert (b.path / "c2o" / "x").read_bytes() == data
        with open(b.path / "c2o" / "x", "r+b") as fh:
            fh.write(b"CHANGED")
        assert (a.path / "c2o" / "x").read_bytes()[:7] == b"CHANGED"


def test_other_mounts_caches_follow_changes(shared_cluster: Cluster, vol: str, tmp_path: Path) -> None:
    """B's kernel caches attributes, names and missing names for 30 s; A's changes reach it at once."""
    with mounted(shared_cluster, vol, tmp_path / "a") as a, mounted(shared_cluster, vol, tmp_path / "b") as b:
        (a.path / "inval").mkdir()
        da, db = a.path / "inval", b.path / "inval"
        (da / "f").write_bytes(b"one")
        assert db.joinpath("f").stat().st_mode & 0o777 == 0o644  # B caches the entry and its attributes
        assert not db.joinpath("later").exists()  # ... and a negative entry

        def b_sees(check) -> bool:  # noqa: ANN001 - bounded far below the 30 s cache lifetime
            try:
                return eventually(check, timeout=5, what="mount B seeing mount A's change")
            except AssertionError:
                return False

        os.chmod(da / "f", 0o600)
        assert b_sees(lambda: db.joinpath("f").stat().st_mode & 0o777 == 0o600)
        (da / "later").write_bytes(b"two")
        assert b_sees(lambda: db.joinpath("later").exists())
        with open(da / "f", "ab") as fh:
            fh.write(b"more")
        assert b_sees(lambda: db.joinpath("f").stat().st_size == 7)
        os.rename(da / "f", da / "g")
        assert b_sees(lambda: not db.joinpath("f").exists() and db.joinpath("g").read_bytes() == b"onemore")
        os.unlink(da / "later")
        assert b_sees(lambda: not db.joinpath("later").exists())
        # A made the directory, so it answers lookups of missing names there by itself, until B
        # changes something in it.
        assert not da.joinpath("from_b").exists()
        (db / "from_b").write_bytes(b"b")
        assert b_sees(lambda: da.joinpath("from_b").read_bytes() == b"b")


def test_quota_gives_enospc(shared_cluster: Cluster, tmp_path: Path) -> None:
    shared_cluster.cli("volume", "create", "tiny", "--size", "4M", "--repl", "2")
    with mounted(shared_cluster, "tiny", tmp_path / "mnt") as m:
        with pytest.raises(OSError) as e:
            with open(m.path / "big", "wb") as fh:
                for _ in range(8):
                    fh.write(os.urandom(1 << 20))
                os.fsync(fh.fileno())
        assert e.value.errno == errno.ENOSPC
        sv = os.statvfs(m.path)
        assert sv.f_blocks * sv.f_frsize == 4 << 20
        # What did not fit is still buffered, and umount would refuse to drop it: give it up.
        os.unlink(m.path / "big")


def _mount_rc(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    return cluster.cli("mount", *args, check=False)


def test_mount_bad_input(shared_cluster: Cluster, vol: str, tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    cases = [
        (("nosuchvol", str(mp)), 'volume "nosuchvol": no such volume'),
        ((vol, str(tmp_path / "missing")), "does not exist"),
        ((vol, str(mp), "-o", "bogus"), "mount option 'bogus': unknown option"),
        (("../etc", str(mp)), "no '/', no path"),
    ]
    for args, message in cases:
        proc = _mount_rc(shared_cluster, *args)
        assert proc.returncode == 1, proc
        assert message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not is_mounted(mp)
    with mounted(shared_cluster, vol, mp):
        proc = _mount_rc(shared_cluster, vol, str(mp))
        assert proc.returncode == 1 and "already in use" in proc.stderr
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "cluster.json").write_text((shared_cluster.dir / "cluster.json").read_text())
    pki.make_ca(wrong, "another")  # an admin credential of another cluster's CA
    pki.issue(wrong, wrong / "admin", "admin", "admin")
    proc = subprocess.run([*PXFS, "mount", vol, str(mp), "--cluster", str(wrong)], capture_output=True, text=True)
    assert proc.returncode == 1 and "TLS handshake failed" in proc.stderr, proc.stderr
    assert not is_mounted(mp)


def test_mount_t_fuse_pxfs_via_fstab(shared_cluster: Cluster, vol: str, tmp_path: Path) -> None:
    subprocess.run([*PXFS, "install-mount-helper"], check=True, capture_output=True)
    mp = tmp_path / "fstab-mnt"
    mp.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{vol} {mp} fuse.pxfs _netdev,allow_other,cluster={shared_cluster.dir} 0 0\n")
    proc = subprocess.run(["mount", "-T", str(fstab), str(mp)], capture_output=True, text=True, env={})
    assert proc.returncode == 0, proc.stderr
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", str(mp)], capture_output=True, text=True)
        assert out.stdout.split() == [vol, "fuse.pxfs"]
        (mp / "via-fstab").write_bytes(b"ok")
        assert (mp / "via-fstab").read_bytes() == b"ok"
    finally:
        shared_cluster.cli("umount", str(mp))
    assert not is_mounted(mp)


@pytest.mark.skipif(not Path("/usr/bin/bwrap").exists(), reason="bubblewrap not installed")
def test_container_writes_as_other_uid(shared_cluster: Cluster, vol: str, tmp_path: Path) -> None:
    with mounted(shared_cluster, vol, tmp_path / "mnt", "-o", "allow_other") as m:
        shared = m.path / "shared"
        shared.mkdir()
        os.chmod(shared, 0o777)
        proc = subprocess.run(
            # A sandbox with its own pid/net/ipc/uts namespaces whose process runs as uid 1000: the
            # mount must be allow_other for a uid other than the mount daemon's to reach it.
            ["bwrap", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--bind", str(m.path), "/mnt",
             "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-net", "/usr/bin/setpriv", "--reuid",
             "1000", "--regid", "1000", "--clear-groups", "/bin/sh", "-c",
             "echo from-container > /mnt/shared/c.txt && cat /mnt/shared/c.txt"],
            capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        st = os.stat(shared / "c.txt")
        assert (shared / "c.txt").read_text() == "from-container\n"
        assert st.st_uid == 1000


def test_open_o_trunc_truncates_and_touches(shared_cluster: Cluster, vol: str, tmp_path: Path) -> None:
    # Found by pjdfstest open/00.t: the kernel passes O_TRUNC to open (atomic_o_trunc).
    with mounted(shared_cluster, vol, tmp_path / "mnt") as m:
        f = m.path / "trunc-me"
        f.write_bytes(b"test\n")
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
        fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
        st = os.stat(f)
        assert st.st_size == 0
        assert st.st_mtime_ns > 1_000_000_000 and st.st_ctime_ns > 1_000_000_000


def test_umount_fails_and_keeps_data_it_could_not_store(shared_cluster: Cluster, tmp_path: Path) -> None:
    """Issue 13: pxfs umount exited 0 with write(2)-accepted data unstored. Now it flushes first;
    when that fails it says so, exits 1 and leaves the mount (and the data) in place."""
    c = shared_cluster
    c.cli("volume", "create", "tight", "--size", "8M", "--repl", "2", "--block-size", "1M")
    mp = tmp_path / "mnt"
    m = mount(c, "tight", mp)
    try:
        filler = m.path / "filler"
        filler.write_bytes(os.urandom(6 << 20))  # stored: its close flushed it
        data = os.urandom(4 << 20)
        fd = os.open(m.path / "late", os.O_CREAT | os.O_WRONLY, 0o644)
        assert os.write(fd, data) == len(data)  # accepted: it is in the mount's buffer
        with pytest.raises(OSError) as e:
            os.close(fd)  # the flush at close meets the quota
        assert e.value.errno == errno.ENOSPC
        proc = c.cli("umount", str(mp), check=False)
        assert proc.returncode == 1, proc.stdout
        assert "could not be stored" in proc.stderr and "still mounted" in proc.stderr, proc.stderr
        assert is_mounted(mp)
        os.unlink(filler)  # room again: the kept data can be stored now
        c.cli("umount", str(mp))
        assert not is_mounted(mp)
    finally:
        if is_mounted(mp):
            c.cli("umount", str(mp), check=False)
            subprocess.run(["umount", "-l", str(mp)], capture_output=True)
    with mounted(c, "tight", tmp_path / "again") as m:
        assert sha(m.path / "late") == hashlib.sha256(data).hexdigest()
