"""Directories whose every name this mount knows, so a lookup of any other name is ENOENT at once.

Creating a file starts with the kernel looking the name up; in a directory this mount made itself
(an untar, a build tree, a fresh data directory), the coordinator's answer is known in advance. A
directory becomes known when this mount makes it (it starts empty); every change this mount makes
there keeps the set right; a change by another mount (the coordinator's invalidation callback), a
failed change or a reconnect to a new coordinator forgets it, and lookups ask the coordinator again.
"""

from __future__ import annotations

MAX_NAMES = 1 << 20  # across all known directories: past it, start over rather than grow


class KnownDirs:
    def __init__(self, max_names: int = MAX_NAMES) -> None:
        self._dirs: dict[int, set[bytes]] = {}
        self._names = 0
        self._max = max_names

    def __contains__(self, ino: int) -> bool:
        return ino in self._dirs

    def made(self, ino: int) -> None:
        """This mount created directory ``ino``: it is empty."""
        self._dirs[ino] = set()

    def missing(self, parent: int, name: bytes) -> bool:
        """True when ``parent`` is known and has no entry ``name``."""
        names = self._dirs.get(parent)
        return names is not None and name not in names and name not in (b".", b"..")

    def added(self, parent: int, name: bytes) -> None:
        names = self._dirs.get(parent)
        if names is None or name in names:
            return
        if self._names >= self._max:
            self.forget_all()
            return
        names.add(name)
        self._names += 1

    def removed(self, parent: int, name: bytes) -> None:
        names = self._dirs.get(parent)
        if names is not None and name in names:
            names.discard(name)
            self._names -= 1

    def forget(self, parent: int) -> None:
        names = self._dirs.pop(parent, None)
        if names is not None:
            self._names -= len(names)

    def forget_all(self) -> None:
        self._dirs.clear()
        self._names = 0
