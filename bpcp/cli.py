"""The `bpcp` command: batch processing with CellProfiler on one host or many.

Parses arguments and calls the step modules; no logic of its own.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from bpcp import __version__, planfile
from bpcp.errors import BpcpError
from bpcp.jobs.plan import AUTO_MAX_SETS, PlanOptions, parse_bundle, parse_group_by, parse_only
from bpcp.jobs.render import RunSettings
from bpcp.runfolder import RunFolder, hold

DEFAULT_OUTPUT = "bpcp-run"


def _plan_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_argument_group("what to run")
    g.add_argument("--dataset", "-d", help="LoadData CSV (a path or s3://bucket/key.csv), file list, image folder "
                                           "or Batch_data.h5")
    g.add_argument("--pipeline", "-p", required=required, help=".cppipe pipeline (a path or s3:// URL) or Batch_data.h5")
    g.add_argument("--group-by", "-g", default=None,
                   help="comma-separated metadata keys, one job per group; 'none' = one group. Default: the "
                        "pipeline's own grouping (Groups module or LoadData), one job for a pipeline that aggregates "
                        "over the whole run, else Metadata_Plate,Metadata_Well")
    g.add_argument("--only", action="append", metavar="KEY=VALUE[,KEY=VALUE]",
                   help="run only the groups with these values (repeat for more)")
    g.add_argument("--bundle", default=None, metavar="auto|N|0",
                   help="pack groups into jobs of about N image sets to amortise CellProfiler's start-up; "
                        f"auto: about one job per slot, at most {AUTO_MAX_SETS} image sets each; "
                        "0: one group per job. Default: 0 with warm workers (the default), auto with --no-warm-workers")
    g.add_argument("--slots", type=int, default=None, metavar="N",
                   help="CellProfiler processes the run will have, for --bundle auto (default: this host's cores; "
                        "`bpcp run` counts --jobs and --sshloginfile)")
    g.add_argument("--cellprofiler", default="auto",
                   help="CellProfiler venv folder, its executable, or a version installed under /opt/cellprofiler; "
                        "auto (default): the installed version that saved the pipeline, else $BPCP_CELLPROFILER or "
                        "/opt/cellprofiler/current")
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
                   help=f"a job starts CellProfiler only when its host has this much memory available "
                        f"(default: from profile.json, else {d.memfree})")
    g.add_argument("--halt", default=d.halt, help=f"GNU parallel halt policy (default {d.halt.replace('%', '%%')})")
    g.add_argument("--tmp-root", default=d.tmp_root,
                   help="CellProfiler temp folder root: 'auto' = the RAM disk when mounted (default), '' = on disk")
    g.add_argument("--ramdisk", default=d.ramdisk, help=f"RAM disk mount point (default {d.ramdisk})")
    g.add_argument("--no-pin-threads", action="store_true", help="let each process use many threads")
    g.add_argument("--warm-workers", action=argparse.BooleanOptionalAction, default=None,
                   help="one resident CellProfiler per slot runs job after job, paying its start-up once "
                        f"(default: {'on' if d.warm_workers else 'off'}); --no-warm-workers: a fresh process per job")
    g.add_argument("--worker-jobs", type=int, default=d.worker_jobs,
                   help=f"jobs a warm worker runs before a fresh one replaces it (default {d.worker_jobs})")
    g.add_argument("--s3-output", default="", metavar="s3://BUCKET/PREFIX",
                   help="also keep the results there: published jobs as they finish, merged tables and reports; "
                        "a rerun resumes from what is there (docs/s3.md)")
    g.add_argument("--s3-python", default=d.s3_python,
                   help=f"Python with botocore that jobs download S3 images with, on every host (default {d.s3_python})")
    g.add_argument("--sshloginfile", type=Path, default=None,
                   help="run on these hosts: one GNU parallel sshlogin per line ([slots/]ssh-command, ':' = this host)")
    g.add_argument("--shared-fs", nargs="?", const="yes", default=d.shared_fs, choices=("yes", "no", "auto"),
                   help="the --sshloginfile hosts see the run folder and the images at the same paths (NFS): jobs "
                        "read and write it directly, checked on every host before any job starts; auto: use it "
                        "when every host passes the check, else copy each job's inputs (default: no)")


SIZED = ("jobs", "timeout", "memfree")


def _settings(args: argparse.Namespace, run: RunFolder | None = None) -> RunSettings:
    """Explicit options first, then what the run folder's profile.json measured, then defaults."""
    d = RunSettings()
    measured = _profile_settings(run, args) if run is not None else {}
    chosen = {k: str(getattr(args, k)) if getattr(args, k) is not None else measured.get(k, getattr(d, k))
              for k in SIZED}
    return RunSettings(retries=args.retries, halt=args.halt, tmp_root=args.tmp_root, ramdisk=args.ramdisk,
                       pin_threads=not args.no_pin_threads, s3_python=args.s3_python, s3_output=args.s3_output,
                       shared_fs=args.shared_fs, warm_workers=d.warm_workers if args.warm_workers is None
                       else args.warm_workers, worker_jobs=args.worker_jobs,
                       worker_rss=measured.get("worker_rss", d.worker_rss), **chosen).validate()


