"""ruff over the whole tree: style is part of the build."""

import subprocess
import sys
from pathlib import Path


def test_ruff_clean() -> None:
    root = Path(__file__).resolve().parents[1]
    # The scripts have no .py suffix: ruff finds them only by name.
    scripts = [str(p.relative_to(root)) for p in sorted((root / "scripts").iterdir())
               if p.is_file() and p.read_bytes().startswith(b"#!/usr/bin/env python")]
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "pxfs", "tests", *scripts], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
