"""The loop watch (pxfs.loopwatch) names a step that held the event loop past its threshold, with
its CPU time, and lets short steps pass unreported (a bound from below on a busy loop: not a timing
that a loaded machine can break)."""

from __future__ import annotations

import logging
import time

import pytest
import trio

from pxfs.loopwatch import LoopWatch


async def hog(seconds: float) -> None:
    """One step that computes for ``seconds`` without a checkpoint."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def test_a_long_step_is_reported_and_short_ones_are_not(caplog: pytest.LogCaptureFixture) -> None:
    watch = LoopWatch("test", threshold=0.05)

    async def main() -> None:
        trio.lowlevel.add_instrument(watch)
        for _ in range(100):
            await trio.lowlevel.checkpoint()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog, 0.08, name="the-hog")

    with caplog.at_level(logging.INFO, logger="pxfs.loopwatch"):
        trio.run(main)
    assert watch.longest.task == "the-hog"
    assert watch.longest.wall >= 0.08 and watch.longest.cpu >= 0.08
    reports = [r.getMessage() for r in caplog.records if "event loop held" in r.getMessage()]
    assert any("the-hog" in m for m in reports) and len(reports) <= 2, reports  # not one per short step
