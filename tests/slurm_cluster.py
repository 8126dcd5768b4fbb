"""A Slurm cluster in Docker containers, configured by the `slurm` role, for end-to-end tests.

`slurm_cluster(shared)` (a context manager) or `start_cluster(shared)` + `SlurmCluster.stop()`:

1. The image `bpcp-slurm:test` is the local Debian base (scripts/build-base-image.sh) with the
   role's packages (`slurm_packages` in roles/slurm/defaults/main.yml) installed, built once and
   rebuilt when the base image or that list changes. The role itself runs at every start.
2. One user-defined bridge network per cluster: every container has its own hostname (= Slurm
   node name) and address, Docker's DNS resolves the names, nothing touches the host's ports
   (a single-node Slurm on the host, scripts/start-slurm-local.sh, keeps 6817/6818).
3. Containers `<prefix>-ctl` (slurmctld; inventory group slurm_controller) and `<prefix>-c1` ..
   `<prefix>-cN` (slurmd; group workers). The host folder `shared` is bind-mounted at the same
   path in all of them (the cluster's shared filesystem), /opt/cellprofiler read-only when the
   host has it, plus `extra_mounts` (docker -v specs, e.g. the repository and its venv's Python
   for running bpcp itself in the containers).
4. `ansible-playbook playbooks/slurm.yml` over Docker's connection, with a fresh munge key
   (`slurm_munge_key_file`); the role waits until every node answers, then this module waits
   until `sinfo` shows them all idle.

Submit from the controller: `cluster.exec("sbatch --wait ...")`, or from this host as a login
node: `start_cluster(..., munge_key=Path("/etc/munge/munge.key"))` gives the cluster this host's
munge key (its munged must run: scripts/start-slurm-local.sh starts it), and Slurm's commands here
reach the cluster with `env=cluster.client_env()` (SLURM_CONF: the cluster's slurm.conf, naming
the controller by its address on the bridge network). Each container is named after its node, so
`docker kill` of `cluster.computes[0]` takes that node away mid-run.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from container_hosts import BASE_IMAGE, ROOT, docker, docker_ready

SLURM_IMAGE = "bpcp-slurm:test"
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
CELLPROFILER_DIR = Path("/opt/cellprofiler")

__all__ = ["SLURM_IMAGE", "SlurmCluster", "docker_ready", "ensure_slurm_image", "slurm_cluster", "start_cluster"]


def _role_packages() -> list[str]:
    defaults = yaml.safe_load((ROOT / "roles" / "slurm" / "defaults" / "main.yml").read_text())
    return list(defaults["slurm_packages"])


def ensure_slurm_image() -> str:
    """bpcp-slurm:test: the base image with the slurm role's packages (once per base image and list)."""
    subprocess.run(["bash", str(ROOT / "scripts" / "build-base-image.sh")], check=True, capture_output=True,
                   timeout=1200)
    packages = _role_packages()
    base_id = docker("image", "inspect", "--format", "{{.Id}}", BASE_IMAGE).stdout.strip()
    digest = hashlib.sha256(json.dumps([base_id, packages]).encode()).hexdigest()[:16]
    found = docker("image", "inspect", "--format", '{{ index .Config.Labels "bpcp.slurm" }}', SLURM_IMAGE,
                   check=False)
    if found.returncode == 0 and found.stdout.strip() == digest:
        return SLURM_IMAGE
    name = f"bpcp-slurm-build-{secrets.token_hex(3)}"
    docker("run", "-d", "--name", name, BASE_IMAGE, "sleep", "infinity")
    try:
        docker("exec", name, "bash", "-c",
               "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
               f"--no-install-recommends {' '.join(packages)} >/dev/null && rm -rf /var/lib/apt/lists/*",
               timeout=900)
        docker("commit", "--change", f"LABEL bpcp.slurm={digest}", name, SLURM_IMAGE)
    finally:
        docker("rm", "-f", name, check=False)
    return SLURM_IMAGE


