"""Whether a daemon process still lives, as seen through /proc."""

from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    """A zombie counts as dead: in a container whose init does not reap, a killed daemon stays one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def holds_fuse(pid: int) -> bool:
    """Whether the process still has /dev/fuse open: a daemon on its way out has closed it already."""
    if not alive(pid):
        return False
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if fd.readlink() == Path("/dev/fuse"):
                return True
        except OSError:
            continue
    return False
