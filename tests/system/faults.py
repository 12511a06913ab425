"""Shared by the fault tests (``test_faults``, ``test_nemesis``, ``test_durability``): a cluster whose
`pxfs up` settings stay in place across restarts and that can resume frozen nodes, and the volume
state as `pxfs volume inspect --json` reports it, polled with a bound.

Never kill ``n1`` by accident: the seed holds the embedded control store and cannot fail over.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import Cluster, eventually, free_port_block, stop_and_check

SEED = "n1"
HEALTHY_TIMEOUT = 60.0
FAILOVER_TIMEOUT = 30.0


# ------------------------------------------------------------------------------------------------
# A cluster whose fault-handling settings (`pxfs up --replace-after ...`) are in place from the start


@dataclass
class FaultCluster(Cluster):
    settings: tuple[str, ...] = field(default=())

    def up(self) -> Any:
        # Every `up` passes the settings: cluster.json keeps them, and a node reads them at start.
        return self.cli(*self._up_args())

    def up_unchecked(self) -> Any:
        """`pxfs up` whatever its exit code (a test that expects it may refuse)."""
        return self.cli(*self._up_args(), check=False)

    def _up_args(self) -> tuple[str, ...]:
        return ("up", "--dir", str(self.dir), "--nodes", str(self.nodes), "--base-port", str(self.base_port),
                "--pool-size", "2G", *self.settings)

    def resume_all(self) -> None:
        """SIGCONT every node: a test that stopped one must never leave it frozen for teardown."""
        for nd in (self.dir / "nodes").iterdir() if (self.dir / "nodes").exists() else []:
            try:
                os.kill(int((nd / "pid").read_text()), signal.SIGCONT)
            except (OSError, ValueError):
                pass


def fault_cluster(tmp_path: Path, nodes: int, *settings: str) -> Iterator[FaultCluster]:
    """Like ``tests.conftest.make_cluster``, with `pxfs up` settings, and frozen nodes resumed first."""
    c = FaultCluster(dir=tmp_path / "cluster", base_port=free_port_block(nodes), nodes=nodes, settings=settings)
    try:
        c.up()
        yield c
    finally:
        c.resume_all()
        stop_and_check(c)


# ------------------------------------------------------------------------------------------------
# Volume state, as `pxfs volume inspect --json` reports it


def inspect(cluster: Cluster, vol: str) -> dict[str, Any]:
    info = cluster.json("volume", "inspect", vol)
    assert isinstance(info, dict)
    return info


def wait_volume(cluster: Cluster, vol: str, pred: Callable[[dict[str, Any]], bool], what: str,
                timeout: float = HEALTHY_TIMEOUT) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        nonlocal last
        last = inspect(cluster, vol)
        return last if pred(last) else None

    try:
        return eventually(check, timeout=timeout, what=what)
    except AssertionError as err:
        raise AssertionError(f"{err}; volume now: {last}") from None


def healthy(extra: Callable[[dict[str, Any]], bool] = lambda _v: True) -> Callable[[dict[str, Any]], bool]:
    return lambda v: (v["state"] == "healthy" and not v["missing_replicas"] and not v["lagging"]
                      and len(v["replicas"]) == v["repl"] and extra(v))


def followers(info: dict[str, Any]) -> list[str]:
    """The volume's followers that may be killed (never the seed)."""
    return [r for r in info["replicas"] if r != info["coordinator"] and r != SEED]


def node_state(cluster: Cluster, node: str) -> str:
    nodes = cluster.json("node", "list")
    assert isinstance(nodes, list)
    return next(n["state"] for n in nodes if n["id"] == node)
