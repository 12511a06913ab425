"""The RPC surface of real `pxfs node` processes: chunks over the wire, login, hostile peers.

Every case ends by checking that the node it poked still serves: a fresh login reads back a known
chunk, every node process is alive, and `pxfs status --json` reports a healthy cluster.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
from pathlib import Path

import blake3
import pytest
import trio

from pxfs.cluster.config import MIN_GC_GRACE, load_config, load_credential
from pxfs.errors import Invalid, NoSpace, NotFound, Unavailable
from pxfs.rpc.bridge import open_bridge
from pxfs.rpc.client import Connection, split_address
from pxfs.rpc.schema import TRAVERSAL_LIMIT_WORDS
from tests.conftest import PXFS, Cluster, free_port_block, node_connection

MiB = 1 << 20


def make_chunk(n: int = MiB) -> tuple[bytes, bytes]:
    data = os.urandom(n)
    return blake3.blake3(data).digest(), data


def address(cluster: Cluster, index: int = 0) -> str:
    return load_config(cluster.dir).addresses()[index]


async def put_known(cluster: Cluster, index: int = 0) -> tuple[bytes, bytes]:
    """A chunk stored on node ``index`` before the case pokes it, read back by ``assert_serving``."""
    h, data = make_chunk(64 << 10)
    async with node_connection(cluster, index) as conn:
        assert await (await conn.chunks()).put(h, data) is True
    return h, data


async def assert_serving(cluster: Cluster, known: tuple[bytes, bytes], index: int = 0) -> None:
    h, data = known
    async with node_connection(cluster, index) as conn:
        assert await (await conn.chunks()).get(h) == data
    for i in range(cluster.nodes):
        os.kill(cluster.pid(f"n{i + 1}"), 0)  # raises if a node process died
    status = await trio.to_thread.run_sync(cluster.json, "status")
    assert status["health"] == "healthy", status
    assert [n["state"] for n in status["nodes"]] == ["up"] * cluster.nodes


# -- chunks ------------------------------------------------------------------------------------


async def test_chunks_round_trip_dedup_and_has(cluster: Cluster) -> None:
    known = await put_known(cluster, 1)
    h, data = make_chunk(MiB)
    absent = blake3.blake3(b"never stored").digest()
    async with node_connection(cluster, 1) as conn:
        chunks = await conn.chunks()
        assert await chunks.put(h, data) is True
        assert await chunks.put(h, data) is False  # dedup
    async with node_connection(cluster, 1) as conn:
        chunks = await conn.chunks()
        got = await chunks.get(h)
        assert got == data and blake3.blake3(got).digest() == h
        assert await chunks.has_many([h, absent, known[0], absent]) == [True, False, True, False]
        assert await chunks.has_many([]) == []
        stats = await chunks.stats()
        assert len(stats) == 1 and stats[0].node == "n2"
        assert stats[0].chunks == 2 and stats[0].used == MiB + len(known[1])
    # A chunk lives on the node it was put to; the others do not have it.
    async with node_connection(cluster, 0) as conn:
        assert await (await conn.chunks()).has_many([h]) == [False]
    await assert_serving(cluster, known, 1)


async def test_gc_grace_below_the_minimum_is_refused_by_the_node(cluster: Cluster) -> None:
    """A grace shorter than a commit's longest wait could sweep a chunk about to be named."""
    h, data = make_chunk(64 << 10)  # put just now, named by no volume
    async with node_connection(cluster, 1) as conn:
        chunks = await conn.chunks()
        await chunks.put(h, data)
        for grace in (0.0, MIN_GC_GRACE - 1, -5.0, float("nan"), 1e12):
            with pytest.raises(Invalid) as err:
                await chunks.collect(False, grace)
            assert f"must be {MIN_GC_GRACE:g} s" in str(err.value), err.value
        report = await chunks.collect(False, MIN_GC_GRACE)
        assert report["grace"] == MIN_GC_GRACE and report["deleted"] == 0
        assert await chunks.has_many([h]) == [True]
    # The CLI refuses it before asking any node: one line, exit 1.
    for bad in ("0", "139"):
        proc = await trio.to_thread.run_sync(lambda bad=bad: cluster.cli("gc", "--grace", bad, check=False))
        assert proc.returncode == 1 and proc.stdout == "", proc
        assert proc.stderr.strip().splitlines() == [f"pxfs: --grace {bad}: must be {MIN_GC_GRACE:g} s (twice the "
                                                   "commit window of 60 s, and 20 s) to 30 days: a younger chunk "
                                                   "may be about to be named by a commit"], proc.stderr
    ok = await trio.to_thread.run_sync(lambda: cluster.json("gc", "--dry-run", "--grace", f"{MIN_GC_GRACE:g}"))
    assert all("error" not in n for n in ok["nodes"]), ok
    known = await put_known(cluster, 1)
    await assert_serving(cluster, known, 1)


