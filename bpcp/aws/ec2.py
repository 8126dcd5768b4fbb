"""`bpcp ec2`: launch template, workers, listing, termination and cost of one run's EC2 workers.

The AWS side of bpcp.aws.launch_template (which renders everything sent here). Every instance is
tagged bpcp:run=<run> when it is launched (TagSpecifications: not every endpoint copies the
template's tags), and everything else finds the run's instances by that tag. Clients, retries and
error lines come from bpcp.aws.client (credentials and endpoint are boto3's own: environment,
~/.aws, instance profile; AWS_ENDPOINT_URL for a local endpoint); bpcp never reads, prints or
writes a credential.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

from bpcp.aws import client as aws
from bpcp.aws.launch_template import (
    RUN_TAG,
    SPOT_REFUSED,
    Ec2Config,
    load_config,
    market_options,
    normalized,
    tag_specifications,
    template_data,
    version_description,
)
from bpcp.errors import BpcpError
from bpcp.sizing.estimate import INSTANCES, _usd, load_instances

LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
PRICE_NOTE = ("estimates from the instance table (bpcp/data/instances.csv), not live prices: the pricing API is "
              "not used; see your bill or Cost Explorer for what AWS charges")


# ------------------------------------------------------------------ AWS calls
def _latest_version(ec2, name: str) -> dict | None:
    from botocore.exceptions import ClientError

    def latest() -> dict | None:
        try:
            return ec2.describe_launch_template_versions(LaunchTemplateName=name, Versions=["$Latest"])
        except ClientError as exc:
            if "NotFound" in aws.error_code(exc):
                return None
            raise

    out = aws.call(latest, f"launch template {name}", "ec2:DescribeLaunchTemplateVersions")
    versions = (out or {}).get("LaunchTemplateVersions", [])
    return versions[0] if versions else None


def template_request(config: Ec2Config, version: bool = False) -> dict:
    """The CreateLaunchTemplate (or CreateLaunchTemplateVersion) request for the config."""
    data = template_data(config)
    request = {"LaunchTemplateName": config.template_name, "LaunchTemplateData": data,
               "VersionDescription": version_description(data)}
    if not version:
        request["TagSpecifications"] = tag_specifications(config, ("launch-template",))
    return request


def ensure_template(ec2, config: Ec2Config) -> dict:
    """Create the template, or a new default version when the latest one differs; same input, no new version."""
    request = template_request(config)
    latest = _latest_version(ec2, config.template_name)
    if latest is None:
        out = aws.call(lambda: ec2.create_launch_template(**request), f"create launch template {config.template_name}",
                       "ec2:CreateLaunchTemplate")
        return {"action": "created", "name": config.template_name, "id": out["LaunchTemplate"]["LaunchTemplateId"],
                "version": int(out["LaunchTemplate"]["LatestVersionNumber"])}
    same = (latest.get("VersionDescription") == request["VersionDescription"]
            or normalized(latest.get("LaunchTemplateData", {})) == normalized(request["LaunchTemplateData"]))
    number = int(latest["VersionNumber"])
    if not same:
        version_request = template_request(config, version=True)
        out = aws.call(lambda: ec2.create_launch_template_version(**version_request),
                       f"new version of launch template {config.template_name}", "ec2:CreateLaunchTemplateVersion")
        number = int(out["LaunchTemplateVersion"]["VersionNumber"])
    if not same or not latest.get("DefaultVersion"):
        aws.call(lambda: ec2.modify_launch_template(LaunchTemplateName=config.template_name,
                                                    DefaultVersion=str(number)),
                 f"set default version of {config.template_name}", "ec2:ModifyLaunchTemplate")
    return {"action": "unchanged" if same else "updated", "name": config.template_name,
            "id": latest["LaunchTemplateId"], "version": number}


def launch_request(config: Ec2Config, count: int, version: str, spot: bool) -> dict:
    request = {"LaunchTemplate": {"LaunchTemplateName": config.template_name, "Version": version},
               "MinCount": count, "MaxCount": count,     # all or none: spot short of capacity -> on-demand
               # also on the instances themselves: not every endpoint copies the template's tags
               "TagSpecifications": tag_specifications(config)}
    if spot:
        request["InstanceMarketOptions"] = market_options(config)
    return request


def launch(ec2, config: Ec2Config, count: int, version: str = "$Default", wait_seconds: int = 600,
           say=print) -> list[dict]:
    """Start `count` workers: spot first (when market is spot), on-demand for what spot refuses."""
    from botocore.exceptions import BotoCoreError, ClientError

    spot = config.market == "spot"
    while True:
        what = f"launch {count} x {config.instance_type}{' spot' if spot else ''}"
        try:
            started = ec2.run_instances(**launch_request(config, count, version, spot)).get("Instances", [])
            break
        except ClientError as exc:
            code = aws.error_code(exc)
            if spot and code in SPOT_REFUSED and config.on_demand_fallback:
                say(f"bpcp: spot refused ({code}: {exc.response.get('Error', {}).get('Message', '')}); "
                    f"launching {count} on-demand instead")
                spot = False
                continue
            error = aws.explain(exc, what, "ec2:RunInstances")
            if spot and code in SPOT_REFUSED:
                error = BpcpError(error.lines[0] + "; set on_demand_fallback: true or market: on-demand")
            raise error from None
        except BotoCoreError as exc:
            raise aws.explain(exc, what, "ec2:RunInstances") from None
    say(f"bpcp: started {len(started)} {'spot' if spot else 'on-demand'} x {config.instance_type}: "
        f"{', '.join(i['InstanceId'] for i in started)}")
    ids = [i["InstanceId"] for i in started]
    if wait_seconds > 0 and ids:
        _wait(ec2, "instance_running", ids, wait_seconds, "running")
    return describe(ec2, ids)


def _wait(ec2, waiter: str, ids: list[str], seconds: int, what: str) -> None:
    from botocore.exceptions import WaiterError

    delay = 5 if seconds >= 30 else 1
    try:
        ec2.get_waiter(waiter).wait(InstanceIds=ids, WaiterConfig={"Delay": delay, "MaxAttempts": max(1, seconds // delay)})
    except WaiterError as exc:
        states = {i["id"]: i["state"] for i in describe(ec2, ids)}
        raise BpcpError(f"instances not {what} after {seconds} s: "
                        f"{', '.join(f'{k} {v}' for k, v in states.items() if v != what) or exc}; "
                        "check them in the EC2 console, then list or terminate the run with bpcp ec2 list|terminate") from None


def _summary(i: dict) -> dict:
    tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
    launched = i.get("LaunchTime")
    return {"id": i["InstanceId"], "type": i.get("InstanceType"), "state": i.get("State", {}).get("Name"),
            "market": "spot" if i.get("InstanceLifecycle") == "spot" else "on-demand",
            "private_ip": i.get("PrivateIpAddress"), "public_ip": i.get("PublicIpAddress"),
            "launch_time": launched.isoformat() if isinstance(launched, dt.datetime) else launched,
            "ended": _ended(i), "run": tags.get(RUN_TAG)}


def _ended(i: dict) -> str | None:
    """When a terminated instance stopped, from the state reason 'User initiated (2024-01-01 12:00:00 GMT)'."""
    if i.get("State", {}).get("Name") not in ("terminated", "shutting-down"):
        return None
    m = re.search(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (GMT|UTC)\)", i.get("StateTransitionReason") or "")
    return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc).isoformat() if m else None


def describe(ec2, ids: list[str]) -> list[dict]:
    if not ids:
        return []
    out = aws.call(lambda: ec2.describe_instances(InstanceIds=ids), "describe instances", "ec2:DescribeInstances")
    return [_summary(i) for r in out.get("Reservations", []) for i in r.get("Instances", [])]


def list_run(ec2, run: str, states: list[str] | None = LIVE_STATES) -> list[dict]:
    filters = [{"Name": f"tag:{RUN_TAG}", "Values": [run]}]
    if states:
        filters.append({"Name": "instance-state-name", "Values": states})
    pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
    return aws.call(lambda: [_summary(i) for page in pages for r in page.get("Reservations", [])
                             for i in r.get("Instances", [])],
                    f"list the instances of run {run}", "ec2:DescribeInstances")


def terminate(ec2, run: str, wait_seconds: int = 600) -> list[dict]:
    """Terminate every live instance tagged with the run; wait (bounded) until they are terminated."""
    live = list_run(ec2, run)
    ids = [i["id"] for i in live]
    if not ids:
        return []
    aws.call(lambda: ec2.terminate_instances(InstanceIds=ids), f"terminate the instances of run {run}",
             "ec2:TerminateInstances")
    ended = dt.datetime.now(dt.timezone.utc).isoformat()
    if wait_seconds > 0:
        _wait(ec2, "instance_terminated", ids, wait_seconds, "terminated")
    now = {i["id"]: i for i in describe(ec2, ids)}
    return [{**i, "state": now.get(i["id"], i)["state"], "ended": now.get(i["id"], {}).get("ended") or ended}
            for i in live]


# ------------------------------------------------------------------ cost (estimates)
def planned_cost(config: Ec2Config, count: int, hours: float, instances: Path = INSTANCES) -> list[str]:
    t = {h.name: h for h in load_instances(instances)}[config.instance_type]
    od = count * hours * t.on_demand_usd_h
    spot = count * hours * t.spot_usd_h if t.spot_usd_h is not None else None
    return [f"planned: {count} x {t.name} ({t.cores:g} vCPU, {t.mem_bytes / 2**30:.0f} GiB) for {hours:g} h = "
            f"{count * hours:g} instance-hours ({config.market}"
            f"{', on-demand when spot is refused' if config.market == 'spot' and config.on_demand_fallback else ''})",
            f"  about {_usd(od)} on-demand ({_usd(t.on_demand_usd_h)}/h each), "
            + (f"about {_usd(spot)} spot ({_usd(t.spot_usd_h)}/h each, spot prices vary)" if spot is not None else "spot unknown"),
            f"  {PRICE_NOTE}"]


def used_cost(used: list[dict], now: dt.datetime | None = None, instances: Path = INSTANCES) -> tuple[list[str], float]:
    """Instance-hours from launch to termination (or now) x the table's price for each market."""
    now = now or dt.datetime.now(dt.timezone.utc)
    table = {h.name: h for h in load_instances(instances)}
    total, hours, lines = 0.0, 0.0, []
    for i in used:
        start = dt.datetime.fromisoformat(i["launch_time"]) if i.get("launch_time") else now
        end = dt.datetime.fromisoformat(i["ended"]) if i.get("ended") else now
        h = max((end - start).total_seconds(), 60) / 3600      # per-second billing, one minute at least
        t = table.get(i.get("type") or "")
        price = None if t is None else (t.spot_usd_h if i.get("market") == "spot" and t.spot_usd_h else t.on_demand_usd_h)
        hours += h
        total += h * (price or 0)
        lines.append(f"  {i['id']} {i.get('type')} {i.get('market')}: {h:.3f} h x "
                     f"{_usd(price) + '/h' if price is not None else '(type not in the table)'}")
    head = (f"used: {len(used)} instance(s), {hours:.3f} instance-hours, about {_usd(total)} "
            f"({PRICE_NOTE})")
    return [head, *lines], total


