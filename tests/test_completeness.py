"""completeness(): done / incomplete / failed / running / missing, from the run folder alone."""
from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bpcp.errors import BpcpError
from bpcp.results.completeness import completeness, summary
from bpcp.results.merge import merge_run, run_merge, run_status


def test_no_plan_is_a_clear_error(tmp_path):
    with pytest.raises(BpcpError, match="no plan.json here"):
        completeness(tmp_path)
    assert run_status(tmp_path) == 2


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("merged", "report.json"))
    return dest


@pytest.mark.cellprofiler
def test_complete_run(loaddata_run, tmp_path, capsys):
    run = _copy(loaddata_run[0], tmp_path / "run")
    report = completeness(run)
    assert report["complete"] is True
    assert report["counts"]["jobs"] == {"expected": 3, "done": 3, "incomplete": 0, "failed": 0,
                                        "running": 0, "missing": 0}
    assert report["counts"]["groups"]["done"] == 4 and report["counts"]["image_sets"]["done"] == 8
    assert json.loads((run / "report.json").read_text()) == report
    assert run_status(run) == 0
    assert capsys.readouterr().out.startswith("COMPLETE: 3/3 jobs done, 4/4 groups, 8/8 image sets")


@pytest.mark.cellprofiler
def test_every_status_with_its_reason(loaddata_run, tmp_path, capsys):
    """Job 1 lost its Cells table, job 2 failed, job 3 is done, two more are running / missing."""
    run = _copy(loaddata_run[0], tmp_path / "run")
    plan = json.loads((run / "plan.json").read_text())
    big, failed_job, done_job = plan["jobs"]
    (run / "published" / big["id"] / "Cells.csv").unlink()
    (run / "failed" / failed_job["id"]).mkdir(parents=True)
    (run / "published" / failed_job["id"]).rename(run / "failed" / failed_job["id"] / "out")
    (run / "failed" / failed_job["id"] / "reason.txt").write_text(
        "CellProfiler wrote Failure to done.txt (exit 255)\nsecond line is not the reason\n")
    for extra, wells in (("Plate1_B01-00000001", ["B01"]), ("Plate1_B02-00000002", ["B02", "B03"])):
        plan["jobs"].append({"id": extra, "groups": [{"Metadata_Plate": "Plate1", "Metadata_Well": w} for w in wells],
                             "image_numbers": [100 + len(plan["jobs"])], "group_numbers": [1],
                             "group_indexes": [9], "input": None, "group_arg": None})
    (run / "plan.json").write_text(json.dumps(plan))
    (run / "work" / "Plate1_B01-00000001").mkdir(parents=True, exist_ok=True)
    running = open(run / "work" / "Plate1_B01-00000001" / "lock", "w")   # an attempt holds its lock
    fcntl.flock(running, fcntl.LOCK_EX)

    report = completeness(run)
    running.close()
    status = {j["id"]: j for j in report["jobs"]}
    assert report["complete"] is False
    assert status[big["id"]]["status"] == "incomplete"
    assert status[big["id"]]["missing_tables"] == ["Cells"]
    assert "Cells.csv" in status[big["id"]]["reason"]
    assert status[failed_job["id"]] == {**status[failed_job["id"]], "status": "failed",
                                        "reason": "CellProfiler wrote Failure to done.txt (exit 255)"}
    assert status[done_job["id"]]["status"] == "done"
    assert status["Plate1_B01-00000001"]["status"] == "running"
    assert status["Plate1_B02-00000002"]["status"] == "missing"
    groups = report["counts"]["groups"]
    assert groups == {"expected": 7, "done": 1, "incomplete": 2, "failed": 1, "running": 1, "missing": 2}
    assert report["counts"]["image_sets"]["expected"] == 10

    text = summary(report)
    assert text.splitlines()[0] == "INCOMPLETE: 1/5 jobs done, 1/7 groups, 2/10 image sets"
    assert f"failed     {failed_job['id']}: CellProfiler wrote Failure" in text
    assert "Cells.csv" in text

    # merge what is there: only the done job, with its global numbers; nothing deleted (the
    # incomplete job is moved, whole, to damaged/ so that the next run reruns it)
    def job_files() -> list[tuple[str, Path]]:
        folders = [*(run / "published").iterdir(), *(p for p in (run / "damaged").glob("*") if p.is_dir())]
        return sorted((f.name[:len(big["id"])] if f.name.startswith(big["id"]) else f.name, p.relative_to(f))
                      for f in folders for p in f.rglob("*"))
    before = job_files()
    assert run_merge(run) == 1
    out = capsys.readouterr().out
    assert "INCOMPLETE" in out and "Image.parquet" in out
    assert pq.read_table(run / "merged" / "Image.parquet").column("ImageNumber").to_pylist() == done_job["image_numbers"]
    assert json.loads((run / "merged" / "merge.json").read_text())["jobs_merged"] == [done_job["id"]]
    assert job_files() == before
    assert not (run / "published" / big["id"]).exists() and len(list((run / "damaged").glob(big["id"] + "-*/"))) == 1


@pytest.mark.cellprofiler
def test_short_image_table_is_incomplete(loaddata_run, tmp_path):
    """Exit codes lie: a published job whose Image table lacks image sets is not done."""
    run = _copy(loaddata_run[0], tmp_path / "run")
    job = json.loads((run / "plan.json").read_text())["jobs"][0]
    image = run / "published" / job["id"] / "Image.csv"
    image.write_text("".join(image.read_text().splitlines(keepends=True)[:-1]))
    status = {j["id"]: j for j in completeness(run)["jobs"]}[job["id"]]
    assert status["status"] == "incomplete"
    assert status["reason"] == "Image.csv has 3 rows, the plan expects 4"
    result = merge_run(run)
    assert job["id"] in result.jobs_skipped
    assert pq.read_table(run / "merged" / "Image.parquet").num_rows == 4
