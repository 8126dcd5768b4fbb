"""A job never holds part of what the pipeline aggregates over, as CellProfiler's own modules say it.

The pipelines are tests/data/*.cppipe (made from the shipped example pipelines by
tests/data/make_pipelines.py): an illumination correction over all image sets (CorrectIllumination-
Calculate "All: First cycle", which 5.0 reads as "All") applied before the nuclei are found and
measured, a MeasureImageQuality with experiment-wide thresholds, and one of many modules CellProfiler
says aggregate, or not. Real CellProfiler and GNU parallel; the merged tables equal one plain process.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_e2e_local import bpcp, single_process

from bpcp.cli import main
from bpcp.inputs import cellprofiler as cpmod

from merge_support import assert_table_equal

pytestmark = [pytest.mark.cellprofiler]

DATA = Path(__file__).resolve().parent / "data"
SPLIT_WARNING = ("Experiment-wide values for mean threshold, etc calculated by MeasureImageQuality may be "
                 "incorrect if the run is split into subsets of images.")


def plan(capsys, venv: str, out: Path, *args: str) -> tuple[int, list[str], list[str]]:
    code = main(["plan", "--cellprofiler", venv, "--output", str(out), *args])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


def variant(source: Path, dest: Path, *changes: tuple[str, str]) -> Path:
    text = source.read_text()
    for old, new in changes:
        assert old in text, old
        text = text.replace(old, new)
    dest.write_text(text)
    return dest


def assert_merged_equals(reference: Path, run: Path, tables=("Image", "Nuclei")) -> None:
    report = json.loads((run / "report.json").read_text())
    assert report["complete"], report["counts"]
    for table in tables:
        assert assert_table_equal(reference / f"{table}.csv", run / "merged" / f"{table}.parquet") > 0


@pytest.mark.parametrize("version", ["cp_venv", "cp42_venv"])
def test_the_probe_says_what_each_module_aggregates_in_cellprofilers_words(version, request, tmp_path, monkeypatch):
    monkeypatch.setenv("BPCP_CACHE", str(tmp_path / "cache"))
    cp = cpmod.locate(request.getfixturevalue(version))
    info = cpmod.probe(cp, DATA / "aggregators.cppipe")["pipeline"]
    found = {(a["module"], a["number"]): a for a in info["aggregation"]}
    per_group = {k for k, a in found.items() if a["scope"] == "group"}
    per_run = {k for k, a in found.items() if a["scope"] == "run"}
    # CorrectIlluminationCalculate "Each" (module 2) and Tile "Within cycles" (module 6) do not aggregate
    assert per_group == {("CorrectIlluminationCalculate", 3), ("MakeProjection", 4), ("Tile", 5),
                         ("TrackObjects", 8), ("RescaleIntensity", 11), ("SaveImages", 12)}
    assert per_run == {("MeasureImageQuality", 9), ("CalculateStatistics", 10)}
    assert found[("TrackObjects", 8)]["reason"] == "We connect objects across imagesets within a group = aggregation"
    assert found[("CorrectIlluminationCalculate", 3)]["reason"] == "Return True if aggregation is performed within a group"
    assert SPLIT_WARNING in found[("MeasureImageQuality", 9)]["warnings"]
    assert info["grouping_keys"] == [] and info["grouping_module"] is None


@pytest.mark.parametrize("version", ["cp_venv", "cp42_venv"])
def test_illumination_over_the_whole_run_is_one_job_equal_to_one_process(version, request, example_plate, tmp_path,
                                                                         capsys):
    venv = request.getfixturevalue(version)
    csv, pipeline = example_plate / "load_data.csv", DATA / "illum_loaddata.cppipe"
    # jobs per well would each compute their own illumination function: refused before anything starts
    out = tmp_path / "refused"
    code, _, err = plan(capsys, venv, out, "-d", str(csv), "-p", str(pipeline), "--group-by", "Plate,Well")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("bpcp: error: --group-by Metadata_Plate,Metadata_Well: would split what "
                             "CorrectIlluminationCalculate (module 2) aggregates over, every image set of the run"), err
    assert "leave --group-by out" in err[0] and not (out / "plan.json").exists()
    run = tmp_path / "run"
    proc = bpcp("run", "--cellprofiler", venv, "-d", str(csv), "-p", str(pipeline), "-o", str(run), "--slots", "2")
    assert "bpcp: warning: one job over all 16 image sets: CorrectIlluminationCalculate (module 2)" in proc.stdout
    assert len(json.loads((run / "plan.json").read_text())["jobs"]) == 1
    reference = single_process(venv, tmp_path / "ref", "-p", str(pipeline), "--data-file", str(csv))
    assert_merged_equals(reference, run)


def test_illumination_with_images_and_metadata_from_file_names_is_one_job(example_plate, cp_venv, tmp_path, capsys):
    """The case first seen: Images/Metadata/NamesAndTypes, Groups off, the default grouping."""
    pipeline = DATA / "illum_images.cppipe"
    code, out, _ = plan(capsys, cp_venv, tmp_path / "check", "-d", str(example_plate / "images"), "-p", str(pipeline),
                        "--check")
    assert code == 0 and any("would plan 1 jobs over 16 image sets" in line for line in out), out
    run = tmp_path / "run"
    bpcp("run", "--cellprofiler", cp_venv, "-d", str(example_plate / "images"), "-p", str(pipeline), "-o", str(run))
    reference = single_process(cp_venv, tmp_path / "ref", "-p", str(pipeline), "-i", str(example_plate / "images"))
    assert_merged_equals(reference, run)


def test_the_pipelines_groups_are_the_jobs_and_only_coarser_groupings_pass(example_plate, cp_venv, tmp_path, capsys):
    # the Groups module groups by Plate: the default is one job per plate, a job per well is refused
    by_plate = variant(DATA / "illum_images.cppipe", tmp_path / "by_plate.cppipe",
                       ("Do you want to group your images?:No", "Do you want to group your images?:Yes"),
                       ("    Metadata category:None", "    Metadata category:Plate"))
    images = str(example_plate / "images")
    code, out, _ = plan(capsys, cp_venv, tmp_path / "p1", "-d", images, "-p", str(by_plate), "--check", "--bundle", "0")
    assert code == 0 and any("would plan 1 jobs over 16 image sets" in line for line in out), out
    code, _, err = plan(capsys, cp_venv, tmp_path / "p2", "-d", images, "-p", str(by_plate), "--group-by", "Plate,Well")
    assert code == 2 and len(err) == 1, err
    assert "would split the pipeline's groups (it groups by Metadata_Plate in its Groups module, and " \
           "CorrectIlluminationCalculate (module 5) aggregates over each group)" in err[0], err
    assert not (tmp_path / "p2" / "plan.json").exists()

    # LoadData groups by Well: one group per well, bundled (CellProfiler keeps the wells apart in a job)
    csv = example_plate / "load_data.csv"
    by_well = variant(DATA / "illum_loaddata.cppipe", tmp_path / "by_well.cppipe",
                      ("Group images by metadata?:No", "Group images by metadata?:Yes"),
                      ("Select metadata tags for grouping:\n", "Select metadata tags for grouping:Well\n"))
    code, _, err = plan(capsys, cp_venv, tmp_path / "p3", "-d", str(csv), "-p", str(by_well), "--group-by", "Well,Site")
    assert code == 2 and "would split the pipeline's groups" in err[0] and len(err) == 1, err
    code, _, _ = plan(capsys, cp_venv, tmp_path / "p4", "-d", str(csv), "-p", str(by_well), "--group-by", "none", "--check")
    assert code == 0
    run = tmp_path / "run"
    bpcp("run", "--cellprofiler", cp_venv, "-d", str(csv), "-p", str(by_well), "-o", str(run), "--slots", "2",
         "--bundle", "auto")      # bundled, in warm workers (the default): illumination per well, job after job
    doc = json.loads((run / "plan.json").read_text())
    assert doc["group_by"] == ["Metadata_Well"] and [len(j["groups"]) for j in doc["jobs"]] == [4, 4]
    reference = single_process(cp_venv, tmp_path / "ref", "-p", str(by_well), "--data-file", str(csv))
    assert_merged_equals(reference, run)


def test_run_wide_values_split_over_jobs_are_said_in_the_plan_and_in_report_json(example_plate, cp_venv, tmp_path):
    run = tmp_path / "run"
    proc = bpcp("run", "--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"),
                "-p", str(DATA / "quality.cppipe"), "-o", str(run), "--group-by", "Site", "--bundle", "0")
    line = [x for x in proc.stdout.splitlines() if x.startswith("bpcp: warning: MeasureImageQuality (module 3)")]
    assert len(line) == 1 and SPLIT_WARNING in line[0] and "this plan runs 2 jobs" in line[0], proc.stdout
    report = json.loads((run / "report.json").read_text())
    assert report["complete"] and any(SPLIT_WARNING in w for w in report["warnings"]), report.get("warnings")
