"""Fan-out: how many jobs per second one controller sustains over SSH, and what it costs it.

    .venv/bin/python benchmarks/fanout.py [--hosts 1,4] [--slots 8,32,96] [--sleep 0-2]
                                          [--max-seconds 90] [--local] [--out benchmarks/results/fanout.json]

Container hosts (tests/container_hosts.py: bpcp-worker:test, configured by site.yml, sshd sized
by the bpcp_worker role for 96 slots) take a plan of one small well per job, run by `bpcp run
--sshloginfile` exactly as run.yml starts it (N/sshlogin lines sharing one SSH connection per
host, staged inputs, --return, the real job runner on every worker). The CellProfiler the runner
calls is a stand-in that behaves like one for the runner (done file, every table of the plan, one
Image row per image set) after sleeping --sleep seconds, so many slots load the controller, not
the 2 cores. Per configuration it measures, over the controller's processes only (bpcp run,
jobs.sh, GNU parallel, ssh, rsync; this process is their subreaper, so the detached shared
connections count too):

  jobs/s     completions per second between the 10th and 90th percentile of the joblog's end times
  busy       mean jobs running at once (the joblog's runtimes / that window) against the slots
  ctl s/job  controller CPU (user + system, getrusage of the reaped tree) per finished job
  RSS, fds   peak resident memory and open descriptors summed over the controller's processes,
             and GNU parallel's own descriptors
  ssh/job    SSH logins the workers' sshd accepted (their logs) per job
  wrk s/job  the workers' CPU (their containers' cpuacct) per job: on this machine the workers
             share the controller's cores, so jobs/s here is a lower bound of the controller's

It writes the table and the controller numbers benchmarks/scale.py takes (--out). Benchmark-only:
nothing in bpcp imports it. Needs Docker; run it under the repository's Docker lock
(flock /tmp/bpcp-docker.lock ...) when others use Docker on the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import os
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from local_sshd import sshd_ready, start_host  # noqa: E402

from bpcp import planfile  # noqa: E402
from bpcp.example import PlateSpec, generate_plate  # noqa: E402
from bpcp.results.joblog import read_joblog  # noqa: E402
from bpcp.runfolder import RunFolder  # noqa: E402

from container_hosts import SSHD_SLOTS, docker, docker_ready, ensure_worker_image, make_key, start_worker  # noqa: E402

BPCP = REPO / ".venv" / "bin" / "bpcp"
CELLPROFILER = "/opt/cellprofiler/5.0"          # plans the pipeline once (its probe is cached)
SSH_SHARE = "-o ControlMaster=auto -o ControlPath=~/.ssh/bpcp-%C -o ControlPersist=60"   # run.yml's
SSH_OPTIONS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
WELLS = 96                                      # per plate: rows A-H x 12 columns, one site each
PR_SET_CHILD_SUBREAPER = 36
RESULTS = HERE / "results" / "fanout.json"

FAKE = r'''#!/usr/bin/python3
"""Stands in for CellProfiler for the job runner: sleeps, then writes the done file and the plan's tables."""
import os, random, sys, time
args = sys.argv[1:]
out, done = args[args.index("-o") + 1], args[args.index("-d") + 1]
rows = sum(1 for _ in open(args[args.index("--data-file") + 1])) - 1
time.sleep(random.uniform(LOW, HIGH))
for table, name in TABLES.items():
    with open(os.path.join(out, name), "w") as fd:
        fd.write("ImageNumber" + DELIM + "Count\n")
        if table == "Image":
            fd.write("".join(f"{i}{DELIM}{i * 3}\n" for i in range(1, rows + 1)))
