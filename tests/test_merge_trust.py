"""Results you can trust, on real CellProfiler output (the session's loaddata_run): a merge is all
or nothing, even when killed; damaged published output is found, kept in damaged/ and rerun; a
corrupt CSV or a full disk is one line; merged URLs stay valid; merged/ agrees with report.json."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import require

from bpcp.results import merge as merge_mod
from bpcp.results.merge import MergeError, merge_run, run_merge, run_status
from bpcp.results.verify import run_verify

from merge_support import write_manifest

pytestmark = pytest.mark.cellprofiler
ROOT = Path(__file__).resolve().parents[1]
TABLES = ["Image", "Nuclei", "PH3", "Cells", "Cytoplasm"]


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("merged", "report.json", "damaged", ".merge*"))
    return dest


def jobs_of(run: Path) -> list[dict]:
    return json.loads((run / "plan.json").read_text())["jobs"]


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under folder -> its sha256 (the test's own, not bpcp's)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest_rows(run: Path, job: str) -> dict[str, int]:
    return json.loads((run / "published" / job / "bpcp-manifest.json").read_text())["rows"]


def assert_merged_consistent(run: Path, rows_of: dict[str, dict[str, int]], numbers_of: dict[str, list[int]]) -> list[str]:
    """Every merged table (parquet and csv) holds exactly the jobs merge.json names. Returns them."""
    merged = run / "merged"
    jobs = json.loads((merged / "merge.json").read_text())["jobs_merged"]
    images = sorted(n for j in jobs for n in numbers_of[j])
    for table in TABLES:
        parquet = pq.read_table(merged / f"{table}.parquet")
        assert parquet.num_rows == sum(rows_of[j][table] for j in jobs), (table, jobs)
        csv_rows = len((merged / f"{table}.csv").read_text().splitlines()) - 1
        assert csv_rows == parquet.num_rows, table
        found = set(parquet.column("ImageNumber").to_pylist())
        assert (found == set(images)) if table == "Image" else (found <= set(images)), table
    cells = pq.read_table(merged / "single_cell.parquet")
    assert cells.num_rows == sum(rows_of[j]["Cytoplasm"] for j in jobs)
    assert set(cells.column("Metadata_ImageNumber").to_pylist()) <= set(images)
    return jobs


# ---------------------------------------------------------------- 12.4 all or nothing, killed anywhere

KILLER = """
import os, signal, sys
from pathlib import Path
from bpcp.results.merge import run_merge
target, seen, log = int(sys.argv[2]), 0, []
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
STEPS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"}

def writes(args):
    mode, flags = args[1], args[2]
    return any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE)

def hook(event, args):
    global seen
    # renameat2 (the swap) is looked up right before it is called: that is its step
    if event in STEPS or (event == "open" and writes(args)) or (event == "ctypes.dlsym" and args[1] == "renameat2"):
        seen += 1
        log.append(event)
        if seen == target:
            os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
