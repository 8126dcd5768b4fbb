"""`bpcp estimate`: wall time, CPU hours and cost of a plan from a profile, before the run.

The schedule is simulated, not averaged: every job of the plan (groups of unequal size) costs
start-up + seconds per image set x its image sets, and jobs go longest first onto whichever
slot frees first, as GNU parallel does over the slots of every host. Slots per host come from
bpcp.sizing.slots (cores and memory); running more processes than cores would slow each one down, and
so does load from other processes (--background-load), both modelled as a CPU share.
Pure functions up to `command`, which reads files and prints.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import heapq
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from bpcp import planfile
from bpcp.errors import BpcpError
from bpcp.planfile import Plan
from bpcp.results.joblog import Attempt, read_joblog
from bpcp.runfolder import RunFolder
from bpcp.sizing.profile import load_profile
from bpcp.sizing.slots import GIB, MEM_MARGIN, background_load, host_facts, job_rss, parse_size, slot_limits

INSTANCES = Path(__file__).with_name("data") / "instances.csv"
JOB_OVERHEAD = 0.3        # seconds per job outside CellProfiler: the job runner's lock, check, manifest and publish
RAMDISK_SHARE = 0.25      # the ramdisk role's default size: 25% of RAM
STARTUP_SHARE = 0.30      # start-up above this share of a median job: advise --bundle
TAIL_SHARE = 0.20         # slot-time idle above this share: advise finer groups
COUNTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128)


@dataclass(frozen=True)
class HostType:
    """One kind of host: its size and, for cloud types, its price."""
    name: str
    cores: float
    mem_bytes: int
    ramdisk_bytes: int = 0
    on_demand_usd_h: float | None = None
    spot_usd_h: float | None = None
    family: str = ""


@dataclass(frozen=True)
class Model:
    """What one job costs, from the profile: start-up + per_set x image sets (seconds on a core).
    warm_jobs: jobs a warm worker runs before a fresh one replaces it (the start-up is paid once per
    worker, not per job); 0: every job is a fresh CellProfiler process."""
    startup: float
    per_set: float
    cpu_startup: float
    cpu_per_set: float
    cpu_per_process: float
    overhead: float = JOB_OVERHEAD
    warm_jobs: int = 0

    def seconds(self, image_sets: int, slowdown: float = 1.0, startup: bool = True) -> float:
        return (self.startup * startup + self.per_set * image_sets) * slowdown + self.overhead

    def starts(self, nth: int) -> bool:
        """Whether a slot's nth job (0-based) starts CellProfiler."""
        return self.warm_jobs <= 0 or nth % self.warm_jobs == 0

    def cpu_seconds(self, image_sets: int) -> float:
        return self.cpu_startup + self.cpu_per_set * image_sets


def model_from_profile(profile: dict, speed: float = 1.0, warm_jobs: int = 0) -> Model:
    """speed: how much faster a core of the target host is than the profiling host's (1.0 = same);
    warm_jobs: see Model."""
    d = profile["derived"]
    return Model(d["startup_seconds"] / speed, d["seconds_per_image_set"] / speed,
                 d.get("cpu_startup_seconds", d["startup_seconds"]) / speed,
                 d.get("cpu_seconds_per_image_set", d["seconds_per_image_set"]) / speed,
                 max(d["cpu_per_process"], 1.0), warm_jobs=warm_jobs)


@dataclass
class Schedule:
    makespan: float
    busy: float                 # sum of job seconds
    slots: int                  # over all hosts
    jobs: int
    last_start: float           # when the last job started (after it, slots only empty)
    ends: list[float] = field(default_factory=list)   # per slot
    startups: int = 0           # CellProfiler start-ups paid: one per job, or one per warm worker

    @property
    def idle_share(self) -> float:
        return 1 - self.busy / (self.slots * self.makespan) if self.makespan > 0 else 0.0


