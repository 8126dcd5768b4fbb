"""`bpcp profile`: measure a few representative jobs of a plan, write <run>/profile.json.

Each profiled job runs exactly as jobs.sh runs it (same CellProfiler command, same pinned
threads), once under `/usr/bin/time -v` (wall, user+sys CPU, peak RSS) and, with --massif, the
smallest one also under `valgrind --tool=massif` (malloc heap peak; CellProfiler 4.2 only).
This module is the one parser of both raw outputs (parse_time_v, parse_massif): for local
profiles, and for the folders the bpcp-profile helper fills on other hosts (read_raw; `--parse`
prints them, `--import` makes profile.json of them). A line fitted over >= 2 job sizes gives the
start-up (intercept) and seconds per image set (slope); RSS over sizes gives memory growth per
image set.

Which number is used for what: peak RSS sizes jobs (bpcp.sizing.slots); CPU per process sizes cores;
start-up and seconds per image set forecast wall time (bpcp.sizing.estimate). massif's heap peak only
shows where malloc'd memory goes: it excludes the JVM heap and mapped libraries, and
`--pages-as-heap=yes` would instead count reserved, untouched memory (gigabytes too many).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bpcp import __version__, planfile
from bpcp.errors import BpcpError
from bpcp.inputs import cellprofiler as cpmod
from bpcp.jobs import runner
from bpcp.planfile import Plan
from bpcp.runfolder import RunFolder, write_atomic
from bpcp.sizing.slots import background_load

FORMAT = 1
PROFILE_FILE = "profile.json"
TIME = "/usr/bin/time"
MASSIF_TIMEOUT = 900.0
MASSIF_CP5 = "CellProfiler {version} crashes under valgrind at scipy import"
SAMPLE_MIN = 4          # all jobs smaller than this: also profile a sample of up to SAMPLE_SIZE sets
SAMPLE_SIZE = 8
USES = {
    "max_rss_bytes": "peak RSS (/usr/bin/time -v): sizes jobs per host and --memfree",
    "cpu_per_process": "CPU seconds / wall seconds: how many cores one process keeps busy",
    "startup_seconds": "intercept of wall time over job size: paid once per job",
    "seconds_per_image_set": "slope of wall time over job size: forecasts and timeouts",
    "rss_per_image_set_bytes": "slope of peak RSS over job size: memory growth with group size",
    "heap_peak_bytes": "massif heap peak (mem_heap_B + mem_heap_extra_B): where malloc'd memory goes; "
                       "not for sizing (misses the JVM heap and mapped libraries)",
}


# ------------------------------------------------------------------ parsing (pure)
def parse_time_v(text: str) -> dict:
    """GNU `/usr/bin/time -v` output -> wall_seconds, user_seconds, system_seconds, max_rss_bytes,
    exit_code, signal. Raises BpcpError when it holds no measurement."""
    out: dict = {"wall_seconds": None, "user_seconds": None, "system_seconds": None,
                 "max_rss_bytes": None, "exit_code": None, "signal": None}
    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"Command terminated by signal (\d+)", line)
        if m:
            out["signal"] = int(m.group(1))
            continue
        key, _, value = line.rpartition(": ")
        if key == "User time (seconds)":
            out["user_seconds"] = float(value)
        elif key == "System time (seconds)":
            out["system_seconds"] = float(value)
        elif key == "Maximum resident set size (kbytes)":
            out["max_rss_bytes"] = int(value) * 1024
        elif key == "Exit status":
            out["exit_code"] = int(value)
        elif key.startswith("Elapsed (wall clock) time"):
            secs = 0.0
            for part in value.split(":"):
                secs = secs * 60 + float(part)
            out["wall_seconds"] = round(secs, 3)
    if out["wall_seconds"] is None or out["max_rss_bytes"] is None:
        raise BpcpError("/usr/bin/time -v output has no wall time or maximum RSS (not GNU time?)")
    return out


def parse_massif(text: str) -> dict:
    """A massif.out file -> snapshots, and the peak: max over snapshots of mem_heap_B +
    mem_heap_extra_B (what massif and ms_print call the total, with stacks off).

    A file cut short (valgrind killed) keeps its complete snapshots."""
    snaps: list[dict] = []
    cur: dict | None = None
    cmd = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("cmd:"):
            cmd = line[4:].strip()
        elif line.startswith("snapshot="):
            cur = {"snapshot": int(line.split("=", 1)[1])}
            snaps.append(cur)
        elif cur is not None and "=" in line:
            key, value = line.split("=", 1)
            if key in ("time", "mem_heap_B", "mem_heap_extra_B", "mem_stacks_B"):
                cur[key] = int(value)
            elif key == "heap_tree":
                cur["heap_tree"] = value
    done = [s for s in snaps if "mem_heap_B" in s and "mem_heap_extra_B" in s]
    if not done:
        raise BpcpError("massif output holds no complete snapshot (empty, or valgrind died at once)")
    for s in done:
        s["total_B"] = s["mem_heap_B"] + s["mem_heap_extra_B"] + s.get("mem_stacks_B", 0)
    peak = max(done, key=lambda s: (s["mem_heap_B"] + s["mem_heap_extra_B"], s["snapshot"]))
    return {
        "cmd": cmd,
        "snapshots": len(done),
        "peak_snapshot": peak["snapshot"],
        "peak_heap_bytes": peak["mem_heap_B"] + peak["mem_heap_extra_B"],
        "peak_useful_heap_bytes": peak["mem_heap_B"],
        "peak_extra_heap_bytes": peak["mem_heap_extra_B"],
        "marked_peak_snapshot": next((s["snapshot"] for s in done if s.get("heap_tree") == "peak"), None),
    }


# ------------------------------------------------------------------ derived numbers (pure)
def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope). Needs >= 2 distinct x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("need at least two different job sizes to fit a line")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


BUSY_LOAD = 0.5          # other processes' runnable tasks before a run above which wall is not trusted


def _fit(sizes: list[int], ys: list[float], what: str, notes: list[str]) -> tuple[float, float]:
    """(intercept, slope) >= 0; falls back to no intercept when the fit makes no sense."""
    if len(set(sizes)) < 2:
        notes.append(f"only one job size profiled: {what} start-up is not separated from per-image-set time "
                     "(profile with --sizes 1,N)")
        return 0.0, sum(ys) / sum(sizes)
    a, b = fit_line(sizes, ys)
    if b <= 0 or a < 0:
        notes.append(f"{what} did not grow with job size as a line should (fit {a:.2f} s + {b:.3f} s/set): "
                     "noise from a busy host? profile again when it is idle, or with --sizes far apart")
        if b <= 0:
            return 0.0, max(y / s for y, s in zip(ys, sizes))   # upper bound per image set
        return 0.0, b
    return a, b


def derive(runs: list[dict], cores: int | None = None) -> dict:
    """Start-up, seconds per image set, CPU per process, RSS growth from the profiled runs.

    Start-up and seconds per image set come from wall time when the host was quiet during the
    profile; when other processes kept it busy (load before a run >= BUSY_LOAD) they come from CPU
    time instead, which is what a dedicated core would take as wall time for a one-thread process."""
    sizes = [r["image_sets"] for r in runs]
    walls = [r["wall_seconds"] for r in runs]
    cpus = [r["user_seconds"] + r["system_seconds"] for r in runs]
    rss = [r["max_rss_bytes"] for r in runs]
    notes: list[str] = []
    background = max((r.get("background_load") or 0.0) for r in runs)
    busy = background >= BUSY_LOAD
    wall_fit = _fit(sizes, walls, "wall time", notes)
    cpu_fit = _fit(sizes, cpus, "CPU time", [])
    cpu_ratio = sum(cpus) / sum(walls)
    if busy:
        startup, per_set = cpu_fit
        notes.append(f"host was busy during the profile (load {background:.1f} from other processes"
                     f"{f' on {cores} cores' if cores else ''}): wall times are inflated, so start-up and per-image-set "
                     f"time come from CPU time, and CPU per process ({cpu_ratio:.2f} measured) counts as at least 1 core")
    else:
        startup, per_set = wall_fit
    if len(set(sizes)) >= 2:
        rss_base, rss_grow = fit_line(sizes, rss)
    else:
        rss_base, rss_grow = float(max(rss)), 0.0
    heaps = [r["massif"]["peak_heap_bytes"] for r in runs if (r.get("massif") or {}).get("peak_heap_bytes")]
    return {
        "sizes": sorted(set(sizes)),
        "basis": "cpu" if busy else "wall",
        "busy_load": round(background, 2),
        "startup_seconds": round(startup, 3),
        "seconds_per_image_set": round(per_set, 4),
        "wall_startup_seconds": round(wall_fit[0], 3),
        "wall_seconds_per_image_set": round(wall_fit[1], 4),
        "cpu_startup_seconds": round(cpu_fit[0], 3),
        "cpu_seconds_per_image_set": round(cpu_fit[1], 4),
        "cpu_per_process": round(max(cpu_ratio, 1.0) if busy else cpu_ratio, 3),
        "cpu_per_process_measured": round(cpu_ratio, 3),
        "max_rss_bytes": max(rss),
        "rss_base_bytes": int(rss_base),
        "rss_per_image_set_bytes": int(rss_grow),
        "heap_peak_bytes": max(heaps) if heaps else None,
        "notes": notes,
    }


# ------------------------------------------------------------------ choosing what to profile (pure)
@dataclass(frozen=True)
class Sample:
    label: str               # folder name under <run>/profile/
    job: str                 # plan job id the rows come from (first one, for samples)
    image_sets: int
    rows: tuple[tuple[str, int], ...] | None = None   # (job id, row index) for a subset CSV; None = whole job


def choose(plan: Plan, job_ids: list[str] | None = None, sizes: list[int] | None = None) -> list[Sample]:
    """Which runs to profile: --job IDs as they are; else the smallest and largest job; when
    jobs are all one size (or --sizes is given) LoadData subsets of 1 and N image sets."""
    jobs = {j.id: j for j in plan.jobs}
    size = {jid: j.image_sets for jid, j in jobs.items()}
    if job_ids:
        unknown = [j for j in job_ids if j not in jobs]
        if unknown:
            raise BpcpError(f"--job {unknown[0]}: no such job in plan.json (e.g. {next(iter(jobs))})")
        return [Sample(jid, jid, size[jid]) for jid in dict.fromkeys(job_ids)]
    order = list(jobs)                               # longest first
    largest, smallest = order[0], order[-1]
    chosen: list[Sample] = []
    if sizes is None:
        chosen = [Sample(smallest, smallest, size[smallest])]
        if size[largest] != size[smallest]:
            chosen.append(Sample(largest, largest, size[largest]))
        wanted = []
        if size[largest] == size[smallest]:
            wanted.append(1 if size[smallest] > 1 else min(plan.image_sets, SAMPLE_SIZE))
        if size[largest] < SAMPLE_MIN and plan.image_sets > size[largest]:
            wanted.append(min(plan.image_sets, SAMPLE_SIZE))
        sizes = [n for n in dict.fromkeys(wanted) if n not in {s.image_sets for s in chosen}]
    if sizes and plan.dataset.kind != "loaddata":
        raise BpcpError(f"profiling {sizes} image sets needs subsets of a LoadData CSV; this plan reads a "
                        f"{plan.dataset.kind}: pick jobs of different sizes with --job ID --job ID")
    for n in sizes or ():
        if n < 1 or n > plan.image_sets:
            raise BpcpError(f"--sizes {n}: give 1 to {plan.image_sets} image sets (the plan's total)")
        rows: list[tuple[str, int]] = []
        for jid in order:
            rows += [(jid, i) for i in range(size[jid])][: n - len(rows)]
            if len(rows) == n:
                break
        chosen.append(Sample(f"sample-{n}", rows[0][0], n, tuple(rows)))
    return sorted(chosen, key=lambda s: s.image_sets)


# ------------------------------------------------------------------ running (side effects)
def _env(cp: cpmod.CellProfiler) -> dict[str, str]:
    """The job runner's environment for CellProfiler: a profile measures what a job runs."""
    return runner.job_environment(cp.version, True, cp.env)


