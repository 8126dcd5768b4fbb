"""Plan -> self-contained bash job script for GNU parallel (jinja2). Pure apart from write_script."""
from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2

from bpcp import __version__
from bpcp.errors import BpcpError
from bpcp.runfolder import RunFolder, write_atomic

# One thread per CellProfiler process: unpinned processes burn CPU spinning (see benchmarks/).
THREAD_ENV = (
    ("OMP_NUM_THREADS", "1"),
    ("OPENBLAS_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
    ("NUMEXPR_NUM_THREADS", "1"),
    ("VECLIB_MAXIMUM_THREADS", "1"),
    ("BLIS_NUM_THREADS", "1"),
    ("MPLBACKEND", "Agg"),
)
JAVA_THREAD_ENV = (("JAVA_TOOL_OPTIONS", "-XX:ActiveProcessorCount=1 -XX:+UseSerialGC"),)

_SIZE = re.compile(r"^\d+(\.\d+)?[KMGTkmgt]?$")
_TIMEOUT = re.compile(r"^\d+(\.\d+)?([smhd]|%)?$")
_HALT = re.compile(r"^(never|(now|soon),(fail|success|done)=\d+%?)$")
_JOBS = re.compile(r"^(\d+%?|[+-]\d+)$")


@dataclass(frozen=True)
class RunSettings:
    jobs: str = "100%"          # slots per host: a number, N% of cores, or +N/-N
    retries: int = 3            # attempts per job in all (GNU parallel --retries)
    timeout: str = "1000%"      # per-job limit: seconds (s/m/h/d suffix) or N% of the median job; "" = none
    memfree: str = "1G"         # start no job below this free memory; kill the youngest below half
    halt: str = "soon,fail=25%"
    tmp_root: str = "auto"      # "auto" = the RAM disk when mounted, else on disk; "" = on disk
    ramdisk: str = "/mnt/bpcp-ramdisk"
    pin_threads: bool = True
    s3_python: str = "/opt/awscli/bin/python3"   # Python with botocore on every worker (the awscli role's)
    s3_output: str = ""         # s3://bucket/prefix: published jobs, merged tables and reports go there too

    def validate(self) -> "RunSettings":
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
        if self.s3_output:
            from bpcp.s3 import parse_url

            try:
                parse_url(self.s3_output, "--s3-output", need_key=False)
            except BpcpError as exc:
                problems += exc.lines
        if problems:
            raise BpcpError(problems)
        return self


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bpcp", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["shquote"] = lambda v: shlex.quote(str(v))
    return env


def render_script(plan: dict, run_dir: Path, settings: RunSettings, cp_argv: list[str],
                  cp_env: dict[str, str] | None = None, multihost: bool = False) -> str:
    """The job script text for a plan. Group values never appear in it: jobs are named by id."""
    version = plan["cellprofiler"]["version"]
    thread_env = list(THREAD_ENV) if settings.pin_threads else [("MPLBACKEND", "Agg")]
    if settings.pin_threads and version.startswith("4"):
        thread_env += list(JAVA_THREAD_ENV)
    for name, value in (cp_env or {}).items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or not re.fullmatch(r"[\w./:=+-]*", value):
            raise BpcpError(f"CellProfiler environment {name}={value!r} is not safe to render; unset it")
    context = {
        "version": __version__,
        "run_dir": str(run_dir),
        "settings": {**asdict(settings), "table_files": plan["table_files"], "delimiter": plan["delimiter"]},
        "numbering": plan["numbering"],
        "kind": plan["dataset"]["kind"],
        "pipeline_path": ("stage/$id/" if multihost else "") + plan["pipeline"]["file"],
        "multihost": multihost,
        "cp_argv": cp_argv,
        "cp_env": sorted((cp_env or {}).items()),
        "thread_env": thread_env,
        "fetch": any(job.get("fetch") for job in plan["jobs"]),
        "s3_output": settings.s3_output.rstrip("/"),
        "controller_python": sys.executable,
    }
    return _environment().get_template("jobs.sh.j2").render(**context)


def joblist(plan: dict) -> str:
    """One line per job, longest first: id TAB number of image sets."""
    return "".join(f"{job['id']}\t{len(job['image_numbers'])}\n" for job in plan["jobs"])


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


def write_script(run: RunFolder, plan: dict, settings: RunSettings, cp_argv: list[str],
                 cp_env: dict[str, str] | None = None, sshlogins: list[str] | None = None) -> Path:
    """jobs.sh and joblist.tsv; with sshlogins, also sshlogins.txt and stage/ for remote hosts."""
    multihost = bool(sshlogins)
    text = render_script(plan, run.root, settings.validate(), cp_argv, cp_env, multihost)
    if multihost:
        from bpcp.stage import write_stage

        write_stage(run, plan)
        write_atomic(run.root / "sshlogins.txt", "\n".join(sshlogins) + "\n")
    for job in plan["jobs"]:
        if job.get("group_arg") is not None:
            (run.root / "inputs" / f"{job['id']}.group").write_text(job["group_arg"])
    write_atomic(run.joblist, joblist(plan))
    write_atomic(run.jobs_script, text)
    run.jobs_script.chmod(0o755)
    return run.jobs_script