def contention(slots: int, cpu_per_process: float, cores: float, background: float = 0.0) -> float:
    """How much slower each job runs when processes want more CPU than the host has (>= 1)."""
    demand = slots * cpu_per_process + background
    return max(1.0, demand / cores) if cores > 0 else 1.0


def simulate(sizes: list[int], host_slots: list[tuple[int, float]], model: Model) -> Schedule:
    """Longest-first list scheduling: each job, largest first, starts on the slot that frees first.
    host_slots: per host (slots, slowdown). Ties go to the lower slot, like parallel's job slots."""
    heap = [(0.0, h, s) for h, (n, _) in enumerate(host_slots) for s in range(n)]
    if not heap:
        raise BpcpError("no job slots: every host is too small for one job")
    heapq.heapify(heap)
    busy = last_start = 0.0
    done: dict[tuple[int, int], int] = {}        # jobs run per slot: warm workers start once per warm_jobs
    startups = 0
    for n in sorted(sizes, reverse=True):
        free, h, s = heapq.heappop(heap)
        start = model.starts(done.get((h, s), 0))
        done[(h, s)] = done.get((h, s), 0) + 1
        startups += start
        t = model.seconds(n, host_slots[h][1], start)
        busy += t
        last_start = max(last_start, free)
        heapq.heappush(heap, (free + t, h, s))
    ends = sorted(e for e, _, _ in heap)
    return Schedule(max(ends), busy, len(ends), len(sizes), last_start, ends, startups)


@dataclass
class Forecast:
    host: HostType
    count: int
    slots_per_host: int
    by_cpu: int
    by_mem: int
    job_rss: int
    slowdown: float
    schedule: Schedule
    cpu_hours: float
    setup_seconds: float = 0.0

    @property
    def wall(self) -> float:
        return self.schedule.makespan + self.setup_seconds

    @property
    def memory_bound(self) -> bool:
        return self.by_mem < self.by_cpu

    def cost(self, pricing: str) -> float | None:
        price = self.host.spot_usd_h if pricing == "spot" else self.host.on_demand_usd_h
        if price is None:
            return None
        return self.count * max(self.wall, 60.0) / 3600 * price   # per-second billing, 60 s minimum


def forecast(sizes: list[int], profile: dict, host: HostType, count: int, model: Model,
             slots_override: int | None = None, background: float = 0.0, setup_seconds: float = 0.0,
             margin: float = MEM_MARGIN, schedule_cache: dict | None = None) -> Forecast:
    """Forecast a plan (its job sizes) on `count` hosts of one type."""
    rss = job_rss(profile["derived"], max(sizes))
    by_cpu, by_mem = slot_limits(host.cores, host.mem_bytes, host.ramdisk_bytes, rss, model.cpu_per_process, margin)
    n = slots_override or min(by_cpu, by_mem)
    slow = contention(n, model.cpu_per_process, host.cores, background)
    key = (n * count, slow)
    if schedule_cache is not None and key in schedule_cache:
        sched = schedule_cache[key]        # identical hosts: only the total of slots matters
    else:
        sched = simulate(sizes, [(n * count, slow)], model) if n > 0 else Schedule(math.inf, 0, 0, len(sizes), math.inf)
        if schedule_cache is not None:
            schedule_cache[key] = sched
    cpu_h = (sum(model.cpu_per_set * s for s in sizes) + model.cpu_startup * sched.startups) / 3600
    return Forecast(host, count, n, by_cpu, by_mem, rss, slow, sched, cpu_h, setup_seconds)


