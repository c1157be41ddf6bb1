"""A container of a utility-VM pod: runc in the guest, driven through the agent.

(Work in progress: the entry point's signature is final; the task lands next.)
"""

from __future__ import annotations

from dataclasses import dataclass

from podshim import errors as errdefs
from podshim.host.contract import Workload, WorkloadRequest
from podshim.host.uvm.agentapi import GUEST_SHARE, AgentApi
from podshim.oci.spec import Spec
from podshim.task.contract import ShimContext

#: where runc keeps its state in the guest
RUNC_ROOT = "/run/runc"


@dataclass(frozen=True, slots=True)
class GuestLayout:
    """Guest paths the workload composes (tests running the agent on the host change
    them so nothing touches the host's own runc root or cgroups)."""

    runc_root: str = RUNC_ROOT
    #: the guest's cgroup2 mount
    cgroup_root: str = "/sys/fs/cgroup"
    #: the parent of every container's cgroup (cgroupsPath = <parent>/<cid>)
    cgroup_parent: str = "/podshim"


async def create_guest_container(
    ctx: ShimContext,
    req: WorkloadRequest,
    agent: AgentApi,
    *,
    share_dir: str,
    guest_share: str = GUEST_SHARE,
    sandbox_spec: Spec,
    runc: str = "runc",
    layout: GuestLayout = GuestLayout(),
) -> Workload:
    """Make and create (not start) the workload ``req`` in the VM whose agent is
    ``agent``; /tasks/create is published when it returns."""
    raise errdefs.NotImplemented("guest containers: not yet")
