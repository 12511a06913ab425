"""Who may call what: the role table, checked by every server method against the caller's identity.

The identity comes from the peer's certificate (``pxfs.rpc.pki``), verified by the TLS handshake
against the cluster CA; nothing a peer sends on the wire changes it.

  node   replication (VolumeService), chunk copy and GC (ChunkStore), the ControlStore; Admin reads
  admin  everything
  mount  the Volume capability of its volumes, chunk get/put/has/stats, Admin reads of its volumes
"""

from __future__ import annotations

from pxfs.errors import Unauthorized
from pxfs.rpc.pki import Identity


def require(who: Identity, what: str, *roles: str) -> None:
    """Unauthorized unless ``who`` holds one of ``roles`` (admin always does)."""
    if who.role != "admin" and who.role not in roles:
        raise Unauthorized(what, f"refused to {who}: needs role {' or '.join(('admin', *roles))}")


def require_volume(who: Identity, volume: str, what: str) -> None:
    """Unauthorized unless ``who`` may use ``volume`` (``VOL@snap`` counts as ``VOL``)."""
    if not who.may_use(volume.split("@", 1)[0]):
        raise Unauthorized(what, f"refused to {who}: its credential does not name volume {volume!r}")
