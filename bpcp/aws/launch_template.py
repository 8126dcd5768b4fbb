"""EC2 workers for a run: the config file, its checks, and the launch template it renders.

Pure: no AWS call here (bpcp.aws.ec2 sends what this module renders). One config file (YAML, see
inventory/ec2.example.yml) describes the workers of one run; every problem found in it is one line
saying what is wrong and how to fix it. The rendered LaunchTemplateData carries no credential:
workers get theirs from the IAM instance profile, never from the template or the user data.
"""
from __future__ import annotations

import base64
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from bpcp.errors import BpcpError
from bpcp.sizing.estimate import INSTANCES, HostType, load_instances

RUN_TAG = "bpcp:run"
USER_DATA_TEMPLATE = "user_data.yml.j2"
MARKETS = ("spot", "on-demand")
USER_DATA_MODES = ("prepare", "site", "none")
VOLUME_TYPES = ("gp3", "gp2", "io1", "io2", "st1", "sc1", "standard")
MIN_ROOT_GB = 8
MIN_IDLE_MINUTES = 5
IDLE_WATCH = Path(__file__).with_name("idle_watch.py")     # installed on workers by the user data
# Error codes for which a spot request is given up and the rest launched on-demand.
SPOT_REFUSED = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded",
    "InsufficientHostCapacity", "InsufficientReservedInstanceCapacity", "Unsupported", "UnfulfillableCapacity",
    "SpotCapacityNotAvailable",
})
# Things that look like credentials: refused anywhere in the config (workers use an instance profile).
_SECRET_PATTERNS = (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), re.compile(r"aws_secret_access_key|aws_session_token", re.I))

KNOWN_KEYS = {
    "run": "run name, tagged bpcp:run=<run> on the template, instances and volumes",
    "region": "AWS region, e.g. us-east-1",
    "template_name": "launch template name (default bpcp-<run>)",
    "ami": "AMI id (Debian 12 or Ubuntu 22.04/24.04, or an image built with site.yml)",
    "instance_type": "EC2 instance type, from bpcp/data/instances.csv",
    "market": "spot (default; on-demand when spot is refused) or on-demand",
    "spot_max_price": "highest spot price in USD per hour (default: up to the on-demand price)",
    "on_demand_fallback": "launch on-demand when spot is refused (default true)",
    "key_name": "EC2 key pair for SSH",
    "security_group_ids": "security groups (must let the controller reach port 22)",
    "subnet_id": "subnet to launch in (default: the default VPC's)",
    "public_ip": "give the workers a public IP when subnet_id is set (default true)",
    "iam_instance_profile": "instance profile name or ARN (the workers' S3 access; see docs/aws.md)",
    "root_volume_gb": "root EBS volume size in GiB (default 30, at least 8)",
    "root_volume_type": "root EBS volume type (default gp3)",
    "root_device_name": "root device of the AMI (default /dev/xvda: Debian, Amazon Linux; Ubuntu: /dev/sda1)",
    "tags": "extra tags on the instances and volumes (KEY: VALUE)",
    "user_data": "prepare (install python3 for site.yml, default), site (AMI built with site.yml) or none",
    "ssh_user": "SSH user of the AMI (default admin; ubuntu on Ubuntu)",
    "ssh_key_file": "private key for ssh_user on the controller",
    "max_hours": "workers power off (and so terminate) after this many hours, a safety net (default 24; 0 = never)",
    "idle_minutes": "workers power off (and so terminate) after this many minutes without an SSH connection: the "
                    "controller stopped talking to them (default 15, at least 5; 0 = never)",
    "hours": "expected hours of the run, for the cost estimate before launching (default 1)",
}


@dataclass(frozen=True)
class Ec2Config:
    run: str
    region: str
    ami: str
    instance_type: str
    template_name: str
    market: str = "spot"
    spot_max_price: str | None = None
    on_demand_fallback: bool = True
    key_name: str | None = None
    security_group_ids: tuple[str, ...] = ()
    subnet_id: str | None = None
    public_ip: bool = True
    iam_instance_profile: str | None = None
    root_volume_gb: int = 30
    root_volume_type: str = "gp3"
    root_device_name: str = "/dev/xvda"
    tags: dict = field(default_factory=dict)
    user_data: str = "prepare"
    ssh_user: str = "admin"
    ssh_key_file: str | None = None
    max_hours: float = 24.0
    idle_minutes: float = 15.0
    hours: float = 1.0
    source: str = "config"


