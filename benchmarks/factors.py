"""What moves the numbers: each factor measured by changing only it, with real CellProfiler and
GNU parallel through bpcp's own job script.

    .venv/bin/python benchmarks/factors.py [--image-sets 8] [--size 1024] [--only pin,bundle,order,tmp,merge]

  pin     one thread per process (default) vs --no-pin-threads, both one job per well (--bundle 0)
  bundle  one job per Plate+Well group (--bundle 0) vs --bundle auto (default: about one job per core)
  order   an uneven plan (one well of 6 sites, six wells of 1): jobs.sh with bpcp's longest-first
          joblist vs the same joblist reversed (shortest first)
  tmp     --tmp-root on the RAM disk (default when mounted) vs on disk ('')
  merge   bpcp.results.merge.merge_run on synthetic run folders of 10, 100, 1000 jobs built from one real
          published job (benchmarks/merge_bench.py build), seconds per table and in all

Jobs-phase time is GNU parallel's (joblog: first start to last end); "bpcp run" time adds plan
and render. Runs of one factor are measured back to back; --repeat N alternates them N times.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BPCP, CP, Workload, joblog_span, make_plate, measure, wait_for_quiet


def bpcp_run(name: str, runs: Path, data: Path, pipeline: Path, cp_spec: str, *extra: str) -> dict:
    out = runs / name
    if out.exists():
        shutil.rmtree(out)
    argv = [str(BPCP), "run", "--dataset", str(data), "--pipeline", str(pipeline), "--output", str(out),
            "--cellprofiler", cp_spec, "--no-merge", *extra]
    m = measure(name, argv, log=runs / f"{name}.log")
    if m.returncode != 0:
        raise SystemExit(f"factors: {name} failed (exit {m.returncode}); see {runs / (name + '.log')}")
    first, last, times = joblog_span(out / "joblog.tsv")
    return {"run": m.wall, "jobs": last - first, "cpu": m.cpu, "peak_rss": m.peak_rss, "n_jobs": len(times)}


def jobs_script(name: str, runs: Path, data: Path, pipeline: Path, cp_spec: str, reverse: bool) -> dict:
    """plan + render, optionally reverse joblist.tsv, then time `bash jobs.sh` alone."""
    out = runs / name
    if out.exists():
        shutil.rmtree(out)
    for step in (["plan", "--dataset", str(data), "--pipeline", str(pipeline), "--cellprofiler", cp_spec,
                  "--bundle", "0"],
                 ["render", "--cellprofiler", cp_spec]):
        m = measure(name, [str(BPCP), step[0], "--output", str(out), *step[1:]], log=runs / f"{name}.{step[0]}.log")
        if m.returncode != 0:
            raise SystemExit(f"factors: bpcp {step[0]} for {name} failed; see {runs}/{name}.{step[0]}.log")
    joblist = out / "joblist.tsv"
    lines = joblist.read_text().splitlines(keepends=True)
    if reverse:
        joblist.write_text("".join(reversed(lines)))
    m = measure(name, ["bash", str(out / "jobs.sh")], log=runs / f"{name}.log")
    if m.returncode != 0:
        raise SystemExit(f"factors: {name} failed; see {runs / (name + '.log')}")
    first, last, times = joblog_span(out / "joblog.tsv")
    return {"run": m.wall, "jobs": last - first, "cpu": m.cpu, "peak_rss": m.peak_rss, "n_jobs": len(times),
            "order": [l.split("\t")[1].strip() for l in (reversed(lines) if reverse else lines)]}


def uneven_plate(plate: Path) -> Path:
    """load_data_uneven.csv: rows 1-6 stay in their well, rows 7-12 get a well each (A91..A96)."""
    rows = list(csv.DictReader(open(plate / "load_data.csv", newline="")))
    if len(rows) < 12:
        raise SystemExit("factors: the order factor needs --image-sets >= 12")
    rows = rows[:12]
    first_well = rows[0]["Metadata_Well"]
    for i, row in enumerate(rows):
        row["Metadata_Well"] = first_well if i < 6 else f"A{90 + i - 5:02d}"
    path = plate / "load_data_uneven.csv"
    with open(path, "w", newline="") as fd:
        w = csv.DictWriter(fd, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def merge_scaling(source_run: Path, work: Path, sizes: list[int]) -> list[dict]:
    from merge_bench import build

    from bpcp.results.merge import merge_run

    source = sorted((source_run / "published").iterdir())[0]
    results = []
    for jobs in sizes:
        out = work / f"merge-{jobs}"
        if out.exists():
            shutil.rmtree(out)
        build(source, jobs, 1, out)
        t = time.monotonic()
        result = merge_run(out, compartments=None)
        seconds = time.monotonic() - t
        rows = sum(r.rows for r in result.tables.values())
        results.append({"jobs": jobs, "seconds": seconds, "rows": rows,
                        "per_table": {k: round(v.seconds, 2) for k, v in result.tables.items()}})
        print(f"factors: merge of {jobs} jobs ({rows} rows): {seconds:.1f} s", flush=True)
        shutil.rmtree(out)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-sets", type=int, default=12)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--nuclei", type=int, default=70)
    p.add_argument("--cellprofiler", default="/opt/cellprofiler/5.0")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bpcp-factors"))
    p.add_argument("--only", default="pin,bundle,order,tmp,merge")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--merge-jobs", default="10,100,1000")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="LOAD")
    p.add_argument("--max-wait", type=float, default=1200.0)
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    cp = CP.find(args.cellprofiler)
    w = Workload(image_sets=args.image_sets, sites=args.sites, size=args.size, nuclei=args.nuclei)
    plate = make_plate(work / "plate", w)
    data, pipeline = plate / "load_data.csv", plate / "measure_heavy.cppipe"
    runs = work / "runs"
    runs.mkdir(exist_ok=True)
    if args.wait_quiet:
        load, waited = wait_for_quiet(args.wait_quiet, args.max_wait)
        print(f"factors: load average {load:.2f} after waiting {waited:.0f} s", flush=True)
    print(f"factors: {w.image_sets} image sets, {w.size} px, CellProfiler {cp.version}, {cores} cores; "
          f"load {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    bundle = math.ceil(w.image_sets / cores)
    pairs = {
        "pin": [("pinned (default)", lambda n: bpcp_run(n, runs, data, pipeline, args.cellprofiler, "--bundle", "0")),
                ("unpinned", lambda n: bpcp_run(n, runs, data, pipeline, args.cellprofiler, "--bundle", "0",
                                                "--no-pin-threads"))],
        "bundle": [(f"per well ({w.sites} sets)", lambda n: bpcp_run(n, runs, data, pipeline, args.cellprofiler,
                                                                    "--bundle", "0")),
                   (f"auto ({bundle} sets)", lambda n: bpcp_run(n, runs, data, pipeline, args.cellprofiler))],
        "tmp": [("RAM disk", lambda n: bpcp_run(n, runs, data, pipeline, args.cellprofiler,
                                                "--tmp-root", "/mnt/bpcp-ramdisk")),
                ("disk", lambda n: bpcp_run(n, runs, data, pipeline, args.cellprofiler, "--tmp-root", ""))],
    }
    if "order" in only:
        uneven = uneven_plate(plate)
        pairs["order"] = [("longest first", lambda n: jobs_script(n, runs, uneven, pipeline, args.cellprofiler, False)),
                          ("shortest first", lambda n: jobs_script(n, runs, uneven, pipeline, args.cellprofiler, True))]
    results: dict[str, dict[str, list[dict]]] = {}
    for factor in ("pin", "bundle", "order", "tmp"):
        if factor not in only or factor not in pairs:
            continue
        results[factor] = {}
        for r in range(args.repeat):
            for label, fn in pairs[factor] if r % 2 == 0 else reversed(pairs[factor]):
                slug = f"{factor}-{label.split()[0].strip('-(')}-{r}"
                res = fn(slug)
                results[factor].setdefault(label, []).append(res)
                print(f"factors: {factor:6s} {label:20s} jobs phase {res['jobs']:6.1f} s, bpcp {res['run']:6.1f} s, "
                      f"CPU {res['cpu']:6.1f} s ({res['n_jobs']} jobs; load {Path('/proc/loadavg').read_text().split()[0]})",
                      flush=True)
    merge = (merge_scaling(_any_run(runs, work, args), work, [int(x) for x in args.merge_jobs.split(",")])
             if "merge" in only else [])

    print()
    print(f"{'factor':8s} {'variant':22s} {'jobs phase s':>12s} {'bpcp s':>8s} {'CPU s':>8s} {'jobs':>5s}  vs first")
    for factor, variants in results.items():
        base = None
        for label, items in variants.items():
            jobs = statistics.median(i["jobs"] for i in items)
            run = statistics.median(i["run"] for i in items)
            cpu = statistics.median(i["cpu"] for i in items)
            base = base or jobs
            print(f"{factor:8s} {label:22s} {jobs:12.1f} {run:8.1f} {cpu:8.1f} {items[0]['n_jobs']:5d}  {jobs / base:6.2f}x")
    if merge:
        print()
        print(f"{'merge jobs':>10s} {'rows':>9s} {'seconds':>8s} {'ms/job':>7s}  per table (s)")
        for m in merge:
            print(f"{m['jobs']:>10d} {m['rows']:>9d} {m['seconds']:>8.1f} {1000 * m['seconds'] / m['jobs']:>7.1f}  "
                  + ", ".join(f"{k} {v}" for k, v in m["per_table"].items()))
    (work / "factors.json").write_text(json.dumps({"results": results, "merge": merge,
                                                   "load": Path("/proc/loadavg").read_text().split()[:3]}, indent=1))
    print(f"\nfactors: raw numbers in {work / 'factors.json'}")
    return 0


def _any_run(runs: Path, work: Path, args) -> Path:
    """A finished bpcp run folder to take a published job from (runs one small job if none)."""
    for d in sorted(runs.iterdir()):
        if (d / "published").is_dir() and any((d / "published").iterdir()):
            return d
    plate = work / "plate"
    bpcp_run("merge-source", runs, plate / "load_data.csv", plate / "measure_heavy.cppipe", args.cellprofiler,
             "--only", "Well=" + next(csv.DictReader(open(plate / "load_data.csv")))["Metadata_Well"])
    return runs / "merge-source"


if __name__ == "__main__":
    sys.exit(main())
