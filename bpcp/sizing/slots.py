"""Jobs per host, --memfree and --timeout from a profile: pure functions, no I/O but host_facts().

What sizes what (the numbers come from `bpcp profile`, see bpcp/profile.py):
- peak RSS per process (`/usr/bin/time -v`) sizes memory: processes x RSS x margin must fit in
  the host's RAM after the RAM disk and a reserve for the OS;
- CPU per process (cpu seconds / wall seconds) sizes cores: processes x CPU must fit the cores;
- seconds per image set x largest job + start-up, times a margin, is the per-job timeout.
massif's heap peak is not used here: it misses the JVM heap and mapped libraries (too small), and
`--pages-as-heap` counts reserved, untouched memory (far too big).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from bpcp.errors import BpcpError
from bpcp.planfile import Plan

GIB = 1024 ** 3
MIB = 1024 ** 2
MEM_MARGIN = 1.25        # per-job RSS x this: room for groups that grow more than the profile saw
OS_RESERVE = 1 * GIB     # kept free for the OS, sshd, GNU parallel and the merge
CPU_SLACK = 0.10         # a process measured at <= 1.1 cores counts as one (GC/JIT bursts); below 1 it
                         # waits (I/O, a busy profiling host): still a core each; oversubscribe with --jobs
TIMEOUT_MARGIN = 3.0     # a job may take 3x its forecast before GNU parallel kills it
TIMEOUT_FLOOR = 120.0    # never below two minutes: start-up on a loaded host varies a lot

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """'16G', '512M', '1.5TiB', 1024 -> bytes (binary units, as free(1) and GNU parallel use)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise BpcpError(f"{text!r}: not a size; give bytes or a number with K, M, G or T (e.g. 16G)")
    unit = (m.group(2) or "B").upper()[:1]
    return int(float(m.group(1)) * {"B": 1, "K": 1024, "M": MIB, "G": GIB, "T": 1024 * GIB}[unit])


def format_size(n: float) -> str:
    """Bytes -> GNU parallel size ('1536M'); rounded up to a whole MiB."""
    return f"{max(1, math.ceil(n / MIB))}M"


def slot_limits(cores: float, mem_bytes: int, ramdisk_bytes: int, per_job_rss: int, cpu_per_job: float,
                margin: float = MEM_MARGIN, reserve_bytes: int = OS_RESERVE) -> tuple[int, int]:
    """(jobs the cores allow, jobs the memory allows) on one host."""
    cpu = 1.0 if cpu_per_job <= 1 + CPU_SLACK else cpu_per_job   # at least a core each: see CPU_SLACK
    by_cpu = max(1, math.floor(cores / cpu)) if cores >= 1 else 0
    usable = mem_bytes - ramdisk_bytes - reserve_bytes
    by_mem = max(0, math.floor(usable / (per_job_rss * margin))) if per_job_rss > 0 else by_cpu
    return by_cpu, by_mem


def slots(cores: float, mem_bytes: int, ramdisk_bytes: int, per_job_rss: int, cpu_per_job: float,
          margin: float = MEM_MARGIN, reserve_bytes: int = OS_RESERVE) -> int:
    """Largest number of CellProfiler processes that fits both the cores and the memory of a host
    (memory after the RAM disk and an OS reserve; each process counted at peak RSS x margin)."""
    return min(slot_limits(cores, mem_bytes, ramdisk_bytes, per_job_rss, cpu_per_job, margin, reserve_bytes))


def memfree(per_job_rss: int, margin: float = MEM_MARGIN) -> str:
    """GNU parallel --memfree: start a job only when one more job's peak RSS x margin is free
    (parallel also kills the youngest job when free memory falls below half of this)."""
    return format_size(per_job_rss * margin)


def job_timeout(startup_s: float, per_set_s: float, image_sets: int, margin: float = TIMEOUT_MARGIN,
                floor: float = TIMEOUT_FLOOR) -> str:
    """GNU parallel --timeout for the largest job: seconds per image set x image sets x margin
    + start-up (the start-up is not stretched: it does not grow with the group)."""
    return f"{math.ceil(max(floor, per_set_s * image_sets * margin + startup_s))}s"


def job_rss(derived: dict, image_sets: int) -> int:
    """Peak RSS forecast for a job of this many image sets: base + growth x sets, never below
    the largest RSS the profile measured (growth is clamped at 0: noise is not shrinkage)."""
    grow = max(0.0, derived.get("rss_per_image_set_bytes") or 0.0)
    fit = (derived.get("rss_base_bytes") or 0) + grow * image_sets
    return int(max(fit, derived["max_rss_bytes"]))


