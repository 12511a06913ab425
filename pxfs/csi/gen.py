"""``python -m pxfs.csi.gen``: generate ``pxfs/csi/csi_pb2.py`` and ``csi_pb2_grpc.py`` from
``schema/pxfs/csi/csi.proto`` with grpcio-tools (scripts/setup runs it; the stubs are never committed)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "schema" / "pxfs" / "csi" / "csi.proto"


def generate(out: Path = ROOT) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"  # the well-known types (timestamp, wrappers)
    args = ["grpc_tools.protoc", f"-I{ROOT / 'schema'}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", str(PROTO)]
    if protoc.main(args) != 0:
        raise SystemExit(f"pxfs.csi.gen: protoc failed on {PROTO}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
