#!/usr/bin/env bash
# Download every wheel a worker needs into one folder, for workers without PyPI access
# (e.g. EC2 in private subnets), then prove the folder is complete: each set is installed
# with `pip install --no-index --find-links DIR` into a scratch virtualenv, exactly as the
# roles install it. Copy the folder to the workers, then set
#   cellprofiler_wheelhouse / awscli_wheelhouse / bpcp_worker_wheelhouse: /path/on/worker
#
#   scripts/make-wheelhouse.sh DIR [5.0] [4.2.8.1]     build and check (default: 5.0)
#   scripts/make-wheelhouse.sh --key [5.0] [4.2.8.1]   print the key of that wheelhouse only
#   scripts/make-wheelhouse.sh --force DIR ...         check again even when DIR is up to date
#
# The key is a hash of everything that decides the contents (versions, lock files, the
# 4.2.8.1 build pins of roles/cellprofiler/vars/main.yml, awscli_version, bpcp's dependencies
# in pyproject.toml, the interpreters and the architecture). DIR/bpcp-wheelhouse.txt records
# the key of the last successful check; a second run with the same key does nothing.
#
# Run it on a machine of the workers' OS and CPU architecture, with the interpreters the
# workers use: PYTHON311 (default python3.11 or python3) for 5.0, awscli and bpcp;
# PYTHON39 (default python3.9) for 4.2.8.1, whose check also builds python-javabridge
# (needs gcc and a JDK 17: JAVA_HOME, default /usr/lib/jvm/java-17-openjdk-<arch>).
# BPCP_SOURCE: the bpcp source whose dependencies go in (default: this checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
src="$(cd "${BPCP_SOURCE:-$root}" && pwd)"
prog="make-wheelhouse"
format="bpcp-wheelhouse 2"

mode=build force=""
while [ $# -gt 0 ]; do
  case "$1" in
    --key) mode=key; shift ;;
    --force) force=1; shift ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [ "$mode" = build ]; then
  dir="${1:?usage: $0 [--force] DIR [VERSION...] | $0 --key [VERSION...]}"
  shift
fi
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(5.0)
mapfile -t versions < <(printf '%s\n' "${versions[@]}" | sort -u)

die() { echo "$prog: $*" >&2; exit 1; }

py311="${PYTHON311:-$(command -v python3.11 || command -v python3)}"
# python3.9 on PATH when it runs (a pyenv shim may not), else a pyenv build.
first_python39() {
  local p
  for p in "$(command -v python3.9 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.9*/bin/python3.9; do
    [ -n "$p" ] && [ -x "$p" ] && "$p" -c '' 2>/dev/null && { echo "$p"; return; }
  done
}
py39="${PYTHON39:-$(first_python39)}"
files="$root/roles/cellprofiler/files"
catalog="$root/roles/cellprofiler/vars/main.yml"
awscli_version="$(sed -n 's/^awscli_version: "\(.*\)"/\1/p' "$root/roles/awscli/defaults/main.yml")"
[ -n "$awscli_version" ] || die "no awscli_version in roles/awscli/defaults/main.yml"

# A value (`key: a`) or list (`key: [a, b]`) of one version in roles/cellprofiler/vars/main.yml,
# one item a line: the role installs exactly these, so the wheelhouse and its check use the
# same pins.
catalog_list() {
  awk -v head="  \"$1\":" -v key="$2:" '
    $0 == head { inside = 1; next }
    inside && /^  [^ ]/ { exit }
    inside && $1 == key {
      sub(/^ *[^ ]+ */, "")
      if ($0 ~ /^\[/) { sub(/^\[/, ""); sub(/\].*$/, "") }
      n = split($0, a, /, */)
      for (i = 1; i <= n; i++) if (a[i] != "") print a[i]
      exit
    }' "$catalog"
}

# The interpreter, its ABI and platform: wheels are chosen for exactly these.
describe_python() {
  "$1" -c 'import platform, sys, sysconfig
print("python %d.%d %s %s" % (sys.version_info[0], sys.version_info[1], platform.machine(), sysconfig.get_platform()))'
}

need_python() { # interpreter, "3.11" | "3.9", what
  local found
  [ -n "$1" ] && found="$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
    || die "$3 needs Python $2: set PYTHON${2/./}=/path/to/python$2"
  [ "$found" = "$2" ] || die "$3 needs Python $2, but $1 is Python $found: set PYTHON${2/./}=/path/to/python$2"
}

need_python "$py311" 3.11 "5.0, awscli and bpcp"
for v in "${versions[@]}"; do
  case "$v" in
    5.0) ;;
    4.2.8.1) need_python "$py39" 3.9 "CellProfiler 4.2.8.1" ;;
    *) echo "$prog: unknown version $v (known: 5.0, 4.2.8.1)" >&2; exit 2 ;;
  esac
