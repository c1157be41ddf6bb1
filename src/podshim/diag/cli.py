"""``podshim diag``: talk to live podshim shims (hcsshim's ``shimdiag``, for Linux pods).

Shims are found in the registry (:mod:`podshim.diag.registry`) only; a pod is named by a
unique prefix of its id (``<namespace>/<prefix>`` narrows to a namespace). An unknown or
ambiguous pod id exits 2; an error from the shim exits 1; ``exec`` exits with the remote
process's status.

Imports only the standard library at module level: ``podshim --help`` builds this
parser.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from podshim.api.diag.v1 import diag_pb2 as pb
    from podshim.diag.registry import Entry

    M = TypeVar("M", bound=Message)

#: deadline of every call but ``exec``
CALL_TIMEOUT = 30.0
#: deadline of the per-shim task count ``list`` shows
LIST_TIMEOUT = 5.0

DESCRIPTION = (
    "Inspect live podshim shims: list them, run a command inside a pod's namespaces and "
    "cgroup (no container image needed), dump the shim's stacks, show its own view of its "
    "tasks, share a path, read statistics. Pods are named by a unique prefix of their id."
)


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``podshim diag`` (the top-level CLI calls this)."""
    p.add_argument("--address", default="", help="only shims of the containerd at this address")
    p.add_argument("-n", "--namespace", default="", help="only shims of this namespace")
    sub = p.add_subparsers(dest="diag_command", metavar="SUBCOMMAND", required=True)

    def add(name: str, help: str, run: Callable[[argparse.Namespace], int]) -> Any:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(diag_run=run)
        return sp

    sp = add("list", "list every live podshim shim", _list)
    sp.add_argument("--json", action="store_true", help="JSON instead of a table")
    sp = add("exec", "run a command in a pod's host: its namespaces and sandbox cgroup, or its VM", _exec)
    sp.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    sp.add_argument("pod", help="pod id (unique prefix)")
    sp.add_argument("command", nargs=argparse.REMAINDER, help="-- command [args...]")
    sp = add("stacks", "dump the shim's asyncio task and thread stacks", _stacks)
    sp.add_argument("pod", help="pod id (unique prefix)")
    sp = add("tasks", "the shim's own view of its tasks", _tasks)
    sp.add_argument("--execs", action="store_true", help="include exec processes")
    sp.add_argument("--json", action="store_true", help="JSON instead of a table")
    sp.add_argument("pod", help="pod id (unique prefix)")
    sp = add("share", "make a host path visible in the pod", _share)
    sp.add_argument("--ro", action="store_true", help="read-only")
    sp.add_argument("--container", default="", metavar="ID",
                    help="into this running container (id or unique prefix) of the pod")  # fmt: skip
    sp.add_argument("pod", help="pod id (unique prefix)")
    sp.add_argument("host_path")
    sp.add_argument("pod_path")
    sp = add("stats", "per-task statistics (the sandbox's are the whole pod's)", _stats)
    sp.add_argument("--json", action="store_true", help="JSON instead of a table")
    sp.add_argument("pod", help="pod id (unique prefix)")
    sp = add("pid", "the shim's pid", _pid)
    sp.add_argument("pod", help="pod id (unique prefix)")


