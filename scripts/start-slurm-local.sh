#!/usr/bin/env bash
# Set up and start a single-node Slurm on this machine: this host is the controller (slurmctld)
# and the only compute node (slurmd), configured by the slurm role (playbooks/slurm.yml), for
# the fast tests of `bpcp run --engine slurm`.
#
#   scripts/start-slurm-local.sh                 # nothing to do when the node already answers
#   scripts/start-slurm-local.sh -e slurm_max_array_size=5   # (re)configure: runs the role always
#
# Idempotent: without arguments it only checks `sinfo` when Slurm is up; otherwise (or with
# ansible-playbook arguments) it runs the role, which restarts the daemons only when slurm.conf
# or the munge key changed, then waits at most BPCP_SLURM_WAIT seconds (default 60) until sinfo
# shows the node idle (itself, not the role: it resumes a down or drained node). Needs root
# (apt, daemons) and ansible-playbook (.venv/bin or PATH).
# Prints one line and exits 1 when it cannot; the role's output is in BPCP_SLURM_LOG.
#
# After a machine's processes were all ended (a test session stopped mid-run), slurmctld comes
# back with its saved state: the jobs that were queued then (requeued when their node failed)
# and the node down or drained. When Slurm did not answer on entry, nothing that submitted those
# jobs is alive, so this test cluster's leftover jobs are cancelled and the node resumed.
set -euo pipefail

cd "$(dirname "$0")/.."
root="$(pwd)"
wait_s="${BPCP_SLURM_WAIT:-60}"
log="${BPCP_SLURM_LOG:-/tmp/bpcp-start-slurm-local.log}"
node="$(hostname -s)"

say() { echo "start-slurm-local: $*"; }
die() { echo "start-slurm-local: $*" >&2; exit 1; }

# The node's compact state in sinfo (idle, mix, alloc, down*, ...), empty when Slurm does not answer.
state() {
  command -v sinfo >/dev/null 2>&1 || return 0
  timeout 10 sinfo --noheader --Node --nodes="$node" --format='%t' 2>/dev/null | head -n 1 || true
}

entry_state="$(state)"
if [ $# -eq 0 ]; then
  case "$entry_state" in
    idle | mix | alloc) say "Slurm is already up ($node $entry_state)"; exit 0 ;;
  esac
fi

[ "$(id -u)" -eq 0 ] || die "Slurm is not up on $node and only root can install and start it"

playbook="${BPCP_VENV_BIN:-$root/.venv/bin}/ansible-playbook"
[ -x "$playbook" ] || playbook="$(command -v ansible-playbook || true)"
[ -n "$playbook" ] || die "no ansible-playbook (run make setup, or put it on PATH)"

inventory="$(mktemp /tmp/bpcp-slurm-local.XXXXXX.yml)"
trap 'rm -f "$inventory"' EXIT
# No munge key given: the role keeps the key the munge package created on this host.
cat >"$inventory" <<YAML
all:
  vars:
    ansible_connection: local
    ansible_python_interpreter: /usr/bin/python3
  children:
    slurm_controller:
      hosts:
        localhost:
    workers:
      hosts:
        localhost:
          slurm_node_name: $node
YAML

say "configuring Slurm on $node with the slurm role (log: $log)"
if ! ANSIBLE_CONFIG="$root/ansible.cfg" ANSIBLE_ROLES_PATH="$root/roles" ANSIBLE_NOCOLOR=1 \
  "$playbook" -i "$inventory" "$root/playbooks/slurm.yml" -e slurm_wait_for_nodes=false "$@" >"$log" 2>&1; then
  reason="$(grep -m1 -E '^(\[ERROR\]|fatal:)' "$log" | cut -c1-300 || true)"
  die "the slurm role failed on $node: ${reason:-see $log} (log: $log)"
fi

# Leftovers of processes that are gone (see the header): only when Slurm was not answering.
if [ -z "$entry_state" ]; then
  mapfile -t leftover < <(timeout 10 squeue --noheader --format=%A 2>/dev/null || true)
  if [ "${#leftover[@]}" -gt 0 ]; then
    timeout 30 scancel --quiet "${leftover[@]}" 2>/dev/null || true
    say "cancelled ${#leftover[@]} jobs left queued from before Slurm was restarted: ${leftover[*]}"
    # A job that ran when its processes were killed stays allocated (completing) until slurmd's
    # late cleanup, about a minute; a node set down and resumed is free at once.
    for _ in 1 2 3 4 5; do [ "$(state)" = idle ] && break; sleep 1; done
    if [ "$(state)" != idle ]; then
      timeout 10 scontrol update nodename="$node" state=down reason="bpcp: jobs left from before a restart" || true
      timeout 10 scontrol update nodename="$node" state=resume || true
    fi
  fi
fi

current=""
for i in $(seq 1 "$wait_s"); do
  current="$(state)"
  case "$current" in
    idle)
      say "Slurm is up ($node idle)"
      exit 0 ;;
    down | drain | drng | drained | draining | fail | failg)
      # ReturnToService=2 brings back a node that registers; a drained one needs a resume.
      if [ $((i % 5)) -eq 1 ]; then
        timeout 10 scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
      fi ;;
  esac
  sleep 1
done
reason="$(timeout 10 sinfo --noheader --Node --nodes="$node" --format='%E' 2>/dev/null | head -n 1 || true)"
queued="$(timeout 10 squeue --noheader --format='%i %j %T %u' 2>/dev/null | head -n 5 | paste -sd ';' - || true)"
die "node $node is not idle after ${wait_s} s (sinfo says: ${current:-no answer}${reason:+, reason: $reason}${queued:+; queued: $queued}); see /var/log/slurm/slurmctld.log and slurmd.log"
