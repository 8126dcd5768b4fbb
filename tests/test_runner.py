"""The job runner alone: lock, judging, job record, manifest, publish, failure causes, temp clean-up.

A scripted stand-in for the CellProfiler executable (FAKE below) makes the outcomes these tests
need (success, a Python exception with exit 255, a job that hangs); the end-to-end tests run the
same runner with real CellProfiler.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpcp.jobs import runner
from bpcp.planfile import FORMAT, Job, from_dict
from bpcp.results.completeness import job_status

FAKE = r'''#!/usr/bin/env python3
"""Writes what CellProfiler would: -o OUT/Image.csv (one row per CSV row), -d DONE; FAKE_MODE changes it."""
import os, sys, time
args = sys.argv[1:]
out, done = args[args.index("-o") + 1], args[args.index("-d") + 1]
rows = sum(1 for _ in open(args[args.index("--data-file") + 1])) - 1
mode = os.environ.get("FAKE_MODE", "ok")
print("Times reported are CPU and Wall-clock times for each module")
if mode == "hang":
    time.sleep(600)
if mode == "raise":
    print("Traceback (most recent call last):")
    print('  File "cellprofiler_core/utilities/core/pipeline.py", line 1, in run')
    print("Error reading /data/plate 1/bad image.tif")
    print("ValueError: Could not read 65536 bytes from /data/plate 1/bad image.tif")
    open(done, "w").write("Failure")
    sys.exit(255)
with open(os.path.join(out, "Image.csv"), "w") as fd:
    fd.write("ImageNumber,Count_Nuclei\n" + "".join(f"{i},{i * 3}\n" for i in range(1, rows + 1)))
os.makedirs(os.path.join(out, "overlays"))
open(os.path.join(out, "overlays", "a b.png"), "wb").write(b"\x89PNG" + os.urandom(64))
open(done, "w").write("Complete")
'''
JOB = "P1_A01-0123abcd"


def make_run(root: Path, tmp_root: str = "", **settings) -> Path:
    """A run folder with one job of two image sets, as `bpcp plan` and `bpcp render` leave it."""
    fake = root / "fake-cellprofiler"
    fake.write_text(FAKE.replace("/usr/bin/env python3", sys.executable))
    fake.chmod(0o755)
    run = root / 'run "quoted" dir ü'
    (run / "inputs").mkdir(parents=True)
    (run / "inputs" / f"{JOB}.csv").write_text("Metadata_Well,Image_FileName_DNA,Image_PathName_DNA\nA01,a.png,/d\nA01,b.png,/d\n")
    (run / "pipeline.cppipe").write_text("CellProfiler Pipeline\n")
    (run / "joblist.tsv").write_text(f"{JOB}\t2\n")
    config = {"format": 1, "run_dir": str(run), "kind": "loaddata", "numbering": "local", "pipeline": "pipeline.cppipe",
              "staged": False, "cellprofiler": {"executable": str(fake), "version": "5.0.0", "env": {}},
              "pin_threads": True, "tables": {"Image": "Image.csv"}, "delimiter": ",", "tmp_root": tmp_root,
              "ramdisk": "/nonexistent", "s3_python": "/nonexistent", "s3_output": "", "controller_python": sys.executable,
              "jobs_total": 1, **settings}
    (run / runner.CONFIG).write_text(json.dumps(config))
    (run / runner.RUNNER).write_text(Path(runner.__file__).read_text())
    return run


def run_job(run: Path, mode: str = "ok", env_extra: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAKE_MODE": mode, **(env_extra or {})}
    return subprocess.run([sys.executable, str(run / runner.RUNNER), "run", "--run-dir", str(run), JOB],
                          capture_output=True, text=True, env=env, timeout=120, **kwargs)


def test_published_job_has_valid_record_and_manifest_for_any_path(tmp_path):
    run = make_run(tmp_path)
    proc = run_job(run)
    assert proc.returncode == 0, proc.stderr
    published = run / "published" / JOB
    record = json.loads((published / "bpcp-job.json").read_text())
    assert record["workdir"] == str(run) and record["image_sets"] == 2 and record["exit_code"] == 0
    manifest = json.loads((published / runner.MANIFEST).read_text())
    on_disk = sorted(str(p.relative_to(published)) for p in published.rglob("*") if p.is_file() and p.name != runner.MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    assert "overlays/a b.png" in manifest["files"] and "bpcp-job.json" in manifest["files"]
    assert manifest["rows"] == {"Image": 2}
    assert runner.verify(str(published)) == ""
    (published / "Image.csv").write_text((published / "Image.csv").read_text()[:-6])
    assert "Image.csv has" in runner.verify(str(published))
    assert not (run / "failed" / JOB).exists() and not (run / "work" / JOB / "out").exists()
    again = run_job(run)
    assert again.returncode == 0 and "already published" in again.stdout


def test_exit_255_names_the_exception_and_image_not_a_signal(tmp_path):
    run = make_run(tmp_path)
    proc = run_job(run, "raise")
    assert proc.returncode == 1
    reason = (run / "failed" / JOB / "reason.txt").read_text().strip()
    assert reason.startswith("CellProfiler exit 255, done file says 'Failure': ValueError: Could not read 65536 bytes")
    assert "/data/plate 1/bad image.tif" in reason and "signal" not in reason
    assert (run / "failed" / JOB / "cellprofiler.log").is_file()
    assert not (run / "published" / JOB).exists()


def test_a_stopped_attempt_is_recorded_and_its_temp_folder_removed(tmp_path):
    tmp_root = tmp_path / "ramdisk"
    tmp_root.mkdir()
    run = make_run(tmp_path, str(tmp_root), timeout="1000%")
    env = {**os.environ, "FAKE_MODE": "hang"}
    proc = subprocess.Popen([sys.executable, str(run / runner.RUNNER), "run", "--run-dir", str(run), JOB],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        if list(tmp_root.iterdir()) and (run / "work" / JOB / "cellprofiler.log").exists():
            break
        time.sleep(0.05)
    assert [p.name.startswith(f"bpcp-{runner.run_tag(str(run))}-{JOB}.") for p in tmp_root.iterdir()] == [True]
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert proc.returncode == 128 + signal.SIGTERM
    reason = (run / "failed" / JOB / "reason.txt").read_text()
    assert reason.startswith("timed out after ") and "s (GNU parallel's --timeout 1000%), or stopped by SIGTERM" in reason
    assert list(tmp_root.iterdir()) == []


def test_temp_folders_of_dead_attempts_are_reclaimed_live_ones_kept(tmp_path):
    tmp_root = tmp_path / "ramdisk"
    tmp_root.mkdir()
    run = make_run(tmp_path, str(tmp_root))
    config = json.loads((run / runner.CONFIG).read_text())
    tag = runner.run_tag(str(run))
    dead = tmp_root / f"bpcp-{tag}-{JOB}.abc123"
    live = tmp_root / f"bpcp-{tag}-P1_A02-99999999.def456"
    other_run = tmp_root / f"bpcp-00000000-{JOB}.ghi789"
    for folder in (dead, live, other_run):
        (folder / "s3").mkdir(parents=True)
    (run / "work" / "P1_A02-99999999").mkdir(parents=True)
    with open(run / "work" / "P1_A02-99999999" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        removed = runner.reclaim(config, str(run))
    assert removed == [str(dead)]
    assert live.is_dir() and other_run.is_dir() and not dead.exists()
    # the next attempt of a job (it holds that job's lock) removes every earlier temp folder of it
    assert run_job(run).returncode == 0
    assert other_run.is_dir() and live.is_dir()


def test_a_lock_counts_as_running_only_while_held(tmp_path):
    plan = from_dict({"format": FORMAT, "dataset": {"kind": "loaddata", "path": "/x.csv", "sha256": ""},
                      "pipeline": {"path": "/p", "file": "pipeline.cppipe", "sha256": ""},
                      "cellprofiler": {"version": "5"}, "group_by": [], "bundle": {"asked": 0, "slots": 1, "sets_per_job": 0},
                      "numbering": "local", "tables": ["Image"], "table_files": {"Image": "Image.csv"},
                      "delimiter": ",", "image_sets": 1, "jobs": []})
    job = Job(JOB, ({},), (1,), (1,), (1,))
    (tmp_path / "work" / JOB).mkdir(parents=True)
    (tmp_path / "work" / JOB / "lock").touch()
    assert job_status(tmp_path, plan, job)["status"] == "missing"
    with open(tmp_path / "work" / JOB / "lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert job_status(tmp_path, plan, job)["status"] == "running"


@pytest.mark.parametrize("line,expected", [
    ("MemoryError: Unable to allocate 3.2 GiB", "MemoryError: Unable to allocate 3.2 GiB"),
    ("cellprofiler_core.utilities.core.pipeline.PipelineLoadError: bad module", "cellprofiler_core.utilities.core.pipeline.PipelineLoadError: bad module"),
])
def test_last_error_prefers_the_exception(tmp_path, line, expected):
    log = tmp_path / "log"
    log.write_text(f"Times reported\nWarning: something\n{line}\nshutting down\n")
    assert runner.last_error(str(log)) == expected


@pytest.mark.cellprofiler
def test_one_bad_image_fails_only_its_group(example_plate, cp_venv, tmp_path):
    """A corrupt image in well A02, bundled with three good wells: the bundle fails, is planned again
    one group per job, and only A02 ends failed; its reason names the module and the image."""
    plate = tmp_path / "plate"
    shutil.copytree(example_plate, plate)
    bad = plate / "images" / "Plate1_A02_s2_w1.png"
    bad.write_bytes(bad.read_bytes()[:300])
    (plate / "load_data.csv").write_text((plate / "load_data.csv").read_text().replace(str(example_plate), str(plate)))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "bpcp", "run", "--cellprofiler", cp_venv, "-d", str(plate / "load_data.csv"),
                           "-p", str(plate / "example_loaddata.cppipe"), "-o", str(run), "--slots", "2", "--retries", "1",
                           "--bundle", "auto"],    # bundled (the default without warm workers), in warm workers
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bundled jobs failed: planned again one group per job" in proc.stdout
    report = json.loads((run / "report.json").read_text())
    assert report["counts"]["groups"] == {**report["counts"]["groups"], "expected": 8, "done": 7, "failed": 1}
    failed = [j for j in report["jobs"] if j["status"] != "done"]
    assert len(failed) == 1 and failed[0]["id"].startswith("Plate1_A02-") and failed[0]["groups"] == 1
    assert "OSError: image file is truncated (module LoadData, image set 2 of the job:" in failed[0]["reason"]
    assert str(bad) in failed[0]["reason"]
    image = json.loads((run / "plan.json").read_text())
    assert sum(len(j["groups"]) for j in image["jobs"]) == 8


def test_a_host_short_of_memory_starts_no_job(tmp_path):
    """Admission on the host that runs the job: with less memory available than a job needs, the
    runner waits (here 1 s), then fails the attempt without starting CellProfiler, saying why."""
    run = make_run(tmp_path, memory_needed=1 << 50)
    start = time.monotonic()
    proc = run_job(run, env_extra={"BPCP_ADMISSION_WAIT": "1"})
    assert proc.returncode == 1 and time.monotonic() - start < 60
    reason = (run / "failed" / JOB / "reason.txt").read_text()
    assert reason.startswith("not enough memory on ") and "a job needs 1048576.0 GiB" in reason
    assert not (run / "work" / JOB / "cellprofiler.log").exists()
    assert "waiting for 1048576.0 GiB of memory" in proc.stderr
    (tmp_path / "fits").mkdir()
    ok = make_run(tmp_path / "fits", memory_needed=1 << 20)
    assert run_job(ok).returncode == 0


def _fake_processes(run: Path) -> list[int]:
    """Live stand-in CellProfiler processes of this run (their -o is under the run folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"fake-cellprofiler" in a for a in cmdline[:2]) and any(str(run).encode() in a for a in cmdline):
            found.append(int(entry.name))
    return found