def _run(argv: list[str], cwd: Path, env: dict, log: Path, timeout: float | None) -> tuple[int, bool, float]:
    """Run in its own process group; kill the group at the timeout. (exit code, timed out, seconds)."""
    start = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.wait(timeout=timeout), False, time.monotonic() - start
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9, True, time.monotonic() - start
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def _last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if re.search(r"(Error|Exception|error:|Failure)", ln)]
    return (errors or lines or ["empty log"])[-1][:300]


def write_input(run: RunFolder, plan: Plan, sample: Sample, dest: Path) -> Path:
    """The sample's input file: the job's own, or a LoadData CSV of the chosen rows."""
    jobs = {j.id: j for j in plan.jobs}
    if sample.rows is None:
        return run.root / str(jobs[sample.job].input)
    header: list[str] | None = None
    out_rows = []
    cache: dict[str, list[list[str]]] = {}
    for jid, i in sample.rows:
        if jid not in cache:
            with open(run.root / str(jobs[jid].input), newline="") as fh:
                rows = list(csv.reader(fh))
            header = header or rows[0]
            if rows[0] != header:
                raise BpcpError(f"{jobs[jid].input}: columns differ from the other jobs' CSVs; re-plan")
            cache[jid] = rows[1:]
        out_rows.append(cache[jid][i])
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(out_rows)
    return dest


