"""The guest's initramfs: an uncompressed newc cpio archive, written here in Python.

No ``cpio`` (nor kmod) is needed on the machine. :class:`Archive` collects entries
(directories, files copied from the host or given as bytes, symlinks, hard links) and
writes them in the "new ASCII" format the kernel's initramfs unpacker reads
(``Documentation/driver-api/early-userspace/buffer-format.rst``): per entry a 110-byte
header of 13 hexadecimal fields, the NUL-terminated name and the data, each padded to 4
bytes; ``TRAILER!!!`` at the end. Parents are added before their children (the unpacker
creates each entry where its name says). Every entry gets owner root and mtime 0, so
the same inputs give the same bytes.

Hard links share an inode number and carry their data once, with the first name; the
kernel links the later names to it. :func:`build_initrd` lays out the guest: the agent as
``/init``, runc and the shared libraries ``ldd`` names (at their paths, with the host's
symlinks, e.g. merged-/usr's ``/lib``), the directories the agent mounts on and a
minimal ``/etc/passwd`` and ``/etc/group``. ``/dev`` stays empty: the agent mounts
devtmpfs.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from podshim import errors as errdefs
from podshim.host.uvm.agentapi import GUEST_TOOLS
from podshim.host.uvm.guest import sha256_file

__all__ = [
    "BUSYBOX", "CRUN", "DIRS", "LOADED_AGENT", "RUNC", "TOOLS", "Archive", "build_initrd",
    "install_tools", "shared_libraries",
]  # fmt: skip

RUNC = "/usr/sbin/runc"
#: the guest's default OCI runtime (config.RUNTIMES): Debian's crun, with its libraries
CRUN = "/usr/bin/crun"
#: the static busybox (Debian's busybox-static): the VM's debugging tools, for
#: ``podshim diag exec <pod> -- ...``; in the guest at /usr/bin/busybox
BUSYBOX = "/bin/busybox"
#: its applets linked in /usr/bin (those this busybox has): a shell and what one looks
#: at a VM with (processes, mounts, network, files)
TOOLS = (
    "sh", "ash", "cat", "ls", "ps", "top", "free", "uname", "dmesg", "mount", "umount",
    "df", "du", "ip", "ping", "netstat", "nslookup", "hostname", "ifconfig", "route",
    "nc", "wget", "grep", "sed", "awk", "head", "tail", "wc", "less", "find", "xargs",
    "cut", "sort", "uniq", "tr", "echo", "printf", "sleep", "kill", "env", "id", "tty",
    "stty", "stat", "date", "true", "false", "test", "mkdir", "rm", "cp", "mv", "ln",
    "chmod", "touch", "vi", "which", "sysctl", "lsof", "watch",
)  # fmt: skip
#: where the agent is when a module loader is /init (the stock kernel's image)
LOADED_AGENT = "/sbin/podshim-agent"
#: directories of the guest's root (mount points of the agent and the usual ones)
DIRS = (
    GUEST_TOOLS, "/dev", "/etc", "/mnt", "/proc", "/root", "/run", "/sys", "/tmp",
    "/usr/bin", "/usr/sbin", "/var/tmp",
)  # fmt: skip
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"
_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass
class _Entry:
    name: str  # relative, no leading "/"
    mode: int  # type and permission bits
    ino: int
    data: bytes | None = None  # file contents or symlink target
    source: str | None = None  # a host file to copy (read at write time)
    nlink: int = 1
    size: int = 0


class Archive:
    """A newc cpio archive being put together."""

    def __init__(self, *, external: bool = False) -> None:
        self._entries: dict[str, _Entry] = {}
        self._next_ino = 1
        self._by_source: dict[tuple[int, int], _Entry] = {}
        #: with ``external``, :meth:`big_file` puts files here (guest path without the
        #: leading "/" -> host file) and a symlink into GUEST_TOOLS in the archive
        self.external: dict[str, tuple[str, int | None]] | None = {} if external else None

    @staticmethod
    def _norm(path: str) -> str:
        name = posixpath.normpath("/" + path).lstrip("/")
        if not name or name == ".":
            raise errdefs.InvalidArgument(f"initramfs path {path!r}: not a name")
        return name

    def _add(self, name: str, mode: int, ino: int = 0, **kw: object) -> _Entry:
        parent = posixpath.dirname(name)
        if parent:
            self.directory(parent)
        old = self._entries.get(name)
        if old is not None:
            if stat.S_ISDIR(old.mode) and stat.S_ISDIR(mode):
                return old
            raise errdefs.AlreadyExists(f"initramfs entry /{name}")
        if not ino:
            ino = self._next_ino
            self._next_ino += 1
        entry = _Entry(name, mode, ino, **kw)  # type: ignore[arg-type]
        self._entries[name] = entry
        return entry

    def __contains__(self, path: str) -> bool:
        return self._norm(path) in self._entries

    def names(self) -> list[str]:
        """The entries' paths (with a leading "/"), in archive order."""
        return ["/" + n for n in self._entries]

    def directory(self, path: str, mode: int = 0o755) -> None:
        """A directory (and its parents); adding an existing one is a no-op."""
        self._add(self._norm(path), stat.S_IFDIR | (mode & 0o7777))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """A regular file with ``data``."""
        name = self._norm(path)
        self._add(name, stat.S_IFREG | (mode & 0o7777), data=data, size=len(data))

    def symlink(self, path: str, target: str) -> None:
        """A symbolic link to ``target`` (kept as given: relative or absolute)."""
        raw = target.encode()
        self._add(self._norm(path), stat.S_IFLNK | 0o777, data=raw, size=len(raw))

    def hardlink(self, path: str, existing: str) -> None:
        """A second name for the regular file ``existing`` (already in the archive)."""
        first = self._entries.get(self._norm(existing))
        if first is None or not stat.S_ISREG(first.mode):
            raise errdefs.NotFound(f"initramfs hard link target {existing}: no such file")
        self._add(self._norm(path), first.mode, ino=first.ino, size=0)
        links = [e for e in self._entries.values() if e.ino == first.ino]
        for e in links:
            e.nlink = len(links)

    def host_file(self, path: str, host_path: str | None = None, mode: int | None = None) -> None:
        """The host file ``host_path`` (default: ``path``), its contents read when written.

        The same host file (device and inode) added under a second name becomes a hard
        link of the first.
        """
        src = host_path or path
        st = os.stat(src)
        if not stat.S_ISREG(st.st_mode):
            raise errdefs.InvalidArgument(f"{src}: not a regular file")
        key = (st.st_dev, st.st_ino)
        first = self._by_source.get(key)
        if first is not None:
            self.hardlink(path, "/" + first.name)
            return
        perm = stat.S_IMODE(st.st_mode) if mode is None else mode
        entry = self._add(self._norm(path), stat.S_IFREG | perm, source=src, size=st.st_size)
        self._by_source[key] = entry

    def big_file(self, path: str, host_path: str, mode: int | None = None) -> None:
        """A host file a VM needs but need not hold in RAM: in an external archive a
        symlink to ``GUEST_TOOLS/path`` (the file goes to :attr:`external`), else a copy."""
        if self.external is None:
            self.host_file(path, host_path, mode)
            return
        name = self._norm(path)
        if not os.path.isfile(host_path):
            raise errdefs.InvalidArgument(f"{host_path}: not a regular file")
        self.external[name] = (host_path, mode)
        self.symlink(name, f"{GUEST_TOOLS}/{name}")

    def host_path(self, path: str, root: str = "/") -> None:
        """``path`` as the host resolves it: every symlink on the way, then the file.

        ``/lib/x86_64-linux-gnu/libc.so.6`` on a merged-/usr host adds the symlink ``/lib
        -> usr/lib`` and the file ``/usr/lib/x86_64-linux-gnu/libc.so.6``. ``root`` is
        where the host's ``/`` is (tests use a directory).
        """
        todo = self._norm(path).split("/")
        done = ""
        hops = 0
        while todo:
            part = todo.pop(0)
            current = posixpath.join(done, part) if done else part
            host = os.path.join(root, current)
            if os.path.islink(host):
                hops += 1
                if hops > 40:
                    raise errdefs.InvalidArgument(f"{path}: too many levels of symlinks")
                target = os.readlink(host)
                if current not in self._entries:
                    self.symlink(current, target)
                base = "" if target.startswith("/") else done
                resolved = posixpath.normpath(posixpath.join("/", base, target)).lstrip("/")
                todo = [p for p in resolved.split("/") if p] + todo
                done = ""
                continue
            if todo:
                if not os.path.isdir(host):
                    raise errdefs.NotFound(f"{path}: {host} is not a directory")
                self.directory(current)
            elif current not in self._entries:
                self.big_file(current, host)
            done = current

    def write(self, out: BinaryIO) -> int:
        """Write the archive to ``out``; returns the number of bytes written."""
        written = 0
        seen: set[int] = set()
        for e in self._entries.values():
            data: bytes | None = e.data
            if stat.S_ISREG(e.mode):
                if e.ino in seen:
                    data = b""  # a later name of a hard link: the data went with the first
                elif e.source is not None:
                    with open(e.source, "rb") as f:
                        data = f.read()
                seen.add(e.ino)
            written += _write_entry(out, e.name, e.mode, e.ino, e.nlink, data or b"", written)
        written += _write_entry(out, _TRAILER, 0, 0, 1, b"", written)
        pad = -written % 512
        out.write(b"\0" * pad)
        return written + pad


