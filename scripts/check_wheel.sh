#!/usr/bin/env bash
# The runtime distribution as a user gets it: build podshim's sdist and wheel (`python -m
# build`: the wheel is built from the sdist), check that the wheel holds none of the test
# lab (podshim_lab, lab/) nor the demo and does not depend on grpc, then install it alone
# (no dev dependencies) into a fresh venv and check its console scripts there:
# `podshim version` works, `podshim demo` exits 2 with the one-line hint to install the lab.
#
# The build reads a copy of the files git knows (tracked, and untracked but not ignored),
# so stale build/, *.egg-info or __pycache__ of a working tree cannot leak into it.
# Needs the network as pip is configured (setuptools for the isolated build, protobuf).
# The wheel must carry podshim-init, compiled by the build (setup.py), executable, and the
# launcher as a script (.data/scripts), which pip installs as bin/containerd-shim-podshim-v1
# next to the Python shim's console script containerd-shim-podshim-v1-py; `-v` through the
# launcher must reach the Python shim (the launcher finds it next to itself and execs it).
# Called by scripts/test.sh before pytest; runs as any user; uses .venv (scripts/install.sh).
# With PODSHIM_WHEEL_VENV set, the fresh venv is made there and kept (replacing what was
# there): tests/integration/test_wheel_pod.py runs a CRI pod from it.
# Last, `lint-imports` (import-linter, pinned as in pyproject's dev extra) checks the
# layering contracts of pyproject.toml against the installed runtime alone.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# nothing from this checkout or the caller's environment may be importable in the venv
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP
HINT="podshim demo needs the test lab: pip install ./lab (run from a podshim checkout)"
PIP=(--disable-pip-version-check -q)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/podshim-wheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

fail() {
  echo "check_wheel.sh: $*" >&2
  exit 1
}

# -- the source tree to build from -----------------------------------------------------
src=$tmp/src
mkdir -p "$src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    tar --null -T - -cf - | tar -xf - -C "$src"
else  # not a git checkout (e.g. an unpacked archive): everything but the venv
  tar --exclude=./.venv -cf - . | tar -xf - -C "$src"
fi

# -- build -----------------------------------------------------------------------------
dist=$tmp/dist
if ! .venv/bin/python -m build --outdir "$dist" "$src" >"$tmp/build.log" 2>&1; then
  cat "$tmp/build.log" >&2
  fail "python -m build failed"
