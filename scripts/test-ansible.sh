#!/usr/bin/env bash
# Lint and test the Ansible side of bpcp.
#
#   scripts/test-ansible.sh            # lint + syntax + every Molecule scenario
#   scripts/test-ansible.sh lint       # yamllint, ansible-lint, syntax check only
#   scripts/test-ansible.sh molecule [SCENARIO...]
#
# Tools come from .venv/bin when it exists (or BPCP_VENV_BIN), else from PATH.
# Molecule needs root (or docker group) and builds/uses the local image
# bpcp-base:bookworm (scripts/build-base-image.sh); nothing is pulled.
set -euo pipefail

cd "$(dirname "$0")/.."
root="$(pwd)"

bin="${BPCP_VENV_BIN:-}"
if [ -z "$bin" ] && [ -x "$root/.venv/bin/ansible-playbook" ]; then
  bin="$root/.venv/bin"
fi
if [ -n "$bin" ]; then
  export PATH="$bin:$PATH"
fi
export ANSIBLE_CONFIG="$root/ansible.cfg"
export ANSIBLE_NOCOLOR=1 PY_COLORS=0 ANSIBLE_FORCE_COLOR=0

what="${1:-all}"
[ $# -gt 0 ] && shift

step() { printf '\n==> %s\n' "$*"; }

run_lint() {
  step "yamllint"
  yamllint --strict .
  step "ansible-lint (production profile, offline)"
  ansible-lint --offline --profile production
  step "ansible-playbook --syntax-check site.yml"
  ansible-playbook --syntax-check site.yml
}

run_molecule() {
  local scenarios=("$@")
  if [ ${#scenarios[@]} -eq 0 ]; then
    # default last: it is the slowest (full worker with CellProfiler).
    scenarios=(ramdisk parallel massif default)
    for d in molecule/*/; do
      s="$(basename "$d")"
      [[ " ${scenarios[*]} " == *" $s "* ]] || scenarios+=("$s")
    done
  fi
  step "docker engine and base image"
  scripts/ensure-docker.sh
  scripts/build-base-image.sh
  local summary="" failed=0 t0 t1
  for s in "${scenarios[@]}"; do
    step "molecule test -s $s"
    t0=$(date +%s)
    if molecule test -s "$s"; then
      t1=$(date +%s); summary+="  $s: passed in $((t1 - t0)) s"$'\n'
    else
      t1=$(date +%s); summary+="  $s: FAILED after $((t1 - t0)) s"$'\n'; failed=1
    fi
  done
  step "molecule summary"
  printf '%s' "$summary"
  return $failed
}

case "$what" in
  lint) run_lint ;;
  molecule) run_molecule "$@" ;;
  all) run_lint; run_molecule "$@" ;;
  *) echo "usage: $0 [all|lint|molecule [SCENARIO...]]" >&2; exit 2 ;;
esac