def _profile_settings(run: RunFolder, args: argparse.Namespace) -> dict:
    """jobs, memfree and timeout sized from profile.json for this host, when the run has one."""
    from bpcp.sizing.profile import PROFILE_FILE, load_profile
    from bpcp.sizing.slots import explain_settings, host_facts, settings_from_profile

    if not (run.root / PROFILE_FILE).exists() or all(getattr(args, k) is not None for k in SIZED):
        return {}
    plan = planfile.read(run)
    profile = load_profile(run.root / PROFILE_FILE, plan)
    host = host_facts(args.ramdisk)
    for line in explain_settings(profile, host, plan):
        print(f"bpcp: from profile.json: {line}")
    return settings_from_profile(profile, host, plan)


def _options(args: argparse.Namespace, slots: int | None = None) -> PlanOptions:
    slots = args.slots or slots or os.cpu_count() or 1
    if slots < 1:
        raise BpcpError(f"--slots {slots}: give the number of CellProfiler processes the run will have (1 or more)")
    bundle = args.bundle
    if bundle is None:     # warm workers start CellProfiler once per slot: one group per job costs no start-up
        warm = getattr(args, "warm_workers", None)
        bundle = "0" if (RunSettings().warm_workers if warm is None else warm) else "auto"
    return PlanOptions(group_by=parse_group_by(args.group_by), only=parse_only(args.only),
                       bundle=parse_bundle(bundle), slots=slots)


