#!/usr/bin/env bash
# A separate virtualenv with CytoTable, from PyPI at the pins of requirements/cytotable-lock.txt,
# for tests/test_merge.py::test_single_cell_equals_cytotable (bpcp itself never imports CytoTable).
# It lives outside the repository, in a cache folder keyed by the lock file and the interpreter:
#   ${BPCP_TOOLS_CACHE:-${XDG_CACHE_HOME:-~/.cache}/bpcp-tools}/cytotable-<key>
# A second run with the same key does nothing. The last line printed is the environment's Python:
#   export BPCP_CYTOTABLE_PYTHON="$(bash scripts/make-cytotable-env.sh | tail -n 1)"
# PYTHON: the interpreter to build it with (default python3; CytoTable needs 3.10 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."
prog="make-cytotable-env"
lock="requirements/cytotable-lock.txt"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "$prog: $python is missing or older than 3.10; set PYTHON to a Python 3.10+ with venv" >&2
  exit 2
fi
key="$({ cat "$lock"; "$python" -c 'import platform, sys; print(sys.version, platform.machine())'; } \
  | sha256sum | cut -c1-12)"
cache="${BPCP_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bpcp-tools}"
dest="$cache/cytotable-$key"
mkdir -p "$cache"
exec 9>"$cache/.cytotable-$key.lock"
flock 9                      # one build at a time; a second caller waits, then finds it done

if [ ! -f "$dest/.bpcp-complete" ]; then
  echo "$prog: building $dest from $lock" >&2
  rm -rf "$dest"             # what an interrupted build left
  # built where it stays: a venv's scripts name its path (parsl starts them from PATH)
  "$python" -m venv "$dest"
  "$dest/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$lock" >&2
  # the pins are complete (nothing missing) and CytoTable imports with the pinned duckdb
  "$dest/bin/pip" check >&2
  "$dest/bin/python" - "$(sed -n 's/^duckdb==//p' "$lock")" <<'PY' >&2
import sys
import cytotable
import duckdb
assert duckdb.__version__ == sys.argv[1], (duckdb.__version__, sys.argv[1])
print(f"make-cytotable-env: cytotable imports, duckdb {duckdb.__version__}")
PY
  touch "$dest/.bpcp-complete"
else
  echo "$prog: $dest is up to date" >&2
fi
echo "$dest/bin/python"