fi
wheels=("$dist"/podshim-*.whl)
sdists=("$dist"/podshim-*.tar.gz)
[ -f "${wheels[0]}" ] && [ ${#wheels[@]} -eq 1 ] || fail "expected one wheel in $dist: $(ls "$dist")"
[ -f "${sdists[0]}" ] && [ ${#sdists[@]} -eq 1 ] || fail "expected one sdist in $dist: $(ls "$dist")"
wheel=${wheels[0]}

# -- what the wheel holds --------------------------------------------------------------
.venv/bin/python - "$wheel" <<'EOF'
import re
import sys
import zipfile

wheel = sys.argv[1]
with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line.split(":", 1)[1].strip()
        for line in zf.read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
bad = [
    n
    for n in names
    if n.startswith(("podshim/lab/", "podshim_lab"))
    or re.fullmatch(r"podshim/demo[^/]*\.py", n)
    or n.startswith("lab/")
]
problems = [f"must not be in the wheel: {n}" for n in bad]
init = "podshim/host/namespaces/podshim-init"
with zipfile.ZipFile(wheel) as zf:
    info = zf.getinfo(init) if init in names else None
    if info is None:
        problems.append(f"{init} (compiled by setup.py) is missing")
    elif not (info.external_attr >> 16) & 0o111 or not zf.read(init).startswith(b"\x7fELF"):
        problems.append(f"{init} is not an executable ELF program")
if "podshim/host/namespaces/podshim-init.c" not in names:
    problems.append("podshim-init.c is not package data")
script = re.compile(r"podshim-[^/]+\.data/scripts/containerd-shim-podshim-v1")
launcher = [n for n in names if script.fullmatch(n)]
with zipfile.ZipFile(wheel) as zf:
    if len(launcher) != 1:
        problems.append("the launcher containerd-shim-podshim-v1 is not a script of the wheel")
    else:
        mode, head = zf.getinfo(launcher[0]).external_attr >> 16, zf.read(launcher[0])[:4]
        if not mode & 0o111 or head != b"\x7fELF":
            problems.append(f"{launcher[0]} is not an executable ELF program")
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zf.read(entry_points).decode()
if "containerd-shim-podshim-v1-py = podshim.shim.main:main" not in scripts:
    problems.append("no console script containerd-shim-podshim-v1-py (the Python shim)")
if re.search(r"^containerd-shim-podshim-v1 =", scripts, re.M):
    problems.append("a console script would replace the launcher containerd-shim-podshim-v1")
if "podshim/shim/launcher.c" not in names:
    problems.append("launcher.c is not package data")
if "-py3-none-linux_" not in wheel:
    problems.append("the wheel is not tagged py3-none-linux_<arch> (it holds a native program)")
if "podshim/cli.py" not in names or "podshim/py.typed" not in names:
    problems.append("podshim/cli.py or podshim/py.typed missing: is this the runtime wheel?")
# runtime requirements (extras such as otel aside) must not pull in grpc
runtime = [r for r in requires if "extra ==" not in r]
problems += [f"runtime requirement {r!r} pulls in grpc" for r in runtime if "grpc" in r.lower()]
if problems:
    print(f"check_wheel.sh: {wheel}:", *problems, sep="\n  ", file=sys.stderr)
    sys.exit(1)
EOF

# -- the wheel alone, in a fresh venv --------------------------------------------------
venv=${PODSHIM_WHEEL_VENV:-$tmp/venv}
rm -rf "$venv"
"$PY" -m venv "$venv"
(cd "$tmp" && "$venv/bin/pip" install "${PIP[@]}" "$wheel") || fail "pip install $wheel failed"

version=$(cd "$tmp" && "$venv/bin/podshim" version) || fail "podshim version failed"
case $version in
  "podshim "[0-9]*) ;;
  *) fail "podshim version printed: $version" ;;
esac

rc=0
(cd "$tmp" && "$venv/bin/podshim" demo) >"$tmp/demo.out" 2>"$tmp/demo.err" || rc=$?
[ "$rc" -eq 2 ] || fail "podshim demo without the lab exited $rc (want 2): $(cat "$tmp/demo.err")"
[ ! -s "$tmp/demo.out" ] || fail "podshim demo without the lab wrote to stdout: $(cat "$tmp/demo.out")"
[ "$(cat "$tmp/demo.err")" = "$HINT" ] ||
  fail "podshim demo without the lab printed, on stderr: $(cat "$tmp/demo.err") (want: $HINT)"
[ "$(wc -l <"$tmp/demo.err")" -eq 1 ] || fail "the hint is not exactly one line"

"$venv/bin/python" -c 'import grpc' 2>/dev/null && fail "grpc is installed with the runtime wheel"
shim=$venv/bin/containerd-shim-podshim-v1
[ -x "$shim" ] && [ "$(head -c 4 "$shim")" = $'\x7fELF' ] ||
  fail "$shim is not the launcher (an executable ELF program)"
[ -x "$shim-py" ] || fail "$shim-py (the Python shim) is not installed"
shim_version=$(cd "$tmp" && "$shim" -v) || fail "$shim -v failed"
case $shim_version in
  "containerd-shim-podshim-v1:"*"Version: "[0-9]*) ;;
  *) fail "$shim -v (the launcher, then the Python shim) printed: $shim_version" ;;
esac
init_found=$(cd "$tmp" && "$venv/bin/python" -c \
  'from podshim.host.namespaces.host import find_init_binary as f; print(f())') ||
  fail "podshim-init is not found from the installed wheel"
case $init_found in
  "$venv"/lib/python3*/site-packages/podshim/host/namespaces/podshim-init) ;;
  *) fail "podshim-init found at $init_found, not in the installed package" ;;
esac

# -- layering contracts, against the runtime alone ----------------------------------------
il=$(grep -o '"import-linter==[^"]*"' pyproject.toml | tr -d '"')
"$venv/bin/pip" install "${PIP[@]}" "$il" || fail "pip install $il failed"
"$venv/bin/lint-imports" --no-cache >"$tmp/lint.out" 2>&1 || {
  cat "$tmp/lint.out" >&2
  fail "lint-imports: a layering contract is broken"
}

echo "check_wheel.sh: $(basename "$wheel") ok: podshim-init built in and found; the launcher in bin, execing the Python shim; no lab, no demo, no grpc; podshim demo -> hint (exit 2); import contracts kept"
