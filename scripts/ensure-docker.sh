#!/usr/bin/env bash
# Make sure a Docker engine answers on this host (Debian/Ubuntu, run as root).
# - installs docker.io with apt when no docker client/daemon is present;
# - starts dockerd in the background when none is running;
# - waits at most BPCP_DOCKER_WAIT seconds (default 60) for `docker info`.
# Idempotent: does nothing when `docker info` already works.
set -euo pipefail

wait_s="${BPCP_DOCKER_WAIT:-60}"
log="${BPCP_DOCKERD_LOG:-/var/log/bpcp-dockerd.log}"

# A killed daemon can stay a zombie until init reaps it (seen right after a machine's processes
# were all ended): it must not count as running, and a pid file naming it must go, or the new
# dockerd refuses to start (docker.pid) or waits for a containerd that never answers.
live_pid() {
  local state
  state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)"
  [ -n "$state" ] && [ "$state" != Z ]
}
live_dockerd() {
  local pid
  for pid in $(pgrep -x dockerd || true); do
    live_pid "$pid" && return 0
  done
  return 1
}
drop_stale_pidfiles() {
  local file pid
  for file in /var/run/docker.pid /var/run/docker/containerd/containerd.pid; do
    pid="$(cat "$file" 2>/dev/null || true)"
    [ -n "$pid" ] && live_pid "$pid" && continue
    rm -f "$file"
  done
}

if docker info >/dev/null 2>&1; then
  echo "ensure-docker: engine already running"
  exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-docker: dockerd missing and not root; install docker.io first" >&2
    exit 1
  fi
  echo "ensure-docker: installing docker.io"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q docker.io
fi

if docker info >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-docker: no engine is running and only root can start dockerd" >&2
  exit 1
fi

# Prefer the init system when there is one; fall back to a plain background dockerd.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl start docker || true
fi
if ! docker info >/dev/null 2>&1 && ! live_dockerd; then
  drop_stale_pidfiles
  echo "ensure-docker: starting dockerd (log: $log)"
  nohup dockerd >"$log" 2>&1 &
fi

for _ in $(seq 1 "$wait_s"); do
  if docker info >/dev/null 2>&1; then
    echo "ensure-docker: engine is up"
    exit 0
  fi
  sleep 1
done
echo "ensure-docker: docker engine did not answer within ${wait_s}s; see $log" >&2
tail -n 20 "$log" >&2 || true
exit 1