def host_facts(ramdisk: str = "/mnt/bpcp-ramdisk") -> dict:
    """This host: usable cores (affinity), total memory, and the RAM disk's size when mounted."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    ram = 0
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[1] == ramdisk and parts[2] == "tmpfs":
            st = os.statvfs(ramdisk)
            ram = st.f_blocks * st.f_frsize
    return {"cores": cores, "mem_bytes": mem, "ramdisk_bytes": ram}


def largest_job(plan: Plan) -> int:
    return max((j.image_sets for j in plan.jobs), default=0)


def settings_from_profile(profile: dict, host: dict, plan: Plan, margin: float = MEM_MARGIN,
                          timeout_margin: float = TIMEOUT_MARGIN) -> dict:
    """RunSettings fields (jobs, memfree, timeout) for one host, from a profile and the plan.

    host: {"cores", "mem_bytes", "ramdisk_bytes"} (host_facts(), or `bpcp slots` given them).
    Use as RunSettings(**{**defaults, **settings_from_profile(...)}). Raises BpcpError when not
    even one job fits the host's memory.
    """
    d = profile["derived"]
    biggest = largest_job(plan)
    rss = job_rss(d, biggest)
    by_cpu, by_mem = slot_limits(host["cores"], host["mem_bytes"], host.get("ramdisk_bytes", 0), rss,
                                 d["cpu_per_process"], margin)
    n = min(by_cpu, by_mem)
    if n < 1:
        raise BpcpError(
            f"one job of {biggest} image sets needs about {rss * margin / GIB:.1f} GiB (peak RSS x {margin}) "
            f"but the host has {host['mem_bytes'] / GIB:.1f} GiB with {host.get('ramdisk_bytes', 0) / GIB:.1f} GiB "
            "of RAM disk: use a host with more memory, a smaller RAM disk, or smaller groups")
    return {
        "jobs": str(n),
        "memfree": memfree(rss, margin),
        "timeout": job_timeout(d["startup_seconds"], d["seconds_per_image_set"], biggest, timeout_margin),
        # a warm worker whose RSS grew past what a fresh process of the largest job needs, with the
        # margin, is replaced after its job (CellProfiler's memory can grow over many image sets)
        "worker_rss": memfree(rss, margin),
    }


def explain_settings(profile: dict, host: dict, plan: Plan, margin: float = MEM_MARGIN) -> list[str]:
    """One line per setting saying which measured number it came from."""
    d = profile["derived"]
    biggest = largest_job(plan)
    rss = job_rss(d, biggest)
    by_cpu, by_mem = slot_limits(host["cores"], host["mem_bytes"], host.get("ramdisk_bytes", 0), rss,
                                 d["cpu_per_process"], margin)
    s = settings_from_profile(profile, host, plan, margin)
    bound = "memory" if by_mem < by_cpu else "cores"
    return [
        f"--jobs {s['jobs']}: cores allow {by_cpu} ({host['cores']} cores / {d['cpu_per_process']:.2f} CPU per process), "
        f"memory allows {by_mem} (({host['mem_bytes'] / GIB:.1f} GiB - {host.get('ramdisk_bytes', 0) / GIB:.1f} GiB RAM disk "
        f"- {OS_RESERVE / GIB:.0f} GiB reserve) / ({rss / MIB:.0f} MiB peak RSS x {margin})); limited by {bound}",
        f"--memfree {s['memfree']}: one more job's peak RSS x {margin}",
        f"--timeout {s['timeout']}: {d['seconds_per_image_set']:.2f} s per image set x {biggest} x {TIMEOUT_MARGIN:g} "
        f"+ {d['startup_seconds']:.1f} s start-up (floor {TIMEOUT_FLOOR:.0f} s)",
    ]


def _own_runnable(marker: str) -> int:
    """Runnable threads of processes whose command line contains marker."""
    n = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() not in (proc / "cmdline").read_bytes():
                continue
            for task in (proc / "task").iterdir():
                stat = (task / "stat").read_text()
                n += stat[stat.rindex(")") + 2] == "R"
        except OSError:
            continue
    return n


def background_load(seconds: float = 2.0, interval: float = 0.1, exclude: str | None = None) -> float:
    """Runnable tasks of other processes right now: /proc/stat procs_running averaged over a few
    seconds, minus this reader and (exclude) the threads of processes whose command line contains
    that text. Unlike the load average it has no memory of our own last job."""
    import time

    samples = []
    end = time.monotonic() + seconds
    while True:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running "):
                own = _own_runnable(exclude) if exclude else 0
                samples.append(max(0, int(line.split()[1]) - 1 - own))
        if time.monotonic() >= end:
            break
        time.sleep(interval)
    return round(sum(samples) / len(samples), 2) if samples else 0.0
