"""The `bpcp` command: batch processing with CellProfiler on one host or many.

Parses arguments and calls the step modules; no logic of its own.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bpcp import __version__
from bpcp.errors import BpcpError
from bpcp.plan import AUTO_MAX_SETS, PlanOptions, parse_bundle, parse_group_by, parse_only
from bpcp.render import RunSettings
from bpcp.runfolder import RunFolder

DEFAULT_OUTPUT = "bpcp-run"


def _plan_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_argument_group("what to run")
    g.add_argument("--dataset", "-d", help="LoadData CSV (a path or s3://bucket/key.csv), file list, image folder "
                                           "or Batch_data.h5")
    g.add_argument("--pipeline", "-p", required=required, help=".cppipe pipeline (a path or s3:// URL) or Batch_data.h5")
    g.add_argument("--group-by", "-g", default=None,
                   help="comma-separated metadata keys, one job per group (default Metadata_Plate,Metadata_Well; "
                        "'none' = one group)")
    g.add_argument("--only", action="append", metavar="KEY=VALUE[,KEY=VALUE]",
                   help="run only the groups with these values (repeat for more)")
    g.add_argument("--bundle", default="auto", metavar="auto|N|0",
                   help="pack groups into jobs of about N image sets to amortise CellProfiler's start-up; "
                        f"auto (default): about one job per slot, at most {AUTO_MAX_SETS} image sets each; "
                        "0: one group per job")
    g.add_argument("--slots", type=int, default=None, metavar="N",
                   help="CellProfiler processes the run will have, for --bundle auto (default: this host's cores; "
                        "`bpcp run` counts --jobs and --sshloginfile)")
    g.add_argument("--cellprofiler", help="CellProfiler venv folder, its executable, or a version installed "
                                          "under /opt/cellprofiler (default: $BPCP_CELLPROFILER or /opt/cellprofiler/current)")
    g.add_argument("--skip-image-check", action="store_true", help="do not check that every image exists")
    g.add_argument("--path-map", action="append", default=[], metavar="FROM=TO",
                   help="rewrite the LoadData CSV's image paths that start with FROM (a folder or s3:// prefix) to "
                        "start with TO, e.g. /home/ubuntu/bucket=s3://bucket (repeat for more)")


def _output_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", type=Path, default=Path(DEFAULT_OUTPUT),
                        help=f"the run folder (default ./{DEFAULT_OUTPUT})")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    d = RunSettings()
    g = parser.add_argument_group("how to run")
    g.add_argument("--jobs", "-j", default=None,
                   help=f"CellProfiler processes per host (default: sized from profile.json when the run folder has one, "
                        f"else {d.jobs.replace('%', '%%')} of cores)")
    g.add_argument("--retries", type=int, default=d.retries, help=f"attempts per job (default {d.retries})")
    g.add_argument("--timeout", default=None,
                   help=f"per-job limit: seconds, 90m, 2h, or N%% of the median job (default: from profile.json, "
                        f"else {d.timeout.replace('%', '%%')})")
    g.add_argument("--memfree", default=None,
                   help=f"start jobs only above this free memory (default: from profile.json, else {d.memfree})")
    g.add_argument("--halt", default=d.halt, help=f"GNU parallel halt policy (default {d.halt.replace('%', '%%')})")
    g.add_argument("--tmp-root", default=d.tmp_root,
                   help="CellProfiler temp folder root: 'auto' = the RAM disk when mounted (default), '' = on disk")
    g.add_argument("--ramdisk", default=d.ramdisk, help=f"RAM disk mount point (default {d.ramdisk})")
    g.add_argument("--no-pin-threads", action="store_true", help="let each process use many threads")
    g.add_argument("--s3-output", default="", metavar="s3://BUCKET/PREFIX",
                   help="also keep the results there: published jobs as they finish, merged tables and reports; "
                        "a rerun resumes from what is there (docs/s3.md)")
    g.add_argument("--s3-python", default=d.s3_python,
                   help=f"Python with botocore that jobs download S3 images with, on every host (default {d.s3_python})")
    g.add_argument("--sshloginfile", type=Path, default=None,
                   help="run on these hosts: one GNU parallel sshlogin per line ([slots/]ssh-command, ':' = this host)")


SIZED = ("jobs", "timeout", "memfree")


def _settings(args: argparse.Namespace, run: RunFolder | None = None) -> RunSettings:
    """Explicit options first, then what the run folder's profile.json measured, then defaults."""
    d = RunSettings()
    measured = _profile_settings(run, args) if run is not None else {}
    chosen = {k: str(getattr(args, k)) if getattr(args, k) is not None else measured.get(k, getattr(d, k))
              for k in SIZED}
    return RunSettings(retries=args.retries, halt=args.halt, tmp_root=args.tmp_root, ramdisk=args.ramdisk,
                       pin_threads=not args.no_pin_threads, s3_python=args.s3_python, s3_output=args.s3_output,
                       **chosen).validate()


