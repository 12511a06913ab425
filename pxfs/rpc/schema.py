"""Loads schema/pxfs.capnp once; every other rpc module takes the interfaces from here."""

from __future__ import annotations

from pathlib import Path

import capnp

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schema" / "pxfs.capnp"

capnp.remove_import_hook()
pxfs_capnp = capnp.load(str(SCHEMA_PATH))

# Chunks are at most a block (default 1 MiB, at most 16 MiB). 64 MiB per message (8 Mi words) leaves
# room for a block and a metadata batch; a frame announcing more is refused by both ends.
TRAVERSAL_LIMIT_WORDS = 2**23