code = run_merge(Path(sys.argv[1]))
sys.stdout.flush()
print("EVENTS " + " ".join(log))
sys.exit(code)
"""


@pytest.mark.slow
def test_merge_killed_at_every_step_leaves_merged_all_old_or_all_new(loaddata_run, tmp_path, capsys):
    """SIGKILL of a merge before each file operation it makes (Python's audit hooks count them:
    no timing): merged/ is always all of the previous merge or all of the new one, status says
    whether report.json agrees, and the next merge puts everything right."""
    run = copy_run(loaddata_run[0], tmp_path / "run")
    jobs = [j["id"] for j in jobs_of(run)]
    rows_of = {j: manifest_rows(run, j) for j in jobs}
    numbers_of = {j["id"]: j["image_numbers"] for j in jobs_of(run)}
    # the previous merge: made while the last job was not published yet
    (run / "published" / jobs[-1]).rename(tmp_path / "held")
    merge_run(run)
    (tmp_path / "held").rename(run / "published" / jobs[-1])
    old = tmp_path / "old"
    shutil.copytree(run / "merged", old / "merged")
    shutil.copy(run / "report.json", old / "report.json")
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)}

    def restore_old() -> None:
        shutil.rmtree(run / "merged")
        shutil.copytree(old / "merged", run / "merged")
        shutil.copy(old / "report.json", run / "report.json")

    restore_old()
    full = subprocess.run([sys.executable, str(script), str(run), "0"], capture_output=True, text=True, env=env)
    assert full.returncode == 0, full.stderr[-2000:]
    events = full.stdout.split("EVENTS ", 1)[1].split()
    assert events.count("ctypes.dlsym") == 1, "the swap is one renameat2 call"
    # every step but the 2nd and later file removals of one rmtree (the same state as the first)
    points = [i + 1 for i, e in enumerate(events) if e != "os.remove" or events[i - 1] != "os.remove"]
    seen_states = set()
    for point in points:
        restore_old()
        killed = subprocess.run([sys.executable, str(script), str(run), str(point)], capture_output=True, text=True,
                                env=env)
        assert killed.returncode == -9, (point, events[point - 1], killed.stderr[-2000:])
        merged_jobs = assert_merged_consistent(run, rows_of, numbers_of)
        assert set(merged_jobs) in (set(jobs[:-1]), set(jobs)), point
        seen_states.add(len(merged_jobs))
        # status: report.json agrees with merged/ exactly when the files are the ones it lists
        report = json.loads((run / "report.json").read_text())
        agrees = {n: e["sha256"] for n, e in report["merged"]["files"].items()} == tree_digest(run / "merged")
        capsys.readouterr()
        code = run_status(run)
        err = capsys.readouterr().err
        if agrees and set(merged_jobs) == set(jobs):
            assert code == 0 and err == "", (point, err)
        elif agrees:
            assert code == 1 and "merged/ is out of date: 1 done jobs are not merged yet" in err, (point, err)
        else:
            assert code == 1 and "merged/ does not match report.json" in err, (point, err)
        assert len(err.splitlines()) <= 1
        # the next merge puts it right and leaves nothing behind
        result = merge_run(run)
        assert sorted(result.jobs_merged) == sorted(jobs)
        assert not list(run.glob(".merged-*")), point
        assert set(assert_merged_consistent(run, rows_of, numbers_of)) == set(jobs)
        capsys.readouterr()
        assert run_status(run) == 0, (point, capsys.readouterr())
    assert seen_states == {len(jobs) - 1, len(jobs)}, "kills fell both before and after the swap"


def test_killed_between_the_two_renames_of_the_fallback_swap(loaddata_run, tmp_path, monkeypatch, capsys):
    """Where renameat2 cannot swap (no RENAME_EXCHANGE), merged/ is renamed aside first: a crash
    right then leaves no merged/; status says so, and the next merge puts the previous one back
    first, then merges."""
    run = copy_run(loaddata_run[0], tmp_path / "run")
    merge_run(run)
    before = tree_digest(run / "merged")
    monkeypatch.setattr(merge_mod, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def crash_on_second(src, dst):
        if Path(src).name.startswith(".merged-new-"):
            raise KeyboardInterrupt("killed")        # as a SIGKILL here would: the first rename is done
        real_rename(src, dst)
    monkeypatch.setattr(merge_mod.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        merge_run(run)
    monkeypatch.setattr(merge_mod.os, "rename", real_rename)
    assert not (run / "merged").exists() and len(list(run.glob(".merged-old-*"))) == 1
    assert len(list(run.glob(".merged-new-*"))) == 1, "the new merge, complete, was not renamed in"
    capsys.readouterr()
    assert run_status(run) == 1
    assert "merged/ is missing: a merge was stopped while swapping it in" in capsys.readouterr().err
    merge_mod.recover(run)
    assert tree_digest(run / "merged") == before and not list(run.glob(".merged-*"))
    result = merge_run(run)          # the fallback swap itself, uninterrupted
    assert len(result.jobs_merged) == 3 and not list(run.glob(".merged-*"))
    assert run_status(run) == 0


def test_status_names_merged_files_changed_after_the_merge(loaddata_run, tmp_path, capsys):
    run = copy_run(loaddata_run[0], tmp_path / "run")
    merge_run(run)
    assert run_status(run) == 0
    with open(run / "merged" / "Nuclei.csv", "a") as fd:
        fd.write("1,2,3\n")
    capsys.readouterr()
    assert run_status(run) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bpcp status: merged/ does not match report.json: Nuclei.csv has ") and "`bpcp merge -o" in err
    assert len(err.splitlines()) == 1
    # report.json written by status keeps describing the merge, so it keeps saying so
    assert run_status(run) == 1
    assert run_verify(run) == 1
    assert "merged/ does not match report.json" in capsys.readouterr().out


def test_second_merge_at_once_is_refused_in_one_line(loaddata_run, tmp_path):
    import fcntl

    run = copy_run(loaddata_run[0], tmp_path / "run")
    with open(run / ".merge.lock", "w") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        fd.write("4242\n")
        fd.flush()
        with pytest.raises(MergeError, match=r"is being merged by process 4242 right now; wait for it to end"):
            merge_run(run)
    assert not (run / "merged").exists()


# ---------------------------------------------------------------- 12.5 damaged output: found, kept, rerun

def pending_by_jobs_sh(run: Path) -> list[str]:
    """The pending list as jobs.sh computes it: its own lines, run by bash in the run folder."""
    template = (ROOT / "bpcp" / "jobs" / "templates" / "jobs.sh.j2").read_text()
    loop = template[template.index("total=0"):template.index("done <joblist.tsv") + len("done <joblist.tsv")]
    (run / "joblist.tsv").write_text("".join(f"{j['id']}\t{len(j['image_numbers'])}\n" for j in jobs_of(run)))
    subprocess.run(["bash", "-c", loop], cwd=run, check=True)
    return [line.split("\t")[0] for line in (run / "pending.tsv").read_text().splitlines()]


@pytest.mark.parametrize("table", ["Nuclei", "Image"])
def test_table_truncated_at_a_row_boundary_is_moved_aside_and_rerun(loaddata_run, tmp_path, capsys, table):
    run = copy_run(loaddata_run[0], tmp_path / "run")
    job = jobs_of(run)[0]["id"]
    path = run / "published" / job / f"{table}.csv"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))        # one whole row less: a valid CSV
    size = path.stat().st_size
    kept = tree_digest(run / "published" / job)
    assert pending_by_jobs_sh(run) == []
    assert run_merge(run) == 1
    captured = capsys.readouterr()
    damaged = list((run / "damaged").glob(f"{job}-*/"))
    assert len(damaged) == 1 and tree_digest(damaged[0]) == kept, "moved whole, not changed"
    line = [x for x in captured.err.splitlines() if "damaged" in x]
    assert line == [f"bpcp merge: damaged: published/{job}: {table}.csv has {size} bytes, its manifest "
                    f"says {size + len(lines[-1])}; moved to damaged/{damaged[0].name}/ (kept, not merged); "
                    f"the next `bpcp run -o {run}` reruns it"]
    assert "Traceback" not in captured.out + captured.err
    assert pending_by_jobs_sh(run) == [job]
    report = json.loads((run / "report.json").read_text())
    assert report["damaged"][0]["job"] == job and report["damaged"][0]["folder"] == f"damaged/{damaged[0].name}"
    status = {j["id"]: j for j in report["jobs"]}[job]
    assert status["status"] == "missing" and f"moved to damaged/{damaged[0].name}/" in status["reason"]
    assert job not in report["merged"]["jobs"] and len(report["merged"]["jobs"]) == 2
    image = pq.read_table(run / "merged" / "Image.parquet").column("ImageNumber").to_pylist()
    assert not set(image) & set(jobs_of(run)[0]["image_numbers"])
    # the rerun publishes it again (here: the kept copy, repaired): done, merged, damaged/ kept
    shutil.copytree(damaged[0], run / "published" / job)
    (run / "published" / job / f"{table}.csv").write_bytes(b"".join(lines))
    assert run_merge(run) == 0
    assert list((run / "damaged").glob(f"{job}-*/")) == damaged


def test_same_size_damage_to_a_saved_image_needs_checksums(loaddata_run, tmp_path, capsys):
    """Tables are always checked by sha256; other files by size unless --checksums."""
    run = copy_run(loaddata_run[0], tmp_path / "run")
    job = jobs_of(run)[1]["id"]
    png = next((run / "published" / job).glob("*.png"))
    data = bytearray(png.read_bytes())
    data[len(data) // 2] ^= 0xFF
    png.write_bytes(bytes(data))
    assert run_merge(run) == 0, "without --checksums only sizes of non-table files are compared"
    assert run_verify(run) == 1
    out = capsys.readouterr().out
    assert f"bpcp: damaged: published/{job}: {png.name} differs from its manifest (sha256): `bpcp merge -o {run}` " \
           "moves it to damaged/ and the next `bpcp run` reruns it" in out.splitlines()
    proc = subprocess.run([sys.executable, "-m", "bpcp.cli", "merge", "-o", str(run), "--checksums"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert f"published/{job}: {png.name} differs from its manifest (sha256); moved to damaged/" in proc.stderr
    assert not (run / "published" / job).exists()


def test_same_size_damage_to_a_table_is_found_without_checksums(loaddata_run, tmp_path):
    run = copy_run(loaddata_run[0], tmp_path / "run")
    job = jobs_of(run)[2]["id"]
    path = run / "published" / job / "Cells.csv"
    data = bytearray(path.read_bytes())
    i = data.index(b",", len(data) // 2) + 1
    data[i] = ord("9") if data[i] != ord("9") else ord("8")       # one digit, same size
    path.write_bytes(bytes(data))
    result = merge_run(run)
    assert [d["job"] for d in result.damaged] == [job]
    assert result.damaged[0]["reason"] == "Cells.csv differs from its manifest (sha256)"


def test_corrupt_csv_of_a_job_without_manifest_is_one_line_and_moved_aside(loaddata_run, tmp_path):
    """A job published before manifests: DuckDB refuses its CSV; no traceback, the job goes aside."""
    run = copy_run(loaddata_run[0], tmp_path / "run")
    job = jobs_of(run)[1]["id"]
    (run / "published" / job / "bpcp-manifest.json").unlink()
    path = run / "published" / job / "Cells.csv"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] + b"\x00\xff,,\"\n" + data[len(data) // 2:len(data) * 3 // 4])
    proc = subprocess.run([sys.executable, "-m", "bpcp.cli", "merge", "-o", str(run)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("bpcp merge: damaged:")]
    assert len(lines) == 1 and lines[0].startswith(f"bpcp merge: damaged: published/{job}: Cells.csv cannot be parsed (")
    assert "moved to damaged/" in lines[0]
    assert "note: 1 published jobs have no bpcp-manifest.json" in proc.stdout
    assert not (run / "published" / job).exists() and len(list((run / "damaged").glob(f"{job}-*/"))) == 1


def test_empty_table_is_moved_aside(loaddata_run, tmp_path):
    run = copy_run(loaddata_run[0], tmp_path / "run")
    job = jobs_of(run)[2]["id"]
    (run / "published" / job / "PH3.csv").write_text("")
    write_manifest(run / "published" / job)          # even when its manifest agrees
    result = merge_run(run)
    assert result.damaged == [{"job": job, "folder": result.damaged[0]["folder"], "reason": "PH3.csv is empty (no header line)"}]


def test_run_folder_from_before_manifests(loaddata_run, tmp_path, capsys):
    run = copy_run(loaddata_run[0], tmp_path / "run")
    for job in jobs_of(run):
        (run / "published" / job["id"] / "bpcp-manifest.json").unlink()
    assert run_merge(run) == 0
    assert "note: 3 published jobs have no bpcp-manifest.json (published before bpcp wrote manifests" in capsys.readouterr().out
    assert run_verify(run) == 0
    out = capsys.readouterr().out
    assert "bpcp: 3 published jobs have no bpcp-manifest.json" in out and "they cannot be checked" in out
    assert "merged/ matches report.json" in out


def test_verify_a_sound_run(loaddata_run, tmp_path):
    run = copy_run(loaddata_run[0], tmp_path / "run")
    merge_run(run)
    proc = subprocess.run([sys.executable, "-m", "bpcp.cli", "verify", "-o", str(run)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[:2] == ["bpcp: 3 published jobs match their manifests",
                                            "bpcp: merged/ matches report.json (15 files, sha256)"]
    assert not (run / "damaged").exists()


# ---------------------------------------------------------------- 12.9 a full disk while merging

def test_disk_full_while_merging_is_one_line_and_harms_nothing(loaddata_run, tmp_path):
    """On a small tmpfs: the room left shrinks until the merge fails at its different steps; each
    time one line names the folder and what was being written; published/, merged/ and report.json
    stay as they were; after space is freed the merge just works."""
    require("tmpfs mount (root)", os.geteuid() == 0 and shutil.which("mount"),
            "this test mounts a tmpfs: run it as root (CI does)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    try:
        run = copy_run(loaddata_run[0], mnt / "run")
        merge_run(run)
        before = {name: tree_digest(run / name) for name in ("published", "merged")}
        report = (run / "report.json").read_bytes()
        steps = set()
        for room in (0, 1 << 14, 1 << 16, 1 << 18, 1 << 19, 3 << 18, 1 << 20, 3 << 19, 1 << 21, 1 << 22):
            filler = mnt / "filler"
            filler.unlink(missing_ok=True)
            st = os.statvfs(mnt)
            with open(filler, "wb") as fd:
                fd.write(b"\0" * max(st.f_bavail * st.f_frsize - room, 0))
            proc = subprocess.run([sys.executable, "-c", "import sys; from bpcp.results.merge import run_merge; "
                                   "sys.exit(run_merge(sys.argv[1]))", str(run)],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 2:
                break
            assert "Traceback" not in proc.stderr, proc.stderr
            line = proc.stderr.strip()
            assert len(line.splitlines()) == 1, line
            assert line.startswith(f"bpcp merge: error: no space left on device in {run} while writing "), line
            assert line.endswith(f": free some space there and run `bpcp merge -o {run}` again "
                                 "(published/ and the previous merged/ are as they were)"), line
            steps.add(line.split(" while writing ")[1].split(":")[0])
            assert {name: tree_digest(run / name) for name in ("published", "merged")} == before
            assert (run / "report.json").read_bytes() == report
            assert not list(run.glob(".merged-*")) and not list(run.glob("*.tmp"))
        assert len(steps) >= 3, steps
        (mnt / "filler").unlink(missing_ok=True)
        result = merge_run(run)
        assert len(result.jobs_merged) == 3
        assert run_status(run) == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# ---------------------------------------------------------------- 12.10 saved-image URLs stay valid

def test_saved_image_urls_are_valid_in_a_run_folder_with_spaces_and_accents(loaddata_run, tmp_path):
    run = copy_run(loaddata_run[0], tmp_path / "my runs" / "plaque é+1")
    merge_run(run)
    image = pq.read_table(run / "merged" / "Image.parquet").to_pylist()
    for row in image:
        url = row["URL_OrigOverlay"]
        assert " " not in url and url.isascii() and url.startswith("file:///"), url
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        assert path.is_file() and path.parent.parent == run / "published", url
        assert url == path.as_uri()
        assert Path(row["PathName_OrigOverlay"]) == path.parent and row["FileName_OrigOverlay"] == path.name
        job = next(j for j in jobs_of(run) if row["ImageNumber"] in j["image_numbers"])
        assert path.parent.name == job["id"]