def _prepare(args: argparse.Namespace, slots: int | None = None, write: bool = True, as_json: bool = False):
    from bpcp.jobs.prepare import prepare

    out = sys.stderr if as_json else sys.stdout       # --json: stdout holds the JSON alone
    with contextlib.redirect_stdout(out):
        prepared = prepare(args.dataset, args.pipeline, args.output, _options(args, slots), args.cellprofiler,
                           check_images=not args.skip_image_check, path_map=args.path_map, write=write)
    plan = prepared.plan
    sizes = [j.image_sets for j in plan.jobs]
    bundle = plan.bundle
    how = (f"bundled for {bundle.slots} slots" if bundle.asked == "auto" and bundle.sets_per_job > 1
           else "one group per job" if all(len(j.groups) == 1 for j in plan.jobs) else "bundled")
    path = Path(args.output).resolve() / "plan.json"
    print(f"bpcp: {'planned' if write else 'would plan'} {len(sizes)} jobs over {plan.image_sets} image sets "
          f"({min(sizes)}-{max(sizes)} per job, {how}) with CellProfiler {plan.cellprofiler.version}"
          f"{' (same as the plan already there)' if prepared.reused else ''}: {path}", file=out)
    if bundle.why_not:
        print(f"bpcp: not bundling groups: {bundle.why_not}", file=out)
    for warning in plan.warnings:
        print(f"bpcp: warning: {warning}", file=out)
    fetching = sum(1 for job in plan.jobs if job.fetch)
    if fetching:
        print(f"bpcp: {fetching} of {len(plan.jobs)} jobs download their images from S3 before CellProfiler starts", file=out)
    if as_json:
        print(json.dumps({"plan": str(path), "written": write, "reused": prepared.reused, "jobs": len(sizes),
                          "groups": sum(len(j.groups) for j in plan.jobs), "image_sets": plan.image_sets,
                          "image_sets_per_job": [min(sizes), max(sizes)], "bundling": how,
                          "cellprofiler": plan.cellprofiler.version, "warnings": list(plan.warnings),
                          "downloading_jobs": fetching}))
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
    _prepare(args, write=not args.check, as_json=args.json)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from bpcp.jobs.execute import render

    run = RunFolder(args.output.resolve())
    script = render(run, _settings(args, run), args.cellprofiler, args.sshloginfile)
    print(f"bpcp: wrote {script}; run it with `bash {script}` or `bpcp run --output {args.output}`")
    return 0


def _finish(run: RunFolder, status: int, s3_output: str = "", checksums: bool = False, as_json: bool = False) -> int:
    """Merge what is published, report completeness, draw report.html (never failing the run) and
    say where the results are; non-zero unless every job is done."""
    from bpcp.results.merge import run_merge
    from bpcp.results.report import finish_report, results_line

    merged = run_merge(run.root, checksums=checksums, as_json=as_json)
    html = finish_report(run.root) if run.plan.exists() else None
    problems: list[str] = []
    if s3_output:
        from bpcp.aws.mirror import finish

        try:
            finish(run, s3_output)        # the final pass: what the uploader did not copy, merged/, reports
        except BpcpError as exc:
            problems = exc.lines
    line = results_line(run.root, html)
    if line and not as_json:
        print(line)
    for problem in problems:
        print(f"bpcp: error: {problem}", file=sys.stderr)
    return merged if status == 0 and not problems else max(merged, 1)


def cmd_run(args: argparse.Namespace) -> int:
    from bpcp.jobs.execute import execute, render
    from bpcp.jobs.render import parse_sshlogins, total_slots
    from bpcp.jobs.slurm import engine_for

    run = RunFolder(args.output.resolve())
    # Bad settings fail before anything is planned or run. A profile.json only exists beside the
    # plan it measured, and planning keeps that plan, so these settings hold for the run too.
    engine = engine_for(run, args)      # --engine slurm: its options and the cluster checked (None: GNU parallel)
    if engine is not None and args.warm_workers is None:
        args.warm_workers = False       # each Slurm task is its own allocation: no worker outlives it to be reused
    settings = _settings(args, run)
    if args.s3_output:
        from bpcp.aws.mirror import check_prefix

        check_prefix(args.s3_output)     # no such bucket, no access: said before anything is planned
    if args.pipeline is not None:
        logins = None
        if args.sshloginfile is not None and Path(args.sshloginfile).is_file():
            logins = parse_sshlogins(Path(args.sshloginfile).read_text(), str(args.sshloginfile))
        seeded = False
        if args.s3_output:
            from bpcp.aws.mirror import seed_plan

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
        from bpcp.aws.mirror import start

        start(run, settings.s3_output)   # jobs already published there are brought down, not rerun
    render(run, settings, args.cellprofiler, args.sshloginfile)
    status = execute(run, engine=engine, s3_output=settings.s3_output)
    if status != 0 and _failed_bundles(run) and _can_plan_again(args):
        # One bad image must fail only its group: plan the failed bundles one group per job, run those.
        _prepare(args, total_slots(settings.jobs, os.cpu_count() or 1, None))
        if not _failed_bundles(run):     # split: every group gets its chance, no halting on the failures
            render(run, dataclasses.replace(settings, halt="never"), args.cellprofiler, args.sshloginfile)
            status = execute(run, engine=engine, s3_output=settings.s3_output)
    if args.no_merge or (engine is not None and engine.detached):
        return 0 if status == 0 else 1
    return _finish(run, status, settings.s3_output)


