"""One process of the sustained-load test: mixed reads, writes, creates, renames and deletes.

Run as ``python -m tests.system.load_worker DIR SECONDS SEED``; prints one JSON line with its op
counts and errors. It keeps its own files (so its checks need no coordination with the other
workers) and verifies every file it still holds at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path


def main() -> int:
    root, seconds, seed = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    mine = root / f"w{seed}"
    mine.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    ops = {"write": 0, "read": 0, "create": 0, "rename": 0, "delete": 0, "stat": 0}
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        op = rng.choice(["write", "write", "read", "read", "create", "rename", "delete", "stat"])
        try:
            if op == "create" or not files:
                n += 1
                name = f"f{n}"
                data = rng.randbytes(rng.choice([0, 100, 4096, 65536, 300_000, 1 << 20]))
                (mine / name).write_bytes(data)
                files[name] = hashlib.sha256(data).hexdigest()
                ops["create"] += 1
            elif op == "write":
                name = rng.choice(sorted(files))
                data = rng.randbytes(rng.randint(0, 1_500_000))
                with open(mine / name, "wb") as fh:
                    fh.write(data)
                    if rng.random() < 0.3:
                        os.fsync(fh.fileno())
                files[name] = hashlib.sha256(data).hexdigest()
                ops["write"] += 1
            elif op == "read":
                name = rng.choice(sorted(files))
                if hashlib.sha256((mine / name).read_bytes()).hexdigest() != files[name]:
                    errors.append(f"read {name}: content differs")
                ops["read"] += 1
            elif op == "rename":
                old = rng.choice(sorted(files))
                n += 1
                new = f"f{n}"
                os.rename(mine / old, mine / new)
                files[new] = files.pop(old)
                ops["rename"] += 1
            elif op == "delete":
                name = rng.choice(sorted(files))
                os.unlink(mine / name)
                del files[name]
                ops["delete"] += 1
            else:
                os.stat(mine)
                sorted(os.listdir(mine))
                ops["stat"] += 1
        except OSError as exc:
            errors.append(f"{op}: {exc}")
    for name, digest in files.items():
        if hashlib.sha256((mine / name).read_bytes()).hexdigest() != digest:
            errors.append(f"final {name}: content differs")
    if sorted(os.listdir(mine)) != sorted(files):
        errors.append("final listing differs from the files this worker holds")
    print(json.dumps({"ops": ops, "errors": errors[:20], "files": len(files)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
