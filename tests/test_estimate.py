"""Jobs per host, the schedule forecast and its advice; and (real CellProfiler) the forecast of two
real runs on this machine against their measured wall time."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bpcp.errors import BpcpError
from bpcp.estimate import (HostType, Model, advice, compare, contention, forecast, load_instances, read_joblog,
                           recommend, simulate)
from bpcp.profile import load_profile
from bpcp.sizing import GIB, MIB, background_load, parse_size, settings_from_profile, slot_limits, slots

BPCP = [sys.executable, "-m", "bpcp.cli"]


def profile_doc(rss_mib: float = 400, cpu: float = 1.0, startup: float = 3.0, per_set: float = 0.5,
                sha: str = "a" * 64, version: str = "5.0.0.dev784") -> dict:
    return {"format": 1, "kind": "bpcp-profile", "pipeline": {"sha256": sha}, "cellprofiler": {"version": version},
            "runs": [{"image_sets": 1}],
            "derived": {"startup_seconds": startup, "seconds_per_image_set": per_set, "cpu_per_process": cpu,
                        "cpu_startup_seconds": startup, "cpu_seconds_per_image_set": per_set,
                        "max_rss_bytes": int(rss_mib * MIB), "rss_base_bytes": int(rss_mib * MIB),
                        "rss_per_image_set_bytes": 0, "basis": "wall", "sizes": [1, 8]}}


def plan_doc(sizes: list[int], sha: str = "a" * 64, version: str = "5.0.0.dev784") -> dict:
    return {"pipeline": {"sha256": sha, "path": "/x/p.cppipe"}, "cellprofiler": {"version": version},
            "jobs": [{"id": f"j{i}", "image_numbers": list(range(n))} for i, n in enumerate(sizes)],
            "image_sets": sum(sizes)}


# ------------------------------------------------------------------ slots
def test_slots_cpu_bound():
    # 16 cores, 128 GiB, 32 GiB RAM disk, 400 MiB per job: memory allows (128-32-1) GiB / 500 MiB = 194, cores 16
    assert slot_limits(16, 128 * GIB, 32 * GIB, 400 * MIB, 1.0, 1.25) == (16, 194)
    assert slots(16, 128 * GIB, 32 * GIB, 400 * MIB, 1.0, 1.25) == 16
    # 1.27 cores per process (CellProfiler 4.2 with JVM threads) -> 12 on 16 cores
    assert slots(16, 128 * GIB, 32 * GIB, 400 * MIB, 1.27, 1.25) == 12


def test_slots_memory_bound():
    # c6i.24xlarge: 96 vCPU, 192 GiB, 48 GiB RAM disk; 4 GB per Cell Painting process
    n = slots(96, 192 * GIB, 48 * GIB, 4 * 10**9, 1.0, 1.25)
    assert n == int((192 - 48 - 1) * GIB / (4 * 10**9 * 1.25)) == 30
    assert slot_limits(96, 192 * GIB, 48 * GIB, 4 * 10**9, 1.0, 1.25)[0] == 96
    # not even one job fits
    assert slots(2, 4 * GIB, 1 * GIB, 3 * GIB, 1.0, 1.25) == 0


def test_settings_from_profile():
    host = {"cores": 8, "mem_bytes": 16 * GIB, "ramdisk_bytes": 4 * GIB}
    s = settings_from_profile(profile_doc(rss_mib=2048), host, plan_doc([10, 5, 5]))
    assert s == {"jobs": "4", "memfree": "2560M", "timeout": "120s"}   # 0.5 x 10 x 3 + 3 = 18 s: the floor
    s = settings_from_profile(profile_doc(rss_mib=300, per_set=20), host, plan_doc([10]))
    assert s["jobs"] == "8" and s["timeout"] == "603s"   # 20 s x 10 x 3 + 3 s start-up
    with pytest.raises(BpcpError, match="needs about"):
        settings_from_profile(profile_doc(rss_mib=16000), host, plan_doc([10]))


def test_parse_size():
    assert parse_size("16G") == 16 * GIB and parse_size("512M") == 512 * MIB and parse_size("1.5TiB") == 1536 * GIB
    with pytest.raises(BpcpError):
        parse_size("lots")


# ------------------------------------------------------------------ schedule
def test_simulate_longest_first():
    m = Model(startup=2, per_set=1, cpu_startup=2, cpu_per_set=1, cpu_per_process=1, overhead=0)
    # jobs of 8,4,4,2,2 image sets (10,6,6,4,4 s) on 2 slots: [10, 6+4=10... ] -> 10 / 6+6+4+4 -> makespan 15
    s = simulate([2, 4, 8, 2, 4], [(2, 1.0)], m)
    assert s.makespan == 16 and s.busy == 30 and s.slots == 2
    # two hosts of one slot each behave as one host of two
    assert simulate([2, 4, 8, 2, 4], [(1, 1.0), (1, 1.0)], m).makespan == 16
    # a slower host (slowdown 2) gets fewer jobs
    assert simulate([1] * 6, [(1, 1.0), (1, 2.0)], m).makespan == 12


def test_contention():
    assert contention(2, 1.0, 2) == 1.0
    assert contention(2, 1.0, 2, background=2) == 2.0
    assert contention(4, 1.27, 4) == pytest.approx(1.27)


def test_advice_startup_dominates():
    m = Model(startup=3, per_set=0.5, cpu_startup=3, cpu_per_set=0.5, cpu_per_process=1)
    sizes = [1] * 384 * 9
    sched = simulate(sizes, [(16, 1.0)], m)
    lines = advice(sizes, m, sched)
    assert any("--bundle 54" in ln for ln in lines), lines          # 9 x 3 / 0.5: start-up 10%
    m2 = Model(startup=3, per_set=30, cpu_startup=3, cpu_per_set=30, cpu_per_process=1)
    assert advice(sizes, m2, simulate(sizes, [(16, 1.0)], m2)) == []


def test_advice_idle_hosts_and_tail():
    m = Model(startup=3, per_set=10, cpu_startup=3, cpu_per_set=10, cpu_per_process=1)
    few = [9] * 10
    lines = advice(few, m, simulate(few, [(16, 1.0)], m))
    assert any("only 10 jobs for 16 slots" in ln for ln in lines), lines
    skewed = [200] + [5] * 40                      # one huge group dominates the run
    lines = advice(skewed, m, simulate(skewed, [(16, 1.0)], m))
    assert any("largest job" in ln and "idle" in ln for ln in lines), lines


def test_recommend_memory_bound_and_deadline():
    types = load_instances()
    assert {"c6i.24xlarge", "m6i.large", "r6i.4xlarge"} <= {t.name for t in types}
    c = next(t for t in types if t.name == "c6i.24xlarge")
    assert (c.cores, c.mem_bytes) == (96, 192 * GIB) and c.spot_usd_h < c.on_demand_usd_h
    prof = profile_doc(rss_mib=4 * 10**9 / MIB, per_set=60, startup=5)       # 4 GB per process
    m = Model(5, 60, 5, 60, 1.0)
    sizes = [9] * 384 * 4
    fc = forecast(sizes, prof, c, 1, m)
    assert fc.memory_bound and fc.slots_per_host == 30 and fc.by_cpu == 96
    best = recommend(sizes, prof, types, m, deadline=4 * 3600, pricing="spot")
    assert best and all(f.wall <= 4 * 3600 for f in best)
    costs = [f.cost("spot") for f in best]
    assert costs == sorted(costs)
    # the fastest within a small budget is no more than the budget
    fast = recommend(sizes, prof, types, m, budget=20.0, pricing="on-demand")
    assert fast and all(f.cost("on-demand") <= 20 for f in fast)
    assert [f.wall for f in fast] == sorted(f.wall for f in fast)


# ------------------------------------------------------------------ bad profiles
def test_bad_profiles(tmp_path):
    plan = plan_doc([2, 2])
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(BpcpError, match="empty file") as e:
        load_profile(empty, plan)
    assert len(e.value.lines) == 1 and "\n" not in str(e.value)
    good = json.dumps(profile_doc(), indent=1)
    cut = tmp_path / "cut.json"
    cut.write_text(good[: len(good) // 2])
    with pytest.raises(BpcpError, match="not valid JSON .*truncated") as e:
        load_profile(cut, plan)
    assert "\n" not in str(e.value)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(profile_doc(sha="b" * 64)))
    with pytest.raises(BpcpError, match="measured pipeline sha256 bbbbbbbbbbbb.*this plan runs aaaaaaaaaaaa") as e:
        load_profile(other, plan)
    assert "\n" not in str(e.value)
    version = tmp_path / "v.json"
    version.write_text(json.dumps(profile_doc(version="4.2.8.1")))
    with pytest.raises(BpcpError, match="measured with CellProfiler 4.2.8.1"):
        load_profile(version, plan)
    notours = tmp_path / "n.json"
    notours.write_text("[1, 2]")
    with pytest.raises(BpcpError, match="not a bpcp profile"):
        load_profile(notours, plan)
    ok = tmp_path / "ok.json"
    ok.write_text(good)
    assert load_profile(ok, plan)["derived"]["startup_seconds"] == 3.0


def test_bad_profile_on_the_command_line(tmp_path):
    """`bpcp estimate` on a truncated profile: exit 2 and one line on stderr."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text(json.dumps(plan_doc([2])))
    (run / "profile.json").write_text('{"format": 1, "kind": "bpcp-pro')
    proc = subprocess.run(BPCP + ["estimate", "-o", str(run), "--hosts", "1", "--cores", "2", "--mem", "4G"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("bpcp: error: ") and "truncated" in proc.stderr


def test_joblog_and_compare(tmp_path):
    log = tmp_path / "joblog.tsv"
    log.write_text("Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n"
                   "1\t:\t100.0\t  10.0\t0\t0\t0\t0\tbpcp_job A-1 4\n"
                   "2\t:\t100.1\t  12.0\t0\t0\t0\t0\tbpcp_job B-2 4\n"
                   "3\t:\t110.0\t  11.0\t0\t0\t1\t0\tbpcp_job C-3 2\n")
    rows = read_joblog(log)
    assert [r["image_sets"] for r in rows] == [4, 4, 2] and rows[2]["exit"] == 1
    m = Model(2, 2, 2, 2, 1.0, overhead=0)
    fc = forecast([4, 4, 2], profile_doc(), HostType("h", 2, 8 * GIB), 1, m)
    result, lines = compare(rows, fc, m)
    assert result["actual_seconds"] == pytest.approx(21.0) and result["forecast_seconds"] == 16
    assert "1 failed" in lines[0]


# ------------------------------------------------------------------ real runs on this machine
def _bpcp(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(BPCP + list(args), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


@pytest.mark.cellprofiler
@pytest.mark.slow
def test_forecast_matches_real_runs(example_plate, cp_venv, tmp_path):
    """Profile once, then for jobs of 1 and of 8 image sets: forecast, run with `bpcp run`, compare.

    This machine is shared: other processes' CPU demand is an input of the model
    (--background-load). It is sampled while each run runs (our own CellProfiler threads
    excluded) and given to the forecast the run is checked against; the forecast from the load
    sampled just before the run is printed too."""
    data, pipe = str(example_plate / "load_data.csv"), str(example_plate / "example_loaddata.cppipe")
    small, big = tmp_path / "small", tmp_path / "big"
    _bpcp("plan", "--cellprofiler", cp_venv, "-d", data, "-p", pipe, "-o", str(small), "--group-by", "Plate,Well,Site",
          "--bundle", "0")
    _bpcp("plan", "--cellprofiler", cp_venv, "-d", data, "-p", pipe, "-o", str(big), "--bundle", "8")
    print(f"\nload average before profiling: {_loadavg()}")
    print(_bpcp("profile", "-o", str(small)).stdout)
    profile = small / "profile.json"
    results = []
    for run in (small, big):
        sizes = sorted({len(j["image_numbers"]) for j in json.loads((run / "plan.json").read_text())["jobs"]})
        before = background_load(2.0)
        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(background_load(0.5, 0.1, exclude=str(run)))

        t = threading.Thread(target=sample)
        load_start = _loadavg()
        t.start()
        try:
            _bpcp("run", "-o", str(run), "--no-merge")
        finally:
            stop.set()
            t.join()
        during = round(sum(samples) / len(samples), 2)
        common = ["estimate", "-o", str(run), "--profile", str(profile), "--compare", str(run)]
        ahead = _bpcp(*common, "--background-load", str(before)).stdout
        fc = _bpcp(*common, "--background-load", str(during)).stdout
        wall_line = next(ln for ln in fc.splitlines() if ln.strip().startswith("wall: forecast"))
        forecast_s = float(wall_line.split("forecast ")[1].split(" s")[0])
        actual_s = float(wall_line.split("actual ")[1].split(" s")[0])
        ahead_s = float(next(ln for ln in ahead.splitlines() if "wall: forecast" in ln).split("forecast ")[1].split(" s")[0])
        print(f"jobs of {sizes} image sets: forecast {forecast_s:.1f} s (other load during run {during}), "
              f"actual {actual_s:.1f} s, error {(forecast_s - actual_s) / actual_s:+.0%}; forecast from the load "
              f"before the run ({before}): {ahead_s:.1f} s; load average at start {load_start}, end {_loadavg()}")
        print(fc)
        results.append((sizes, forecast_s, actual_s))
    for sizes, forecast_s, actual_s in results:
        assert abs(forecast_s - actual_s) <= 0.25 * actual_s, (sizes, forecast_s, actual_s)
