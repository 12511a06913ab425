"""Small state files are replaced durably (issue 13): a replica's epoch (its fencing token), the
cluster's config and a node's id are each written to a temp file, fsync'd, renamed over the old one
and the directory fsync'd, so a crash leaves the old content or the new, never none or half."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pxfs import node
from pxfs.cluster.config import ClusterConfig, load_config, save_config
from pxfs.durable import replace_file
from pxfs.volume.replica import HostedVolume


class Syscalls:
    """Records the fsyncs (by path) and renames made while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, ...]] = []
        fsync, replace = os.fsync, os.replace

        def traced_fsync(fd: int) -> None:
            self.calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            fsync(fd)

        def traced_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            self.calls.append(("replace", str(src), str(dst)))
            replace(src, dst)

        monkeypatch.setattr(os, "fsync", traced_fsync)
        monkeypatch.setattr(os, "replace", traced_replace)

    def assert_durable(self, path: Path) -> None:
        tmp = str(path.with_name(path.name + ".tmp"))
        want = [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(path.parent))]
        got = [c for c in self.calls if tmp in c or c == ("fsync", str(path.parent))]
        assert got[-3:] == want, self.calls


def test_replace_file_syncs_renames_and_syncs_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    traced = Syscalls(monkeypatch)
    target = tmp_path / "f"
    replace_file(target, b"new", mode=0o600)
    traced.assert_durable(target)
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o600


def test_a_crash_before_the_rename_leaves_the_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f"
    replace_file(target, b"old")

    def crash(_src: object, _dst: object) -> None:
        raise OSError("power lost")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        with pytest.raises(OSError):
            replace_file(target, b"half")
    assert target.read_bytes() == b"old"
    replace_file(target, b"new")  # the temp file a crash left is simply overwritten
    assert target.read_bytes() == b"new"


def test_the_epoch_of_a_replica_is_replaced_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hv = HostedVolume("v", tmp_path / "v")
    try:
        traced = Syscalls(monkeypatch)
        hv.set_epoch(7)
        traced.assert_durable(tmp_path / "v" / "epoch")
    finally:
        hv.close()
    again = HostedVolume("v", tmp_path / "v")
    try:
        assert again.epoch == 7
    finally:
        again.close()


def test_the_cluster_config_is_replaced_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    traced = Syscalls(monkeypatch)
    cfg = ClusterConfig(id="c1", name="test", seed="127.0.0.1:1", nodes=["127.0.0.1:1"])
    save_config(tmp_path, cfg)
    traced.assert_durable(tmp_path / "cluster.json")
    assert load_config(tmp_path).id == "c1"


def test_the_node_id_is_written_durably_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    traced = Syscalls(monkeypatch)
    assert node._node_id(tmp_path, "n7") == "n7"
    traced.assert_durable(tmp_path / "node-id")
    assert node._node_id(tmp_path, "") == "n7"  # read back, not written again
    assert len([c for c in traced.calls if c[0] == "replace"]) == 1