def _profile_settings(run: RunFolder, args: argparse.Namespace) -> dict:
    """jobs, memfree and timeout sized from profile.json for this host, when the run has one."""
    from bpcp.profile import PROFILE_FILE, load_profile
    from bpcp.runfolder import read_plan
    from bpcp.sizing import explain_settings, host_facts, settings_from_profile

    if not (run.root / PROFILE_FILE).exists() or all(getattr(args, k) is not None for k in SIZED):
        return {}
    plan = read_plan(run)
    profile = load_profile(run.root / PROFILE_FILE, plan)
    host = host_facts(args.ramdisk)
    for line in explain_settings(profile, host, plan):
        print(f"bpcp: from profile.json: {line}")
    return settings_from_profile(profile, host, plan)


def _options(args: argparse.Namespace, slots: int | None = None) -> PlanOptions:
    slots = args.slots or slots or os.cpu_count() or 1
    if slots < 1:
        raise BpcpError(f"--slots {slots}: give the number of CellProfiler processes the run will have (1 or more)")
    return PlanOptions(group_by=parse_group_by(args.group_by), only=parse_only(args.only),
                       bundle=parse_bundle(args.bundle), slots=slots)


def _prepare(args: argparse.Namespace, slots: int | None = None, write: bool = True):
    from bpcp.prepare import prepare

    prepared = prepare(args.dataset, args.pipeline, args.output, _options(args, slots), args.cellprofiler,
                       check_images=not args.skip_image_check, path_map=args.path_map, write=write)
    doc = prepared.plan.doc
    sizes = [len(j["image_numbers"]) for j in doc["jobs"]]
    bundle = doc.get("bundle", {})
    how = (f"bundled for {bundle['slots']} slots" if bundle.get("asked") == "auto" and bundle.get("sets_per_job", 0) > 1
           else "one group per job" if all(len(j["groups"]) == 1 for j in doc["jobs"]) else "bundled")
    print(f"bpcp: {'planned' if write else 'would plan'} {len(sizes)} jobs over {doc['image_sets']} image sets "
          f"({min(sizes)}-{max(sizes)} per job, {how}) with CellProfiler {doc['cellprofiler']['version']}"
          f"{' (same as the plan already there)' if prepared.reused else ''}: {Path(args.output).resolve() / 'plan.json'}")
    if bundle.get("why_not"):
        print(f"bpcp: not bundling groups: {bundle['why_not']}")
    fetching = sum(1 for job in doc["jobs"] if job.get("fetch"))
    if fetching:
        print(f"bpcp: {fetching} of {len(doc['jobs'])} jobs download their images from S3 before CellProfiler starts")
    return prepared


def cmd_example(args: argparse.Namespace) -> int:
    from bpcp.example import PlateSpec, generate_plate

    spec = PlateSpec(plates=tuple(args.plates.split(",")), rows=args.rows, columns=args.columns, sites=args.sites)
    dest = generate_plate(args.dest, spec)
    n = len(spec.plates) * len(spec.wells()) * spec.sites
    print(f"bpcp: wrote an example plate ({n} image sets) to {dest}: load_data.csv, filelist.txt, images/, "
          "example_loaddata.cppipe, example_images.cppipe")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    _prepare(args, write=not args.check)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from bpcp.run import render

    run = RunFolder(args.output.resolve())
    script = render(run, _settings(args, run), args.cellprofiler, args.sshloginfile)
    print(f"bpcp: wrote {script}; run it with `bash {script}` or `bpcp run --output {args.output}`")
    return 0


def _finish(run: RunFolder, status: int, s3_output: str = "") -> int:
    """Merge what is published and report completeness; non-zero unless every job is done."""
    from bpcp.merge import run_merge

    merged = run_merge(run.root)
    if s3_output:
        from bpcp.mirror import finish

        finish(run, s3_output)
    return merged if status == 0 else max(merged, 1)


def cmd_run(args: argparse.Namespace) -> int:
    from bpcp.render import parse_sshlogins, total_slots
    from bpcp.run import execute, render

    run = RunFolder(args.output.resolve())
    # Bad settings fail before anything is planned or run. A profile.json only exists beside the
    # plan it measured, and planning keeps that plan, so these settings hold for the run too.
    settings = _settings(args, run)
    if args.s3_output:
        from bpcp.mirror import check_prefix

        check_prefix(args.s3_output)     # no such bucket, no access: said before anything is planned
    if args.pipeline is not None:
        logins = None
        if args.sshloginfile is not None and Path(args.sshloginfile).is_file():
            logins = parse_sshlogins(Path(args.sshloginfile).read_text(), str(args.sshloginfile))
        seeded = False
        if args.s3_output:
            from bpcp.mirror import seed_plan

            seeded = seed_plan(run, args.s3_output)     # a fresh controller resumes the S3 copy's jobs
        try:
            _prepare(args, total_slots(settings.jobs, os.cpu_count() or 1, logins))
        except BpcpError:
            if seeded:
                run.plan.unlink()                          # leave the folder as it was found
            raise
    elif not run.plan.exists():
        raise BpcpError("no --pipeline given and no plan in the run folder; pass --dataset and --pipeline")
    if settings.s3_output:
        from bpcp.mirror import start

        start(run, settings.s3_output)   # jobs already published there are brought down, not rerun
    render(run, settings, args.cellprofiler, args.sshloginfile)
    status = execute(run)
    if args.no_merge:
        return 0 if status == 0 else 1
    return _finish(run, status, settings.s3_output)