def cp_command(cp: cpmod.CellProfiler, run: RunFolder, plan: Plan, input_path: Path | None,
               group_arg: str | None, work: Path) -> list[str]:
    """The job runner's CellProfiler command for one job, with outputs under work/."""
    inputs = runner.input_argv(plan.dataset.kind, "global" if group_arg is not None else "local",
                               None if input_path is None else str(input_path), group_arg)
    config = {"cellprofiler": {"executable": str(cp.executable), "version": cp.version}}
    return runner.cellprofiler_argv(config, str(run.root / plan.pipeline.file), inputs, str(work / "out"),
                                    str(work / "tmp"), str(work / "done.txt"))


def _fresh(work: Path) -> None:
    for name in ("out", "tmp", "done.txt"):
        p = work / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    (work / "out").mkdir(parents=True)
    (work / "tmp").mkdir()


def measure(argv: list[str], cp: cpmod.CellProfiler, work: Path, timeout: float | None) -> dict:
    """One run under /usr/bin/time -v; raises BpcpError unless CellProfiler says Complete."""
    if not Path(TIME).exists():
        raise BpcpError(f"{TIME} not found: install GNU time (apt-get install time, or ansible-playbook site.yml)")
    _fresh(work)
    timefile = work / "time.txt"
    timefile.unlink(missing_ok=True)
    log = work / "cellprofiler.log"
    rc, timed_out, _ = _run([TIME, "-v", "-o", str(timefile), "--"] + argv, work, _env(cp), log, timeout)
    if timed_out:
        raise BpcpError(f"{work.name}: CellProfiler took longer than {timeout:.0f} s (--timeout); raise it")
    done = (work / "done.txt").read_text().strip() if (work / "done.txt").exists() else ""
    if rc != 0 or done != "Complete":
        raise BpcpError(f"{work.name}: CellProfiler exit {rc}, done file {done or 'missing'!r}: {_last_line(log)} "
                        f"(log: {log}); fix the job before profiling it")
    result = parse_time_v(timefile.read_text(errors="replace"))
    shutil.rmtree(work / "tmp", ignore_errors=True)
    return result


