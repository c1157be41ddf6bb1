"""``podshim install``: register podshim with a containerd on this machine.

What it changes (every path below the ``--root`` prefix, ``/`` by default):

* ``/usr/local/bin/containerd-shim-podshim-v1`` (``--bin-dir``): a link to the shim
  binary installed next to the running interpreter, so containerd finds it on its PATH;
* ``/etc/podshim/config.toml`` and ``/etc/podshim/node.toml`` (``shim_scope = "node"``):
  podshim's config files for the two handlers (an existing file is kept and used);
* ``/etc/containerd/conf.d/podshim.toml``: the drop-in with the handlers ``podshim`` and
  ``podshim-node`` (on containerd 1.6/1.7 with a copy of the CRI plugin's section: see
  :mod:`podshim.admin.ctdconfig`);
* on containerd 2.x also the handler ``podshim-sb`` (``sandboxer = "shim"``), and
  ``podshim-node`` is the proxy plugin ``podshim`` (``sandboxer = "podshim"``, in the
  drop-in too) served by ``podshim daemon``, whose config is ``/etc/podshim/daemon.toml``
  and whose systemd unit is ``/etc/systemd/system/podshim-daemon.service`` (``--unit-dir``;
  see :mod:`podshim.admin.service`); without grpcio (the daemon's) ``podshim-node``
  stays the ``shim_scope = "node"`` shim of 1.6/1.7;
* ``/etc/containerd/config.toml`` (``--config``): only the drop-in is added to its
  ``imports``, after a backup next to it (``config.toml.before-podshim``);
* ``/var/lib/podshim/install-manifest.json`` (``--state-dir``): the record of all that,
  for ``podshim uninstall``.

Everything is checked before the first change; a change that fails undoes the earlier
ones. Running it again changes nothing (or only what is missing or out of date).
"""

from __future__ import annotations

import copy
import fnmatch
import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from podshim import __version__
from podshim.admin import ctdconfig, service, tomledit
from podshim.admin import manifest as mf
from podshim.admin.changes import Change
from podshim.admin.errors import AdminError

#: the CRI handlers install adds on 1.6/1.7: name -> podshim config file name
HANDLERS = {"podshim": "config.toml", "podshim-node": "node.toml"}
#: containerd 2.x: the handler of the shim's Sandbox API (no options table: 2.1's CRI
#: then fails StartContainer), and the daemon's config for the proxy-plugin handler
SANDBOX_HANDLER = "podshim-sb"
NODE_HANDLER = "podshim-node"
DAEMON_CONFIG = "daemon.toml"
_CONFIG_TEXT: dict[str, tuple[str, str | None]] = {
    "config.toml": ('shim_scope = "pod"\n', "pod"),
    "node.toml": ('shim_scope = "node"\n', "node"),
    DAEMON_CONFIG: ("", None),  # the daemon is resident: shim_scope does not apply
}
_CONFIG_HEADER = (
    "podshim's config for the CRI handler {handler} (ConfigPath); every key: README,\n"
    '"Configuration". podshim install keeps this file if you edit it.'
)
_DAEMON_HEADER = (
    "podshim's config for the pods of the CRI handler {handler}: the --config of\n"
    'podshim daemon (the proxy plugin\'s controller); every key: README, "Configuration"\n'
    "(shim_scope, shards, zygote and idle_exit_seconds do not apply). podshim install\n"
    "keeps this file if you edit it; restart the daemon to load it (it ends its pods)."
)


def handlers(binary: ctdconfig.ContainerdBinary, proxy: bool) -> dict[str, str | None]:
    """The CRI handlers install adds for ``binary``: name -> podshim config file name
    (``None``: the handler has no options table). ``proxy``: ``podshim-node`` is the
    proxy plugin (2.x with grpcio), its config the daemon's."""
    if binary.version[0] < 2:
        return dict(HANDLERS)
    return {
        "podshim": "config.toml",
        NODE_HANDLER: DAEMON_CONFIG if proxy else "node.toml",
        SANDBOX_HANDLER: None,
    }


_DROPIN_HEADER = (
    "podshim's CRI runtime handlers, imported by {config}.\n"
    "{extra}podshim uninstall removes this file; edit containerd's own config instead."
)
_COPY_NOTE = (
    "containerd {version} replaces a whole plugin section with an imported one, so this\n"
    "file repeats the CRI plugin's section of {source} (run podshim install again\n"
    "after you change it there).\n"
)


