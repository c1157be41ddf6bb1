"""The pod part of ``podshim demo``: a Kubernetes-style pod through the real CRI plugin.

Runs a pod with two containers on a CNI bridge network through containerd's CRI with the
``podshim`` runtime handler, and prints what a platform engineer would check: the pod's
address and hostname, the containers sharing the pod's network/IPC/UTS namespaces (and
not the host's), the sandbox pid CRI shows (podshim's anchor, a zombie with no
namespaces of its own), and that no pause process exists. Then stops and removes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from podshim_lab import Containerd, wait_for
from podshim_lab.cri import api_pb2 as api
from podshim_lab.cri.client import CriClient, ExecResult
from podshim_lab.procfs import process_table, read_stat

HANDLER = "podshim"


class PodDemoError(Exception):
    pass


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise PodDemoError(what)


def show_pod(lab: Containerd, say: Callable[[str], None]) -> None:
    """Run, inspect, stop and remove one pod; raises PodDemoError on a wrong answer."""
    lab.ensure_pause()
    image = lab.ensure_busybox(namespace="k8s.io")
    with CriClient(lab.address) as cri:
        cfg = cri.pod_config(
            "demo", "default", "demo-uid", hostname="demo-pod",
            sysctls={"net.ipv4.ip_unprivileged_port_start": "80", "kernel.shmmni": "1024"},
        )  # fmt: skip
        pod = cri.run_pod_config(cfg, HANDLER)
        try:
            _inspect(lab, cri, pod, cfg, image, say)
        finally:
            cri.stop_pod(pod)
            cri.remove_pod(pod)
        say("StopPodSandbox + RemovePodSandbox done")
        wait_for(lambda: not [d for d in lab.descendants() if d[2] != "podshim-zygote"], 30,
                 message="pod processes to go")  # fmt: skip
        say("the pod's shim, containers and anchor are gone")


def _inspect(
    lab: Containerd,
    cri: CriClient,
    pod: str,
    cfg: api.PodSandboxConfig,
    image: str,
    say: Callable[[str], None],
) -> None:
    st = cri.pod_status(pod)
    say(f"RunPodSandbox -> pod {pod[:12]} {st.state}, IP {st.ip}, sandbox pid {st.pid}")
    web = cri.create_container(pod, cfg, "web", image, ["httpd", "-f", "-p", "8080", "-h", "/etc"])
    cri.start_container(web)
    client = cri.create_container(pod, cfg, "client", image, ["sleep", "3600"])
    cri.start_container(client)
    pids = {name: cri.container_status(cid).pid for name, cid in (("web", web), ("client", client))}
    say(f"containers: web (httpd, pid {pids['web']}), client (sleep, pid {pids['client']})")

    def fetch() -> ExecResult | None:
        r = cri.exec_sync(client, ["wget", "-O-", "http://127.0.0.1:8080/hostname"])
        return r if r.exit_code == 0 else None

    got = wait_for(fetch, 30, message="the client to reach the web container on localhost")
    say(f"client -> web on localhost:8080: {got.stdout.strip()!r} (the pod hostname file)")
    host = cri.exec_sync(client, ["hostname"]).stdout.strip()
    _check(host == "demo-pod", f"hostname is {host!r}")
    sysctl = cri.exec_sync(
        web, ["cat", "/proc/sys/kernel/shmmni", "/proc/sys/net/ipv4/ip_unprivileged_port_start"]
    ).stdout.split()
    _check(sysctl == ["1024", "80"], f"sysctls read {sysctl}")
    say(
        "ExecSync: hostname 'demo-pod'; sysctls kernel.shmmni=1024, net.ipv4.ip_unprivileged_port_start=80"
    )
    me = os.getpid()
    for kind in ("net", "ipc", "uts"):
        a, b = _ns(pids["web"], kind), _ns(pids["client"], kind)
        _check(a == b and a != _ns(me, kind), f"{kind}: {a} vs {b}")
        say(f"  {kind:<4} namespace shared by both containers: {a} (host: {_ns(me, kind)})")
    anchor = read_stat(st.pid)
    _check(anchor is not None and anchor.state == "Z", f"sandbox pid {st.pid} is not the anchor")
    _check(not os.path.exists(f"/proc/{st.pid}/ns/net"), "the anchor has a network namespace")
    say(
        f"sandbox pid {st.pid}: a zombie under the shim (pid {anchor.ppid if anchor else '?'}); /proc/{st.pid}/ns/net does not exist"
    )
    shim = anchor.ppid if anchor else 0
    kids = sorted((p.pid, p.comm, p.state) for p in process_table().values() if p.ppid == shim)
    say(f"children of the pod's shim: {kids} -- no pause process")
    _check(all(c != "pause" for _, c, _ in kids), "a pause process exists")
