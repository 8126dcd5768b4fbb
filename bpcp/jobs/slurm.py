"""The Slurm engine: the plan's unpublished jobs as Slurm job arrays, one job runner per task.

`bpcp run --engine slurm` renders as for GNU parallel (runner.json, bpcp_runner.py, joblist.tsv),
then, from the login node (this machine, which must see the run folder at the same path as the
compute nodes):

1. checks the request before anything is submitted: sbatch is there, the partition, account and
   QOS exist (scontrol, sinfo; sacctmgr when the cluster keeps accounts), `sbatch --test-only`
   accepts the exact request, and a small check task on a compute node sees the run folder,
   python3, CellProfiler and every image (bounded wait);
2. writes each array's job list (slurm/jobs-<n>.txt, one job id per line) and task script
   (slurm/jobs-<n>.sh: task i runs `python3 <run>/bpcp_runner.py run --run-dir <run> <job on line
   i+1>`), submits it with `sbatch --parsable --array=0-N%K`, several arrays above the cluster's
   MaxArraySize (the throttle K shared among them), and records every array id in
   slurm/state.json, so a rerun never submits a job that is still pending or running;
3. waits with progress read from the run folder (published/, failed/), squeue for the tasks'
   states (no slurmdbd, sacct or jobcomp file needed), resubmits failed tasks up to --retries,
   writes why a task was killed (memory, time limit, cancelled: read from its output file
   slurm/out/<array>_<task>.out) into failed/<job>/reason.txt, cancels its arrays on Ctrl-C, or
   with --detach leaves them running (a later `bpcp run` or `bpcp status` collects).

The runner's lock and rename make every repeat safe: a task requeued after a node failure, or a job
submitted twice, is still published once. Pure: the parsing, the array split, the sbatch
arguments, the script text and the failure wording; the side effects are in `Slurm` (the commands,
each with a deadline) and `SlurmEngine`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bpcp import __version__, planfile
from bpcp.errors import BpcpError
from bpcp.jobs import runner
from bpcp.jobs.sharedfs import MISSING_IMAGES, image_paths
from bpcp.planfile import Plan
from bpcp.runfolder import RunFolder, write_atomic

STATE = "slurm/state.json"
DEFAULT_MEM = "4G"            # a Cell Painting CellProfiler process takes about 3.75 GB (docs/slurm.md)
DEFAULT_TIME = "12:00:00"     # a wall-clock limit always: a stuck CellProfiler must not hold a node forever
COMMAND_TIMEOUT = 60.0        # seconds any one Slurm command may take
SILENCE = 300.0               # squeue may fail this long (a slurmctld restart) before bpcp stops waiting
CHECK_WAIT = 300.0            # default bound on the check task's wait (--node-check-wait)
CHECK_GRACE = 20.0            # after the check task ended: how long its result may take to show (NFS caches)
POLL = float(os.environ.get("BPCP_SLURM_POLL", "5"))   # seconds between squeue calls
QUEUE_LINE_EVERY = 60.0       # the queue line ("3 pending, 2 running") at most this often

# squeue's states of a task that has ended for good; any other state is still live (pending,
# running, completing, requeued, suspended, ...). A task gone from squeue has ended too.
FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"})

# sbatch options bpcp sets itself (and reads back): refused in --sbatch-arg, with what to use instead.
OWN_OPTIONS = {
    "--array": "bpcp makes the arrays", "-a": "bpcp makes the arrays",
    "--output": "bpcp reads each task's output under <run>/slurm/out", "-o": "bpcp reads each task's output",
    "--error": "bpcp reads Slurm's kill messages in the task's output", "-e": "bpcp reads the task's output",
    "--open-mode": "bpcp appends", "--parsable": "bpcp reads the job id", "--wrap": "bpcp writes the task script",
    "--chdir": "tasks run in the run folder", "-D": "tasks run in the run folder",
    "--wait": "bpcp waits itself (or --detach)", "-W": "bpcp waits itself (or --detach)",
    "--test-only": "bpcp tests the request itself",
    "--mem": "use --mem", "--mem-per-cpu": "use --mem", "--mem-per-gpu": "use --mem",
    "--time": "use --time", "-t": "use --time",
    "--partition": "use --partition", "-p": "use --partition",
    "--account": "use --account", "-A": "use --account", "--qos": "use --qos", "-q": "use --qos",
    "--cpus-per-task": "each task is one single-threaded CellProfiler", "-c": "each task is one CellProfiler",
    "--ntasks": "each task is one job runner", "-n": "each task is one job runner",
}


# ----------------------------------------------------------------------------- options (pure)
@dataclass(frozen=True)
class Options:
    """What the user asked of Slurm; None = not given (recorded values, profile.json or defaults)."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    time: str | None = None
    sbatch_args: tuple[str, ...] = ()
    throttle: int | None = None          # --jobs: tasks at once (the array's %K)

    def given(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, (), [])}

    def over(self, recorded: dict) -> Options:
        """These options, with what an earlier submission of the run recorded where none is given."""
        merged = {**recorded, **self.given()}
        merged["sbatch_args"] = tuple(merged.get("sbatch_args") or ())
        known = set(Options.__dataclass_fields__)
        return Options(**{k: v for k, v in merged.items() if k in known})


_MEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_mem(text: str) -> int:
    """--mem as Slurm reads it (a plain number is MB) -> MiB: '4G' -> 4096, '512M', '1.5G', '4000'."""
    m = _MEM.match(str(text))
    if not m:
        raise BpcpError(f"--mem {text!r}: give a size such as 4G or 3500M (a plain number is MB, as in sbatch)")
    value = float(m.group(1)) * {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2).upper()]
    if value < 1:
        raise BpcpError(f"--mem {text!r}: give at least 1M")
    return math.ceil(value)


_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_SUFFIX_TIME = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_time(text: str, plain: str = "minutes", what: str = "--time") -> int | None:
    """A time limit -> minutes (rounded up); None for UNLIMITED. Slurm's forms (minutes, MM:SS,
    HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) and bpcp's (90s, 30m, 2h, 1d); a plain number counts in
    `plain` units ("seconds" for --timeout, GNU parallel's)."""
    value = str(text).strip().lower()
    if value in ("unlimited", "infinite"):
        return None
    m = _SUFFIX_TIME.match(value)
    if m:
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    else:
        m = _SLURM_TIME.match(value)
        if not m or (plain == "seconds" and ":" not in value and "-" not in value and not value.isdigit()):
            raise BpcpError(f"{what} {text!r}: give a time limit such as 2h, 90m, 1-00:00:00 (days-hours:minutes:seconds) "
                            "or a number of minutes")
        days, a, b, c = (int(g) if g else None for g in m.groups())
        assert a is not None
        if days is None and b is None:
            seconds = a * (1 if plain == "seconds" else 60)
        elif days is None and c is None:
            seconds = a * 60 + (b or 0)                                   # MM:SS
        elif days is None:
            seconds = a * 3600 + (b or 0) * 60 + (c or 0)                 # HH:MM:SS
        else:
            seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)  # D-HH[:MM[:SS]]
    minutes = math.ceil(seconds / 60)
    if minutes < 1:
        raise BpcpError(f"{what} {text!r}: give at least a minute")
    return minutes