def measure_massif(argv: list[str], cp: cpmod.CellProfiler, work: Path, timeout: float) -> dict:
    """One run under valgrind massif, bounded by timeout; returns the parsed peak or an error."""
    mdir = work / "massif"
    shutil.rmtree(mdir, ignore_errors=True)
    mdir.mkdir(parents=True)
    (mdir / "out").mkdir()
    (mdir / "tmp").mkdir()
    argv = [a.replace(str(work / "out"), str(mdir / "out")).replace(str(work / "tmp"), str(mdir / "tmp"))
            .replace(str(work / "done.txt"), str(mdir / "done.txt")) for a in argv]
    vg = shutil.which("valgrind")
    result: dict = {"cellprofiler_version": cp.version, "out": None, "peak_heap_bytes": None, "error": None}
    if vg is None:
        result["error"] = "valgrind not installed (ansible-playbook site.yml installs it: role massif)"
        return result
    cmd = [vg, "--tool=massif", "--trace-children=yes", f"--massif-out-file={mdir}/massif.out.%p"] + argv
    env = _env(cp)
    if cp.major == 4:   # the JVM's JIT-compiled code (C2) crashes under valgrind: interpret only
        env["JAVA_TOOL_OPTIONS"] = (env.get("JAVA_TOOL_OPTIONS", "") + " -Xint").strip()
    rc, timed_out, secs = _run(cmd, mdir, env, mdir / "massif.log", timeout)
    result.update(read_massif(mdir, rc, timed_out, timeout, mdir / "massif.log"))
    result["wall_seconds"] = round(secs, 2)
    shutil.rmtree(mdir / "tmp", ignore_errors=True)
    return result


