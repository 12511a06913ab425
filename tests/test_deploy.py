"""deploy/kubernetes: well-formed YAML, the objects a CSI driver needs, one driver name throughout,
and pxfs command lines the CLI accepts (a typo there would only show in a real cluster)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from pxfs.cli.main import build_parser
from pxfs.csi import NAME

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


def documents() -> list[dict[str, Any]]:
    docs = []
    for f in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            assert isinstance(doc, dict), f"{f.name}: a document that is not a mapping"
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), f.name
            docs.append(doc)
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def test_manifests_are_well_formed_and_complete() -> None:
    kinds = {d["kind"] for d in documents()}
    assert {"CSIDriver", "StorageClass", "VolumeSnapshotClass", "DaemonSet", "Deployment", "ServiceAccount",
            "ClusterRole", "ClusterRoleBinding", "Namespace"} <= kinds
    assert by_kind("CSIDriver")[0]["metadata"]["name"] == NAME
    assert by_kind("StorageClass")[0]["provisioner"] == NAME
    assert by_kind("StorageClass")[0]["allowVolumeExpansion"] is True
    assert by_kind("VolumeSnapshotClass")[0]["driver"] == NAME


def _containers(kind: str) -> dict[str, dict[str, Any]]:
    (workload,) = by_kind(kind)
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


def _pxfs_argv(container: dict[str, Any]) -> list[str]:
    if container.get("command"):  # the node's restart loop: the pxfs line inside the shell script
        script = container["args"][0]
        start = script.index("pxfs csi")
        line = script[start:script.index(";", start)]
        return shlex.split(line.replace('"$NODE_NAME"', "n1"))[1:]
    return [a.replace("$(NODE_NAME)", "n1") for a in container["args"]]


def test_pxfs_command_lines_parse_and_sidecars_share_the_socket() -> None:
    for kind, service in (("Deployment", "--controller"), ("DaemonSet", "--node")):
        containers = _containers(kind)
        argv = _pxfs_argv(containers["pxfs"])
        args = build_parser().parse_args(argv)
        assert args.command == "csi" and service in argv
        socket = args.endpoint.removeprefix("unix://")
        mounts = {m["mountPath"]: m["name"] for m in containers["pxfs"]["volumeMounts"]}
        assert mounts[str(Path(socket).parent)] == "socket-dir"
        for name, c in containers.items():
            if name == "pxfs":
                continue
            assert f"--csi-address={socket}" in c["args"], name
            assert any(m["name"] == "socket-dir" for m in c["volumeMounts"]), name
    node = _containers("DaemonSet")["pxfs"]
    assert node["securityContext"]["privileged"] is True
    kubelet = [m for m in node["volumeMounts"] if m["mountPath"] == "/var/lib/kubelet"]
    assert kubelet and kubelet[0]["mountPropagation"] == "Bidirectional"
