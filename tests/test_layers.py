"""The rooms of DESIGN.md: the client library, the CSI driver and the volume plugin never import the
CLI (what they share with it lives in pxfs/client), and the client library never prints."""

from __future__ import annotations

import ast
from pathlib import Path

PXFS = Path(__file__).resolve().parents[1] / "pxfs"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_drivers_and_client_never_import_the_cli() -> None:
    for room in ("client", "csi", "plugin"):
        for f in (PXFS / room).glob("*.py"):
            bad = sorted(m for m in _imports(f) if m == "pxfs.cli" or m.startswith("pxfs.cli."))
            assert not bad, f"{f.relative_to(PXFS.parent)} imports {bad}"


def test_the_client_library_never_prints() -> None:
    for f in (PXFS / "client").glob("*.py"):
        calls = [n for n in ast.walk(ast.parse(f.read_text()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not calls, f"{f.relative_to(PXFS.parent)} prints"
