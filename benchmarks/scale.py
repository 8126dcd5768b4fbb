"""Scale on paper: predicted wall time and efficiency of a 4-plate Cell Painting run on 1, 4 and
16 hosts of 96 cores.

    .venv/bin/python benchmarks/scale.py [--per-site-min 20] [--startup 30] [--start-rate 5] [--seed 1]

Plan: 4 plates x 384 wells x 9 sites = 13,824 image sets, one job per Plate+Well (1,536 jobs of 9),
or one per site (13,824 jobs of 1) for comparison, each with fresh processes ("cold": every job
pays the start-up) and with warm workers ("warm": one resident CellProfiler per slot pays it once
per --worker-jobs jobs, as bpcp run does by default). Per-site time is drawn from a log-normal with
median --per-site-min minutes (sigma 0.5, clipped to 10-120 min: "per-site jobs take 10-120 min",
profiling handbook), each job pays --startup seconds (CellProfiler start-up, Bio-Formats, staging
its images), and ~3.75 GB per process (Distributed-CellProfiler's reference: 4 processes in
15,000 MB) decides the slots a host's memory allows (bpcp.sizing.slots.slot_limits).

Scheduling is list scheduling as GNU parallel does it: each job starts on the slot that frees
first. Orders: "plan" = bpcp's real order (longest first by image sets; all jobs have 9 sets, so
in effect arbitrary with respect to their true time), "oracle" = longest first by true time
(what a per-job profile would give). The controller starts jobs over SSH one after the other:
--start-rate jobs per second at most (ssh + --transferfile per job). With an infinite rate and
the oracle order this is exactly bpcp.sizing.estimate.simulate, which the script checks.

W = sum of job times (single-threaded, on a dedicated core); efficiency = W / (cores x wall).

The controller's numbers default to what benchmarks/fanout.py measured (benchmarks/results/
fanout.json): --controller-cpu its CPU s per job, --start-rate the jobs/s one core of it pays for
(1 / that; the fan-out's own jobs/s were bound by workers sharing its cores); the output says when
the controller, not the slots, sets the pace.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bpcp.jobs.runner import WORKER_JOBS
from bpcp.sizing.estimate import Model, simulate
from bpcp.sizing.slots import GIB, slot_limits

PLATES, WELLS, SITES = 4, 384, 9
CORES = 96
RSS = int(3.75e9)
FANOUT = Path(__file__).resolve().parent / "results" / "fanout.json"


def controller_numbers(path: Path = FANOUT) -> dict:
    """benchmarks/fanout.py's measured controller (jobs_per_s, cpu_s_per_job, ...); {} before it ran."""
    try:
        found = json.loads(path.read_text())
        return {**found["controller"], "date": found.get("date", "?"), "command": found.get("command", "?")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def job_times(per_site: list[float], per_job: int, startup: float) -> list[float]:
    return [startup + sum(per_site[i:i + per_job]) for i in range(0, len(per_site), per_job)]


def schedule(times: list[float], slots: int, start_rate: float, startup: float = 0.0, warm_jobs: int = 0) -> dict:
    """List scheduling over `slots` slots in the given order; the controller starts at most
    start_rate jobs per second. times exclude the start-up, which each job pays (warm_jobs 0) or
    each slot's warm worker once per warm_jobs jobs. Returns makespan, busy time, last start, the
    ramp-up and the start-ups paid."""
    heap = [(0.0, slot) for slot in range(slots)]
    heapq.heapify(heap)
    gap = 1.0 / start_rate if start_rate and math.isfinite(start_rate) else 0.0
    next_start = busy = last_start = 0.0
    ends = []
    done = [0] * slots
    startups = 0
    for t in times:
        free, slot = heapq.heappop(heap)
        if warm_jobs <= 0 or done[slot] % warm_jobs == 0:
            t += startup
            startups += 1
        done[slot] += 1
        start = max(free, next_start)
        next_start = start + gap
        last_start = max(last_start, start)
        busy += t
        heapq.heappush(heap, (start + t, slot))
        ends.append(start + t)
    makespan = max(ends)
    return {"makespan": makespan, "busy": busy, "last_start": last_start,
            "ramp": min(slots, len(times)) * gap, "startups": startups}


def fmt_h(seconds: float) -> str:
    return f"{seconds / 3600:6.2f} h"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-site-min", type=float, default=20.0, help="median minutes per site (image set)")
    p.add_argument("--sigma", type=float, default=0.5, help="log-normal sigma of per-site time")
    p.add_argument("--startup", type=float, default=30.0, help="seconds per job before its first image set")
    ctl = controller_numbers()
    p.add_argument("--start-rate", type=float, default=ctl.get("cpu_bound_jobs_per_s_per_core") or 5.0,
                   help="jobs the controller can start per second (default: one core's by benchmarks/fanout.py, else 5)")
    p.add_argument("--controller-cpu", type=float, default=ctl.get("cpu_s_per_job", 0.0),
                   help="controller CPU s per job (default: benchmarks/fanout.py's)")
    p.add_argument("--mem-gib", type=float, default=384.0, help="memory per host (m6i/m7i.24xlarge: 384)")
    p.add_argument("--worker-jobs", type=int, default=WORKER_JOBS, help="jobs per warm worker (bpcp's default)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    rng = random.Random(args.seed)
    n_sets = PLATES * WELLS * SITES
    per_site = [min(120 * 60, max(10 * 60, args.per_site_min * 60 * math.exp(rng.gauss(0, args.sigma))))
                for _ in range(n_sets)]
    by_cpu, by_mem = slot_limits(CORES, int(args.mem_gib * GIB), 0, RSS, 1.0)
    slots_per_host = min(by_cpu, by_mem)

    # cross-check against the sizing helper's simulator (unit sizes of 1 s, no start-up: exact)
    check = job_times(per_site, SITES, args.startup)
    ours = schedule(sorted(check, reverse=True), 2 * slots_per_host, float("inf"))["makespan"]
    theirs = simulate([round(t) for t in check], [(slots_per_host, 1.0)] * 2, Model(0, 1, 0, 1, 1, overhead=0)).makespan
    assert abs(ours - theirs) <= 2 * SITES, (ours, theirs)   # only rounding to whole seconds differs
    # and with warm workers: start-ups once per slot per --worker-jobs, the same in both models
    warm = schedule([float(n) for n in range(50, 0, -1)], 4, float("inf"), args.startup, args.worker_jobs)
    model = Model(args.startup, 1, args.startup, 1, 1, overhead=0, warm_jobs=args.worker_jobs)
    paper = simulate(list(range(50, 0, -1)), [(4, 1.0)], model)
    assert abs(warm["makespan"] - paper.makespan) < 1e-6 and warm["startups"] == paper.startups, (warm, paper)

    print(f"Plan: {PLATES} plates x {WELLS} wells x {SITES} sites = {n_sets} image sets; per site median "
          f"{args.per_site_min:.0f} min (log-normal sigma {args.sigma}, 10-120 min; mean {sum(per_site) / n_sets / 60:.1f} min, "
          f"max {max(per_site) / 60:.0f} min); start-up {args.startup:.0f} s per job; controller starts at most "
          f"{args.start_rate:g} jobs/s")
    print(f"Hosts: {CORES} cores, {args.mem_gib:.0f} GiB; {RSS / 1e9:.2f} GB per process -> {by_mem} slots by memory, "
          f"{by_cpu} by cores: {slots_per_host} slots per host. (bpcp.sizing.estimate.simulate agrees: {theirs / 3600:.2f} h "
          f"vs {ours / 3600:.2f} h on 2 hosts)")
    print()
    head = f"{'hosts':>5} {'cores':>5} {'slots':>5} {'grouping':>16} {'jobs':>6} {'order':>6} {'W core-h':>9} " \
           f"{'wall':>9} {'eff.':>6} {'busy':>6} {'after last start':>16} {'ramp-up':>8}"
    print(head)
    print("-" * len(head))
    rows = []
    for hosts in (1, 4, 16):
        slots = hosts * slots_per_host
        for label, per_job, warm_jobs in (("Plate+Well (9)", SITES, 0), ("Plate+Well+Site", 1, 0),
                                          ("Site, warm", 1, args.worker_jobs)):
            times = job_times(per_site, per_job, 0.0)
            W = sum(times) + args.startup   # one process over everything
            for order in ("plan", "oracle"):
                ordered = times if order == "plan" else sorted(times, reverse=True)
                s = schedule(ordered, slots, args.start_rate, args.startup, warm_jobs)
                eff = W / (hosts * CORES * s["makespan"])
                busy = s["busy"] / (slots * s["makespan"])
                rows.append((hosts, label, order, s, eff))
                print(f"{hosts:>5} {hosts * CORES:>5} {slots:>5} {label:>16} {len(times):>6} {order:>6} "
                      f"{W / 3600:>9.0f} {fmt_h(s['makespan']):>9} {eff:>6.3f} {busy:>6.3f} "
                      f"{fmt_h(s['makespan'] - s['last_start']):>16} {s['ramp']:>7.0f}s")
    print()
    print("What limits it:")
    print(f"- 1 host: {slots_per_host * 1} slots for {PLATES * WELLS} jobs: many rounds, the tail is a small share; "
          f"efficiency is W over cores, so slots < cores (memory: {by_mem} x {RSS / 1e9:.2f} GB) or start-up would be "
          f"the only losses.")
    jobs16 = PLATES * WELLS
    print(f"- 16 hosts: {16 * slots_per_host} slots for {jobs16} well jobs ({jobs16 / (16 * slots_per_host):.2f} rounds): "
          f"the wall time is set by the last, longest wells (9 sites of up to 120 min) while most slots have gone "
          f"idle -> the tail dominates. Per-site jobs (13,824, 9x the start-ups) cut it; so would longest-first by "
          f"true time (oracle), which needs per-job time estimates bpcp does not have (it orders by image sets).")
    print(f"- Warm workers ({args.worker_jobs} jobs each): one site per job pays {args.startup:.0f} s of start-up "
          f"{math.ceil(PLATES * WELLS * SITES / (16 * slots_per_host) / args.worker_jobs)} time(s) per slot instead of "
          f"once per job, so per-site jobs keep their short tail without the 13,824 start-ups; what is left is the "
          f"tail of the longest sites and, on 16 hosts, the SSH start rate.")
    print(f"- SSH fan-out: at {args.start_rate:g} jobs/s the controller needs {16 * slots_per_host / args.start_rate:.0f} s "
          f"to fill 16 hosts once; negligible against jobs of hours, but it bounds per-site jobs of seconds.")
    source = (f"one core at the CPU per job `{ctl['command']}` measured on {ctl['date']}; it sustained "
              f"{ctl.get('jobs_per_s')} jobs/s with the workers on its {ctl.get('cores_here')} cores"
              if ctl and args.start_rate == ctl.get("cpu_bound_jobs_per_s_per_core") else "given")
    print(f"- Controller ({source}): {args.start_rate:g} jobs/s, {args.controller_cpu:.3f} CPU s per job")
    for hosts in (1, 4, 16):
        slots = hosts * slots_per_host
        needs = []
        for label, per_job in (("well", SITES), ("site", 1)):
            times = job_times(per_site, per_job, args.startup)
            need = slots / (sum(times) / len(times))          # jobs/s that keep every slot busy
            needs.append(f"per-{label} jobs need {need:.2f} jobs/s ({need * args.controller_cpu:.2f} cores)")
        limit = "THE CONTROLLER IS THE LIMIT" if need > args.start_rate else "the slots are the limit"
        print(f"  {hosts:>2} host(s), {slots} slots: {'; '.join(needs)}: {limit}; it keeps every slot busy only "
              f"for jobs of {slots / args.start_rate:.0f} s or more")
    print("- Not modelled: image download bandwidth and S3 request limits, spot interruptions (retries), the merge "
          "(see benchmarks/factors.py merge timings), host boot and set-up time.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