def _failed_bundles(run: RunFolder) -> list[str]:
    plan = planfile.read(run)
    return [j.id for j in plan.jobs if len(j.groups) > 1 and (run.failed(j.id) / "reason.txt").is_file()
            and not run.published(j.id).is_dir()]


def _can_plan_again(args: argparse.Namespace) -> bool:
    """Planning again needs the dataset, pipeline and options the run was planned with."""
    if args.pipeline is None:
        print("bpcp: bundled jobs failed; run again with the --dataset, --pipeline and options of this run "
              "to retry them one group per job")
    return args.pipeline is not None


def cmd_merge(args: argparse.Namespace) -> int:
    if args.s3_output:
        from bpcp.aws.s3 import parse_url

        parse_url(args.s3_output, "--s3-output", need_key=False)
    return _finish(RunFolder(args.output.resolve()), 0, args.s3_output, args.checksums, args.json)


def cmd_status(args: argparse.Namespace) -> int:
    from bpcp.jobs.slurm import collect
    from bpcp.results.merge import run_status

    collect(args.output.resolve())      # a run folder submitted to Slurm: what its tasks do, why some died
    return run_status(args.output.resolve(), as_json=args.json)


def cmd_verify(args: argparse.Namespace) -> int:
    from bpcp.results.verify import run_verify

    return run_verify(args.output.resolve())


def cmd_slots(args: argparse.Namespace) -> int:
    """Jobs one host can take, sized from the run's profile.json (its cores when there is none)."""
    from bpcp.sizing.profile import PROFILE_FILE, load_profile
    from bpcp.sizing.slots import settings_from_profile

    run = RunFolder(args.output.resolve())
    if not (run.root / PROFILE_FILE).exists():
        print(max(1, int(args.cores)))
        return 0
    plan = planfile.read(run)
    host = {"cores": args.cores, "mem_bytes": args.mem_mb << 20, "ramdisk_bytes": args.ramdisk_mb << 20}
    print(settings_from_profile(load_profile(run.root / PROFILE_FILE, plan), host, plan)["jobs"])
    return 0


# Exit statuses, the same for every command (documented in --help and the README).
EXIT_COMPLETE, EXIT_INCOMPLETE, EXIT_BAD_INPUT, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 64, 130
EXIT_CODES = f"""exit status:
  {EXIT_COMPLETE}    done: every job published and merged (status: complete)
  {EXIT_INCOMPLETE}    some jobs failed or are not done yet; what is done is merged (see report.json)
  {EXIT_BAD_INPUT}    bad input or environment, said in one line before anything changed
  {EXIT_USAGE}   usage error: an unknown command or option, a missing argument
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C): run the same command again to go on"""


