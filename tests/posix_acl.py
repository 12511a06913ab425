"""POSIX ACLs through a real kernel mount, checked as other users: shared by the fuse and system tiers.

The kernel enforces ACLs (FUSE_POSIX_ACL with default_permissions); what these checks prove is
that the filesystem keeps them and the mode in step: ``setfacl``/``getfacl`` (Debian package
``acl``) as root, reads as uid 1000 and 1001 through ``setpriv``. The mount must allow other
users (``allow_other``) and sit in a directory they can reach (``reachable_dir``).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FRIEND, STRANGER = 1000, 1001


def needs_acl_tools() -> None:
    if shutil.which("setfacl") is None or shutil.which("setpriv") is None:
        pytest.skip("needs setfacl/getfacl (Debian package acl, see scripts/setup) and setpriv")


def as_user(uid: int, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=30, cwd="/")


def can_read(uid: int, path: Path) -> bool:
    return as_user(uid, "cat", str(path)).returncode == 0


def xattr_names_seen_by(uid: int, path: Path) -> list[str]:
    proc = as_user(uid, sys.executable, "-c", f"import os; print(*sorted(os.listxattr({str(path)!r})))")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@contextmanager
def reachable_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path is root's only); removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="pxfs-acl-", dir="/tmp"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def setfacl(*args: str) -> None:
    subprocess.run(["setfacl", *args], check=True, capture_output=True, text=True, timeout=30)


def getfacl(path: Path) -> list[str]:
    out = subprocess.run(["getfacl", "-cpn", str(path)], check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def check_acls(root: Path) -> None:
    """Access ACLs (the mode follows), chmod of an ACL, default ACLs inherited; xattr namespaces."""
    d = root / "acl"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    # setfacl -m o::--- : the mode says it all (0640), the file is closed to others.
    f = d / "open"
    f.write_bytes(b"open\n")
    f.chmod(0o644)
    assert can_read(STRANGER, f)
    setfacl("-m", "o::---", str(f))
    assert mode(f) == 0o640 and not can_read(STRANGER, f)
    assert getfacl(f) == ["user::rw-", "group::r--", "other::---"]
    # setfacl -m u:1000:r on a 0600 root file: 1000 reads it, nobody else does.
    g = d / "private"
    g.write_bytes(b"private\n")
    g.chmod(0o600)
    assert not can_read(FRIEND, g)
    setfacl("-m", f"u:{FRIEND}:r", str(g))
    assert can_read(FRIEND, g) and not can_read(STRANGER, g)
    assert mode(g) == 0o640  # the group bits show the mask
    assert f"user:{FRIEND}:r--" in getfacl(g)
    # chmod moves the mask: g-r takes the named entry's read away; g+r gives it back.
    g.chmod(0o600)
    assert not can_read(FRIEND, g) and "mask::---" in getfacl(g)
    g.chmod(0o640)
    assert can_read(FRIEND, g)
    setfacl("-b", str(g))
    assert not can_read(FRIEND, g) and mode(g) == 0o600  # group:: kept its own ---, not the mask
    # A default ACL on a directory: a new file gets it as its access ACL, a new directory both.
    inherit = d / "inherit"
    inherit.mkdir()
    setfacl("-d", "-m", f"u:{FRIEND}:rx,o::---", str(inherit))
    new = inherit / "new"
    new.write_bytes(b"new\n")  # mode 0666 & ~umask 022: the mask is r--
    assert can_read(FRIEND, new) and not can_read(STRANGER, new)
    assert f"user:{FRIEND}:r-x\t#effective:r--" in getfacl(new) and mode(new) == 0o640
    sub = inherit / "sub"
    sub.mkdir()
    assert f"default:user:{FRIEND}:r-x" in getfacl(sub) and f"user:{FRIEND}:r-x" in getfacl(sub)
    (sub / "deeper").write_bytes(b"deeper\n")
    assert can_read(FRIEND, sub / "deeper") and not can_read(STRANGER, sub / "deeper")
    # trusted.* is root's: set here, not listed to anyone else.
    os.setxattr(f, "trusted.t", b"1")
    os.setxattr(f, "user.u", b"2")
    assert "trusted.t" in os.listxattr(f)
    assert xattr_names_seen_by(FRIEND, f) == ["user.u"]
