"""CSI requests in pxfs terms, without a cluster: names, capacity ranges, StorageClass parameters,
capabilities, listing pages; and the volume plugin's Create options."""

from __future__ import annotations

import grpc
import pytest

from pxfs.csi import csi_pb2 as pb
from pxfs.csi import params
from pxfs.csi.controller import _page
from pxfs.csi.errors import CsiError
from pxfs.errors import Invalid
from pxfs.plugin.volumes import DEFAULT_SIZE, spec_from_opts

MiB = 1 << 20
Mode = pb.VolumeCapability.AccessMode


def code(fn, *args) -> grpc.StatusCode:  # noqa: ANN001
    with pytest.raises(CsiError) as e:
        fn(*args)
    return e.value.code


def test_names_map_stably() -> None:
    assert params.pxfs_name("pvc-0b8e6a4e-1d0c-4a57-9a7b-2f6c1e0a9d11") == "pvc-0b8e6a4e-1d0c-4a57-9a7b-2f6c1e0a9d11"
    odd = params.pxfs_name("a/../b with spaces" + "x" * 100)
    assert odd == params.pxfs_name("a/../b with spaces" + "x" * 100) and odd.startswith("csi-") and len(odd) <= 63
    assert params.pxfs_name("a") != params.pxfs_name("a ")


def test_capacity_ranges() -> None:
    assert params.capacity(pb.CapacityRange())[0] == params.DEFAULT_SIZE
    assert params.capacity(pb.CapacityRange(required_bytes=10 * MiB + 1))[0] == 11 * MiB  # whole MiB
    assert params.capacity(pb.CapacityRange(limit_bytes=64 * MiB))[0] == 64 * MiB
    assert params.capacity(pb.CapacityRange(required_bytes=5))[0] == MiB
    assert code(params.capacity, pb.CapacityRange(required_bytes=2 * MiB, limit_bytes=MiB)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    tiny = pb.CapacityRange(required_bytes=1000, limit_bytes=2000)
    assert code(params.capacity, tiny) == grpc.StatusCode.OUT_OF_RANGE
    assert code(params.capacity, pb.CapacityRange(required_bytes=-1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert params.fits(64 * MiB, 32 * MiB, 64 * MiB) and not params.fits(64 * MiB, 128 * MiB, 0)


def test_storage_class_parameters() -> None:
    repl, block, labels, mr = params.volume_parameters({"repl": "3", "blockSize": "64K", "labels": "a=1, b=2",
                                                        "minReplicas": "2", "csi.storage.k8s.io/pvc/name": "x"})
    assert (repl, block, labels, mr) == (3, 64 << 10, {"a": "1", "b": "2"}, 2)
    for bad in ({"repl": "three"}, {"blockSize": "big"}, {"labels": "novalue"}, {"colour": "red"}):
        assert code(params.volume_parameters, bad) == grpc.StatusCode.INVALID_ARGUMENT


def test_capabilities() -> None:
    def mount(mode: int, fs: str = "") -> pb.VolumeCapability:
        return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=fs), access_mode=Mode(mode=mode))

    for mode in params.MODES:
        assert params.check_capability(mount(mode)) == ""
    assert "block" in params.check_capability(pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume()))
    assert "fs_type" in params.check_capability(mount(Mode.MULTI_NODE_MULTI_WRITER, "xfs"))
    assert params.check_capability(mount(Mode.UNKNOWN))
    assert code(params.check_capabilities, []) == grpc.StatusCode.INVALID_ARGUMENT


def test_pages() -> None:
    items = ["a", "b", "c", "d", "e"]
    page, token = _page(items, str, 2, "")
    assert (page, token) == (["a", "b"], "c")
    assert _page(items, str, 2, token) == (["c", "d"], "e")
    assert _page(items, str, 2, "e") == (["e"], "")
    assert _page(["a", "d"], str, 0, "c") == (["d"], "")  # the entry the token named is gone
    assert code(_page, items, str, 2, "zz") == grpc.StatusCode.ABORTED
    assert code(_page, items, str, -1, "") == grpc.StatusCode.INVALID_ARGUMENT


def test_plugin_options() -> None:
    spec, sized = spec_from_opts("v", {"size": "1G", "repl": "3", "blockSize": "64K", "label": "a=1,b=2"})
    assert (spec.size, spec.repl, spec.block_size, spec.labels, sized) == (1 << 30, 3, 64 << 10, {"a": "1", "b": "2"},
                                                                          True)
    assert spec_from_opts("v", {})[0].size == DEFAULT_SIZE and not spec_from_opts("v", {})[1]
    for bad in ({"size": "huge"}, {"repl": "x"}, {"label": "x"}, {"colour": "red"}):
        with pytest.raises(Invalid):
            spec_from_opts("v", bad)