def recommend(sizes: list[int], profile: dict, types: list[HostType], model: Model, *,
              deadline: float | None = None, budget: float | None = None, pricing: str = "spot",
              setup_seconds: float = 0.0, max_count: int = 128) -> list[Forecast]:
    """Forecasts of every type and count that meet the deadline and budget, best first: cheapest
    when a deadline is given, else fastest within the budget. Per type, counts grow until more
    hosts would sit idle, cost more than the budget, or (deadline) one more past the first fit."""
    fits = []
    cache: dict[tuple[int, float], Schedule] = {}
    for t in types:
        met = 0
        for c in COUNTS:
            if c > max_count:
                break
            f = forecast(sizes, profile, t, c, model, setup_seconds=setup_seconds, schedule_cache=cache)
            cost = f.cost(pricing)
            if f.slots_per_host < 1 or cost is None:
                break
            if (deadline is None or f.wall <= deadline) and (budget is None or cost <= budget):
                fits.append(f)
                met += 1
            if (budget is not None and cost > budget and (deadline is None or f.wall <= deadline)) \
                    or (deadline is not None and met >= 2) or (c - 1) * f.slots_per_host >= len(sizes):
                break
    if deadline is not None:
        fits.sort(key=lambda f: (f.cost(pricing), f.wall))
    else:
        fits.sort(key=lambda f: (f.wall, f.cost(pricing)))
    return fits


