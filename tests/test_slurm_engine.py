"""`bpcp run --engine slurm` (bpcp/jobs/slurm.py) on a real Slurm: the single-node Slurm of this host
(scripts/start-slurm-local.sh, Debian's slurm-wlm) with real CellProfiler, and the pure parts
(array split, sbatch arguments, Slurm's kill messages) on their own.

The container cluster (several nodes, a node killed mid-run) is in tests/test_slurm_cluster.py.
Waits on Slurm and on the run folder are for events (a job published, bpcp ended), each with a
deadline; nothing here depends on how long a job takes.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import require
from test_e2e_local import assert_merged_equals, single_process

from bpcp.errors import BpcpError
from bpcp.jobs import slurm
from bpcp.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
BPCP = [sys.executable, "-m", "bpcp.cli"]
START_LOCAL = ROOT / "scripts" / "start-slurm-local.sh"


# ----------------------------------------------------------------------------- pure parts
def test_split_arrays_keeps_every_array_below_max_array_size_and_shares_the_throttle():
    jobs = [f"j{i}" for i in range(23)]
    arrays = slurm.split_arrays(jobs, 10, 4)
    assert [len(c) for c, _ in arrays] == [10, 10, 3]
    assert [j for c, _ in arrays for j in c] == jobs                   # every job once, in plan order
    assert sum(k for _, k in arrays) == 4 and all(k >= 1 for _, k in arrays)
    assert slurm.split_arrays(jobs, 10001, 4) == [(jobs, 4)]
    assert slurm.split_arrays(jobs[:2], 10001, 200) == [(jobs[:2], 2)]  # %K no larger than the array
    assert [k for _, k in slurm.split_arrays(jobs, 5, 2)] == [1, 1, 1, 1, 1]   # each array at least one


def test_rebalance_gives_the_free_slots_to_arrays_still_pending():
    # three arrays of a split plan, throttle 4 shared 2/1/1; the first one has drained
    arrays = {"4": (0, 0, 2), "5": (1, 2, 1), "6": (1, 1, 1)}
    assert slurm.rebalance(arrays, 4) == {"5": 3}                              # oldest first
    assert slurm.rebalance({"5": (3, 2, 3), "6": (1, 1, 1)}, 4) == {}          # no free slot: as they are
    assert slurm.rebalance({"9": (0, 5, 1)}, 4) == {"9": 4}                    # a retry array alone gets all
    assert slurm.rebalance({"9": (4, 5, 4), "10": (0, 3, 2)}, 4) == {"10": 1}  # never 0 (no limit)


def test_sbatch_arguments_and_task_script(tmp_path):
    request = slurm.Request(3500, 90, slurm.Options(partition="main", account="lab", qos="normal",
                                                    sbatch_args=("--constraint=skylake",)), "bpcp-run")
    argv = slurm.sbatch_argv(request, tmp_path, tmp_path / "slurm" / "jobs-1.sh", 12, 3)
    assert argv[:3] == ["sbatch", "--parsable", "--array=0-11%3"]
    for arg in ("--cpus-per-task=1", "--mem=3500M", "--time=01:30:00", "--partition=main", "--account=lab",
                "--qos=normal", "--requeue", f"--output={tmp_path}/slurm/out/%A_%a.out", f"--chdir={tmp_path}"):
        assert arg in argv
    assert argv[-2:] == ["--constraint=skylake", str(tmp_path / "slurm" / "jobs-1.sh")]
    # the task script itself, run by bash as Slurm would (task 1 = line 2 of the index)
    index = tmp_path / "jobs-1.txt"
    index.write_text("first\nsecond job's $(id)\n")
    (tmp_path / "bpcp_runner.py").write_text("import sys; print('runner', sys.argv[1:])\n")
    script = tmp_path / "task.sh"
    script.write_text(slurm.task_script(tmp_path, index, "sbatch ..."))
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="77")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines()[0].startswith("bpcp: task 77_1: job second job's $(id) on ")
    assert out.splitlines()[1] == f"runner ['run', '--run-dir', '{tmp_path}', \"second job's $(id)\"]"
    env["SLURM_ARRAY_TASK_ID"] = "5"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "no job on line 6" in proc.stderr


@pytest.mark.parametrize("text, minutes", [("90", 90), ("2h", 120), ("90m", 90), ("30s", 1), ("1-00:00:00", 1440),
                                           ("01:30:00", 90), ("10:30", 11), ("2-12", 3600), ("unlimited", None)])
def test_time_limits(text, minutes):
    assert slurm.parse_time(text) == minutes


def test_sizes_and_bad_values_are_one_line():
    assert slurm.parse_mem("4G") == 4096 and slurm.parse_mem("3500") == 3500 and slurm.parse_mem("1.5GiB") == 1536
    assert slurm.format_time(1500) == "1-01:00:00" and slurm.format_time(5) == "00:05:00"
    assert slurm.parse_time("3600", plain="seconds") == 60
    for call, message in ((lambda: slurm.parse_mem("lots"), "--mem 'lots': give a size"),
                          (lambda: slurm.parse_time("soon"), "--time 'soon': give a time limit"),
                          (lambda: slurm.throttle_of("50%"), "--jobs '50%': with --engine slurm give the number"),
                          (lambda: slurm.check_sbatch_args(["--array=0-3"]), "bpcp sets --array itself"),
                          (lambda: slurm.check_sbatch_args(["-o out.txt"]), "bpcp sets -o itself"),
                          (lambda: slurm.check_sbatch_args(["--mem-per-cpu=2G"]), "use --mem")):
        with pytest.raises(BpcpError) as exc:
            call()
        assert len(exc.value.lines) == 1 and message in exc.value.lines[0], exc.value.lines
    assert slurm.check_sbatch_args(["--constraint skylake", "--exclusive"]) == ("--constraint", "skylake", "--exclusive")


def test_squeue_and_config_parsing():
    rows = slurm.parse_squeue("7|0|COMPLETED|vm|None\n7|3|PENDING||JobArrayTaskLimit\n9|N/A|RUNNING|vm|None\n")
    assert rows == {("7", 0): slurm.TaskState("COMPLETED", "vm", "None"),
                    ("7", 3): slurm.TaskState("PENDING", "", "JobArrayTaskLimit")}
    config = slurm.parse_config("MaxArraySize            = 1001\nAccountingStorageType   = accounting_storage/none\n")
    assert config == {"MaxArraySize": "1001", "AccountingStorageType": "accounting_storage/none"}


# What real Slurm 22.05 wrote into a task's output (captured on this host's single-node Slurm).
MEMORY_KILL = """bpcp: task 11_0: job J on vm (restarts: 0)
slurmstepd-vm: error: StepId=11.batch exceeded memory limit (139657216 > 104857600), being killed
slurmstepd-vm: error: *** JOB 11 ON vm CANCELLED AT 2026-12-01T10:46:03 ***
slurmstepd-vm: error: Exceeded job memory limit
"""
TIME_KILL = """bpcp: task 16_0: job J on vm (restarts: 0)
slurmstepd-vm: error: *** JOB 16 ON vm CANCELLED AT 2026-12-01T10:58:09 DUE TO TIME LIMIT ***
bpcp: J: FAILED on vm: stopped by SIGTERM after 60 s (GNU parallel's --timeout, or the run was stopped)
"""


def _settle(tmp_path: Path, text: str, state: str | None) -> tuple[slurm.Cause | None, Path]:
    """A task that ended, its output as Slurm left it: what bpcp records in failed/<job>/."""
    run = RunFolder(tmp_path / "run")
    (run.root / "slurm" / "out").mkdir(parents=True)
    sub = slurm.Submission(1, "16", "slurm/jobs-1.txt", ["J"], 0.0, 4096, 1)
    task = slurm.Task(sub, 0)
    task.output(run.root).write_text(text)
    engine = slurm.SlurmEngine(slurm.Options(), 3, False, 60, 0, {}, say=lambda line: None)
    return engine.settle(run, task, state, None, set(), {"J"}), run.failed("J") / "reason.txt"


def test_a_time_limit_kill_wins_over_the_runners_own_reason(tmp_path):
    from bpcp.jobs import runner

    failed = tmp_path / "run" / "failed"
    failed.mkdir(parents=True)
    # the runner got Slurm's SIGTERM first and recorded what it knew
    runner.record_failure(str(tmp_path / "run"), "J", "stopped by SIGTERM after 60 s (GNU parallel's --timeout, "
                                                     "or the run was stopped)", None)
    found, reason = _settle(tmp_path, TIME_KILL, "TIMEOUT")
    assert found is not None and found.kind == "time" and not found.retry
    assert reason.read_text().startswith("killed by Slurm at its time limit (--time 00:01:00); run again with a longer "
                                         "--time"), reason.read_text()


def test_a_memory_kill_is_named_with_its_numbers(tmp_path):
    found, reason = _settle(tmp_path, MEMORY_KILL, "FAILED")
    assert found is not None and found.kind == "memory"
    assert reason.read_text().startswith("killed by Slurm for memory: the task went above --mem 4096M (133 MiB used, "
                                         "the limit is 100 MiB)"), reason.read_text()


def test_a_requeued_tasks_earlier_attempt_does_not_count(tmp_path):
    """Only the last attempt's output counts (a requeued task appends to the same file): a task
    preempted, requeued, then failed by the runner failed for the runner's reason."""
    first = ("bpcp: task 16_0: job J on c1 (restarts: 0)\n"
             "slurmstepd-c1: error: *** JOB 16 ON c1 CANCELLED AT 2026-12-01T10:58:09 DUE TO PREEMPTION ***\n")
    second = "bpcp: task 16_0: job J on c2 (restarts: 1)\nbpcp: J: FAILED on c2: CellProfiler exit 1, no done file: x\n"
    found, reason = _settle(tmp_path / "failed", first + second, "FAILED")
    assert found is not None and found.kind == "runner" and found.reason == "CellProfiler exit 1, no done file: x"
    assert not reason.exists(), "the runner's own reason is the one to keep"
    found, reason = _settle(tmp_path / "published", first + second.split("bpcp: J:")[0]
                            + "bpcp: J: published (1 of 1 jobs done)\n", "COMPLETED")
    assert found is None and not reason.exists()


# ----------------------------------------------------------------------------- the single-node Slurm
@pytest.fixture(scope="session")
def local_slurm() -> None:
    """scripts/start-slurm-local.sh: nothing to do when Slurm is up; installs and starts it as root."""
    if os.geteuid() != 0 and shutil.which("sinfo") is None:
        require("single-node Slurm", False, "scripts/start-slurm-local.sh needs root to install and start Slurm")
    proc = subprocess.run(["bash", str(START_LOCAL)], capture_output=True, text=True, timeout=900)
    require("single-node Slurm", proc.returncode == 0, f"scripts/start-slurm-local.sh: {proc.stdout}{proc.stderr}"[-500:])


def bpcp(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(BPCP + list(args), capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def plate_args(plate: Path, cp_venv: str, run: Path, *extra: str) -> list[str]:
    return ["run", "--engine", "slurm", "--cellprofiler", cp_venv, "-d", str(plate / "load_data.csv"),
            "-p", str(plate / "example_loaddata.cppipe"), "-o", str(run), *extra]


def my_jobs(run: Path) -> list[str]:
    """This run's Slurm jobs that squeue still lists as pending or running."""
    state = json.loads((run / "slurm" / "state.json").read_text())
    arrays = ",".join(s["array"] for s in state["submissions"])
    out = subprocess.run(["squeue", "-h", "-r", "-j", arrays, "-o", "%i %T"], capture_output=True, text=True,
                         timeout=60).stdout
    return out.split("\n") if out.strip() else []


def wait_for(what: str, test, deadline: float = 600.0, proc: subprocess.Popen | None = None,
             interval: float = 0.5):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = test()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"bpcp ended (exit {proc.returncode}) before {what}: {proc.communicate()}")
        time.sleep(interval)
    raise AssertionError(f"no {what} within {deadline:.0f} s")


def freeze_cellprofiler(run: Path) -> set[int]:
    """SIGSTOP the `cellprofiler -c -r` processes a task of this run started; returns their pids."""
    frozen = set()
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if b"\0-c\0" in cmd and b"\0-r\0" in cmd and str(run).encode() in cmd and b"bpcp_runner.py" not in cmd:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGSTOP)
                frozen.add(int(entry.name))
    return frozen


def published(run: Path) -> list[str]:
    folder = run / "published"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


BAD = [
    pytest.param(["--partition", "nope"], "--partition nope: no such Slurm partition here (partitions: ", id="partition"),
    pytest.param(["--account", "nope"], "--account nope: this cluster keeps no accounts or QOS", id="account"),
    pytest.param(["--qos", "nope"], "--qos nope: this cluster keeps no accounts or QOS", id="qos"),
    pytest.param(["--jobs", "50%"], "--jobs '50%': with --engine slurm give the number of tasks", id="jobs"),
    pytest.param(["--sbatch-arg=--array=1-3"], "bpcp sets --array itself", id="sbatch-arg"),
    pytest.param(["--time", "soon"], "--time 'soon': give a time limit", id="time"),
]


@pytest.mark.slurm
@pytest.mark.parametrize("extra, message", BAD)
def test_a_bad_request_is_one_line_before_anything_is_planned_or_submitted(local_slurm, example_plate, tmp_path,
                                                                            extra, message):
    run = tmp_path / "run"
    proc = bpcp(*plate_args(example_plate, "/opt/cellprofiler/5.0", run, *extra), check=False)
    errors = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (run / "plan.json").exists() and not (run / "slurm").exists()


@pytest.mark.slurm
def test_slurm_options_need_the_slurm_engine(example_plate, tmp_path):
    proc = bpcp("run", "-d", str(example_plate / "load_data.csv"), "-p", str(example_plate / "example_loaddata.cppipe"),
                "-o", str(tmp_path / "run"), "--partition", "main", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "bpcp: error: --partition: Slurm options; add --engine slurm (or leave them out)"


@pytest.fixture(scope="module")
def reference(example_plate, cp_venv, tmp_path_factory) -> Path:
    return single_process(cp_venv, tmp_path_factory.mktemp("ref-slurm"), "-p", str(example_plate / "example_loaddata.cppipe"),
                          "--data-file", str(example_plate / "load_data.csv"))


@pytest.mark.slurm
@pytest.mark.cellprofiler
@pytest.mark.slow
def test_example_plate_through_slurm_equals_one_cellprofiler_process(local_slurm, example_plate, cp_venv, reference,
                                                                     tmp_path):
    run = tmp_path / "run"
    proc = bpcp(*plate_args(example_plate, cp_venv, run, "--slots", "2", "--mem", "2G", "--time", "30m"))
    assert "COMPLETE: 2/2 jobs done, 8/8 groups, 16/16 image sets" in proc.stdout, proc.stdout
    assert "sees the run folder, python3" in proc.stdout and "all 48 images" in proc.stdout
    assert_merged_equals(reference, run)
    state = json.loads((run / "slurm" / "state.json").read_text())
    assert len(state["submissions"]) == 1 and len(state["submissions"][0]["jobs"]) == 2
    script = (run / "slurm" / "jobs-1.sh").read_text()
    assert "--array=0-1%2" in script and "--mem=2048M" in script and "--time=00:30:00" in script
    outputs = sorted((run / "slurm" / "out").glob("*.out"))
    assert len(outputs) == 2 and all("published (" in p.read_text() for p in outputs)
    # the same command again: nothing to submit, nothing changes
    again = bpcp(*plate_args(example_plate, cp_venv, run, "--slots", "2", "--mem", "2G", "--time", "30m"))
    assert "2 of 2 jobs already published, 0 queued or running in Slurm, 0 to submit" in again.stdout
    assert len(json.loads((run / "slurm" / "state.json").read_text())["submissions"]) == 1


TWO_ROWS_OF_A = ["--only", "Well=A01", "--only", "Well=A02", "--only", "Well=A03", "--only", "Well=A04"]


def assert_complete(run: Path, wells: int) -> None:
    report = json.loads((run / "report.json").read_text())
    assert report["complete"] and report["counts"]["groups"]["done"] == wells, report["counts"]
    numbers = pq.read_table(run / "merged" / "Image.parquet").column("ImageNumber").to_pylist()
    assert sorted(numbers) == sorted(set(numbers)) and len(numbers) == 2 * wells   # every image set once


@pytest.mark.slurm
@pytest.mark.cellprofiler
@pytest.mark.slow
def test_scancel_mid_run_then_the_same_command_finishes_the_rest(local_slurm, example_plate, cp_venv, tmp_path):
    run = tmp_path / "run"
    argv = plate_args(example_plate, cp_venv, run, *TWO_ROWS_OF_A, "--bundle", "0", "--jobs", "1", "--mem", "2G")
    proc = subprocess.Popen(BPCP + argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = wait_for("a published job", lambda: published(run), proc=proc)
        subprocess.run(["scancel", *{s["array"] for s in json.loads((run / "slurm" / "state.json").read_text())
                                     ["submissions"]}], check=True, timeout=60)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    errors = err.strip().splitlines()
    assert proc.returncode == 2 and len(errors) == 1, out + err
    assert "jobs were cancelled in Slurm (scancel) while bpcp waited" in errors[0]
    assert "run the same command again to run them" in errors[0]
    assert len(published(run)) < 4
    wait_for("the cancelled tasks to leave squeue", lambda: not my_jobs(run), deadline=120)

    done = len(published(run))
    again = bpcp(*argv)
    assert f"{done} of 4 jobs already published, 0 queued or running in Slurm, {4 - done} to submit" in again.stdout
    assert "COMPLETE: 4/4 jobs done, 4/4 groups, 8/8 image sets" in again.stdout, again.stdout
    state = json.loads((run / "slurm" / "state.json").read_text())
    resubmitted = state["submissions"][-1]["jobs"]
    assert not set(first) & set(resubmitted), "a published job was submitted again"
    assert_complete(run, 4)


@pytest.mark.slurm
@pytest.mark.cellprofiler
@pytest.mark.slow
def test_detach_then_status_then_run_collects_without_submitting_twice(local_slurm, example_plate, cp_venv, tmp_path):
    run = tmp_path / "run"
    argv = plate_args(example_plate, cp_venv, run, "--only", "Well=A01", "--only", "Well=B01", "--bundle", "0",
                      "--jobs", "1", "--mem", "2G", "--detach")
    detached = bpcp(*argv)
    assert "--detach: Slurm runs the jobs without bpcp" in detached.stdout
    assert "merged" not in os.listdir(run)
    status = bpcp("status", "-o", str(run), check=False)
    assert status.returncode == 1 and "bpcp status: Slurm: " in status.stdout, status.stdout + status.stderr
    assert my_jobs(run), "the detached tasks are not in squeue"
    collected = bpcp("run", "-o", str(run))
    assert "engine slurm, as this run folder was submitted with" in collected.stdout
    assert " 0 to submit" in collected.stdout, collected.stdout
    assert "COMPLETE: 2/2 jobs done" in collected.stdout, collected.stdout
    assert len(json.loads((run / "slurm" / "state.json").read_text())["submissions"]) == 1
    assert_complete(run, 2)


@pytest.mark.slurm
@pytest.mark.cellprofiler
@pytest.mark.slow
def test_mem_and_time_come_from_profile_json(local_slurm, example_plate, cp_venv, tmp_path):
    """bpcp profile measures two job sizes; the Slurm request is its peak RSS x 1.25 and its
    forecast x 3, not this host's GNU parallel sizing."""
    from bpcp.sizing.slots import MEM_MARGIN, job_rss

    run = tmp_path / "run"
    argv = plate_args(example_plate, cp_venv, run, "--only", "Well=A01", "--only", "Well=A02", "--bundle", "0")
    bpcp("plan", *argv[3:])
    bpcp("profile", "-o", str(run), "--sizes", "1,2")
    proc = bpcp(*argv)
    profile = json.loads((run / "profile.json").read_text())
    mem = -(-int(job_rss(profile["derived"], 2) * MEM_MARGIN) // 2**20)
    assert f"bpcp: from profile.json: --mem {mem}M (peak RSS " in proc.stdout, proc.stdout
    assert "bpcp: from profile.json: --time 00:0" in proc.stdout, proc.stdout
    assert "from profile.json: --jobs" not in proc.stdout and "--memfree" not in proc.stdout   # not this host's sizing
    script = (run / "slurm" / "jobs-1.sh").read_text()
    assert f"--mem={mem}M" in script and "--time=00:0" in script
    assert "COMPLETE: 2/2 jobs done" in proc.stdout


@pytest.mark.slurm
@pytest.mark.cellprofiler
@pytest.mark.slow
def test_ctrl_c_cancels_the_runs_arrays_and_the_same_command_finishes(local_slurm, example_plate, cp_venv, tmp_path):
    run = tmp_path / "run"
    argv = plate_args(example_plate, cp_venv, run, "--only", "Well=A01", "--mem", "2G")
    # SIGINT as a terminal leaves it, even when these tests were started in the background (which
    # ignores SIGINT, and Python then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen(BPCP + argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    frozen: set[int] = set()
    try:
        # The task's CellProfiler is stopped as soon as it starts, so that the 5 s job cannot
        # finish before the Ctrl-C arrives: only the cancel may end it.
        frozen = wait_for("the task's CellProfiler", lambda: freeze_cellprofiler(run), proc=proc, interval=0.05)
        wait_for("squeue to list the task as running", lambda: any(line.endswith(" RUNNING") for line in my_jobs(run)),
                 deadline=60, proc=proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    [array] = [s["array"] for s in json.loads((run / "slurm" / "state.json").read_text())["submissions"]]
    assert proc.returncode == 130, out + err
    assert f"bpcp: cancelled Slurm arrays {array}" in err and "run the same command again" in err, err
    wait_for("the cancelled task to leave squeue", lambda: not my_jobs(run), deadline=120)
    for pid in frozen:                  # Slurm's cancel (SIGCONT, SIGTERM, SIGKILL) ended them
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            assert b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower(), f"{pid} outlived the cancel"
    assert not published(run)
    again = bpcp(*argv)
    assert "0 of 1 jobs already published, 0 queued or running in Slurm, 1 to submit" in again.stdout
    assert "COMPLETE: 1/1 jobs done" in again.stdout, again.stdout


@pytest.mark.slurm
@pytest.mark.cellprofiler
@pytest.mark.slow
def test_a_failing_job_is_submitted_again_up_to_retries(local_slurm, cp_venv, tmp_path):
    """An image that exists but is not an image: the runner records why, bpcp submits the task
    again until --retries attempts, then reports it failed with the runner's reason."""
    from bpcp.example import generate_plate

    plate = generate_plate(tmp_path / "plate")
    run = tmp_path / "run"
    argv = plate_args(plate, cp_venv, run, "--only", "Well=A01", "--mem", "2G", "--retries", "2")
    bpcp("plan", *argv[3:-4])         # planned while the image is fine (planning checks that it exists)
    broken = sorted((plate / "images").glob("Plate1_A01_s1_*"))[0]
    broken.write_bytes(b"not an image")
    proc = bpcp(*argv, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [job] = json.loads((run / "plan.json").read_text())["jobs"]
    subs = json.loads((run / "slurm" / "state.json").read_text())["submissions"]
    assert [s["jobs"] for s in subs] == [[job["id"]], [job["id"]]], "two attempts, one array each"
    assert "submitting it again (attempt 2 of 2)" in proc.stdout, proc.stdout
    reason = (run / "failed" / job["id"] / "reason.txt").read_text()
    assert not reason.startswith("killed by Slurm") and "the Slurm task" not in reason, reason


@pytest.mark.slurm
@pytest.mark.cellprofiler
@pytest.mark.slow
def test_a_task_above_its_mem_is_reported_as_memory(local_slurm, example_plate, cp_venv, tmp_path):
    run = tmp_path / "run"
    proc = bpcp(*plate_args(example_plate, cp_venv, run, "--only", "Well=A01", "--mem", "60M"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    [job] = json.loads((run / "plan.json").read_text())["jobs"]
    reason = (run / "failed" / job["id"] / "reason.txt").read_text()
    assert reason.startswith("killed by Slurm for memory: the task went above --mem 60M ("), reason
    assert f"bpcp: {job['id']}: FAILED (Slurm task " in proc.stdout and "killed by Slurm for memory" in proc.stdout
    assert "submitting it again" not in proc.stdout          # the same --mem would be killed again
    report = json.loads((run / "report.json").read_text())
    assert report["jobs"][0]["status"] == "failed" and report["jobs"][0]["reason"].startswith("killed by Slurm for memory")


# ----------------------------------------------------------------------------- the container cluster
# A controller and two compute containers (tests/slurm_cluster.py, the slurm role), this host as
# their login node: the cluster gets this host's munge key and bpcp's Slurm commands reach it
# through SLURM_CONF. The shared bind mount holds the plate and the run folders; /opt/cellprofiler
# is mounted read-only. MaxArraySize=3 splits the plate's 8 jobs into 3 arrays; SlurmdTimeout=20
# lets slurmctld notice a killed node within a minute (the default is 300 s).
HOST_MUNGE_KEY = Path("/etc/munge/munge.key")


@pytest.fixture(scope="module")
def cluster(local_slurm, tmp_path_factory):
    from slurm_cluster import docker_ready, slurm_cluster

    require("Docker", docker_ready(), "no Docker engine (scripts/ensure-docker.sh starts one)")
    require("munge key", HOST_MUNGE_KEY.is_file(), f"no {HOST_MUNGE_KEY} (scripts/start-slurm-local.sh installs munge)")
    shared = tmp_path_factory.mktemp("slurm-shared")
    with slurm_cluster(shared, munge_key=HOST_MUNGE_KEY,
                       extra_vars={"slurm_max_array_size": 3, "slurm_extra_config": "SlurmdTimeout=20"}) as c:
        yield c


@pytest.fixture(scope="module")
def shared_plate(cluster) -> Path:
    from bpcp.example import generate_plate

    return generate_plate(cluster.shared / "plate")


@pytest.fixture(scope="module")
def shared_reference(shared_plate, cp_venv, tmp_path_factory) -> Path:
    """One CellProfiler process over the shared plate (image paths are part of the tables)."""
    return single_process(cp_venv, tmp_path_factory.mktemp("ref-cluster"), "-p", str(shared_plate / "example_loaddata.cppipe"),
                          "--data-file", str(shared_plate / "load_data.csv"))


def on_cluster(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(BPCP + list(args), capture_output=True, text=True, timeout=1800, cwd=ROOT,
                          env=cluster.client_env())
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def attempts(run: Path) -> dict[str, list[str]]:
    """job -> the nodes its tasks started on, in order, from every task's output (requeues append)."""
    seen: dict[str, list[str]] = {}
    for out in sorted((run / "slurm" / "out").glob("*.out")):
        for m in slurm.TASK_MARK.finditer(out.read_text()):
            seen.setdefault(m.group(2), []).append(m.group(3))
    return seen


def publications(run: Path) -> dict[str, int]:
    """job -> how many times a runner said it published it (not 'already published')."""
    counts: dict[str, int] = {}
    for out in (run / "slurm" / "out").glob("*.out"):
        for line in out.read_text().splitlines():
            if line.startswith("bpcp: ") and ": published (" in line:
                job = line[len("bpcp: "):].split(": published (")[0]
                counts[job] = counts.get(job, 0) + 1
    return counts


@pytest.mark.docker
@pytest.mark.slurm
@pytest.mark.cellprofiler
@pytest.mark.slow
def test_cluster_run_split_into_arrays_equals_one_cellprofiler_process(cluster, shared_plate, cp_venv,
                                                                        shared_reference):
    run = cluster.shared / "run"
    proc = on_cluster(cluster, *plate_args(shared_plate, cp_venv, run, "--bundle", "0", "--mem", "2G"))
    assert "COMPLETE: 8/8 jobs done, 8/8 groups, 16/16 image sets" in proc.stdout, proc.stdout
    assert_merged_equals(shared_reference, run)
    subs = json.loads((run / "slurm" / "state.json").read_text())["submissions"]
    assert [len(s["jobs"]) for s in subs] == [3, 3, 2], "MaxArraySize=3: three arrays"
    nodes = {n for ns in attempts(run).values() for n in ns}
    assert nodes == set(cluster.computes), f"tasks ran on {nodes}"
    jobs = [j["id"] for j in json.loads((run / "plan.json").read_text())["jobs"]]
    assert publications(run) == dict.fromkeys(jobs, 1), "every job published once"


@pytest.mark.docker
@pytest.mark.slurm
@pytest.mark.cellprofiler
@pytest.mark.parametrize("where", ["run folder", "images"])
def test_what_the_nodes_do_not_see_is_one_line_before_submitting(cluster, shared_plate, example_plate, cp_venv,
                                                                   tmp_path, where):
    """The check task finds a run folder (or images) outside the shared filesystem; nothing is submitted."""
    if where == "run folder":
        run, plate = tmp_path / "run", shared_plate         # the nodes do not see this host's tmp_path
        message = f"the compute nodes do not see {run} at this path"
    else:
        run, plate = cluster.shared / "run-local-images", example_plate
        message = f"does not see {example_plate}/images/"
    proc = on_cluster(cluster, *plate_args(plate, cp_venv, run, "--bundle", "0"), check=False)
    errors = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stdout + proc.stderr
    assert not (run / "slurm" / "state.json").exists() and not list((run / "slurm").glob("jobs-*"))


@pytest.mark.docker
@pytest.mark.slurm
@pytest.mark.cellprofiler
@pytest.mark.slow
def test_a_node_killed_mid_run_still_publishes_every_group_exactly_once(cluster, shared_plate, cp_venv,
                                                                        shared_reference):
    """docker kill of a compute node while CellProfiler runs there: Slurm requeues its tasks (or bpcp
    submits them again), the runner's lock and rename publish each job once. Runs last: the node
    stays dead."""
    run = cluster.shared / "run-kill"
    argv = plate_args(shared_plate, cp_venv, run, "--bundle", "0", "--mem", "2G")
    proc = subprocess.Popen(BPCP + argv, cwd=ROOT, env=cluster.client_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    victim = cluster.computes[0]

    def running_there() -> list[str]:
        """Jobs whose task runs on the victim with CellProfiler started and nothing published yet."""
        if not (run / "slurm" / "state.json").exists():
            return []
        subs = {s["array"]: s["jobs"] for s in json.loads((run / "slurm" / "state.json").read_text())["submissions"]}
        rows = subprocess.run(["squeue", "-h", "-r", "-t", "running", "-o", "%F|%K|%N"], capture_output=True,
                              text=True, timeout=60, env=cluster.client_env()).stdout.split()
        jobs = [subs[a][int(i)] for a, i, node in (r.split("|") for r in rows) if node == victim and a in subs]
        return [j for j in jobs if (run / "work" / j / "cellprofiler.log").is_file() and j not in published(run)]

    try:
        killed = wait_for(f"CellProfiler running on {victim}", running_there, proc=proc)
        cluster.kill(victim)
        out, err = proc.communicate(timeout=1500)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "COMPLETE: 8/8 jobs done, 8/8 groups, 16/16 image sets" in out, out + err
    assert_merged_equals(shared_reference, run)
    ran = attempts(run)
    subs = json.loads((run / "slurm" / "state.json").read_text())["submissions"]
    for job in killed:
        again = ran[job][1:] or [j for s in subs[3:] for j in s["jobs"] if j == job]
        assert ran[job][0] == victim and again, f"{job} was not run again after {victim} died: {ran[job]}"
    counts = publications(run)
    assert sorted(counts) == sorted(published(run)) and set(counts.values()) == {1}, counts


@pytest.mark.slurm
@pytest.mark.cellprofiler
@pytest.mark.slow
def test_run_yml_engine_slurm_submits_from_this_machine(local_slurm, example_plate, cp_venv, reference, tmp_path):
    """run.yml -e engine=slurm: no worker is contacted, bpcp run --engine slurm does the rest."""
    run = tmp_path / "run"
    playbook = str(Path(sys.executable).parent / "ansible-playbook")
    proc = subprocess.run([playbook, "run.yml", "-e", f"dataset={example_plate / 'load_data.csv'}",
                           "-e", f"pipeline={example_plate / 'example_loaddata.cppipe'}", "-e", f"output={run}",
                           "-e", f"cellprofiler_version={Path(cp_venv).resolve().name}", "-e", "engine=slurm",
                           "-e", "mem=2G", "-e", "time=30m", "-e", '{"sbatch_args": ["--comment=from-run-yml"]}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "COMPLETE: 2/2 jobs done, 8/8 groups, 16/16 image sets" in proc.stdout, proc.stdout[-4000:]
    script = (run / "slurm" / "jobs-1.sh").read_text()
    assert "--mem=2048M" in script and "--time=00:30:00" in script and "--comment=from-run-yml" in script
    assert not (run / "hosts.sshlogin").exists()
    assert_merged_equals(reference, run)
