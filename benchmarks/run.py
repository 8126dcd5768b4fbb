"""Issue 17's table: bpcp (warm CellProfiler workers, one group per job) against the best a person
does by hand on this machine, on a heavy and a light pipeline, every number from one invocation.

    .venv/bin/python benchmarks/run.py --wait-quiet 0.5 [--cellprofiler /opt/cellprofiler/5.0]
        [--heavy-sets 12] [--light-wells 36] [--light-sites 7] [--light-size 128] [--heavy-2016] [--overhead-jobs 500]

Rows, per workload (all with the RAM disk as CellProfiler's temp folder when it is mounted):

  W        one pinned process over all image sets: the work W of efficiency = W / (cores x wall)
  oracle   N = cores pinned processes over N equal shares of the image sets (-f/-l), started
           together, no orchestration: the best a person does by hand here
  naive    GNU parallel -j cores, one unpinned process per image set (light only)
  2016     GNU parallel -j cores, one unpinned process per Plate+Well group (the 2016 tool; on the
           heavy plate only with --heavy-2016, which adds about 2 minutes)
  bpcp     the whole `bpcp run` with its defaults (warm workers, one Plate+Well group per job;
           plan, first-time pipeline probe with an empty BPCP_CACHE, jobs, merge)
  cold     `bpcp run --no-warm-workers` (bundled, one process per job): what warm workers change

The light pipeline is bpcp's example analysis with MeasureObjectSizeShape disabled (about 0.47 s per
image set here: every other module still runs; with it, 0.9-1 s per set whatever the image size).

Then the per-job orchestration overhead: a `bpcp run` of --overhead-jobs one-image-set jobs on tiny
images (the example analysis cut to LoadData, the two IdentifyPrimaryObjects and ExportToSpreadsheet),
where each job's overhead = its GNU parallel joblog runtime minus the CellProfiler span the runner
records in bpcp-job.json (runner start, lock, checks, manifest, publish).

Every run's tables are compared with the W run's (bpcp's merged tables split back per image set by
Metadata; ImageNumber, Group_*, ExecutionTime_* and the overlay's folder left out) before any number
is printed; a difference exits 1 with the differences instead of the table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bpcp.example import PlateSpec, generate_plate
from bpcp.results.joblog import read_joblog

from common import (
    BPCP,
    CP,
    Measured,
    Workload,
    bash,
    compare_runs,
    cp_line,
    joblog_span,
    make_plate,
    measure,
    output_tables,
    q,
    read_loaddata,
    temp_root,
    too_busy,
)

WARM_OFF = ["--no-warm-workers"]


def derive_pipeline(source: Path, target: Path, disabled: set[int]) -> Path:
    """A copy of a .cppipe with the modules numbered in `disabled` switched off (enabled:False)."""
    def switch(match: re.Match) -> str:
        number = int(re.search(r"module_num:(\d+)", match.group(0)).group(1))  # type: ignore[union-attr]
        return match.group(0).replace("enabled:True", "enabled:False") if number in disabled else match.group(0)

    text, count = re.subn(r"^[A-Za-z]+:\[module_num:\d+\|[^\n]*\]$", switch, source.read_text(), flags=re.M)
    if not count:
        raise SystemExit(f"bench: no modules found in {source}")
    target.write_text(text)
    return target


def groups_of(rows: list[dict[str, str]]) -> list[tuple[int, int]]:
    """(first, last) 1-based image set of each Plate+Well group, in LoadData order."""
    spans: list[tuple[int, int]] = []
    last_key = None
    for i, row in enumerate(rows, start=1):
        key = (row["Metadata_Plate"], row["Metadata_Well"])
        if key == last_key:
            spans[-1] = (spans[-1][0], i)
        else:
            spans.append((i, i))
        last_key = key
    return spans


def shares(n: int, parts: int) -> list[tuple[int, int]]:
    """parts contiguous, equal (to one image set) shares of 1..n."""
    size, extra = divmod(n, parts)
    out, first = [], 1
    for k in range(parts):
        last = first + size - 1 + (1 if k < extra else 0)
        if last >= first:
            out.append((first, last))
        first = last + 1
    return out


class Bench:
    """The runs of one workload, measured and kept for verification."""

    def __init__(self, label: str, cp: CP, pipeline: Path, data: Path, runs: Path, tmp: Path, cores: int):
        self.label, self.cp, self.pipeline, self.data = label, cp, pipeline, data
        self.runs, self.tmp, self.cores = runs / label, tmp / label, cores
        self.runs.mkdir(parents=True)
        self.rows = read_loaddata(data)
        self.n = len(self.rows)
        self.results: dict[str, Measured] = {}
        self.outputs: dict[str, list[Path]] = {}

    def report(self, name: str) -> None:
        m = self.results[name]
        print(f"bench: {self.label} {name:7s} wall {m.wall:7.1f} s  cpu {m.cpu:7.1f} s  exit {m.returncode}  "
              f"(load {Path('/proc/loadavg').read_text().split()[0]})", flush=True)
        if m.returncode != 0:
            raise SystemExit(f"bench: {self.label} {name} failed (exit {m.returncode}); see {self.runs / (name + '.log')}")

    def single(self, name: str) -> None:
        out = self.runs / name
        line = cp_line(self.cp, self.pipeline, self.data, q(out), q(self.tmp / name))
        m = measure(name, bash(line), env=self.cp.env(True), log=self.runs / f"{name}.log")
        m.processes = 1
        self.results[name], self.outputs[name] = m, [out]
        self.report(name)

    def oracle(self) -> None:
        """cores pinned processes over equal shares, started together by one shell, no scheduler."""
        parts = shares(self.n, self.cores)
        out = self.runs / "oracle"
        lines = [f"( {cp_line(self.cp, self.pipeline, self.data, q(out / f'{a}-{b}'), q(self.tmp / f'oracle-{a}'), f'-f {a} -l {b}')}"
                 f" ) >{q(self.runs / f'oracle-{a}.log')} 2>&1 &" for a, b in parts]
        script = "\n".join(lines) + "\nfail=0; for p in $(jobs -p); do wait $p || fail=1; done; exit $fail\n"
        m = measure("oracle", bash(script), env=self.cp.env(True), log=self.runs / "oracle.log")
        m.processes = len(parts)
        self.results["oracle"] = m
        self.outputs["oracle"] = [out / f"{a}-{b}" for a, b in parts]
        self.report("oracle")

    def gnu_parallel(self, name: str, ranges: list[tuple[int, int]]) -> None:
        out = self.runs / name
        out.mkdir()
        (self.runs / f"{name}.ranges").write_text("".join(f"{a}\t{b}\n" for a, b in ranges))
        line = cp_line(self.cp, self.pipeline, self.data, q(out) + "/{1}-{2}", q(self.tmp / name) + "/{1}", "-f {1} -l {2}")
        argv = ["parallel", "--will-cite", "--colsep", r"\t", "-j", str(self.cores), "--joblog",
                str(self.runs / f"{name}.joblog"), line, "::::", str(self.runs / f"{name}.ranges")]
        m = measure(name, argv, env=self.cp.env(False), log=self.runs / f"{name}.log")
        m.processes = len(ranges)
        self.results[name], self.outputs[name] = m, sorted(p for p in out.iterdir() if p.is_dir())
        self.report(name)

    def bpcp(self, name: str, spec: str, *extra: str) -> None:
        out = self.runs / name
        argv = [str(BPCP), "run", "--dataset", str(self.data), "--pipeline", str(self.pipeline), "--output", str(out),
                "--cellprofiler", spec, *extra]
        env = {**self.cp.env(False), "BPCP_CACHE": str(self.runs / f"{name}.cache")}   # a first run of this pipeline
        m = measure(name, argv, env=env, log=self.runs / f"{name}.log")
        self.results[name] = m
        self.report(name)
        plan = json.loads((out / "plan.json").read_text())
        m.processes = len(plan["jobs"])
        first, last, _ = joblog_span(out / "joblog.tsv")
        m.notes["jobs_wall"] = last - first
        self.outputs[name] = sorted(p for p in (out / "published").iterdir() if p.is_dir())

    def verify(self) -> dict:
        tables = output_tables(self.outputs["W"][0])
        worst = 0
        stats: dict = {}
        for name in self.results:
            if name == "W":
                continue
            problems, stats = compare_runs(self.outputs["W"], self.outputs[name], tables)
            if problems:
                print(f"bench: {self.label} {name} differs from the W run; no timings printed:", file=sys.stderr)
                for p in problems[:30]:
                    print(f"  {p}", file=sys.stderr)
                raise SystemExit(1)
            worst = max(worst, stats["inexact"])
        print(f"bench: {self.label}: verified {', '.join(k for k in self.results if k != 'W')} equal W on "
              + ", ".join(f"{t} ({v['rows']} rows x {v['columns']} cols)" for t, v in stats["tables"].items())
              + f"; {stats['values']} values per run, at most {worst} equal only within rel. 1e-9", flush=True)
        return stats

    def table(self) -> list[list[str]]:
        W = self.results["W"].wall
        oracle = self.results["oracle"].wall
        rows = []
        for name, m in self.results.items():
            jobs = m.notes.get("jobs_wall")
            rows.append([self.label, name, str(m.processes), f"{m.wall:.1f}", "" if jobs is None else f"{jobs:.1f}",
                         f"{m.cpu:.1f}", f"{m.peak_rss / 2**30:.2f}", f"{W / (self.cores * m.wall):.3f}",
                         f"{oracle / m.wall:.3f}"])
        return rows


def overhead(cp: CP, spec: str, runs: Path, jobs: int) -> dict:
    """Per-job orchestration cost over `jobs` one-image-set jobs: joblog runtime - CellProfiler span."""
    sites = 4
    wells = -(-jobs // sites)
    plate = generate_plate(runs / "overhead-plate", PlateSpec(rows="ABCDEFGHIJKLMNOP"[: -(-wells // 24)],
                                                              columns=min(24, wells), sites=sites, size=64, nuclei=3))
    data = plate / "load_data.csv"
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[: 1 + jobs]))
    out = runs / "overhead"
    pipeline = derive_pipeline(plate / "example_loaddata.cppipe", plate / "identify_only.cppipe", set(range(4, 11)))
    argv = [str(BPCP), "run", "--dataset", str(data), "--pipeline", str(pipeline),
            "--output", str(out), "--cellprofiler", spec,
            "--group-by", "Metadata_Plate,Metadata_Well,Metadata_Site", "--bundle", "0"]
    m = measure("overhead", argv, env={**cp.env(False), "BPCP_CACHE": str(runs / "overhead.cache")},
                log=runs / "overhead.log")
    if m.returncode != 0:
        raise SystemExit(f"bench: the overhead run failed (exit {m.returncode}); see {runs / 'overhead.log'}")
    attempts, _ = read_joblog(out / "joblog.tsv")
    runtime = {a.job: a.runtime for a in attempts if a.ok}
    costs = []
    for folder in (out / "published").iterdir():
        record = json.loads((folder / "bpcp-job.json").read_text())
        job_runtime = runtime.get(record["job"])
        if job_runtime is not None:
            costs.append(job_runtime - (record["finished"] - record["started"]))
    if len(costs) < jobs:
        raise SystemExit(f"bench: only {len(costs)} of {jobs} jobs could be matched to the joblog; see {out}")
    first, last, _ = joblog_span(out / "joblog.tsv")
    return {"jobs": len(costs), "wall": m.wall, "jobs_wall": last - first, "median_ms": 1000 * statistics.median(costs),
            "mean_ms": 1000 * statistics.fmean(costs), "p95_ms": 1000 * sorted(costs)[int(0.95 * len(costs)) - 1]}


def run_all(args: argparse.Namespace) -> int:
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    cp = CP.find(args.cellprofiler)
    t0 = time.monotonic()
    heavy_plate = make_plate(work / "heavy-plate", Workload(image_sets=args.heavy_sets, sites=3, size=1024, nuclei=70))
    light_plate = generate_plate(work / "light-plate", PlateSpec(
        rows="ABCDEFGHIJKLMNOP"[: -(-args.light_wells // 24)], columns=min(24, args.light_wells),
        sites=args.light_sites, size=args.light_size, nuclei=8))
    light_pipeline = derive_pipeline(light_plate / "example_loaddata.cppipe", light_plate / "light.cppipe", {8})
    light_data = light_plate / "load_data.csv"
    want = args.light_wells * args.light_sites
    lines = light_data.read_text().splitlines(keepends=True)
    light_data.write_text("".join(lines[: 1 + want]))
    print(f"bench: CellProfiler {cp.version}; {cores} cores; plates ready in {time.monotonic() - t0:.0f} s", flush=True)
    if too_busy(args):
        return 3
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    runs = work / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir()
    tmp = temp_root(work)
    t1 = time.monotonic()
    benches = []
    try:
        heavy = Bench("heavy", cp, heavy_plate / "measure_heavy.cppipe", heavy_plate / "load_data.csv", runs, tmp, cores)
        light = Bench("light", cp, light_pipeline, light_data, runs, tmp, cores)
        for b in (heavy, light):
            b.single("W")
            b.oracle()
            if b is light:
                b.gnu_parallel("naive", [(i, i) for i in range(1, b.n + 1)])
            if b is light or args.heavy_2016:
                b.gnu_parallel("2016", groups_of(b.rows))
            b.bpcp("bpcp", args.cellprofiler)
            if args.with_cold:
                b.bpcp("cold", args.cellprofiler, *WARM_OFF)
            benches.append(b)
        over = overhead(cp, args.cellprofiler, runs, args.overhead_jobs)
        print(f"bench: overhead run of {over['jobs']} jobs: wall {over['wall']:.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    measured_s = time.monotonic() - t1
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    for b in benches:
        b.verify()

    print()
    for b in benches:
        W = b.results["W"].wall
        print(f"{b.label}: {b.n} image sets in {len(groups_of(b.rows))} Plate+Well groups, {b.pipeline.name}; "
              f"W = {W:.1f} s ({W / b.n:.2f} s per image set)")
    print(f"CellProfiler {cp.version}, {cores} cores; load average (1, 5, 15 min) before {' '.join(load_before)}, "
          f"after {' '.join(load_after)}; measuring took {measured_s / 60:.1f} min")
    print()
    header = ["plate", "run", "procs/jobs", "wall s", "jobs s", "CPU s", "peak RSS GiB", "efficiency", "oracle/wall"]
    table = [row for b in benches for row in b.table()]
    widths = [max(len(r[i]) for r in table + [header]) for i in range(len(header))]
    for r in [header] + table:
        print("  ".join(c.ljust(wd) if i < 2 else c.rjust(wd) for i, (c, wd) in enumerate(zip(r, widths))))
    print()
    print(f"per-job orchestration overhead over {over['jobs']} one-image-set jobs (joblog runtime - CellProfiler span): "
          f"median {over['median_ms']:.0f} ms, mean {over['mean_ms']:.0f} ms, p95 {over['p95_ms']:.0f} ms")
    print()
    h, li = heavy.results, light.results
    targets = [
        ("heavy: whole bpcp run >= 0.98 of the oracle", h["oracle"].wall / h["bpcp"].wall, 0.98),
        ("light: bpcp jobs phase >= 0.95 of the oracle", li["oracle"].wall / li["bpcp"].notes["jobs_wall"], 0.95),
        ("light: whole bpcp run >= 0.90 of the oracle", li["oracle"].wall / li["bpcp"].wall, 0.90),
        ("light: bpcp >= 1.5x the 2016 per-well way", li["2016"].wall / li["bpcp"].wall, 1.5),
        ("light: bpcp >= 3x naive per image set", li["naive"].wall / li["bpcp"].wall, 3.0),
    ]
    for label, value, goal in targets:
        print(f"target {label:48s} {value:6.3f}  {'met' if value >= goal else 'MISSED'}")
    summary = {b.label: {name: {"wall": m.wall, "cpu": m.cpu, "peak_rss": m.peak_rss, "processes": m.processes, **m.notes}
                         for name, m in b.results.items()} for b in benches}
    summary.update({"overhead": over, "cores": cores, "cellprofiler": cp.version,
                    "load_before": load_before, "load_after": load_after, "measuring_s": measured_s})
    (work / "warm-results.json").write_text(json.dumps(summary, indent=1))
    print(f"\nbench: done in {time.monotonic() - t0:.0f} s; raw numbers in {work / 'warm-results.json'}, runs in {runs}")
    return 0 if all(value >= goal for _, value, goal in targets) else 4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cellprofiler", default="/opt/cellprofiler/5.0")
    p.add_argument("--heavy-sets", type=int, default=12, help="image sets of the measure-heavy plate (3 per well)")
    p.add_argument("--heavy-2016", action="store_true", help="also time the 2016 per-well way on the heavy plate")
    p.add_argument("--light-wells", type=int, default=36)
    p.add_argument("--light-sites", type=int, default=7, help="image sets per well of the light plate")
    p.add_argument("--light-size", type=int, default=128, help="image width and height of the light plate, px")
    p.add_argument("--overhead-jobs", type=int, default=500)
    p.add_argument("--with-cold", action="store_true", help="also time `bpcp run --no-warm-workers` on both plates")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bpcp-bench-run"))
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="LOAD",
                   help="first wait until the 1-minute load average is below LOAD (0 = do not wait)")
    p.add_argument("--max-wait", type=float, default=1200.0, help="give up waiting after this many seconds")
    p.add_argument("--run-anyway", action="store_true", help="measure even if the load stayed above --wait-quiet")
    return run_all(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
