"""What CSI requests ask for, checked and turned into pxfs terms: names, capacity ranges, the
StorageClass parameters, volume capabilities."""

from __future__ import annotations

from typing import Any

import blake3
import grpc

from pxfs.cluster.admin import MIN_SIZE
from pxfs.csi import csi_pb2 as pb
from pxfs.csi.errors import CsiError, invalid
from pxfs.errors import PxfsError
from pxfs.paths import is_name
from pxfs.sizes import parse_size

DEFAULT_SIZE = 1 << 30  # a CreateVolume with no capacity range
MiB = 1 << 20
Mode = pb.VolumeCapability.AccessMode
# A pxfs volume is a shared filesystem: every access mode works, read-only ones mount ro.
MODES = {Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY,
         Mode.MULTI_NODE_SINGLE_WRITER, Mode.MULTI_NODE_MULTI_WRITER, Mode.SINGLE_NODE_SINGLE_WRITER,
         Mode.SINGLE_NODE_MULTI_WRITER}
READ_ONLY_MODES = {Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY}
FS_TYPES = {"", "pxfs", "fuse.pxfs"}
# Kubernetes' external-provisioner adds these (--extra-create-metadata): informational only.
K8S_PREFIX = "csi.storage.k8s.io/"


def pxfs_name(csi_name: str) -> str:
    """A CSI name (up to 128 bytes of anything) as a pxfs name: itself when it is one, else a
    stable digest, so that the same name always finds the same volume or snapshot."""
    if is_name(csi_name):
        return csi_name
    return "csi-" + blake3.blake3(csi_name.encode()).hexdigest()[:32]


def capacity(rng: Any, default: int = DEFAULT_SIZE) -> tuple[int, int, int]:
    """(size to create, required, limit) from a CapacityRange; sizes are whole MiB, at least 1 MiB."""
    required, limit = int(rng.required_bytes), int(rng.limit_bytes)
    if required < 0 or limit < 0:
        raise invalid(f"capacity_range {required}-{limit}: negative")
    if limit and required > limit:
        raise invalid(f"capacity_range: required_bytes {required} exceeds limit_bytes {limit}")
    size = required or (min(default, limit) if limit else default)
    size = max(MIN_SIZE, -(-size // MiB) * MiB)
    if limit and size > limit:
        raise CsiError(grpc.StatusCode.OUT_OF_RANGE, f"capacity_range: pxfs sizes are whole MiB from 1 MiB; "
                       f"none lies in {required}-{limit}")
    return size, required, limit


def fits(size: int, required: int, limit: int) -> bool:
    return size >= required and (not limit or size <= limit)


def volume_parameters(params: dict[str, str]) -> tuple[int, int, dict[str, str], int]:
    """(repl, block size, labels, min replicas) from StorageClass parameters ``repl``, ``blockSize``,
    ``labels`` (``k=v,k2=v2``) and ``minReplicas``; anything else is refused by name."""
    repl, block, labels, min_replicas = 1, 0, {}, 1
    for key, value in params.items():
        try:
            if key == "repl":
                repl = int(value)
            elif key == "blockSize":
                block = parse_size(value, "parameter blockSize")
            elif key == "minReplicas":
                min_replicas = int(value)
            elif key == "labels":
                for item in filter(None, (x.strip() for x in value.split(","))):
                    k, sep, v = item.partition("=")
                    if not sep or not k:
                        raise invalid(f"parameter labels {value!r}: expected KEY=VALUE[,KEY=VALUE]")
                    labels[k] = v
            elif key.startswith(K8S_PREFIX):
                continue
            else:
                raise invalid(f"parameter {key!r}: unknown (pxfs takes repl, blockSize, labels, minReplicas)")
        except ValueError:
            raise invalid(f"parameter {key}={value!r}: expected a whole number") from None
        except PxfsError as err:
            raise invalid(str(err)) from None
    return repl, block, labels, min_replicas


def check_capability(cap: Any) -> str:
    """'' when pxfs can serve the capability, else why not."""
    if cap.WhichOneof("access_type") == "block":
        return "block access: a pxfs volume is a filesystem (use a mount capability)"
    if cap.WhichOneof("access_type") is None:
        return "no access type (mount or block)"
    if cap.mount.fs_type not in FS_TYPES:
        return f"fs_type {cap.mount.fs_type!r}: a pxfs volume is fuse.pxfs"
    if cap.access_mode.mode not in MODES:
        return f"access mode {Mode.Mode.Name(cap.access_mode.mode)}: not supported"
    return ""


def check_capabilities(caps: Any) -> None:
    if not caps:
        raise invalid("volume_capabilities: missing")
    for cap in caps:
        why = check_capability(cap)
        if why:
            raise invalid(f"volume capability: {why}")
