"""Shared by the benchmarks: the workload (plate + pipeline), measured runs, result verification.

Benchmark-only code: nothing in bpcp imports it.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bpcp.example import PlateSpec, generate_plate  # noqa: E402
from bpcp.inputs.cellprofiler import locate  # noqa: E402
from bpcp.jobs.runner import JAVA_THREAD_ENV, THREAD_ENV, job_environment  # noqa: E402

PIPELINE = HERE / "data" / "measure_heavy.cppipe"
RAMDISK = Path("/mnt/bpcp-ramdisk")
BPCP = REPO / ".venv" / "bin" / "bpcp"
ROWS = "ABCDEFGHIJKLMNOP"


# ----------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class Workload:
    image_sets: int = 24
    sites: int = 3            # image sets per well: one Plate+Well group
    size: int = 1024
    nuclei: int = 70
    seed: int = 7

    def wells(self) -> int:
        return math.ceil(self.image_sets / self.sites)


def make_plate(dest: Path, w: Workload) -> Path:
    """A synthetic plate (bpcp.example at w.size px) with the measurement-heavy pipeline and a
    LoadData CSV of exactly w.image_sets rows. Reused when dest already holds the same workload."""
    stamp = dest / "workload.json"
    want = json.dumps(w.__dict__, sort_keys=True)
    if stamp.exists() and stamp.read_text() == want and (dest / "load_data.csv").exists():
        shutil.copyfile(PIPELINE, dest / "measure_heavy.cppipe")
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    wells = w.wells()
    columns = min(wells, 24)
    rows = ROWS[: math.ceil(wells / columns)]
    generate_plate(dest, PlateSpec(rows=rows, columns=columns, sites=w.sites, size=w.size,
                                   nuclei=w.nuclei, seed=w.seed))
    path = dest / "load_data.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: 1 + w.image_sets]))
    shutil.copyfile(PIPELINE, dest / "measure_heavy.cppipe")
    stamp.write_text(want)
    return dest


def read_loaddata(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fd:
        return list(csv.DictReader(fd))


# ----------------------------------------------------------------------------- CellProfiler
@dataclass
class CP:
    argv: list[str]
    env_extra: dict[str, str]
    version: str
    major: int

    @classmethod
    def find(cls, spec: str) -> CP:
        cp = locate(spec)
        return cls(cp.argv(), dict(cp.env), cp.version, cp.major)

    def env(self, pinned: bool) -> dict[str, str]:
        """The environment of a run: pinned = bpcp's one-thread settings, else none of them."""
        base = {k: v for k, v in os.environ.items() if k not in {**THREAD_ENV, **JAVA_THREAD_ENV}}
        return job_environment(str(self.major), pinned, self.env_extra, base=base)


# ----------------------------------------------------------------------------- measuring
@dataclass
class Measured:
    name: str
    wall: float
    cpu: float                 # user + system of every descendant the command waited for
    peak_rss: int              # bytes: the highest sum of RSS over the process tree (sampled)
    max_process_rss: int       # bytes: the largest single process RSS seen (sampled)
    processes: int = 0         # CellProfiler processes started
    returncode: int = 0
    notes: dict = field(default_factory=dict)


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fd:
                stat = fd.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree_rss(root: int) -> tuple[int, int]:
    kids = _children_map()
    todo, total, biggest = [root], 0, 0
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, ()))
        try:
            with open(f"/proc/{pid}/statm") as fd:
                rss = int(fd.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        total += rss
        biggest = max(biggest, rss)
    return total, biggest


def measure(name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
            log: Path | None = None, interval: float = 0.5) -> Measured:
    """Run argv to the end: wall time, CPU time of the whole tree, sampled peak memory."""
    out = open(log, "w") if log else subprocess.DEVNULL
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total, biggest = _tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], total), max(peak[1], biggest)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if log:
        out.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measured(name, wall, cpu, peak[0], peak[1], returncode=rc)


def bash(script: str) -> list[str]:
    return ["bash", "-c", script]


def q(value) -> str:
    return shlex.quote(str(value))


def joblog_span(path: Path) -> tuple[float, float, list[float]]:
    """(first start, last end, job runtimes) of a GNU parallel joblog (bpcp.results.report reads it)."""
    from bpcp.results.joblog import read_joblog

    attempts, _ = read_joblog(path)
    return (min(a.start for a in attempts), max(a.end for a in attempts), [a.runtime for a in attempts])


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def wait_for_quiet(limit: float, max_wait: float, poll: float = 20.0) -> tuple[float, float]:
    """Wait until the 1-minute load average is below limit (at most max_wait s). (load, waited)."""
    start = time.monotonic()
    while True:
        load = float(Path("/proc/loadavg").read_text().split()[0])
        waited = time.monotonic() - start
        if load < limit or waited >= max_wait:
            return load, waited
        print(f"bench: load average {load:.2f} >= {limit}; waiting ({waited:.0f}/{max_wait:.0f} s)", flush=True)
        time.sleep(poll)


# ----------------------------------------------------------------------------- verification
KEYS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
# Columns that differ between equally correct runs: numbering of the run, timings, and where the
# run's own output folder was (the saved overlay image).
RUN_STRUCTURE = {"ImageNumber", "Group_Number", "Group_Index", "Group_Length"}
VOLATILE_PREFIXES = ("ExecutionTime_",)
OUTPUT_LOCATION = re.compile(r"^(PathName|URL|ObjectsPathName|ObjectsURL)_(?!(DNA|PH3|cellbody)$)")
REL_TOL = 1e-9


