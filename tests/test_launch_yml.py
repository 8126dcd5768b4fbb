"""launch.yml, terminate.yml, inventory/aws_ec2.yml and run.yml -e launch=N against moto's server
on 127.0.0.1 (the launched instances are not machines: no SSH wait, and run.yml's jobs run on this
host with -e launch_add_to_workers=false)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert all(hostvars[ip]["ansible_user"] == "admin" for ip in ips)
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
