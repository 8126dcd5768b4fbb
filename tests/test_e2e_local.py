"""End to end on this host with real CellProfiler and real GNU parallel: bpcp's merged per-group
output must equal one single CellProfiler process over the same data, row for row and value for
value (timing columns aside), for every kind of dataset and both CellProfiler versions."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import require

from merge_support import assert_table_equal

pytestmark = [pytest.mark.cellprofiler, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT.parent / "shared").resolve()
TABLES = ("Image", "Nuclei", "PH3", "Cells", "Cytoplasm")
BPCP = [sys.executable, "-m", "bpcp.cli"]


def cp_argv(venv: str) -> list[str]:
    exe = str(Path(venv) / "bin" / "cellprofiler")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, env=cp_env()).stdout.strip()
    return [exe] + ([] if version.startswith("4") else ["-e", "imageio_reader"])


def cp_env() -> dict[str, str]:
    env = dict(os.environ)
    if Path("/usr/lib/jvm/java-17-openjdk-amd64").is_dir():
        env.setdefault("JAVA_HOME", "/usr/lib/jvm/java-17-openjdk-amd64")
    return env


def single_process(venv: str, out: Path, *inputs: str) -> Path:
    """The reference: one CellProfiler process over the whole dataset."""
    if not (out / "Image.csv").exists():
        out.mkdir(parents=True, exist_ok=True)
        argv = cp_argv(venv) + ["-c", "-r", *inputs, "-o", str(out), "-d", str(out / "done.txt")]
        subprocess.run(argv, check=False, capture_output=True, env=cp_env(), timeout=900)
        assert (out / "done.txt").read_text().strip() == "Complete"
    return out


def bpcp(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(BPCP + list(args), capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_merged_equals(reference: Path, run: Path, tables=TABLES) -> None:
    report = json.loads((run / "report.json").read_text())
    assert report["complete"], report["counts"]
    for table in tables:
        rows = assert_table_equal(reference / f"{table}.csv", run / "merged" / f"{table}.parquet", ref_out=reference)
        assert rows > 0 or table == "PH3"


@pytest.fixture(scope="module")
def reference_loaddata(example_plate, cp_venv, tmp_path_factory) -> Path:
    plate = example_plate
    return single_process(cp_venv, tmp_path_factory.mktemp("ref-loaddata"),
                          "-p", str(plate / "example_loaddata.cppipe"), "--data-file", str(plate / "load_data.csv"))


def test_loaddata_run_equals_single_process(example_plate, cp_venv, reference_loaddata, tmp_path):
    run = tmp_path / "run"
    # --bundle auto (the default without warm workers; here bundles run in warm workers): about one
    # job per slot (8 wells of 2 sites on 2 slots: 2 jobs of 4 wells)
    proc = bpcp("run", "--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"),
                "-p", str(example_plate / "example_loaddata.cppipe"), "-o", str(run), "--slots", "2", "--bundle", "auto")
    assert "COMPLETE: 2/2 jobs done, 8/8 groups, 16/16 image sets" in proc.stdout
    assert "bundled for 2 slots" in proc.stdout
    assert_merged_equals(reference_loaddata, run)
    cells = pq.read_table(run / "merged" / "single_cell.parquet")
    assert cells.num_rows == pq.read_table(run / "merged" / "Cytoplasm.parquet").num_rows
    # every job's own output folder, log and record are kept under published/
    for job in json.loads((run / "plan.json").read_text())["jobs"]:
        record = json.loads((run / "published" / job["id"] / "bpcp-job.json").read_text())
        assert record["image_sets"] == len(job["image_numbers"]) == 8 and len(job["groups"]) == 4
        assert (run / "published" / job["id"] / "cellprofiler.log").exists()
    # a second run finds nothing to do and changes nothing
    again = bpcp("run", "-o", str(run))
    assert "2 of 2 jobs already published, 0 to run" in again.stdout
    # nor does one for more slots: automatic bundling keeps the jobs already planned
    more = bpcp("run", "--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"),
                "-p", str(example_plate / "example_loaddata.cppipe"), "-o", str(run), "--slots", "8", "--bundle", "auto")
    assert "same as the plan already there" in more.stdout
    assert "2 of 2 jobs already published, 0 to run" in more.stdout


def test_folder_run_equals_single_process(example_plate, cp_venv, tmp_path):
    plate = example_plate
    reference = single_process(cp_venv, tmp_path / "ref", "-p", str(plate / "example_images.cppipe"),
                               "-i", str(plate / "images"))
    run = tmp_path / "run"
    bpcp("run", "--cellprofiler", cp_venv, "-d", str(plate / "images"), "-p", str(plate / "example_images.cppipe"),
         "-o", str(run), "--group-by", "Plate,Well,Site", "--bundle", "0")
    assert len(json.loads((run / "plan.json").read_text())["jobs"]) == 16
    assert_merged_equals(reference, run)


def injected(token: str, *roots: Path) -> list[Path]:
    """Files a marker payload made if a shell ever ran it: in any folder a job's shell or
    CellProfiler could have had as its working folder (recursively under the test's own)."""
    found = [p for root in roots for p in root.rglob(f"*{token}*") if p.name.startswith("bpcp-injected-")]
    for folder in (ROOT, ROOT / "tests", Path.cwd(), Path.home(), Path("/tmp"), Path("/"), Path("/mnt/bpcp-ramdisk")):
        found += list(folder.glob(f"bpcp-injected-{token}*"))
    return found


def test_file_list_with_odd_group_values(example_plate, cp_venv, tmp_path):
    """Plate names with spaces, quotes, ';' and $(...) are data, never shell. The payloads are
    markers (touch a file named with a random token), looked for wherever a shell could make them."""
    images = tmp_path / "images"
    images.mkdir()
    token = secrets.token_hex(6)
    plates = {"Plate1": f"P 1; touch bpcp-injected-{token}-a", "Plate2": f"$(touch bpcp-injected-{token}-b)_x'y\""}
    lines = []
    for src in sorted((example_plate / "images").glob("Plate1_A0[12]_s1_*.png")):
        for _i, (_old, new) in enumerate(plates.items()):
            name = src.name.replace("Plate1", new)
            shutil.copy(src, images / name)
            lines.append(str(images / name))
    (tmp_path / "files.txt").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    proc = bpcp("run", "--cellprofiler", cp_venv, "-d", str(tmp_path / "files.txt"),
                "-p", str(example_plate / "example_images.cppipe"), "-o", str(run), "--bundle", "0")
    assert "COMPLETE: 4/4 jobs done" in proc.stdout
    image = pq.read_table(run / "merged" / "Image.parquet").to_pylist()
    assert sorted({r["Metadata_Plate"] for r in image}) == sorted(plates.values())
    assert injected(token, tmp_path) == []
    script = (run / "jobs.sh").read_text()
    assert token not in script and "$(touch" not in script


@pytest.mark.parametrize("version", ["cp_venv", "cp42_venv"])
def test_example_human_equals_single_process(version, request, tmp_path):
    example = SHARED / "data" / "ExampleHuman"
    require("CellProfiler's ExampleHuman data", example.is_dir(), f"{example} not present (shared/ beside the repository)")
    venv = request.getfixturevalue(version)
    reference = single_process(venv, tmp_path / "ref", "-p", str(example / "ExampleHuman.cppipe"),
                               "-i", str(example / "images"))
    run = tmp_path / "run"
    bpcp("run", "--cellprofiler", venv, "-d", str(example / "images"), "-p", str(example / "ExampleHuman.cppipe"),
         "-o", str(run), "--group-by", "none")
    assert_merged_equals(reference, run)


def test_cellprofiler_42_run_equals_single_process(example_plate, cp42_venv, tmp_path):
    plate = example_plate
    reference = single_process(cp42_venv, tmp_path / "ref", "-p", str(plate / "example_loaddata.cppipe"),
                               "--data-file", str(plate / "load_data.csv"))
    run = tmp_path / "run"
    bpcp("run", "--cellprofiler", cp42_venv, "-d", str(plate / "load_data.csv"),
         "-p", str(plate / "example_loaddata.cppipe"), "-o", str(run), "--bundle", "0")
    plan = json.loads((run / "plan.json").read_text())
    assert plan["cellprofiler"]["version"].startswith("4.2")
    assert len(plan["jobs"]) == 8, "one job per well: the merge must put 8 separate 4.2 processes together"
    command = subprocess.run([sys.executable, str(run / "bpcp_runner.py"), "command", "--run-dir", str(run),
                              plan["jobs"][0]["id"]], capture_output=True, text=True, check=True)
    env = json.loads(command.stdout)["env"]
    assert env["JAVA_TOOL_OPTIONS"] == "-XX:ActiveProcessorCount=1 -XX:+UseSerialGC" and env["OMP_NUM_THREADS"] == "1"
    assert_merged_equals(reference, run)


MAKE_BATCH = r"""
import sys
import cellprofiler_core.preferences as prefs
prefs.set_headless()
from cellprofiler_core.utilities.core.modules import fill_modules, instantiate_module
fill_modules()
from cellprofiler_core.pipeline import Pipeline
src, dest, out = sys.argv[1:4]
pipeline = Pipeline()
pipeline.load(src)
groups = [m for m in pipeline.modules() if m.module_name == "Groups"][0]
groups.wants_groups.value = True
groups.grouping_metadata[0].metadata_choice.value = "Plate"
groups.add_grouping_metadata()
groups.grouping_metadata[1].metadata_choice.value = "Well"
batch = instantiate_module("CreateBatchFiles")
batch.set_module_num(len(pipeline.modules()) + 1)
batch.wants_default_output_directory.value = False
batch.custom_output_directory.value = out
pipeline.add_module(batch)
with open(dest, "w") as fd:
    pipeline.dump(fd)
"""


def test_batch_data_h5_runs_groups_with_g(example_plate, cp_venv, tmp_path):
    plate = example_plate
    grouped = tmp_path / "grouped.cppipe"
    batch_dir = tmp_path / "batch"
    subprocess.run([str(Path(cp_venv) / "bin" / "python"), "-c", MAKE_BATCH, str(plate / "example_images.cppipe"),
                    str(grouped), str(batch_dir)], check=True, capture_output=True, env=cp_env())
    subprocess.run(cp_argv(cp_venv) + ["-c", "-r", "-p", str(grouped), "-i", str(plate / "images"),
                                       "-o", str(batch_dir)], capture_output=True, env=cp_env())
    batch = batch_dir / "Batch_data.h5"
    assert batch.exists(), "CreateBatchFiles wrote no Batch_data.h5"
    reference = single_process(cp_venv, tmp_path / "ref", "-p", str(batch))
    run = tmp_path / "run"
    bpcp("run", "--cellprofiler", cp_venv, "-p", str(batch), "-o", str(run))
    plan = json.loads((run / "plan.json").read_text())
    assert plan["numbering"] == "global" and len(plan["jobs"]) == 8
    assert_merged_equals(reference, run)
    # grouping that the batch file cannot run is refused before anything starts
    proc = bpcp("plan", "--cellprofiler", cp_venv, "-p", str(batch), "-o", str(tmp_path / "r2"),
                "--group-by", "Plate", check=False)
    assert proc.returncode == 2 and "the batch file groups by Metadata_Plate,Metadata_Well" in proc.stderr


# ------------------------------------------------------------------ kill and resume

def _processes(session: int) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session:
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
    return found


def _published(run: Path) -> dict[str, float]:
    out = {}
    for folder in (run / "published").glob("*"):
        out[folder.name] = json.loads((folder / "bpcp-job.json").read_text())["started"]
    return out


def test_kill_midway_then_rerun_finishes_each_group_exactly_once(cp_venv, tmp_path, reference_loaddata,
                                                                  example_plate):
    run = tmp_path / "run"
    args = ["run", "--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"),
            "-p", str(example_plate / "example_loaddata.cppipe"), "-o", str(run), "--retries", "1", "--bundle", "0",
            "--no-warm-workers"]     # a CellProfiler process per job, orphaned when parallel is killed
    first = subprocess.Popen(BPCP + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    killed_parallel = killed_cp = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None:
        procs = _processes(first.pid)
        cps = [p for p, cmd in procs.items() if "cellprofiler" in cmd and " -c -r " in cmd]
        parallel = [p for p, cmd in procs.items() if cmd.startswith(("perl /usr/bin/parallel", "/usr/bin/perl"))
                    and "parallel" in cmd]
        if len(_published(run)) >= 1 and len(cps) >= 2 and parallel:
            os.kill(parallel[0], signal.SIGKILL)
            os.kill(cps[0], signal.SIGKILL)
            killed_parallel, killed_cp = parallel[0], cps[0]
            break
        time.sleep(0.2)
    assert killed_parallel and killed_cp, "never saw a published job alongside two running CellProfilers"
    out = first.communicate(timeout=600)[0].decode()
    assert first.returncode != 0, out            # the interrupted run says it is incomplete
    before = _published(run)
    assert 1 <= len(before) < 8, before

    second = bpcp(*args)
    after = _published(run)
    assert sorted(after) == sorted(j["id"] for j in json.loads((run / "plan.json").read_text())["jobs"])
    for job, started in before.items():
        assert after[job] == started, f"{job} was processed again"
    assert "jobs already published" in second.stdout
    assert not list((run / "failed").iterdir()), "a failure record outlived the job's success"
    image = pq.read_table(run / "merged" / "Image.parquet")["ImageNumber"].to_pylist()
    assert sorted(image) == list(range(1, 17))
    assert_merged_equals(reference_loaddata, run)