@dataclass
class SlurmCluster:
    """A running container cluster; container names are the Slurm node names."""

    prefix: str
    controller: str
    computes: list[str]
    network: str
    shared: Path
    workdir: Path
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "ansible.log"

    @property
    def containers(self) -> list[str]:
        return [self.controller, *self.computes]

    def exec(self, command: str, node: str | None = None, check: bool = True,
             timeout: float = 600) -> subprocess.CompletedProcess:
        """Run `bash -c command` as root on a node (default: the controller)."""
        proc = docker("exec", node or self.controller, "bash", "-c", command, check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{node or self.controller}: {command!r} exited {proc.returncode}\n"
                                 f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc

    def node_states(self) -> dict[str, str]:
        """sinfo's compact state per node (idle, alloc, mix, down*, ...)."""
        out = self.exec("sinfo --noheader --Node --format='%N %t'", check=False).stdout
        return dict(line.split(maxsplit=1) for line in out.splitlines() if line.strip())

    def wait_idle(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if sorted(states) == sorted(self.computes) and set(states.values()) == {"idle"}:
                return
            time.sleep(1)
        raise RuntimeError(f"{self.prefix}: nodes not idle after {timeout:.0f} s: {states}")

    def client_env(self) -> dict[str, str]:
        """The environment for Slurm's commands on this host to talk to this cluster: SLURM_CONF is
        the controller's slurm.conf with the controller's address (this host has no Docker DNS)."""
        conf = self.workdir / "slurm.conf"
        if not conf.exists():
            text = docker("exec", self.controller, "cat", "/etc/slurm/slurm.conf").stdout
            address = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                             self.controller).stdout.strip()
            text, found = re.subn(rf"^SlurmctldHost={re.escape(self.controller)}\s*$",
                                  f"SlurmctldHost={self.controller}({address})", text, flags=re.MULTILINE)
            assert found == 1 and address, f"{self.controller}: no SlurmctldHost line or address ({address!r})"
            conf.write_text(text)
        return {**os.environ, "SLURM_CONF": str(conf)}

    def kill(self, node: str) -> None:
        """docker kill a node (a node failure)."""
        docker("kill", node, check=False)

    def stop(self) -> None:
        for name in self.containers:
            docker("rm", "-f", name, check=False)
        docker("network", "rm", self.network, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _inventory(cluster: SlurmCluster, key: Path) -> dict:
    def host() -> dict:
        return {"ansible_connection": "community.docker.docker", "ansible_python_interpreter": "/usr/bin/python3"}

    return {"all": {
        "vars": {"slurm_munge_key_file": str(key), "slurm_cluster_name": "bpcptest"},
        "children": {
            "slurm_controller": {"hosts": {cluster.controller: host()}},
            "workers": {"hosts": {name: host() for name in cluster.computes}},
        },
    }}


def start_cluster(shared: Path, computes: int = 2, prefix: str | None = None,
                  extra_mounts: Sequence[str] = (), extra_vars: dict | None = None,
                  munge_key: Path | None = None) -> SlurmCluster:
    """Start a controller and `computes` compute containers, configure them with the role, wait idle.

    `shared` is created if missing and mounted at the same path everywhere. `extra_vars` go to
    ansible-playbook (e.g. {"slurm_max_array_size": 5}). `munge_key`: the key file to give every
    node (e.g. this host's, to submit from here; default a fresh one). Stops what it started when
    it fails.
    """
    ensure_slurm_image()
    shared = Path(shared).resolve()
    shared.mkdir(parents=True, exist_ok=True)
    prefix = prefix or f"bpcp-slurm-{secrets.token_hex(3)}"
    cluster = SlurmCluster(prefix=prefix, controller=f"{prefix}-ctl",
                           computes=[f"{prefix}-c{i}" for i in range(1, computes + 1)],
                           network=f"{prefix}-net", shared=shared,
                           workdir=Path(tempfile.mkdtemp(prefix=f"{prefix}-")))
    mounts = [f"{shared}:{shared}"]
    if CELLPROFILER_DIR.is_dir():
        mounts.append(f"{CELLPROFILER_DIR}:{CELLPROFILER_DIR}:ro")
    mounts += list(extra_mounts)
    try:
        docker("network", "create", "--label", "bpcp.test=1", cluster.network)
        for name in cluster.containers:
            docker("run", "-d", "--name", name, "--hostname", name, "--network", cluster.network,
                   "--label", "bpcp.test=1", *[arg for m in mounts for arg in ("-v", m)],
                   SLURM_IMAGE, "sleep", "infinity")
        key = cluster.workdir / "munge.key"
        if munge_key is not None:
            shutil.copyfile(munge_key, key)
        else:
            key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        inventory = cluster.workdir / "inventory.json"
        inventory.write_text(json.dumps(_inventory(cluster, key), indent=1))
        env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
        argv = [ANSIBLE_PLAYBOOK, "-i", str(inventory), str(ROOT / "playbooks" / "slurm.yml")]
        if extra_vars:
            argv += ["-e", json.dumps(extra_vars)]
        with cluster.log.open("w") as log:
            proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{prefix}: the slurm role failed (exit {proc.returncode}):\n"
                               + cluster.log.read_text()[-4000:])
        cluster.wait_idle()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextmanager
def slurm_cluster(shared: Path, **kwargs) -> Iterator[SlurmCluster]:
    """`with slurm_cluster(tmp_path / "shared") as cluster:` ... torn down on exit."""
    cluster = start_cluster(shared, **kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()
