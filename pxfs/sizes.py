"""Human sizes: ``512M``, ``10G``, ``1T`` (powers of 1024; a trailing ``B`` or ``iB`` is accepted)."""

from __future__ import annotations

import re

from pxfs.errors import Invalid

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    m = _SIZE.match(text or "")
    if not m:
        raise Invalid(f"{what} {text!r}", "expected a number with an optional unit K, M, G, T, P (e.g. 512M, 10G)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value != int(value) or value <= 0 or value >= 1 << 63:
        raise Invalid(f"{what} {text!r}", "must be a positive whole number of bytes below 8E")
    return int(value)


def format_size(n: int) -> str:
    for unit in ("E", "P", "T", "G", "M", "K"):
        step = _UNITS[unit]
        if n >= step:
            v = n / step
            return f"{v:.1f}{unit}" if v < 100 and v != int(v) else f"{int(v)}{unit}"
    return f"{n}B"