def compared(column: str) -> bool:
    return not (column in RUN_STRUCTURE or column.startswith(VOLATILE_PREFIXES) or OUTPUT_LOCATION.match(column))


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fd:
        reader = csv.reader(fd)
        header = next(reader)
        return header, list(reader)


def read_output(folders: list[Path], table: str) -> tuple[list[str], dict[tuple, list[str]], list[str]]:
    """(compared columns, {key: values}, problems) for one table over the output folders of a run.

    The key is the image set's Metadata (Plate, Well, Site) plus ObjectNumber for object tables:
    the local ImageNumber of each folder is mapped through that folder's own Image table."""
    problems: list[str] = []
    columns: list[str] | None = None
    rows: dict[tuple, list[str]] = {}
    for folder in folders:
        ih, irows = _rows(folder / "Image.csv")
        image_key = {r[ih.index("ImageNumber")]: tuple(r[ih.index(k)] for k in KEYS) for r in irows}
        path = folder / f"{table}.csv"
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        header, body = _rows(path)
        # duplicate names (none with LoadData) keep the first copy
        keep = [i for i, c in enumerate(header) if compared(c) and header.index(c) == i]
        names = [header[i] for i in keep]
        if columns is None:
            columns = names
        elif names != columns:
            problems.append(f"{path}: columns differ from the first folder's "
                            f"(only here: {sorted(set(names) - set(columns))[:5]}, "
                            f"missing: {sorted(set(columns) - set(names))[:5]})")
            continue
        inum = header.index("ImageNumber")
        onum = header.index("ObjectNumber") if "ObjectNumber" in header else None
        for r in body:
            key = image_key.get(r[inum])
            if key is None:
                problems.append(f"{path}: ImageNumber {r[inum]} is not in Image.csv")
                continue
            if onum is not None:
                key = key + (r[onum],)
            if key in rows:
                problems.append(f"{path}: key {key} appears twice")
            rows[key] = [r[i] for i in keep]
    return columns or [], rows, problems


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    if math.isnan(x) and math.isnan(y):
        return True
    return math.isclose(x, y, rel_tol=REL_TOL, abs_tol=1e-12)


def compare_runs(reference: list[Path], other: list[Path], tables: list[str], limit: int = 10) -> tuple[list[str], dict]:
    """Problems (empty = equal) comparing every table of two runs, and what was compared."""
    problems: list[str] = []
    stats = {"tables": {}, "values": 0, "inexact": 0}
    for table in tables:
        rcols, rrows, p1 = read_output(reference, table)
        ocols, orows, p2 = read_output(other, table)
        problems += p1 + p2
        if rcols != ocols:
            problems.append(f"{table}: columns differ (only in reference: {sorted(set(rcols) - set(ocols))[:5]}, "
                            f"only in other: {sorted(set(ocols) - set(rcols))[:5]})")
            continue
        if not rrows:
            problems.append(f"{table}: no rows in the reference")
        missing, extra = rrows.keys() - orows.keys(), orows.keys() - rrows.keys()
        if missing or extra:
            problems.append(f"{table}: {len(missing)} rows missing (e.g. {sorted(missing)[:2]}), "
                            f"{len(extra)} extra (e.g. {sorted(extra)[:2]})")
        differing = 0
        for key in rrows.keys() & orows.keys():
            a, b = rrows[key], orows[key]
            for col, x, y in zip(rcols, a, b):
                stats["values"] += 1
                if x != y:
                    if _same(x, y):
                        stats["inexact"] += 1
                    else:
                        differing += 1
                        if differing <= limit:
                            problems.append(f"{table} {key} {col}: {x!r} != {y!r}")
        if differing > limit:
            problems.append(f"{table}: {differing} differing values in all")
        stats["tables"][table] = {"rows": len(rrows), "columns": len(rcols)}
    return problems, stats


def output_tables(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.csv") if p.stem != "Experiment")


def temp_root(workdir: Path) -> Path:
    if RAMDISK.is_dir() and os.access(RAMDISK, os.W_OK) and " /mnt/bpcp-ramdisk tmpfs " in Path("/proc/mounts").read_text():
        return RAMDISK / f"bpcp-bench-{os.getpid()}"
    return workdir / "tmp"


def cp_line(cp: CP, pipeline: Path, data: Path, out: str, tmp: str, extra: str = "") -> str:
    """A shell command line for one CellProfiler run (out/tmp may hold GNU parallel's {})."""
    return (f"mkdir -p {out} {tmp} && " + " ".join(q(a) for a in cp.argv)
            + f" -c -r -p {q(pipeline)} --data-file {q(data)} -o {out} -t {tmp} {extra}")


def too_busy(args) -> bool:
    """--wait-quiet LOAD: wait (at most --max-wait s) for the load to drop; True (say so, measure
    nothing) when it stayed at LOAD or above and --run-anyway was not given."""
    if not args.wait_quiet:
        return False
    load, waited = wait_for_quiet(args.wait_quiet, args.max_wait)
    print(f"bench: load average {load:.2f} after waiting {waited:.0f} s", flush=True)
    if load >= args.wait_quiet and not args.run_anyway:
        print(f"bench: the machine is still busy (load {load:.2f} >= {args.wait_quiet}); not measuring. "
              "Rerun later, or pass --run-anyway (numbers will be inflated by the other load)", file=sys.stderr)
        return True
    return False