def read_massif(folder: Path, rc: int, timed_out: bool, timeout: float | None, log: Path) -> dict:
    """The largest peak of the massif.out.* in folder, and what went wrong with the run that wrote
    them (its exit code, a timeout: then the peak is of the part that ran)."""
    result: dict = {"out": None, "peak_heap_bytes": None, "error": None}
    best = None
    for path in sorted(folder.glob("massif.out.*")):
        try:
            parsed = parse_massif(path.read_text(errors="replace"))
        except BpcpError:
            continue
        if best is None or parsed["peak_heap_bytes"] > best[1]["peak_heap_bytes"]:
            best = (path, parsed)
    if best:
        result["out"] = str(best[0])
        result.update({k: v for k, v in best[1].items() if k != "cmd"})
    if timed_out:
        limit = f" after {timeout:.0f} s" if timeout else ""
        result["error"] = f"massif run killed{limit} (--massif-timeout); the peak is of the part that ran"
    elif rc != 0 or best is None:
        result["error"] = f"massif run failed (exit {rc}): {_last_line(log)}"
        result["peak_heap_bytes"] = None
    return result


# ------------------------------------------------------------------ raw outputs of the bpcp-profile helper
HELPER_RESULT = "bpcp-profile.json"


def read_raw(folder: Path) -> dict:
    """What a folder of raw outputs measured: bpcp-profile.json (the helper's: what ran, how it
    ended), time.txt (GNU time -v) and massif.out.* parsed here. One line when they are not there."""
    folder = Path(folder)
    try:
        helper = json.loads((folder / HELPER_RESULT).read_text())
        time_v = parse_time_v((folder / "time.txt").read_text(errors="replace"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BpcpError(f"{folder}: no readable {HELPER_RESULT} and time.txt ({exc}); measure it again "
                        "(bpcp-profile --out FOLDER -- COMMAND)") from None
    except BpcpError as exc:
        raise BpcpError(f"{folder}/time.txt: {exc.lines[0]}") from None
    massif = None
    m = helper.get("massif")
    if m:
        massif = read_massif(folder, int(m.get("exit_code") or 0), bool(m.get("timed_out")),
                             m.get("timeout_seconds"), folder / str(m.get("log") or "massif.log"))
        massif["wall_seconds"] = m.get("wall_seconds")
    return {"folder": str(folder), "command": helper.get("command"), "exit_code": helper.get("exit_code"),
            "timed_out": bool(helper.get("timed_out")), "time": time_v, "massif": massif}


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def profile_run(run_dir: Path, job_ids: list[str] | None = None, sizes: list[int] | None = None,
                massif: bool = False, massif_cellprofiler: str | None = None,
                cellprofiler: str | None = None, timeout: float | None = None,
                massif_timeout: float = MASSIF_TIMEOUT, repeat: int = 1, echo=print) -> dict:
    """Profile the chosen jobs of the plan in run_dir; write and return <run>/profile.json."""
    run = RunFolder(Path(run_dir).resolve())
    plan = planfile.read(run)
    cp = cpmod.for_plan(plan, cellprofiler)
    samples = choose(plan, job_ids, sizes)
    jobs = {j.id: j for j in plan.jobs}
    runs: list[dict] = []
    load_before = _loadavg()
    echo(f"bpcp: profiling {len(samples)} run(s) of {[s.image_sets for s in samples]} image sets with "
         f"CellProfiler {plan.cellprofiler.version} (load average {' '.join(map(str, load_before))})")
    prof_root = run.root / "profile"
    commands: dict[str, tuple[Path | None, str | None]] = {}
    for sample in samples:
        work = prof_root / sample.label
        work.mkdir(parents=True, exist_ok=True)
        job = jobs[sample.job]
        group_arg = job.group_arg if sample.rows is None else None
        input_path = None if group_arg is not None else write_input(run, plan, sample, work / "input.csv")
        commands[sample.label] = (input_path, group_arg)
        argv = cp_command(cp, run, plan, input_path, group_arg, work)
        for _ in range(repeat):
            background = background_load()
            t = measure(argv, cp, work, timeout)
            entry = {
                "label": sample.label, "job": sample.job, "subset": sample.rows is not None,
                "image_sets": sample.image_sets, "wall_seconds": t["wall_seconds"],
                "user_seconds": t["user_seconds"], "system_seconds": t["system_seconds"],
                "cpu_seconds": round(t["user_seconds"] + t["system_seconds"], 3),
                "max_rss_bytes": t["max_rss_bytes"], "background_load": background, "massif": None,
            }
            runs.append(entry)
            echo(f"bpcp: {sample.label}: {sample.image_sets} image sets, wall {t['wall_seconds']:.1f} s, "
                 f"CPU {entry['cpu_seconds']:.1f} s, peak RSS {t['max_rss_bytes'] / 2**20:.0f} MiB")
    massif_note = None
    if massif:
        mcp = cp
        if massif_cellprofiler:
            mcp = cpmod.locate(massif_cellprofiler)
        if mcp.major >= 5:
            massif_note = (f"massif skipped: {MASSIF_CP5.format(version=mcp.version)}; pass --massif-cellprofiler "
                           "4.2.8.1 to see the heap with 4.2 (RSS above is measured anyway)")
            echo("bpcp: " + massif_note)
        else:
            smallest = samples[0]
            work = prof_root / smallest.label
            argv = cp_command(mcp, run, plan, *commands[smallest.label], work)
            echo(f"bpcp: {smallest.label}: running under valgrind massif (about 10x slower; at most {massif_timeout:.0f} s)")
            m = measure_massif(argv, mcp, work, massif_timeout)
            for r in runs:
                if r["label"] == smallest.label:
                    r["massif"] = m
            if m["error"]:
                massif_note = m["error"]
                echo("bpcp: " + m["error"])
    doc = {
        "format": FORMAT,
        "kind": "bpcp-profile",
        "bpcp_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"name": socket.gethostname(), "cores": os.cpu_count(), "loadavg_before": load_before,
                 "loadavg_after": _loadavg()},
        "pipeline": {"sha256": plan.pipeline.sha256, "file": plan.pipeline.file},
        "dataset": {"sha256": plan.dataset.sha256, "kind": plan.dataset.kind},
        "cellprofiler": {"version": plan.cellprofiler.version, "command": cp.argv()},
        "thread_pinning": True,
        "runs": runs,
        "derived": derive(runs, os.cpu_count()),
        "uses": USES,
        "massif_note": massif_note,
    }
    write_profile(run.root / PROFILE_FILE, doc)
    return doc


def write_profile(path: Path, doc: dict) -> None:
    write_atomic(path, json.dumps(doc, indent=1) + "\n")


def import_raw(run_dir: Path, folders: list[Path], host: str = "remote") -> dict:
    """profile.json from raw outputs measured elsewhere (playbooks/profile.yml fetches them): each
    folder holds what the bpcp-profile helper kept (read_raw) and meta.json ({"job", "image_sets",
    "cellprofiler_version", "background_load"}, written by the playbook). bpcp parses the raw files
    itself, as for a local profile."""
    run = RunFolder(Path(run_dir).resolve())
    plan = planfile.read(run)
    major = plan.cellprofiler.version.split(".")[0]
    runs = []
    for folder in map(Path, folders):
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BpcpError(f"{folder}: no readable meta.json ({exc}); fetch the profile again") from None
        raw = read_raw(folder)
        t = raw["time"]
        if raw["timed_out"]:
            raise BpcpError(f"{folder}: CellProfiler was killed at the helper's --timeout; see its command.log")
        if t["exit_code"] not in (0, None) or t["signal"]:
            raise BpcpError(f"{folder}: CellProfiler failed there (exit {t['exit_code']}, signal {t['signal']}); "
                            "see its command.log")
        if meta.get("cellprofiler_version") not in (None, plan.cellprofiler.version):
            raise BpcpError(f"{folder}: measured with CellProfiler {meta['cellprofiler_version']}, "
                            f"the plan runs {plan.cellprofiler.version}")
        massif = raw["massif"]
        if massif and massif["error"] and major.isdigit() and int(major) >= 5:
            massif["error"] += (f"; {MASSIF_CP5.format(version=plan.cellprofiler.version)} (`bpcp profile --massif "
                                "--massif-cellprofiler 4.2.8.1` shows the heap with 4.2; peak RSS is measured anyway)")
        runs.append({"label": meta["job"], "job": meta["job"], "subset": False, "image_sets": int(meta["image_sets"]),
                     "wall_seconds": t["wall_seconds"], "user_seconds": t["user_seconds"],
                     "system_seconds": t["system_seconds"], "cpu_seconds": round(t["user_seconds"] + t["system_seconds"], 3),
                     "max_rss_bytes": t["max_rss_bytes"], "background_load": float(meta.get("background_load") or 0),
                     "massif": massif})
    if not runs:
        raise BpcpError("--import: give folders with meta.json, bpcp-profile.json and time.txt")
    doc = {
        "format": FORMAT, "kind": "bpcp-profile", "bpcp_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"name": host, "cores": None, "loadavg_before": [], "loadavg_after": []},
        "pipeline": {"sha256": plan.pipeline.sha256, "file": plan.pipeline.file},
        "dataset": {"sha256": plan.dataset.sha256, "kind": plan.dataset.kind},
        "cellprofiler": {"version": plan.cellprofiler.version, "command": None},
        "thread_pinning": True, "runs": runs, "derived": derive(runs), "uses": USES,
        "massif_note": next((r["massif"]["error"] for r in runs if r["massif"] and r["massif"]["error"]), None),
    }
    write_profile(run.root / PROFILE_FILE, doc)
    return doc


# ------------------------------------------------------------------ reading, checking
REQUIRED_DERIVED = ("startup_seconds", "seconds_per_image_set", "cpu_per_process", "max_rss_bytes")


def load_profile(path: Path, plan: Plan | None = None) -> dict:
    """Read a profile.json; one-line BpcpError when it is missing, empty, truncated, of another
    format, or measured on another pipeline or CellProfiler version than plan's."""
    path = Path(path)
    if path.is_dir():
        path = path / PROFILE_FILE
    redo = f"run `bpcp profile -o {path.parent}` again"
    if not path.exists():
        raise BpcpError(f"{path}: no profile here; {redo.replace(' again', '')} first")
    text = path.read_text(errors="replace")
    if not text.strip():
        raise BpcpError(f"{path}: empty file (an interrupted profile?); {redo}")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BpcpError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}; truncated?); {redo}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "bpcp-profile":
        raise BpcpError(f"{path}: not a bpcp profile (no \"kind\": \"bpcp-profile\"); {redo}")
    if doc.get("format") != FORMAT:
        raise BpcpError(f"{path}: profile format {doc.get('format')!r}, this bpcp {__version__} reads {FORMAT}; {redo}")
    derived = doc.get("derived") or {}
    missing = [k for k in REQUIRED_DERIVED if not isinstance(derived.get(k), (int, float))]
    if missing or not doc.get("runs"):
        raise BpcpError(f"{path}: incomplete profile (missing {', '.join(missing) or 'runs'}); {redo}")
    if plan is not None:
        have, want = doc.get("pipeline", {}).get("sha256", ""), plan.pipeline.sha256
        if have != want:
            raise BpcpError(f"{path}: measured pipeline sha256 {have[:12]}..., but this plan runs {want[:12]}... "
                            f"({plan.pipeline.path}): profile this plan's pipeline")
        have_v, want_v = doc.get("cellprofiler", {}).get("version"), plan.cellprofiler.version
        if have_v != want_v:
            raise BpcpError(f"{path}: measured with CellProfiler {have_v}, but this plan runs {want_v}: "
                            "profile with the plan's CellProfiler")
    return doc


