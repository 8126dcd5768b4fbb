"""Warm CellProfiler workers (issue 17) with real CellProfiler 5.0 and 4.2.8.1 and real GNU parallel:
the same plan run with warm workers and with a fresh process per job gives the same merged tables,
value for value; and each job a warm worker ran gives exactly the tables a fresh `cellprofiler -c -r`
gives for it (the runner's own command, `bpcp_runner.py measure`). Faults: a worker killed in the
middle of a job fails only that job, whose retry passes with a fresh worker; the job after a failing
job in the same worker is correct; a worker is replaced after --worker-jobs jobs or past its RSS
bound. No test leaves a worker behind."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bpcp.example import PlateSpec, generate_plate
from bpcp.jobs import runner
from bpcp.results.joblog import read_joblog

from merge_support import RUN_SPECIFIC

pytestmark = [pytest.mark.cellprofiler, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BPCP = [sys.executable, "-m", "bpcp.cli"]


def bpcp(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(BPCP + list(args), capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def workers_of(run: Path) -> dict[int, str]:
    """Live warm workers of a run folder (their command line names the run's socket)."""
    tag = f"bpcpw-{runner.run_tag(str(run))}-"
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if " worker --socket " in cmd and tag in cmd:
                found[int(entry.name)] = cmd
    return found


def assert_no_workers_left(run: Path) -> None:
    deadline = time.monotonic() + 30
    while workers_of(run) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workers_of(run), f"warm workers still running after the run: {workers_of(run)}"


def records(run: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "bpcp-job.json").read_text()) for d in (run / "published").iterdir()}


def merged_rows(run: Path, table: str) -> list[tuple]:
    """A merged table's rows, run-specific columns (timings) left out and the run folder's path
    (saved overlays name published/<job>/) written as RUN."""
    data = pq.read_table(run / "merged" / f"{table}.parquet")
    keep = [c for c in data.column_names if not c.startswith(RUN_SPECIFIC)]
    root, uri = str(run), run.as_uri()
    rows = []
    for row in data.select(keep).to_pylist():
        if "Timestamp" in str(row.get("Key", "")):
            continue                        # Experiment's Run_Timestamp: when each process ran
        rows.append(tuple((c, v.replace(uri, "RUN").replace(root, "RUN") if isinstance(v, str) else v)
                          for c, v in row.items()))
    return rows


def assert_merged_same(a: Path, b: Path) -> None:
    tables = sorted(p.stem for p in (a / "merged").glob("*.parquet"))
    assert tables == sorted(p.stem for p in (b / "merged").glob("*.parquet"))
    assert {"Image", "Nuclei", "Cells"} <= set(tables), tables
    for table in tables:
        ra, rb = merged_rows(a, table), merged_rows(b, table)
        assert len(ra) == len(rb), (table, len(ra), len(rb))
        for x, y in zip(ra, rb):
            assert x == y, (table, [(c, v, w) for (c, v), (_, w) in zip(x, y) if v != w][:5])


def table_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fd:
        return [{k: v for k, v in row.items() if not k.startswith(RUN_SPECIFIC)} for row in csv.DictReader(fd)
                if "Timestamp" not in str(row.get("Key", ""))]


