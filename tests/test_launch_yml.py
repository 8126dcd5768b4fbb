"""launch.yml, terminate.yml, inventory/aws_ec2.yml and run.yml -e launch=N against moto's server
on 127.0.0.1 (the launched instances are not machines: no SSH wait, and run.yml's jobs run on this
host with -e launch_add_to_workers=false)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ec2_support import write_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def ansible(aws, tool: str, *argv: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full = {**os.environ, **aws.env, "ANSIBLE_NOCOLOR": "1", **(env or {})}
    return subprocess.run([str(BIN / tool), *argv], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def plain(value):
    """ansible-inventory --list marks strings {"__ansible_unsafe": ...}: the values themselves."""
    if isinstance(value, dict):
        return value["__ansible_unsafe"] if set(value) == {"__ansible_unsafe"} else {k: plain(v) for k, v in value.items()}
    return [plain(v) for v in value] if isinstance(value, list) else value


def live(aws, run: str, states=("pending", "running")) -> list[dict]:
    out = aws.client("ec2").describe_instances(Filters=[{"Name": "tag:bpcp:run", "Values": [run]},
                                                        {"Name": "instance-state-name", "Values": list(states)}])
    return [i for r in out["Reservations"] for i in r["Instances"]]


def test_launch_yml_then_inventory_then_terminate_yml(aws, tmp_path):
    cfg = write_config(tmp_path / "ec2.yml", run="pb-run")
    proc = ansible(aws, "ansible-playbook", "launch.yml", "-e", f"ec2_config={cfg}", "-e", "launch=2",
                   "-e", "launch_wait_ssh=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "planned: 2 x c6i.large" in proc.stdout and "not live prices" in proc.stdout
    assert "started 2 spot x c6i.large" in proc.stdout
    found = live(aws, "pb-run")
    assert len(found) == 2
    for i in found:
        tags = {t["Key"]: t["Value"] for t in i["Tags"]}
        assert tags["bpcp:run"] == "pb-run" and tags["Name"] == "bpcp-pb-run"
    ids = sorted(i["InstanceId"] for i in found)
    for i in ids:
        assert f"(item={i})" in proc.stdout          # add_host, one per instance

    # again with the same config: no new template version
    again = ansible(aws, "ansible-playbook", "launch.yml", "-e", f"ec2_config={cfg}", "-e", "launch=1",
                    "-e", "launch_wait_ssh=false")
    assert again.returncode == 0 and "unchanged, version 1" in again.stdout
    assert len(live(aws, "pb-run")) == 3

    inv = ansible(aws, "ansible-inventory", "-i", "inventory/aws_ec2.yml", "--list", env={"BPCP_RUN": "pb-run"})
    assert inv.returncode == 0, inv.stderr[-2000:]
    groups = plain(json.loads(inv.stdout))
    ips = sorted(i["PublicIpAddress"] for i in live(aws, "pb-run"))
    assert sorted(groups["workers"]["hosts"]) == ips
    hostvars = groups["_meta"]["hostvars"]
    assert {hostvars[ip]["bpcp_instance_id"] for ip in ips} == {i["InstanceId"] for i in live(aws, "pb-run")}
    assert all(hostvars[ip]["ansible_user"] == "admin" and hostvars[ip]["ramdisk_owner"] == "admin" for ip in ips)
    assert hostvars[ips[0]]["parallel_citation_users"] == ["root", "admin"]
    other = ansible(aws, "ansible-inventory", "-i", "inventory/aws_ec2.yml", "--list", env={"BPCP_RUN": "no-such-run"})
    assert "workers" not in json.loads(other.stdout) or not json.loads(other.stdout)["workers"].get("hosts")

    check = ansible(aws, "ansible-playbook", "terminate.yml", "-e", f"ec2_config={cfg}", "--check")
    assert check.returncode == 0 and "would terminate 3 instance(s)" in check.stdout
    assert len(live(aws, "pb-run")) == 3
    proc = ansible(aws, "ansible-playbook", "terminate.yml", "-e", "ec2_run=pb-run", "-e", f"ec2_config={cfg}")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "terminated 3 instance(s)" in proc.stdout and "used: 3 instance(s)" in proc.stdout
    assert live(aws, "pb-run") == []
    assert len(live(aws, "pb-run", ("terminated",))) == 3


def test_launch_yml_check_mode_launches_nothing(aws, tmp_path):
    cfg = write_config(tmp_path / "ec2.yml", run="pb-check")
    proc = ansible(aws, "ansible-playbook", "launch.yml", "-e", f"ec2_config={cfg}", "-e", "launch=2", "--check")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "planned: 2 x c6i.large" in proc.stdout
    ec2 = aws.client("ec2")
    assert ec2.describe_launch_templates()["LaunchTemplates"] == [] and live(aws, "pb-check") == []


def test_launch_yml_with_a_bad_config_launches_nothing(aws, tmp_path):
    cfg = write_config(tmp_path / "ec2.yml", run="pb-bad", root_volume_gb=2)
    proc = ansible(aws, "ansible-playbook", "launch.yml", "-e", f"ec2_config={cfg}", "-e", "launch=1",
                   "-e", "launch_wait_ssh=false")
    assert proc.returncode != 0
    assert "root_volume_gb: 2: give whole GiB from 8" in proc.stdout
    assert aws.client("ec2").describe_launch_templates()["LaunchTemplates"] == []


# ------------------------------------------------------------------ run.yml -e launch=N
SECRET = "PLANTEDrunSecretKEYabcdef0123456789PLANTED"
TOKEN = "PLANTEDrunSessionTOKEN9876543210PLANTED"


@pytest.fixture(scope="module")
def broken_plate(tmp_path_factory) -> Path:
    """Two wells, one image set each; the DNA image of well A02 is not an image (CellProfiler fails)."""
    from bpcp.example import PlateSpec, generate_plate

    root = generate_plate(tmp_path_factory.mktemp("broken"), PlateSpec(rows="A", columns=2, sites=1))
    bad = sorted(root.rglob("*A02_s1_w1*"))
    assert bad, sorted(p.name for p in root.rglob("*.png"))
    bad[0].write_bytes(b"not a png at all\n" * 4)
    return root


def run_yml(aws, plate: Path, out: Path, cp_venv: str, cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    return ansible(aws, "ansible-playbook", "run.yml", "-e", f"dataset={plate / 'load_data.csv'}",
                   "-e", f"pipeline={plate / 'example_loaddata.cppipe'}", "-e", f"output={out}",
                   "-e", f"cellprofiler_version={Path(cp_venv).name}", "-e", "bundle=0", "-e", "retries=1",
                   "-e", "launch=2", "-e", f"ec2_config={cfg}", "-e", "launch_add_to_workers=false",
                   "-e", "launch_wait_ssh=false", *extra,
                   env={"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN}, timeout=1200)


@pytest.mark.cellprofiler
@pytest.mark.slow
def test_run_yml_terminates_what_it_launched_when_a_job_fails(aws, broken_plate, tmp_path, cp_venv):
    cfg = write_config(tmp_path / "ec2.yml", run="run-fails")
    proc = run_yml(aws, broken_plate, tmp_path / "run", cp_venv, cfg)
    assert proc.returncode != 0, proc.stdout[-4000:]
    assert "started 2 spot x c6i.large" in proc.stdout
    assert "the run is incomplete" in proc.stdout                     # a job failed midway...
    assert "RUNNING HANDLER [Terminate the launched workers]" in proc.stdout
    assert "terminated 2 instance(s)" in proc.stdout and "used: 2 instance(s)" in proc.stdout
    assert live(aws, "run-fails") == []                                # ...and every worker is gone
    assert len(live(aws, "run-fails", ("terminated",))) == 2
    assert list((tmp_path / "run" / "failed").iterdir())                # the failure was a real one
    # no credential in anything the run wrote or printed
    texts = [proc.stdout, proc.stderr]
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file() and f.suffix not in (".parquet", ".png", ".tif"):
            texts.append(f.read_text(errors="replace"))
    joined = "\n".join(texts)
    assert "jobs.sh" in {f.name for f in (tmp_path / "run").iterdir()}
    for planted in (SECRET, TOKEN):
        assert planted not in joined


@pytest.mark.cellprofiler
@pytest.mark.slow
def test_run_yml_keep_true_leaves_the_workers_running(aws, broken_plate, tmp_path, cp_venv):
    cfg = write_config(tmp_path / "ec2.yml", run="run-keeps", market="on-demand")
    proc = run_yml(aws, broken_plate, tmp_path / "run", cp_venv, cfg, "-e", "keep=true")
    assert proc.returncode != 0, proc.stdout[-4000:]
    assert "keep=true: the EC2 workers of this run keep running" in proc.stdout
    assert len(live(aws, "run-keeps")) == 2
    done = ansible(aws, "ansible-playbook", "terminate.yml", "-e", f"ec2_config={cfg}")
    assert done.returncode == 0 and live(aws, "run-keeps") == []


@pytest.mark.cellprofiler
def test_run_yml_terminates_when_no_launched_worker_answers(aws, broken_plate, tmp_path, cp_venv):
    """The launched hosts join bpcp_launched and are the only workers; moto's addresses answer no
    SSH, so configuring them and the worker check leave them all out, and the last play stops -
    after terminating them."""
    cfg = write_config(tmp_path / "ec2.yml", run="run-unreachable")
    proc = ansible(aws, "ansible-playbook", "run.yml", "-e", f"dataset={broken_plate / 'load_data.csv'}",
                   "-e", f"pipeline={broken_plate / 'example_loaddata.cppipe'}", "-e", f"output={tmp_path / 'run'}",
                   "-e", f"cellprofiler_version={Path(cp_venv).name}", "-e", "launch=2", "-e", f"ec2_config={cfg}",
                   "-e", "launch_wait_ssh=false", "-e", "bpcp_workers=bpcp_launched", "-e", "launch_configure=true",
                   env={"ANSIBLE_TIMEOUT": "5"}, timeout=600)
    assert proc.returncode != 0
    assert "none of the hosts in bpcp_launched" in proc.stdout, proc.stdout[-4000:]
    assert "Wait until cloud-init is done" in proc.stdout
    assert "terminated 2 instance(s)" in proc.stdout
    assert live(aws, "run-unreachable") == []
    assert not (tmp_path / "run" / "joblog.tsv").exists()