@dataclass(frozen=True)
class Options:
    """Where install looks and writes (see the module docstring for the defaults)."""

    config: str
    containerd: str
    bin_dir: str
    podshim_dir: str
    state_dir: str
    dropin: str
    shim: str
    #: containerd 2.x: the systemd unit directory and the daemon's controller socket
    unit_dir: str = "/etc/systemd/system"
    daemon_socket: str = service.DEFAULT_SOCKET

    @property
    def manifest(self) -> str:
        return os.path.join(self.state_dir, mf.NAME)

    @property
    def unit(self) -> str:
        return os.path.join(self.unit_dir, service.UNIT)

    @property
    def link(self) -> str:
        return os.path.join(self.bin_dir, ctdconfig.SHIM_BINARY)


def shim_source() -> str:
    """The shim binary of this installation: in the scripts directory of the running
    interpreter's environment (where pip puts a wheel's scripts)."""
    for directory in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(directory, ctdconfig.SHIM_BINARY)
        if os.path.isfile(path):
            return os.path.abspath(path)
    return os.path.join(sysconfig.get_path("scripts"), ctdconfig.SHIM_BINARY)


def options(
    root: str = "/",
    config: str | None = None,
    containerd: str | None = None,
    bin_dir: str | None = None,
    podshim_dir: str | None = None,
    state_dir: str | None = None,
    dropin: str | None = None,
    shim: str | None = None,
    unit_dir: str | None = None,
    daemon_socket: str | None = None,
) -> Options:
    """:class:`Options` from the command line's values (``None``: the default, below
    ``root``)."""

    def under(path: str) -> str:
        return os.path.join(os.path.abspath(root), path.lstrip("/"))

    cfg = os.path.abspath(config) if config else under("/etc/containerd/config.toml")
    return Options(
        config=cfg,
        containerd=containerd or "containerd",
        bin_dir=os.path.abspath(bin_dir) if bin_dir else under("/usr/local/bin"),
        podshim_dir=os.path.abspath(podshim_dir) if podshim_dir else under("/etc/podshim"),
        state_dir=os.path.abspath(state_dir) if state_dir else under("/var/lib/podshim"),
        dropin=(
            os.path.abspath(dropin)
            if dropin
            else os.path.join(os.path.dirname(cfg), "conf.d", "podshim.toml")
        ),
        shim=shim or shim_source(),
        unit_dir=os.path.abspath(unit_dir) if unit_dir else under("/etc/systemd/system"),
        daemon_socket=(
            os.path.abspath(daemon_socket) if daemon_socket else under(service.DEFAULT_SOCKET)
        ),
    )


@dataclass
class Plan:
    """What install would do: ``changes`` in order, ``notes`` for the operator."""

    changes: list[Change]
    manifest: mf.Manifest
    notes: list[str]
    binary: ctdconfig.ContainerdBinary
    #: containerd 2.x with grpcio: the daemon's systemd unit (path), else "", and the
    #: daemon's command line (its ExecStart)
    unit: str = ""
    daemon: tuple[str, ...] = ()


def require_root(dry_run: bool, what: str) -> None:
    if not dry_run and os.geteuid() != 0:
        raise AdminError(f"podshim {what} must run as root (or try --dry-run)")


def plan(opts: Options) -> Plan:
    """Check everything and work out the changes; changes nothing.

    Raises:
        AdminError: no containerd, a config it cannot use, a handler name another
            runtime has, a file in the way that podshim did not write.
    """
    binary = ctdconfig.probe(opts.containerd)
    if os.path.islink(opts.config):
        raise AdminError(
            f"{opts.config} is a link: name the file it points at with --config "
            f"({os.path.realpath(opts.config)}) and check that containerd reads that one"
        )
    old, table = ctdconfig.read(opts.config)
    version = ctdconfig.config_version(opts.config, table, binary)
    dumped = ctdconfig.dump(binary.path, opts.config)  # containerd must accept the file
    manifest = mf.load(opts.manifest)
    if manifest is not None and manifest.containerd_config != opts.config:
        raise AdminError(
            f"podshim is installed for {manifest.containerd_config} ({opts.manifest}): "
            "run podshim uninstall first"
        )
    if manifest is None:
        manifest = mf.Manifest(opts.config, binary.text, __version__)
    if not os.access(opts.shim, os.X_OK):
        raise AdminError(
            f"the shim binary {opts.shim} is missing: install podshim from its wheel "
            "or sdist (they build it; a C compiler is needed)"
        )
    notes: list[str] = []
    changes: list[Change] = []
    proxy = binary.version[0] >= 2 and service.has_grpc()
    if binary.version[0] >= 2 and not proxy:
        notes.append(
            f'no grpcio for {sys.executable}: {NODE_HANDLER} is the shim_scope = "node" '
            "shim, not the proxy plugin (pip install grpcio, then podshim install again)"
        )
    wanted = handlers(binary, proxy)
    dirs = [opts.state_dir, opts.bin_dir, opts.podshim_dir, os.path.dirname(opts.dropin)]
    for directory in dirs + ([opts.unit_dir] if proxy else []):
        changes += [c for c in _mkdirs(directory) if c not in changes]
    files = [(opts.config, table)] + [
        (name, sub)
        for name, sub in ctdconfig.imported_files(opts.config, table)
        if name != opts.dropin
    ]
    _check_handlers(files, version, wanted)
    if proxy:
        service.check_plugin_name(files, opts.daemon_socket)
    config_paths: dict[str, str | None] = {}
    for handler, name in wanted.items():
        path = os.path.join(opts.podshim_dir, name) if name else None
        config_paths[handler] = path
        if path is not None:
            changes += _podshim_config(path, handler, manifest, notes)
    changes += _link(opts, manifest)
    dropin = _dropin(opts, binary, version, files, config_paths, proxy).encode()
    changes += _owned_file(opts.dropin, dropin, manifest)
    unit, argv = "", []
    if proxy:
        unit = opts.unit
        config = config_paths[NODE_HANDLER]
        assert config is not None
        argv = service.daemon_argv(service.grpc_address(dumped), opts.daemon_socket, config)
        changes += _owned_file(unit, service.unit_text(argv).encode(), manifest, kind="unit")
    changes += _edit(opts, old, table, binary)
    if binary.version < (1, 7, 0) and opts.bin_dir != "/usr/local/bin":
        notes.append(
            f"containerd {binary.short} looks for {ctdconfig.SHIM_BINARY} on its PATH only: "
            f"put {opts.bin_dir} on containerd's PATH"
        )
    return Plan(changes, manifest, notes, binary, unit, tuple(argv))