def assert_job_equals_fresh_process(run: Path, job: str, tmp: Path) -> None:
    """What a warm worker published for a job equals a fresh CellProfiler process running the
    runner's own command for that job, table for table (timings aside, output folders mapped)."""
    out = tmp / f"fresh-{job}"
    proc = subprocess.run([sys.executable, str(run / "bpcp_runner.py"), "measure", "--run-dir", str(run), job,
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "done.txt").read_text().strip() == "Complete"
    published = run / "published" / job
    tables = sorted(p.name for p in (out / "out").glob("*.csv"))
    assert tables and tables == sorted(p.name for p in published.glob("*.csv")), tables
    for name in tables:
        fresh = [{k: v.replace(str(out / "out"), "OUT") for k, v in r.items()} for r in table_rows(out / "out" / name)]
        warm = [{k: v.replace(str(published), "OUT").replace(str(run / "work" / job / "out"), "OUT")
                 for k, v in r.items()} for r in table_rows(published / name)]
        assert warm == fresh, (job, name)


# ------------------------------------------------------------------ warm equals cold

CASES = {
    "5.0-loaddata": ("cp_venv", "example_loaddata.cppipe", "load_data.csv"),
    "5.0-images": ("cp_venv", "example_images.cppipe", "images"),
    "4.2-loaddata": ("cp42_venv", "example_loaddata.cppipe", "load_data.csv"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_warm_workers_equal_fresh_processes(case, example_plate, request, tmp_path):
    version, pipeline, dataset = CASES[case]
    venv = request.getfixturevalue(version)
    common = ["--cellprofiler", venv, "-d", str(example_plate / dataset), "-p", str(example_plate / pipeline),
              "--bundle", "0", "--jobs", "2"]
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    bpcp("run", *common, "-o", str(cold), "--no-warm-workers")
    bpcp("run", *common, "-o", str(warm), "--warm-workers")
    assert_no_workers_left(warm)
    assert json.loads((warm / "runner.json").read_text())["warm_workers"] is True
    jobs = json.loads((warm / "plan.json").read_text())["jobs"]
    assert len(jobs) == 8
    assert all(r["worker"] is None for r in records(cold).values())
    used = records(warm)
    assert all(r["worker"] for r in used.values()), used
    # 8 jobs on 2 slots: at most 2 workers started (one per slot), each running several jobs
    assert len({r["worker"]["pid"] for r in used.values()}) <= 2
    assert max(r["worker"]["jobs_before"] for r in used.values()) >= 3
    for job in used:
        log = (warm / "published" / job / "cellprofiler.log").read_text()
        assert log.strip() and "Traceback" not in log.replace("ModuleNotFoundError: No module named 'MySQLdb'", ""), log
    assert_merged_same(cold, warm)
    # the last job of a worker (several jobs after its first) equals a fresh process for that job
    last = max(used, key=lambda j: used[j]["worker"]["jobs_before"])
    assert_job_equals_fresh_process(warm, last, tmp_path)


# ------------------------------------------------------------------ faults

@pytest.fixture(scope="module")
def cold_reference(example_plate, cp_venv, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cold") / "run"
    bpcp("run", "--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"),
         "-p", str(example_plate / "example_loaddata.cppipe"), "--bundle", "0", "-o", str(run), "--no-warm-workers")
    return run


def test_worker_killed_or_hung_mid_job_fails_only_that_job(example_plate, cp_venv, cold_reference, tmp_path):
    """One worker is SIGKILLed in the middle of a job (a crash), another SIGSTOPped (a hang, which
    GNU parallel's --timeout ends through the runner): each fails only its job, whose retry passes
    with a fresh worker, and the merged tables equal fresh processes'."""
    run = tmp_path / "run"
    hit: dict[str, tuple[int, str]] = {}
    stop = threading.Event()

    def busy_worker() -> tuple[int, str] | None:
        """A worker in the middle of a job: its working folder is the job's (it goes back to the
        run folder between jobs) and the job's log shows its first image set done."""
        if not (run / "published").is_dir() or not any((run / "published").iterdir()):
            return None                  # the workers are warm once a job has been published
        for pid in workers_of(run):
            if pid in {p for p, _ in hit.values()}:
                continue
            try:
                cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
                log = (cwd / "cellprofiler.log").read_text(errors="replace")
            except OSError:
                continue
            if cwd.parent == run / "work" and "Image # 1" in log:
                return pid, cwd.name
        return None

    def caught_mid_job(pid: int, job: str) -> bool:
        """Stop the worker, then look again: a worker goes back to the run folder before it
        answers, so one stopped in the job's folder has not answered yet and its job can only
        fail. One that left it meanwhile is let go (else the fault would hit no job)."""
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(200):                  # stopped within 1 s
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "Tt":
                    break
                time.sleep(0.005)
            if Path(os.readlink(f"/proc/{pid}/cwd")) == run / "work" / job:
                return True
        except OSError:
            return False
        os.kill(pid, signal.SIGCONT)
        return False

    reasons: dict[str, str] = {}

    def fault() -> None:
        """Hit the workers, then read the failures' reasons while they are there (a retry's
        success removes failed/<job>/; GNU parallel keeps a retried job's last attempt only)."""
        while not stop.is_set():
            found = busy_worker() if len(hit) < 2 else None
            if found and caught_mid_job(*found):
                how = "killed" if "killed" not in hit else "stopped"
                if how == "killed":
                    os.kill(found[0], signal.SIGKILL)
                hit[how] = found
            for reason in (run / "failed").glob("*/reason.txt") if (run / "failed").is_dir() else []:
                with contextlib.suppress(OSError):
                    reasons.setdefault(reason.parent.name, reason.read_text())
            time.sleep(0.05)

    watcher = threading.Thread(target=fault, daemon=True)
    watcher.start()
    try:
        proc = bpcp("run", "--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"),
                    "-p", str(example_plate / "example_loaddata.cppipe"), "--bundle", "0", "-o", str(run),
                    "--warm-workers", "--retries", "2", "--jobs", "2", "--timeout", "60", ok=False)
    finally:
        stop.set()
        watcher.join()
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "killed" in hit, "no worker was caught in the middle of a job"
        assert_no_workers_left(run)
    finally:
        for pid in workers_of(run):
            os.kill(pid, signal.SIGKILL)
    assert sorted(reasons) == sorted(job for _, job in hit.values()), (reasons, hit)   # only their jobs failed
    assert "the warm CellProfiler worker ended during the job" in reasons[hit["killed"][1]], reasons
    if "stopped" in hit:
        assert "timed out after" in reasons[hit["stopped"][1]], reasons
    used = records(run)
    assert len(used) == 8 and all(a.ok for a in read_joblog(run / "joblog.tsv")[0])
    for pid, job in hit.values():
        assert used[job]["worker"]["pid"] != pid           # the retry ran in another worker
        assert not (run / "failed" / job).exists()
    assert_merged_same(cold_reference, run)


def _corrupt(plate: Path, well: str) -> str:
    """Overwrite one image of a well with bytes no reader takes; returns its path."""
    with open(plate / "load_data.csv", newline="") as fd:
        row = next(r for r in csv.DictReader(fd) if r["Metadata_Well"] == well)
    name = next(k for k in row if k.startswith("Image_FileName_"))
    path = Path(row[name.replace("FileName", "PathName")]) / row[name]
    path.write_bytes(b"not an image at all" * 10)
    return str(path)


def test_job_after_a_failing_job_in_the_same_worker_and_replacement(cp_venv, tmp_path):
    plate = tmp_path / "plate"
    generate_plate(plate, PlateSpec(rows="A", columns=4, sites=2))
    bad = _corrupt(plate, "A02")
    run = tmp_path / "run"
    # one slot: the jobs run one after the other, A01 and A02 (which fails) then A03 in one worker;
    # --worker-jobs 3: a fresh worker after every 3 jobs, failed or not
    proc = bpcp("run", "--cellprofiler", cp_venv, "-d", str(plate / "load_data.csv"),
                "-p", str(plate / "example_loaddata.cppipe"), "--bundle", "0", "-o", str(run), "--warm-workers",
                "--retries", "1", "--jobs", "1", "--worker-jobs", "3", "--halt", "never", ok=False)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_no_workers_left(run)
    order = [line.split("\t")[0] for line in (run / "joblist.tsv").read_text().splitlines()]
    assert [j.split("-")[0] for j in order] == ["Plate1_A01", "Plate1_A02", "Plate1_A03", "Plate1_A04"]
    reason = (run / "failed" / order[1] / "reason.txt").read_text()
    assert bad in reason or Path(bad).name in reason, reason
    used = records(run)
    assert sorted(used) == sorted(order[:1] + order[2:])
    # A01 (first job of worker 1), A02 failed (its second), A03 after it in the same worker (its third);
    # A04 in a fresh worker
    first, third, fourth = (used[j]["worker"] for j in (order[0], order[2], order[3]))
    assert (first["jobs_before"], third["jobs_before"], fourth["jobs_before"]) == (0, 2, 0)
    assert first["pid"] == third["pid"] != fourth["pid"]
    assert_job_equals_fresh_process(run, order[2], tmp_path)


def test_worker_replaced_past_its_rss_bound(example_plate, cp_venv, tmp_path):
    """runner.json's worker_rss (profile.json's peak RSS with its margin when there is one): a
    worker above it after a job leaves, and the next job gets a fresh one."""
    run = tmp_path / "run"
    bpcp("plan", "--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"),
         "-p", str(example_plate / "example_loaddata.cppipe"), "--bundle", "0", "-o", str(run),
         "--only", "Well=A01", "--only", "Well=A02", "--only", "Well=A03")
    bpcp("render", "-o", str(run), "--jobs", "1", "--warm-workers")
    config = json.loads((run / "runner.json").read_text())
    config["worker_rss"] = 1 << 20          # 1 MiB: every worker is above it after its first job
    (run / "runner.json").write_text(json.dumps(config))
    proc = subprocess.run(["bash", str(run / "jobs.sh")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_no_workers_left(run)
    used = records(run)
    assert len(used) == 3 and all(r["worker"]["jobs_before"] == 0 for r in used.values())
    assert len({r["worker"]["pid"] for r in used.values()}) == 3


def test_a_runner_stopped_while_its_worker_starts_leaves_that_worker_for_the_retry(example_plate, cp_venv, tmp_path):
    """Jobs of a fraction of a second: GNU parallel's --timeout (by default 10x the median job) can
    stop an attempt while its worker is still starting (seconds of imports). That worker never got
    the job, so it is kept and the retry finds it ready. Before, the stopped runner killed it, so
    every attempt of a job that needed a fresh worker could time out the same way."""
    run = tmp_path / "run"
    bpcp("plan", "--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"),
         "-p", str(example_plate / "example_loaddata.cppipe"), "--bundle", "0", "-o", str(run), "--only", "Well=A01")
    bpcp("render", "-o", str(run), "--jobs", "1", "--warm-workers")
    job, sets = (run / "joblist.tsv").read_text().split()[:2]
    argv = [sys.executable, "-S", str(run / "bpcp_runner.py"), "run", "--run-dir", str(run), job, "--image-sets", sets]
    env = {**os.environ, "BPCP_RUN_DIR": str(run), "PARALLEL_JOBSLOT": "1"}
    try:
        first = subprocess.Popen(argv, env=env, cwd=run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while not workers_of(run) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        starting = set(workers_of(run))
        assert len(starting) == 1, (starting, first.poll())
        time.sleep(0.3)                       # still importing CellProfiler: seconds, not tenths
        first.send_signal(signal.SIGTERM)     # as GNU parallel's --timeout does
        out, _ = first.communicate(timeout=30)
        assert first.returncode == 128 + signal.SIGTERM, out
        assert set(workers_of(run)) == starting, "the stopped runner's starting worker was killed"
        retry = subprocess.run(argv, env=env, cwd=run, capture_output=True, text=True, timeout=600)
        assert retry.returncode == 0, retry.stdout + retry.stderr
        record = records(run)[job]["worker"]
        assert record["pid"] in starting and record["jobs_before"] == 0
    finally:
        subprocess.run([sys.executable, "-S", str(run / "bpcp_runner.py"), "stop-workers", "--run-dir", str(run)],
                       env=env, cwd=run, capture_output=True, timeout=60)
    assert_no_workers_left(run)
    assert_job_equals_fresh_process(run, job, tmp_path)
