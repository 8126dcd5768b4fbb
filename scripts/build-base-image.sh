#!/usr/bin/env bash
# Build the local Debian 12 base image used by the Molecule scenarios and the
# multi-host tests. No registry is reachable, so the image is made with
# debootstrap and `docker import`. Idempotent: skips when the image exists
# (set BPCP_REBUILD_IMAGE=1 to rebuild).
#
#   scripts/build-base-image.sh [IMAGE]     default IMAGE: bpcp-base:bookworm
set -euo pipefail

image="${1:-${BPCP_BASE_IMAGE:-bpcp-base:bookworm}}"
suite="${BPCP_BASE_SUITE:-bookworm}"
mirror="${BPCP_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# python3 + sudo for Ansible; ca-certificates for pip/apt over TLS;
# systemd-less: molecule keeps the container alive with a sleep command.
include="${BPCP_BASE_INCLUDE:-python3,python3-apt,sudo,ca-certificates,procps,iproute2,gnupg,util-linux,mount}"

here="$(cd "$(dirname "$0")" && pwd)"
"$here/ensure-docker.sh"

if [ -z "${BPCP_REBUILD_IMAGE:-}" ] && docker image inspect "$image" >/dev/null 2>&1; then
  echo "build-base-image: $image already exists"
  exit 0
fi

command -v debootstrap >/dev/null 2>&1 || {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q debootstrap
}

work="$(mktemp -d /tmp/bpcp-rootfs.XXXXXX)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"

echo "build-base-image: debootstrap $suite into $rootfs"
debootstrap --variant=minbase --include="$include" "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  exit 1
}

# Same apt sources as a stock Debian 12 image, and a small, clean rootfs.
cat >"$rootfs/etc/apt/sources.list" <<SRC
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
SRC
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$rootfs/etc/apt/apt.conf.d/90bpcp-norecommends"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

echo "build-base-image: importing as $image"
tar -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/sleep", "infinity"]' \
  - "$image" >/dev/null
docker image inspect "$image" --format 'build-base-image: {{.RepoTags}} {{.Size}} bytes'
