"""The nemesis workload: a separate process doing random namespace operations with plain syscalls.

Each operation is acknowledged only once it is durable by POSIX rules, and the log says so:

* ``create``: ``open(O_CREAT|O_EXCL)``, write seeded random data, ``fsync`` the file, close, ``fsync``
  its directory;
* ``rename`` of an acknowledged file (to a fresh name, or over another acknowledged file), then
  ``fsync`` of both directories;
* ``unlink`` of an acknowledged file, then ``fsync`` of its directory;
* ``mkdir`` (at most ``MAX_DIRS`` directories), then ``fsync`` of the parent.

The log (outside the mount) holds one fsync'd JSON line before each operation (``begin``, naming every
path it may touch) and one after it: ``ack`` (with ``size`` and ``sha256`` for a create) or ``fail``
(the errno). The checker (``tests.system.nemesis_check``) replays the acknowledged operations; the
paths of a failed operation, or of one begun but never finished (the process was killed), are
unknown and never asserted about; the workload itself never touches them again.

A second mode, ``--excl TAG``, creates the names ``x00000, x00001, ...`` in order with ``O_EXCL`` and logs
each outcome: two of them on two mounts of one volume race for every name.

Run by hand::

    python -m tests.system.nemesis_workload DIR LOG [--seed N] [--max-size BYTES]
    python -m tests.system.nemesis_workload DIR LOG --excl A [--count 200]
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from tests.system.manifest import (
    ERROR_BACKOFF,
    REPO_ROOT,
    Entry,
    ManifestWriter,
    MiB,
    _draw_size,
    _fsync_append,
    _make_data,
    _write_one,
)

DEFAULT_MAX_SIZE = MiB + 1  # mostly small files; a two-block one now and then
MAX_DIRS = 4
# The relative weights of the operations while there are acknowledged files to rename or unlink.
WEIGHTS = {"create": 6, "rename": 2, "unlink": 2, "mkdir": 1}


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Stop:
    """SIGTERM only sets a flag: the operation in flight finishes (acknowledged or failed) first."""

    def __init__(self) -> None:
        self.stopping = False
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True


def _log(fh: TextIO, **record: Any) -> None:
    _fsync_append(fh, json.dumps(record, sort_keys=True) + "\n")


def run_ops(root: Path, log_path: Path, seed: int, max_size: int) -> int:
    """The random-operations loop (in the child process) until SIGTERM."""
    stop = _Stop()
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    dirs = [""]            # acknowledged directories, relative to root ("" is root itself)
    files: list[str] = []  # acknowledged files the workload may still rename or unlink
    seq = 0
    with open(log_path, "a") as log:
        while not stop.stopping:
            seq += 1
            kinds = ["create", "mkdir"] + (["rename", "unlink"] if files else [])
            kind = rng.choices(kinds, [WEIGHTS[k] for k in kinds])[0]
            if kind == "mkdir" and len(dirs) > MAX_DIRS:
                kind = "create"
            parent = rng.choice(dirs)
            fresh = os.path.join(parent, f"{'d' if kind == 'mkdir' else 'f'}{seq:06d}")
            started = time.monotonic()
            record: dict[str, Any] = {"seq": seq, "op": kind}
            try:
                if kind == "create":
                    size = _draw_size(rng, max_size)
                    data, hole = _make_data(rng, size)
                    _log(log, ev="begin", paths=[fresh], **record)
                    _write_one(root / fresh, data, hole)
                    fsync_dir(root / parent)
                    record.update(path=fresh, size=size, sha256=hashlib.sha256(data).hexdigest())
                    files.append(fresh)
                elif kind == "mkdir":
                    _log(log, ev="begin", paths=[fresh], **record)
                    os.mkdir(root / fresh)
                    fsync_dir(root / parent)
                    record.update(path=fresh)
                    dirs.append(fresh)
                elif kind == "rename":
                    src = files.pop(rng.randrange(len(files)))
                    # Now and then over another acknowledged file: rename must replace it atomically.
                    dst = files.pop(rng.randrange(len(files))) if files and rng.random() < 0.2 else fresh
                    _log(log, ev="begin", paths=[src, dst], **record)
                    os.rename(root / src, root / dst)
                    fsync_dir(root / os.path.dirname(src))
                    fsync_dir(root / os.path.dirname(dst))
                    record.update(src=src, dst=dst)
                    files.append(dst)
                else:
                    path = files.pop(rng.randrange(len(files)))
                    _log(log, ev="begin", paths=[path], **record)
                    os.unlink(root / path)
                    fsync_dir(root / os.path.dirname(path))
                    record.update(path=path)
            except OSError as exc:
                # The paths of the failed operation are unknown from now on: never used again.
                _log(log, ev="fail", errno=_errno_name(exc), error=str(exc), **record)
                time.sleep(ERROR_BACKOFF)
                continue
            _log(log, ev="ack", started=started, acked=time.monotonic(), **record)
    return 0


def run_excl(root: Path, log_path: Path, tag: str, count: int = 0) -> int:
    """Create ``x00000, x00001, ...`` with O_EXCL (each holding ``tag``) until SIGTERM or ``count``
    names; log each outcome."""
    stop = _Stop()
    root.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        i = 0
        while not stop.stopping and (count == 0 or i < count):
            name = f"x{i:05d}"
            try:
                fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, tag.encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                _log(log, name=name, ok=False, errno=_errno_name(exc), t=time.monotonic())
            else:
                _log(log, name=name, ok=True, t=time.monotonic())
            i += 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.system.nemesis_workload",
                                description="random create/rename/unlink/mkdir in DIR; every acknowledged (and "
                                            "every failed) operation logged in LOG")
    p.add_argument("dir", type=Path)
    p.add_argument("log", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE)
    p.add_argument("--excl", metavar="TAG", help="instead: create x00000, x00001, ... with O_EXCL, each holding TAG")
    p.add_argument("--count", type=int, default=0, help="with --excl: stop after this many names (0: until SIGTERM)")
    args = p.parse_args(argv)
    if args.excl is not None:
        return run_excl(args.dir, args.log, args.excl, args.count)
    return run_ops(args.dir, args.log, args.seed, args.max_size)


# ------------------------------------------------------------------------------------------------
# Driving it from a test


def read_log(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a log; a last line still being appended is skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


class Workload(ManifestWriter):
    """``ManifestWriter``'s life cycle (``start``, ``wait_for``, ``stop``, ``kill``) for this process.

    ``entries()`` are the acknowledged operations, ``errors()`` one line per failed one. ``state_dir``
    must be outside the mount.
    """

    def __init__(self, directory: Path, state_dir: Path, seed: int = 0, max_size: int = DEFAULT_MAX_SIZE,
                 excl_tag: str | None = None, count: int = 0) -> None:
        super().__init__(directory, state_dir, seed=seed, max_size=max_size)
        self.log = state_dir / "ops.log"
        self.excl_tag, self.count = excl_tag, count

    def start(self) -> None:
        assert self.proc is None, "workload already started"
        mode = [str(self.directory), str(self.log), "--seed", str(self.seed), "--max-size", str(self.max_size)]
        if self.excl_tag is not None:
            mode += ["--excl", self.excl_tag, "--count", str(self.count)]
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.system.nemesis_workload", *mode], cwd=REPO_ROOT,
                                         stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)

    def wait_done(self, timeout: float = 120.0) -> None:
        """For ``count``: wait (bounded) until the process finished its names and exited 0."""
        assert self.proc is not None, "workload not started"
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"workload not done within {timeout}s: {len(self.records())} outcomes logged, "
                                 f"last {self.records()[-3:]}") from None
        if rc != 0:
            raise AssertionError(f"workload exited rc={rc}:\n{self._stderr()}")

    def records(self) -> list[dict[str, Any]]:
        return read_log(self.log)

    def _select(self, pred: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [r for r in self.records() if pred(r)]

    def entries(self) -> list[Entry]:  # type: ignore[override]  # acknowledged operations, not files
        acked = self._select(lambda r: r.get("ev") == "ack" or r.get("ok") is True)
        return [Entry(str(r.get("path") or r.get("dst") or r.get("name")), int(r.get("size", 0)),
                      str(r.get("sha256", "")), float(r.get("started", r.get("t", 0.0))),
                      float(r.get("acked", r.get("t", 0.0))))
                for r in acked]

    def errors(self) -> list[str]:
        failed = self._select(lambda r: r.get("ev") == "fail" or r.get("ok") is False)
        return [json.dumps(r, sort_keys=True) for r in failed]


if __name__ == "__main__":
    sys.exit(main())
