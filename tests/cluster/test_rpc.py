"""The RPC surface of real `pxfs node` processes: chunks over the wire, login, hostile peers.

Every case ends by checking that the node it poked still serves: a fresh login reads back a known
chunk, every node process is alive, and `pxfs status --json` reports a healthy cluster.
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import blake3
import capnp
import pytest
import trio

from pxfs.cluster.config import MIN_GC_GRACE, load_config, load_secret
from pxfs.errors import Invalid, NoSpace, NotFound, PxfsError, Unauthorized, Unavailable
from pxfs.rpc import auth
from pxfs.rpc.bridge import Bridge, open_bridge
from pxfs.rpc.client import Connection, split_address
from pxfs.rpc.errors import decode
from pxfs.rpc.schema import TRAVERSAL_LIMIT_WORDS, pxfs_capnp
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


# -- raw pycapnp through the bridge ------------------------------------------------------------


async def raw(bridge: Bridge, addr: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``fn(bootstrap_cap)`` on a fresh, not logged-in capnp connection; PxfsErrors come back typed.

    Every capnp object dies on the capnp thread (destroyed anywhere else, KJ aborts the process): the
    error that reaches trio carries no frame holding one.
    """
    host, port = split_address(addr)

    async def go() -> Any:
        stream = await capnp.AsyncIoStream.create_connection(host=host, port=port, family=socket.AF_INET)
        client = capnp.TwoPartyClient(stream, traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS)
        err: PxfsError | None = None
        try:
            return await fn(client.bootstrap())
        except capnp.KjException as exc:
            err = decode(exc, addr)
        finally:
            client.close()
            del client, stream
            gc.collect()
        raise err

    return await bridge.run(go)


async def login(gateway: Any, secret: bytes, nonce: bytes | None = None) -> tuple[Any, bytes, bytes, bytes]:
    """Log in on ``gateway`` (capnp thread only); returns (session, nonce, client nonce, proof)."""
    if nonce is None:
        nonce = bytes((await gateway.challenge()).nonce)
    client_nonce = auth.new_nonce()
    proof = auth.client_proof(secret, nonce, client_nonce)
    r = await gateway.login(nonce, client_nonce, proof, "test-raw")
    assert bytes(r.serverProof) == auth.server_proof(secret, nonce, client_nonce)
    return r.session, nonce, client_nonce, proof


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
        assert proc.stderr.strip().splitlines() == [f"pxfs: --grace {bad}: must be {MIN_GC_GRACE:g} s (a write's "
                                                   "longest wait for its commit, doubled) to 30 days: a younger "
                                                   "chunk may be about to be named by a commit"], proc.stderr
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
    secret = load_secret(cluster.dir)
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
                        conn = await Connection.open(bridge, addr, secret, peer="test", timeout=2)
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
            conn = await Connection.open(bridge, addr, secret, peer="test")
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


# -- login -------------------------------------------------------------------------------------


