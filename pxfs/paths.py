"""Names that become paths on a node's disk (volumes, snapshots, node ids): one rule, one resolver.

Such names arrive from the wire (RPC arguments, replicated batches, control-store records); a name
that is a path ("../x", "/etc", "a/b") must never reach the filesystem, whoever sent it.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from pxfs.errors import Invalid

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def is_name(name: str) -> bool:
    return bool(NAME.match(name or "")) and name not in (".", "..")


def under(base: Path, name: str, what: str) -> Path:
    """``base / name``, refused unless ``name`` is one plain component that stays inside ``base``."""
    if not is_name(name):
        raise Invalid(what, "name must be 1-63 letters, digits, '_', '.', '-' starting with a letter or digit "
                      "(never a path)")
    path = base / name
    if path.resolve().parent != base.resolve():  # a symlink planted under base must not lead out
        raise Invalid(what, f"{path} leads outside {base}")
    return path


def claim_socket(path: Path, obj: str, holder: str) -> None:
    """Make ``path`` free for a unix socket to listen on: a stale socket file (its server died) is
    removed, a live one is an error naming ``obj`` (nobody else's listener is ever taken over)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # left by a server that died: nobody answers there
    else:
        raise Invalid(obj, f"another {holder} is listening there")
    finally:
        probe.close()
