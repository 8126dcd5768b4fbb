#!/usr/bin/env bash
# Download every wheel a worker needs into one folder, for workers without PyPI access
# (e.g. EC2 in private subnets). Copy the folder to the workers, then set
#   cellprofiler_wheelhouse / awscli_wheelhouse / bpcp_worker_wheelhouse: /path/on/worker
#
#   scripts/make-wheelhouse.sh DIR [5.0] [4.2.8.1]       (default: 5.0)
#
# Run it on a machine of the workers' OS and CPU architecture, with the interpreters the
# workers use: PYTHON311 (default python3.11 or python3) for 5.0, awscli and bpcp;
# PYTHON39 (default python3.9) for 4.2.8.1.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
dir="${1:?usage: $0 DIR [VERSION...]}"
shift
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(5.0)
mkdir -p "$dir"
py311="${PYTHON311:-$(command -v python3.11 || command -v python3)}"
py39="${PYTHON39:-$(command -v python3.9 || true)}"
files="$root/roles/cellprofiler/files"
awscli_version="$(sed -n 's/^awscli_version: "\(.*\)"/\1/p' "$root/roles/awscli/defaults/main.yml")"

dl() { local py="$1"; shift; "$py" -m pip download --disable-pip-version-check -d "$dir" "$@"; }

for v in "${versions[@]}"; do
  case "$v" in
    5.0)
      dl "$py311" --no-deps -r "$files/lock-cp5-py311.txt" ;;
    4.2.8.1)
      [ -n "$py39" ] || { echo "make-wheelhouse: 4.2.8.1 needs PYTHON39=/path/to/python3.9" >&2; exit 1; }
      dl "$py39" numpy==1.23.5 Cython==0.29.37 setuptools==58.1.0 wheel==0.48.0
      dl "$py39" --no-deps --no-binary python-javabridge python-javabridge==4.0.3
      dl "$py39" --no-deps -r "$files/lock-cp42-py39.txt" ;;
    *) echo "make-wheelhouse: unknown version $v" >&2; exit 2 ;;
  esac
done
# AWS CLI, and the bpcp package's dependencies plus its build backend.
dl "$py311" "awscli==$awscli_version"
dl "$py311" "setuptools>=68" wheel
dl "$py311" "$root"
echo "make-wheelhouse: $(find "$dir" -maxdepth 1 -type f | wc -l) files in $dir"