open(done, "w").write("Complete")
'''


@dataclass
class Result:
    hosts: int
    slots: int                  # per host
    total_slots: int
    jobs: int                   # planned
    done: int                   # finished ok in the joblog
    seconds: float              # bpcp run's wall time
    jobs_per_s: float
    busy: float                 # mean jobs running at once
    ideal_jobs_per_s: float     # total_slots / mean job time at 1 host x 8 slots
    ctl_cpu_s_per_job: float
    ctl_cpu_pct: float          # of one core, over bpcp run's wall time
    parallel_cpu_s_per_job: float
    peak_rss_mb: float
    peak_fds: int
    peak_parallel_fds: int
    peak_procs: int
    ssh_per_job: float
    worker_cpu_s_per_job: float
    loadavg: str
    stopped: bool               # --max-seconds reached before the plan was done


@dataclass
class Host:
    """A worker: a container (its own sshd, bpcp-worker:test) or, with --local, an sshd of this
    machine's own on 127.0.0.1 (tests/local_sshd.py; same filesystem, no Docker)."""

    name: str
    port: int
    handshakes: Callable[[], int]       # SSH logins its sshd accepted so far
    cpu_s: Callable[[], float]          # CPU used so far by its sshd and all it ran
    remove: Callable[[], None]


def container_host(name: str, key: Path) -> Host:
    w = start_worker(name, key)
    cid = docker("inspect", "-f", "{{.Id}}", name).stdout.strip()

    def cpu() -> float:
        for path, scale in ((f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage", 1e-9),
                            (f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat", 1e-6)):
            try:
                text = Path(path).read_text()
            except OSError:
                continue
            return int(text.split()[1] if "usage_usec" in text else text.split()[0]) * scale
        return 0.0

    return Host(name, w.port, w.handshakes, cpu, lambda: docker("rm", "-f", name, check=False) and None)


def local_host(folder: Path) -> Host:
    h = start_host(folder)
    # sshd sized as the bpcp_worker role sizes it (tests/local_sshd.py's 100 would cut 96 slots)
    conf = folder / f"sshd-{h.port}.conf"
    conf.write_text(conf.read_text().replace("MaxStartups 100\nMaxSessions 100\n",
                                             f"MaxStartups {2 * SSHD_SLOTS + 10}:30:{4 * SSHD_SLOTS + 20}\n"
                                             f"MaxSessions {2 * SSHD_SLOTS + 10}\n"))
    os.kill(h.proc.pid, signal.SIGHUP)          # sshd -D re-executes itself with the new config
    time.sleep(1)
    log = folder / f"sshd-{h.port}.log"
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = Path(f"/proc/{h.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / tick     # utime stime cutime cstime

    return Host(f"local-{h.port}", h.port, lambda: log.read_text(errors="replace").count("Accepted publickey"),
                cpu, h.stop)


def fake_cellprofiler(folder: Path, plan: planfile.Plan, low: float, high: float) -> Path:
    """A venv-shaped folder bpcp accepts as --cellprofiler: bin/cellprofiler, bin/python, a dist-info."""
    (folder / "bin").mkdir(parents=True, exist_ok=True)
    (folder / "lib" / "python3" / "site-packages" / "cellprofiler-5.0.0.dist-info").mkdir(parents=True, exist_ok=True)
    tables = {t: plan.table_file(t) for t in plan.tables}
    exe = folder / "bin" / "cellprofiler"
    exe.write_text(FAKE.replace("LOW", repr(low)).replace("HIGH", repr(high)).replace("TABLES", repr(tables))
                   .replace("DELIM", repr(plan.delimiter)))
    exe.chmod(0o755)
    python = folder / "bin" / "python"
    if not python.exists():
        python.symlink_to("/usr/bin/python3")
    return folder


def sshlogin(w: Host, key: Path, slots: int) -> str:
    """A line of run.yml's hosts.sshlogin for this worker."""
    return (f"{slots}/ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new {SSH_SHARE} -p {w.port} -i {key} "
            f"{SSH_OPTIONS} -l root 127.0.0.1")


def close_shared(workers: list[Host], key: Path) -> None:
    """End the shared connections to these workers (a later configuration must open its own)."""
    for w in workers:
        subprocess.run(["ssh", *shlex.split(SSH_SHARE), "-O", "exit", "-p", str(w.port), "-i", str(key),
                        *SSH_OPTIONS.split(), "-l", "root", "127.0.0.1"], capture_output=True, timeout=30)


class Sampler(threading.Thread):
    """Peaks over the controller's processes: those in bpcp run's session and the orphans this
    subreaper took over (the detached shared SSH connections); /proc only, no subprocess."""

    def __init__(self, session: int) -> None:
        super().__init__(daemon=True)
        self.session, self.stop = session, threading.Event()
        self.rss = self.fds = self.parallel_fds = self.procs = 0
        self.parallel_cpu: dict[int, float] = {}
        self.page, self.tick = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            rss = fds = procs = 0
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                    fields = stat[stat.rindex(")") + 2:].split()
                    ppid, sid = int(fields[1]), int(fields[3])
                    if sid != self.session and not (ppid == me and int(entry.name) != self.session):
                        continue
                    if int(entry.name) == me:
                        continue
                    n = len(os.listdir(f"/proc/{entry.name}/fd"))
                    rss += int(Path(f"/proc/{entry.name}/statm").read_text().split()[1]) * self.page
                    fds += n
                    procs += 1
                    if stat[stat.index("(") + 1:stat.rindex(")")] == "parallel":
                        self.parallel_fds = max(self.parallel_fds, n)
                        self.parallel_cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / self.tick
                except (OSError, ValueError, IndexError):
                    continue
            self.rss, self.fds, self.procs = max(self.rss, rss), max(self.fds, fds), max(self.procs, procs)
            self.stop.wait(0.5)


def settle(session: int | None, wait: float = 30) -> None:
    """Wait (reaping the orphans this subreaper inherits) until no process of the session is left,
    or, with None, no ssh child of this process (the shared connections); then kill what is left."""
    me, deadline = os.getpid(), time.monotonic() + wait

    def left() -> list[int]:
        found = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and int(entry.name) != me:
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()
                ours = int(fields[3]) == session if session else (int(fields[1]) == me and "(ssh)" in stat)
                if fields[0] != "Z" and ours:
                    found.append(int(entry.name))
        return found

    while (pids := left()) and time.monotonic() < deadline:
        reap()
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    reap()


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sustained(run: Path) -> tuple[int, float, float]:
    """Finished jobs, completions per second between the 10th and 90th percentile end, mean busy."""
    attempts, _ = read_joblog(run / "joblog.tsv")
    ok = [a for a in attempts if a.ok]
    if len(ok) < 10:
        return len(ok), 0.0, 0.0
    ends = sorted(a.start + a.runtime for a in ok)
    lo, hi = ends[len(ends) // 10], ends[(len(ends) * 9) // 10]
    window = max(hi - lo, 1e-6)
    rate = ((len(ends) * 9) // 10 - len(ends) // 10) / window
    busy = sum(max(0.0, min(a.start + a.runtime, hi) - max(a.start, lo)) for a in ok) / window
    return len(ok), rate, busy


def plan_run(run: Path, plate: Path, plates: int) -> None:
    only = [arg for p in range(1, plates + 1) for arg in ("--only", f"Metadata_Plate=P{p}")]
    subprocess.run([str(BPCP), "plan", "-o", str(run), "-d", str(plate / "load_data.csv"),
                    "-p", str(plate / "example_loaddata.cppipe"), "--bundle", "0", "--cellprofiler", CELLPROFILER,
                    "--group-by", "Metadata_Plate,Metadata_Well", *only], check=True, capture_output=True, timeout=600)


def one(workers: list[Host], key: Path, slots: int, work: Path, plate: Path, fake: Path, max_plates: int,
        max_seconds: float, ideal_per_slot: float) -> Result:
    total = len(workers) * slots
    plates = min(max_plates, max(2, -(-2 * total // WELLS)))      # at least 2 rounds of the slots
    run = work / f"run-{len(workers)}x{slots}"
    plan_run(run, plate, plates)
    logins = run / "hosts.sshlogin"
    logins.write_text("".join(sshlogin(w, key, slots) + "\n" for w in workers))
    close_shared(workers, key)
    reap()
    shakes = [w.handshakes() for w in workers]
    loadavg = Path("/proc/loadavg").read_text().strip()
    argv = [str(BPCP), "run", "-o", str(run), "--cellprofiler", str(fake), "--sshloginfile", str(logins),
            "--no-warm-workers", "--no-merge", "--tmp-root", "auto"]
    cpu0, wcpu0, t0 = children_cpu(), sum(w.cpu_s() for w in workers), time.monotonic()
    log = (run / "run.log").open("w")
    proc = subprocess.Popen(argv, cwd=run, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sampler = Sampler(proc.pid)
    sampler.start()
    stopped = False
    try:
        proc.wait(timeout=max_seconds)
    except subprocess.TimeoutExpired:
        stopped = True
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - t0
    sampler.stop.set()
    sampler.join()
    settle(proc.pid)                # GNU parallel and its ssh clients reaped, so getrusage counts them
    close_shared(workers, key)      # the shared connections' CPU is the controller's too
    settle(None)
    cpu, wcpu = children_cpu() - cpu0, sum(w.cpu_s() for w in workers) - wcpu0
    log.close()
    done, rate, busy = sustained(run)
    shaken = sum(w.handshakes() for w in workers) - sum(shakes)
    per = max(done, 1)
    return Result(len(workers), slots, total, len(planfile.read(RunFolder(run)).jobs), done, round(seconds, 1),
                  round(rate, 2), round(busy, 1), round(total * ideal_per_slot, 2), round(cpu / per, 4),
                  round(100 * cpu / seconds, 1), round(sum(sampler.parallel_cpu.values()) / per, 4),
                  round(sampler.rss / 2**20, 1), sampler.fds, sampler.parallel_fds, sampler.procs,
                  round(shaken / per, 2), round(wcpu / per, 4), loadavg, stopped)


def table(results: list[Result]) -> str:
    head = (f"{'hosts':>5} {'slots':>5} {'total':>5} {'jobs':>5} {'done':>5} {'wall s':>7} {'jobs/s':>7} "
            f"{'busy':>6} {'ctl s/job':>9} {'ctl %':>6} {'par s/job':>9} {'RSS MB':>7} {'fds':>5} {'par fds':>7} "
            f"{'procs':>5} {'ssh/job':>7} {'wrk s/job':>9}")
    lines = [head]
    for r in results:
        lines.append(f"{r.hosts:>5} {r.slots:>5} {r.total_slots:>5} {r.jobs:>5} {r.done:>5} {r.seconds:>7.1f} "
                     f"{r.jobs_per_s:>7.2f} {r.busy:>6.1f} {r.ctl_cpu_s_per_job:>9.3f} {r.ctl_cpu_pct:>6.0f} "
                     f"{r.parallel_cpu_s_per_job:>9.3f} {r.peak_rss_mb:>7.0f} {r.peak_fds:>5} {r.peak_parallel_fds:>7} "
                     f"{r.peak_procs:>5} {r.ssh_per_job:>7.2f} {r.worker_cpu_s_per_job:>9.3f}"
                     + ("  (stopped at --max-seconds" if r.stopped else "")
                     + (", < 1 round: ramp-up only)" if r.stopped and r.done < r.total_slots else ")" if r.stopped else ""))
    return "\n".join(lines)


def knee(results: list[Result]) -> tuple[str, dict]:
    """Where more slots stop buying throughput: the first step up in total slots that raises
    jobs/s by less than a quarter of the slots' ratio. Only configurations that finished more
    jobs than they have slots count (the others measured their ramp-up, not a steady rate)."""
    steady = [r for r in results if r.done >= max(10, r.total_slots)] or results   # past one round of the slots
    best = max(steady, key=lambda r: r.jobs_per_s)
    ordered = sorted(steady, key=lambda r: (r.total_slots, r.hosts))
    stop = None
    for a, b in itertools.pairwise(ordered):
        if b.total_slots > a.total_slots and a.jobs_per_s > 0:
            gain, more = b.jobs_per_s / a.jobs_per_s, b.total_slots / a.total_slots
            if gain - 1 < 0.25 * (more - 1):
                stop = (a, b, gain, more)
                break
    cpu = statistics.median([r.ctl_cpu_s_per_job for r in steady if r.done] or [0.0])
    cores = os.cpu_count() or 1
    summary = {"jobs_per_s": best.jobs_per_s, "at_total_slots": best.total_slots, "cpu_s_per_job": round(cpu, 4),
               "cores_here": cores, "cpu_bound_jobs_per_s_per_core": round(1 / cpu, 1) if cpu else None}
    if stop is None:
        return (f"throughput still grows at {ordered[-1].total_slots} slots: best {best.jobs_per_s} jobs/s", summary)
    a, b, gain, more = stop
    summary.update(knee_total_slots=a.total_slots, knee_gain=round(gain, 2), knee_slots_ratio=round(more, 2))
    return (f"throughput stops growing with slots after {a.total_slots} slots ({a.hosts}x{a.slots}: {a.jobs_per_s} "
            f"jobs/s): {b.total_slots} slots ({b.hosts}x{b.slots}) give {gain:.2f}x the jobs/s for {more:.1f}x the slots; "
            f"best {best.jobs_per_s} jobs/s at {best.total_slots} slots, controller {cpu:.3f} CPU s/job "
            f"(about {1 / cpu if cpu else 0:.0f} jobs/s per controller core if nothing else ran)", summary)


def write(out: Path, command: str, sleep: str, results: list[Result]) -> str:
    """The results JSON benchmarks/scale.py reads; returns the knee line."""
    line, summary = knee(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sleep": sleep,
        "cores": os.cpu_count(), "loadavg_end": Path("/proc/loadavg").read_text().strip(), "controller": summary,
        "knee": line, "results": [asdict(r) for r in results]}, indent=1) + "\n")
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", default="1,4", help="host counts, comma-separated")
    p.add_argument("--slots", default="8,32,96", help="slots per host, comma-separated")
    p.add_argument("--sleep", default="0-2", help="the stand-in CellProfiler's seconds per job: LOW-HIGH, uniform")
    p.add_argument("--max-plates", type=int, default=8, help=f"most jobs per configuration, in plates of {WELLS}")
    p.add_argument("--max-seconds", type=float, default=90, help="stop a configuration after this long")
    p.add_argument("--local", action="store_true",
                   help="hosts are sshds of this machine on 127.0.0.1 (tests/local_sshd.py), not containers")
    p.add_argument("--out", type=Path, default=RESULTS, help="results JSON (benchmarks/scale.py reads it)")
    args = p.parse_args(argv)
    hosts = [int(h) for h in args.hosts.split(",")]
    slots = [int(s) for s in args.slots.split(",")]
    low, high = (float(x) for x in args.sleep.split("-"))
    if args.local and not sshd_ready():
        print("fanout: --local needs /usr/sbin/sshd, ssh and root", file=sys.stderr)
        return 2
    if not args.local and not docker_ready():
        print("fanout: no Docker engine (scripts/ensure-docker.sh starts one; or --local)", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)     # detached ssh masters become ours: counted, reaped
    if not args.local:
        ensure_worker_image()
    work = Path(tempfile.mkdtemp(prefix="bpcp-fanout-"))
    plate = generate_plate(work / "plate", PlateSpec(plates=tuple(f"P{i}" for i in range(1, args.max_plates + 1)),
                                                      rows="ABCDEFGH", columns=12, sites=1, size=64))
    plan_run(work / "run-probe", plate, 1)
    fake = fake_cellprofiler(work / "cellprofiler", planfile.read(RunFolder(work / "run-probe")), low, high)
    (work / "ssh").mkdir()
    key = make_key(work / "ssh")         # local_sshd's hosts take the key of their folder
    session = secrets.token_hex(3)
    started = [local_host(work / "ssh") if args.local else container_host(f"bpcp-fanout-{session}-w{i}", key)
               for i in range(1, max(hosts) + 1)]
    results: list[Result] = []
    command = "benchmarks/fanout.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        for w in started if not args.local else []:     # the stand-in at the same path on every worker
            docker("exec", w.name, "mkdir", "-p", str(fake.parent))
            docker("cp", str(fake), f"{w.name}:{fake.parent}/")
        mean = (low + high) / 2
        print(table([]), flush=True)
        for n in hosts:
            for s in slots:
                r = one(started[:n], key, s, work, plate, fake, args.max_plates, args.max_seconds, 1 / max(mean, 0.05))
                results.append(r)
                print(table([r]).splitlines()[1], flush=True)
                write(args.out, command, args.sleep, results)      # so far: an interrupted run keeps its rows
    finally:
        for w in started:
            w.remove()
    print()
    print(table(results))
    print(write(args.out, command, args.sleep, results))
    print(f"fanout: wrote {args.out}; run folders in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
