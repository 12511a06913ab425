"""The nemesis checker: replay a workload's acknowledged operations into the state they promise, then
compare it with what a FRESH mount of the volume shows and with what every replica holds.

Promised, for every path no failed or unfinished operation touched (those are unknown):

* every acknowledged file is at its acknowledged name with its size and sha256 (through the mount,
  and on each replica's own chunks: ``verify_on_replicas``);
* every acknowledged directory is a directory;
* a path an acknowledged unlink or rename removed is absent, and no name exists that the workload
  never created.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from tests.conftest import Cluster, mounted
from tests.system.manifest import Entry, verify_on_replicas, verify_through_mount


@dataclass
class Expected:
    """What the acknowledged operations promise, and which paths nothing may be said about."""

    files: dict[str, Entry] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)
    acked: int = 0
    failed: int = 0

    def known_files(self) -> list[Entry]:
        return [e for p, e in sorted(self.files.items()) if p not in self.unknown]


def replay(records: list[dict[str, Any]]) -> Expected:
    """The expected model from a workload log (``tests.system.nemesis_workload``), in log order."""
    exp = Expected()
    begun: dict[int, list[str]] = {}
    for r in records:
        ev, seq = r["ev"], r["seq"]
        if ev == "begin":
            begun[seq] = list(r["paths"])
            continue
        paths = begun.pop(seq, [])
        if ev == "fail":
            exp.failed += 1
            exp.unknown.update(paths)
            continue
        exp.acked += 1
        op = r["op"]
        if op == "create":
            exp.files[r["path"]] = Entry(r["path"], r["size"], r["sha256"], r["started"], r["acked"])
            exp.gone.discard(r["path"])
        elif op == "mkdir":
            exp.dirs.add(r["path"])
        elif op == "rename":
            e = exp.files.pop(r["src"])
            exp.files[r["dst"]] = Entry(r["dst"], e.size, e.sha256, e.started, e.acked)
            exp.gone.add(r["src"])
            exp.gone.discard(r["dst"])
        elif op == "unlink":
            exp.files.pop(r["path"])
            exp.gone.add(r["path"])
    for paths in begun.values():  # begun, never finished: the process was killed mid-operation
        exp.unknown.update(paths)
    return exp


def check_tree(root: Path, exp: Expected) -> list[str]:
    """Everything the model says about the namespace under ``root`` (contents aside)."""
    problems = []
    for d in sorted(exp.dirs - exp.unknown):
        if not (root / d).is_dir():
            problems.append(f"{d}: acknowledged mkdir, not a directory now")
    for p in sorted(exp.gone - exp.unknown - set(exp.files)):
        if os.path.lexists(root / p):
            problems.append(f"{p}: acknowledged as removed (unlink or rename source), still there")
    expected = set(exp.files) | exp.dirs | exp.unknown
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in expected:
                kind = "directory" if stat.S_ISDIR(os.lstat(os.path.join(dirpath, name)).st_mode) else "file"
                problems.append(f"{rel}: a {kind} no operation of the workload created")
    return problems


def check_volume(cluster: Cluster, volume: str, subdir: str, records: list[dict[str, Any]],
                 mountpoint: Path) -> tuple[Expected, list[str]]:
    """Mount ``volume`` afresh at ``mountpoint`` and check ``subdir`` against the replayed log.

    Returns the model and every problem found (through the fresh mount and on every replica).
    """
    exp = replay(records)
    with mounted(cluster, volume, mountpoint):
        root = mountpoint / subdir
        files = exp.known_files()
        problems = check_tree(root, exp)
        problems += [str(p) for p in verify_through_mount(root, files)]
        problems += [str(p) for p in trio.run(verify_on_replicas, cluster, volume, root, files)]
    return exp, problems
