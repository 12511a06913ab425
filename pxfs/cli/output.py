"""CLI output: rich tables for people, ``--json`` for scripts, one line on stderr for errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import Progress, ProgressColumn
from rich.table import Table

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left", box=None, header_style="bold", pad_edge=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    _out.print(t)


def progress(*columns: str | ProgressColumn, json_output: bool) -> Progress:
    """A progress display for a long operation, on stderr and only when stderr is a terminal: never
    under ``--json``, in a pipe or a log, whose readers want the result alone. Erased when done."""
    return Progress(*columns, console=_err, transient=True, disable=json_output or not sys.stderr.isatty())


def line(text: str) -> None:
    _out.print(text, markup=False)


def error(text: str) -> None:
    _err.print(f"pxfs: {text}", markup=False, style="red")
