"""bpcp against the other ways of running CellProfiler in parallel, measured side by side.

    .venv/bin/python benchmarks/bundles.py [--image-sets 24] [--size 1024] [--sites 3] [--nuclei 70]
                                       [--cellprofiler /opt/cellprofiler/5.0] [--workdir /tmp/bpcp-bench]

Generates a plate (bpcp.example at 1024x1024, 3 channels) and runs the measurement-heavy pipeline
(benchmarks/data/measure_heavy.cppipe) over it with real CellProfiler, in this order:

  W        one pinned (single-threaded) process over all image sets: the work W of efficiency
  serial   one unpinned process over all image sets: the speed-up baseline            (a)
  naive    GNU parallel, one unpinned process per image set (-f i -l i), all cores     (b)
  2016     GNU parallel, one unpinned process per Plate+Well group, all cores      (c)
  bpcp     `bpcp run` with its defaults (plan, jobs, merge: the whole command)         (d)
           (--bundle auto: about one job per core, here image sets / cores per job)
  group    `bpcp run --bundle 0`: one job per Plate+Well group, pinned (--with-group)   (e)
  1-set    one pinned process over one image set: start-up = this - W/n, roughly

All runs use the RAM disk for CellProfiler's temp folder when it is mounted (bpcp's default), so
only the way of splitting and pinning differs. Every run's tables are compared with the serial
run's (Image and object tables keyed on Metadata Plate/Well/Site and ObjectNumber; ImageNumber,
Group_*, ExecutionTime_* and the saved overlay's location excluded) before any number is printed;
a difference exits 1 with the differences instead of the table.

efficiency = W / (cores x wall); speed-up = serial wall / wall.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
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

# The issue's figures (2 cores, about 9 s per image set, 24 image sets, CellProfiler 5.x).
ISSUE = {"serial": 208, "naive": 155, "2016": 137, "bpcp": 113}   # bpcp: 2 pinned x 12 sets


def run_all(args: argparse.Namespace) -> int:
    w = Workload(image_sets=args.image_sets, sites=args.sites, size=args.size, nuclei=args.nuclei)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    cp = CP.find(args.cellprofiler)
    t0 = time.monotonic()
    plate = make_plate(work / "plate", w)
    pipeline, data = plate / "measure_heavy.cppipe", plate / "load_data.csv"
    rows = read_loaddata(data)
    n = len(rows)
    wells: list[tuple[int, int]] = []          # (first, last) 1-based image set of each group
    for i, row in enumerate(rows, start=1):
        key = (row["Metadata_Plate"], row["Metadata_Well"])
        if wells and (rows[wells[-1][0] - 1]["Metadata_Plate"], rows[wells[-1][0] - 1]["Metadata_Well"]) == key:
            wells[-1] = (wells[-1][0], i)
        else:
            wells.append((i, i))
    print(f"bench: {n} image sets in {len(wells)} Plate+Well groups, {w.size}x{w.size} px, {w.nuclei} nuclei per "
          f"image; CellProfiler {cp.version}; {cores} cores; plate ready in {time.monotonic() - t0:.0f} s", flush=True)
    if too_busy(args):
        return 3
    load_before = Path("/proc/loadavg").read_text().split()[:3]

    runs = work / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir()
    tmp = temp_root(work)
    results: dict[str, Measured] = {}
    outputs: dict[str, list[Path]] = {}

    def single(name: str, pinned: bool, extra: str = "") -> None:
        out = runs / name
        m = measure(name, bash(cp_line(cp, pipeline, data, q(out), q(tmp / name), extra)),
                    env=cp.env(pinned), log=runs / f"{name}.log")
        m.processes = 1
        results[name], outputs[name] = m, [out]

    def gnu_parallel(name: str, ranges: list[tuple[int, int]]) -> None:
        out = runs / name
        out.mkdir()
        (runs / f"{name}.ranges").write_text("".join(f"{a}\t{b}\n" for a, b in ranges))
        line = cp_line(cp, pipeline, data, q(out) + "/{1}-{2}", q(tmp / name) + "/{1}", "-f {1} -l {2}")
        argv = ["parallel", "--will-cite", "--colsep", r"\t", "-j", str(cores), "--joblog", str(runs / f"{name}.joblog"),
                line, "::::", str(runs / f"{name}.ranges")]
        m = measure(name, argv, env=cp.env(False), log=runs / f"{name}.log")
        m.processes = len(ranges)
        results[name], outputs[name] = m, sorted(p for p in out.iterdir() if p.is_dir())

    def bpcp(name: str, *extra: str) -> None:
        out = runs / name
        argv = [str(BPCP), "run", "--dataset", str(data), "--pipeline", str(pipeline), "--output", str(out),
                "--cellprofiler", args.cellprofiler, *extra]
        # an empty probe cache: time what a first `bpcp run` of a new pipeline costs
        env = {**cp.env(False), "BPCP_CACHE": str(runs / f"{name}.cache")}
        m = measure(name, argv, env=env, log=runs / f"{name}.log")
        plan = json.loads((out / "plan.json").read_text())
        m.processes = len(plan["jobs"])
        first, last, _ = joblog_span(out / "joblog.tsv")
        m.notes["jobs_wall"] = last - first
        results[name], outputs[name] = m, sorted(p for p in (out / "published").iterdir() if p.is_dir())

    steps = [
        ("W", lambda: single("W", pinned=True)),
        ("serial", lambda: single("serial", pinned=False)),
        ("naive", lambda: gnu_parallel("naive", [(i, i) for i in range(1, n + 1)])),
        ("2016", lambda: gnu_parallel("2016", wells)),
        ("bpcp", lambda: bpcp("bpcp")),
        ("1-set", lambda: single("1-set", pinned=True, extra="-f 1 -l 1")),
    ]
    if args.with_group:
        steps.insert(5, ("group", lambda: bpcp("group", "--bundle", "0")))
    try:
        for name, step in steps:
            step()
            m = results[name]
            print(f"bench: {name:7s} wall {m.wall:7.1f} s  cpu {m.cpu:7.1f} s  exit {m.returncode}  "
                  f"(load {Path('/proc/loadavg').read_text().split()[0]})", flush=True)
            if m.returncode != 0:
                print(f"bench: {name} failed (exit {m.returncode}); see {runs / (name + '.log')}", file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    # ---- verify before printing any number
    tables = output_tables(outputs["serial"][0])
    verified = {}
    for name in [k for k in ("W", "naive", "2016", "bpcp", "group") if k in results]:
        problems, stats = compare_runs(outputs["serial"], outputs[name], tables)
        if problems:
            print(f"bench: {name} differs from the serial run; no timings printed:", file=sys.stderr)
            for p in problems[:30]:
                print(f"  {p}", file=sys.stderr)
            return 1
        verified[name] = stats
    s = verified["bpcp"]
    print(f"bench: verified: {', '.join(verified)} equal the serial run on "
          + ", ".join(f"{t} ({v['rows']} rows x {v['columns']} cols)" for t, v in s["tables"].items())
          + f"; {s['values']} values per run, {max(v['inexact'] for v in verified.values())} equal only within "
            f"rel. 1e-9", flush=True)

    W = results["W"].wall
    serial = results["serial"].wall
    one = results["1-set"].wall
    per_set = (W - one) / (n - 1) if n > 1 else float("nan")
    startup = one - per_set
    print()
    print(f"Workload: {n} image sets ({len(wells)} groups of {w.sites}), {w.size}x{w.size} px x 3 channels, "
          f"{w.nuclei} nuclei/image, measure_heavy.cppipe, CellProfiler {cp.version}, {cores} cores")
    print(f"W = {W:.1f} s (one pinned process, {W / n:.2f} s per image set); start-up per process about "
          f"{startup:.1f} s, then {per_set:.2f} s per image set (from the 1-set run, {one:.1f} s)")
    print(f"load average (1, 5, 15 min): before {' '.join(load_before)}, after {' '.join(load_after)}")
    print()
    header = ["run", "what", "procs", "wall s", "CPU s", "peak RSS GiB", "max proc GiB", "efficiency", "speed-up", "start-ups s/core", "issue s"]
    what = {
        "serial": "one unpinned process (a)",
        "naive": f"parallel -j{cores}, 1 set/process, unpinned (b)",
        "2016": f"parallel -j{cores}, 1 well/process, unpinned (c)",
        "bpcp": "bpcp run, defaults (d)",
        "group": "bpcp run --bundle 0 (1 well/job)",
        "W": "one pinned process (W)",
    }
    table = []
    for name in [k for k in ("serial", "naive", "2016", "bpcp", "group", "W") if k in results]:
        m = results[name]
        table.append([name, what[name], str(m.processes), f"{m.wall:.1f}", f"{m.cpu:.1f}",
                      f"{m.peak_rss / 2**30:.2f}", f"{m.max_process_rss / 2**30:.2f}",
                      f"{W / (cores * m.wall):.3f}", f"{serial / m.wall:.2f}x",
                      f"{m.processes * startup / min(cores, m.processes):.1f}", str(ISSUE.get(name, ""))])
    widths = [max(len(r[i]) for r in table + [header]) for i in range(len(header))]
    for r in [header] + table:
        print("  ".join(c.ljust(wd) if i < 2 else c.rjust(wd) for i, (c, wd) in enumerate(zip(r, widths))))
    print()
    b, naive, old = (results[k].wall for k in ("bpcp", "naive", "2016"))
    for name in [k for k in ("bpcp", "group") if k in results]:
        m = results[name]
        print(f"{name}: jobs phase (joblog, first start to last end) {m.notes['jobs_wall']:.1f} s, "
              f"efficiency over it {W / (cores * m.notes['jobs_wall']):.3f}; plan + render + merge "
              f"{m.wall - m.notes['jobs_wall']:.1f} s")
    print()
    targets = [
        ("bpcp defaults: efficiency >= 0.93", W / (cores * b), 0.93),
        ("bpcp defaults: >= 1.3x faster than naive", naive / b, 1.3),
        ("bpcp defaults: >= 1.2x faster than 2016", old / b, 1.2),
    ]
    for label, value, want in targets:
        print(f"target {label:45s} {value:6.3f}  {'met' if value >= want else 'MISSED'}")
    summary = {name: {"wall": m.wall, "cpu": m.cpu, "peak_rss": m.peak_rss, "max_process_rss": m.max_process_rss,
                      "processes": m.processes, **m.notes} for name, m in results.items()}
    summary.update({"_W": W, "_cores": cores, "_image_sets": n, "_startup": startup, "_per_set": per_set,
                    "_load_before": load_before, "_load_after": load_after, "_cellprofiler": cp.version,
                    "_workload": w.__dict__})
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\nbench: done in {time.monotonic() - t0:.0f} s; raw numbers in {work / 'results.json'}, runs in {runs}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-sets", type=int, default=24)
    p.add_argument("--with-group", action="store_true",
                   help="also time `bpcp run --bundle 0` (one job per Plate+Well group; a few more minutes)")
    p.add_argument("--sites", type=int, default=3, help="image sets per well (Plate+Well group)")
    p.add_argument("--size", type=int, default=1024, help="image width and height, px")
    p.add_argument("--nuclei", type=int, default=70, help="nuclei per image")
    p.add_argument("--cellprofiler", default="/opt/cellprofiler/5.0")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bpcp-bench"))
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="LOAD",
                   help="first wait until the 1-minute load average is below LOAD (0 = do not wait)")
    p.add_argument("--max-wait", type=float, default=1200.0, help="give up waiting after this many seconds")
    p.add_argument("--run-anyway", action="store_true", help="measure even if the load stayed above --wait-quiet")
    return run_all(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