class Parser(argparse.ArgumentParser):
    """argparse with its own exit status for usage errors, so scripts tell them from bad input."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def cmd_completion(args: argparse.Namespace) -> int:
    """A shell completion script made from this parser (shtab): source it, or put it where the shell looks."""
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="bpcp", description=__doc__.splitlines()[0] if __doc__ else None, epilog=EXIT_CODES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"bpcp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

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
    p.add_argument("--json", action="store_true", help="print what was planned as JSON (messages go to stderr)")
    p.add_argument("--wait", action="store_true", help="wait while another bpcp command holds the run folder")
    p.set_defaults(func=cmd_plan, holds=True)

    p = sub.add_parser("render", help="write jobs.sh, the GNU parallel script, from plan.json")
    _output_argument(p)
    _run_arguments(p)
    p.add_argument("--cellprofiler", help="CellProfiler to call (default: the one the plan was made with)")
    p.add_argument("--wait", action="store_true", help="wait while another bpcp command holds the run folder")
    p.set_defaults(func=cmd_render, holds=True)

    p = sub.add_parser("run", help="plan, render and run on this host, then merge; rerun to resume")
    _plan_arguments(p, required=False)
    _output_argument(p)
    _run_arguments(p)
    p.add_argument("--no-merge", action="store_true", help="stop after the jobs, without merging")
    from bpcp.jobs import slurm as _slurm  # --engine slurm and its options

    _slurm.add_arguments(p)
    p.add_argument("--wait", action="store_true", help="wait while another bpcp command holds the run folder")
    p.set_defaults(func=cmd_run, holds=True)

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
    p.add_argument("--wait", action="store_true", help="wait while another bpcp command holds the run folder")
    p.add_argument("--checksums", action="store_true",
                   help="check the sha256 of every published file against its job's manifest, not only of the tables")
    p.add_argument("--json", action="store_true", help="print the merge and the completeness report as JSON")
    p.set_defaults(func=cmd_merge, holds=True)

    p = sub.add_parser("status", help="print which groups are done, failed or missing")
    _output_argument(p)
    p.add_argument("--json", action="store_true", help="print report.json's content (and whether merged/ agrees) as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("verify", help="check every published job against its manifest (sha256, rows) and merged/ "
                                      "against report.json; changes nothing")
    _output_argument(p)
    p.set_defaults(func=cmd_verify)

    from bpcp.sizing import estimate as _estimate  # measure, then forecast
    from bpcp.sizing import profile as _profile

    p = sub.add_parser("profile", help="measure a few jobs (time -v, optionally massif); write profile.json")
    _profile.add_arguments(p)
    p.set_defaults(func=_profile.command)

    p = sub.add_parser("estimate", help="forecast wall time, CPU hours and cost from plan.json and profile.json")
    _estimate.add_arguments(p)
    p.set_defaults(func=_estimate.command)

    from bpcp.results import report as _report  # how the run went, as one HTML page

    p = sub.add_parser("report", help="write report.html: jobs per slot, job times, throughput, failures, efficiency")
    _report.add_arguments(p)
    p.set_defaults(func=_report.cli_command)

    from bpcp.aws import ec2 as _ec2  # EC2 workers for a run

    p = sub.add_parser("ec2", help="EC2 workers: launch template, launch (spot first), list, terminate, cost")
    _ec2.add_arguments(p)
    p = sub.add_parser("completion", help="print a shell completion script: source <(bpcp completion bash)")
    p.add_argument("shell", choices=("bash", "zsh", "tcsh"))
    p.set_defaults(func=cmd_completion)
    return parser


def _run_command(args: argparse.Namespace) -> int:
    """Commands that change the run folder hold it while they run (`bpcp plan --check` writes nothing)."""
    if getattr(args, "holds", False) and not getattr(args, "check", False):
        with hold(RunFolder(args.output.resolve()), f"bpcp {args.command}", getattr(args, "wait", False)):
            return args.func(args)
    return args.func(args)


def os_error_line(exc: OSError) -> str:
    """One line for a file system error: the file, what happened, and what to do."""
    where = exc.filename or "a file"
    if exc.errno == errno.ENOSPC:
        return (f"{where}: no space left on its device; free some (or choose another --output) and run the "
                "same command again: what was published is kept, and the run goes on from there")
    return f"{where}: {exc.strerror or exc}; check that the folder exists, is writable and has space"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run_command(args)
    except BpcpError as exc:
        for line in exc.lines:
            print(f"bpcp: error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:             # `bpcp ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_COMPLETE
    except OSError as exc:
        print(f"bpcp: error: {os_error_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("bpcp: interrupted; run the same command again to finish the remaining jobs", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
