"""Hostile peers against real nodes over mutual TLS (issue 12): roles, foreign and stale credentials,
revocation, plaintext on the TLS port, floods before the handshake.

Every refusal must be a typed ``Unauthorized`` naming the caller, and the node must keep serving
everyone else: each test ends with ``assert_serving`` (fresh connections to every node, all alive,
the cluster healthy).
"""

from __future__ import annotations

import datetime
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import blake3
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pxfs.cluster.config import load_config
from pxfs.errors import PxfsError, Unauthorized, Unavailable
from pxfs.model import VolumeInfo
from pxfs.rpc import pki, tls
from pxfs.rpc.bridge import open_bridge
from pxfs.rpc.client import Connection, split_address
from pxfs.rpc.volume_client import VolumeServiceClient
from tests.cluster.test_hostile import LogWatch, assert_serving, create_volume, node_index
from tests.conftest import PXFS, Cluster, node_connection, pxfs_env

MiB = 1 << 20


def address(cluster: Cluster, index: int = 0) -> str:
    return load_config(cluster.dir).addresses()[index]


def chunk(n: int = 4096, seed: int = 0) -> tuple[bytes, bytes]:
    data = (b"%d-" % seed) * (n // 2)
    data = data[:n]
    return blake3.blake3(data).digest(), data


async def refused(call: Any, *words: str) -> Unauthorized:
    with trio.fail_after(10):
        with pytest.raises(Unauthorized) as info:
            await call
    for w in words:
        assert w in str(info.value), str(info.value)
    return info.value


@pytest.fixture(scope="module")
def vols(shared_cluster: Cluster) -> dict[str, VolumeInfo]:
    async def go() -> dict[str, VolumeInfo]:
        return {n: await create_volume(shared_cluster, n, repl=2) for n in ("sec-a", "sec-b")}

    return trio.run(go)


def issue(cluster: Cluster, tmp_path: Path, name: str, role: str, *volumes: str) -> pki.Credential:
    out = tmp_path / f"cred-{name}"
    pki.issue(cluster.dir, out, name, role, list(volumes))
    return pki.load(out)


async def test_mount_credential_gets_only_what_a_mount_needs(shared_cluster: Cluster, vols: dict[str, VolumeInfo],
                                                            tmp_path: Path) -> None:
    cluster = shared_cluster
    a = vols["sec-a"]
    mount = issue(cluster, tmp_path, "host-a", "mount", "sec-a")
    watch = LogWatch(cluster)
    async with node_connection(cluster, node_index(a.coordinator), credential=mount) as conn:
        admin = await conn.admin()
        assert (await admin.get_volume("sec-a")).name == "sec-a"
        assert [v.name for v in await admin.list_volumes()] == ["sec-a"]  # sec-b is not even listed
        assert len(await admin.list_nodes()) == cluster.nodes
        await refused(admin.get_volume("sec-b"), "host-a", "sec-b")
        for call in (admin.create_volume("evil", 64 * MiB, 1, 4096, {}), admin.delete_volume("sec-a", True),
                     admin.resize_volume("sec-a", 2 * a.size), admin.ha_update("sec-a", 1),
                     admin.remove_node("n1", True), admin.repair_volume("sec-a"), admin.recover(),
                     admin.store_check(), admin.revoke_credential(mount.identity.serial, "x"),
                     admin.promote_volume("sec-a", "n1"), admin.clone_volume("sec-a@x", "evil2")):
            await refused(call, "needs role admin")
        await refused(conn.control(), "control store", "needs role admin or node")
        chunks = await conn.chunks()
        h, data = chunk(seed=1)
        assert await chunks.put(h, data) in (True, False)  # this node holds sec-a
        assert await chunks.get(h) == data
        await refused(chunks.collect(False, 3600.0), "garbage collection")
        await refused(chunks.list_hashes(b"", 10), "list chunks")
        await refused(chunks.verify([h]), "verify chunks")
        vs = VolumeServiceClient(conn.bridge, conn.peer, await conn.volumes_cap())
        try:
            await refused(vs.open("sec-b", "m-evil", False), "sec-b")
            await refused(vs.open("sec-b@snap", "m-evil", True), "sec-b")
            await refused(vs.last_seq("sec-a"), "replication")
            await refused(vs.apply("sec-a", a.epoch, 1, b""), "replication")
            await refused(vs.apply_many("sec-a", a.epoch, 1, [b""]), "replication")
            await refused(vs.reset("sec-a", a.epoch), "replication")
            await refused(vs.local_replicas(), "local replicas")
            vol, _info = await vs.open("sec-a", "m-good", False)
            try:
                attr = await vol.mknod(1, b"mine", stat.S_IFREG | 0o644, 0, 0, 0)
                assert attr.ino > 1
                await refused(vol.snapshot_create("s1"), "snapshot create")
                await refused(vol.restore("s1"), "volume restore")
                await refused(vol.fsck(True), "fsck --repair")
                assert (await vol.fsck(False))["problems"] == []
            finally:
                await vol.drop()
        finally:
            await vs.drop()
    # A node that holds no replica of the mount's volumes takes no chunk from it.
    outside = next(i for i in range(cluster.nodes) if f"n{i + 1}" not in a.replicas)
    async with node_connection(cluster, outside, credential=mount) as conn:
        h, data = chunk(seed=2)
        await refused((await conn.chunks()).put(h, data), "holds no replica")
    # Refusals are answers to the caller, not trouble for the node.
    assert not [ln for ln in watch.new_lines() if "Traceback" in ln or "ERROR" in ln]
    await assert_serving(cluster)


async def test_node_credential_speaks_only_for_itself(shared_cluster: Cluster, vols: dict[str, VolumeInfo],
                                                     tmp_path: Path) -> None:
    """A node's certificate is its identity: a node (or a mount named like one) cannot replicate as
    another node, heartbeat for another node, or act as admin."""
    cluster = shared_cluster
    a = vols["sec-a"]
    follower = next(r for r in a.replicas if r != a.coordinator)
    other = next(f"n{i + 1}" for i in range(cluster.nodes) if f"n{i + 1}" != a.coordinator)
    # A mount credential whose name is the coordinator's id is still a mount.
    fake = issue(cluster, tmp_path, a.coordinator, "mount")
    async with node_connection(cluster, node_index(follower), credential=fake) as conn:
        vs = VolumeServiceClient(conn.bridge, conn.peer, await conn.volumes_cap())
        try:
            await refused(vs.apply("sec-a", a.epoch, 10**6, b""), "replication", "mount")
        finally:
            await vs.drop()
    node = pki.load(cluster.dir / "nodes" / other / "state" / "credential")
    async with node_connection(cluster, 0, credential=node) as conn:
        await refused((await conn.admin()).delete_volume("sec-b", True), "needs role admin")
        control = await conn.control()
        from pxfs.model import NodeInfo

        await refused(control.heartbeat(NodeInfo(id="n-evil", address="127.0.0.1:1")), "speaks for itself")
    await assert_serving(cluster)


def _forged_credentials(cluster: Cluster, tmp_path: Path) -> dict[str, Path]:
    """Credentials a node must refuse: another CA's admin, a self-signed admin, an expired admin, one
    not valid yet, and an admin certificate whose key is not the one it certifies."""
    out: dict[str, Path] = {}
    other = tmp_path / "other-ca"
    other.mkdir()
    pki.make_ca(other, "other")
    pki.issue(other, other / "admin", "admin", "admin")
    out["another CA"] = other / "admin"

    ca_key = serialization.load_pem_private_key((cluster.dir / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((cluster.dir / "ca.pem").read_bytes())
    now = datetime.datetime.now(datetime.UTC)

    def write(label: str, signer: Any, issuer: x509.Name, before: datetime.datetime, after: datetime.datetime,
              key: Any = None, cert_key: Any = None) -> None:
        key = key or ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin"),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin")])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key((cert_key or key).public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(before).not_valid_after(after).sign(signer, hashes.SHA256()))
        d = tmp_path / label.replace(" ", "-")
        d.mkdir()
        (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        (d / "ca.pem").write_bytes((cluster.dir / "ca.pem").read_bytes())
        out[label] = d

    self_key = ec.generate_private_key(ec.SECP256R1())
    write("self-signed", self_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin"),
                                               x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin")]),
          now - datetime.timedelta(days=1), now + datetime.timedelta(days=1), key=self_key)
    write("expired", ca_key, ca.subject, now - datetime.timedelta(days=10), now - datetime.timedelta(days=1))
    write("not yet valid", ca_key, ca.subject, now + datetime.timedelta(days=1), now + datetime.timedelta(days=10))
    return out


async def test_forged_foreign_and_stale_credentials_are_refused(shared_cluster: Cluster, tmp_path: Path) -> None:
    cluster = shared_cluster
    forged = _forged_credentials(cluster, tmp_path)
    async with open_bridge() as bridge:
        for label, path in forged.items():
            cert = x509.load_pem_x509_certificate((path / "cert.pem").read_bytes())
            cred = pki.Credential(path=path, identity=pki.identity_of(cert.public_bytes(serialization.Encoding.DER)))
            for i in range(cluster.nodes):
                with trio.fail_after(15):
                    with pytest.raises((Unauthorized, Unavailable)) as info:
                        conn = await Connection.open(bridge, address(cluster, i), cred, peer="forged")
                        await conn.close()
                assert "TLS" in str(info.value) or "refused" in str(info.value), (label, str(info.value))
    # The CLI says so in one line, exit 1.
    for label, path in forged.items():
        proc = subprocess.run([*PXFS, "volume", "list", "--credential", str(path)], capture_output=True, text=True,
                              env=pxfs_env(PXFS_CLUSTER=str(cluster.dir)), timeout=60)
        assert proc.returncode == 1 and proc.stdout == "", (label, proc)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, (label, proc.stderr)
    await assert_serving(cluster)


CLIENT_CRASH = """
import sys, trio
from pathlib import Path
from pxfs.errors import PxfsError
from pxfs.rpc import pki
from pxfs.rpc.bridge import open_bridge
from pxfs.rpc.client import Connection

async def main():
    cred = pki.load(Path(sys.argv[2]))
    async with open_bridge() as bridge:
        for _ in range(30):
            try:
                await Connection.open(bridge, sys.argv[1], cred, peer="t")
            except PxfsError:
                pass
    print("survived")

trio.run(main)
"""


async def test_refused_connections_do_not_crash_the_client(shared_cluster: Cluster, tmp_path: Path) -> None:
    """The CLI's and RemoteStore's retry loops meet refusals over and over: the client process must live."""
    forged = _forged_credentials(shared_cluster, tmp_path)
    proc = await trio.run_process([sys.executable, "-c", CLIENT_CRASH, address(shared_cluster),
                                   str(forged["another CA"])], capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0 and b"survived" in proc.stdout, proc.stderr.decode()[-800:]
    await assert_serving(shared_cluster)


async def test_a_node_must_prove_it_is_a_node(shared_cluster: Cluster, tmp_path: Path) -> None:
    """A holder of a mount (or admin) credential of this cluster cannot pose as a node to a client."""
    mount = issue(shared_cluster, tmp_path, "poser", "mount")
    admin = pki.load(shared_cluster.dir / "admin")

    async def on_connection(stream: Any, who: pki.Identity, remote: str) -> None:
        stream.close()

    async with open_bridge() as bridge:
        async def start() -> Any:
            return await tls.serve(tls.Gate(mount.server_context(), on_connection), "127.0.0.1", 0)

        server = await bridge.run(start)
        try:
            port = server.sockets[0].getsockname()[1]
            with trio.fail_after(15):
                await refused(Connection.open(bridge, f"127.0.0.1:{port}", admin, peer="victim"), "not of a node")
        finally:
            async def stop() -> None:
                server.close()

            await bridge.run(stop)


async def test_revoked_credential_is_refused_within_seconds(shared_cluster: Cluster, vols: dict[str, VolumeInfo],
                                                           tmp_path: Path) -> None:
    cluster = shared_cluster
    cred = issue(cluster, tmp_path, "soon-gone", "mount", "sec-a")
    async with node_connection(cluster, 0, credential=cred) as conn:
        admin = await conn.admin()
        assert (await admin.get_volume("sec-a")).name == "sec-a"
        proc = await trio.to_thread.run_sync(lambda: cluster.cli("credential", "revoke", str(cred.path), "--json"))
        assert '"revoked": true' in proc.stdout
        # The connection open under it is closed on every node within a revocation round or two.
        with trio.fail_after(10):
            while True:
                try:
                    await admin.get_volume("sec-a")
                except PxfsError:
                    break
                await trio.sleep(0.2)
    # Every node applies it at its own next round (every 2 s): each refuses within seconds.
    for i in range(cluster.nodes):
        with trio.fail_after(10):
            while True:
                try:
                    await _open_once(address(cluster, i), cred)
                except Unauthorized as err:
                    assert "revoked" in str(err), str(err)
                    break
                await trio.sleep(0.2)
    listed = cluster.json("credential", "revoked")
    assert f"{cred.identity.serial:x}" in {r["serial"] for r in listed}
    await assert_serving(cluster)


async def _open_once(addr: str, cred: pki.Credential) -> None:
    async with open_bridge() as bridge:
        conn = await Connection.open(bridge, addr, cred, peer="revoked")
        await conn.close()


def _plaintext_probe(port: int, payload: bytes) -> bytes:
    """What a plaintext peer gets back from the TLS port: all bytes until the node hangs up."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(payload)
            while chunk_ := s.recv(65536):
                got += chunk_
        except (ConnectionResetError, BrokenPipeError):
            pass
    return got


async def test_plaintext_on_the_tls_port_gets_nothing(shared_cluster: Cluster) -> None:
    _host, port = split_address(address(shared_cluster))
    # A capnp bootstrap request in the clear, and a half-sent frame: closed, and nothing served.
    bootstrap = (0).to_bytes(4, "little") + (4).to_bytes(4, "little") + bytes(32)
    for payload in (bootstrap, b"\x00\x00\x00\x00\x10\x00\x00\x00", b"GET / HTTP/1.0\r\n\r\n"):
        got = await trio.to_thread.run_sync(_plaintext_probe, port, payload)
        assert b"Gateway" not in got and len(got) < 64, got[:80]  # at most a TLS alert
    await assert_serving(shared_cluster)


async def test_connection_flood_before_tls_while_a_client_keeps_writing(shared_cluster: Cluster,
                                                                       vols: dict[str, VolumeInfo]) -> None:
    """~1100 idle TCP connections (more than a default fd limit) from one address: the node refuses
    past its per-address cap without a handshake, and a real client's chunk puts (from another
    address, old and new connections) all succeed."""
    cluster = shared_cluster
    a = vols["sec-a"]
    target = node_index(a.replicas[0])
    _host, port = split_address(address(cluster, target))
    watch = LogWatch(cluster)
    socks: list[socket.socket] = []
    written = 0
    async with node_connection(cluster, target) as conn:
        chunks = await conn.chunks()
        try:
            for i in range(1100):
                try:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.bind(("127.0.0.2", 0))  # the flood's own address: the cap is per address
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", port))
                    socks.append(s)
                except OSError:
                    break
                if i % 100 == 0:
                    h, data = chunk(65536, seed=1000 + i)
                    assert await chunks.put(h, data) in (True, False)
                    written += 1
            # The node is still answering new, legitimate connections and old ones.
            for i in range(5):
                h, data = chunk(65536, seed=5000 + i)
                async with node_connection(cluster, target) as fresh:
                    assert await (await fresh.chunks()).put(h, data) in (True, False)
                assert await chunks.get(h) == data
                written += 1
        finally:
            for s in socks:
                s.close()
    assert written == 16 and len(socks) >= 1000
    # Refusals are logged once per address per 10 s, not once per connection.
    refusals = [ln for ln in watch.new_lines() if "refused" in ln]
    assert 1 <= len(refusals) <= 3, refusals
    await assert_serving(cluster)


async def test_handshake_that_never_finishes_is_dropped(shared_cluster: Cluster) -> None:
    _host, port = split_address(address(shared_cluster))

    def half_hello() -> float:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
            started = time.monotonic()
            while s.recv(1024):
                pass
            return time.monotonic() - started

    took = await trio.to_thread.run_sync(half_hello)
    assert took < tls.HANDSHAKE_TIMEOUT + 5, took
    await assert_serving(shared_cluster)


def test_files_at_rest_are_private(shared_cluster: Cluster, vols: dict[str, VolumeInfo]) -> None:
    """Another local user of a storage node reads neither chunks, nor metadata, nor keys."""
    cluster = shared_cluster
    assert stat.S_IMODE(os.stat(cluster.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cluster.dir / "ca.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cluster.dir / "admin" / "key.pem").st_mode) == 0o600
    for node in sorted((cluster.dir / "nodes").iterdir()):
        state = node / "state"
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700, state
        assert stat.S_IMODE(os.stat(state / "credential" / "key.pem").st_mode) == 0o600
        pool = node / "pool"
        if pool.exists():
            assert stat.S_IMODE(os.stat(pool).st_mode) == 0o700, pool
            files = [p for p in pool.rglob("*") if p.is_file() and "chunks" in p.parts][:20]
            for f in files:
                assert stat.S_IMODE(os.stat(f).st_mode) & 0o077 == 0, f
    # As a real unprivileged user: nothing under the cluster directory is readable.
    proc = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                           "find", str(cluster.dir), "-type", "f", "-readable"], capture_output=True, text=True)
    assert proc.stdout.strip() == "", proc.stdout[:500]


async def test_calls_in_flight_per_connection_are_bounded(shared_cluster: Cluster) -> None:
    """A peer firing a thousand calls at once on one connection gets the excess refused at once, typed,
    and the connection and the node keep serving."""
    refused_calls: list[str] = []
    answered = 0
    async with node_connection(shared_cluster, 0) as conn:
        chunks = await conn.chunks()
        h, data = chunk(MiB, seed=77)
        await chunks.put(h, data)

        async def one() -> None:
            nonlocal answered
            try:
                await chunks.verify([h] * 8)  # ~8 MiB re-hashed: each call stays a while
                answered += 1
            except Unavailable as err:
                refused_calls.append(str(err))

        async with trio.open_nursery() as nursery:
            for _ in range(600):
                nursery.start_soon(one)
        assert refused_calls and answered >= 256, (answered, len(refused_calls))
        assert all("calls in flight" in r for r in refused_calls), refused_calls[:3]
        assert await chunks.get(h) == data  # the same connection still serves
    await assert_serving(shared_cluster)
