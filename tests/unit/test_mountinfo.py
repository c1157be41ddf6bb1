"""The one mountinfo parser."""

from __future__ import annotations

from podshim import mountinfo

TEXT = (
    "36 25 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:14 - cgroup cgroup rw,cpu,cpuacct\n"
    "40 25 0:35 /k8s.io /run/with\\040space rw - cgroup2 cgroup2 rw,nsdelegate\n"
    "this line is not mountinfo\n"
)


def test_parse_unescapes_paths_and_skips_malformed_lines() -> None:
    got = mountinfo.parse(TEXT)
    assert [(m.dev, m.root, m.mountpoint, m.fstype) for m in got] == [
        ("0:31", "/", "/sys/fs/cgroup/cpu,cpuacct", "cgroup"),
        ("0:35", "/k8s.io", "/run/with space", "cgroup2"),
    ]
    assert got[0].super_options == ("rw", "cpu", "cpuacct")


def test_this_process_sees_its_root_mount() -> None:
    assert any(m.mountpoint == "/" for m in mountinfo.read())
