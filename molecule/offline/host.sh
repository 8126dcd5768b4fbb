#!/usr/bin/env bash
# Host side of the "offline" scenario (the worker container itself has no network at all).
#
#   host.sh prepare [EPHEMERAL_DIR]
#                     build what the container gets, while the host has network (Molecule's
#                     dependency step): the wheelhouse (scripts/make-wheelhouse.sh, cached in
#                     BPCP_WHEELHOUSE_CACHE, default /var/cache/bpcp-wheelhouse, one folder per
#                     key of the locks) and the image bpcp-offline:bookworm: bpcp-base:bookworm
#                     plus the apt packages the roles install, and a Python 3.9 for 4.2.8.1
#                     copied from this host. Both are reused while their inputs are unchanged.
#                     With a folder (Molecule's ephemeral directory) as second argument, it
#                     also snapshots the bpcp source there (FOLDER/bpcp-src, the files the
#                     bpcp_worker role packs, from the last commit), so converge and
#                     idempotence install the same source while the checkout changes.
#   host.sh vars [EPHEMERAL_DIR]
#                     print, as JSON, what the converge needs: the wheelhouse path inside the
#                     container, the CellProfiler versions, the Python 3.9.
#
# Python 3.9: PYTHON39 (empty: 5.0 only), else the first of /usr/local/bin/python3.9 and
# ~/.pyenv/versions/3.9*/bin/python3.9 that runs. Its installation prefix is copied into the
# image at the same path, so it must be self-contained (a pyenv or /usr/local build, not /usr).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="${BPCP_WHEELHOUSE_CACHE:-/var/cache/bpcp-wheelhouse}"
image="${BPCP_OFFLINE_IMAGE:-bpcp-offline:bookworm}"
base="${BPCP_BASE_IMAGE:-bpcp-base:bookworm}"
# Inside the container the cache is mounted read-only here (molecule.yml).
mount_point=/srv/wheelhouses

# What the roles install with apt on Debian 12 (roles/*/vars/Debian.yml), preinstalled because
# the container cannot download them: python, parallel, massif, cellprofiler (+ 4.2.8.1's JDK
# and compilers for python-javabridge). A package missing here fails the converge offline.
apt_packages=(python3 python3-pip python3-venv parallel perl rsync openssh-client valgrind time
  openjdk-17-jdk-headless gcc g++ make libc6-dev)
# Shared libraries of a pyenv-built Python 3.9's extension modules.
py39_libs=(libssl3 libffi8 libsqlite3-0 libbz2-1.0 liblzma5 zlib1g libreadline8 libncursesw6 libgdbm6 libuuid1)

log() { echo "offline: $*" >&2; }

python39() {
  local p
  if [ -n "${PYTHON39+set}" ]; then
    echo "$PYTHON39"
    return
  fi
  for p in /usr/local/bin/python3.9 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.9*/bin/python3.9; do
    if [ -x "$p" ] && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' 2>/dev/null; then
      echo "$p"
      return
    fi
  done
}

py39="$(python39)"
py39_prefix=""
if [ -n "$py39" ]; then
  py39_prefix="$("$py39" -c 'import sys; print(sys.base_prefix)')"
  case "$py39_prefix" in
    /usr | /) log "Python 3.9 $py39 lives in $py39_prefix and cannot be copied into the image: 5.0 only"
      py39="" py39_prefix="" ;;
  esac
fi
versions=(5.0)
[ -n "$py39" ] && versions+=(4.2.8.1)
action="${1:-}"
frozen="${2:-}"
case "$action" in
  vars | prepare) ;;
  *) echo "usage: $0 prepare|vars [EPHEMERAL_DIR]" >&2; exit 2 ;;
esac

# 0. The source the converge installs, frozen for this scenario run: the last commit (in CI the
#    same as the checkout; in a shared tree it skips half-done edits), or the working tree with
#    BPCP_OFFLINE_SOURCE=worktree or outside git.
if [ "$action" = prepare ] && [ -n "$frozen" ]; then
  mkdir -p "$frozen"
  rm -rf "$frozen/bpcp-src" "$frozen/bpcp-tree"
  src="$root"
  if [ "${BPCP_OFFLINE_SOURCE:-commit}" = commit ] && git -C "$root" rev-parse --verify -q HEAD >/dev/null; then
    mkdir -p "$frozen/bpcp-tree"
    git -C "$root" archive HEAD | tar -x -C "$frozen/bpcp-tree"
    src="$frozen/bpcp-tree"
  fi
  python3 "$root/roles/bpcp_worker/files/pack_source.py" "$src" "$frozen/bpcp-src.tar.gz" >/dev/null
  tar -xzf "$frozen/bpcp-src.tar.gz" -C "$frozen"
  rm -rf "$frozen/bpcp-tree"
  log "bpcp source ($([ "$src" = "$root" ] && echo "working tree" || git -C "$root" rev-parse --short HEAD)) frozen in $frozen/bpcp-src"