def summary(doc: dict) -> list[str]:
    """What the profile says, and which number is used for what."""
    d = doc["derived"]
    lines = [f"profile of pipeline {doc['pipeline']['sha256'][:12]} with CellProfiler {doc['cellprofiler']['version']} "
             f"on {doc['host']['name']} (load average {doc['host']['loadavg_before'] or 'unknown'} before):"]
    for r in doc["runs"]:
        heap = ""
        if r.get("massif") and r["massif"].get("peak_heap_bytes"):
            heap = f", massif heap peak {r['massif']['peak_heap_bytes'] / 2**20:.0f} MiB"
        lines.append(f"  {r['label']}: {r['image_sets']} image sets: wall {r['wall_seconds']:.1f} s, "
                     f"CPU {r['cpu_seconds']:.1f} s, peak RSS {r['max_rss_bytes'] / 2**20:.0f} MiB{heap}")
    lines += [
        f"  start-up {d['startup_seconds']:.2f} s + {d['seconds_per_image_set']:.3f} s per image set  "
        f"(fit over sizes {d['sizes']}; forecasts wall time and the per-job timeout)",
        f"  CPU per process {d['cpu_per_process']:.2f}  (cores one CellProfiler keeps busy; sizes jobs per core)",
        f"  peak RSS {d['max_rss_bytes'] / 2**20:.0f} MiB, growth {d['rss_per_image_set_bytes'] / 2**20:.1f} MiB "
        "per image set  (sizes jobs per host's memory and --memfree)",
    ]
    if d.get("heap_peak_bytes"):
        lines.append(f"  massif heap peak {d['heap_peak_bytes'] / 2**20:.0f} MiB  (malloc heap only: shows where "
                     "memory goes, not for sizing; --pages-as-heap would overcount reserved memory)")
    if doc.get("massif_note"):
        lines.append(f"  {doc['massif_note']}")
    lines += [f"  note: {n}" for n in d.get("notes", [])]
    return lines


