"""Docker containers as bpcp worker hosts for the multi-host tests.

Each container shares the host's network (no registry, no bridge needed) and runs its own sshd on
a distinct 127.0.0.1 port, so the controller reaches it over real SSH. The image is the local
Debian base (scripts/build-base-image.sh) configured once by `ansible-playbook site.yml` through
Docker's connection, then committed; it is rebuilt when the roles or site.yml change.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "bpcp-base:bookworm"
WORKER_IMAGE = "bpcp-worker:test"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
# The image's sshd is sized by the role as for a 96-slot host (MaxSessions 202, MaxStartups 202:30:404).
SSHD_SLOTS = 96
SSHD_LOG = "/var/log/bpcp-sshd.log"     # each worker's sshd log: one "Accepted publickey" line per handshake


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], check=check, capture_output=True, text=True, timeout=timeout)


def docker_ready() -> bool:
    return shutil.which("docker") is not None and docker("info", check=False, timeout=30).returncode == 0


def _roles_digest() -> str:
    digest = hashlib.sha256(f"sshd_slots={SSHD_SLOTS}".encode())
    for path in sorted([ROOT / "site.yml", ROOT / "playbooks" / "site.yml", *(ROOT / "roles").rglob("*")]):
        if path.is_file():
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_worker_image() -> str:
    """bpcp-worker:test: the base image + openssh-server, configured by site.yml (once per roles digest).

    BPCP_WORKER_IMAGE_REUSE=1 takes the image there whatever roles built it (for a developer whose
    tree's roles change under them while they work on something else; CI never sets it)."""
    digest = _roles_digest()
    found = docker("image", "inspect", "--format", "{{ index .Config.Labels \"bpcp.roles\" }}", WORKER_IMAGE,
                   check=False)
    if found.returncode == 0 and (found.stdout.strip() == digest or os.environ.get("BPCP_WORKER_IMAGE_REUSE") == "1"):
        return WORKER_IMAGE
    subprocess.run(["bash", str(ROOT / "scripts" / "build-base-image.sh")], check=True, capture_output=True,
                   timeout=1200)
    name = f"bpcp-test-build-{os.getpid()}"
    docker("rm", "-f", name, check=False)
    docker("run", "-d", "--name", name, "--network", "host", "--cap-add", "SYS_ADMIN",
           "-v", f"{CA_BUNDLE}:/etc/ssl/host-ca-certificates.crt:ro", "-e", "PIP_CERT=/etc/ssl/host-ca-certificates.crt",
           BASE_IMAGE, "sleep", "infinity")
    try:
        docker("exec", name, "bash", "-c",
               "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server",
               timeout=900)
        inventory = ROOT / ".cache" / f"build-inventory-{os.getpid()}.yml"
        inventory.parent.mkdir(exist_ok=True)
        inventory.write_text(json.dumps({"all": {"children": {"workers": {"hosts": {name: {
            "ansible_connection": "community.docker.docker", "ansible_python_interpreter": "/usr/bin/python3",
        }}}}}}))
        proc = subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(inventory), str(ROOT / "site.yml"),
                               "-e", "ramdisk_size=512M", "-e", f"bpcp_worker_sshd_slots={SSHD_SLOTS}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=2400)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        docker("commit", "--change", f"LABEL bpcp.roles={digest}", name, WORKER_IMAGE)
    finally:
        docker("rm", "-f", name, check=False)
    return WORKER_IMAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Worker:
    name: str
    port: int

    def inventory_vars(self, key: Path) -> dict:
        return {
            "ansible_host": "127.0.0.1", "ansible_port": self.port, "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key), "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        }

    def stop(self) -> None:
        docker("kill", self.name, check=False)

    def exec(self, command: str) -> str:
        return docker("exec", self.name, "bash", "-c", command).stdout

    def handshakes(self) -> int:
        """SSH logins this worker's sshd accepted so far (each a full key exchange and authentication)."""
        return int(self.exec(f"grep -c 'Accepted publickey' {SSHD_LOG} || true").strip() or 0)


def start_worker(name: str, key: Path, shared: tuple[Path, ...] = ()) -> Worker:
    """A running worker container with sshd on a free 127.0.0.1 port, reachable with key; each
    folder of `shared` bind-mounted at its own path (a filesystem it shares with this host)."""
    port = free_port()
    docker("rm", "-f", name, check=False)
    docker("run", "-d", "--name", name, "--network", "host", "--cap-add", "SYS_ADMIN",
           *[arg for folder in shared for arg in ("-v", f"{folder}:{folder}")],
           "--label", "bpcp.test=1", WORKER_IMAGE, "sleep", "infinity")
    pub = key.with_suffix(".pub").read_text().strip()
    docker("exec", name, "bash", "-c",
           f"mkdir -p /run/sshd /root/.ssh && echo '{pub}' > /root/.ssh/authorized_keys && "
           f"chmod 700 /root/.ssh && chmod 600 /root/.ssh/authorized_keys && echo {name} > /etc/bpcp-test-host && "
           f"ssh-keygen -A >/dev/null && /usr/sbin/sshd -p {port} -o ListenAddress=127.0.0.1 "
           f"-o PermitRootLogin=prohibit-password -E {SSHD_LOG}")   # MaxStartups, MaxSessions, ClientAlive*: the role's
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        probe = subprocess.run(["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes",
                                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                "-o", "LogLevel=ERROR", "root@127.0.0.1", "cat /etc/bpcp-test-host"],
                               capture_output=True, text=True, timeout=30)
        if probe.stdout.strip() == name:
            return Worker(name, port)
        time.sleep(1)
    raise RuntimeError(f"{name}: sshd on port {port} did not answer within 60 s")


def make_key(folder: Path) -> Path:
    key = folder / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def write_inventory(path: Path, workers: list[Worker], key: Path, extra: dict[str, dict] | None = None) -> Path:
    hosts = {w.name: w.inventory_vars(key) for w in workers}
    hosts.update(extra or {})
    path.write_text(json.dumps({"all": {"children": {"workers": {"hosts": hosts}}}}, indent=1))
    return path