# ------------------------------------------------------------------ advice (pure)
def advice(sizes: list[int], model: Model, sched: Schedule) -> list[str]:
    """Grouping advice: start-up dominating small jobs; too few jobs or a long tail."""
    out = []
    ordered = sorted(sizes)
    median = ordered[len(ordered) // 2]
    share = model.startup / (model.startup + model.per_set * median) if median else 1.0
    total = sum(sizes)
    if share > STARTUP_SHARE and not model.warm_jobs:      # warm workers start once: bundling gains nothing
        want = math.ceil(9 * model.startup / model.per_set) if model.per_set > 0 else median * 10
        cap = max(1, total // max(1, 3 * sched.slots))       # keep >= 3 jobs per slot
        n = max(median + 1, min(want, cap))
        if n > median:
            out.append(f"start-up ({model.startup:.1f} s) is {share:.0%} of a median job ({median} image sets, "
                       f"{model.seconds(median) - model.overhead:.1f} s): bundle groups with --bundle {n} "
                       f"(start-up then {model.startup / (model.startup + model.per_set * n):.0%} of a job"
                       f"{'; limited to keep 3 jobs per slot' if n < want else ''})")
    if sched.jobs < sched.slots:
        out.append(f"only {sched.jobs} jobs for {sched.slots} slots: {sched.slots - sched.jobs} slots sit idle all "
                   "run; group finer (e.g. --group-by Plate,Well,Site), drop --bundle, or use fewer hosts")
    elif sched.idle_share > TAIL_SHARE:
        longest = model.seconds(max(sizes))
        why = (f"the largest job ({max(sizes)} image sets, {longest:.0f} s) is {longest / sched.makespan:.0%} of the run"
               if longest > 0.5 * sched.makespan else
               f"{sched.jobs} jobs over {sched.slots} slots leave the last round part-empty")
        out.append(f"slots are idle {sched.idle_share:.0%} of the time, mostly at the end: {why}; "
                   "group finer (--group-by with more keys), a smaller --bundle, or fewer hosts")
    return out


# ------------------------------------------------------------------ comparing with a run
def compare(joblog: list[Attempt], fc: Forecast, model: Model) -> tuple[dict, list[str]]:
    """Forecast vs what the joblog shows: wall time and mean job time per size."""
    if not joblog:
        raise BpcpError("the joblog is empty: nothing ran yet")
    first = min(r.start for r in joblog)
    actual = max(r.end for r in joblog) - first
    predicted = fc.schedule.makespan
    lines = [f"wall: forecast {predicted:.1f} s, actual {actual:.1f} s ({(predicted - actual) / actual:+.0%}) "
             f"over {len(joblog)} job runs ({sum(not r.ok for r in joblog)} failed)"]
    by_size: dict[int, list[float]] = {}
    for r in joblog:
        by_size.setdefault(r.image_sets, []).append(r.runtime)
    for n in sorted(by_size):
        mean = sum(by_size[n]) / len(by_size[n])
        f = model.seconds(n, fc.slowdown, startup=not model.warm_jobs)   # warm: most jobs start none
        lines.append(f"  jobs of {n} image sets: forecast {f:.1f} s, actual mean {mean:.1f} s ({(f - mean) / mean:+.0%}, "
                     f"{len(by_size[n])} runs)")
    return {"forecast_seconds": predicted, "actual_seconds": actual, "error": (predicted - actual) / actual}, lines


# ------------------------------------------------------------------ instance table
def load_instances(path: Path = INSTANCES, ramdisk_share: float = RAMDISK_SHARE) -> list[HostType]:
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    out = []
    for rec in csv.DictReader(lines):
        try:
            mem = int(float(rec["memory_gib"]) * GIB)
            out.append(HostType(rec["type"], float(rec["vcpu"]), mem, int(mem * ramdisk_share),
                                float(rec["on_demand_usd_h"]), float(rec["spot_usd_h"]) if rec.get("spot_usd_h") else None,
                                rec.get("family", "")))
        except (KeyError, ValueError) as exc:
            raise BpcpError(f"{path}: bad row {rec} ({exc}); columns: type,family,arch,vcpu,memory_gib,"
                            "on_demand_usd_h,spot_usd_h") from None
    return out


def parse_duration(text: str) -> float:
    """'90m', '2h', '3600', '1.5h' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise BpcpError(f"{text!r}: give a duration such as 3600, 90m or 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _hms(s: float) -> str:
    if math.isinf(s):
        return "never"
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _usd(x: float) -> str:
    return f"${x:.2f}" if x >= 1 else f"${x:.3f}"


def describe(fc: Forecast, pricing_known: bool) -> list[str]:
    h = fc.host
    lines = [
        f"{fc.count} x {h.name} ({h.cores:g} cores, {h.mem_bytes / GIB:.0f} GiB, RAM disk {h.ramdisk_bytes / GIB:.1f} GiB): "
        f"{fc.slots_per_host} jobs per host (cores allow {fc.by_cpu}, memory allows {fc.by_mem} at "
        f"{fc.job_rss / 2**20:.0f} MiB peak RSS x {MEM_MARGIN}){'; MEMORY-BOUND: slots limited by memory, not cores' if fc.memory_bound else ''}",
        f"  wall time {_hms(fc.wall)} ({fc.wall:.0f} s{f', incl. {fc.setup_seconds:.0f} s set-up' if fc.setup_seconds else ''}), "
        f"CPU {fc.cpu_hours:.2f} h, slots busy {1 - fc.schedule.idle_share:.0%}"
        f"{f', each job {fc.slowdown:.2f}x slower for sharing the CPU' if fc.slowdown > 1.001 else ''}",
    ]
    on_demand = fc.cost("on-demand")
    if pricing_known and on_demand is not None:
        spot = fc.cost("spot")
        lines.append(f"  cost {_usd(on_demand)} on-demand, "
                     f"{f'about {_usd(spot)} spot' if spot is not None else 'spot unknown'} "
                     f"({fc.count} x {max(fc.wall, 60) / 3600:.2f} h; table prices are estimates)")
    return lines


# ------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", type=Path, default=Path("bpcp-run"), help="the run folder with plan.json")
    p.add_argument("--profile", type=Path, help="profile.json (default: the run folder's)")
    g = p.add_argument_group("hosts (default: this host)")
    g.add_argument("--hosts", type=int, help="number of hosts of --cores/--mem")
    g.add_argument("--cores", type=float, help="cores (vCPUs) per host")
    g.add_argument("--mem", help="memory per host, e.g. 16G")
    g.add_argument("--ramdisk-size", dest="ramdisk_size", help="RAM disk per host (default: 25%% of memory, as the ramdisk role; this host: as mounted)")
    g.add_argument("--instance-type", help="an EC2 type from the table, e.g. c6i.24xlarge")
    g.add_argument("--count", type=int, default=1, help="number of --instance-type hosts")
    g.add_argument("--instances", type=Path, default=INSTANCES, help="instance table CSV (default: shipped)")
    g.add_argument("--jobs", type=int, help="jobs per host as you will run them (default: from the profile)")
    g.add_argument("--background-load", default="0",
                   help="CPU other processes use on each host (runnable tasks), or 'now' to measure this host")
    g.add_argument("--speed", type=float, default=1.0, help="target core speed relative to the profiling host")
    g.add_argument("--setup-minutes", type=float, default=0.0, help="per-run host set-up time to add (boot, site.yml)")
    r = p.add_argument_group("recommendation")
    r.add_argument("--deadline", help="recommend the cheapest types and counts finishing within this (e.g. 2h)")
    r.add_argument("--budget", type=float, help="recommend the fastest types and counts within this many dollars")
    r.add_argument("--pricing", choices=("spot", "on-demand"), default="spot", help="prices to optimise (default spot)")
    r.add_argument("--max-count", type=int, default=128, help="most hosts to consider")
    p.add_argument("--warm-workers", action=argparse.BooleanOptionalAction, default=None,
                   help="count CellProfiler's start-up once per warm worker, not per job (default: as the run "
                        "folder's runner.json, else bpcp run's default)")
    p.add_argument("--compare", type=Path, metavar="RUN", help="compare the forecast with RUN's joblog.tsv")


def _hosts(args: argparse.Namespace) -> tuple[HostType, int, bool]:
    """(host type, count, priced?) from the arguments."""
    if args.instance_type:
        table = {t.name: t for t in load_instances(args.instances)}
        if args.instance_type not in table:
            near = [n for n in table if n.split(".")[0] == args.instance_type.split(".")[0]][:6] or list(table)[:6]
            raise BpcpError(f"--instance-type {args.instance_type}: not in {args.instances}; e.g. {', '.join(near)}")
        t = table[args.instance_type]
        if args.ramdisk_size is not None:
            t = HostType(t.name, t.cores, t.mem_bytes, parse_size(args.ramdisk_size), t.on_demand_usd_h, t.spot_usd_h, t.family)
        return t, args.count, True
    if args.cores or args.mem or args.hosts:
        if not (args.cores and args.mem):
            raise BpcpError("--hosts needs --cores and --mem per host (e.g. --hosts 4 --cores 16 --mem 64G)")
        mem = parse_size(args.mem)
        ram = parse_size(args.ramdisk_size) if args.ramdisk_size is not None else int(mem * RAMDISK_SHARE)
        return HostType("host", args.cores, mem, ram), args.hosts or 1, False
    f = host_facts()
    ram = parse_size(args.ramdisk_size) if args.ramdisk_size is not None else f["ramdisk_bytes"]
    return HostType("this host", f["cores"], f["mem_bytes"], ram), 1, False


def warm_jobs_of(run: RunFolder, warm: bool | None = None) -> int:
    """Jobs per warm worker the run uses (0: a fresh process per job): --warm-workers/--no-warm-workers,
    else the rendered runner.json, else bpcp's default."""
    from bpcp.jobs import runner
    from bpcp.jobs.render import RunSettings

    config: dict = {}
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((run.root / runner.CONFIG).read_text())
    on = warm if warm is not None else config.get("warm_workers", RunSettings().warm_workers)
    return int(config.get("worker_jobs") or runner.WORKER_JOBS) if on else 0


def estimate(run_dir: Path, profile_path: Path | None, host: HostType, count: int, *, jobs: int | None = None,
             background: float = 0.0, speed: float = 1.0, setup_seconds: float = 0.0,
             warm: bool | None = None) -> tuple[Plan, dict, Model, Forecast]:
    """(plan, profile, model, forecast) for a run folder: the library entry point."""
    run = RunFolder(Path(run_dir).resolve())
    plan = planfile.read(run)
    profile = load_profile(profile_path or run.root / "profile.json", plan)
    model = model_from_profile(profile, speed, warm_jobs_of(run, warm))
    sizes = [j.image_sets for j in plan.jobs]
    return plan, profile, model, forecast(sizes, profile, host, count, model, jobs, background, setup_seconds)


def command(args: argparse.Namespace) -> int:
    host, count, priced = _hosts(args)
    bg = background_load() if args.background_load == "now" else float(args.background_load)
    setup = args.setup_minutes * 60
    plan, profile, model, fc = estimate(args.output, args.profile, host, count, jobs=args.jobs, background=bg,
                                        speed=args.speed, setup_seconds=setup, warm=args.warm_workers)
    sizes = [j.image_sets for j in plan.jobs]
    d = profile["derived"]
    print(f"bpcp: forecast for {len(sizes)} jobs, {sum(sizes)} image sets ({min(sizes)}-{max(sizes)} per job):")
    for line in describe(fc, priced):
        print("  " + line)
    startup = (f"{model.startup:.2f} s start-up once per warm worker (every {model.warm_jobs} jobs of a slot; "
               f"{fc.schedule.startups} in all) + " if model.warm_jobs else f"{model.startup:.2f} s start-up + ")
    print(f"  assumptions: each job takes {startup}"
          f"{model.per_set:.3f} s per image set (profile, {d['basis']} time"
          f"{f', / speed {args.speed:g}' if args.speed != 1 else ''}) + {model.overhead:.1f} s job overhead; "
          f"{model.cpu_per_process:.2f} CPU per process; jobs longest first onto the first free slot; "
          f"other load {bg:g}; excludes data transfer{'' if setup else ' and host set-up (--setup-minutes)'}")
    for line in advice(sizes, model, fc.schedule):
        print("  advice: " + line)
    if args.deadline or args.budget is not None:
        deadline = parse_duration(args.deadline) if args.deadline else None
        types = load_instances(args.instances)
        best = recommend(sizes, profile, types, model, deadline=deadline, budget=args.budget,
                         pricing=args.pricing, setup_seconds=setup, max_count=args.max_count)
        goal = " and ".join(x for x in (f"within {args.deadline}" if deadline else "",
                                         f"under ${args.budget:g}" if args.budget is not None else "") if x)
        if not best:
            print(f"bpcp: no instance type and count up to {args.max_count} finishes {goal} ({args.pricing} prices); "
                  "relax the deadline or budget")
        else:
            print(f"bpcp: recommended ({'cheapest' if deadline else 'fastest'} {goal}, {args.pricing} prices, estimates):")
            for f in best[:5]:
                for line in describe(f, True):
                    print("  " + line)
            rss_gib = fc.job_rss * MEM_MARGIN / GIB
            c_bound = [t for t in types if t.family.startswith("c") and
                       slot_limits(t.cores, t.mem_bytes, t.ramdisk_bytes, fc.job_rss, model.cpu_per_process)[1]
                       < slot_limits(t.cores, t.mem_bytes, t.ramdisk_bytes, fc.job_rss, model.cpu_per_process)[0]]
            if c_bound:
                print(f"  note: at {rss_gib:.1f} GiB per process (peak RSS x {MEM_MARGIN}) the pipeline is memory-bound on "
                      f"compute-optimised types (e.g. {c_bound[-1].name}: slots limited by memory, not cores); "
                      "m- or r-types use all their cores")
    if args.compare:
        log = RunFolder(args.compare.resolve()).joblog
        if not log.exists():
            raise BpcpError(f"{args.compare}: no joblog.tsv; run it first (bpcp run -o {args.compare})")
        _result, lines = compare(read_joblog(log)[0], fc, model)
        print(f"bpcp: forecast vs {log}:")
        for line in lines:
            print("  " + line)
    return 0
