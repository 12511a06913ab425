"""KnownDirs: the names of directories this mount made, for lookups answered without a round trip."""

from __future__ import annotations

from pxfs.vfs.dircache import KnownDirs


def test_made_directory_is_known_empty_and_follows_changes() -> None:
    k = KnownDirs()
    assert not k.missing(5, b"a")  # unknown directory: ask the coordinator
    k.made(5)
    assert k.missing(5, b"a")
    assert not k.missing(5, b".") and not k.missing(5, b"..")
    k.added(5, b"a")
    assert not k.missing(5, b"a")
    k.removed(5, b"a")
    assert k.missing(5, b"a")
    k.added(7, b"x")  # changes in unknown directories are ignored
    assert 7 not in k


def test_forget_and_limit() -> None:
    k = KnownDirs(max_names=3)
    k.made(1)
    k.made(2)
    for n in (b"a", b"b", b"c"):
        k.added(1, n)
    k.forget(2)
    assert not k.missing(2, b"a")
    k.added(1, b"d")  # past the limit: everything is forgotten rather than grown
    assert 1 not in k and not k.missing(1, b"zz")
    k.made(3)
    k.added(3, b"a")
    k.forget_all()
    assert not k.missing(3, b"b")
