"""Real sshd hosts on 127.0.0.1 without Docker, for the shared-filesystem tests.

Each host is this machine's own /usr/sbin/sshd on a free port, reached with a key of the test's
own; `hide` starts it in a mount namespace of its own (unshare -m) with an empty tmpfs over each
folder given, so that host does not see those folders: a worker without the shared mount.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from container_hosts import free_port, make_key

SSHD = "/usr/sbin/sshd"
SSH_OPTIONS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
ROOT = Path(__file__).resolve().parents[1]
# run.yml's connection sharing and the bpcp_worker role's ClientAlive settings, from where they are set
SSH_SHARE = yaml.safe_load((ROOT / "playbooks" / "vars" / "run_defaults.yml").read_text())["bpcp_ssh_control_args"]
_ROLE = yaml.safe_load((ROOT / "roles" / "bpcp_worker" / "defaults" / "main.yml").read_text())
ROLE_CLIENT_ALIVE = (f"ClientAliveInterval {_ROLE['bpcp_worker_sshd_client_alive_interval']}\n"
                     f"ClientAliveCountMax {_ROLE['bpcp_worker_sshd_client_alive_count_max']}\n")


def sshd_ready() -> bool:
    return os.path.exists(SSHD) and shutil.which("ssh") is not None and os.geteuid() == 0


def namespaces_ready() -> bool:
    """Whether this process may start a mount namespace with a tmpfs in it (unshare -m, as root)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                          capture_output=True).returncode == 0


@dataclass
class Host:
    port: int
    key: Path
    proc: subprocess.Popen

    @property
    def name(self) -> str:
        return f"root@127.0.0.1:{self.port}"

    def sshlogin(self, slots: int = 1, share: bool = True) -> str:
        """A line of GNU parallel's sshlogin file, as run.yml writes them (share: its ssh_share)."""
        return f"{slots}/ssh {SSH_SHARE + ' ' if share else ''}-p {self.port} -i {self.key} {SSH_OPTIONS} -l root 127.0.0.1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


def start_host(folder: Path, hide: tuple[Path, ...] = (), settings: str = "") -> Host:
    """An sshd on a free 127.0.0.1 port that lets root in with folder's key; not seeing `hide`;
    settings: more sshd_config lines."""
    folder.mkdir(parents=True, exist_ok=True)
    key = make_key(folder)
    port = free_port()
    host_key = folder / f"host-{port}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    config = folder / f"sshd-{port}.conf"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
                      f"AuthorizedKeysFile {key}.pub\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                      f"StrictModes no\nUsePAM no\nPidFile {folder}/sshd-{port}.pid\nMaxStartups 100\nMaxSessions 100\n{settings}")
    Path("/run/sshd").mkdir(exist_ok=True)
    argv = [SSHD, "-D", "-e", "-f", str(config)]
    if hide:
        mounts = " && ".join(f"mount -t tmpfs tmpfs '{p}'" for p in hide)
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && exec {' '.join(argv)}"]
    log = (folder / f"sshd-{port}.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    host = Host(port, key, proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = subprocess.run(["ssh", "-p", str(port), "-i", str(key), "-o", "BatchMode=yes", *SSH_OPTIONS.split(),
                                "root@127.0.0.1", "true"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return host
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    host.stop()
    raise RuntimeError(f"sshd on port {port} did not answer: {(folder / f'sshd-{port}.log').read_text()[-2000:]}")
