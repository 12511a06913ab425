"""EtcdStore against one real etcd member on loopback: the ControlStore contract, CAS on revisions,
leases (liveness drops when keepalives stop), the election, endpoint failover, auth and TLS."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from pxfs.cli import etcd_local
from pxfs.cluster.etcd_store import EtcdSettings, EtcdStore, parse_url, settings_from
from pxfs.errors import Invalid, Unauthorized, Unavailable
from pxfs.model import NodeInfo
from tests.conftest import free_port_block

pytestmark = pytest.mark.skipif(etcd_local.shutil.which("etcd") is None, reason="needs etcd (etcd-server)")


def _start(tmp: Path, *extra: str, scheme: str = "http") -> tuple[subprocess.Popen, int]:
    """One etcd member in ``tmp``; returns (process, client port) once it answers /health."""
    base = free_port_block(2)
    client, peer = f"{scheme}://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"
    argv = [etcd_local.etcd_binary(), "--name", "t1", "--data-dir", str(tmp / "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client, "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer, "--initial-cluster", f"t1={peer}", *extra]
    log = open(tmp / "etcd.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, base


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


async def _healthy(store: EtcdStore, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not all(m["healthy"] for m in await store.members()):
            await trio.sleep(0.1)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, port = _start(tmp_path_factory.mktemp("etcd"))
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)


@pytest.fixture
async def store(etcd: str, request: pytest.FixtureRequest) -> AsyncIterator[EtcdStore]:
    # A prefix per test: they share one etcd and must not see each other's keys.
    s = EtcdStore(EtcdSettings((etcd,), f"/t-{request.node.name}/"))
    await _healthy(s)
    yield s
    await s.aclose()


def test_store_url() -> None:
    assert parse_url("etcd://a:1,b:2") == (("a:1", "b:2"), "/pxfs/")
    assert parse_url("etcd://a:1/c1") == (("a:1",), "/c1/")
    for bad in ("embedded", "etcd://", "etcd://a", "etcd://a:x", "http://a:1"):
        with pytest.raises(Invalid):
            parse_url(bad)
    with pytest.raises(Invalid, match="user and password_file"):
        settings_from("etcd://a:1", {"user": "u"}, Path("/"))
    with pytest.raises(Invalid, match="unknown setting"):
        settings_from("etcd://a:1", {"cafile": "x"}, Path("/"))


async def test_keys_values_and_prefix_ranges(store: EtcdStore) -> None:
    assert await store.get("volumes/a") is None
    await store.put("volumes/a", b"1")
    await store.put("volumes/b", b"\x00\xff binary")
    await store.put("volumesX", b"not in the range")
    await store.put("usage/a", b"u")
    assert await store.get("volumes/b") == b"\x00\xff binary"
    assert await store.range("volumes/") == [("volumes/a", b"1"), ("volumes/b", b"\x00\xff binary")]
    assert await store.delete("volumes/a") is True
    assert await store.delete("volumes/a") is False
    assert await store.range("volumes/") == [("volumes/b", b"\x00\xff binary")]
    await store.put("empty", b"")
    assert await store.get("empty") == b""


async def test_cas(store: EtcdStore, etcd: str, request: pytest.FixtureRequest) -> None:
    assert await store.cas("k", None, b"A") is True
    assert await store.cas("k", None, b"B") is False          # exists
    assert await store.get("k") == b"A"
    assert await store.cas("k", b"X", b"B") is False          # wrong expected value
    assert await store.cas("k", b"A", b"B") is True
    assert await store.get("k") == b"B"
    # Another node's store: it never read "k", so its CAS compares the value.
    other = EtcdStore(EtcdSettings((etcd,), f"/t-{request.node.name}/"))
    try:
        assert await other.cas("k", b"B", b"C") is True
        # This store read B, then the key went B -> C -> B elsewhere: the revision moved, so the CAS
        # that expects the B it read fails (a re-read then succeeds).
        assert await other.cas("k", b"C", b"B") is True
        assert await store.cas("k", b"B", b"D") is False
        assert await store.get("k") == b"B"
        assert await store.cas("k", b"B", b"D") is True
        assert await other.get("k") == b"D"
        assert await store.cas("gone", b"x", b"y") is False     # a missing key never equals a value
        assert await store.cas("empty", b"", b"y") is False
    finally:
        await other.aclose()


async def test_lease_expiry_makes_a_node_down(etcd: str, request: pytest.FixtureRequest) -> None:
    prefix = f"/t-{request.node.name}/"
    node = EtcdStore(EtcdSettings((etcd,), prefix), ttl=2)
    watcher = EtcdStore(EtcdSettings((etcd,), prefix))
    try:
        await node.heartbeat(NodeInfo(id="n1", address="127.0.0.1:1", labels={"zone": "z"}))
        await watcher.heartbeat(NodeInfo(id="n2", address="127.0.0.1:2"))
        states = {n.id: n.state for n in await watcher.liveness()}
        assert states == {"n1": "up", "n2": "up"}
        assert await node.campaign("manager", "n1") is True
        assert await watcher.campaign("manager", "n2") is False
        assert await watcher.holder("manager") == "n1"
        # n1 stops its keepalives (a frozen or killed node): its lease expires within its TTL, its
        # alive key and its election key go with it.
        with trio.fail_after(10):
            while {n.id: n.state for n in await watcher.liveness()}["n1"] != "down":
                await watcher.heartbeat(NodeInfo(id="n2", address="127.0.0.1:2"))
                await trio.sleep(0.2)
        assert await watcher.get("nodes/n1") is not None    # the record stays: only liveness went
        assert await watcher.campaign("manager", "n2") is True
        assert await watcher.holder("manager") == "n2"
        # n1 comes back: a new lease, up again, but the election stays with n2.
        await node.heartbeat(NodeInfo(id="n1", address="127.0.0.1:1"))
        assert {n.id: n.state for n in await watcher.liveness()}["n1"] == "up"
        assert await node.campaign("manager", "n1") is False
        # Resigning frees the election and keeps the node up; only the holder can resign it.
        assert await node.resign("manager", "n1") is False
        assert await watcher.resign("manager", "n2") is True
        assert await node.campaign("manager", "n1") is True
        assert await watcher.campaign("manager", "n2") is False
        assert await node.resign("manager", "n1") is True
        assert {n.id: n.state for n in await watcher.liveness()}["n1"] == "up"
        assert await watcher.campaign("manager", "n2") is True
        # A clean stop revokes the lease: down and the election free at once.
        await watcher.revoke()
        assert {n.id: n.state for n in await node.liveness()}["n2"] == "down"
        assert await node.campaign("manager", "n1") is True
    finally:
        await node.aclose()
        await watcher.aclose()


async def test_watch_sees_changes(store: EtcdStore) -> None:
    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        ready = trio.Event()

        def changed(keys: list[str]) -> None:
            if not keys:
                ready.set()
            seen.extend(keys)

        nursery.start_soon(store.watch, "volumes/", changed)
        with trio.fail_after(10):
            await ready.wait()
            await store.put("volumes/w", b"1")
            await store.put("other/w", b"1")
            await store.delete("volumes/w")
            while len(seen) < 2:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert seen == ["volumes/w", "volumes/w"]


async def test_endpoints_fail_over_and_unavailable_is_bounded(etcd: str, request: pytest.FixtureRequest) -> None:
    dead = f"127.0.0.1:{free_port_block(1)}"
    s = EtcdStore(EtcdSettings((dead, etcd), f"/t-{request.node.name}/"))
    try:
        await s.put("k", b"v")                     # the dead endpoint first: the next one answers
        assert await s.get("k") == b"v"
        health = await s.members()
        assert [m["healthy"] for m in health] == [False, True], health
    finally:
        await s.aclose()
    none = EtcdStore(EtcdSettings((dead,), "/x/"), call_timeout=1.0)
    try:
        start = trio.current_time()
        with pytest.raises(Unavailable, match=f"control store etcd://{dead}: no etcd member answers"):
            await none.get("k")
        assert trio.current_time() - start < 3
    finally:
        await none.aclose()


async def test_user_and_password(tmp_path: Path) -> None:
    proc, port = _start(tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        plain = EtcdStore(EtcdSettings((f"127.0.0.1:{port}",)))
        await _healthy(plain)
        await plain.aclose()
        async with httpx.AsyncClient() as c:
            for path, body in (("/v3/auth/user/add", {"name": "root", "password": "rootpw"}),
                               ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
                               ("/v3/auth/enable", {})):
                r = await c.post(url + path, json=body)
                assert r.status_code == 200, r.text
        (tmp_path / "pw").write_text("rootpw\n")
        good = EtcdStore(settings_from(f"etcd://127.0.0.1:{port}", {"user": "root", "password_file": "pw"},
                                       tmp_path))
        await good.put("k", b"v")
        assert await good.get("k") == b"v"
        good._token = "expired-token"  # noqa: SLF001  (as etcd's 5-minute simple tokens do)
        assert await good.cas("k", b"v", b"w") is True
        await good.aclose()
        (tmp_path / "bad").write_text("nope\n")
        bad = EtcdStore(settings_from(f"etcd://127.0.0.1:{port}", {"user": "root", "password_file": "bad"}, tmp_path))
        with pytest.raises(Unauthorized, match="etcd user 'root'"):
            await bad.get("k")
        await bad.aclose()
        anonymous = EtcdStore(EtcdSettings((f"127.0.0.1:{port}",)))
        with pytest.raises(Unauthorized):
            await anonymous.get("k")
        await anonymous.aclose()
    finally:
        _stop(proc)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


async def test_tls_with_client_certificates(tmp_path: Path) -> None:
    if etcd_local.shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    d = tmp_path
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)
    proc, port = _start(d, "--cert-file", str(d / "server.pem"), "--key-file", str(d / "server.key"),
                        "--trusted-ca-file", str(d / "ca.pem"), "--client-cert-auth", scheme="https")
    try:
        s = EtcdStore(settings_from(f"etcd://127.0.0.1:{port}", {"ca": "ca.pem", "cert": "client.pem",
                                                                "key": "client.key"}, d))
        await _healthy(s)
        await s.put("k", b"tls")
        assert await s.get("k") == b"tls"
        await s.aclose()
        # Without a client certificate the server refuses the handshake: unavailable, named.
        nocert = EtcdStore(settings_from(f"etcd://127.0.0.1:{port}", {"ca": "ca.pem"}, d), call_timeout=1)
        with pytest.raises(Unavailable, match="control store etcd://"):
            await nocert.get("k")
        await nocert.aclose()
    finally:
        _stop(proc)


async def test_cas_whose_answer_was_lost() -> None:
    """A txn applied by etcd whose answer never came back, retried: the retry finds the key holding
    the value this very call wrote, which is success, not a conflict. (A real etcd cannot be made to
    drop just that answer: an httpx mock transport plays it.)"""
    state: dict[str, str] = {}
    calls: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append(request.url.host)
        key = body["compare"][0]["key"]
        if key not in state and body["compare"][0]["target"] == "CREATE":
            state[key] = body["success"][0]["request_put"]["value"]
            if len(calls) == 1:
                raise httpx.ReadTimeout("answer lost", request=request)
            return httpx.Response(200, json={"succeeded": True, "header": {"revision": "5"}})
        kv = {"key": key, "value": state[key], "mod_revision": "5"}
        return httpx.Response(200, json={"responses": [{"response_range": {"kvs": [kv]}}]})

    s = EtcdStore(EtcdSettings(("a:1", "b:1")), transport=httpx.MockTransport(handle))
    try:
        assert await s.cas("k", None, b"mine") is True
        assert calls == ["a", "b"]
        # Without a lost answer the same reply is another writer's: a conflict.
        assert await s.cas("k", None, b"mine") is False
    finally:
        await s.aclose()