def cmd_merge(args: argparse.Namespace) -> int:
    if args.s3_output:
        from bpcp.s3 import parse_url

        parse_url(args.s3_output, "--s3-output", need_key=False)
    return _finish(RunFolder(args.output.resolve()), 0, args.s3_output)


def cmd_status(args: argparse.Namespace) -> int:
    from bpcp.merge import run_status

    return run_status(args.output.resolve())


def cmd_slots(args: argparse.Namespace) -> int:
    """Jobs one host can take, sized from the run's profile.json (its cores when there is none)."""
    from bpcp.profile import PROFILE_FILE, load_profile
    from bpcp.runfolder import read_plan
    from bpcp.sizing import settings_from_profile

    run = RunFolder(args.output.resolve())
    if not (run.root / PROFILE_FILE).exists():
        print(max(1, int(args.cores)))
        return 0
    plan = read_plan(run)
    host = {"cores": args.cores, "mem_bytes": args.mem_mb << 20, "ramdisk_bytes": args.ramdisk_mb << 20}
    print(settings_from_profile(load_profile(run.root / PROFILE_FILE, plan), host, plan)["jobs"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpcp", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"bpcp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("example", help="write a small synthetic plate with example pipelines")
    p.add_argument("dest", type=Path)
    p.add_argument("--plates", default="Plate1", help="comma-separated plate names")
    p.add_argument("--rows", default="AB", help="well rows, e.g. ABCDEFGH")
    p.add_argument("--columns", type=int, default=4, help="well columns per row")
    p.add_argument("--sites", type=int, default=2, help="sites per well")
    p.set_defaults(func=cmd_example)

    p = sub.add_parser("plan", help="check the inputs and write plan.json and per-job inputs")
    _plan_arguments(p)
    _output_argument(p)
    p.add_argument("--check", action="store_true", help="check and plan, but write nothing")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("render", help="write jobs.sh, the GNU parallel script, from plan.json")
    _output_argument(p)
    _run_arguments(p)
    p.add_argument("--cellprofiler", help="CellProfiler to call (default: the one the plan was made with)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("run", help="plan, render and run on this host, then merge; rerun to resume")
    _plan_arguments(p, required=False)
    _output_argument(p)
    _run_arguments(p)
    p.add_argument("--no-merge", action="store_true", help="stop after the jobs, without merging")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("slots", help="how many jobs a host of these cores and memory can take (from profile.json)")
    _output_argument(p)
    p.add_argument("--cores", type=float, required=True)
    p.add_argument("--mem-mb", type=int, required=True)
    p.add_argument("--ramdisk-mb", type=int, default=0)
    p.set_defaults(func=cmd_slots)

    p = sub.add_parser("merge", help="merge published tables and write the completeness report")
    _output_argument(p)
    p.add_argument("--s3-output", default="", metavar="s3://BUCKET/PREFIX",
                   help="then copy the merged tables, the report and any job not yet there to this prefix")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("status", help="print which groups are done, failed or missing")
    _output_argument(p)
    p.set_defaults(func=cmd_status)

    from bpcp import estimate as _estimate, profile as _profile   # issue 6: measure, then forecast

    p = sub.add_parser("profile", help="measure a few jobs (time -v, optionally massif); write profile.json")
    _profile.add_arguments(p)
    p.set_defaults(func=_profile.command)

    p = sub.add_parser("estimate", help="forecast wall time, CPU hours and cost from plan.json and profile.json")
    _estimate.add_arguments(p)
    p.set_defaults(func=_estimate.command)

    from bpcp import report as _report   # issue 7: how the run went, as one HTML page

    p = sub.add_parser("report", help="write report.html: jobs per slot, job times, throughput, failures, efficiency")
    _report.add_arguments(p)
    p.set_defaults(func=_report.cli_command)

    from bpcp import ec2 as _ec2   # issue 5: EC2 workers for a run

    p = sub.add_parser("ec2", help="EC2 workers: launch template, launch (spot first), list, terminate, cost")
    _ec2.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BpcpError as exc:
        for line in exc.lines:
            print(f"bpcp: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bpcp: interrupted; run the same command again to finish the remaining jobs", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
