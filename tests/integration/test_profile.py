"""``PODSHIM_PROFILE_DIR`` in containerd's environment: every shim daemon runs under
cProfile and leaves its statistics there when it ends (how the closing notes' profiles of
create, start, exec and delete were taken)."""

from __future__ import annotations

import pstats
from pathlib import Path
from typing import TYPE_CHECKING

from podshim_lab import wait_for

if TYPE_CHECKING:
    from tests.integration import shimutil as su
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import shimutil as su


def test_a_daemon_leaves_its_profile(tmp_path: Path) -> None:
    where = tmp_path / "prof"
    lab = su.open_lab(extra_env={"PODSHIM_PROFILE_DIR": str(where)})
    try:
        with su.containers(lab) as ids:
            ids.append("prof1")
            su.run_detached(lab, "prof1", "sleep", "1000")
            su.remove_container(lab, "prof1")  # the shim holds nothing now and exits
            files = wait_for(lambda: list(where.glob("prof1-*.prof")) or None, timeout=su.DEADLINE)
        stats = pstats.Stats(str(files[0]))
        served = {name for (_, _, name) in stats.stats}  # type: ignore[attr-defined]
        assert {"Create", "Start", "Kill", "Delete"} <= served, sorted(served)[:50]
    finally:
        su.close_lab(lab)
