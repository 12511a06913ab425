"""Manifest-style fault tests: a writer process records only what fsync acknowledged; verifiers re-check it.

A fault test runs ``ManifestWriter`` against a mounted volume, injects a fault (SIGKILL a node, fill a
pool, ...), stops the writer, then checks every manifest entry twice:

* ``verify_through_mount`` reads each file back through FUSE (what an application would see);
* ``verify_on_replicas`` fetches each file's block map from the coordinator and every chunk from
  EACH replica node directly, so a replica that silently lost or damaged an acknowledged write is
  caught even while the mount reads around it from a good copy.

The writer is a separate process on purpose: it must keep running (and may hang in a FUSE call)
while the test injects the fault, and its view must be the application's view: plain syscalls,
nothing shared with the test's memory. Run it by hand with::

    python -m tests.system.manifest write DIR MANIFEST [--seed N] [--max-size BYTES]
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TextIO

import blake3
import trio

from pxfs.cluster.config import load_config, load_credential
from pxfs.cluster.peers import Peers
from pxfs.errors import NotFound, PxfsError, Unauthorized, Unavailable
from pxfs.meta import slices
from pxfs.meta.slices import BlockMap
from pxfs.model import VolumeInfo
from pxfs.rpc.bridge import Bridge, open_bridge
from pxfs.rpc.client import ChunkClient, Connection
from pxfs.rpc.volume_client import VolumeClient

if TYPE_CHECKING:
    from tests.conftest import Cluster

MiB = 1 << 20
DEFAULT_MAX_SIZE = 3 * MiB
# The repo root, so ``python -m tests.system.manifest`` imports this very checkout.
REPO_ROOT = Path(__file__).resolve().parents[2]
# Sizes where block and page arithmetic goes wrong (empty, one byte, around the default 1 MiB block
# and a 4 KiB page): drawn now and then so a short run still covers them.
EDGE_SIZES = (0, 1, 4095, 4096, 4097, MiB - 1, MiB, MiB + 1, 2 * MiB, 3 * MiB - 1)
POLL_INTERVAL = 0.05
# After a failed file, wait this long before the next one: while a fault lasts every attempt fails,
# and without a pause the errors file would grow by thousands of lines a second.
ERROR_BACKOFF = 0.1
GET_TIMEOUT = 10.0
CLEANUP_TIMEOUT = 5.0


# ------------------------------------------------------------------------------------------------
# The manifest: one line per acknowledged file


@dataclass(frozen=True)
class Entry:
    """One acknowledged file: ``name`` relative to the writer's directory, its size and sha256.

    ``started``/``acked`` are ``time.monotonic()`` readings of the writer process (CLOCK_MONOTONIC is
    system-wide on Linux, so they compare with the test's own clock): when the writer began the file
    and when its fsync and close returned.
    """

    name: str
    size: int
    sha256: str
    started: float
    acked: float

    def line(self) -> str:
        return f"{self.name} {self.size} {self.sha256} {self.started:.6f} {self.acked:.6f}\n"

    @classmethod
    def parse(cls, line: str) -> Entry:
        name, size, sha, started, acked = line.split()
        return cls(name, int(size), sha, float(started), float(acked))


def read_entries(manifest: Path) -> list[Entry]:
    """The complete lines of a manifest; a last line still being appended (no newline yet) is skipped."""
    try:
        text = manifest.read_text()
    except FileNotFoundError:
        return []
    return [Entry.parse(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def max_stall(entries: list[Entry]) -> float:
    """Longest time the application saw no progress: the first file's own latency, then ack-to-ack gaps."""
    if not entries:
        return 0.0
    gaps = [entries[0].acked - entries[0].started]
    gaps += [b.acked - a.acked for a, b in zip(entries, entries[1:], strict=False)]
    return max(gaps)


# ------------------------------------------------------------------------------------------------
# The writer process


def _fsync_append(fh: TextIO, text: str) -> None:
    # On disk before the next file starts: even if the writer is SIGKILLed, the manifest lists every
    # file that was acknowledged.
    fh.write(text)
    fh.flush()
    os.fsync(fh.fileno())


def _draw_size(rng: random.Random, max_size: int) -> int:
    if rng.random() < 0.25:
        return min(rng.choice(EDGE_SIZES), max_size)
    return rng.randint(0, max_size)


def _write_one(path: Path, data: bytes, hole: tuple[int, int] | None) -> None:
    """Create ``path`` holding ``data``, fsync and close it; every failure surfaces as OSError.

    With ``hole`` the zero run ``data[start:end]`` is skipped by seeking, so the file has real holes
    (blocks absent from the block map) that the replica verifier must read as zeros.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if hole is None:
            _write_all(fd, data)
        else:
            start, end = hole
            _write_all(fd, data[:start])
            os.lseek(fd, end, os.SEEK_SET)
            _write_all(fd, data[end:])
            os.ftruncate(fd, len(data))  # a file that ends in the hole still gets its full size
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _make_data(rng: random.Random, size: int) -> tuple[bytes, tuple[int, int] | None]:
    """Seeded content of ``size`` bytes; some files of 1 MiB+ get a zero run to be left as a hole.

    The zero run always covers one whole 1 MiB-aligned block (the default block size) and spills
    randomly into its neighbours, so the file has a block missing from its block map, not merely a
    stored block of zeros.
    """
    if size >= MiB and rng.random() < 0.3:
        k = rng.randrange(size // MiB)
        start = k * MiB - rng.randint(0, min(k * MiB, MiB // 2))
        end = min(size, (k + 1) * MiB + rng.randint(0, MiB // 2))
        return rng.randbytes(start) + bytes(end - start) + rng.randbytes(size - end), (start, end)
    return rng.randbytes(size), None


def run_writer(directory: Path, manifest: Path, errors: Path, seed: int, max_size: int) -> int:
    """The writer loop (runs in the child process) until SIGTERM; returns the exit status."""
    stopping = False

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        # Only a flag: the file in flight is finished (and acknowledged or failed) before exiting,
        # so a stop never leaves a half-recorded entry. Syscalls resume after the handler (PEP 475).
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    with open(manifest, "a") as man, open(errors, "a") as err:
        seq = 0
        while not stopping:
            seq += 1
            # A fresh name per attempt: a failed attempt may leave a partial file behind, and it
            # must never be confused with an acknowledged one.
            name = f"f{seq:06d}"
            size = _draw_size(rng, max_size)
            data, hole = _make_data(rng, size)
            started = time.monotonic()
            try:
                _write_one(directory / name, data, hole)
            except OSError as exc:
                code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                _fsync_append(err, f"{name} {code} {time.monotonic() - started:.3f}s {exc.strerror}\n")
                time.sleep(ERROR_BACKOFF)
                continue
            entry = Entry(name, size, hashlib.sha256(data).hexdigest(), started, time.monotonic())
            _fsync_append(man, entry.line())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.system.manifest")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write fsynced files into DIR, record acknowledged ones in MANIFEST")
    w.add_argument("dir", type=Path)
    w.add_argument("manifest", type=Path)
    w.add_argument("--errors", type=Path, help="where OSErrors go (default MANIFEST.errors)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE)
    args = p.parse_args(argv)
    errors = args.errors or args.manifest.with_name(args.manifest.name + ".errors")
    return run_writer(args.dir, args.manifest, errors, args.seed, args.max_size)


class ManifestWriter:
    """Drive the writer process from a test: ``start``, ``wait_for``, ``stop``, then read its records.

    ``directory`` is where files go (inside the mount); ``state_dir`` must be OUTSIDE the mount: it
    holds the manifest, the errors file and the writer's stderr, which have to survive the fault.
    """

    def __init__(self, directory: Path, state_dir: Path, seed: int = 0, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.directory, self.seed, self.max_size = directory, seed, max_size
        state_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = state_dir / "manifest"
        self.errors_path = state_dir / "manifest.errors"
        self.stderr_path = state_dir / "writer.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None, "writer already started"
        cmd = [sys.executable, "-m", "tests.system.manifest", "write", str(self.directory), str(self.manifest),
               "--errors", str(self.errors_path), "--seed", str(self.seed), "--max-size", str(self.max_size)]
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)

    def _stderr(self) -> str:
        try:
            return self.stderr_path.read_text()[-4000:]
        except FileNotFoundError:
            return ""

    def wait_for(self, n_files: int, timeout: float = 60.0) -> list[Entry]:
        """Return once the manifest holds ``n_files`` entries; fail if the writer died or ``timeout`` passes."""
        assert self.proc is not None, "writer not started"
        deadline = time.monotonic() + timeout
        while True:
            entries = self.entries()
            if len(entries) >= n_files:
                return entries
            if self.proc.poll() is not None:
                raise AssertionError(f"writer exited rc={self.proc.returncode} after {len(entries)} files:\n"
                                     f"{self._stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"writer acknowledged {len(entries)} of {n_files} files in {timeout}s; "
                                     f"errors: {self.errors()[-5:]}")
            time.sleep(POLL_INTERVAL)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, then wait for the writer to finish its current file and exit 0.

        A writer that does not exit in time (stuck in a hung FUSE call) is SIGKILLed and reported.
        """
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise AssertionError(f"writer did not stop within {timeout}s of SIGTERM (killed)") from None
        if rc != 0:
            raise AssertionError(f"writer exited rc={rc}:\n{self._stderr()}")

    def kill(self) -> None:
        """For cleanup after a failed test: make sure no writer survives it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def entries(self) -> list[Entry]:
        return read_entries(self.manifest)

    def errors(self) -> list[str]:
        """One line per OSError the writer saw: ``name ERRNO-NAME seconds strerror``."""
        try:
            return self.errors_path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def max_stall(self) -> float:
        return max_stall(self.entries())


# ------------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class Problem:
    """One failed check: ``node`` is the replica whose copy is bad, None for a read through the mount."""

    file: str
    node: str | None
    what: str

    def __str__(self) -> str:
        return f"{self.file} [{self.node or 'mount'}]: {self.what}"


def verify_through_mount(directory: Path, entries: list[Entry]) -> list[Problem]:
    """Read every entry through the mount; compare size and sha256 with the manifest."""
    problems = []
    for e in entries:
        try:
            h = hashlib.sha256()
            n = 0
            with open(directory / e.name, "rb", buffering=0) as fh:
                while chunk := fh.read(MiB):
                    h.update(chunk)
                    n += len(chunk)
        except OSError as exc:
            problems.append(Problem(e.name, None, f"read failed: {exc}"))
            continue
        if n != e.size:
            problems.append(Problem(e.name, None, f"size {n}, manifest says {e.size}"))
        elif h.hexdigest() != e.sha256:
            problems.append(Problem(e.name, None, "content differs from the manifest (sha256)"))
    return problems


@dataclass
class VerifySession:
    """A read-only metadata session at a volume's coordinator plus direct connections to its replicas."""

    info: VolumeInfo
    meta: VolumeClient
    peers: Peers
    stack: AsyncExitStack

    async def block_map(self, ino: int) -> tuple[int, BlockMap]:
        """The file's size and {block index: slices}, as the coordinator holds them now."""
        attr, blocks = await self.meta.open(ino)
        try:
            return attr.size, blocks
        finally:
            await self.meta.release(ino)

    async def chunks(self, node: str) -> ChunkClient:
        """``node``'s own chunk store over a direct connection (no fallback to another replica).

        The client is dropped when the session ends; capnp objects must die on the bridge's thread.
        """
        client = await self.peers.chunks(node)
        self.stack.push_async_callback(_shielded(client.drop))
        return client


async def _admin_lookup(bridge: Bridge, cluster: Cluster, volume: str) -> tuple[VolumeInfo, dict[str, str]]:
    """The volume's spec and node id -> address, from the first node that answers (as mountd does)."""
    credential = load_credential(cluster.dir)
    failures = []
    for address in load_config(cluster.dir).addresses():
        try:
            conn = await Connection.open(bridge, address, credential, peer=f"verify@{socket.gethostname()}", timeout=3)
        except Unauthorized:
            raise
        except PxfsError as err:
            failures.append(str(err))
            continue
        try:
            admin = await conn.admin()
            try:
                info = await admin.get_volume(volume)
                addresses = {n.id: n.address for n in await admin.list_nodes()}
            finally:
                await admin.drop()
            return info, addresses
        finally:
            await conn.close()
    raise Unavailable(f"cluster {cluster.dir}", "no node answers (" + "; ".join(failures) + ")")


def _shielded(fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """A cleanup that runs even when the session is left by cancellation (a test's ``fail_after``):
    a capnp object not released here would be freed later on the trio thread and abort the process."""

    async def run() -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            await fn()

    return run


@asynccontextmanager
async def verify_session(cluster: Cluster, volume: str) -> AsyncIterator[VerifySession]:
    """Open ``volume`` read-only at its coordinator like a mount does; close every capnp object after."""
    async with open_bridge() as bridge, AsyncExitStack() as stack:
        # The exit stack unwinds before the bridge closes: drop() and close() need its thread.
        info, addresses = await _admin_lookup(bridge, cluster, volume)

        async def resolve(node_id: str) -> str:
            if node_id not in addresses:
                raise NotFound(f"node {node_id}", "not in the cluster map")
            return addresses[node_id]

        mount_id = f"verify-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        peers = Peers(bridge, load_credential(cluster.dir), f"mount:{mount_id}", resolve)
        stack.push_async_callback(_shielded(peers.close))
        service = await peers.volumes(info.coordinator)
        stack.push_async_callback(_shielded(service.drop))
        meta, info = await service.open(volume, mount_id, read_only=True)
        stack.push_async_callback(_shielded(meta.drop))
        yield VerifySession(info, meta, peers, stack)


def _assemble(size: int, block_size: int, blocks: BlockMap, chunks: dict[bytes, bytes]) -> bytes:
    buf = bytearray(size)  # holes (blocks not in the map) read as zeros
    for idx, block in blocks.items():
        lo = idx * block_size
        hi = min(block_size, max(0, size - lo))
        if hi:
            buf[lo:lo + hi] = slices.assemble(block, 0, hi, chunks.__getitem__)
    return bytes(buf)


async def verify_on_replicas(cluster: Cluster, volume: str, directory: Path, entries: list[Entry]) -> list[Problem]:
    """Check every entry on EVERY replica node's own chunks, not just on whichever copy a read finds.

    Inode numbers come from ``os.stat`` through the mount at ``directory``; block maps from the
    coordinator; chunks from each replica over a direct connection (the node verifies BLAKE3 and
    refuses corrupt bytes; the bytes are re-checked here because the wire is not trusted either).
    """
    problems: list[Problem] = []
    inos: dict[str, int] = {}
    for e in entries:
        try:
            inos[e.name] = (await trio.to_thread.run_sync(os.stat, directory / e.name)).st_ino
        except OSError as exc:
            problems.append(Problem(e.name, None, f"stat through the mount failed: {exc}"))
    async with verify_session(cluster, volume) as s:
        bs = s.info.block_size
        clients: dict[str, ChunkClient | PxfsError] = {}
        for node in s.info.replicas:
            try:
                clients[node] = await s.chunks(node)
            except PxfsError as err:  # a replica that is down holds none of the data: report, go on
                clients[node] = err
        for e in entries:
            if e.name not in inos:
                continue
            try:
                size, blocks = await s.block_map(inos[e.name])
            except PxfsError as err:
                problems.append(Problem(e.name, None, f"block map from coordinator {s.info.coordinator}: {err}"))
                continue
            if size != e.size:
                problems.append(Problem(e.name, None, f"coordinator says size {size}, manifest says {e.size}"))
                continue
            for idx, block in sorted(blocks.items()):
                length = slices.extent(block)
                if idx * bs >= size or length > bs:
                    problems.append(Problem(e.name, None, f"block {idx} (length {length}) does not fit size {size} "
                                                          f"with block size {bs}"))
            for node, client in clients.items():
                if isinstance(client, PxfsError):
                    problems.append(Problem(e.name, node, f"replica unreachable: {client}"))
                else:
                    problems += await _check_replica(e, node, client, size, bs, blocks)
    return problems


async def _check_replica(e: Entry, node: str, client: ChunkClient, size: int, bs: int,
                         blocks: BlockMap) -> list[Problem]:
    problems = []
    got: dict[bytes, bytes] = {}
    for idx, h, length in sorted((i, h, n) for i, b in blocks.items() for h, _off, n in b):
        if h in got:
            continue
        what = f"block {idx} chunk {h.hex()[:16]}"
        try:
            # Bounded: a stopped (SIGSTOPped, partitioned) replica must fail the check, not hang it.
            with trio.fail_after(GET_TIMEOUT):
                data = await client.get(h)
        except trio.TooSlowError:
            problems.append(Problem(e.name, node, f"{what}: no answer within {GET_TIMEOUT:g}s"))
            continue
        except PxfsError as err:
            problems.append(Problem(e.name, node, f"{what}: {type(err).__name__}: {err}"))
            continue
        if blake3.blake3(data).digest() != h:
            problems.append(Problem(e.name, node, f"{what}: bytes received do not match the hash"))
        elif len(data) < length:
            problems.append(Problem(e.name, node, f"{what}: {len(data)} bytes, block map says {length}"))
        else:
            got[h] = data
    if problems:
        return problems
    if hashlib.sha256(_assemble(size, bs, blocks, got)).hexdigest() != e.sha256:
        problems.append(Problem(e.name, node, "file assembled from this replica's chunks differs from the manifest"))
    return problems


if __name__ == "__main__":
    sys.exit(main())