# ------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="ec2_command", required=True)

    def common(q: argparse.ArgumentParser, config_required: bool = True) -> None:
        q.add_argument("--config", "-c", type=Path, required=config_required,
                       help="the workers' config (see inventory/ec2.example.yml)")
        q.add_argument("--run", help="run name (default: run: in the config); the bpcp:run tag")
        q.add_argument("--json", action="store_true", help="print the result as JSON on stdout (messages on stderr)")

    q = sub.add_parser("template", help="create the launch template, or a new default version when the config changed")
    common(q)
    q.add_argument("--dry-run", action="store_true", help="print the request that would be sent; no AWS call")
    q.set_defaults(func=cmd_template)

    q = sub.add_parser("launch", help="estimate the cost, then start N workers from the template (spot first)")
    common(q)
    q.add_argument("--count", "-n", type=int, required=True, help="number of workers")
    q.add_argument("--hours", type=float, help="expected hours, for the estimate (default: hours: in the config)")
    q.add_argument("--wait", type=int, default=600, help="seconds to wait until they run (0: do not wait)")
    q.add_argument("--dry-run", action="store_true", help="print the requests that would be sent; no AWS call")
    q.set_defaults(func=cmd_launch)

    q = sub.add_parser("list", help="the run's instances that are not terminated")
    common(q, config_required=False)
    q.add_argument("--region", help="region (default: the config's, else AWS_REGION)")
    q.add_argument("--all", action="store_true", help="terminated ones too")
    q.set_defaults(func=cmd_list)

    q = sub.add_parser("terminate", help="terminate every instance of the run (by its tag) and say what was used")
    common(q, config_required=False)
    q.add_argument("--region", help="region (default: the config's, else AWS_REGION)")
    q.add_argument("--wait", type=int, default=600, help="seconds to wait until they are terminated (0: do not wait)")
    q.add_argument("--dry-run", action="store_true", help="list what would be terminated; terminate nothing")
    q.set_defaults(func=cmd_terminate)

    q = sub.add_parser("cost", help="planned cost of N workers, and what the run's instances used so far (estimates)")
    common(q)
    q.add_argument("--count", "-n", type=int, default=1, help="number of workers (default 1)")
    q.add_argument("--hours", type=float, help="expected hours (default: hours: in the config)")
    q.add_argument("--no-aws", action="store_true", help="only the plan: do not look up the run's instances")
    q.set_defaults(func=cmd_cost)