def format_time(minutes: int | None) -> str:
    """Minutes -> Slurm's D-HH:MM:SS (or HH:MM:SS); None -> UNLIMITED."""
    if minutes is None:
        return "UNLIMITED"
    days, rest = divmod(minutes, 1440)
    clock = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{clock}" if days else clock


def check_sbatch_args(args: Sequence[str]) -> tuple[str, ...]:
    """--sbatch-arg values, each split like a shell would ('--constraint skylake' is two arguments)."""
    out: list[str] = []
    for value in args:
        try:
            parts = shlex.split(value)
        except ValueError as exc:
            raise BpcpError(f"--sbatch-arg {value!r}: {exc}; quote it as you would in a shell") from None
        for part in parts:
            name = part.split("=", 1)[0] if part.startswith("--") else part[:2]
            if name in OWN_OPTIONS:
                raise BpcpError(f"--sbatch-arg {value!r}: bpcp sets {name} itself ({OWN_OPTIONS[name]})")
        out += parts
    return tuple(out)


def throttle_of(jobs: str | None) -> int | None:
    if jobs is None:
        return None
    if not str(jobs).isdigit() or int(jobs) < 1:
        raise BpcpError(f"--jobs {jobs!r}: with --engine slurm give the number of tasks that may run at once "
                        "(the array's %K), e.g. --jobs 200")
    return int(jobs)


# ----------------------------------------------------------------------------- Slurm's answers (pure)
def parse_config(text: str) -> dict[str, str]:
    """`scontrol show config`: 'Name = value' lines -> {Name: value}."""
    config = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() and " " not in name.strip():
            config[name.strip()] = value.strip()
    return config


def parse_partitions(text: str) -> dict[str, dict[str, str]]:
    """`scontrol show partition -o`: one line per partition of Key=Value words."""
    parts = {}
    for line in text.splitlines():
        fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
        if "PartitionName" in fields:
            parts[fields["PartitionName"]] = fields
    return parts


@dataclass(frozen=True)
class TaskState:
    state: str          # squeue's %T: PENDING, RUNNING, COMPLETED, ...
    node: str = ""
    reason: str = ""


SQUEUE_FORMAT = "%F|%K|%T|%N|%r"


def parse_squeue(text: str) -> dict[tuple[str, int], TaskState]:
    """`squeue -h -r -t all -o '%F|%K|%T|%N|%r'` -> {(array job id, task index): state}."""
    tasks = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 5 or not parts[1].isdigit():
            continue
        tasks[(parts[0], int(parts[1]))] = TaskState(parts[2], parts[3], parts[4])
    return tasks


