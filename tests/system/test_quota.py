"""Bounded metadata, through real mounts of repl-3 volumes (issue 13): an unprivileged user cannot
store more xattrs than the volume's size, nor more files than its inodes; huge block maps are freed
and cut in bounded batches."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import Cluster, eventually, mounted
from tests.posix_acl import FRIEND, as_user, reachable_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE")

MiB = 1 << 20
VALUE = 60000  # bytes per xattr value (XATTR_SIZE_MAX is 64 KiB)

# Run as FRIEND: set xattrs on a file until the filesystem refuses; print how many and why.
FILL = f"""
import errno, os, sys
path, n = sys.argv[1], 0
try:
    while True:
        os.setxattr(path, b"user.%04d" % n, b"v" * {VALUE})
        n += 1
except OSError as e:
    print(n, errno.errorcode[e.errno])
"""

# Run as FRIEND: remove them all again.
EMPTY = """
import os, sys
for name in os.listxattr(sys.argv[1]):
    os.removexattr(sys.argv[1], name)
"""


def inspect(c: Cluster, name: str) -> dict:
    v = c.json("volume", "inspect", name)
    assert isinstance(v, dict)
    return v


def test_xattrs_and_inodes_meet_the_volume_quota(shared_cluster: Cluster) -> None:
    c = shared_cluster
    c.cli("volume", "create", "metaq", "--size", "16M", "--repl", "3", "--max-inodes", "40")
    with reachable_dir() as base, mounted(c, "metaq", base / "mnt", "-o", "allow_other") as m:
        st = os.statvfs(m.path)
        assert (st.f_files, st.f_ffree) == (40, 39)  # the root is one
        home = m.path / "user"
        home.mkdir()
        os.chown(home, FRIEND, FRIEND)
        f = home / "f"
        proc = as_user(FRIEND, sys.executable, "-c", f"open({str(f)!r}, 'w').close()")
        assert proc.returncode == 0, proc.stderr

        # 16 MiB is the room for data, names and xattrs together: the xattrs get what the two
        # names leave, to the byte, and the next one is ENOSPC.
        proc = as_user(FRIEND, sys.executable, "-c", FILL, str(f))
        assert proc.returncode == 0, proc.stderr
        stored, why = proc.stdout.split()
        each = len(b"user.0000") + VALUE
        assert why == "ENOSPC" and int(stored) == (16 * MiB - len(b"user") - len(b"f")) // each
        sv = os.statvfs(m.path)
        assert sv.f_bavail * sv.f_frsize < each
        with pytest.raises(OSError) as e:
            with open(f, "wb") as out:
                out.write(os.urandom(MiB))  # data meets the same full quota (at close)
        assert e.value.errno == errno.ENOSPC
        v = eventually(lambda: (v := inspect(c, "metaq"))["meta_bytes"] > 15 * MiB and v, what="usage report")
        assert v["inodes"] == 3 and v["max_inodes"] == 40
        assert v["meta_bytes"] == len(b"user") + len(b"f") + int(stored) * each

        proc = as_user(FRIEND, sys.executable, "-c", EMPTY, str(f))
        assert proc.returncode == 0, proc.stderr
        assert os.listxattr(f) == []

        # The inode limit: 37 more files and directories, then ENOSPC; a freed inode is reusable.
        made = 0
        with pytest.raises(OSError) as e:
            while True:
                if made % 2:
                    (home / f"d{made}").mkdir()
                else:
                    (home / f"f{made}").touch()
                made += 1
        assert e.value.errno == errno.ENOSPC and made == 40 - 3
        assert os.statvfs(m.path).f_ffree == 0
        (home / "f0").unlink()
        (home / "again").touch()
        v = eventually(lambda: (v := inspect(c, "metaq"))["inodes"] == 40 and v, what="usage report")
        assert v["meta_bytes"] < 1024  # the names only: the xattrs are gone

    # The limit can be raised (and the size changed) on the live volume; not below what is in use.
    proc = c.cli("volume", "resize", "metaq", "--max-inodes", "10", check=False)
    assert proc.returncode == 1 and "40 are in use" in proc.stderr
    c.cli("volume", "resize", "metaq", "--max-inodes", "100")
    assert inspect(c, "metaq")["max_inodes"] == 100
    c.cli("volume", "delete", "metaq")


def test_a_huge_block_map_is_freed_and_cut_in_bounded_batches(shared_cluster: Cluster, tmp_path: Path) -> None:
    """5000 blocks of 4 KiB: more than one batch may delete (PURGE_BATCH 4096). The unlink leaves the
    file's entries to the purge list and the truncate cuts ahead first; both end clean and counted."""
    c = shared_cluster
    c.cli("volume", "create", "bigmap", "--size", "1G", "--repl", "3", "--block-size", "4K")
    data = os.urandom(5000 * 4096)
    with mounted(c, "bigmap", tmp_path / "mnt") as m:
        (m.path / "gone").write_bytes(data)
        (m.path / "cut").write_bytes(data)
        os.truncate(m.path / "cut", 4096 + 10)
        assert (m.path / "cut").read_bytes() == data[: 4096 + 10]
        (m.path / "gone").unlink()
        v = eventually(lambda: (v := inspect(c, "bigmap"))["used"] == 4096 + 10 and v, timeout=60,
                       what="the purge of the unlinked file's blocks")
        assert v["inodes"] == 2
    report = c.json("fsck", "bigmap")
    assert isinstance(report, dict) and report["ok"], report
    c.cli("volume", "delete", "bigmap")