fi

# The wheelhouse holds the dependencies of the source the converge installs.
source_dir="$root"
[ -n "$frozen" ] && [ -f "$frozen/bpcp-src/pyproject.toml" ] && source_dir="$frozen/bpcp-src"
key="$(BPCP_SOURCE="$source_dir" PYTHON39="$py39" "$root/scripts/make-wheelhouse.sh" --key "${versions[@]}")"

case "$action" in
  vars)
    printf '{"offline_wheelhouse": "%s", "offline_versions": [%s], "offline_python39": "%s"}\n' \
      "$mount_point/$key" "$(printf '"%s",' "${versions[@]}" | sed 's/,$//')" "$py39"
    exit 0 ;;
esac

# 1. The wheelhouse, checked by make-wheelhouse.sh itself; untouched while the key holds.
mkdir -p "$cache"
BPCP_SOURCE="$source_dir" PYTHON39="$py39" "$root/scripts/make-wheelhouse.sh" "$cache/$key" "${versions[@]}"
touch "$cache/$key/.last-used"
# Forget wheelhouses of old locks that no run used for two weeks.
find "$cache" -mindepth 2 -maxdepth 2 -name .last-used -mtime +14 -printf '%h\n' | while read -r old; do
  log "removing the unused wheelhouse $old"
  rm -rf "$old"
done

# 2. The image: built with network (host network, like the other scenarios), run without.
"$root/scripts/ensure-docker.sh" >/dev/null
"$root/scripts/build-base-image.sh" "$base" >/dev/null
packages=("${apt_packages[@]}")
[ -n "$py39" ] && packages+=("${py39_libs[@]}")
image_key="$({
  echo "bpcp-offline-image 2"
  docker image inspect -f '{{.Id}}' "$base"
  echo "${packages[*]}"
  echo "$py39_prefix"
  [ -z "$py39_prefix" ] || "$py39" -c 'import sys; print(sys.version)'
} | sha256sum | cut -c1-16)"
exec 8>"$cache/.image.lock"
flock 8
if [ "$(docker image inspect -f '{{ index .Config.Labels "bpcp.offline.key" }}' "$image" 2>/dev/null || true)" = "$image_key" ]; then
  log "$image is up to date (key $image_key)"
  exit 0
fi
log "building $image from $base (key $image_key): ${packages[*]}"
builder="bpcp-offline-build-$$"
trap 'docker rm -f "$builder" >/dev/null 2>&1 || true' EXIT
mounts=()
if [ -n "$py39_prefix" ]; then
  mounts=(-v "$py39_prefix:/mnt/python39:ro")
fi
t0=$(date +%s)
# The apt lists stay in the image: the roles then find every package installed and, with
# *_apt_cache_valid_time set high (converge.yml), never refresh them.
# (Values as arguments, not -e: docker commit would keep them in the image's environment.)
docker run --name "$builder" --network host "${mounts[@]}" "$base" /bin/bash -euc '
    PY39_PREFIX="$1"
    shift
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "$@" >/dev/null
    apt-get clean
    if [ -n "$PY39_PREFIX" ]; then
      mkdir -p "$(dirname "$PY39_PREFIX")"
      cp -a /mnt/python39 "$PY39_PREFIX"
      # Not part of Python: a .pth this machine adds to trust its proxy.
      rm -f "$PY39_PREFIX"/lib/python3.9/site-packages/_sandboxing_*.pth
      "$PY39_PREFIX/bin/python3.9" -c "import ssl, ctypes, sqlite3, bz2, lzma, zlib, venv, ensurepip"
    fi' bpcp-offline-build "$py39_prefix" "${packages[@]}"
old_id="$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)"
docker commit --change 'CMD ["/bin/sleep", "infinity"]' --change "LABEL bpcp.offline.key=$image_key" \
  "$builder" "$image" >/dev/null
# The image it replaces (over 1 GB), unless a container still uses it.
[ -z "$old_id" ] || docker image rm "$old_id" >/dev/null 2>&1 || true
log "built $image in $(($(date +%s) - t0)) s: $(docker image inspect -f '{{.Size}}' "$image") bytes"
