"""``pxfs bench DIR``: a user's benchmark of any mounted directory, like ``juicefs bench``.

Six phases run in a temporary subdirectory of DIR that is removed afterwards; each of the N threads works
on its own files: a big file written block by block with one fsync at the end, then read back; small files
written (create, write, close; no fsync) and read back; a stat of every small file; create + unlink of empty
files. The page cache is dropped before each read phase when running as root, so reads come from the
filesystem; otherwise the result says they may be cache hits. Every buffer is distinct in each 4 KiB, so a
deduplicating store (pxfs chunks are content-addressed) cannot skip any of the writes.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pxfs.cli.output import emit_json, error, line, table
from pxfs.errors import Invalid, NoSpace, NotFound, PxfsError, Unauthorized
from pxfs.sizes import format_size, parse_size

MiB = 1 << 20
STAMP = 4096  # every 4 KiB of written data carries its own (thread, file, offset) stamp
Advance = Callable[[int], None]


@dataclass
class Phase:
    """One measured phase: ``ops`` operations (blocks, files, pairs) moving ``nbytes`` in ``seconds``."""

    test: str
    title: str
    unit: str
    ops: int
    nbytes: int
    seconds: float
    latencies: list[float]  # seconds per operation, all threads
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        if self.unit == "MiB/s":
            return self.nbytes / MiB / self.seconds
        return self.ops / self.seconds

    def latency_ms(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        return {"avg": round(statistics.fmean(lat) * 1e3, 3), "p50": round(lat[len(lat) // 2] * 1e3, 3),
                "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 3), "max": round(lat[-1] * 1e3, 3)}

    def as_json(self) -> dict[str, Any]:
        return {"test": self.test, "unit": self.unit, "value": round(self.value, 1), "ops": self.ops,
                "bytes": self.nbytes, "seconds": round(self.seconds, 4), "latency_ms": self.latency_ms(), **self.extra}


@dataclass
class Plan:
    root: Path
    threads: int
    block_size: int
    big_file_size: int
    small_files: int
    small_file_size: int


def _stamped(size: int, tag: int) -> bytearray:
    buf = bytearray(os.urandom(size))
    _stamp(buf, tag, 0)
    return buf


def _stamp(buf: bytearray, tag: int, counter: int) -> None:
    for off in range(0, len(buf) - 15, STAMP):
        struct.pack_into("<QQ", buf, off, tag, counter + off)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def _read_all(path: Path, expect: int, bufsize: int) -> None:
    got = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(bufsize)
        while n := f.readinto(buf):
            got += n
    if got != expect:
        raise Invalid(f"file {str(path)!r}", f"read back {got} bytes, wrote {expect}")


def drop_caches() -> str:
    """Empty the page cache; returns "" or a note saying why it was not done."""
    os.sync()
    if os.geteuid() != 0:
        return "not root: the page cache was not dropped before the read phases; reads may be cache hits"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"could not drop the page cache ({exc.strerror}); reads may be cache hits"
    return ""


def _big_write(plan: Plan, t: int, advance: Advance, extra: dict[str, Any]) -> list[float]:
    buf = _stamped(plan.block_size, t)
    view = memoryview(buf)
    lats = []
    fd = os.open(plan.root / f"big-{t}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for off in range(0, plan.big_file_size, plan.block_size):
            _stamp(buf, t, off)
            n = min(plan.block_size, plan.big_file_size - off)
            t0 = time.perf_counter()
            _write_all(fd, view[:n])
            lats.append(time.perf_counter() - t0)
            advance(n)
        t0 = time.perf_counter()
        os.fsync(fd)
        extra[f"fsync_s_{t}"] = time.perf_counter() - t0
    finally:
        os.close(fd)
    return lats


def _big_read(plan: Plan, t: int, advance: Advance) -> list[float]:
    buf = bytearray(plan.block_size)
    lats = []
    got = 0
    with open(plan.root / f"big-{t}", "rb", buffering=0) as f:
        while True:
            t0 = time.perf_counter()
            n = f.readinto(buf)
            if not n:
                break
            lats.append(time.perf_counter() - t0)
            got += n
            advance(n)
    if got != plan.big_file_size:
        raise Invalid(f"file {str(plan.root / f'big-{t}')!r}", f"read back {got} bytes, wrote {plan.big_file_size}")
    return lats


def _small_paths(plan: Plan, t: int) -> list[Path]:
    return [plan.root / f"small-{t}" / f"f{i:07d}" for i in range(plan.small_files)]


def _small_write(plan: Plan, t: int, advance: Advance) -> list[float]:
    (plan.root / f"small-{t}").mkdir()
    buf = _stamped(plan.small_file_size, t)
    lats = []
    for i, p in enumerate(_small_paths(plan, t)):
        _stamp(buf, t, i << 32)
        t0 = time.perf_counter()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, memoryview(buf))
        finally:
            os.close(fd)
        lats.append(time.perf_counter() - t0)
        advance(1)
    return lats


def _small_read(plan: Plan, t: int, advance: Advance) -> list[float]:
    lats = []
    for p in _small_paths(plan, t):
        t0 = time.perf_counter()
        _read_all(p, plan.small_file_size, max(plan.small_file_size, 4096))
        lats.append(time.perf_counter() - t0)
        advance(1)
    return lats


def _stat(plan: Plan, t: int, advance: Advance) -> list[float]:
    lats = []
    for p in _small_paths(plan, t):
        t0 = time.perf_counter()
        os.stat(p)
        lats.append(time.perf_counter() - t0)
        advance(1)
    return lats


def _create_unlink(plan: Plan, t: int, advance: Advance) -> list[float]:
    d = plan.root / f"cu-{t}"
    d.mkdir()
    lats = []
    for i in range(plan.small_files):
        p = d / f"e{i:07d}"
        t0 = time.perf_counter()
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.unlink(p)
        lats.append(time.perf_counter() - t0)
        advance(1)
    return lats


def _os_error(exc: OSError, where: Path) -> PxfsError:
    obj = f"directory {str(where)!r}"
    cause = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(obj, f"{cause} while benchmarking")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Unauthorized(obj, f"not writable ({cause})")
    if exc.errno == errno.EROFS:
        return Invalid(obj, "read-only filesystem")
    if exc.errno == errno.ENOENT and not where.exists():
        return NotFound(obj, "does not exist")
    return PxfsError(obj, f"{cause} ({errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.filename or ''})")


def check_dir(root: Path, need: int) -> None:
    if not root.exists():
        raise NotFound(f"directory {str(root)!r}", "does not exist")
    if not root.is_dir():
        raise Invalid(f"directory {str(root)!r}", "not a directory")
    st = os.statvfs(root)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise NoSpace(f"directory {str(root)!r}",
                      f"{format_size(free)} free, the benchmark needs {format_size(need)} (use smaller sizes)")


def run_bench(plan: Plan, progress: Any | None) -> tuple[list[Phase], list[str]]:
    """All phases in order; ``progress`` is a rich Progress or None."""
    notes: list[str] = []
    phases: list[Phase] = []
    n = plan.threads

    def phase(test: str, title: str, unit: str, total: int, ops: int, nbytes: int,
              work: Callable[[Plan, int, Advance], list[float]], **extra: Any) -> None:
        scale = MiB if unit == "MiB/s" else 1  # the bars count MiB or files/ops
        task = progress.add_task(title, total=total / scale, unit=unit[:-2]) if progress is not None else None

        def advance(k: int) -> None:
            if task is not None:
                progress.advance(task, k / scale)

        with ThreadPoolExecutor(max_workers=n) as ex:
            t0 = time.perf_counter()
            futures = [ex.submit(work, plan, t, advance) for t in range(n)]
            lats = [x for f in futures for x in f.result()]
            seconds = time.perf_counter() - t0
        phases.append(Phase(test, title, unit, ops, nbytes, seconds, lats, extra))

    fsync_times: dict[str, Any] = {}
    big = n * plan.big_file_size
    phase("big_write", "big file write", "MiB/s", big, len(range(0, plan.big_file_size, plan.block_size)) * n, big,
          lambda p, t, a: _big_write(p, t, a, fsync_times))
    phases[-1].extra["fsync_s"] = round(max(fsync_times.values()), 4)
    note = drop_caches()
    phase("big_read", "big file read", "MiB/s", big, len(range(0, plan.big_file_size, plan.block_size)) * n, big,
          _big_read, caches_dropped=not note)
    files = n * plan.small_files
    phase("small_write", "small file write", "files/s", files, files, files * plan.small_file_size, _small_write)
    note = note or drop_caches()
    phase("small_read", "small file read", "files/s", files, files, files * plan.small_file_size, _small_read,
          caches_dropped=not note)
    phase("stat", "stat", "ops/s", files, files, 0, _stat)
    phase("create_unlink", "create+unlink", "ops/s", files, files, 0, _create_unlink)
    if note:
        notes.append(note)
    return phases, notes


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


PER = {"big_write": "block", "big_read": "block", "small_write": "file", "small_read": "file", "stat": "op",
       "create_unlink": "pair"}


def cmd_bench(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    threads = args.threads
    if not 1 <= threads <= 256:
        raise Invalid(f"--threads {threads}", "must be 1 to 256")
    if args.small_files < 1:
        raise Invalid(f"--small-files {args.small_files}", "must be at least 1")
    big = parse_size(args.big_file_size, "--big-file-size")
    small = parse_size(args.small_file_size, "--small-file-size")
    block = min(parse_size(args.block_size, "--block-size"), big)
    check_dir(root, threads * (big + args.small_files * max(small, 4096)) + 64 * MiB)
    try:
        work = Path(tempfile.mkdtemp(prefix=".pxfs-bench-", dir=root))
    except OSError as exc:
        raise _os_error(exc, root) from None
    plan = Plan(work, threads, block, big, args.small_files, small)
    try:
        if args.json:
            phases, notes = run_bench(plan, None)
        else:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("{task.description:<18}"), BarColumn(),
                          TextColumn("{task.completed:>8.0f}/{task.total:.0f} {task.fields[unit]}"),
                          TimeElapsedColumn(), console=Console(stderr=True)) as progress:
                phases, notes = run_bench(plan, progress)
    except OSError as exc:
        raise _os_error(exc, root) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        emit_json({"dir": str(root), "threads": threads, "block_size": block, "big_file_size": big,
                   "small_files": args.small_files, "small_file_size": small,
                   "caches_dropped": not notes, "notes": notes, "results": [p.as_json() for p in phases]})
        return 0
    rows = []
    for p in phases:
        lat = p.latency_ms()
        rows.append([p.title, f"{_fmt(p.value)} {p.unit}", f"{lat['avg']:.3f} ms/{PER[p.test]}",
                     f"{lat['p99']:.3f} ms", f"{p.seconds:.2f} s"])
    table(f"pxfs bench {root}: {threads} thread(s), big file {format_size(big)} in {format_size(block)} blocks, "
          f"{args.small_files} small file(s) of {format_size(small)} per thread",
          ["test", "result", "latency avg", "p99", "time"], rows)
    fsync = phases[0].extra["fsync_s"]
    line(f"big file write includes the final fsync ({fsync:.2f} s); small files are not fsynced; "
         "create+unlink counts one create and one unlink as one op")
    for note in notes:
        line(f"note: {note}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a directory on the filesystem to measure (a temp subdirectory is used)")
    p.add_argument("--big-file-size", default="1G", help="size of each thread's big file (default 1G)")
    p.add_argument("--block-size", default="1M", help="write and read size for the big file (default 1M)")
    p.add_argument("--small-files", type=int, default=1000, help="small files per thread (default 1000)")
    p.add_argument("--small-file-size", default="16K", help="size of each small file (default 16K)")
    p.add_argument("--threads", "-p", type=int, default=1, help="threads, each on its own files (default 1)")
    p.add_argument("--json", action="store_true", help="machine-readable output, no progress bars")


def register(sub: argparse._SubParsersAction, client: Callable) -> None:
    """Adds ``pxfs bench``; it needs no cluster, so ``client`` (which adds --cluster) is not applied."""
    p = sub.add_parser("bench", help="benchmark a mounted directory: big and small files, stat, create")
    add_arguments(p)
    p.set_defaults(run=cmd_bench, sync=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m pxfs.cli.bench_cmd DIR ...``: the same command without the rest of the CLI."""
    ap = argparse.ArgumentParser(prog="pxfs bench", description="benchmark a mounted directory like juicefs bench")
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return cmd_bench(args)
    except PxfsError as err:
        error(str(err))
        return 1
    except KeyboardInterrupt:
        error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
