"""The nemesis: seeded random schedules of faults injected into a real local cluster.

A schedule is a list of ``Step``s drawn with ``random.Random(seed)`` from the op kinds a test allows;
every step has a bounded ``hold`` (how long the fault lasts). Node ops never touch the seed:

* ``pause``: SIGSTOP a non-seed node, hold, SIGCONT;
* ``kill_follower``: SIGKILL a follower of the volume, hold, restart it (`pxfs up` starts whatever
  node is not running);
* ``kill_coordinator``: the same for the volume's coordinator (skipped, and logged, if the seed
  coordinates: the seed cannot fail over).

The seed is never faulted: it holds the embedded control store (`test_durability` covers losing it).

With ``settle`` the schedule waits for the volume to be healthy after every step (one fault at a
time); without, faults overlap their recoveries. Every step is printed before and after it runs, and a
failure names the schedule and the step. ``run`` always resumes and restarts every node at the end.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.conftest import eventually
from tests.system.faults import HEALTHY_TIMEOUT, SEED, FaultCluster, healthy, inspect, node_state, wait_volume

NODE_OPS = ("pause", "kill_follower", "kill_coordinator")
UP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Step:
    kind: str
    hold: float  # seconds the fault lasts
    pick: int    # which candidate node, modulo their number (for ``pause``)

    def __str__(self) -> str:
        return f"{self.kind} hold={self.hold:.1f}s pick={self.pick}"


@dataclass(frozen=True)
class Schedule:
    seed: int
    steps: tuple[Step, ...]
    settle: bool

    @property
    def name(self) -> str:
        return f"nemesis seed={self.seed}"

    def __str__(self) -> str:
        return f"{self.name} settle={self.settle}: " + "; ".join(map(str, self.steps))


def schedule(seed: int, n_steps: int, kinds: tuple[str, ...] = NODE_OPS, max_hold: float = 6.0,
             settle: bool = True) -> Schedule:
    """``n_steps`` steps drawn from ``kinds``; holds between 0.2 s and ``max_hold``."""
    rng = random.Random(seed)
    steps = tuple(Step(rng.choice(kinds), round(rng.uniform(0.2, max_hold), 1), rng.randrange(1000))
                  for _ in range(n_steps))
    return Schedule(seed, steps, settle)


class Nemesis:
    """Runs a schedule against ``cluster``, choosing followers and coordinators of ``volume``.

    ``after_step`` (for example "the workload acknowledged more operations") runs after every step
    once the volume settled, if the schedule settles.
    """

    def __init__(self, cluster: FaultCluster, volume: str, after_step: Callable[[], None] | None = None) -> None:
        self.cluster, self.volume, self.after_step = cluster, volume, after_step
        self.log: list[str] = []

    def say(self, text: str) -> None:
        self.log.append(text)
        print(text, flush=True)

    def run(self, sched: Schedule) -> None:
        self.say(f"[{sched.name}] {sched}")
        try:
            for i, step in enumerate(sched.steps, 1):
                where = f"[{sched.name} step {i}/{len(sched.steps)}: {step}]"
                self.say(f"{where} begins")
                try:
                    self.say(f"{where} {self._do(step)}")
                    if sched.settle:
                        wait_volume(self.cluster, self.volume, healthy(), "volume healthy after the step")
                        if self.after_step is not None:
                            self.after_step()
                except AssertionError as err:
                    raise AssertionError(f"{where} failed: {err}") from None
        finally:
            self.restore()

    def restore(self) -> None:
        """Resume every stopped node and restart every killed one, then wait until all are up."""
        self.cluster.resume_all()
        self.cluster.up()
        for node in self._nodes():
            eventually(lambda n=node: node_state(self.cluster, n) == "up", timeout=UP_TIMEOUT, what=f"{node} up")
        self.say(f"[nemesis] restored: all of {self._nodes()} running")

    def settle(self) -> None:
        wait_volume(self.cluster, self.volume, healthy(), "volume healthy after the schedule", timeout=HEALTHY_TIMEOUT)

    # -- the op kinds ----------------------------------------------------------------------------

    def _nodes(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.cluster.nodes + 1)]

    def _do(self, step: Step) -> str:
        if step.kind == "pause":
            candidates = [n for n in self._nodes() if n != SEED]
            return self._pause(candidates[step.pick % len(candidates)], step.hold)
        if step.kind in ("kill_follower", "kill_coordinator"):
            info = inspect(self.cluster, self.volume)
            if step.kind == "kill_coordinator":
                candidates = [info["coordinator"]]
            else:
                candidates = sorted(r for r in info["replicas"] if r != info["coordinator"])
            candidates = [n for n in candidates if n != SEED]
            if not candidates:
                return (f"skipped: no non-seed candidate (coordinator {info['coordinator']}, "
                        f"replicas {info['replicas']})")
            return self._kill_restart(candidates[step.pick % len(candidates)], step.hold)
        raise AssertionError(f"unknown op kind {step.kind!r}")

    def _hold(self, seconds: float) -> None:
        # The fault's length is part of the schedule (what the cluster sees meanwhile is the test);
        # nothing waits on it for a state.
        time.sleep(seconds)

    def _pause(self, node: str, hold: float) -> str:
        pid = self.cluster.pid(node)
        os.kill(pid, signal.SIGSTOP)
        try:
            self._hold(hold)
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"SIGSTOP {node} (pid {pid}), {hold:.1f}s, SIGCONT"

    def _kill_restart(self, node: str, hold: float) -> str:
        pid = self.cluster.pid(node)
        self.cluster.kill(node)
        self._hold(hold)
        self.cluster.up()
        eventually(lambda: node_state(self.cluster, node) == "up", timeout=UP_TIMEOUT, what=f"{node} up again")
        return f"SIGKILL {node} (pid {pid}), {hold:.1f}s, restarted (pid {self.cluster.pid(node)})"
