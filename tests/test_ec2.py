"""bpcp ec2: launch templates, launching (spot, on-demand fallback), listing, terminating, cost, and
the config's checks. Every AWS call goes to moto's server on 127.0.0.1 (fixture `aws`)."""
from __future__ import annotations

import base64
import json

import pytest
import yaml
from botocore.exceptions import ClientError, NoCredentialsError

from bpcp.aws import client as aws_client
from bpcp.aws import s3
from bpcp.aws.client import explain
from bpcp.aws.launch_template import load_config, template_data, user_data
from bpcp.cli import main
from bpcp.errors import BpcpError

from container_hosts import free_port
from ec2_support import SpotRefusingProxy, write_config


def bpcp(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def instances(ec2, run: str | None = None, states=("pending", "running")) -> list[dict]:
    filters = [{"Name": "instance-state-name", "Values": list(states)}]
    if run:
        filters.append({"Name": "tag:bpcp:run", "Values": [run]})
    return [i for r in ec2.describe_instances(Filters=filters)["Reservations"] for i in r["Instances"]]


def tags_of(instance: dict) -> dict:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


# ------------------------------------------------------------------ launch template
def test_template_created_then_same_config_adds_no_version_and_a_change_adds_one(aws, tmp_path, capsys):
    cfg = write_config(tmp_path / "ec2.yml")
    ec2 = aws.client("ec2")
    rc, out, _ = bpcp(capsys, "ec2", "template", "-c", str(cfg))
    assert rc == 0 and "created, default version 1" in out
    [lt] = ec2.describe_launch_templates(LaunchTemplateNames=["bpcp-test-run"])["LaunchTemplates"]
    assert (lt["LatestVersionNumber"], lt["DefaultVersionNumber"]) == (1, 1)
    assert {"Key": "bpcp:run", "Value": "test-run"} in lt["Tags"]
    version = ec2.describe_launch_template_versions(LaunchTemplateName="bpcp-test-run")["LaunchTemplateVersions"][0]
    data = version["LaunchTemplateData"]
    assert data["InstanceType"] == "c6i.large" and data["ImageId"] == "ami-12c6146b"
    assert data["IamInstanceProfile"] == {"Name": "bpcp-worker"}
    assert data["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 20
    instance_tags = next(s["Tags"] for s in data["TagSpecifications"] if s["ResourceType"] == "instance")
    assert {"Key": "bpcp:run", "Value": "test-run"} in instance_tags
    assert base64.b64decode(data["UserData"]).decode().startswith("#cloud-config")

    rc, out, _ = bpcp(capsys, "ec2", "template", "-c", str(cfg))
    assert rc == 0 and "unchanged, default version 1" in out
    lt = ec2.describe_launch_templates(LaunchTemplateNames=["bpcp-test-run"])["LaunchTemplates"][0]
    assert lt["LatestVersionNumber"] == 1

    write_config(cfg, instance_type="c6i.xlarge")
    rc, out, _ = bpcp(capsys, "ec2", "template", "-c", str(cfg), "--json")
    assert rc == 0 and json.loads(out) | {"id": None} == {"action": "updated", "name": "bpcp-test-run", "version": 2,
                                                          "id": None}
    lt = ec2.describe_launch_templates(LaunchTemplateNames=["bpcp-test-run"])["LaunchTemplates"][0]
    assert (lt["LatestVersionNumber"], lt["DefaultVersionNumber"]) == (2, 2)
    latest = ec2.describe_launch_template_versions(LaunchTemplateName="bpcp-test-run", Versions=["$Default"])
    assert latest["LaunchTemplateVersions"][0]["LaunchTemplateData"]["InstanceType"] == "c6i.xlarge"
    # and back to the first config: a new version again (3), not a silent reuse of an old one
    write_config(cfg)
    bpcp(capsys, "ec2", "template", "-c", str(cfg))
    lt = ec2.describe_launch_templates(LaunchTemplateNames=["bpcp-test-run"])["LaunchTemplates"][0]
    assert (lt["LatestVersionNumber"], lt["DefaultVersionNumber"]) == (3, 3)


def test_dry_run_prints_the_requests_and_sends_nothing(aws, tmp_path, capsys):
    cfg = write_config(tmp_path / "ec2.yml")
    rc, out, _ = bpcp(capsys, "ec2", "template", "-c", str(cfg), "--dry-run")
    assert rc == 0
    request = json.loads(out[out.index("{"):])
    assert request["LaunchTemplateName"] == "bpcp-test-run"
    assert request["LaunchTemplateData"] == template_data(load_config(cfg))
    rc, out, _ = bpcp(capsys, "ec2", "launch", "-c", str(cfg), "-n", "3", "--dry-run")
    assert rc == 0 and "planned: 3 x c6i.large" in out
    sent = json.loads(out[out.index("{"):])
    assert sent["RunInstances"]["MinCount"] == 3
    assert sent["RunInstances"]["InstanceMarketOptions"]["MarketType"] == "spot"
    ec2 = aws.client("ec2")
    assert ec2.describe_launch_templates()["LaunchTemplates"] == []
    assert instances(ec2) == []


# ------------------------------------------------------------------ bad configs
BAD = [
    ({"instance_type": "c6i.4xlarg"}, "instance_type: c6i.4xlarg is not in", "c6i.4xlarge"),
    ({"root_volume_gb": 4}, "root_volume_gb: 4: give whole GiB from 8", None),
    ({"market": "cheap"}, "market: 'cheap': give spot", None),
    ({"ami": None}, "ami: missing; give the AMI id", None),
    ({"ami": "debian-12"}, "ami: 'debian-12' is not an AMI id", None),
    ({"instance_typo": "c6i.large"}, "instance_typo: unknown setting; did you mean instance_type?", None),
    ({"spot_max_price": "cheap"}, "spot_max_price: 'cheap': give USD per hour", None),
    ({"user_data": "ansible"}, "user_data: 'ansible': give prepare", None),
    ({"security_group_ids": ["default"]}, "security_group_ids: ['default']: give a list of security group ids", None),
    ({"tags": {"bpcp:run": "other"}}, "tags: bpcp:run: reserved", None),
    ({"tags": {"owner": "AKIAIOSFODNN7EXAMPLE"}}, "tags.owner: looks like an AWS credential", None),
    ({"run": "my run"}, "run: 'my run': use 1-63 letters", None),
]


@pytest.mark.parametrize("change,message,hint", BAD, ids=[m.split(":")[0] for _, m, _ in BAD])
def test_a_bad_config_is_one_clear_line_and_exit_2(tmp_path, capsys, change, message, hint):
    cfg = write_config(tmp_path / "ec2.yml", **change)
    rc, out, err = bpcp(capsys, "ec2", "launch", "-c", str(cfg), "-n", "1", "--dry-run")
    assert rc == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"bpcp: error: {cfg}: ") and message in lines[0], err
    if hint:
        assert hint in lines[0]


def test_every_problem_of_a_config_is_named(tmp_path, capsys):
    cfg = write_config(tmp_path / "ec2.yml", ami=None, market="reserved", root_volume_gb=2)
    rc, _, err = bpcp(capsys, "ec2", "template", "-c", str(cfg), "--dry-run")
    assert rc == 2 and len(err.splitlines()) == 3
    assert all(line.startswith("bpcp: error: ") for line in err.splitlines())


def test_a_missing_or_broken_config_file(tmp_path, capsys):
    rc, _, err = bpcp(capsys, "ec2", "template", "-c", str(tmp_path / "nope.yml"), "--dry-run")
    assert rc == 2 and "no such file; copy inventory/ec2.example.yml" in err
    (tmp_path / "bad.yml").write_text("run: [x\n")
    rc, _, err = bpcp(capsys, "ec2", "template", "-c", str(tmp_path / "bad.yml"), "--dry-run")
    assert rc == 2 and "not valid YAML" in err and len(err.splitlines()) == 1


def test_the_shipped_example_config_is_valid():
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[1] / "inventory" / "ec2.example.yml")
    assert config.market == "spot" and config.user_data == "prepare"


