"""Plan -> the GNU parallel job script (jinja2) and the job runner's settings. Pure apart from write_script."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2

from bpcp import __version__
from bpcp.aws.s3 import parse_url
from bpcp.errors import BpcpError
from bpcp.inputs.cellprofiler import CellProfiler
from bpcp.jobs import runner
from bpcp.jobs.sharedfs import MODES
from bpcp.jobs.stage import write_stage
from bpcp.planfile import Plan
from bpcp.runfolder import RunFolder, write_atomic
from bpcp.sizing.slots import parse_size

_SIZE = re.compile(r"^\d+(\.\d+)?[KMGTkmgt]?$")
_TIMEOUT = re.compile(r"^\d+(\.\d+)?([smhd]|%)?$")
_HALT = re.compile(r"^(never|(now|soon),(fail|success|done)=\d+%?)$")
_JOBS = re.compile(r"^(\d+%?|[+-]\d+)$")


@dataclass(frozen=True)
class RunSettings:
    jobs: str = "100%"          # slots per host: a number, N% of cores, or +N/-N
    retries: int = 3            # attempts per job in all (GNU parallel --retries)
    timeout: str = "1000%"      # per-job limit: seconds (s/m/h/d suffix) or N% of the median job; "" = none
    memfree: str = "1G"         # a job starts CellProfiler only when its host has this much available
    halt: str = "soon,fail=25%"
    tmp_root: str = "auto"      # "auto" = the RAM disk when mounted, else on disk; "" = on disk
    ramdisk: str = "/mnt/bpcp-ramdisk"
    pin_threads: bool = True
    s3_python: str = "/opt/awscli/bin/python3"   # Python with botocore on every worker (the awscli role's)
    s3_output: str = ""         # s3://bucket/prefix: published jobs, merged tables and reports go there too
    warm_workers: bool = True   # one resident CellProfiler per slot runs job after job (runner.py)
    worker_jobs: int = runner.WORKER_JOBS   # jobs before a fresh worker replaces one
    worker_rss: str = ""        # a worker past this RSS is replaced after its job ("" = no bound)
    shared_fs: str = "no"       # SSH hosts: "yes" = they see the run folder and images here, "auto" = check; "no" = stage

    def validate(self) -> RunSettings:
        problems = []
        if not _JOBS.match(str(self.jobs)):
            problems.append(f"--jobs {self.jobs!r}: give a number of jobs per host, or N% of its cores")
        if self.retries < 1:
            problems.append(f"--retries {self.retries}: give 1 or more attempts per job")
        if self.timeout and not _TIMEOUT.match(self.timeout):
            problems.append(f"--timeout {self.timeout!r}: give seconds (e.g. 3600, 90m) or N% of the median job time")
        if self.memfree and not _SIZE.match(self.memfree):
            problems.append(f"--memfree {self.memfree!r}: give a size such as 2G or 512M")
        if not _HALT.match(self.halt):
            problems.append(f"--halt {self.halt!r}: give never, or now|soon,fail|success|done=N[%] (e.g. soon,fail=25%)")
        if self.tmp_root not in ("auto", "") and not os.path.isabs(self.tmp_root):
            problems.append(f"--tmp-root {self.tmp_root!r}: give an absolute folder, 'auto' or ''")
        if not os.path.isabs(self.s3_python):
            problems.append(f"--s3-python {self.s3_python!r}: give the absolute path of a Python with botocore")
        if self.shared_fs not in MODES:
            problems.append(f"--shared-fs {self.shared_fs!r}: give yes, no or auto")
        if self.worker_jobs < 1:
            problems.append(f"--worker-jobs {self.worker_jobs}: give 1 or more jobs per warm worker")
        if self.worker_rss and not _SIZE.match(self.worker_rss):
            problems.append(f"worker_rss {self.worker_rss!r}: give a size such as 4G or 512M")
        if self.s3_output:
            try:
                parse_url(self.s3_output, "--s3-output", need_key=False)
            except BpcpError as exc:
                problems += exc.lines
        if problems:
            raise BpcpError(problems)
        return self


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bpcp.jobs", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["shquote"] = lambda v: shlex.quote(str(v))
    return env


def runner_config(plan: Plan, run_dir: Path, settings: RunSettings, cp: CellProfiler, multihost: bool,
                  shared_fs: bool = False) -> dict:
    """runner.json: everything the job runner needs to know about the run (docs/run-folder.md).
    shared_fs: the hosts run jobs in the run folder itself (nothing staged)."""
    return {
        "format": 1,
        "bpcp_version": __version__,
        "run_dir": str(run_dir),
        "kind": plan.dataset.kind,
        "numbering": plan.numbering,
        "pipeline": plan.pipeline.file,
        "staged": multihost and not shared_fs,
        "shared_fs": multihost and shared_fs,
        "cellprofiler": {"executable": str(cp.executable), "python": str(cp.python), "version": plan.cellprofiler.version,
                         "env": cp.env},
        "pin_threads": settings.pin_threads,
        "tables": {t: plan.table_file(t) for t in plan.tables},
        "delimiter": plan.delimiter,
        "tmp_root": settings.tmp_root,
        "ramdisk": settings.ramdisk,
        "s3_python": settings.s3_python,
        "jobs_total": len(plan.jobs),
        "timeout": settings.timeout,
        # admission: a job starts CellProfiler only when its host has this much memory available
        "memory_needed": parse_size(settings.memfree) if settings.memfree else 0,
        "warm_workers": settings.warm_workers,
        "worker_jobs": settings.worker_jobs,
        "worker_rss": parse_size(settings.worker_rss) if settings.worker_rss else 0,
        "worker_idle": runner.WORKER_IDLE,
    }


def render_script(plan: Plan, run_dir: Path, settings: RunSettings, multihost: bool = False, slots: int = 0,
                  shared_fs: bool = False, python: str = "python3") -> str:
    """The job script text for a plan. Group values never appear in it: jobs are named by id.
    slots: the run's CellProfiler processes over all hosts, for the file descriptors parallel needs;
    shared_fs: the hosts see the run folder here, so no job is staged or returned;
    python: the job runner's interpreter on this host (remote hosts use their python3)."""
    context = {
        "python": python,
        "version": __version__,
        "run_dir": str(run_dir),
        "settings": asdict(settings),
        "multihost": multihost,
        "shared_fs": multihost and shared_fs,
        "slots": slots,
        # GNU parallel holds 4 descriptors per running job (--group) and silently starts no more
        # when they run out; a margin for its own files and the collector
        "descriptors": 4 * slots + 64,
        "fetch": any(job.fetch for job in plan.jobs),
    }
    return _environment().get_template("jobs.sh.j2").render(**context)