def test_an_attempt_whose_output_is_closed_stops_its_cellprofiler(tmp_path):
    """On a worker, sshd closes a session's pipes when the controller's connection drops or its ssh
    client dies (also one of a shared connection, which GNU parallel's remote wrapper misses) and
    sends no SIGHUP: the runner notices its closed output, records why and ends CellProfiler."""
    run = make_run(tmp_path)
    proc = subprocess.Popen([sys.executable, str(run / runner.RUNNER), "run", "--run-dir", str(run), JOB],
                            env={**os.environ, "FAKE_MODE": "hang"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(400):
        if _fake_processes(run):
            break
        time.sleep(0.05)
    assert _fake_processes(run), "the stand-in CellProfiler never started"
    time.sleep(1.5)
    assert proc.poll() is None, "the runner ended while its output was still read"
    closed = time.monotonic()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.wait(30) == 128 + signal.SIGHUP
    assert time.monotonic() - closed < 10
    reason = (run / "failed" / JOB / "reason.txt").read_text()
    assert reason.startswith("stopped by SIGHUP after ") and "the SSH connection closed" in reason, reason
    for _ in range(100):
        if not _fake_processes(run):
            break
        time.sleep(0.1)
    assert not _fake_processes(run), "CellProfiler outlived its attempt"
    assert not runner.lock_is_held(str(run / "work" / JOB / "lock"))


def test_a_warm_worker_frees_each_jobs_garbage_and_keeps_the_rest_out_of_the_collector():
    """After a job a worker collects the job's cyclic garbage, then freezes what survives (its
    modules, CellProfiler's caches): a full collection over CellProfiler's ~220,000 objects took
    0.16 s per job, as long as a light pipeline's image set."""
    import gc
    import weakref

    class Node:
        pass

    freed: list[bool] = []
    gc.unfreeze()
    try:
        cycle = Node()
        cycle.me = cycle                  # type: ignore[attr-defined]
        weakref.finalize(cycle, freed.append, True)
        del cycle
        runner.WarmCellProfiler.settle()
        assert freed == [True]            # the job's garbage is gone
        assert gc.get_freeze_count() > 0  # and what survives is out of later collections' way
    finally:
        gc.unfreeze()