# ------------------------------------------------------------------ launch, list, terminate, cost
def test_launch_spot_tags_every_instance_with_the_run(aws, tmp_path, capsys):
    cfg = write_config(tmp_path / "ec2.yml")
    rc, out, err = bpcp(capsys, "ec2", "launch", "-c", str(cfg), "-n", "2", "--json", "--wait", "30")
    assert rc == 0, err
    doc = json.loads(out)
    assert len(doc["instances"]) == 2 and {i["market"] for i in doc["instances"]} == {"spot"}
    assert "planned: 2 x c6i.large" in err and "not live prices" in err
    found = instances(aws.client("ec2"), "test-run")
    assert sorted(i["InstanceId"] for i in found) == sorted(i["id"] for i in doc["instances"])
    for i in found:
        assert i["InstanceLifecycle"] == "spot" and i["State"]["Name"] == "running"
        assert tags_of(i)["bpcp:run"] == "test-run" and tags_of(i)["project"] == "bpcp-tests"
        assert i["InstanceType"] == "c6i.large"


def test_on_demand_market_sends_no_spot_request(aws, tmp_path, capsys):
    cfg = write_config(tmp_path / "ec2.yml", market="on-demand")
    rc, out, _ = bpcp(capsys, "ec2", "launch", "-c", str(cfg), "-n", "1", "--json")
    assert rc == 0 and json.loads(out)["instances"][0]["market"] == "on-demand"
    assert "InstanceLifecycle" not in instances(aws.client("ec2"), "test-run")[0]