def _config(args: argparse.Namespace) -> Ec2Config:
    return load_config(args.config, {"run": args.run})


def _run_and_region(args: argparse.Namespace) -> tuple[str, str | None]:
    if args.config:
        c = _config(args)
        return c.run, args.region or c.region
    if not args.run:
        raise BpcpError("give --config FILE or --run NAME (the bpcp:run tag of the instances)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", args.run):
        raise BpcpError(f"--run {args.run!r}: a run name is 1-63 letters, digits, '.', '_' or '-'")
    return args.run, args.region


def _sayer(args: argparse.Namespace):
    out = sys.stderr if getattr(args, "json", False) else sys.stdout
    return lambda text: print(text, file=out, flush=True)


def _emit(args: argparse.Namespace, doc) -> None:
    if args.json:
        print(json.dumps(doc, indent=1, default=str))


def cmd_template(args: argparse.Namespace) -> int:
    config, say = _config(args), _sayer(args)
    if args.dry_run:
        request = template_request(config)
        say(f"bpcp: dry run: would create launch template {config.template_name} (or a new version of it when "
            "it exists and differs) with:")
        print(json.dumps(request, indent=1))
        return 0
    result = ensure_template(aws.client("ec2", config.region), config)
    say(f"bpcp: launch template {result['name']} ({result['id']}): {result['action']}, default version {result['version']}")
    _emit(args, result)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    config, say = _config(args), _sayer(args)
    if args.count < 1:
        raise BpcpError(f"--count {args.count}: give the number of workers, 1 or more")
    for line in planned_cost(config, args.count, args.hours or config.hours):
        say(f"bpcp: {line}")
    if args.dry_run:
        say("bpcp: dry run: would send (no AWS call made):")
        print(json.dumps({"CreateLaunchTemplate": template_request(config),
                          "RunInstances": launch_request(config, args.count, "$Default", config.market == "spot")},
                         indent=1))
        return 0
    ec2 = aws.client("ec2", config.region)
    result = ensure_template(ec2, config)
    say(f"bpcp: launch template {result['name']}: {result['action']}, version {result['version']}")
    started = launch(ec2, config, args.count, str(result["version"]), args.wait, say)
    for i in started:
        say(f"bpcp: {i['id']} {i['type']} {i['market']} {i['state']} public {i['public_ip']} private {i['private_ip']}")
    _emit(args, {"run": config.run, "template": result, "instances": started,
                 "ssh_user": config.ssh_user, "ssh_key_file": config.ssh_key_file})
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    run, region = _run_and_region(args)
    found = list_run(aws.client("ec2", region), run, None if args.all else LIVE_STATES)
    say = _sayer(args)
    say(f"bpcp: run {run}: {len(found)} instance(s){' (terminated included)' if args.all else ''}")
    for i in found:
        say(f"  {i['id']} {i['type']} {i['market']} {i['state']} public {i['public_ip']} private {i['private_ip']}")
    _emit(args, found)
    return 0


