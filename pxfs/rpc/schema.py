"""Loads schema/pxfs.capnp once; every other rpc module takes the interfaces from here."""

from __future__ import annotations

from pathlib import Path

import capnp

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schema" / "pxfs.capnp"

capnp.remove_import_hook()
pxfs_capnp = capnp.load(str(SCHEMA_PATH))

# Chunks are at most a block (default 1 MiB, at most 64 MiB): raise the traversal limit on both
# ends so a 64 MiB block still fits in one message (64 MiB = 8 Mi words, plus framing).
TRAVERSAL_LIMIT_WORDS = 2**25