def _mkdirs(directory: str) -> list[Change]:
    missing: list[str] = []
    while not os.path.isdir(directory):
        if os.path.lexists(directory):
            raise AdminError(f"{directory} exists and is not a directory")
        missing.append(directory)
        directory = os.path.dirname(directory)
    return [Change("dir", d) for d in reversed(missing)]


def _check_handlers(
    files: list[tuple[str, dict[str, Any]]], version: int, wanted: dict[str, str | None]
) -> None:
    for name, table in files:
        for handler, spec in ctdconfig.runtimes_of(table, version).items():
            if handler not in wanted or not isinstance(spec, dict):
                continue
            rtype = spec.get("runtime_type")
            if rtype != ctdconfig.RUNTIME_TYPE:
                raise AdminError(
                    f"the runtime handler {handler!r} is taken in {name} "
                    f"(runtime_type {rtype!r}): remove or rename it there first"
                )


def _owned_file(path: str, data: bytes, manifest: mf.Manifest, kind: str = "file") -> list[Change]:
    """Write ``path`` unless it holds ``data``; refuse one podshim did not write
    (``kind``: ``file``, or ``unit`` for a systemd unit)."""
    current = mf.file_sha256(path)
    if current == mf.sha256(data):
        return []
    if os.path.lexists(path):
        mine = manifest.find(kind, path)
        if mine is None or current is None:
            raise AdminError(f"{path} exists and podshim install did not write it: move it away")
        if mine.sha256 != current:
            raise AdminError(
                f"{path} changed since podshim install wrote it: move it away "
                "(or run podshim uninstall) and install again"
            )
        with open(path, "rb") as f:
            return [Change(kind, path, data, old=f.read())]
    return [Change(kind, path, data)]


def _podshim_config(
    path: str, handler: str, manifest: mf.Manifest, notes: list[str]
) -> list[Change]:
    name = os.path.basename(path)
    body, scope = _CONFIG_TEXT[name]
    header = _DAEMON_HEADER if name == DAEMON_CONFIG else _CONFIG_HEADER
    data = (tomledit.render(header.format(handler=handler), {}) + body).encode()
    mine = manifest.find("file", path)
    if os.path.lexists(path) and (mine is None or mine.sha256 != mf.file_sha256(path)):
        from podshim.errors import ShimError
        from podshim.service import config as podshim_config

        try:
            cfg = podshim_config.load_file(path)
        except ShimError as exc:
            raise AdminError(f"{exc} (fix it or move it away)") from None
        if scope is not None and cfg.shim_scope != scope:
            raise AdminError(
                f"{path} has shim_scope {cfg.shim_scope!r}, the handler {handler} needs "
                f"{scope!r}: fix it or move it away"
            )
        notes.append(f"keeping your {path} for the handler {handler}")
        return []
    return _owned_file(path, data, manifest)


def _link(opts: Options, manifest: mf.Manifest) -> list[Change]:
    if os.path.islink(opts.link) and os.readlink(opts.link) == opts.shim:
        return []
    mine = manifest.find("symlink", opts.link)
    if os.path.lexists(opts.link) and (mine is None or mf.verify(mine) is not None):
        raise AdminError(
            f"{opts.link} exists and is not podshim install's link to {opts.shim}: "
            "move it away, or choose another --bin-dir"
        )
    return [Change("symlink", opts.link, target=opts.shim)]