# ------------------------------------------------------------------ reading and checking
def load_config(path: Path, overrides: dict | None = None, instances: Path = INSTANCES) -> Ec2Config:
    """Read and check a config file; overrides (e.g. run, instance_type from the command line) win."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise BpcpError(f"{path}: no such file; copy inventory/ec2.example.yml and edit it") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise BpcpError(f"{path}:{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise BpcpError(f"{path}: expected a mapping of settings (run:, ami:, instance_type:, ...), got {type(raw).__name__}")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return check_config(raw, str(path), instances)


def check_config(raw: dict, source: str = "config", instances: Path = INSTANCES) -> Ec2Config:
    """An Ec2Config, or BpcpError with one line per problem."""
    problems: list[str] = []

    def bad(key: str, text: str) -> None:
        problems.append(f"{source}: {key}: {text}")

    for key in raw:
        if key not in KNOWN_KEYS:
            near = difflib.get_close_matches(str(key), KNOWN_KEYS, n=1)
            bad(str(key), f"unknown setting; {f'did you mean {near[0]}? ' if near else ''}known: {', '.join(KNOWN_KEYS)}")
    for key, value in _strings(raw):
        if any(p.search(value) for p in _SECRET_PATTERNS):
            bad(key, "looks like an AWS credential; never put credentials in this file: workers get theirs from "
                     "iam_instance_profile, the controller from its own environment or ~/.aws")

    run = str(raw.get("run") or "")
    if not run:
        bad("run", "missing; name the run (letters, digits, . _ -), e.g. run: plate1-batch1")
    elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", run):
        bad("run", f"{run!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    region = str(raw.get("region") or "")
    if not region:
        bad("region", "missing; give the AWS region, e.g. region: us-east-1")
    elif not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", region):
        bad("region", f"{region!r} is not a region name; e.g. us-east-1, eu-west-1")
    ami = str(raw.get("ami") or "")
    if not ami:
        bad("ami", f"missing; give the AMI id of a Debian 12 or Ubuntu 22.04/24.04 image in {region or 'the region'} "
                   "(e.g. ami-0123456789abcdef0), or of an image built with site.yml")
    elif not re.fullmatch(r"ami-[0-9a-f]{8}([0-9a-f]{9})?", ami):
        bad("ami", f"{ami!r} is not an AMI id; it looks like ami-0123456789abcdef0")

    itype = str(raw.get("instance_type") or "")
    table = {t.name: t for t in load_instances(instances)}
    if not itype:
        bad("instance_type", f"missing; pick a type from {instances}, e.g. c6i.4xlarge")
    elif itype not in table:
        family = itype.split(".")[0]
        near = [n for n in table if n.split(".")[0] == family][:8] or difflib.get_close_matches(itype, table, n=5)
        bad("instance_type", f"{itype} is not in {instances}; "
                             f"{'e.g. ' + ', '.join(near) if near else 'families there: ' + ', '.join(sorted({t.family for t in table.values()}))}"
                             " (or add a row for it to the table)")

    market = str(raw.get("market", "spot"))
    if market not in MARKETS:
        bad("market", f"{market!r}: give spot (on-demand when spot is refused) or on-demand")
    price = raw.get("spot_max_price")
    if price is not None:
        try:
            if float(price) <= 0:
                raise ValueError
            price = f"{float(price):g}"
        except (TypeError, ValueError):
            bad("spot_max_price", f"{price!r}: give USD per hour as a number, e.g. 0.35, or leave it out "
                                  "(spot then costs up to the on-demand price)")
        if market == "on-demand":
            bad("spot_max_price", "set, but market is on-demand; drop it or set market: spot")

    name = str(raw.get("template_name") or f"bpcp-{run}")
    if raw.get("template_name") and not re.fullmatch(r"[A-Za-z0-9().\-/_]{3,128}", name):
        bad("template_name", f"{name!r}: 3-128 letters, digits and ( ) . - / _")
    sgs = raw.get("security_group_ids") or []
    if isinstance(sgs, str):
        sgs = [sgs]
    if not isinstance(sgs, list) or not all(isinstance(s, str) and re.fullmatch(r"sg-[0-9a-f]{8,17}", s) for s in sgs):
        bad("security_group_ids", f"{sgs!r}: give a list of security group ids like sg-0123456789abcdef0")
    subnet = raw.get("subnet_id")
    if subnet is not None and not re.fullmatch(r"subnet-[0-9a-f]{8,17}", str(subnet)):
        bad("subnet_id", f"{subnet!r} is not a subnet id; it looks like subnet-0123456789abcdef0")
    profile = raw.get("iam_instance_profile")
    if profile is not None and not re.fullmatch(r"(arn:aws[a-z-]*:iam::\d{12}:instance-profile/)?[\w+=,.@/-]{1,128}", str(profile)):
        bad("iam_instance_profile", f"{profile!r}: give an instance profile name or its ARN "
                                    "(arn:aws:iam::123456789012:instance-profile/NAME)")

    size = raw.get("root_volume_gb", 30)
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_ROOT_GB or size > 16384:
        bad("root_volume_gb", f"{size!r}: give whole GiB from {MIN_ROOT_GB} (the images need at least that) to 16384; "
                              "CellProfiler and its Python take about 6 GiB, add room for staged images")
    vtype = str(raw.get("root_volume_type", "gp3"))
    if vtype not in VOLUME_TYPES:
        bad("root_volume_type", f"{vtype!r}: give one of {', '.join(VOLUME_TYPES)} (gp3 is the usual choice)")
    device = str(raw.get("root_device_name", "/dev/xvda"))
    if not re.fullmatch(r"/dev/(xvd|sd|nvme)[a-z0-9]+", device):
        bad("root_device_name", f"{device!r}: the AMI's root device, e.g. /dev/xvda (Debian) or /dev/sda1 (Ubuntu)")

    tags = raw.get("tags") or {}
    if not isinstance(tags, dict):
        bad("tags", f"{tags!r}: give a mapping KEY: VALUE")
        tags = {}
    for k, v in tags.items():
        if str(k).lower().startswith("aws:") or str(k) == RUN_TAG:
            bad("tags", f"{k}: reserved (aws:* is AWS's, {RUN_TAG} is set from run:); use another key")
        elif not (0 < len(str(k)) <= 128 and len(str(v)) <= 256):
            bad("tags", f"{k}: keys are 1-128 characters, values up to 256")
    mode = str(raw.get("user_data", "prepare"))
    if mode not in USER_DATA_MODES:
        bad("user_data", f"{mode!r}: give prepare (installs python3 so site.yml can configure the host), "
                         "site (an AMI built with site.yml) or none")
    user = str(raw.get("ssh_user", "admin"))
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user):
        bad("ssh_user", f"{user!r}: a Unix user name, e.g. admin (Debian) or ubuntu (Ubuntu)")
    numbers = {}
    for key, default, low in (("max_hours", 24.0, 0.0), ("hours", 1.0, 0.0)):
        try:
            numbers[key] = float(raw.get(key, default))
            if numbers[key] < low or (key == "hours" and numbers[key] == 0):
                raise ValueError
        except (TypeError, ValueError):
            bad(key, f"{raw.get(key)!r}: give a number of hours{' (0 = never)' if key == 'max_hours' else ' above 0'}")
    try:
        numbers["idle_minutes"] = float(raw.get("idle_minutes", 15.0))
        if numbers["idle_minutes"] != 0 and not numbers["idle_minutes"] >= MIN_IDLE_MINUTES:
            raise ValueError
    except (TypeError, ValueError):
        bad("idle_minutes", f"{raw.get('idle_minutes')!r}: give the minutes without an SSH connection after which a "
                            f"worker powers off, at least {MIN_IDLE_MINUTES} (setting it up takes minutes); 0 = never")
    for key in ("on_demand_fallback", "public_ip"):
        if not isinstance(raw.get(key, True), bool):
            bad(key, f"{raw.get(key)!r}: give true or false")
    if problems:
        raise BpcpError(problems)
    return Ec2Config(
        run=run, region=region, ami=ami, instance_type=itype, template_name=name, market=market,
        spot_max_price=price, on_demand_fallback=raw.get("on_demand_fallback", True),
        key_name=str(raw["key_name"]) if raw.get("key_name") else None, security_group_ids=tuple(sgs),
        subnet_id=str(subnet) if subnet else None, public_ip=raw.get("public_ip", True),
        iam_instance_profile=str(profile) if profile else None, root_volume_gb=size, root_volume_type=vtype,
        root_device_name=device, tags={str(k): str(v) for k, v in tags.items()}, user_data=mode, ssh_user=user,
        ssh_key_file=str(raw["ssh_key_file"]) if raw.get("ssh_key_file") else None,
        max_hours=numbers["max_hours"], idle_minutes=numbers["idle_minutes"], hours=numbers["hours"], source=source)


def _strings(value, key: str = "") -> list[tuple[str, str]]:
    """(setting, text) for every key and value of the config, nested ones too."""
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            name = f"{key}.{k}" if key else str(k)
            out += [(name, str(k))] + _strings(v, name)
        return out
    if isinstance(value, list):
        return [s for v in value for s in _strings(v, key)]
    return [(key, str(value))]


def instance_type(config: Ec2Config, instances: Path = INSTANCES) -> HostType:
    return {t.name: t for t in load_instances(instances)}[config.instance_type]


# ------------------------------------------------------------------ rendering
def tags(config: Ec2Config) -> list[dict]:
    """The tags naming the run, on the template, every instance and every volume."""
    out = {"Name": f"bpcp-{config.run}", **config.tags, RUN_TAG: config.run}
    return [{"Key": k, "Value": v} for k, v in out.items()]


def tag_specifications(config: Ec2Config, resources: tuple[str, ...] = ("instance", "volume")) -> list[dict]:
    return [{"ResourceType": r, "Tags": tags(config)} for r in resources]


def user_data(config: Ec2Config) -> str:
    """The cloud-init user data (text): no credential, no variable a user could inject into."""
    if config.user_data == "none":
        return ""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("bpcp.aws", "templates"), autoescape=False,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    return env.get_template(USER_DATA_TEMPLATE).render(
        mode=config.user_data, run=config.run, ssh_user=config.ssh_user,
        max_minutes=round(config.max_hours * 60), idle_seconds=round(config.idle_minutes * 60),
        idle_watch=IDLE_WATCH.read_text() if config.idle_minutes > 0 else "")


def template_data(config: Ec2Config) -> dict:
    """LaunchTemplateData for the run. Market options are not in it: `launch` asks for spot first."""
    data: dict = {
        "ImageId": config.ami,
        "InstanceType": config.instance_type,
        "BlockDeviceMappings": [{"DeviceName": config.root_device_name,
                                 "Ebs": {"VolumeSize": config.root_volume_gb, "VolumeType": config.root_volume_type,
                                         "DeleteOnTermination": True, "Encrypted": True}}],
        # a shutdown from inside (max_hours) ends the instance instead of keeping a stopped one
        "InstanceInitiatedShutdownBehavior": "terminate",
        # IMDSv2 only: the instance role's credentials are not reachable through a plain GET
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
        "TagSpecifications": tag_specifications(config),
    }
    if config.key_name:
        data["KeyName"] = config.key_name
    if config.iam_instance_profile:
        key = "Arn" if config.iam_instance_profile.startswith("arn:") else "Name"
        data["IamInstanceProfile"] = {key: config.iam_instance_profile}
    if config.subnet_id:
        nic = {"DeviceIndex": 0, "SubnetId": config.subnet_id, "AssociatePublicIpAddress": config.public_ip,
               "DeleteOnTermination": True}
        if config.security_group_ids:
            nic["Groups"] = list(config.security_group_ids)
        data["NetworkInterfaces"] = [nic]
    elif config.security_group_ids:
        data["SecurityGroupIds"] = list(config.security_group_ids)
    text = user_data(config)
    if text:
        data["UserData"] = base64.b64encode(text.encode()).decode()
    return data


def data_digest(data: dict) -> str:
    """sha256 of the canonical JSON of LaunchTemplateData (recorded in the version description)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def version_description(data: dict) -> str:
    return f"bpcp sha256:{data_digest(data)[:32]}"


def normalized(data: dict) -> dict:
    """Template data as compared: sorted, without the tags of the template itself (some endpoints
    echo them inside TagSpecifications)."""
    out = json.loads(json.dumps(data, sort_keys=True))
    specs = [s for s in out.get("TagSpecifications", []) if s.get("ResourceType") != "launch-template"]
    if specs:
        out["TagSpecifications"] = sorted(specs, key=lambda s: s["ResourceType"])
    return out


def market_options(config: Ec2Config) -> dict:
    """InstanceMarketOptions for a spot request (one-time: a refused or interrupted worker is not retried by AWS)."""
    spot: dict = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
    if config.spot_max_price:
        spot["MaxPrice"] = config.spot_max_price
    return {"MarketType": "spot", "SpotOptions": spot}
