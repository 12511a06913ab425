"""A real FUSE mount of the fakes, in a subprocess (pyfuse3 is one mount per process)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class FakeMount:
    path: Path
    proc: subprocess.Popen
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def unmount(self, sig: int | None = None) -> None:
        """End the mount (fusermount3 -u, or a signal) and check that nothing is left behind.

        Whatever happens, the mount and the process are gone afterwards (SIGTERM, lazy unmount and
        SIGKILL as fallbacks), so a failing test never leaves a mount for the next one.
        """
        problems = []
        if self.proc.poll() is None:
            if sig is None:
                done = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True, text=True,
                                      timeout=30)
                if done.returncode != 0:
                    problems.append(f"fusermount3 -u failed: {done.stderr.strip()}")
                    self.proc.send_signal(signal.SIGTERM)
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                problems.append("mount process did not exit")
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.path):
            problems.append("still mounted")
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
        if self.proc.returncode != 0:
            problems.append(f"mount exited rc={self.proc.returncode}")
        assert not problems, f"{self.path}: {'; '.join(problems)}\n{self.logs()}"


def start_mount(mnt: Path, log: Path, *args: str) -> FakeMount:
    mnt.mkdir(exist_ok=True)
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.fuse.fake_mount", str(mnt), *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=err)
    m = FakeMount(mnt, proc, log)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    line = b""
    while not line.endswith(b"\n") and time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line += os.read(proc.stdout.fileno(), 100)
    if line.strip() != b"ready":
        m.unmount(signal.SIGTERM)
        raise AssertionError(f"mount did not come up: {line!r}\n{m.logs()}")
    return m


@pytest.fixture
def fake_mount(tmp_path: Path) -> Iterator[FakeMount]:
    m = start_mount(tmp_path / "mnt", tmp_path / "mount.log", "--capacity", str(16 << 20))
    try:
        yield m
    finally:
        m.unmount()