done

# bpcp's build requirements and dependencies, from pyproject.toml.
mapfile -t bpcp_build < <("$py311" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' "$src/pyproject.toml")
mapfile -t bpcp_deps < <("$py311" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"].get("dependencies", [])))' "$src/pyproject.toml")

manifest() {
  echo "$format"
  echo "versions ${versions[*]}"
  echo "py311 $(describe_python "$py311")"
  echo "awscli $awscli_version"
  echo "bpcp-build ${bpcp_build[*]}"
  echo "bpcp-deps ${bpcp_deps[*]}"
  for v in "${versions[@]}"; do
    lock="$files/$(catalog_list "$v" lock)"
    if [ "$v" = 4.2.8.1 ]; then
      echo "py39 $(describe_python "$py39")"
      echo "4.2.8.1-pre $(catalog_list "$v" pre_install | tr '\n' ' ')"
      echo "4.2.8.1-nobuild $(catalog_list "$v" no_build_isolation | tr '\n' ' ')"
    fi
    echo "lock $v $(sha256sum <"$lock" | cut -c1-64)"
  done
}
key="$(manifest | sha256sum | cut -c1-16)"
if [ "$mode" = key ]; then
  echo "$key"
  exit 0
fi

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
stamp="$dir/bpcp-wheelhouse.txt"
# One build at a time per folder (several checkouts may share a cache).
exec 9>"$dir/.lock"
flock 9

report_size() {
  echo "$prog: $1: $(find "$dir" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.tar.gz' -o -name '*.zip' \) | wc -l) files, $(du -sh "$dir" | cut -f1) ($(du -sb "$dir" | cut -f1) bytes) in $dir"
}

if [ -z "$force" ] && [ -f "$stamp" ] && [ "$(sed -n 's/^key //p' "$stamp")" = "$key" ]; then
  report_size "up to date (key $key, checked $(sed -n 's/^checked //p' "$stamp"))"
  exit 0
fi
rm -f "$stamp"

scratch="$(mktemp -d "${TMPDIR:-/tmp}/bpcp-wheelhouse-check.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
# pip as the workers run it: nothing but DIR (no index, no pip.conf, no PIP_* variables).
mapfile -t pip_unset < <(env | sed -n 's/^\(PIP_[A-Za-z0-9_]*\)=.*/-u\n\1/p')

offline_pip() { # what, venv, pip install arguments...
  local what="$1" venv="$2" log="$scratch/pip.log" missing
  shift 2
  if ! env "${pip_unset[@]}" PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install \
    --disable-pip-version-check --progress-bar off -q --no-index --find-links "$dir" "$@" >"$log" 2>&1; then
    tail -n 15 "$log" >&2
    missing="$(sed -n 's/.*No matching distribution found for \([^ ]*\).*/\1/p' "$log" | tail -n 1)"
    [ -n "$missing" ] && die "$dir lacks $missing ($what)"
    die "installing $what from $dir failed (output above)"
  fi
}

new_venv() { # interpreter, name: sets $venv
  venv="$scratch/$2"
  rm -rf "$venv"
  "$1" -m venv "$venv" || die "$1 -m venv failed (install python3-venv)"
}

java_home=""
if [[ " ${versions[*]} " == *" 4.2.8.1 "* ]]; then
  arch="$(dpkg --print-architecture 2>/dev/null || uname -m)"
  java_home="${JAVA_HOME:-/usr/lib/jvm/java-17-openjdk-$arch}"
  [ -f "$java_home/include/jni.h" ] || die "4.2.8.1: python-javabridge is built from source here and on" \
    "the workers, which needs gcc and a JDK 17 (apt-get install openjdk-17-jdk-headless, or set JAVA_HOME)"
fi

t0=$(date +%s)
dl() { local py="$1"; shift; "$py" -m pip download --disable-pip-version-check --progress-bar off -q -d "$dir" "$@"; }
for v in "${versions[@]}"; do
  echo "$prog: downloading CellProfiler $v"
  case "$v" in
    5.0)
      dl "$py311" --no-deps -r "$files/$(catalog_list 5.0 lock)" ;;
    4.2.8.1)
      mapfile -t pre < <(catalog_list 4.2.8.1 pre_install)
      mapfile -t nobuild < <(catalog_list 4.2.8.1 no_build_isolation)
      dl "$py39" "${pre[@]}"
      # python-javabridge has no wheels and its setup.py imports numpy and Cython: fetch its
      # sdist from a virtualenv holding the build requirements (the worker builds it).
      new_venv "$py39" download39
      offline_pip "CellProfiler 4.2.8.1 build requirements" "$venv" "${pre[@]}"
      JAVA_HOME="$java_home" dl "$venv/bin/python" --no-deps --no-build-isolation --no-binary :all: "${nobuild[@]}"
      rm -rf "$venv"
      # The rest of the lock (pip would prepare python-javabridge's metadata again).
      grep -v -i -F -f <(printf '%s\n' "${nobuild[@]}" | sed 's/[=<>!~].*//; s/$/==/') \
        "$files/$(catalog_list 4.2.8.1 lock)" >"$scratch/lock-cp42-rest.txt"
      dl "$py39" --no-deps -r "$scratch/lock-cp42-rest.txt" ;;
  esac
