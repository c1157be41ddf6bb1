"""The guest initramfs writer: newc cpio archives, parsed back here byte by byte."""

from __future__ import annotations

import io
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from podshim import errors as errdefs
from podshim.host.uvm.agentapi import GUEST_TOOLS
from podshim.host.uvm.guest import initramfs


@dataclass
class Member:
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    data: bytes


def parse(raw: bytes) -> list[Member]:
    """A newc reader, independent of the writer: checks magic, alignment and the end."""
    out: list[Member] = []
    pos = 0
    while True:
        assert pos % 4 == 0
        assert raw[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(raw[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size = fields[:7]
        namesize, check = fields[11], fields[12]
        assert check == 0
        name_end = pos + 110 + namesize
        assert raw[name_end - 1] == 0
        name = raw[pos + 110 : name_end - 1].decode()
        data_start = name_end + (-name_end % 4)
        data = raw[data_start : data_start + size]
        pos = data_start + size + (-(data_start + size) % 4)
        if name == "TRAILER!!!":
            assert len(raw) % 512 == 0
            assert raw[pos:] == b"\0" * (len(raw) - pos)
            return out
        out.append(Member(name, ino, mode, uid, gid, nlink, mtime, data))


def _bytes(a: initramfs.Archive) -> bytes:
    buf = io.BytesIO()
    n = a.write(buf)
    assert n == len(buf.getvalue())
    return buf.getvalue()


def test_entries_round_trip() -> None:
    a = initramfs.Archive()
    a.file("/etc/x/hello", b"hello\n", mode=0o640)
    a.file("odd", b"12345")  # lengths that need padding
    a.symlink("/lib", "usr/lib")
    a.directory("/tmp", 0o1777)
    a.directory("/etc")  # again: a no-op
    members = {m.name: m for m in parse(_bytes(a))}
    assert list(members) == ["etc", "etc/x", "etc/x/hello", "odd", "lib", "tmp"]
    assert members["etc"].mode == stat.S_IFDIR | 0o755
    assert members["etc/x/hello"].mode == stat.S_IFREG | 0o640
    assert members["etc/x/hello"].data == b"hello\n"
    assert members["odd"].data == b"12345"
    assert members["lib"].mode == stat.S_IFLNK | 0o777
    assert members["lib"].data == b"usr/lib"
    assert members["tmp"].mode == stat.S_IFDIR | 0o1777
    assert {(m.uid, m.gid, m.mtime, m.nlink) for m in members.values()} == {(0, 0, 0, 1)}
    assert len({m.ino for m in members.values()}) == len(members)


def test_hard_links() -> None:
    a = initramfs.Archive()
    a.file("/bin/prog", b"x" * 1001, mode=0o755)
    a.file("/other", b"o")
    a.hardlink("/sbin/prog2", "/bin/prog")
    a.hardlink("/prog3", "/bin/prog")
    members = {m.name: m for m in parse(_bytes(a))}
    first, second, third = members["bin/prog"], members["sbin/prog2"], members["prog3"]
    assert first.ino == second.ino == third.ino != members["other"].ino
    assert first.nlink == second.nlink == third.nlink == 3
    assert second.mode == third.mode == stat.S_IFREG | 0o755
    # the data goes once, with the first name (the kernel links the others to it)
    assert first.data == b"x" * 1001 and second.data == third.data == b""
    with pytest.raises(errdefs.NotFound):
        a.hardlink("/x", "/nonexistent")
    with pytest.raises(errdefs.NotFound):
        a.hardlink("/y", "/bin")  # a directory


def test_host_files_same_inode_become_links(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    os.link(tmp_path / "f", tmp_path / "g")
    a = initramfs.Archive()
    a.host_file("/a", str(tmp_path / "f"))
    a.host_file("/b", str(tmp_path / "g"), mode=0o700)
    a.host_file("/c", str(tmp_path / "f"))
    (tmp_path / "f").write_bytes(b"later")  # read when written, not when added
    members = {m.name: m for m in parse(_bytes(a))}
    assert members["a"].data == b"later"
    assert members["a"].ino == members["b"].ino == members["c"].ino
    assert members["a"].nlink == 3


def test_duplicates_and_bad_names() -> None:
    a = initramfs.Archive()
    a.file("/f", b"")
    with pytest.raises(errdefs.AlreadyExists):
        a.file("/f", b"again")
    with pytest.raises(errdefs.AlreadyExists):
        a.directory("/f")
    for bad in ("/", "", "."):
        with pytest.raises(errdefs.InvalidArgument):
            a.file(bad, b"")


def test_host_path_follows_symlinks(tmp_path: Path) -> None:
    # a merged-/usr tree: /lib -> usr/lib, /lib64 -> usr/lib64 whose loader is an
    # absolute link into /lib/...
    (tmp_path / "usr/lib/arch").mkdir(parents=True)
    (tmp_path / "usr/lib64").mkdir(parents=True)
    (tmp_path / "usr/lib/arch/libc.so.6.real").write_bytes(b"libc")
    (tmp_path / "usr/lib/arch/libc.so.6").symlink_to("libc.so.6.real")
    (tmp_path / "usr/lib/arch/ld.so").write_bytes(b"loader")
    (tmp_path / "lib").symlink_to("usr/lib")
    (tmp_path / "lib64").symlink_to("usr/lib64")
    (tmp_path / "usr/lib64/ld.so").symlink_to("/lib/arch/ld.so")
    a = initramfs.Archive()
    a.host_path("/lib/arch/libc.so.6", root=str(tmp_path))
    a.host_path("/lib64/ld.so", root=str(tmp_path))
    members = {m.name: m for m in parse(_bytes(a))}
    assert members["lib"].data == b"usr/lib"
    assert members["usr/lib/arch/libc.so.6"].data == b"libc.so.6.real"
    assert members["usr/lib/arch/libc.so.6.real"].data == b"libc"
    assert members["lib64"].data == b"usr/lib64"
    assert members["usr/lib64/ld.so"].data == b"/lib/arch/ld.so"
    assert members["usr/lib/arch/ld.so"].data == b"loader"
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(errdefs.InvalidArgument, match="symlinks"):
        a.host_path("/loop/x", root=str(tmp_path))


@pytest.mark.skipif(shutil.which("ldd") is None, reason="no ldd")
def test_build_initrd(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    agent.write_bytes(b"\x7fELF agent")
    runc = shutil.which("runc") or "/usr/sbin/runc"
    if not os.path.isfile(runc):
        pytest.skip("runc not installed")
    out = tmp_path / "initrd"
    size = initramfs.build_initrd(str(out), str(agent), runc=runc)
    raw = out.read_bytes()
    assert size == len(raw)
    members = {m.name: m for m in parse(raw)}
    assert members["init"].data == b"\x7fELF agent"
    assert members["init"].mode == stat.S_IFREG | 0o755
    assert members["usr/sbin/runc"].data == Path(runc).read_bytes()
    for d in ("proc", "sys", "dev", "run", "etc", "tmp"):
        assert stat.S_ISDIR(members[d].mode), d
    assert members["tmp"].mode & 0o7777 == 0o1777
    assert members["etc/passwd"].data.startswith(b"root:x:0:0:")
    libs = initramfs.shared_libraries(runc)
    assert any("libc.so" in lib for lib in libs)
    for lib in libs:
        # every library resolves inside the archive to a regular file with its contents
        real = os.path.realpath(lib).lstrip("/")
        assert members[real].data == Path(lib).read_bytes(), lib
    assert not list(tmp_path.glob("initrd.tmp.*"))
    # the debugging tools: the static busybox and its applets in /usr/bin
    assert members["usr/bin/busybox"].data == Path(initramfs.BUSYBOX).read_bytes()
    for tool in ("sh", "uname", "cat", "ps", "ip"):
        assert members[f"usr/bin/{tool}"].mode == stat.S_IFLNK | 0o777, tool
        assert members[f"usr/bin/{tool}"].data == b"busybox", tool


@pytest.mark.skipif(shutil.which("ldd") is None, reason="no ldd")
def test_build_initrd_with_a_tools_dir(tmp_path: Path) -> None:
    """runc, its libraries and busybox go to the tools directory; the initrd links there."""
    agent = tmp_path / "agent"
    agent.write_bytes(b"\x7fELF agent")
    runc = shutil.which("runc") or "/usr/sbin/runc"
    if not os.path.isfile(runc) or not os.path.isfile(initramfs.BUSYBOX):
        pytest.skip("runc or busybox-static not installed")
    link = tmp_path / "tools"
    out = tmp_path / "initrd"
    size = initramfs.build_initrd(str(out), str(agent), runc=runc, tools=str(link))
    assert size < 2 << 20  # the agent and links, not runc's ~9 MB
    members = {m.name: m for m in parse(out.read_bytes())}
    assert stat.S_ISDIR(members[GUEST_TOOLS.lstrip("/")].mode)
    first = os.path.realpath(link)
    assert os.path.basename(first).startswith("tools-")
    assert members["usr/sbin/runc"].data == f"{GUEST_TOOLS}/usr/sbin/runc".encode()
    copied = Path(first, "usr/sbin/runc")
    assert copied.read_bytes() == Path(runc).read_bytes()
    assert stat.S_IMODE(copied.stat().st_mode) == 0o755
    assert members["usr/bin/busybox"].data == f"{GUEST_TOOLS}/usr/bin/busybox".encode()
    assert Path(first, "usr/bin/busybox").read_bytes() == Path(initramfs.BUSYBOX).read_bytes()
    assert members["usr/bin/sh"].data == b"busybox"
    for lib in initramfs.shared_libraries(runc):
        # the host's symlinks on the way stay in the archive; the file is a link out
        real = os.path.realpath(lib).lstrip("/")
        assert members[real].data == f"{GUEST_TOOLS}/{real}".encode(), lib
        assert Path(first, real).read_bytes() == Path(lib).read_bytes(), lib
    # the same inputs again: the same directory, reused; other contents: a new one,
    # and the old stays (a running VM may still serve from it)
    initramfs.build_initrd(str(out), str(agent), runc=runc, tools=str(link))
    assert os.path.realpath(link) == first
    other = tmp_path / "runc2"
    other.write_bytes(Path(runc).read_bytes() + b"\0")
    other.chmod(0o755)
    initramfs.build_initrd(str(out), str(agent), runc=str(other), tools=str(link))
    assert os.path.realpath(link) != first and os.path.isdir(first)
    assert sorted(p.name for p in tmp_path.glob("tools*")) == sorted(
        ["tools", os.path.basename(first), os.path.basename(os.path.realpath(link))]
    )


def test_build_initrd_refuses_a_dynamic_busybox(tmp_path: Path) -> None:
    runc = shutil.which("runc") or "/usr/sbin/runc"
    if not os.path.isfile(runc):
        pytest.skip("runc not installed")
    with pytest.raises(errdefs.FailedPrecondition, match="busybox-static"):
        initramfs.build_initrd(str(tmp_path / "i"), runc, runc=runc, busybox=runc)
    assert not list(tmp_path.iterdir())


def test_shared_libraries_of_a_static_binary(tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None or "not a dynamic" not in os.popen(f"ldd {busybox} 2>&1").read():
        pytest.skip("no static busybox")
    assert initramfs.shared_libraries(busybox) == []


def test_build_initrd_without_runc(tmp_path: Path) -> None:
    with pytest.raises(errdefs.FailedPrecondition, match="apt-get install runc"):
        initramfs.build_initrd(str(tmp_path / "i"), str(tmp_path), runc=str(tmp_path / "no"))