async def test_concurrent_puts_of_one_chunk_store_it_once(cluster: Cluster) -> None:
    known = await put_known(cluster)
    h, data = make_chunk(MiB)
    results: list[bool] = []

    async def put_once() -> None:
        async with node_connection(cluster, 0) as conn:
            results.append(await (await conn.chunks()).put(h, data))

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(put_once)
    assert sorted(results) == [False] * 5 + [True]
    async with node_connection(cluster, 0) as conn:
        chunks = await conn.chunks()
        assert await chunks.get(h) == data
        assert (await chunks.stats())[0].used == MiB + len(known[1])
    await assert_serving(cluster, known)


async def test_bad_hashes_and_absent_chunks(cluster: Cluster) -> None:
    known = await put_known(cluster)
    data = os.urandom(4096)
    good = blake3.blake3(data).digest()
    async with node_connection(cluster, 0) as conn:
        chunks = await conn.chunks()
        for n in (0, 31, 33, 64):
            bad = good[:n] if n <= 32 else good + bytes(n - 32)
            with pytest.raises(Invalid, match=f"got {n}"):
                await chunks.put(bad, data)
            with pytest.raises(Invalid, match=f"got {n}"):
                await chunks.get(bad)
            with pytest.raises(Invalid, match=f"got {n}"):
                await chunks.has_many([good, bad])
        # Bytes that do not hash to their name: refused, nothing stored.
        other = blake3.blake3(b"something else").digest()
        with pytest.raises(Invalid, match="hash mismatch"):
            await chunks.put(other, data)
        flipped = bytes([data[0] ^ 1]) + data[1:]
        with pytest.raises(Invalid, match="hash mismatch"):
            await chunks.put(good, flipped)
        assert await chunks.has_many([other, good]) == [False, False]
        with pytest.raises(NotFound, match="not in pools"):
            await chunks.get(good)
        with pytest.raises(NotFound):
            await chunks.get(other)
        # The connection itself survives all of those errors.
        assert await chunks.put(good, data) is True
        assert await chunks.get(good) == data
        assert (await chunks.stats())[0].chunks == 2
    await assert_serving(cluster, known)


async def test_pool_past_capacity_says_no_space(tmp_path: Path, cluster: Cluster) -> None:
    known = await put_known(cluster)
    port = free_port_block(1)
    addr = f"127.0.0.1:{port}"
    pool = tmp_path / "small-pool"
    credential = load_credential(cluster.dir)
    log = open(tmp_path / "n4.log", "wb")
    proc = subprocess.Popen([*PXFS, "node", "start", "--cluster", str(cluster.dir), "--listen", addr,
                             "--pool", f"{pool},size=16M", "--id", "n4"], stdout=log, stderr=log)
    try:
        async with open_bridge() as bridge:
            conn: Connection | None = None
            with trio.fail_after(30):
                while conn is None:
                    assert proc.poll() is None, (tmp_path / "n4.log").read_text()
                    try:
                        conn = await Connection.open(bridge, addr, credential, peer="test", timeout=2)
                    except Unavailable:
                        await trio.sleep(0.1)
            try:
                chunks = await conn.chunks()
                (info,) = await chunks.stats()
                assert info.capacity == 16 * MiB and info.free == 12 * MiB  # 4 MiB reserve
                stored: list[tuple[bytes, bytes]] = []
                with pytest.raises(NoSpace) as err:
                    for _ in range(64):
                        h, data = make_chunk(MiB)
                        assert await chunks.put(h, data) is True
                        stored.append((h, data))
                assert len(stored) == 12
                assert str(pool) in str(err.value) and "no pool has room" in str(err.value)
                assert await chunks.has_many([h]) == [False]
                # A full pool still dedups, and refuses even a tiny new chunk.
                assert await chunks.put(*stored[0]) is False
                with pytest.raises(NoSpace):
                    await chunks.put(*make_chunk(1))
                (info,) = await chunks.stats()
                assert info.used == 12 * MiB and info.free == 0 and info.chunks == 12
                for h, data in stored:
                    assert await chunks.get(h) == data
            finally:
                await conn.close()
            # n4 itself keeps serving a fresh login.
            conn = await Connection.open(bridge, addr, credential, peer="test")
            try:
                assert await (await conn.chunks()).get(stored[-1][0]) == stored[-1][1]
            finally:
                await conn.close()
        assert proc.poll() is None
        status = await trio.to_thread.run_sync(cluster.json, "status")
        assert status["health"] == "healthy"
        assert {n["id"] for n in status["nodes"]} >= {"n1", "n2", "n3"}
        h, data = known
        async with node_connection(cluster, 0) as conn:
            assert await (await conn.chunks()).get(h) == data
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    assert proc.returncode == 0, (tmp_path / "n4.log").read_text()


