#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 machine for podshim: system packages and the
# Python environment in .venv (podshim installed editable, with the dev tools, and the
# test lab podshim-lab from lab/, editable too: the tests, the demo and the benchmarks).
# Runs as root (containerd, runc and the tests need it).
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(containerd runc crun busybox-static containernetworking-plugins iproute2 util-linux
      hostname python3-venv gcc libc6-dev
      # VM pods (host kind uvm): QEMU, and what `podshim uvm prepare` builds the guest
      # kernel from (the kernel source tarball and its build tools)
      qemu-system-x86 linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install.sh: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian package starts a system containerd on machines with systemd; podshim's
# tests and demo never use it (each starts a private instance), so it is left alone.

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.podshim-installed
# (re)install when either pyproject.toml changed, or the lab is missing (a venv set up
# before lab/ existed), or the Python shim's console script (a venv set up before the
# launcher existed)
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ lab/pyproject.toml -nt "$stamp" ] ||
   [ ! -x .venv/bin/containerd-shim-podshim-v1-py ] ||
   ! compgen -G '.venv/lib/python3*/site-packages/podshim_lab-*.dist-info' >/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' -e ./lab >/dev/null
  touch "$stamp"
fi

# podshim-init, the PID-namespace init of the namespaces pod host: the editable install
# compiles it into the package (setup.py); again here when its source changed since.
init_src=src/podshim/host/namespaces/podshim-init.c
init_bin=src/podshim/host/namespaces/podshim-init
if [ ! -x "$init_bin" ] || [ "$init_src" -nt "$init_bin" ]; then
  .venv/bin/python setup.py compile-init "$init_bin"
fi
rm -f .venv/bin/podshim-init  # where older set-ups put it

# the shim binary containerd runs, the launcher (C; it execs the console script
# containerd-shim-podshim-v1-py for all but its fast start and delete): the editable
# install compiles it into .venv/bin (setup.py); again here when its source or podshim's
# version (compiled in) changed since, or when an older set-up left a script there
launcher_src=src/podshim/shim/launcher.c
launcher_bin=.venv/bin/containerd-shim-podshim-v1
if [ ! -x "$launcher_bin" ] || [ "$launcher_src" -nt "$launcher_bin" ] ||
   [ src/podshim/shim/launcher_zygote.c -nt "$launcher_bin" ] ||
   [ src/podshim/shim/launcher_sha256.c -nt "$launcher_bin" ] ||
   [ src/podshim/shim/launcher.h -nt "$launcher_bin" ] ||
   [ src/podshim/__init__.py -nt "$launcher_bin" ] ||
   [ "$(head -c 4 "$launcher_bin")" != $'\x7fELF' ]; then
  .venv/bin/python setup.py compile-launcher "$launcher_bin"
fi

# containerd 1.7 and 2.1 for the tests' version matrix, unpacked (not installed) into
# /var/cache/podshim-containerd; a no-op once there
bash scripts/fetch_containerd.sh

# the utility VM's guest image (kernel + initramfs) in /var/lib/podshim/uvm: built once on
# a fresh machine (the kernel: ~4-7 min on 2 cores), a no-op (<1 s) while it is current.
# A failure does not stop the set-up (only VM pods need the image); the VM tests report it.
if ! .venv/bin/podshim uvm prepare; then
  echo "install.sh: podshim uvm prepare failed: VM pods will not work (see above)" >&2
fi
