"""No Meta call holds a node's event loop for a step that grows with the volume (issue 13), measured
through real `pxfs node` processes: every call the coordinator runs counts the keys it reads and
writes (``KV.touched``) and warns past ``STEP_KEYS``; the workload makes a volume of some 85000 keys
(two 40000-block files, small files) and does what used to be one unbounded step: open, truncate and
unlink of the big files, a snapshot and a restore, fsck and its repair, locate and chunk references,
a clone. No warning may come. The nodes' loop watch (``pxfs.loopwatch``) reports the longest steps in wall
and CPU time; they are printed, not asserted: a loaded machine stretches any step."""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import trio

from pxfs.volume.coordinator import STEP_KEYS
from tests.cluster.test_hostile import BLOCK, create_volume, opened, put_everywhere
from tests.conftest import node_connection
from tests.system.faults import FaultCluster, fault_cluster

REG = stat.S_IFREG | 0o644
DATA = [b"loop chunk %d" % i for i in range(5)]
HASHES = [blake3.blake3(d).digest() for d in DATA]
N = 40000  # block entries per big file: an unbounded step over them is ~10 times STEP_KEYS
COMMIT = 4000  # blocks per commit: what a mount's write-back group of 16 MiB holds at 4 KiB
SMALL = 2000
HELD = re.compile(r"event loop held (\d+) ms \((\d+) ms of CPU\) by one step of task ([^;]+);")


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[FaultCluster]:
    yield from fault_cluster(tmp_path, 3)


async def workload(c: FaultCluster, vol: str) -> None:
    await create_volume(c, vol)
    async with opened(c, vol) as (_vs, v, info):
        await put_everywhere(c, info, DATA)
        big = []
        for name in (b"a", b"b"):
            f = await v.create(1, name, REG, 0, 0)
            for lo in range(0, N, COMMIT):
                part = {i: (HASHES[i % len(HASHES)], 1) for i in range(lo, lo + COMMIT)}
                await v.commit(f.ino, part, (lo + COMMIT - 1) * BLOCK + 1, 0, held=list(info.replicas))
            await v.release(f.ino)
            big.append(f.ino)
        for i in range(SMALL):
            a = await v.create(1, b"s%05d" % i, REG, 0, 0)
            await v.release(a.ino)
        _attr, blocks = await v.open(big[0])
        assert len(blocks) == N
        await v.release(big[0])
        await v.snapshot_create("s")
        await v.setattr(big[0], size=1)  # cut ahead in bounded steps
        await v.unlink(1, b"b")  # the purge list
        for i in range(0, SMALL, 2):
            await v.unlink(1, b"s%05d" % i)
        with trio.fail_after(120):
            while (await v.statfs())["used"] != 1:
                await trio.sleep(0.2)  # the purge steps of the supervision rounds, observed
        places = await v.locate([HASHES[0]])
        assert len(places) == 1  # the one block a keeps
        assert sorted(await v.chunk_refs()) == sorted(HASHES)  # the snapshot's too
        report = await v.fsck(False)
        assert report["ok"] is True, report
        await v.restore("s")
        report = await v.fsck(True)
        assert report["ok"] is True and report["blocks"] == 2 * N, report
        assert len(await v.locate([HASHES[0]])) == 2 * N // len(HASHES)
    # A clone of it: its copy runs in a worker thread, the first open waits for it.
    async with node_connection(c, 0) as conn:
        await (await conn.admin()).clone_volume(f"{vol}@s", f"{vol}-copy")
    async with opened(c, f"{vol}-copy") as (_vs, v, _info):
        a = await v.lookup(1, b"a")
        _attr, blocks = await v.open(a.ino)
        assert len(blocks) == N
        await v.release(a.ino)


def test_no_meta_call_touches_more_keys_than_a_bounded_step(cluster3: FaultCluster) -> None:
    c = cluster3
    trio.run(workload, c, "loop")
    c.cli("volume", "inspect", "loop")  # and the usage report of a round after it all
    proc = c.cli("fsck", "loop", "--repair", "--json", check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True, proc.stdout + proc.stderr
    logs = {p.parent.name: p.read_text() for p in sorted(c.dir.glob("nodes/*/node.log"))}
    heavy = [ln for text in logs.values() for ln in text.splitlines() if "grows with the volume" in ln]
    assert not heavy, "\n".join(heavy)
    for node, text in logs.items():
        held = [(int(w), int(cpu), task) for w, cpu, task in HELD.findall(text)]
        wall = max(held, default=(0, 0, "-"))
        cpu = max(held, default=(0, 0, "-"), key=lambda h: h[1])
        print(f"{node}: {len(held)} report(s) of steps over 50 ms; longest {wall[0]} ms ({wall[1]} ms CPU) by "
              f"{wall[2]}, most CPU {cpu[1]} ms ({cpu[0]} ms) by {cpu[2]}; bound on keys per call {STEP_KEYS}")