done
echo "$prog: downloading the AWS CLI $awscli_version and bpcp's dependencies"
dl "$py311" "awscli==$awscli_version"
dl "$py311" "${bpcp_build[@]}" "${bpcp_deps[@]}"
t1=$(date +%s)
echo "$prog: downloaded in $((t1 - t0)) s"

# The check: each set in a fresh virtualenv, installed the way the roles install it.
for v in "${versions[@]}"; do
  echo "$prog: checking CellProfiler $v in a scratch virtualenv"
  case "$v" in
    5.0)
      new_venv "$py311" cp5
      offline_pip "CellProfiler 5.0" "$venv" --no-deps -r "$files/$(catalog_list 5.0 lock)" ;;
    4.2.8.1)
      new_venv "$py39" cp42
      mapfile -t pre < <(catalog_list 4.2.8.1 pre_install)
      mapfile -t nobuild < <(catalog_list 4.2.8.1 no_build_isolation)
      offline_pip "CellProfiler 4.2.8.1 build requirements" "$venv" "${pre[@]}"
      JAVA_HOME="$java_home" offline_pip "CellProfiler 4.2.8.1" "$venv" --no-build-isolation "${nobuild[@]}"
      JAVA_HOME="$java_home" offline_pip "CellProfiler 4.2.8.1" "$venv" --no-deps -r "$files/$(catalog_list 4.2.8.1 lock)" ;;
  esac
  rm -rf "$venv"
done
echo "$prog: checking the AWS CLI and bpcp in scratch virtualenvs"
new_venv "$py311" awscli
offline_pip "awscli==$awscli_version" "$venv" "awscli==$awscli_version"
rm -rf "$venv"
# bpcp as the bpcp_worker role installs it: the packed source, built in an isolated env.
"$py311" "$root/roles/bpcp_worker/files/pack_source.py" "$src" "$scratch/bpcp-src.tar.gz" >/dev/null
new_venv "$py311" bpcp
offline_pip "bpcp" "$venv" "$scratch/bpcp-src.tar.gz"
"$venv/bin/python" -c "import bpcp" || die "bpcp installed from $dir but does not import"
rm -rf "$venv"
t2=$(date +%s)
echo "$prog: checked in $((t2 - t1)) s"

{
  echo "key $key"
  echo "checked $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  manifest
} >"$stamp"
report_size "complete for ${versions[*]} (key $key)"
