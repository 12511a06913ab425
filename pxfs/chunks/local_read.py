"""The short-circuit read path: a mount on the host of a replica reads its chunk files directly.

A chunk file is immutable and named by its hash, and the bytes are verified here as on every read,
so reading it without asking the node is safe: anything unexpected (absent, being collected,
unreadable) returns None and the read goes through the node's RPC; a corrupt copy sends the read to
that node first, whose own check quarantines it, so the usual healing follows.
A node counts as local when this host can bind its address; its pools must also exist here.
"""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

import blake3

from pxfs.chunks.pool import chunk_file, chunk_name
from pxfs.errors import Corrupt

log = logging.getLogger(__name__)


def is_local_address(host: str) -> bool:
    """True when ``host`` is an address of this machine (binding to it succeeds)."""
    try:
        infos = socket.getaddrinfo(host or "127.0.0.1", 0, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _name, addr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind((addr[0], 0))
            return True
        except OSError as err:
            if err.errno != errno.EADDRNOTAVAIL:
                log.debug("bind to %s: %s", addr[0], err)
    return False


class LocalPools:
    """Pool directories of the replica nodes that run on this host."""

    def __init__(self, pools: dict[str, list[Path]] | None = None) -> None:
        self.pools = {node: [p for p in paths if (p / "chunks").is_dir()] for node, paths in (pools or {}).items()}
        self.pools = {node: paths for node, paths in self.pools.items() if paths}

    def __contains__(self, node: str) -> bool:
        return node in self.pools

    def read(self, node: str, h: bytes) -> bytes | None:
        """The verified bytes of chunk ``h`` from ``node``'s pools on this host, or None if it has none
        here; ``Corrupt`` when its copy is bad (the node itself must quarantine and heal it)."""
        for pool in self.pools.get(node, ()):
            try:
                with open(chunk_file(pool, h), "rb", buffering=0) as f:
                    data = f.read()
            except OSError:
                continue
            if blake3.blake3(data).digest() == h:
                return data
            raise Corrupt(chunk_name(h), f"bytes in pool {pool} of node {node} do not match their BLAKE3 name")
        return None
