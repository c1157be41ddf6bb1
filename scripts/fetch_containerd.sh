#!/usr/bin/env bash
# Fetch and unpack containerd builds newer than Debian 12's own (1.6.20) for the test
# lab's version matrix: 1.7.24 (Debian trixie) and 2.1.9 (Debian sid). Their binaries
# are linked against libc only and run on Debian 12 as they are. Nothing is installed:
# `apt-get download` with a private sources list, lists dir and cache (the machine's apt
# state is untouched), `dpkg-deb -x` into
#   ${PODSHIM_CONTAINERD_CACHE:-/var/cache/podshim-containerd}/<version>/usr/bin/
# (containerd, ctr, containerd-shim-runc-v2 of the same package). Idempotent: a version
# already unpacked (its .complete stamp) is not fetched again.
set -euo pipefail

CACHE=${PODSHIM_CONTAINERD_CACHE:-/var/cache/podshim-containerd}
MIRROR=${PODSHIM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# short version -> "package version|suites"
declare -A WANT=(
  [1.7]="1.7.24~ds1-6+deb13u1|trixie trixie-updates"
  [2.1]="2.1.9+ds1-5|sid"
)
SEC_MIRROR=${PODSHIM_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

need=()
for short in "${!WANT[@]}"; do
  [ -f "$CACHE/$short/.complete" ] || need+=("$short")
done
((${#need[@]})) || exit 0

mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/debs"
: >"$work/status"
for short in "${need[@]}"; do
  suites=${WANT[$short]#*|}
  for suite in $suites; do
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $suite main"
  done
  if [[ " $suites " == *" trixie "* ]]; then
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $SEC_MIRROR trixie-security main"
  fi
done | sort -u >"$work/sources.list"
APT_OPTS=(
  -o "Dir::Etc::SourceList=$work/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$work/lists"
  -o "Dir::State::Status=$work/status"
  -o "Dir::Cache=$work/cache"
  -o "Dir::Cache::Archives=$work/archives"
  -o "APT::Architecture=amd64"
  -o "Acquire::Languages=none"
  -o "APT::Get::List-Cleanup=false"
  -o "APT::Sandbox::User=root"
)
mkdir -p "$work/cache"
echo "fetch_containerd.sh: fetching containerd ${need[*]} into $CACHE" >&2
apt-get "${APT_OPTS[@]}" update -qq >/dev/null
for short in "${need[@]}"; do
  version=${WANT[$short]%%|*}
  (cd "$work/debs" && apt-get "${APT_OPTS[@]}" download -qq "containerd=$version" >/dev/null)
  deb=$(ls "$work/debs"/containerd_*.deb)
  dest="$CACHE/$short"
  rm -rf "$dest" "$work/x"
  dpkg-deb -x "$deb" "$work/x"
  for bin in containerd ctr containerd-shim-runc-v2; do
    [ -x "$work/x/usr/bin/$bin" ] || { echo "fetch_containerd.sh: $deb has no $bin" >&2; exit 1; }
  done
  "$work/x/usr/bin/containerd" --version >&2
  echo "$version" >"$work/x/.version"
  touch "$work/x/.complete"
  mv "$work/x" "$dest"
  rm -f "$deb"
done