def cmd_terminate(args: argparse.Namespace) -> int:
    run, region = _run_and_region(args)
    say, ec2 = _sayer(args), aws.client("ec2", region)
    if args.dry_run:
        found = list_run(ec2, run)
        say(f"bpcp: dry run: would terminate {len(found)} instance(s) of run {run}: "
            f"{', '.join(i['id'] for i in found) or 'none'}")
        _emit(args, {"run": run, "terminated": [], "would_terminate": found})
        return 0
    done = terminate(ec2, run, args.wait)
    if not done:
        say(f"bpcp: run {run}: no instance left to terminate")
    else:
        say(f"bpcp: run {run}: terminated {len(done)} instance(s): {', '.join(i['id'] for i in done)}")
        for line in used_cost(done)[0]:
            say(f"bpcp: {line}")
    _emit(args, {"run": run, "terminated": done, "cost_usd": round(used_cost(done)[1], 4) if done else 0.0})
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    config, say = _config(args), _sayer(args)
    for line in planned_cost(config, args.count, args.hours or config.hours):
        say(f"bpcp: {line}")
    if not args.no_aws:
        found = list_run(aws.client("ec2", config.region), config.run, None)
        if found:
            for line in used_cost(found)[0]:
                say(f"bpcp: {line}")
        else:
            say(f"bpcp: run {config.run}: no instance launched yet")
    return 0
