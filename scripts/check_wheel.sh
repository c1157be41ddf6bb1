#!/usr/bin/env bash
# The runtime distribution as a user gets it: build podshim's sdist and wheel (`python -m
# build`: the wheel is built from the sdist, which must carry every source: the C files
# too), check that the wheel holds none of the test lab (podshim_lab, lab/) nor the demo
# and does not depend on grpc, then install it alone (no dev dependencies) into a fresh
# venv and check its console scripts there: `podshim version` works, `podshim demo` exits
# 2 with the one-line hint to install the lab. One version everywhere: __version__ (src/
# podshim/__init__.py) is the wheel's and sdist's, `podshim version`'s, the shim's `-v`,
# the one compiled into the launcher, and the lab's, which the `lab` extra pins (the lab
# wheel is built too: `pip install --find-links DIST 'podshim[lab]'` installs the demo;
# with PODSHIM_WHEEL_LAB_VENV set, into a venv made there). With PODSHIM_WHEEL_DIST set,
# both wheels and the sdist are copied there (test_node_installer.py bundles the wheel).
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
sdist=${sdists[0]}

# -- one version everywhere: __version__, the distribution, the lab it pins ------------------
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' src/podshim/__init__.py)
[ -n "$version" ] || fail "no __version__ in src/podshim/__init__.py"
[ "$(basename "$wheel")" = "podshim-$version-py3-none-linux_$(uname -m).whl" ] ||
  fail "the wheel $(basename "$wheel") is not podshim $version's (pyproject's version?)"
[ "$(basename "$sdist")" = "podshim-$version.tar.gz" ] || fail "the sdist $(basename "$sdist") is not $version's"

# -- the sdist carries every source the wheel is built from (build made the wheel from it) --
# (every C source and header of the package: podshim-init.c, the launcher's files)
c_sources=$(cd "$src" && find src/podshim -name '*.[ch]' | sort)
for f in src/podshim/host/namespaces/podshim-init.c src/podshim/shim/launcher.c; do
  grep -qx "$f" <<<"$c_sources" || fail "no $f in the source tree"
done
sdist_files=$(tar -tzf "$sdist")
for f in src/podshim/__init__.py setup.py pyproject.toml $c_sources; do
  grep -qxF "podshim-$version/$f" <<<"$sdist_files" ||
    fail "the sdist lacks $f (pyproject.toml's package-data?)"
done
grep -q "Building wheel from sdist" "$tmp/build.log" || fail "the wheel was not built from the sdist"

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

shown=$(cd "$tmp" && "$venv/bin/podshim" version) || fail "podshim version failed"
[ "$shown" = "podshim $version" ] || fail "podshim version printed: $shown (want podshim $version)"

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
  "containerd-shim-podshim-v1:"*"Version: $version"$'\n'*) ;;
  *) fail "$shim -v (the launcher, then the Python shim) printed: $shim_version (want $version)" ;;
esac
# the version compiled into the launcher (its node-scope socket names carry it)
grep -qa "podshim-start-settings 1 $version node " "$shim" ||
  fail "$shim was not compiled with PODSHIM_VERSION=$version"
init_found=$(cd "$tmp" && "$venv/bin/python" -c \
  'from podshim.host.namespaces.host import find_init_binary as f; print(f())') ||
  fail "podshim-init is not found from the installed wheel"
case $init_found in
  "$venv"/lib/python3*/site-packages/podshim/host/namespaces/podshim-init) ;;
  *) fail "podshim-init found at $init_found, not in the installed package" ;;
esac

# -- the lab extra: podshim[lab] with the lab's wheel next to podshim's ---------------------
lab_dist=$tmp/lab-dist
if ! .venv/bin/python -m build --outdir "$lab_dist" "$src/lab" >"$tmp/lab-build.log" 2>&1; then
  cat "$tmp/lab-build.log" >&2
  fail "python -m build lab failed"
fi
lab_wheel=("$lab_dist"/podshim_lab-"$version"-py3-none-any.whl)
[ -f "${lab_wheel[0]}" ] || fail "no podshim-lab $version wheel (lab/pyproject.toml's version?): $(ls "$lab_dist")"
cp "${lab_wheel[0]}" "$dist/"
.venv/bin/python - "$wheel" "$version" <<'EOF' || fail "the wheel's lab extra does not pin podshim-lab==$version"
import sys
import zipfile

wheel, version = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf:
    meta = zf.read(f"podshim-{version}.dist-info/METADATA").decode().splitlines()
sys.exit(f'Requires-Dist: podshim-lab=={version}; extra == "lab"' not in meta)
EOF
if [ -n "${PODSHIM_WHEEL_LAB_VENV:-}" ]; then  # tests/integration/test_wheel_pod.py runs the demo
  rm -rf "$PODSHIM_WHEEL_LAB_VENV"
  "$PY" -m venv "$PODSHIM_WHEEL_LAB_VENV"
  (cd "$tmp" && "$PODSHIM_WHEEL_LAB_VENV/bin/pip" install "${PIP[@]}" --find-links "$dist" \
    "$wheel[lab]") || fail "pip install --find-links DIST 'podshim[lab]' failed"
  "$PODSHIM_WHEEL_LAB_VENV/bin/python" -c 'import podshim_lab.demo' ||
    fail "podshim[lab] installed no working podshim_lab.demo"
fi
if [ -n "${PODSHIM_WHEEL_DIST:-}" ]; then  # the wheels, for test_node_installer.py's bundle
  mkdir -p "$PODSHIM_WHEEL_DIST"
  rm -f "$PODSHIM_WHEEL_DIST"/*.whl "$PODSHIM_WHEEL_DIST"/*.tar.gz
  cp "$dist"/* "$PODSHIM_WHEEL_DIST/"
fi

# -- layering contracts, against the runtime alone ----------------------------------------
il=$(grep -o '"import-linter==[^"]*"' pyproject.toml | tr -d '"')
"$venv/bin/pip" install "${PIP[@]}" "$il" || fail "pip install $il failed"
"$venv/bin/lint-imports" --no-cache >"$tmp/lint.out" 2>&1 || {
  cat "$tmp/lint.out" >&2
  fail "lint-imports: a layering contract is broken"
}

echo "check_wheel.sh: $(basename "$wheel") ok (from the sdist, with every C source; version $version everywhere): podshim-init built in and found; the launcher in bin, execing the Python shim; no lab, no demo, no grpc; podshim demo -> hint (exit 2); import contracts kept"