def split_arrays(jobs: Sequence[str], max_array_size: int, throttle: int) -> list[tuple[list[str], int]]:
    """The jobs as arrays of at most MaxArraySize tasks (indices 0..MaxArraySize-1), each with its
    share of the throttle (at least 1) so that all of them together run about `throttle` at once."""
    size = max(1, max_array_size)
    chunks = [list(jobs[i:i + size]) for i in range(0, len(jobs), size)]
    total = len(jobs)
    shares = [max(1, throttle * len(c) // total) for c in chunks]
    left = throttle - sum(shares)
    i = 0
    while left > 0 and any(s < len(c) for s, c in zip(shares, chunks)):
        if shares[i] < len(chunks[i]):
            shares[i] += 1
            left -= 1
        i = (i + 1) % len(chunks)
    return [(c, min(s, len(c))) for c, s in zip(chunks, shares)]


def rebalance(arrays: dict[str, tuple[int, int, int]], throttle: int) -> dict[str, int]:
    """New %K throttles for the open arrays (id -> (running, pending, throttle now), oldest first)
    so that all of them together run about `throttle` tasks: each keeps its running tasks, the free
    slots go to the arrays with pending tasks, oldest first. Only the changes; never 0 (= no limit)."""
    free = throttle - sum(running for running, _, _ in arrays.values())
    changes = {}
    for array, (running, pending, now) in arrays.items():
        if not pending:
            continue
        extra = max(0, min(pending, free))
        free -= extra
        want = max(1, running + extra)
        if want != now:
            changes[array] = want
    return changes


@dataclass(frozen=True)
class Request:
    """What every task of a run asks Slurm for."""
    mem_mb: int
    time_min: int | None
    options: Options
    job_name: str

    def placement(self) -> list[str]:
        """Where the tasks go: partition, account, QOS, and the user's own sbatch arguments."""
        o = self.options
        return [f"--{k}={v}" for k, v in (("partition", o.partition), ("account", o.account), ("qos", o.qos)) if v]

    def common(self) -> list[str]:
        argv = [f"--job-name={self.job_name}", "--cpus-per-task=1", "--ntasks=1", f"--mem={self.mem_mb}M"]
        if self.time_min is not None:
            argv.append(f"--time={format_time(self.time_min)}")
        return argv + self.placement()


def sbatch_argv(request: Request, run_dir: Path, script: Path, tasks: int, throttle: int) -> list[str]:
    """The sbatch command of one array: its tasks run the job runner in the run folder; every task
    writes to slurm/out/<array>_<task>.out (appended when Slurm requeues it); requeue after a node
    failure is asked for explicitly (the runner makes it safe)."""
    return (["sbatch", "--parsable", f"--array=0-{tasks - 1}%{throttle}"] + request.common()
            + ["--requeue", "--open-mode=append", f"--chdir={run_dir}", f"--output={run_dir}/slurm/out/%A_%a.out"]
            + list(request.options.sbatch_args) + [str(script)])


TASK_MARK = re.compile(r"^bpcp: task (\S+): job (\S+) on (\S+)", re.MULTILINE)


def task_script(run_dir: Path, index: Path, command: str) -> str:
    """The batch script of an array: task i runs the job on line i+1 of the index file."""
    q = shlex.quote
    return f"""#!/bin/bash
# bpcp {__version__}: one task of this Slurm array = one job of the plan, run by the job runner.
# Submitted as: {command}
# Task i runs the job on line i+1 of {index}. Running it again is safe: the runner publishes a job
# once (its lock and one rename) and skips a job that is already published.
job="$(sed -n "$((SLURM_ARRAY_TASK_ID+1))p" {q(str(index))})"
if [ -z "$job" ]; then
  echo "bpcp: no job on line $((SLURM_ARRAY_TASK_ID+1)) of {index}" >&2
  exit 2
fi
echo "bpcp: task ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}: job $job on $(hostname) (restarts: ${{SLURM_RESTART_COUNT:-0}})"
command -v python3 >/dev/null || {{ echo "bpcp: no python3 on $(hostname): the job runner needs Python 3.9 or newer" >&2; exit 2; }}
exec python3 -S {q(str(run_dir / runner.RUNNER))} run --run-dir {q(str(run_dir))} "$job"
"""


def last_attempt(text: str) -> str:
    """The output of a task's last attempt (a requeued task appends to the same file)."""
    marks = list(TASK_MARK.finditer(text))
    return text[marks[-1].start():] if marks else text


@dataclass(frozen=True)
class Cause:
    kind: str           # memory, time, cancelled, node, preempted, runner, unknown
    reason: str         # the line for failed/<job>/reason.txt
    retry: bool         # worth submitting again with the same request


_OVER_MEMORY = re.compile(r"exceeded memory limit \((\d+) > (\d+)\)")
_OOM = re.compile(r"oom[-_ ]kill|Exceeded job memory limit|out of memory", re.IGNORECASE)


def _runner_line(text: str, job: str) -> str | None:
    found = re.findall(rf"^bpcp: {re.escape(job)}: FAILED on \S+: (.*)$", text, re.MULTILINE)
    return found[-1].strip() if found else None


def published_by(text: str, job: str) -> bool:
    """The runner's own word that it published the job (now or before), in a task's output."""
    return re.search(rf"^bpcp: {re.escape(job)}: (published \(|already published)", text, re.MULTILINE) is not None


def cause(text: str, state: str | None, job: str, request: Request, task: str, output: Path) -> Cause:
    """Why a task ended without publishing its job, Slurm's own kill first: its output (the
    last attempt's) says 'exceeded memory limit ... being killed' or 'DUE TO TIME LIMIT', squeue's
    state OUT_OF_MEMORY, TIMEOUT, CANCELLED, NODE_FAIL, PREEMPTED; then the runner's reason."""
    mem = f"{request.mem_mb}M"
    m = _OVER_MEMORY.search(text)
    if m or state == "OUT_OF_MEMORY" or _OOM.search(text):
        used = f" ({int(m.group(1)) / 2**20:.0f} MiB used, the limit is {int(m.group(2)) / 2**20:.0f} MiB)" if m else ""
        return Cause("memory", f"killed by Slurm for memory: the task went above --mem {mem}{used}; run again with a "
                               f"larger --mem (bpcp profile measures a job's peak); Slurm task {task}, output {output}",
                     False)
    if "DUE TO TIME LIMIT" in text or state in ("TIMEOUT", "DEADLINE"):
        return Cause("time", f"killed by Slurm at its time limit (--time {format_time(request.time_min)}); run again "
                             f"with a longer --time (bpcp profile forecasts a job's time); Slurm task {task}, output {output}",
                     False)
    if "DUE TO NODE FAILURE" in text or state in ("NODE_FAIL", "BOOT_FAIL"):
        return Cause("node", f"its node failed (Slurm task {task}, state {state or 'NODE_FAIL'}); output {output}", True)
    if "DUE TO PREEMPTION" in text or state == "PREEMPTED":
        return Cause("preempted", f"preempted by Slurm (Slurm task {task}); output {output}", True)
    if "CANCELLED AT" in text or state == "CANCELLED":
        started = "after it started" if TASK_MARK.search(text) else "before it started"
        return Cause("cancelled", f"cancelled in Slurm {started} (scancel, or an administrator; Slurm task {task}); "
                                  "run the same bpcp command again to run it", False)
    said = _runner_line(text, job)
    if said is not None:
        return Cause("runner", said, True)
    return Cause("unknown", f"the Slurm task {task} ended ({state or 'gone from squeue'}) without publishing the job "
                            f"or saying why; see {output}", True)


# What the check task runs on a compute node (any python3: no f-strings beyond 3.6).
CHECK_SCRIPT = r'''
import json, os, socket, subprocess, sys
folder, config_path = sys.argv[1], sys.argv[2]
result = {"host": socket.gethostname(), "python": list(sys.version_info[:3])}
with open(config_path) as fd:
    config = json.load(fd)
result["runner"] = os.access(os.path.join(os.path.dirname(config_path), "bpcp_runner.py"), os.R_OK)
result["cellprofiler"] = os.access(config["cellprofiler"]["executable"], os.X_OK)
with open(os.path.join(folder, "paths.txt"), encoding="utf-8") as fd:
    paths = [p for p in fd.read().split("\0") if p]
''' + MISSING_IMAGES + r'''def runs(argv):
    try:
        return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
want = sys.argv[3:]
if "s3" in want:
    py = config.get("s3_python", "")
    result["s3_python"] = runs([py, "-c", "import botocore"]) or runs([py, "-c", "import awscli.botocore"])
tmp = os.path.join(folder, ".result.json")
with open(tmp, "w") as fd:
    json.dump(result, fd)
os.rename(tmp, os.path.join(folder, "result.json"))
'''


def check_problems(result: dict, run_dir: Path, config: dict, python_min: tuple[int, int] = (3, 9)) -> list[str]:
    """The check task's findings as one line each ([] when the nodes can run the jobs)."""
    host = result.get("host", "the compute node")
    problems = []
    if tuple(result.get("python", (0, 0)))[:2] < python_min:
        problems.append(f"{host}: python3 is {'.'.join(map(str, result.get('python', [])))}; the job runner needs 3.9 or newer "
                        "on the compute nodes")
    if not result.get("runner"):
        problems.append(f"{host}: cannot read {run_dir / runner.RUNNER}; the nodes must see the run folder at the same path")
    if not result.get("cellprofiler"):
        problems.append(f"{host}: no CellProfiler at {config['cellprofiler']['executable']}; install it on a path the "
                        "compute nodes share (the same path as here), or pass --cellprofiler with one they have")
    if result.get("missing_count"):
        n, first = result["missing_count"], result["missing"][0]
        more = f" (and {n - 1} more of the {result.get('images')} images)" if n > 1 else ""
        problems.append(f"{host}: does not see {first}{more}; the images must be on a filesystem the compute nodes "
                        "share, at the same paths as here")
    if result.get("s3_python") is False:
        problems.append(f"{host}: no Python with botocore at {config.get('s3_python')} to download the S3 images; "
                        "pass --s3-python with one the compute nodes have")
    return problems


# ----------------------------------------------------------------------------- the commands
class Slurm:
    """Slurm's commands, each with a deadline; a failure is one line (BpcpError)."""

    def __init__(self, env: dict | None = None):
        self.env = env

    def run(self, argv: list[str], timeout: float = COMMAND_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise BpcpError(f"--engine slurm: no {argv[0]} on this machine's PATH; run bpcp on the cluster's login node "
                            "(or install Slurm's client commands: apt-get install slurm-client)") from None
        except subprocess.TimeoutExpired:
            raise BpcpError(f"--engine slurm: `{' '.join(argv[:3])} ...` did not answer within {timeout:.0f} s; "
                            "check that slurmctld runs (sinfo)") from None
        if check and proc.returncode != 0:
            raise BpcpError(f"--engine slurm: `{shlex.join(argv[:4])}` failed: {error_text(proc)}")
        return proc

    def config(self) -> dict[str, str]:
        if shutil.which("sbatch", path=(self.env or os.environ).get("PATH")) is None:
            raise BpcpError("--engine slurm: no sbatch on this machine's PATH; run bpcp on the cluster's login node "
                            "(or install Slurm's client commands: apt-get install slurm-client)")
        proc = self.run(["scontrol", "show", "config"], check=False)
        if proc.returncode != 0:
            raise BpcpError(f"--engine slurm: Slurm does not answer (scontrol show config: {error_text(proc)}); "
                            "check that slurmctld runs (sinfo) and that this machine is a login node of the cluster")
        return parse_config(proc.stdout)

    def partitions(self) -> dict[str, dict[str, str]]:
        return parse_partitions(self.run(["scontrol", "show", "partition", "-o"]).stdout)

    def node_memory(self, partition: str) -> tuple[int, int]:
        """(largest RealMemory in MiB, most CPUs) of the partition's nodes."""
        out = self.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%c|%m"]).stdout
        mems, cpus = [0], [0]
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) == 3:
                cpus.append(int(re.sub(r"\D", "", parts[1]) or 0))
                mems.append(int(re.sub(r"\D.*", "", parts[2]) or 0))
        return max(mems), max(cpus)

    def squeue(self, jobs: Iterable[str]) -> dict[tuple[str, int], TaskState] | None:
        """The tasks of these arrays that Slurm still knows (None when squeue fails)."""
        ids = sorted(set(jobs), key=lambda j: (len(j), j))
        if not ids:
            return {}
        try:
            proc = self.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-o", SQUEUE_FORMAT], check=False)
        except BpcpError:
            return None
        if proc.returncode != 0:
            return {} if "Invalid job id" in proc.stderr else None
        return parse_squeue(proc.stdout)

    def job_state(self, job: str) -> TaskState | None:
        """A plain job's state; None when Slurm no longer knows it."""
        proc = self.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T|%N|%r"], check=False)
        line = proc.stdout.strip().splitlines()[:1] if proc.returncode == 0 else []
        if not line:
            return None
        state, node, reason = (line[0].split("|") + ["", ""])[:3]
        return TaskState(state, node, reason)

    def sbatch(self, argv: list[str]) -> str:
        proc = self.run(argv, check=False)
        if proc.returncode != 0:
            raise BpcpError(f"sbatch refused the request: {error_text(proc)} (`{shlex.join(argv)}`)")
        job = proc.stdout.strip().split(";")[0]
        if not job.isdigit():
            raise BpcpError(f"sbatch answered {proc.stdout.strip()[:100]!r}, not a job id (`{shlex.join(argv)}`); check "
                            "squeue for what it submitted")
        return job

    def scancel(self, jobs: Iterable[str]) -> None:
        ids = sorted(set(jobs))
        if ids:
            self.run(["scancel", *ids], check=False)


def error_text(proc: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
    useful = [line for line in lines if "error" in line.lower() or "failure" in line.lower()] or lines
    text = useful[-1] if useful else f"exit {proc.returncode}"
    return re.sub(r"^(sbatch|squeue|scontrol|sinfo|sacctmgr): (error: )?", "", text)[:300]


# ----------------------------------------------------------------------------- the run folder's record
@dataclass
class Submission:
    n: int
    array: str
    index: str               # slurm/jobs-<n>.txt, relative to the run folder
    jobs: list[str]
    submitted: float
    mem_mb: int
    time_min: int | None


@dataclass
class State:
    """slurm/state.json: the options the run was submitted with and every array submitted."""
    options: dict = field(default_factory=dict)
    submissions: list[Submission] = field(default_factory=list)

    @classmethod
    def load(cls, root: Path) -> State | None:
        path = root / STATE
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            return cls(doc.get("options", {}), [Submission(**s) for s in doc.get("submissions", [])])
        except (OSError, ValueError, TypeError) as exc:
            raise BpcpError(f"{path}: unreadable ({exc}); check squeue for this run's jobs, then remove the file "
                            "(bpcp then submits every unpublished job again)") from None

    def save(self, root: Path) -> None:
        (root / STATE).parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": 1, "bpcp_version": __version__, "options": self.options,
               "submissions": [asdict(s) for s in self.submissions]}
        write_atomic(root / STATE, json.dumps(doc, indent=1) + "\n")

    def next_n(self) -> int:
        return max((s.n for s in self.submissions), default=0) + 1


# ----------------------------------------------------------------------------- the engine
@dataclass
class Task:
    submission: Submission
    index: int

    @property
    def job(self) -> str:
        return self.submission.jobs[self.index]

    @property
    def name(self) -> str:
        return f"{self.submission.array}_{self.index}"

    def output(self, root: Path) -> Path:
        return root / "slurm" / "out" / f"{self.name}.out"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _names(folder: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")}
    except OSError:
        return set()


class SlurmEngine:
    """Runs a rendered plan through Slurm job arrays; `execute` is the engine's one entry point."""

    def __init__(self, options: Options, retries: int, detach: bool, wait_limit: float, check_wait: float,
                 config: dict[str, str], slurm: Slurm | None = None, say: Callable[[str], None] | None = None,
                 partition: str = ""):
        self.options, self.retries, self.detached = options, retries, detach
        self.wait_limit, self.check_wait = wait_limit, check_wait
        self.config, self.partition = config, partition
        self.slurm = slurm or Slurm()
        self.say = say or (lambda line: print(line, flush=True))
        self.max_array = int(re.sub(r"\D.*", "", config.get("MaxArraySize", "1001")) or 1001)
        self.throttle = options.throttle or 1
        self.arrays: set[str] = set()        # every array this session waits for: Ctrl-C cancels them
        self.checked: tuple[Path, int] | None = None   # what the check task saw this session
        self.throttles: dict[str, int] = {}  # %K of the arrays this session submitted (rebalanced as they drain)

    # -- the request: --mem and --time from the options, profile.json, or defaults
    def request(self, run: RunFolder, plan: Plan) -> Request:
        from bpcp.sizing.profile import PROFILE_FILE, load_profile
        from bpcp.sizing.slots import MEM_MARGIN, job_rss, job_timeout, largest_job

        o = self.options
        mem = parse_mem(o.mem) if o.mem else None
        time_min = parse_time(o.time) if o.time else None      # None: UNLIMITED when given
        if (mem is None or not o.time) and (run.root / PROFILE_FILE).exists():
            profile = load_profile(run.root / PROFILE_FILE, plan)
            d, biggest = profile["derived"], largest_job(plan)
            if mem is None:
                rss = job_rss(d, biggest)
                mem = math.ceil(rss * MEM_MARGIN / 2**20)
                self.say(f"bpcp: from profile.json: --mem {mem}M (peak RSS {rss / 2**20:.0f} MiB x {MEM_MARGIN} for the "
                         f"largest job, {biggest} image sets)")
            if not o.time:
                limit = job_timeout(d["startup_seconds"], d["seconds_per_image_set"], biggest)
                time_min = parse_time(limit, plain="seconds")
                self.say(f"bpcp: from profile.json: --time {format_time(time_min)} (the largest job's forecast x 3, "
                         "at least 2 minutes)")
        if mem is None:
            mem = parse_mem(DEFAULT_MEM)
            self.say(f"bpcp: --mem {DEFAULT_MEM} per task (the default; `bpcp profile` measures what a job needs, "
                     "or pass --mem)")
        if time_min is None and not o.time:
            time_min = parse_time(DEFAULT_TIME)
            self.say(f"bpcp: --time {DEFAULT_TIME} per task (the default; `bpcp profile` forecasts it, or pass --time)")
        return Request(mem, time_min, o, f"bpcp-{run.root.name}"[:64])

    def check_request(self, run: RunFolder, request: Request) -> None:
        """`sbatch --test-only` with the exact request: Slurm's own word before anything is submitted."""
        argv = ["sbatch", "--test-only", "--array=0-1%1", *request.common(), f"--chdir={run.root}",
                *request.options.sbatch_args, "--wrap=true"]
        proc = self.slurm.run(argv, check=False)
        if proc.returncode != 0:
            raise BpcpError(refusal(error_text(proc), request, self.slurm, self.partition))

    # -- the check task: the nodes see the run folder, python3, CellProfiler, every image
    def check_nodes(self, run: RunFolder, plan: Plan, request: Request) -> None:
        if self.check_wait <= 0:
            self.say("bpcp: --node-check-wait 0: not checking what the compute nodes see")
            return
        if self.checked == (run.root, plan.image_sets):
            return                                # the same images, checked earlier in this command
        folder = run.root / "slurm" / f"check-{secrets.token_hex(4)}"
        folder.mkdir(parents=True)
        paths = image_paths(run.root, plan)
        write_atomic(folder / "paths.txt", "\0".join(paths))
        write_atomic(folder / "check.py", CHECK_SCRIPT)
        config = json.loads((run.root / runner.CONFIG).read_text())
        want = ["s3"] if any(j.fetch for j in plan.jobs) else []
        q = shlex.quote
        write_atomic(folder / "check.sh", "#!/bin/bash\n"
                     f"command -v python3 >/dev/null || {{ echo '{{\"host\": \"'$(hostname)'\", \"python\": [0, 0]}}' "
                     f">{q(str(folder / 'result.json'))}; exit 0; }}\n"
                     f"exec python3 {q(str(folder / 'check.py'))} {q(str(folder))} {q(str(run.root / runner.CONFIG))} "
                     f"{' '.join(want)}\n")
        argv = ["sbatch", "--parsable", f"--job-name=bpcp-check-{run.root.name}"[:80], "--cpus-per-task=1", "--ntasks=1",
                "--mem=256M", "--time=00:10:00", f"--chdir={folder}", f"--output={folder}/check.out",
                *request.placement(), *request.options.sbatch_args,
                str(folder / "check.sh")]
        job = self.slurm.sbatch(argv)
        self.say(f"bpcp: checking what the compute nodes see (Slurm job {job}, at most {self.check_wait:.0f} s)")
        deadline = time.monotonic() + self.check_wait
        ended_at: float | None = None
        state: TaskState | None = None
        try:
            while not (folder / "result.json").exists():
                now = time.monotonic()
                if ended_at is None:
                    state = self.slurm.job_state(job)
                    if state is None or state.state in FINAL:
                        ended_at = now
                if ended_at is not None and (now - ended_at > CHECK_GRACE or (state and state.state != "COMPLETED")):
                    how = f"{state.state} on {state.node}" if state else "gone from squeue"
                    raise BpcpError(f"the check task (Slurm job {job}, {how}) wrote no {folder / 'result.json'}: the "
                                    f"compute nodes do not see {run.root} at this path (or cannot write to it); put the run "
                                    "folder (--output) on a filesystem the login node and the compute nodes share")
                if now > deadline:
                    self.slurm.scancel([job])
                    waiting = f" ({state.state}, {state.reason})" if state else ""
                    raise BpcpError(f"the check task (Slurm job {job}) did not finish within {self.check_wait:.0f} s"
                                    f"{waiting}; the partition may be busy: pass a longer --node-check-wait, or "
                                    "--node-check-wait 0 to submit without checking")
                time.sleep(1)
        except KeyboardInterrupt:
            self.slurm.scancel([job])
            raise
        try:
            result = json.loads((folder / "result.json").read_text())
        except ValueError as exc:
            raise BpcpError(f"{folder / 'result.json'}: the check task's answer is not JSON ({exc}); see "
                            f"{folder / 'check.out'}") from None
        problems = check_problems(result, run.root, config)
        if problems:
            raise BpcpError(problems)
        shutil.rmtree(folder, ignore_errors=True)
        self.checked = (run.root, plan.image_sets)
        images = f" and all {result['images']} images" if result.get("images") else ""
        self.say(f"bpcp: {result['host']} sees the run folder, python3 {'.'.join(map(str, result['python']))}, "
                 f"CellProfiler{images}")

    # -- submitting
    def submit(self, run: RunFolder, state: State, jobs: list[str], request: Request,
               throttle_of_each: int | None = None) -> list[Task]:
        """Arrays of these jobs; throttle_of_each (e.g. 1 for retries while other arrays run, raised
        by `rebalance` as slots free up) instead of each array's share of --jobs."""
        (run.root / "slurm" / "out").mkdir(parents=True, exist_ok=True)
        tasks: list[Task] = []
        for chunk, throttle in split_arrays(jobs, self.max_array, self.throttle):
            throttle = throttle_of_each or throttle
            n = state.next_n()
            index = run.root / "slurm" / f"jobs-{n}.txt"
            script = run.root / "slurm" / f"jobs-{n}.sh"
            write_atomic(index, "".join(j + "\n" for j in chunk))
            argv = sbatch_argv(request, run.root, script, len(chunk), throttle)
            write_atomic(script, task_script(run.root, index, shlex.join(argv)))
            script.chmod(0o755)
            array = self.slurm.sbatch(argv)
            sub = Submission(n, array, str(index.relative_to(run.root)), chunk, time.time(), request.mem_mb,
                             request.time_min)
            state.submissions.append(sub)
            self.arrays.add(array)
            self.throttles[array] = throttle
            state.save(run.root)
            tasks += [Task(sub, i) for i in range(len(chunk))]
            self.say(f"bpcp: submitted {len(chunk)} jobs as Slurm array {array} (at most {throttle} at once; "
                     f"{index.relative_to(run.root)}, outputs in slurm/out/{array}_<task>.out)")
        return tasks

    # -- the whole run
    def execute(self, run: RunFolder, live: bool | None = None) -> int:
        """Submit what is neither published nor queued, wait for it all (unless detached); the number
        of jobs not published at the end."""
        from bpcp.jobs import progress

        plan = planfile.read(run)
        jobs = [j.id for j in plan.jobs]
        state = State.load(run.root) or State()
        config = runner.load_config(str(run.root / runner.CONFIG))
        runner.reclaim(config, str(run.root))
        published = _names(run.published()) & set(jobs)
        open_tasks = self.adopt(run, state, set(jobs) - published)
        self.arrays |= {t.submission.array for t in open_tasks}
        queued = {t.job for t in open_tasks}
        todo = [j for j in jobs if j not in published and j not in queued]
        self.say(f"bpcp: {len(published)} of {len(jobs)} jobs already published, {len(queued)} queued or running in "
                 f"Slurm, {len(todo)} to submit")
        state.options = self.options.given()
        request = self.request(run, plan) if todo else None
        if request is not None:
            self.check_request(run, request)
            self.check_nodes(run, plan, request)
        if live is None:
            live = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"
        watcher = None
        try:
            if request is not None:
                open_tasks += self.submit(run, state, todo, request)
            else:
                state.save(run.root)
            if self.detached:
                if open_tasks:
                    arrays = ", ".join(sorted({t.submission.array for t in open_tasks}))
                    self.say(f"bpcp: --detach: Slurm runs the jobs without bpcp (arrays {arrays}); `bpcp status -o "
                             f"{run.root}` says how far they are, the same `bpcp run` waits for them and merges")
                return 0
            if not open_tasks:
                return len(set(jobs) - _names(run.published()))
            watcher = progress.Watcher(run.root, self.throttle, live)
            watcher.start(None, None)
            self.say = watcher.display.say       # lines go above the live progress line
            return self.wait(run, state, open_tasks, request)
        except KeyboardInterrupt:
            mine = sorted(self.arrays, key=lambda a: (len(a), a))
            self.slurm.scancel(mine)
            if mine:
                print(f"bpcp: cancelled Slurm arrays {', '.join(mine)}", file=sys.stderr, flush=True)
            raise
        finally:
            if watcher is not None:
                watcher.stop()

    def adopt(self, run: RunFolder, state: State, wanted: set[str]) -> list[Task]:
        """Tasks of earlier submissions that Slurm still has pending or running, for unpublished jobs."""
        subs = [s for s in state.submissions if wanted & set(s.jobs)]
        if not subs:
            return []
        known = self.slurm.squeue(s.array for s in subs)
        if known is None:
            raise BpcpError("--engine slurm: squeue does not answer, so bpcp cannot tell which of this run's jobs are "
                            "still queued; run the same command again once `squeue` works")
        return [Task(s, i) for s in subs for i, job in enumerate(s.jobs)
                if job in wanted and (s.array, i) in known and known[(s.array, i)].state not in FINAL]

    def wait(self, run: RunFolder, state: State, open_tasks: list[Task], request: Request | None) -> int:
        """Until every task ended: record Slurm's causes, resubmit failed tasks up to --retries."""
        jobs = {j.id for j in planfile.read(run).jobs}
        attempts: dict[str, int] = {}
        for t in open_tasks:
            attempts[t.job] = attempts.get(t.job, 0) + 1
        deadline = time.monotonic() + self.wait_limit
        silent_since: float | None = None
        cancelled: list[str] = []
        last_queue, last_queue_at = "", -QUEUE_LINE_EVERY
        while open_tasks:
            known = self.slurm.squeue(t.submission.array for t in open_tasks)
            now = time.monotonic()
            if known is None:
                silent_since = silent_since or now
                if now - silent_since > SILENCE:
                    raise BpcpError(f"squeue has not answered for {SILENCE:.0f} s; the jobs keep running in Slurm: run the "
                                    "same command again to wait for them (or `bpcp status` to see how far they are)")
                time.sleep(POLL)
                continue
            silent_since = None
            ended = [t for t in open_tasks if (t.submission.array, t.index) not in known
                     or known[(t.submission.array, t.index)].state in FINAL]
            gone = {(t.submission.array, t.index) for t in ended}
            open_tasks = [t for t in open_tasks if (t.submission.array, t.index) not in gone]
            still = {t.job for t in open_tasks}
            retry: list[str] = []
            for t in ended:
                row = known.get((t.submission.array, t.index))
                outcome = self.settle(run, t, row.state if row else None, request, still, jobs)
                if outcome is None:
                    continue
                if outcome.kind == "cancelled":
                    cancelled.append(t.job)
                again = outcome.retry and attempts.get(t.job, 0) < self.retries and t.job not in still
                where = f" on {row.node}" if row and row.node else ""
                self.say(f"bpcp: {t.job}: FAILED (Slurm task {t.name}{where}): {outcome.reason}"
                    + (f"; submitting it again (attempt {attempts.get(t.job, 0) + 1} of {self.retries})" if again else ""))
                if again and t.job not in retry:
                    retry.append(t.job)
            if retry:
                req = request or self.request(run, planfile.read(run))
                for job in retry:
                    attempts[job] = attempts.get(job, 0) + 1
                open_tasks += self.submit(run, state, retry, req, throttle_of_each=1 if open_tasks else None)
            self.rebalance(open_tasks, known)
            counts: dict[str, int] = {}
            done = _names(run.published())
            for t in open_tasks:
                row = known.get((t.submission.array, t.index))
                if row is not None and t.job not in done:
                    counts[row.state.lower()] = counts.get(row.state.lower(), 0) + 1
            line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            if line and line != last_queue and now - last_queue_at >= QUEUE_LINE_EVERY:
                self.say(f"bpcp: Slurm: {line}")
                last_queue, last_queue_at = line, now
            if not open_tasks:
                break
            if now > deadline:
                raise BpcpError(f"waited {self.wait_limit / 3600:.1f} h (--slurm-wait) for Slurm; the jobs keep running "
                                "there: run the same command again to wait for them")
            time.sleep(POLL)
        if cancelled:
            left = len(jobs - _names(run.published()))
            raise BpcpError(f"{len(cancelled)} jobs were cancelled in Slurm (scancel) while bpcp waited "
                            f"({', '.join(cancelled[:3])}{' ...' if len(cancelled) > 3 else ''}); {left} jobs are not "
                            "done: run the same command again to run them (what is published is kept)")
        return len(jobs - _names(run.published()))

    def rebalance(self, open_tasks: list[Task], known: dict[tuple[str, int], TaskState]) -> None:
        """Keep about --jobs tasks running while several arrays drain (scontrol update ArrayTaskThrottle);
        a refusal only leaves the throttles as they were."""
        arrays: dict[str, tuple[int, int, int]] = {}
        for t in sorted(open_tasks, key=lambda t: t.submission.n):
            array = t.submission.array
            row = known.get((array, t.index))
            running, pending, now = arrays.get(array, (0, 0, self.throttles.get(array, 0)))
            pending_now = row is None or row.state == "PENDING"
            # an array of an earlier session keeps its own throttle: its running tasks only take slots
            arrays[array] = (running + (not pending_now), pending + (pending_now and array in self.throttles), now)
        if len(arrays) < 2 and not any(p and k < self.throttle for _, p, k in arrays.values()):
            return
        for array, throttle in rebalance(arrays, self.throttle).items():
            try:
                proc = self.slurm.run(["scontrol", "update", f"JobId={array}", f"ArrayTaskThrottle={throttle}"],
                                      check=False)
            except BpcpError:
                return                            # slurmctld busy: the next poll tries again
            if proc.returncode == 0:
                self.throttles[array] = throttle

    def settle(self, run: RunFolder, task: Task, state: str | None, request: Request | None, still: set[str],
               jobs: set[str]) -> Cause | None:
        """A task that ended: None when its job is published (or not this plan's any more); else
        why not, with Slurm's kill written into failed/<job>/reason.txt (it wins over the runner's)."""
        job = task.job
        text = last_attempt(_read(task.output(run.root)))
        if job not in jobs or (run.published(job)).is_dir() or published_by(text, job):
            return None
        req = request or Request(task.submission.mem_mb, task.submission.time_min, self.options, "")
        found = cause(text, state, job, req, task.name, task.output(run.root))
        if job not in still and found.kind != "runner":       # the runner's own reason is already there
            record(run, job, found.reason)
        return found


def record(run: RunFolder, job: str, reason: str) -> None:
    """failed/<job>/reason.txt (and the attempt's log), unless an attempt holds the job's lock."""
    work = run.work(job)
    work.mkdir(parents=True, exist_ok=True)
    fd = runner.open_lock(str(work / "lock"))
    try:
        if runner.try_lock(fd) and not run.published(job).is_dir():
            log = work / runner.LOG
            runner.record_failure(str(run.root), job, reason, str(log) if log.is_file() else None)
    finally:
        os.close(fd)


def refusal(message: str, request: Request, slurm: Slurm, partition: str = "") -> str:
    """sbatch's refusal of the request as one line naming the option to change."""
    o = request.options
    partition = o.partition or partition
    part = f"partition {partition}" if partition else "the default partition"
    if "Invalid partition" in message:
        return f"--partition {o.partition}: Slurm has no such partition ({message})"
    if "node configuration is not available" in message:
        try:
            mem, cpus = slurm.node_memory(partition) if partition else (0, 0)
        except BpcpError:
            mem = cpus = 0
        largest = f" (its largest node: {mem} MiB, {cpus} CPUs)" if mem else ""
        return (f"--mem {request.mem_mb}M: no node of {part} offers that much memory{largest}; pass a smaller --mem "
                "or another --partition")
    if "time limit" in message.lower():
        return f"--time {format_time(request.time_min)}: above what {part} allows ({message}); pass a shorter --time"
    if "account" in message.lower():
        return f"--account {o.account}: Slurm refuses it ({message}); `sacctmgr show assoc user=$USER` lists yours"
    if "qos" in message.lower():
        return f"--qos {o.qos}: Slurm refuses it ({message}); `sacctmgr show qos` lists them"
    return f"--engine slurm: Slurm refuses the request ({message}); check --partition, --account, --qos and --sbatch-arg"


def check_cluster(options: Options, config: dict[str, str], slurm: Slurm) -> tuple[str, int]:
    """The partition (given or the default), account and QOS exist; (partition, its CPUs). One line
    per problem, before anything is planned or submitted."""
    partitions = slurm.partitions()
    names = ", ".join(f"{n}{'*' if p.get('Default') == 'YES' else ''}" for n, p in partitions.items()) or "none"
    if options.partition:
        if options.partition not in partitions:
            raise BpcpError(f"--partition {options.partition}: no such Slurm partition here (partitions: {names}; "
                            "* is the default)")
        name = options.partition
    else:
        defaults = [n for n, p in partitions.items() if p.get("Default") == "YES"]
        if not defaults:
            raise BpcpError(f"--engine slurm: this cluster has no default partition; pass --partition (partitions: {names})")
        name = defaults[0]
    part = partitions[name]
    problems = []
    accounting = config.get("AccountingStorageType", "accounting_storage/none")
    for what, value, allowed in (("account", options.account, "AllowAccounts"), ("qos", options.qos, "AllowQos")):
        if not value:
            continue
        if accounting.endswith("/none"):
            problems.append(f"--{what} {value}: this cluster keeps no accounts or QOS (AccountingStorageType="
                            f"{accounting} in `scontrol show config`), so Slurm cannot check or charge it; leave --{what} out")
            continue
        allow = part.get(allowed, "ALL")
        if allow not in ("ALL", "") and value not in allow.split(","):
            problems.append(f"--{what} {value}: partition {name} takes only {allow} ({allowed})")
            continue
        problem = _sacctmgr_check(what, value, config, slurm)
        if problem:
            problems.append(problem)
    if problems:
        raise BpcpError(problems)
    cpus = int(re.sub(r"\D", "", part.get("TotalCPUs", "1")) or 1)
    return name, cpus


def _sacctmgr_check(what: str, value: str, config: dict[str, str], slurm: Slurm) -> str | None:
    """With slurmdbd: the account is one of this user's associations, the QOS exists. None when
    sacctmgr cannot tell (it is not required: sbatch --test-only checks again)."""
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or str(os.getuid())
    cluster = config.get("ClusterName", "")
    if what == "account":
        argv = ["sacctmgr", "-n", "-P", "show", "assoc", f"user={user}", "format=account"]
        argv += [f"cluster={cluster}"] if cluster else []
    else:
        argv = ["sacctmgr", "-n", "-P", "show", "qos", "format=name"]
    try:
        proc = slurm.run(argv, check=False)
    except BpcpError:
        return None
    if proc.returncode != 0:
        return None
    have = sorted({line.strip() for line in proc.stdout.splitlines() if line.strip()})
    if value in have:
        return None
    listed = ", ".join(have[:10]) or "none"
    if what == "account":
        return f"--account {value}: not an account of user {user} on cluster {cluster or 'this cluster'} (yours: {listed})"
    return f"--qos {value}: no such QOS on this cluster (QOS: {listed})"


# ----------------------------------------------------------------------------- bpcp run and bpcp status
SLURM_OPTIONS = ("partition", "account", "qos", "mem", "time", "sbatch_arg", "detach")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`bpcp run`'s engine options."""
    parser.add_argument("--engine", choices=("parallel", "slurm"), default=None,
                        help="parallel: GNU parallel on this host or --sshloginfile (the default); slurm: Slurm job "
                             "arrays from this login node (docs/slurm.md); a run folder submitted to Slurm stays with it")
    g = parser.add_argument_group("Slurm (--engine slurm; docs/slurm.md)")
    g.add_argument("--partition", help="partition to submit to (default: the cluster's default)")
    g.add_argument("--account", help="account to charge")
    g.add_argument("--qos", help="quality of service")
    g.add_argument("--mem", help=f"memory per task, e.g. 4G (default: peak RSS x 1.25 from profile.json, else {DEFAULT_MEM})")
    g.add_argument("--time", help=f"time limit per task: 2h, 90m, 1-00:00:00 or minutes (default: from profile.json, "
                                  f"else {DEFAULT_TIME})")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="one more sbatch argument, e.g. --sbatch-arg=--constraint=skylake (repeat for more)")
    g.add_argument("--detach", action="store_true",
                   help="submit and return; a later `bpcp run` (or `bpcp status`) collects what the tasks did")
    g.add_argument("--slurm-wait", default="48h", metavar="TIME",
                   help="stop waiting after this long; the tasks keep running (default 48h)")
    g.add_argument("--node-check-wait", type=float, default=CHECK_WAIT, metavar="SECONDS",
                   help=f"bound on the check task that looks at what the nodes see (default {CHECK_WAIT:.0f}; 0 skips it)")


def engine_for(run: RunFolder, args: argparse.Namespace) -> SlurmEngine | None:
    """The Slurm engine for `bpcp run --engine slurm` (or a run folder submitted to Slurm before),
    its options and the cluster checked; None for GNU parallel. Sets args.slots (for --bundle
    auto) to the tasks that run at once, when not given."""
    state = State.load(run.root)
    engine = args.engine
    if engine is None and state is not None and args.sshloginfile is None:
        engine = "slurm"
        print("bpcp: engine slurm, as this run folder was submitted with (--engine parallel runs it here instead)")
    if engine != "slurm":
        given = [f"--{name.replace('_', '-')}" for name in SLURM_OPTIONS if getattr(args, name, None)]
        if given:
            raise BpcpError(f"{', '.join(given)}: Slurm options; add --engine slurm (or leave them out)")
        return None
    if args.sshloginfile is not None:
        raise BpcpError("--sshloginfile and --engine slurm: Slurm picks the hosts; leave one of them out")
    if args.timeout is not None and args.time is None:
        if str(args.timeout).endswith("%"):
            raise BpcpError(f"--timeout {args.timeout}: with --engine slurm give a time limit (--time 2h), not a share "
                            "of the median job")
        args.time = f"{parse_time(args.timeout, plain='seconds', what='--timeout')}"
    wait_min = parse_time(args.slurm_wait, what="--slurm-wait")
    options = Options(partition=args.partition, account=args.account, qos=args.qos, mem=args.mem, time=args.time,
                      sbatch_args=check_sbatch_args(args.sbatch_arg), throttle=throttle_of(args.jobs))
    if options.mem:
        parse_mem(options.mem)
    if options.time:
        parse_time(options.time)
    options = options.over(state.options if state is not None else {})
    slurm = Slurm()
    config = slurm.config()
    partition, cpus = check_cluster(options, config, slurm)
    if options.throttle is None:
        options = replace(options, throttle=args.slots or cpus)
        print(f"bpcp: Slurm partition {partition}: at most {options.throttle} tasks at once "
              f"({'--slots' if args.slots else 'its CPUs'}; --jobs N sets it)")
    if args.slots is None:
        args.slots = options.throttle
    # GNU parallel's sizing of this host does not apply (jobs.sh is rendered but not run): no
    # profile.json lines about this host's cores and memory, and no refusal for its memory.
    args.jobs, args.timeout, args.memfree = str(options.throttle), "", ""
    return SlurmEngine(options, args.retries, args.detach, wait_min * 60.0 if wait_min else float("inf"),
                       args.node_check_wait, config, slurm, partition=partition)


def collect(run_dir: Path) -> None:
    """`bpcp status` on a run folder submitted to Slurm: what its tasks are doing, and why those that
    ended without publishing did (Slurm's kill written into failed/<job>/reason.txt)."""
    run = RunFolder(Path(run_dir))
    state = State.load(run.root)
    if state is None or not run.plan.exists():
        return
    jobs = {j.id for j in planfile.read(run).jobs}
    unpublished = jobs - _names(run.published())
    subs = [s for s in state.submissions if unpublished & set(s.jobs)]
    if not subs:
        return
    slurm = Slurm()
    try:
        known = slurm.squeue(s.array for s in subs)
    except BpcpError as exc:
        print(f"bpcp status: {exc.lines[0]}", file=sys.stderr)
        return
    if known is None:
        print("bpcp status: squeue does not answer: cannot say which Slurm tasks still run", file=sys.stderr)
        return
    latest: dict[str, Task] = {}
    for s in sorted(subs, key=lambda s: s.n):
        for i, job in enumerate(s.jobs):
            if job in unpublished:
                latest[job] = Task(s, i)
    counts: dict[str, int] = {}
    engine = SlurmEngine(Options().over(state.options), 1, True, 0, 0, {}, slurm, say=lambda line: None)
    live = {job for job, t in latest.items()
            if (t.submission.array, t.index) in known and known[(t.submission.array, t.index)].state not in FINAL}
    for job, t in latest.items():
        row = known.get((t.submission.array, t.index))
        if job in live and row is not None:
            counts[row.state.lower()] = counts.get(row.state.lower(), 0) + 1
        else:
            engine.settle(run, t, row.state if row else None, None, live, jobs)
    if counts:
        arrays = ", ".join(sorted({latest[j].submission.array for j in live}))
        print(f"bpcp status: Slurm: {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))} (arrays {arrays}); "
              f"`bpcp run -o {run.root}` waits for them and merges")