def run(args: argparse.Namespace) -> int:
    """Run the ``podshim diag`` subcommand; errors become a message and an exit code."""
    from podshim import errors as errdefs
    from podshim.diag.registry import AmbiguousShim, NoShim

    handler: Callable[[argparse.Namespace], int] = args.diag_run
    try:
        return handler(args)
    except (NoShim, AmbiguousShim) as exc:
        print(f"podshim diag: {exc}", file=sys.stderr)
        return 2
    except errdefs.ShimError as exc:
        kind = exc.code.name.lower().replace("_", " ")
        print(f"podshim diag: {args.diag_command}: {kind}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the registry is root's only
        print(f"podshim diag: {args.diag_command}: {exc}", file=sys.stderr)
        return 1


# -- helpers --------------------------------------------------------------------------------


def find(args: argparse.Namespace) -> Entry:
    from podshim.diag.registry import Registry

    return Registry().find(args.pod, address=args.address, namespace=args.namespace)


async def call(
    entry: Entry, method: str, req: Message, resp_type: type[M], timeout: float | None
) -> M:
    from podshim.diag.service import SERVICE
    from podshim.ttrpc.client import Client

    async with Client(entry.socket) as client:
        return await client.call(SERVICE, method, req, resp_type, timeout=timeout)


def call_sync(entry: Entry, method: str, req: Message, resp_type: type[M]) -> M:
    return asyncio.run(call(entry, method, req, resp_type, CALL_TIMEOUT))


def table(rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns two spaces apart (the first row is the header)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def to_dict(message: Message) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


# -- subcommands ----------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    from podshim.api.diag.v1 import diag_pb2 as pb
    from podshim.diag.registry import Registry, narrow

    entries = narrow(Registry().entries(), address=args.address, namespace=args.namespace)

    async def count(e: Entry) -> int | None:
        try:
            resp = await call(e, "Tasks", pb.TasksRequest(), pb.TasksResponse, LIST_TIMEOUT)
        except Exception:
            return None  # gone meanwhile, or stuck: the listing goes on
        return len(resp.tasks)

    async def counts() -> list[int | None]:
        return list(await asyncio.gather(*(count(e) for e in entries)))

    tasks = asyncio.run(counts()) if entries else []
    if args.json:
        out = [
            {**dataclasses.asdict(e), "name": e.name, "tasks": n}
            for e, n in zip(entries, tasks, strict=True)
        ]
        print(json.dumps(out, indent=2))
        return 0
    rows: list[list[object]] = [["NAMESPACE", "POD", "PID", "TASKS"]]
    for e, n in zip(entries, tasks, strict=True):
        rows.append([e.namespace, e.name, e.pid, "?" if n is None else n])
    print(table(rows))
    return 0


def _exec(args: argparse.Namespace) -> int:
    from podshim.diag.execcli import exec_in_pod

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("podshim diag exec: no command (podshim diag exec POD -- CMD...)", file=sys.stderr)
        return 2
    return exec_in_pod(find(args), command, tty=args.tty)


def _stacks(args: argparse.Namespace) -> int:
    from podshim.api.diag.v1 import diag_pb2 as pb

    resp = call_sync(find(args), "Stacks", pb.StacksRequest(), pb.StacksResponse)
    sys.stdout.write(resp.stacks)
    if resp.host_stacks:
        sys.stdout.write(f"\n=== pod host ===\n{resp.host_stacks}")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from podshim.api.diag.v1 import diag_pb2 as pb

    req = pb.TasksRequest(execs=args.execs)
    resp = call_sync(find(args), "Tasks", req, pb.TasksResponse)
    if args.json:
        print(json.dumps(to_dict(resp)["tasks"], indent=2))
        return 0
    rows: list[list[object]] = [["ID", "KIND", "STATE", "PID", "EXIT"]]
    for t in resp.tasks:
        rows.append([t.id, t.kind, t.state, t.pid, _exit(t.state, t.exit_status)])
        for x in t.execs:
            rows.append([f"  exec {x.id}", "exec", x.state, x.pid, _exit(x.state, x.exit_status)])
    print(table(rows))
    for t in resp.tasks:
        if t.host:
            print(f"host of {t.id}: " + " ".join(f"{k}={v}" for k, v in sorted(t.host.items())))
    return 0


def _exit(state: str, status: int) -> object:
    return status if state == "stopped" else "-"


def _share(args: argparse.Namespace) -> int:
    from podshim.api.diag.v1 import diag_pb2 as pb

    req = pb.ShareRequest(host_path=args.host_path, pod_path=args.pod_path, read_only=args.ro,
                          container=args.container)  # fmt: skip
    call_sync(find(args), "Share", req, pb.ShareResponse)
    return 0


def _pid(args: argparse.Namespace) -> int:
    from podshim.api.diag.v1 import diag_pb2 as pb

    print(call_sync(find(args), "Pid", pb.PidRequest(), pb.PidResponse).pid)
    return 0


def _stats(args: argparse.Namespace) -> int:
    from podshim.api.diag.v1 import diag_pb2 as pb

    entry = find(args)
    resp = call_sync(entry, "Stats", pb.StatsRequest(), pb.StatsResponse)
    if args.json:
        print(json.dumps(stats_json(resp), indent=2))
        return 0
    kinds = {
        t.id: t.kind for t in call_sync(entry, "Tasks", pb.TasksRequest(), pb.TasksResponse).tasks
    }
    rows: list[list[object]] = [["TASK", "KIND", "CPU(s)", "MEMORY(MiB)", "PIDS"]]
    for t in resp.tasks:  # a sandbox's line is its whole pod's
        rows.append([t.id, kinds.get(t.id, "?"), *summary(t.stats)])
    if resp.HasField("stats") and "sandbox" not in (kinds.get(t.id) for t in resp.tasks):
        rows.append(["(total)", "-", *summary(resp.stats)])
    print(table(rows))
    return 0


def stats_json(resp: pb.StatsResponse) -> dict[str, Any]:
    """``{"pod": {type, metrics} | null, "tasks": [{id, type, metrics}]}``."""
    from podshim.cgroups.stats import unpack

    def one(payload: Any) -> dict[str, Any]:
        return {"type": payload.type_url, "metrics": to_dict(unpack(payload))}

    return {
        "pod": one(resp.stats) if resp.HasField("stats") else None,
        "tasks": [{"id": t.id, **one(t.stats)} for t in resp.tasks],
    }


def summary(payload: Any) -> tuple[str, str, str]:
    """CPU seconds, memory MiB and pids of a v1 or v2 Metrics ``Any``."""
    from podshim.api.cgroups.v1 import metrics_pb2 as v1
    from podshim.cgroups.stats import unpack

    m = unpack(payload)
    if isinstance(m, v1.Metrics):
        cpu, mem = m.cpu.usage.total / 1e9, m.memory.usage.usage
    else:
        cpu, mem = m.cpu.usage_usec / 1e6, m.memory.usage
    return f"{cpu:.2f}", f"{mem / (1 << 20):.1f}", str(m.pids.current)
