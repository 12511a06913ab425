"""The short-circuit read path: chunk files of this host's replicas, read and verified directly."""

from __future__ import annotations

from pathlib import Path

import blake3
import pytest

from pxfs.chunks.local_read import LocalPools, is_local_address
from pxfs.chunks.pool import Pool
from pxfs.errors import Corrupt


def test_reads_verified_chunks_of_local_pools(tmp_path: Path) -> None:
    pool = Pool(tmp_path / "p", 64 << 20)
    pool.open()
    data = b"x" * 5000
    h = blake3.blake3(data).digest()
    pool.put(h, data)
    local = LocalPools({"n1": [tmp_path / "p"], "n2": [tmp_path / "elsewhere"]})
    assert "n1" in local and "n2" not in local  # a pool directory not on this host is no use
    assert local.read("n1", h) == data
    assert local.read("n1", blake3.blake3(b"other").digest()) is None
    assert local.read("n2", h) is None
    path = next((tmp_path / "p" / "chunks").glob("*/*"))
    path.write_bytes(b"y" + data[1:])
    with pytest.raises(Corrupt):
        local.read("n1", h)


def test_local_addresses() -> None:
    assert is_local_address("127.0.0.1")
    assert not is_local_address("192.0.2.7")  # TEST-NET-1: never assigned to a host
