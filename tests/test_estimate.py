"""Jobs per host, the schedule forecast and its advice; and (real CellProfiler) the comparison of a
forecast with two real runs on this machine (how close it comes: benchmarks/forecast.py)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bpcp import planfile
from bpcp.errors import BpcpError
from bpcp.jobs.runner import WORKER_JOBS
from bpcp.results.joblog import read_joblog
from bpcp.runfolder import RunFolder
from bpcp.sizing.estimate import (
    HostType,
    Model,
    advice,
    compare,
    contention,
    forecast,
    load_instances,
    recommend,
    simulate,
    warm_jobs_of,
)
from bpcp.sizing.profile import load_profile
from bpcp.sizing.slots import GIB, MIB, parse_size, settings_from_profile, slot_limits, slots

from plans import make_plan

BPCP = [sys.executable, "-m", "bpcp.cli"]


def profile_doc(rss_mib: float = 400, cpu: float = 1.0, startup: float = 3.0, per_set: float = 0.5,
                sha: str = "a" * 64, version: str = "5.0.0.dev784") -> dict:
    return {"format": 1, "kind": "bpcp-profile", "pipeline": {"sha256": sha}, "cellprofiler": {"version": version},
            "runs": [{"image_sets": 1}],
            "derived": {"startup_seconds": startup, "seconds_per_image_set": per_set, "cpu_per_process": cpu,
                        "cpu_startup_seconds": startup, "cpu_seconds_per_image_set": per_set,
                        "max_rss_bytes": int(rss_mib * MIB), "rss_base_bytes": int(rss_mib * MIB),
                        "rss_per_image_set_bytes": 0, "basis": "wall", "sizes": [1, 8]}}


def plan_doc(sizes: list[int], sha: str = "a" * 64, version: str = "5.0.0.dev784"):
    return make_plan(sizes, sha=sha, version=version)


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
    assert s == {"jobs": "4", "memfree": "2560M", "timeout": "120s",   # 0.5 x 10 x 3 + 3 = 18 s: the floor
                 "worker_rss": "2560M"}           # a warm worker past one job's peak RSS x margin is replaced
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


def test_warm_workers_pay_start_up_once_per_worker(tmp_path):
    cold = Model(startup=3, per_set=0.5, cpu_startup=3, cpu_per_set=0.5, cpu_per_process=1, overhead=0)
    warm = dataclasses.replace(cold, warm_jobs=100)
    sizes = [1] * 40
    c, w = simulate(sizes, [(2, 1.0)], cold), simulate(sizes, [(2, 1.0)], warm)
    assert (c.startups, c.makespan) == (40, 20 * 3.5)
    assert (w.startups, w.makespan) == (2, 3 + 20 * 0.5)            # one start-up per slot
    # a worker replaced after 5 jobs: each slot's 20 jobs start 4 workers
    r = simulate(sizes, [(2, 1.0)], dataclasses.replace(cold, warm_jobs=5))
    assert (r.startups, r.makespan) == (8, 4 * 3 + 20 * 0.5)
    host = HostType("h", 2, 16 * GIB)
    assert forecast(sizes, profile_doc(), host, 1, warm).cpu_hours * 3600 == pytest.approx(40 * 0.5 + 2 * 3)
    assert forecast(sizes, profile_doc(), host, 1, cold).cpu_hours * 3600 == pytest.approx(40 * 3.5)
    # no advice to bundle when warm workers start once: one group per job costs nothing
    assert any("--bundle" in ln for ln in advice(sizes, cold, c))
    assert not any("--bundle" in ln for ln in advice(sizes, warm, w))
    # which the run uses: the option, else the rendered runner.json, else bpcp run's default (on)
    run = RunFolder(tmp_path)
    assert warm_jobs_of(run) == WORKER_JOBS and warm_jobs_of(run, False) == 0
    (tmp_path / "runner.json").write_text(json.dumps({"warm_workers": True, "worker_jobs": 7}))
    assert warm_jobs_of(run) == 7
    (tmp_path / "runner.json").write_text(json.dumps({"warm_workers": False, "worker_jobs": 7}))
    assert warm_jobs_of(run) == 0 and warm_jobs_of(run, True) == 7


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
    (run / "plan.json").write_text(json.dumps(planfile.to_dict(plan_doc([2]))))
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
    rows, notes = read_joblog(log)
    assert [r.image_sets for r in rows] == [4, 4, 2] and rows[2].exitval == 1 and notes == []
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


def _raw_joblog(run: Path) -> list[tuple[float, float, int]]:
    """(start, runtime, image sets) of each attempt, read from joblog.tsv's columns directly."""
    rows = []
    for line in (run / "joblog.tsv").read_text().splitlines():
        cols = line.split("\t")
        if len(cols) >= 9 and cols[0] != "Seq":
            rows.append((float(cols[2]), float(cols[3]), int(cols[8].split()[-1])))
    return rows


@pytest.mark.cellprofiler
@pytest.mark.slow
def test_estimate_compares_with_real_runs(example_plate, cp_venv, tmp_path):
    """Profile once, then for jobs of 1 and of 8 image sets: run with `bpcp run` and compare with
    `bpcp estimate --compare`. What the comparison says of the runs is checked against their
    joblogs; how close the forecast comes to them depends on the machine's load and is measured by
    benchmarks/forecast.py (no test asserts a wall time)."""
    data, pipe = str(example_plate / "load_data.csv"), str(example_plate / "example_loaddata.cppipe")
    small, big = tmp_path / "small", tmp_path / "big"
    _bpcp("plan", "--cellprofiler", cp_venv, "-d", data, "-p", pipe, "-o", str(small), "--group-by", "Plate,Well,Site",
          "--bundle", "0")
    _bpcp("plan", "--cellprofiler", cp_venv, "-d", data, "-p", pipe, "-o", str(big), "--bundle", "8")
    _bpcp("profile", "-o", str(small))
    profile = small / "profile.json"
    assert json.loads(profile.read_text())["derived"]["seconds_per_image_set"] > 0
    for run in (small, big):
        jobs = json.loads((run / "plan.json").read_text())["jobs"]
        _bpcp("run", "-o", str(run), "--no-merge")
        out = _bpcp("estimate", "-o", str(run), "--profile", str(profile), "--compare", str(run)).stdout
        wall_line = next(ln for ln in out.splitlines() if ln.strip().startswith("wall: forecast"))
        forecast_s = float(wall_line.split("forecast ")[1].split(" s")[0])
        actual_s = float(wall_line.split("actual ")[1].split(" s")[0])
        attempts = _raw_joblog(run)
        assert len(attempts) == len(jobs), attempts
        span = max(s + r for s, r, _ in attempts) - min(s for s, _, _ in attempts)
        assert actual_s == pytest.approx(span, abs=0.051), (wall_line, span)
        assert forecast_s > 0 and f"over {len(jobs)} job runs (0 failed)" in wall_line, wall_line
        sizes: dict[int, int] = {}
        for _, _, n in attempts:
            sizes[n] = sizes.get(n, 0) + 1
        assert sizes == {n: sum(len(j["image_numbers"]) == n for j in jobs) for n in sizes}
        for n, count in sizes.items():
            assert any(ln.strip().startswith(f"jobs of {n} image sets: forecast") and f"{count} runs)" in ln
                       for ln in out.splitlines()), out
