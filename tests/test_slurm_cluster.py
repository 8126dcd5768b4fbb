"""Real Slurm: a container cluster built by the slurm role, and the single-node Slurm on this host.

The cluster test starts a controller and two compute containers (tests/slurm_cluster.py, about a
minute) and runs a 4-task job array writing into the shared bind mount. The localhost test runs
scripts/start-slurm-local.sh and one job through it. The bad-variable cases run the role in
--check mode on localhost and stop at its checks, before anything is installed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess

import pytest
from conftest import require

from slurm_cluster import ANSIBLE_PLAYBOOK, ROOT, docker_ready, slurm_cluster

START_LOCAL = ROOT / "scripts" / "start-slurm-local.sh"


@pytest.mark.docker
@pytest.mark.slow
def test_job_array_runs_over_the_container_cluster(tmp_path):
    require("Docker", docker_ready(), "no Docker engine (scripts/ensure-docker.sh starts one)")
    shared = tmp_path / "shared"
    with slurm_cluster(shared) as cluster:
        assert cluster.node_states() == dict.fromkeys(cluster.computes, "idle")
        # --exclusive: one task per node at a time, so the first two tasks land on different nodes.
        job = cluster.exec(
            f"sbatch --parsable --wait --array=0-3 --exclusive --mem=100M --chdir={shared} "
            f"--output={shared}/task_%a.out "
            "--wrap='echo $SLURM_ARRAY_TASK_ID $SLURMD_NODENAME $(hostname); sleep 1'").stdout.strip()
        jobcomp = cluster.exec(f"grep 'ArrayJobId={job} ' /var/log/slurm/jobcomp.log").stdout.splitlines()

    outputs = {p.name: p.read_text().split() for p in sorted(shared.glob("task_*.out"))}
    assert sorted(outputs) == [f"task_{i}.out" for i in range(4)], outputs
    nodes = set()
    for name, (task, node, hostname) in outputs.items():
        assert name == f"task_{task}.out"
        assert node == hostname and node in cluster.computes, outputs
        nodes.add(node)
    assert len(nodes) >= 2, f"all tasks ran on {nodes}"
    assert len(jobcomp) == 4 and all("JobState=COMPLETED " in line for line in jobcomp), jobcomp


def _sinfo_states() -> list[str]:
    proc = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], capture_output=True, text=True,
                          timeout=30)
    return proc.stdout.splitlines()


@pytest.mark.slurm
def test_start_slurm_local_runs_a_job(tmp_path):
    require("Slurm (or root to install it)", os.geteuid() == 0 or shutil.which("sinfo"),
            "scripts/start-slurm-local.sh needs root to install and start Slurm")
    first = subprocess.run(["bash", str(START_LOCAL)], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    node = socket.gethostname().split(".")[0]
    assert f"{node} idle" in _sinfo_states() or f"{node} mix" in _sinfo_states(), _sinfo_states()

    again = subprocess.run(["bash", str(START_LOCAL)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already up" in again.stdout, again.stdout + again.stderr

    out = tmp_path / "hello.out"
    job = subprocess.run(["sbatch", "--parsable", "--wait", "--mem=100M", f"--chdir={tmp_path}",
                          f"--output={out}", "--wrap=echo hello from $SLURMD_NODENAME"],
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout + job.stderr
    assert out.read_text().strip() == f"hello from {node}"


BAD_VARS = [
    pytest.param({"slurm_max_array_size": 0}, r"slurm_max_array_size must be 1-4000001", id="array-size"),
    pytest.param({"slurm_munge_key": "short"}, r"slurm_munge_key is shorter than 32 bytes", id="short-key"),
    pytest.param({"slurm_munge_key": "k" * 40, "slurm_munge_key_file": "/etc/hostname"},
                 r"set slurm_munge_key or slurm_munge_key_file, not both", id="two-keys"),
    pytest.param({"slurm_partitions": [{"name": "big", "nodes": ["nowhere"]}]},
                 r"partition nodes nowhere are not in group 'workers'", id="partition-node"),
    pytest.param({"slurm_compute_group": "nodes"},
                 r"inventory group 'nodes' \(slurm_compute_group\) is missing or empty", id="no-compute-group"),
]


@pytest.mark.parametrize("extra_vars, message", BAD_VARS)
def test_bad_slurm_vars_fail_first_with_one_line(tmp_path, extra_vars, message):
    inventory = tmp_path / "inventory.json"
    local = {"localhost": {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}}
    inventory.write_text(json.dumps({"all": {"children": {"slurm_controller": {"hosts": local},
                                                          "workers": {"hosts": local}}}}))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    proc = subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(inventory), str(ROOT / "playbooks" / "slurm.yml"), "--check",
                           "-e", json.dumps(extra_vars)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert re.search(message, out), out[-2000:]
    assert re.search(r"localhost\s+:\s+ok=\d+\s+changed=0\s", out), out[-2000:]