def _write_entry(
    out: BinaryIO, name: str, mode: int, ino: int, nlink: int, data: bytes, offset: int
) -> int:
    raw = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(raw), 0)
    header = _MAGIC + b"".join(b"%08X" % v for v in fields)
    chunk = header + raw
    chunk += b"\0" * (-(offset + len(chunk)) % 4)
    chunk += data
    chunk += b"\0" * (-(offset + len(chunk)) % 4)
    out.write(chunk)
    return len(chunk)


_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def shared_libraries(binary: str) -> list[str]:
    """The shared libraries (and the loader) ``ldd`` names for ``binary``; [] if static."""
    try:
        done = subprocess.run(
            ["ldd", binary], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise errdefs.FailedPrecondition(f"ldd {binary}: {e} (apt-get install libc-bin)") from e
    if done.returncode != 0:
        if "not a dynamic executable" in done.stdout + done.stderr:
            return []
        raise errdefs.FailedPrecondition(f"ldd {binary}: {done.stderr.strip() or done.stdout}")
    libs: list[str] = []
    for line in done.stdout.splitlines():
        if "not found" in line:
            raise errdefs.FailedPrecondition(f"{binary} needs a missing library: {line.strip()}")
        m = _LDD_LINE.match(line)
        if m:
            libs.append(m.group(1))
    return libs


def _add_busybox(a: Archive, busybox: str) -> None:
    if not os.path.isfile(busybox):
        raise errdefs.FailedPrecondition(f"{busybox} not found: apt-get install busybox-static")
    if shared_libraries(busybox):
        raise errdefs.FailedPrecondition(
            f"{busybox} is not statically linked: apt-get install busybox-static"
        )
    try:
        listed = (
            subprocess.run([busybox, "--list"], capture_output=True, check=True, timeout=30)
            .stdout.decode()
            .split()
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise errdefs.FailedPrecondition(f"{busybox} --list: {exc}") from None
    a.big_file("/usr/bin/busybox", busybox, mode=0o755)
    for tool in TOOLS:
        if tool in listed and f"/usr/bin/{tool}" not in a:
            a.symlink(f"/usr/bin/{tool}", "busybox")


def build_initrd(
    out: str,
    agent: str,
    runc: str = RUNC,
    extra: Iterable[tuple[str, str]] = (),
    crun: str | None = CRUN,
    *,
    loader: str | None = None,
    files: Iterable[tuple[str, bytes]] = (),
    busybox: str | None = BUSYBOX,
    tools: str | None = None,
) -> int:
    """Write the guest initramfs to ``out`` (atomically); returns its size.

    ``agent`` becomes ``/init``; ``runc`` goes to :data:`RUNC` and ``crun`` (None:
    none) to :data:`CRUN`, with their libraries;
    ``extra`` is (guest path, host file) pairs, e.g. kernel modules, ``files`` (guest
    path, contents) pairs. With a ``loader`` (the stock kernel's module loader), that is
    ``/init`` and the agent is :data:`LOADED_AGENT`, which the loader execs. A static
    ``busybox`` (None: none) goes to /usr/bin with :data:`TOOLS` linked to it.

    With ``tools`` (the image's ``tools`` symlink), runc, its libraries and busybox are
    not copied into the initrd but into a directory every VM mounts read-only at
    ``GUEST_TOOLS`` (:func:`install_tools`), and the initrd links to them there: ~12 MB
    less to load and unpack at each boot (~40 ms under TCG), and less RAM per VM.
    """
    if not os.path.isfile(runc):
        raise errdefs.FailedPrecondition(f"{runc} not found: apt-get install runc")
    a = Archive(external=tools is not None)
    a.directory("/tmp", 0o1777)
    a.directory("/var/tmp", 0o1777)
    for d in DIRS:
        a.directory(d)
    if loader is None:
        a.host_file("/init", agent, mode=0o755)
    else:
        a.host_file("/init", loader, mode=0o755)
        a.host_file(LOADED_AGENT, agent, mode=0o755)
    if crun is not None and not os.path.isfile(crun):
        raise errdefs.FailedPrecondition(f"{crun} not found: apt-get install crun")
    a.big_file(RUNC, runc, mode=0o755)
    if crun is not None:
        a.big_file(CRUN, crun, mode=0o755)
    libs = shared_libraries(runc) + (shared_libraries(crun) if crun is not None else [])
    for lib in dict.fromkeys(libs):
        a.host_path(lib)
    a.file("/etc/passwd", PASSWD)
    a.file("/etc/group", GROUP)
    if busybox is not None:
        _add_busybox(a, busybox)
    for guest, host in extra:
        a.host_file(guest, host)
    for guest, data in files:
        a.file(guest, data)
    if tools is not None and a.external is not None:
        install_tools(a.external, tools)
    tmp = f"{out}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            size = a.write(f)
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return size


def install_tools(files: dict[str, tuple[str, int | None]], link: str) -> str:
    """Copy ``files`` (path in the tools tree -> host file, mode or None: the host's) into
    ``<link>-<hash of the contents>`` and point the symlink ``link`` at it; returns the
    directory. A directory already there is reused; older ones stay (a running VM may
    still use one: QEMU serves it by path)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        src, mode = files[name]
        digest.update(f"{name}\0{mode}\0{sha256_file(src)}\n".encode())
    target = f"{link}-{digest.hexdigest()[:16]}"
    if not os.path.isdir(target):
        tmp = f"{target}.tmp.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for name, (src, mode) in files.items():
            dst = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
            shutil.copyfile(src, dst)
            os.chmod(dst, stat.S_IMODE(os.stat(src).st_mode) if mode is None else mode)
        os.makedirs(tmp, mode=0o755, exist_ok=True)
        os.chmod(tmp, 0o755)
        os.rename(tmp, target)
    new_link = f"{link}.tmp.{os.getpid()}"
    if os.path.lexists(new_link):
        os.unlink(new_link)
    os.symlink(os.path.basename(target), new_link)
    os.replace(new_link, link)
    return target
