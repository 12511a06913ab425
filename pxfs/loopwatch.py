"""How long one task step holds a process's trio event loop (issue 13: a node's should stay ~50 ms).

Trio runs one task step at a time: a step that computes for long (a scan of a whole keyspace, a
batch of a million keys) delays everything else the process does, RPC answers, heartbeats and
replication alike. ``LoopWatch`` times every step, wall clock and CPU of the loop's thread (a loaded
machine stretches the first, only work done stretches the second), keeps the longest, and logs at
most one line a second about the longest of the steps past its threshold since the last line.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

THRESHOLD = 0.05
LOG_EVERY = 1.0


@dataclass
class Step:
    wall: float = 0.0
    cpu: float = 0.0
    task: str = ""


class LoopWatch(trio.abc.Instrument):
    """A trio instrument; add it to a running loop with ``trio.lowlevel.add_instrument``."""

    def __init__(self, who: str, threshold: float = THRESHOLD) -> None:
        self.who, self.threshold = who, threshold
        self.longest = Step()  # since the start
        self._worst = Step()  # since the last line logged
        self._over = 0
        self._logged = 0.0
        # Added during a step, it sees that step end first: timed from here.
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        now = time.perf_counter()
        wall = now - self._wall
        if wall < self.threshold:
            return
        step = Step(wall, time.thread_time() - self._cpu, task.name)
        if wall > self.longest.wall:
            self.longest = step
        if wall > self._worst.wall:
            self._worst = step
        self._over += 1
        if now - self._logged >= LOG_EVERY:
            w = self._worst
            log.info("%s event loop held %.0f ms (%.0f ms of CPU) by one step of task %s; %d step(s) over "
                     "%.0f ms since the last report", self.who, w.wall * 1e3, w.cpu * 1e3, w.task, self._over,
                     self.threshold * 1e3)
            self._logged, self._worst, self._over = now, Step(), 0
