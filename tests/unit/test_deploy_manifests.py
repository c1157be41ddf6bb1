"""``deploy/``: every manifest validates strictly against the Kubernetes API schema
(``kubernetes-validate --strict``, its bundled schemas, offline: an unknown field is an
error), and the manifests agree with podshim: the RuntimeClasses' handlers are the ones
``podshim install`` registers (``podshim-sb`` on containerd 2.x only), their node
selectors are the labels the installer sets, and the DaemonSets' command lines are ones ``podshim node-install`` parses,
running the bundle where the Containerfile puts it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from podshim import cli
from podshim.admin import install, node
from podshim.admin.ctdconfig import ContainerdBinary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
VALIDATE = str(Path(sys.executable).parent / "kubernetes-validate")


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VALIDATE, "--strict", "--no-warn", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _docs(name: str) -> list[dict[str, Any]]:
    with open(DEPLOY / name) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in _docs(p.name) if d["kind"] == kind]


def test_there_are_manifests() -> None:
    names = {p.name for p in MANIFESTS}
    assert {"runtimeclasses.yaml", "podshim-installer.yaml", "example-pod.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_validates_strictly(path: Path) -> None:
    res = _validate(path)
    assert res.returncode == 0, res.stdout + res.stderr
    # every document of the file was checked (one "passed" line each)
    assert res.stdout.count(" passed for resource ") == len(_docs(path.name)), res.stdout


def test_the_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The check above can fail: the same RuntimeClasses with one unknown field do not
    validate (``--strict``), nor does a field of the wrong type."""
    text = (DEPLOY / "runtimeclasses.yaml").read_text()
    bad = tmp_path / "unknown.yaml"
    bad.write_text(text.replace("scheduling:\n", "scheduling:\n  tolerate: all\n", 1))
    res = _validate(bad)
    assert res.returncode != 0 and "'tolerate' was unexpected" in res.stdout, res.stdout
    typed = tmp_path / "typed.yaml"
    typed.write_text(text.replace("handler: podshim-node", "handler: [podshim-node]", 1))
    assert _validate(typed).returncode != 0


def test_runtimeclasses_name_podshims_handlers() -> None:
    classes = {d["metadata"]["name"]: d for d in _kind("RuntimeClass")}
    v1 = ContainerdBinary("containerd", (1, 7, 24), "")
    v2 = ContainerdBinary("containerd", (2, 1, 9), "")
    registered = {*install.handlers(v1, proxy=False), *install.handlers(v2, proxy=True)}
    assert {d["handler"] for d in classes.values()} == registered
    only_2x = set(install.handlers(v2, proxy=True)) - set(install.handlers(v1, proxy=False))
    assert only_2x == {install.SANDBOX_HANDLER}
    for name, rc in classes.items():
        assert rc["handler"] == name
        selector = rc["scheduling"]["nodeSelector"]
        assert selector[node.LABEL] == "true", name
        # the installer sets this label where the host's check found podshim-sb
        assert (selector.get(node.SANDBOX_LABEL) == "true") is (name in only_2x), name
        fixed = rc["overhead"]["podFixed"]
        assert set(fixed) == {"cpu", "memory"} and re.fullmatch(r"\d+Mi", fixed["memory"])
    # a node daemon serves many pods: its per-pod overhead is below a pod shim's
    per_pod = {n: int(rc["overhead"]["podFixed"]["memory"][:-2]) for n, rc in classes.items()}
    assert per_pod["podshim-node"] < per_pod["podshim"] == per_pod["podshim-sb"]


def test_the_example_pod_uses_a_runtimeclass() -> None:
    (pod,) = _kind("Pod")
    assert pod["spec"]["runtimeClassName"] in {d["metadata"]["name"] for d in _kind("RuntimeClass")}


def _daemonsets() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _kind("DaemonSet")}


@pytest.mark.parametrize("name", ["podshim-installer", "podshim-cleanup"])
def test_daemonset_runs_node_install(name: str) -> None:
    ds = _daemonsets()[name]
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True  # nsenter -t 1
    (container,) = spec["containers"]
    assert container["securityContext"]["privileged"] is True
    command = container["command"]
    bundle = re.search(r"COPY --from=build (\S+) (\S+)", (DEPLOY / "Containerfile").read_text())
    assert bundle is not None and bundle.group(1) == bundle.group(2)
    assert command == [f"{bundle.group(2)}/bin/podshim", "node-install"]
    args = cli.build_parser().parse_args([*command[1:], *container["args"]])
    assert args.cleanup is (name == "podshim-cleanup")
    assert args.wait and args.restart and args.label_node == "$(NODE_NAME)"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # the prefix is reached through a hostPath mounted at its place under --host-root
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    local = f"{args.host_root.rstrip('/')}{args.prefix}"
    assert any(
        local.startswith(mounts[v] + "/") and args.prefix.startswith(volumes[v] + "/")
        for v in mounts
    ), (mounts, volumes, local)
    assert spec["serviceAccountName"] in {d["metadata"]["name"] for d in _kind("ServiceAccount")}


def test_the_installer_may_patch_nodes_only() -> None:
    (role,) = _kind("ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    (binding,) = _kind("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
