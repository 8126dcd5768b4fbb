"""One command holds a run folder at a time; writes are atomic; a full disk is one line and then resumes."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

from bpcp.errors import BpcpError
from bpcp.runfolder import RunFolder, hold, write_atomic

BPCP = [sys.executable, "-m", "bpcp"]
HOLDER = """
import sys, time
from pathlib import Path
from bpcp.runfolder import RunFolder, hold
with hold(RunFolder(Path(sys.argv[1])), "bpcp run"):
    print("held", flush=True)
    time.sleep(60)
"""


@contextlib.contextmanager
def held_elsewhere(run: Path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_command_is_told_who_holds_the_folder(tmp_path):
    run = tmp_path / "run"
    with held_elsewhere(run) as other:
        with pytest.raises(BpcpError, match=rf"in use by bpcp run \(process {other.pid} on .*\); wait for it"), \
                hold(RunFolder(run), "bpcp merge"):
            pass
        proc = subprocess.run(BPCP + ["merge", "-o", str(run)], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"bpcp: error: {run}: in use by bpcp run (process {other.pid}")
        assert "Traceback" not in proc.stderr
    with hold(RunFolder(run), "bpcp merge"), hold(RunFolder(run), "bpcp merge"):   # free again; re-entrant
        pass


def test_write_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "plan.json"
    write_atomic(target, "old")
    with pytest.raises(TypeError):
        write_atomic(target, None)        # type: ignore[arg-type]   # fails while writing
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 64 KiB (root only): room for a little, not for a run."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    require("tmpfs mount", proc.returncode == 0, f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.cellprofiler
def test_disk_full_is_one_line_and_the_next_run_just_works(example_plate, cp_venv, small_disk):
    """Planning and running into a full disk: one line naming the file, exit 2; after the disk grows
    the same command finishes and nothing half-written is used."""
    run = small_disk / "run"
    args = ["run", "--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"),
            "-p", str(example_plate / "example_loaddata.cppipe"), "-o", str(run), "--only", "Well=A01"]
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (40 << 10))          # leaves less room than the pipeline copy needs
    proc = subprocess.run(BPCP + args, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left on its device" in lines[0] and str(small_disk) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    proc = subprocess.run(BPCP + ["plan", *args[1:]], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # now the job itself runs out of space: it fails (recorded), nothing is published half-way
    free = os.statvfs(small_disk)
    filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - (24 << 10)))
    proc = subprocess.run(BPCP + args, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert not (run / "published").exists() or not list((run / "published").iterdir())
    filler.unlink()
    proc = subprocess.run(BPCP + args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "COMPLETE: 1/1 jobs done" in proc.stdout
    assert not list(Path(run).rglob(".*.tmp"))


@pytest.mark.cellprofiler
def test_jobs_run_what_the_plan_says(example_plate, cp_venv, tmp_path):
    """A pipeline copy left by another plan is replaced by planning; a per-job input changed after
    planning stops `bpcp run` before any job starts, and planning again rewrites it."""
    run = tmp_path / "run"
    args = ["--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"), "-o", str(run), "--only", "Well=A01"]
    first = subprocess.run(BPCP + ["plan", *args, "-p", str(example_plate / "example_loaddata.cppipe")],
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    # plan.json deleted, then planned with another pipeline: the copy jobs run is the new one
    other = tmp_path / "other.cppipe"
    other.write_text((example_plate / "example_loaddata.cppipe").read_text() + "\n")   # another file, same analysis
    (run / "plan.json").unlink()
    (run / "pipeline.cppipe").write_bytes(b"")             # as a full disk left it, too
    second = subprocess.run(BPCP + ["plan", *args, "-p", str(other)], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert (run / "pipeline.cppipe").read_bytes() == other.read_bytes()
    # an input changed behind the plan's back: refused in one line, nothing runs
    job_input = next((run / "inputs").glob("*.csv"))
    job_input.write_text(job_input.read_text().replace("Plate1", "PlateX"))
    refused = subprocess.run(BPCP + ["run", "-o", str(run)], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stdout + refused.stderr
    assert "differ from plan.json" in refused.stderr and job_input.name in refused.stderr
    assert not list((run / "published").iterdir())
    fixed = subprocess.run(BPCP + ["run", *args, "-p", str(other)], capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "PlateX" not in job_input.read_text() and "COMPLETE: 1/1 jobs done" in fixed.stdout


def test_wait_waits_for_the_holder_then_runs(tmp_path):
    run = tmp_path / "run"
    with held_elsewhere(run) as other:
        waiter = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                                   "from bpcp.runfolder import RunFolder, hold\n"
                                   "with hold(RunFolder(Path(sys.argv[1])), 'bpcp run', wait=True):\n print('got it')",
                                   str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(3)                     # still waiting while the other process holds it
        other.kill()
        out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out.strip() == "got it"
    assert f"in use by bpcp run (process {other.pid}" in err and "waiting for it to end" in err