def handler_tables(
    binary: ctdconfig.ContainerdBinary,
    opts: Options,
    config_paths: dict[str, str | None],
    proxy: bool = False,
) -> dict[str, Any]:
    """The ``containerd.runtimes`` entries install adds (``config_paths`` from
    :func:`handlers`; ``proxy``: ``podshim-node`` is the proxy plugin)."""
    out: dict[str, Any] = {}
    for handler, path in config_paths.items():
        spec: dict[str, Any] = {"runtime_type": ctdconfig.RUNTIME_TYPE}
        if proxy and handler == NODE_HANDLER:
            # the daemon serves the pods: no shim is run, no options (its --config)
            spec["sandboxer"] = service.PLUGIN
            out[handler] = spec
            continue
        if binary.version >= (1, 7, 0):  # 1.6 ignores it and looks on its PATH only
            spec["runtime_path"] = opts.link
        if handler == SANDBOX_HANDLER:
            spec["sandboxer"] = "shim"
        if path is not None:
            spec["options"] = {"ConfigPath": path}
        out[handler] = spec
    return out


def _dropin(
    opts: Options,
    binary: ctdconfig.ContainerdBinary,
    version: int,
    files: list[tuple[str, dict[str, Any]]],
    config_paths: dict[str, str | None],
    proxy: bool,
) -> str:
    plugin = ctdconfig.cri_plugin(version)
    extra = ""
    section: dict[str, Any] = {}
    if binary.replaces_plugin_sections:
        found = ctdconfig.effective_section(files, plugin)
        source = found[0] if found else "containerd's defaults (no file sets it)"
        section = copy.deepcopy(found[1]) if found else {}
        extra = _COPY_NOTE.format(version=binary.short, source=source)
    runtimes = handler_tables(binary, opts, config_paths, proxy)
    section = tomledit.merge(section, {"containerd": {"runtimes": runtimes}})
    header = _DROPIN_HEADER.format(config=opts.config, extra=extra)
    table: dict[str, Any] = {"version": version, "plugins": {plugin: section}}
    if proxy:
        table["proxy_plugins"] = service.plugin_table(opts.daemon_socket)
    return tomledit.render(header, table)


def _glob_match(pattern: str, path: str) -> bool:
    """Go's ``filepath.Match`` as containerd uses it for ``imports``: a ``*`` never
    crosses a ``/``."""
    want, have = pattern.split("/"), path.split("/")
    return len(want) == len(have) and all(
        fnmatch.fnmatchcase(h, w) for w, h in zip(want, have, strict=True)
    )


def _imported(entries: list[str], base: str, path: str, last: bool) -> bool:
    """Whether ``imports`` ``entries`` load ``path`` (``last``: as the last file)."""
    hits = [
        e for e in entries if _glob_match(e if os.path.isabs(e) else os.path.join(base, e), path)
    ]
    if not last:
        return bool(hits)
    return bool(entries) and entries[-1] == path


def _edit(
    opts: Options, old: bytes, table: dict[str, Any], binary: ctdconfig.ContainerdBinary
) -> list[Change]:
    entries = ctdconfig.imports_of(table)
    base = os.path.dirname(opts.config)
    # on 1.x the drop-in must come last: the CRI section of the last file wins
    if _imported(entries, base, opts.dropin, last=binary.replaces_plugin_sections):
        return []
    text = old.decode()
    if opts.dropin in entries:  # 1.x, present but not last: move it to the end
        text = tomledit.remove_import(text, opts.dropin)
    new = tomledit.add_import(text, opts.dropin)
    backup = opts.config + ".before-podshim"
    if os.path.lexists(backup) and mf.file_sha256(backup) != mf.sha256(old):
        raise AdminError(f"{backup} exists (not podshim's backup of {opts.config}): move it away")
    return [Change("edit", opts.config, new.encode(), old=old, entry=opts.dropin, backup=backup)]


def run(opts: Options, *, dry_run: bool, report: Callable[[str], None]) -> Plan:
    """Plan, then (unless ``dry_run``) apply and record the changes."""
    from podshim.admin import changes

    require_root(dry_run, "install")
    p = plan(opts)
    for note in p.notes:
        report(f"note: {note}")
    if not p.changes:
        report(f"podshim is installed for {opts.config}: nothing to change")
        return p
    if dry_run:
        for change in p.changes:
            report("would " + change.describe(verbose=True))
        report(f"would record the changes in {opts.manifest}")
        return p
    changes.apply(p.changes, p.manifest, opts.manifest, report)
    report(f"recorded in {opts.manifest} (podshim uninstall undoes it)")
    return p