def joblist(plan: Plan) -> str:
    """One line per job, longest first: id TAB number of image sets."""
    return "".join(f"{job.id}\t{job.image_sets}\n" for job in plan.jobs)


def parse_sshlogins(text: str, source: str) -> list[str]:
    """GNU parallel sshlogin lines ([slots/]login, ':' = this host); comments and blanks dropped."""
    logins = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not logins:
        raise BpcpError(f"{source}: no hosts in it; list one GNU parallel sshlogin per line (':' is this host)")
    return logins


def host_slots(jobs: str, cores: int) -> int:
    """GNU parallel's -j value on a host of `cores` cores, as a number of slots."""
    jobs = str(jobs)
    if jobs.endswith("%"):
        return max(1, cores * int(jobs[:-1]) // 100)
    if jobs[0] in "+-":
        return max(1, cores + int(jobs))
    return max(1, int(jobs))


def total_slots(jobs: str, cores: int, sshlogins: list[str] | None = None) -> int:
    """Slots over all hosts: the 'N/' of each sshlogin, else `jobs` of this host's cores."""
    if not sshlogins:
        return host_slots(jobs, cores)
    total = 0
    for login in sshlogins:
        count, sep, _ = login.partition("/")
        total += int(count) if sep and count.strip().isdigit() else host_slots(jobs, cores)
    return total


def write_script(run: RunFolder, plan: Plan, settings: RunSettings, cp: CellProfiler,
                 sshlogins: list[str] | None = None, shared_fs: bool = False) -> Path:
    """jobs.sh, joblist.tsv, runner.json and the runner; with sshlogins, also sshlogins.txt and
    stage/ for remote hosts (none on a shared filesystem: an earlier render's is removed)."""
    multihost = bool(sshlogins)
    slots = total_slots(settings.jobs, os.cpu_count() or 1, sshlogins)
    text = render_script(plan, run.root, settings.validate(), multihost, slots, shared_fs, sys.executable or "python3")
    config = runner_config(plan, run.root, settings, cp, multihost, shared_fs)
    write_atomic(run.root / runner.CONFIG, json.dumps(config, indent=1) + "\n")
    write_atomic(run.root / runner.RUNNER, Path(runner.__file__).read_text())
    if multihost:
        if shared_fs:
            shutil.rmtree(run.root / "stage", ignore_errors=True)     # symlinks only
        else:
            write_stage(run, plan)
        write_atomic(run.root / "sshlogins.txt", "\n".join(sshlogins or []) + "\n")
    for job in plan.jobs:
        if job.group_arg is not None:
            write_atomic(run.root / "inputs" / f"{job.id}.group", job.group_arg)
    write_atomic(run.joblist, joblist(plan))
    write_atomic(run.jobs_script, text)
    run.jobs_script.chmod(0o755)
    return run.jobs_script