@pytest.fixture
def spot_refused(aws, monkeypatch):
    """AWS_ENDPOINT_URL through a proxy that refuses spot RunInstances (InsufficientInstanceCapacity)."""
    proxy = SpotRefusingProxy(aws.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.close()


def test_spot_refused_falls_back_to_on_demand(aws, spot_refused, tmp_path, capsys):
    cfg = write_config(tmp_path / "ec2.yml")
    rc, out, err = bpcp(capsys, "ec2", "launch", "-c", str(cfg), "-n", "2", "--json")
    assert rc == 0, err
    assert spot_refused.refused >= 1      # EC2 sends it as a server error (500): botocore retries before giving up
    assert "spot refused (InsufficientInstanceCapacity" in err and "launching 2 on-demand instead" in err
    found = instances(aws.client("ec2"), "test-run")
    assert len(found) == 2 and all("InstanceLifecycle" not in i for i in found)
    assert all(tags_of(i)["bpcp:run"] == "test-run" for i in found)
    assert {i["market"] for i in json.loads(out)["instances"]} == {"on-demand"}


def test_spot_refused_without_fallback_is_one_line(aws, spot_refused, tmp_path, capsys):
    cfg = write_config(tmp_path / "ec2.yml", on_demand_fallback=False)
    rc, _, err = bpcp(capsys, "ec2", "launch", "-c", str(cfg), "-n", "2")
    assert rc == 2
    [line] = [x for x in err.splitlines() if x.startswith("bpcp: error:")]
    assert "InsufficientInstanceCapacity" in line and "on_demand_fallback: true or market: on-demand" in line
    assert instances(aws.client("ec2")) == []


def test_list_and_terminate_only_the_runs_instances_and_say_what_they_used(aws, tmp_path, capsys):
    mine = write_config(tmp_path / "mine.yml")
    other = write_config(tmp_path / "other.yml", run="other-run")
    assert bpcp(capsys, "ec2", "launch", "-c", str(mine), "-n", "2")[0] == 0
    assert bpcp(capsys, "ec2", "launch", "-c", str(other), "-n", "1")[0] == 0
    rc, out, _ = bpcp(capsys, "ec2", "list", "--run", "test-run", "--region", "us-east-1", "--json")
    assert rc == 0 and len(json.loads(out)) == 2
    rc, out, _ = bpcp(capsys, "ec2", "terminate", "-c", str(mine), "--dry-run")
    assert rc == 0 and "would terminate 2 instance(s)" in out
    assert len(instances(aws.client("ec2"), "test-run")) == 2
    rc, out, _ = bpcp(capsys, "ec2", "terminate", "-c", str(mine), "--wait", "30")
    assert rc == 0 and "terminated 2 instance(s)" in out
    assert "used: 2 instance(s)" in out and "$0.085/h" not in out and "$0.036/h" in out   # spot price, per instance
    assert "not live prices" in out
    ec2 = aws.client("ec2")
    assert {i["State"]["Name"] for i in instances(ec2, "test-run", states=("terminated",))} == {"terminated"}
    assert instances(ec2, "test-run") == []
    assert len(instances(ec2, "other-run")) == 1
    rc, out, _ = bpcp(capsys, "ec2", "terminate", "-c", str(mine))
    assert rc == 0 and "no instance left to terminate" in out


def test_cost_plans_and_counts_what_ran(aws, tmp_path, capsys):
    cfg = write_config(tmp_path / "ec2.yml", market="on-demand", instance_type="c6i.4xlarge")
    rc, out, _ = bpcp(capsys, "ec2", "cost", "-c", str(cfg), "-n", "4", "--hours", "2.5", "--no-aws")
    assert rc == 0
    assert "planned: 4 x c6i.4xlarge (16 vCPU, 32 GiB) for 2.5 h = 10 instance-hours" in out
    assert "about $6.80 on-demand" in out and "spot" in out and "estimates" in out
    rc, out, _ = bpcp(capsys, "ec2", "cost", "-c", str(cfg))
    assert rc == 0 and "no instance launched yet" in out
    bpcp(capsys, "ec2", "launch", "-c", str(cfg), "-n", "1")
    rc, out, _ = bpcp(capsys, "ec2", "cost", "-c", str(cfg))
    assert rc == 0 and "used: 1 instance(s)" in out and "$0.680/h" in out


def test_used_cost_counts_from_launch_to_termination():
    import datetime as dt

    from bpcp.aws.ec2 import used_cost

    t0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
    used = [{"id": "i-1", "type": "c6i.large", "market": "on-demand", "launch_time": t0.isoformat(),
             "ended": (t0 + dt.timedelta(hours=2)).isoformat()},
            {"id": "i-2", "type": "c6i.large", "market": "spot", "launch_time": t0.isoformat(), "ended": None}]
    lines, total = used_cost(used, now=t0 + dt.timedelta(hours=1))
    assert total == pytest.approx(2 * 0.085 + 1 * 0.0357)
    assert "3.000 instance-hours" in lines[0]


# ------------------------------------------------------------------ no credential anywhere
def test_no_credential_reaches_the_template_user_data_or_output(aws, tmp_path, capsys, monkeypatch):
    secret, token = "PLANTEDsecretKEY0123456789abcdefPLANTED", "PLANTEDsessionTOKENzyxwvuPLANTED"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    cfg = write_config(tmp_path / "ec2.yml", user_data="site")
    config = load_config(cfg)
    texts = [json.dumps(template_data(config)), user_data(config),
             user_data(load_config(write_config(tmp_path / "p.yml")))]
    for argv in (["template", "--dry-run"], ["launch", "-n", "1", "--dry-run"], ["template", "--json"],
                 ["launch", "-n", "1", "--json"], ["list", "--json"], ["cost"], ["terminate", "--json"]):
        rc, out, err = bpcp(capsys, "ec2", *argv, "-c", str(cfg))
        assert rc == 0, err
        texts += [out, err]
    ec2 = aws.client("ec2")
    for v in ec2.describe_launch_template_versions(LaunchTemplateName="bpcp-test-run")["LaunchTemplateVersions"]:
        texts.append(json.dumps(v, default=str))
        texts.append(base64.b64decode(v["LaunchTemplateData"]["UserData"]).decode())
    joined = "\n".join(texts)
    assert "UserData" in joined and "#cloud-config" in joined
    for planted in (secret, token, "AKIAIOSFODNN7EXAMPLE"):
        assert planted not in joined
    yaml.safe_load(user_data(config))   # and the user data is valid cloud-config YAML


def test_network_profile_and_spot_price_rendering(tmp_path):
    from bpcp.aws.launch_template import market_options

    arn = "arn:aws:iam::123456789012:instance-profile/bpcp-worker"
    config = load_config(write_config(tmp_path / "ec2.yml", subnet_id="subnet-0123456789abcdef0",
                                      security_group_ids=["sg-0123456789abcdef0"], iam_instance_profile=arn,
                                      spot_max_price=0.05, root_device_name="/dev/sda1", user_data="none"))
    data = template_data(config)
    assert data["NetworkInterfaces"] == [{"DeviceIndex": 0, "SubnetId": "subnet-0123456789abcdef0",
                                          "AssociatePublicIpAddress": True, "DeleteOnTermination": True,
                                          "Groups": ["sg-0123456789abcdef0"]}]
    assert "SecurityGroupIds" not in data and "UserData" not in data
    assert data["IamInstanceProfile"] == {"Arn": arn}
    assert data["BlockDeviceMappings"][0]["DeviceName"] == "/dev/sda1"
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert market_options(config)["SpotOptions"]["MaxPrice"] == "0.05"
    plain = template_data(load_config(write_config(tmp_path / "b.yml", security_group_ids=["sg-0123456789abcdef0"])))
    assert plain["SecurityGroupIds"] == ["sg-0123456789abcdef0"] and "NetworkInterfaces" not in plain


def test_user_data_modes(tmp_path):
    prepare = yaml.safe_load(user_data(load_config(write_config(tmp_path / "p.yml", max_hours=2))))
    assert {"python3", "python3-apt"} <= set(prepare["packages"])
    assert ["shutdown", "-h", "+120", "bpcp: max_hours reached for run test-run"] in prepare["runcmd"]
    site = yaml.safe_load(user_data(load_config(write_config(tmp_path / "s.yml", user_data="site", max_hours=0))))
    assert "packages" not in site and "site.yml" in json.dumps(site)
    assert not any(isinstance(c, list) and c[0] == "shutdown" for c in site["runcmd"])


def test_no_credentials_is_one_line(aws, tmp_path, capsys, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    cfg = write_config(tmp_path / "ec2.yml")
    rc, _, err = bpcp(capsys, "ec2", "template", "-c", str(cfg))
    assert rc == 2 and err.count("\n") == 1
    assert "no AWS credentials found; set AWS_PROFILE" in err


# ------------------------------------------------------------------ one client maker, one error translator
def test_retries_are_set_in_one_place_and_a_refused_spot_request_is_tried_that_often(aws, spot_refused, tmp_path,
                                                                                    capsys, monkeypatch):
    monkeypatch.setitem(aws_client.MAX_ATTEMPTS, "ec2", 2)
    cfg = write_config(tmp_path / "ec2.yml", on_demand_fallback=False)
    rc, _, err = bpcp(capsys, "ec2", "launch", "-c", str(cfg), "-n", "1")
    assert rc == 2 and "InsufficientInstanceCapacity" in err
    assert spot_refused.refused == 2          # standard mode: the first try and one retry, then the line
    for service in ("s3", "ec2"):
        made = aws_client.client(service, "us-east-1")
        assert made.meta.config.retries == {"mode": "standard", "total_max_attempts": aws_client.MAX_ATTEMPTS[service]}
        assert made.meta.endpoint_url == spot_refused.url     # AWS_ENDPOINT_URL honoured by every client


def test_an_unreachable_endpoint_is_one_line_for_ec2_and_s3(aws, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(aws_client.MAX_ATTEMPTS, "ec2", 1)
    monkeypatch.setitem(aws_client.MAX_ATTEMPTS, "s3", 1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    rc, _, err = bpcp(capsys, "ec2", "template", "-c", str(write_config(tmp_path / "ec2.yml")))
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("bpcp: error: launch template bpcp-test-run: cannot reach the EC2 endpoint") and \
        "AWS_ENDPOINT_URL" in err
    with pytest.raises(BpcpError) as raised:
        s3.fetch_inputs("s3://bpcp-data/plate/load_data.csv", "p.cppipe", tmp_path)
    [line] = raised.value.lines
    assert line.startswith("s3://bpcp-data/plate/load_data.csv: cannot reach the S3 endpoint") and \
        "AWS_ENDPOINT_URL" in line


def test_one_translator_words_each_refusal_for_its_service():
    def refused(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "no"}}, "RunInstances")

    line = explain(refused("UnauthorizedOperation"), "launch 1 x c6i.large", "ec2:RunInstances").lines[0]
    assert line == ("launch 1 x c6i.large: AWS refused: UnauthorizedOperation: no; the controller policy in "
                    "docs/aws.md lists what bpcp needs (here ec2:RunInstances)")
    for what, action, says in [("launch 1 x c6i.large", "ec2:RunInstances", "EC2 rejected the AWS credentials"),
                               ("s3://bkt/x.csv", "s3:GetObject", "S3 rejected the AWS credentials")]:
        assert says in explain(refused("AuthFailure" if action.startswith("ec2") else "InvalidAccessKeyId"),
                               what, action).lines[0]
    assert "set AWS_PROFILE (or run on a host with an instance role)" in \
        explain(NoCredentialsError(), "describe instances", "ec2:DescribeInstances").lines[0]
    assert "instance profile with S3 access" in explain(NoCredentialsError(), "s3://bkt/x", "s3:GetObject").lines[0]
