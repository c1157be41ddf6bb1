"""Every Host implementation passes the same contract tests (``podshim.host.contract.Host``).

The fake and the ``none`` host run here; the namespaces host runs the same checks in
tests/unit/test_nshost.py against the real kernel (it needs root).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Awaitable, Callable

import pytest

from podshim import errors as errdefs
from podshim.host.contract import Host
from podshim.host.none import NoneHost

from .fakes import FakeHost


def namespaces_host() -> Host:
    """The real namespaces host on a minimal spec (root only; call inside a loop)."""
    from podshim.host.namespaces.host import NamespacesHost
    from podshim.linux.reaper import Reaper

    reaper = Reaper()
    reaper.start()
    spec = {"linux": {"namespaces": [{"type": "ipc"}, {"type": "uts"}]}}
    return NamespacesHost(f"contract-{secrets.token_hex(4)}", "podshim-test", spec, reaper)


HOSTS: dict[str, Callable[[], Host]] = {
    "none": NoneHost,
    "fake": FakeHost,
    "namespaces": namespaces_host,
}


@pytest.fixture(params=list(HOSTS))
def kind(request: pytest.FixtureRequest) -> str:
    k = str(request.param)
    if k == "namespaces":
        if os.geteuid() != 0:
            pytest.skip("the namespaces host needs root")
        request.applymarker(pytest.mark.integration)
    return k


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 30))


def test_wait_blocks_until_close_then_close_is_idempotent(kind: str) -> None:
    async def main() -> None:
        host = HOSTS[kind]()
        await host.create()
        waiter = asyncio.create_task(host.wait())
        await asyncio.sleep(0.05)
        assert not waiter.done()  # a host that cannot die on its own blocks
        await host.close()
        assert await waiter == 0
        await host.close()  # idempotent, never raises

    run(main)


def test_share_is_failed_precondition_when_unsupported_and_stats_optional(kind: str) -> None:
    async def main() -> None:
        host = HOSTS[kind]()
        await host.create()
        with pytest.raises(errdefs.FailedPrecondition):
            await host.share("/tmp", "/mnt", True)
        assert isinstance(await host.dump_stacks(), str)
        got = await host.stats()
        assert got is None or got.type_url
        await host.close()

    run(main)


def test_namespace_paths_are_strings_or_none(kind: str) -> None:
    async def main() -> None:
        host = HOSTS[kind]()
        await host.create()
        for t in ("network", "ipc", "uts", "pid"):
            p = await host.namespace_path(t)
            assert p is None or p.startswith("/")
        assert host.init_pid >= 0
        await host.close()

    run(main)


def test_none_host_has_no_namespaces_and_no_exec() -> None:
    async def main() -> None:
        host = NoneHost()
        await host.create()
        assert [await host.namespace_path(t) for t in ("network", "ipc", "uts", "pid")] == [
            None
        ] * 4
        with pytest.raises(errdefs.FailedPrecondition, match="nowhere to exec"):
            await host.exec_in_host(["true"], "", "", "", False)
        await host.close()

    run(main)