async def test_wrong_secret_is_refused(tmp_path: Path, cluster: Cluster) -> None:
    known = await put_known(cluster)
    async with open_bridge() as bridge:
        for secret in (b"wrong" * 8, os.urandom(32), b""):
            with pytest.raises(Unauthorized, match="wrong cluster secret"):
                await Connection.open(bridge, address(cluster), secret, peer="t")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(cluster.dir / "cluster.json", other / "cluster.json")
    (other / "secret").write_text(os.urandom(32).hex() + "\n")
    os.chmod(other / "secret", 0o600)
    for args in (["status"], ["volume", "list"]):
        proc = subprocess.run([*PXFS, *args, "--cluster", str(other)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc
        assert "wrong cluster secret" in proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stdout == ""
    await assert_serving(cluster, known)


CRASH_SCRIPT = """
import gc, sys, trio
from pxfs.errors import Unauthorized
from pxfs.rpc.bridge import open_bridge
from pxfs.rpc.client import Connection

async def main():
    async with open_bridge() as bridge:
        for _ in range(50):
            try:
                await Connection.open(bridge, sys.argv[1], b"wrong" * 8, peer="t")
            except Unauthorized:
                pass
            gc.collect()
    print("survived")

trio.run(main)
"""


async def test_failed_logins_do_not_crash_the_client(cluster: Cluster) -> None:
    """A client retrying with a wrong secret (the CLI's wait loops, RemoteStore) must not abort.

    Regression: the KjException of a refused login used to reach trio with its traceback, whose
    frames held the TwoPartyClient; when trio's thread dropped it, KJ aborted the process ("No event
    loop is running on this thread"). Run in a child process so an abort cannot take pytest down.
    """
    known = await put_known(cluster)
    proc = await trio.run_process([sys.executable, "-c", CRASH_SCRIPT, address(cluster)], capture_stdout=True,
                                  capture_stderr=True, check=False)
    try:
        assert proc.returncode == 0 and b"survived" in proc.stdout, proc.stderr.decode()[-500:]
    finally:
        await assert_serving(cluster, known)


async def test_nothing_but_login_without_login(cluster: Cluster) -> None:
    known = await put_known(cluster)
    addr = address(cluster)
    secret = load_secret(cluster.dir)
    async with open_bridge() as bridge:
        attempts: list[tuple[Any, str, tuple]] = [
            (pxfs_capnp.Session, "chunks", ()),
            (pxfs_capnp.Session, "admin", ()),
            (pxfs_capnp.Session, "control", ()),
            (pxfs_capnp.Session, "volumes", ()),
            (pxfs_capnp.ChunkStore, "get", (known[0],)),
            (pxfs_capnp.ChunkStore, "put", known),
            (pxfs_capnp.ChunkStore, "has", ([known[0]],)),
            (pxfs_capnp.Admin, "listNodes", ()),
            (pxfs_capnp.Admin, "deleteVolume", ("x", True)),
            (pxfs_capnp.ControlStore, "range", ("",)),
            (pxfs_capnp.ControlStore, "put", ("nodes/evil", b"x")),
            (pxfs_capnp.VolumeService, "lastSeq", ("x",)),
        ]
        for iface, method, args in attempts:
            async def attempt(boot: Any, iface: Any = iface, method: str = method, args: tuple = args) -> Any:
                try:
                    await getattr(boot.cast_as(iface), method)(*args)
                except capnp.KjException as exc:
                    return exc.type, exc.description
                return None

            result = await raw(bridge, addr, attempt)
            assert result is not None, f"{iface}.{method} answered without a login"
            kind, description = result
            assert kind == "UNIMPLEMENTED" and "Requested interface not implemented" in description, result

        # A pipelined call on a refused login's session gets the refusal, not a capability.
        async def pipelined(boot: Any) -> Any:
            gw = boot.cast_as(pxfs_capnp.Gateway)
            nonce = bytes((await gw.challenge()).nonce)
            promise = gw.login(nonce, auth.new_nonce(), bytes(32), "evil")
            return bytes((await promise.session.chunks().chunks.get(known[0])).data)

        with pytest.raises(Unauthorized, match="wrong cluster secret"):
            await raw(bridge, addr, pipelined)

        # The same raw path with a real login does reach the chunk: the refusals above were the login's.
        async def logged_in(boot: Any) -> bytes:
            session, *_ = await login(boot.cast_as(pxfs_capnp.Gateway), secret)
            store = (await session.chunks()).chunks.cast_as(pxfs_capnp.ChunkStore)
            return bytes((await store.get(known[0])).data)

        assert await raw(bridge, addr, logged_in) == known[1]
    await assert_serving(cluster, known)


async def test_login_nonces_are_single_use_and_per_connection(cluster: Cluster) -> None:
    known = await put_known(cluster)
    addr = address(cluster)
    secret = load_secret(cluster.dir)
    async with open_bridge() as bridge:
        # Replay on the same gateway, right after a successful login.
        async def replay(boot: Any) -> None:
            gw = boot.cast_as(pxfs_capnp.Gateway)
            _session, nonce, client_nonce, proof = await login(gw, secret)
            await gw.login(nonce, client_nonce, proof, "replay")

        with pytest.raises(Unauthorized, match="replayed"):
            await raw(bridge, addr, replay)

        # A nonce issued on another connection (still open) is unknown here.
        async def foreign(boot: Any) -> None:
            nonce = bytes((await boot.cast_as(pxfs_capnp.Gateway).challenge()).nonce)

            host, port = split_address(addr)
            stream = await capnp.AsyncIoStream.create_connection(host=host, port=port, family=socket.AF_INET)
            client = capnp.TwoPartyClient(stream, traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS)
            try:
                await login(client.bootstrap().cast_as(pxfs_capnp.Gateway), secret, nonce=nonce)
            finally:
                client.close()

        with pytest.raises(Unauthorized, match="replayed"):
            await raw(bridge, addr, foreign)

        # A refused proof burns its nonce: the right proof with the same nonce is refused afterwards.
        async def burnt(boot: Any) -> None:
            gw = boot.cast_as(pxfs_capnp.Gateway)
            nonce = bytes((await gw.challenge()).nonce)
            try:
                await gw.login(nonce, auth.new_nonce(), bytes(32), "guess")
            except capnp.KjException as exc:
                assert "wrong cluster secret" in exc.description
            else:
                raise AssertionError("a zero proof logged in")
            await login(gw, secret, nonce=nonce)

        with pytest.raises(Unauthorized, match="replayed"):
            await raw(bridge, addr, burnt)

        # A made-up nonce, and a client nonce of the wrong length.
        async def made_up(boot: Any) -> None:
            await login(boot.cast_as(pxfs_capnp.Gateway), secret, nonce=auth.new_nonce())

        with pytest.raises(Unauthorized, match="replayed"):
            await raw(bridge, addr, made_up)

        async def short_client_nonce(boot: Any) -> None:
            gw = boot.cast_as(pxfs_capnp.Gateway)
            nonce = bytes((await gw.challenge()).nonce)
            await gw.login(nonce, b"", auth.client_proof(secret, nonce, b""), "short")

        with pytest.raises(Unauthorized, match="wrong cluster secret"):
            await raw(bridge, addr, short_client_nonce)

        # Outstanding challenges per connection are bounded.
        async def hoard(boot: Any) -> int:
            gw = boot.cast_as(pxfs_capnp.Gateway)
            for i in range(1000):
                try:
                    await gw.challenge()
                except capnp.KjException as exc:
                    assert "too many outstanding login challenges" in exc.description
                    return i
            return 1000

        assert await raw(bridge, addr, hoard) == 16

        # Two logins on one connection each get their own working session.
        async def twice(boot: Any) -> list[bytes]:
            gw = boot.cast_as(pxfs_capnp.Gateway)
            out = []
            for _ in range(2):
                session, *_ = await login(gw, secret)
                store = (await session.chunks()).chunks.cast_as(pxfs_capnp.ChunkStore)
                out.append(bytes((await store.get(known[0])).data))
            return out

        assert await raw(bridge, addr, twice) == [known[1], known[1]]
    await assert_serving(cluster, known)


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