# ------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", type=Path, default=Path("bpcp-run"), help="the run folder (with plan.json)")
    p.add_argument("--job", action="append", dest="job_ids", metavar="ID", help="profile this job (repeat); default: the "
                   "smallest and largest job, plus LoadData subsets when jobs are all one size")
    p.add_argument("--sizes", help="comma-separated image set counts to profile as LoadData subsets, e.g. 1,8")
    p.add_argument("--repeat", type=int, default=1, help="runs per size (default 1)")
    p.add_argument("--massif", action="store_true", help="also run the smallest under valgrind massif (CP 4.2 only)")
    p.add_argument("--massif-cellprofiler", help="CellProfiler 4.2 to use for massif when the plan uses 5.x")
    p.add_argument("--massif-timeout", type=float, default=MASSIF_TIMEOUT, help=f"seconds (default {MASSIF_TIMEOUT:.0f})")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a plain run is killed")
    p.add_argument("--cellprofiler", help="CellProfiler to call (default: the plan's)")
    p.add_argument("--import", dest="import_dirs", nargs="+", type=Path, metavar="DIR",
                   help="build profile.json from raw outputs measured on another host (playbooks/profile.yml)")
    p.add_argument("--host", default="remote", help="with --import: the host the outputs came from")
    p.add_argument("--parse", dest="parse_dirs", nargs="+", type=Path, metavar="DIR",
                   help="print what the raw outputs of bpcp-profile in DIR measured, as JSON (no plan needed)")


def command(args: argparse.Namespace) -> int:
    sizes = None
    if args.sizes:
        try:
            sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        except ValueError:
            raise BpcpError(f"--sizes {args.sizes!r}: give comma-separated numbers of image sets, e.g. 1,8") from None
    if args.repeat < 1:
        raise BpcpError(f"--repeat {args.repeat}: give 1 or more")
    if args.parse_dirs:
        print(json.dumps([read_raw(d) for d in args.parse_dirs], indent=1))
        return 0
    if args.import_dirs:
        doc = import_raw(args.output, args.import_dirs, args.host)
        for line in summary(doc):
            print(line)
        return 0
    doc = profile_run(args.output, args.job_ids, sizes, args.massif, args.massif_cellprofiler, args.cellprofiler,
                      args.timeout, args.massif_timeout, args.repeat)
    for line in summary(doc):
        print(line)
    print(f"bpcp: wrote {Path(args.output).resolve() / PROFILE_FILE}; next: bpcp estimate -o {args.output}")
    return 0
