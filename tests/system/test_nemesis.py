"""Seeded nemesis schedules against a real 3-node cluster while a workload creates, renames and
unlinks fsync'd files (issue 10, "Acknowledged means durable").

Each test: a repl-3 volume, mounted; the workload (``tests.system.nemesis_workload``) runs while the
nemesis (``tests.system.nemesis``) plays its schedule; then every node is resumed and restarted, the
volume must become healthy, and the checker (``tests.system.nemesis_check``) replays the acknowledged
operations against a fresh mount and every replica. A failure message starts with the schedule.

The default suite runs two short schedules of one non-seed fault at a time; ``-m long`` runs many
longer ones (20 seeds) whose faults overlap their recoveries. The seed n1 is never faulted.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import eventually, mounted
from tests.system.faults import FaultCluster, fault_cluster, healthy, wait_volume
from tests.system.manifest import verify_through_mount
from tests.system.nemesis import NODE_OPS, Nemesis, Schedule, schedule
from tests.system.nemesis_check import check_tree, check_volume, replay
from tests.system.nemesis_workload import Workload

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/fuse").exists(), reason="needs root and FUSE")

# Operations the workload must acknowledge after each settled step: the application carries on.
PROGRESS = 3
# Seeds whose 4-step schedules cover every node op kind at least once.
DEFAULT_SEEDS = (2, 14)


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[FaultCluster]:
    yield from fault_cluster(tmp_path, 3)


def run_schedule(cluster: FaultCluster, tmp_path: Path, sched: Schedule,
                 record_property: Callable[[str, object], None]) -> None:
    started = time.monotonic()
    vol = f"nemesis-{uuid.uuid4().hex[:8]}"
    cluster.cli("volume", "create", vol, "--size", "1G", "--repl", "3")
    with mounted(cluster, vol, tmp_path / "mnt") as m:
        workload = Workload(m.path / "w", tmp_path / "workload", seed=sched.seed)

        def progress() -> None:
            workload.wait_for(len(workload.entries()) + PROGRESS, timeout=90)

        try:
            workload.start()
            workload.wait_for(5, timeout=60)
            nemesis = Nemesis(cluster, vol, after_step=progress if sched.settle else None)
            nemesis.run(sched)
            nemesis.settle()
            progress()
            workload.stop()
        except AssertionError as err:
            raise AssertionError(f"{sched}\n{err}") from None
        finally:
            workload.kill()
    wait_volume(cluster, vol, healthy(), "volume healthy before the check")
    exp, problems = check_volume(cluster, vol, "w", workload.records(), tmp_path / "check")
    elapsed = time.monotonic() - started
    record_property("seconds", round(elapsed, 1))
    record_property("acked", exp.acked)
    print(f"[{sched.name}] {exp.acked} operations acknowledged, {exp.failed} failed, {len(exp.unknown)} unknown "
          f"paths, {len(exp.known_files())} files checked, {elapsed:.0f}s")
    for line in workload.errors()[:20]:
        print(f"[{sched.name}] failed operation: {line}")
    assert not problems, f"{sched}\n{len(problems)} problems:\n" + "\n".join(problems)


@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
def test_nemesis_one_fault_at_a_time(cluster3: FaultCluster, tmp_path: Path, seed: int,
                                     record_property: Callable[[str, object], None]) -> None:
    """Four non-seed faults (pause, kill+restart follower or coordinator), each healed before the next."""
    run_schedule(cluster3, tmp_path, schedule(seed, 4, NODE_OPS, max_hold=4.0, settle=True), record_property)


@pytest.mark.long
@pytest.mark.parametrize("seed", range(100, 120))
def test_nemesis_overlapping_faults(cluster3: FaultCluster, tmp_path: Path, seed: int,
                                    record_property: Callable[[str, object], None]) -> None:
    """Ten non-seed faults back to back: each starts while the last one's recovery may still run."""
    run_schedule(cluster3, tmp_path, schedule(seed, 10, NODE_OPS, max_hold=8.0, settle=False), record_property)


def test_checker_catches_lost_changed_and_resurrected_files(tmp_path: Path) -> None:
    """The checker itself, on a plain local directory: it must name every kind of broken promise."""
    root = tmp_path / "local"
    workload = Workload(root, tmp_path / "workload", seed=5, max_size=4096)
    try:
        workload.start()
        eventually(lambda: ({"rename", "unlink", "mkdir"} <= {r["op"] for r in workload.records()
                                                             if r["ev"] == "ack"}),
                   timeout=30, what="the workload acknowledged a rename, an unlink and a mkdir")
        workload.stop()
    finally:
        workload.kill()
    exp = replay(workload.records())
    assert check_tree(root, exp) == [] and verify_through_mount(root, exp.known_files()) == []
    lost, changed = exp.known_files()[:2]
    removed = next(p for p in sorted(exp.gone) if p not in exp.files)
    (root / lost.name).unlink()
    (root / changed.name).write_bytes(b"not what was acknowledged")
    (root / removed).write_bytes(b"back from the dead")
    (root / "stray").write_bytes(b"")
    problems = check_tree(root, exp) + [str(p) for p in verify_through_mount(root, exp.known_files())]
    text = "\n".join(problems)
    for name in (lost.name, changed.name, removed, "stray"):
        assert name in text, f"{name} not reported:\n{text}"