# -- hostile bytes on the socket ---------------------------------------------------------------


def _seg_header(count: int, *sizes: int) -> bytes:
    """A capnp frame header: segment count minus one, then the segment sizes in words (uint32 LE)."""
    return struct.pack(f"<{1 + len(sizes)}I", (count - 1) & 0xFFFFFFFF, *sizes)


GARBAGE = {
    "random-4k": random.Random(1).randbytes(4096),
    "random-64k": random.Random(2).randbytes(65536),
    "random-body": _seg_header(1, 16) + random.Random(3).randbytes(16 * 8),
    "null-message": _seg_header(1, 1) + bytes(8),
    "segments-2^31": _seg_header(2**31, 1),
    "segments-2^32": _seg_header(0, 1),  # count-1 wraps to 0xffffffff
    "segments-1000": _seg_header(1000, *([1] * 1000)) + bytes(4) + bytes(8 * 1000),
    "segment-4G-words": _seg_header(1, 0xFFFFFFFF),
    "segment-over-limit": _seg_header(1, TRAVERSAL_LIMIT_WORDS + 1),
    "second-segment-huge": _seg_header(2, 1, 0xFFFFFFFF) + bytes(4) + bytes(8),
}

# Frames cut short: the node cannot tell them from a slow peer until the peer hangs up.
TRUNCATED = {
    "half-header": b"\x00\x00",
    "header-only": _seg_header(1, 10),
    "half-body": _seg_header(1, 10) + bytes(40),
    "half-segment-table": struct.pack("<II", 3, 1),
}


def _probe(port: int, payload: bytes, hang_up: bool) -> str:
    """Send ``payload``; how the node ended the connection: 'closed', 'reset', or 'open' after 10 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(payload)
            if hang_up:
                s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
            return "closed"
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        except TimeoutError:
            return "open"


async def test_garbage_on_the_wire_closes_only_that_connection(cluster: Cluster) -> None:
    known = await put_known(cluster)
    _host, port = split_address(address(cluster))
    async with node_connection(cluster, 0) as survivor:
        chunks = await survivor.chunks()
        # A half-sent frame held open must not stall anyone else while it waits.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
            held.sendall(_seg_header(1, 100) + bytes(16))
            for name, payload in GARBAGE.items():
                assert await trio.to_thread.run_sync(_probe, port, payload, False) in ("closed", "reset"), name
                assert await chunks.get(known[0]) == known[1], name
            for name, payload in TRUNCATED.items():
                assert await trio.to_thread.run_sync(_probe, port, payload, True) in ("closed", "reset"), name
            async with node_connection(cluster, 0) as fresh:
                assert await (await fresh.chunks()).get(known[0]) == known[1]
        # Many garbage connections at once.
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(trio.to_thread.run_sync, _probe, port, random.Random(i).randbytes(1024), False)
        assert await chunks.get(known[0]) == known[1]
    await assert_serving(cluster, known)


async def test_has_is_capped_per_call(cluster: Cluster) -> None:
    """``has`` is capped per call; a too-long list is refused as Invalid and the node stays up."""
    known = await put_known(cluster)
    async with node_connection(cluster, 0) as conn:
        chunks = await conn.chunks()
        with pytest.raises(Invalid, match="at most 65536"):
            await chunks.has_many([known[0]] * 65537)
        assert await chunks.has_many([known[0]] * 1000) == [True] * 1000
    await assert_serving(cluster, known)

