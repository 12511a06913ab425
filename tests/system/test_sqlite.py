"""A real database on a repl-3 volume: SQLite in WAL mode, several processes, one commit per row.

Every commit is an fsync of a few KiB of the WAL: with slices it stores about what it writes, and
the chunks replaced by merges are collected once older than the grace, so the pools end up near the
size of the files (issue 16: the same workload used to fill three 10 GiB pools).
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster, eventually, make_cluster, mounted

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root and FUSE")

PROCS, EACH = 4, 100


def _writer(db: str, first: int) -> None:
    con = sqlite3.connect(db, timeout=60, isolation_level=None)
    body = os.urandom(100).hex()
    for i in range(first, first + EACH):
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t (id, body) VALUES (?, ?)", (i, body))
        con.execute("COMMIT")
    con.close()


@pytest.fixture
def db_cluster(tmp_path: Path) -> Iterator[Cluster]:
    yield from make_cluster(tmp_path, nodes=3, pool_size="1G",
                            up_args=("--gc-interval", "15", "--commit-window", "5", "--gc-grace", "30"))


def _used(c: Cluster) -> list[int]:
    return [p["used"] for p in c.json("pool", "list")]


def test_sqlite_commits_cost_what_they_write(db_cluster: Cluster, tmp_path: Path) -> None:
    db_cluster.cli("volume", "create", "db", "--size", "2G", "--repl", "3")
    before = _used(db_cluster)
    with mounted(db_cluster, "db", tmp_path / "mnt") as m:
        db = str(m.path / "bench.db")
        con = sqlite3.connect(db, isolation_level=None)
        assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        con.close()
        ctx = multiprocessing.get_context("fork")
        workers = [ctx.Process(target=_writer, args=(db, k * EACH)) for k in range(PROCS)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=600)
        assert [w.exitcode for w in workers] == [0] * PROCS
        con = sqlite3.connect(db, isolation_level=None)
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == PROCS * EACH
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
        files = sum(f.stat().st_size for f in m.path.iterdir())
        # Stored while it ran (nothing is older than the grace yet): a few times what the commits
        # wrote, where rewriting each touched 1 MiB block stored 400 MiB and more.
        grown = max(after - b for after, b in zip(_used(db_cluster), before, strict=True))
        assert grown < PROCS * EACH * (64 << 10), (grown, files)
        # Replaced chunks are collected by the automatic rounds once older than the grace.
        eventually(lambda: max(a - b for a, b in zip(_used(db_cluster), before, strict=True)) <= 2 * files + (1 << 20),
                   timeout=120, what=f"pools back within twice the files' {files} bytes")
        con = sqlite3.connect(db, isolation_level=None)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == PROCS * EACH
        con.close()
