"""Every bad input bpcp handles: one clear line per problem, exit 2, nothing started or written.

These run the real `bpcp plan` command (in-process) against real CellProfiler, which loads the
pipeline; no job runs.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bpcp.cli import main

pytestmark = pytest.mark.cellprofiler


@pytest.fixture()
def plate(example_plate, tmp_path) -> Path:
    """A private copy of the example plate's CSV and pipelines, pointing at the shared images."""
    for name in ("load_data.csv", "example_loaddata.cppipe", "example_images.cppipe"):
        shutil.copy(example_plate / name, tmp_path / name)
    return tmp_path


def plan(capsys, cp_venv, out: Path, *args: str) -> tuple[int, list[str]]:
    code = main(["plan", "--cellprofiler", cp_venv, "--output", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_refused(code: int, err: list[str], *expected: str, out: Path | None = None) -> None:
    assert code == 2, err
    assert err and all(line.startswith("bpcp: error: ") for line in err), err
    for text in expected:
        assert any(text in line for line in err), (text, err)
    if out is not None:
        assert not (out / "plan.json").exists()


def test_missing_pipeline(capsys, cp_venv, plate):
    out = plate / "run"
    code, err = plan(capsys, cp_venv, out, "-d", str(plate / "load_data.csv"), "-p", str(plate / "nope.cppipe"))
    assert_refused(code, err, "nope.cppipe: pipeline not found", out=out)


def test_pipeline_that_does_not_load(capsys, cp_venv, plate):
    bad = plate / "broken.cppipe"
    bad.write_text("CellProfiler Pipeline: http://www.cellprofiler.org\nVersion:5\nNotAModule:[module_num:1]\n")
    out = plate / "run"
    code, err = plan(capsys, cp_venv, out, "-d", str(plate / "load_data.csv"), "-p", str(bad))
    assert_refused(code, err, "broken.cppipe: CellProfiler", "cannot load it", out=out)


def test_unknown_group_key_lists_the_keys_there_are(capsys, cp_venv, plate):
    out = plate / "run"
    code, err = plan(capsys, cp_venv, out, "-d", str(plate / "load_data.csv"),
                     "-p", str(plate / "example_loaddata.cppipe"), "--group-by", "Plate,Row")
    assert_refused(code, err, "group key Metadata_Row not found", "Metadata_Plate, Metadata_Well, Metadata_Site",
                   out=out)
    assert len(err) == 1


def test_empty_dataset(capsys, cp_venv, plate):
    csv = plate / "load_data.csv"
    csv.write_text(csv.read_text().splitlines()[0] + "\n")
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(csv), "-p", str(plate / "example_loaddata.cppipe"))
    assert_refused(code, err, "no image sets (only a header)", out=plate / "run")


def test_missing_image_names_the_image_set_and_file(capsys, cp_venv, plate):
    csv = plate / "load_data.csv"
    lines = csv.read_text().splitlines()
    lines[3] = lines[3].replace("Plate1_A02_s1_w2.png", "Plate1_A02_s1_w2_MISSING.png")
    csv.write_text("\n".join(lines) + "\n")
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(csv), "-p", str(plate / "example_loaddata.cppipe"))
    assert_refused(code, err, "image set 3 refers to", "Plate1_A02_s1_w2_MISSING.png, which does not exist",
                   out=plate / "run")


def test_malformed_csv(capsys, cp_venv, plate):
    csv = plate / "load_data.csv"
    lines = csv.read_text().splitlines()
    lines[2] += ",an extra field"
    csv.write_text("\n".join(lines) + "\n")
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(csv), "-p", str(plate / "example_loaddata.cppipe"))
    assert_refused(code, err, "load_data.csv: malformed CSV", out=plate / "run")


def test_group_filter_that_matches_nothing(capsys, cp_venv, plate):
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(plate / "load_data.csv"),
                     "-p", str(plate / "example_loaddata.cppipe"), "--only", "Plate=Plate9")
    assert_refused(code, err, "--only Metadata_Plate=Plate9: matches no group", out=plate / "run")


def test_output_folder_not_writable(capsys, cp_venv, plate):
    out = Path("/proc/bpcp-test-run")
    code, err = plan(capsys, cp_venv, out, "-d", str(plate / "load_data.csv"),
                     "-p", str(plate / "example_loaddata.cppipe"))
    assert_refused(code, err, "/proc/bpcp-test-run: output folder not writable")


def test_output_folder_is_a_file(capsys, cp_venv, plate):
    out = plate / "a-file"
    out.write_text("x")
    code, err = plan(capsys, cp_venv, out / "run", "-d", str(plate / "load_data.csv"),
                     "-p", str(plate / "example_loaddata.cppipe"))
    assert_refused(code, err, "output folder not writable")


def test_group_values_that_differ_only_by_case_or_padding(capsys, cp_venv, plate):
    csv = plate / "load_data.csv"
    lines = csv.read_text().splitlines()
    lines[1] = lines[1].replace("Plate1,A01,", "Plate1,a1,", 1)
    csv.write_text("\n".join(lines) + "\n")
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(csv), "-p", str(plate / "example_loaddata.cppipe"))
    assert_refused(code, err, "Metadata_Well values 'A01' and 'a1' differ only by case or zero padding",
                   out=plate / "run")


def test_empty_group_value(capsys, cp_venv, plate):
    csv = plate / "load_data.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].replace("Plate1,A01,", "Plate1,,", 1)
    csv.write_text("\n".join(lines) + "\n")
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(csv), "-p", str(plate / "example_loaddata.cppipe"))
    assert_refused(code, err, "image set(s) 2 have an empty Metadata_Well", out=plate / "run")


def test_loaddata_csv_with_a_pipeline_that_has_no_loaddata(capsys, cp_venv, plate):
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(plate / "load_data.csv"),
                     "-p", str(plate / "example_images.cppipe"))
    assert_refused(code, err, "has no LoadData module", out=plate / "run")


def test_missing_dataset(capsys, cp_venv, plate):
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(plate / "nothing.csv"),
                     "-p", str(plate / "example_loaddata.cppipe"))
    assert_refused(code, err, "nothing.csv: dataset not found", out=plate / "run")


def test_cellprofiler_not_found(capsys, plate):
    code = main(["plan", "--cellprofiler", "/nonexistent/cp", "--output", str(plate / "run"),
                 "-d", str(plate / "load_data.csv"), "-p", str(plate / "example_loaddata.cppipe")])
    err = capsys.readouterr().err.strip().splitlines()
    assert_refused(code, err, "CellProfiler not found at /nonexistent/cp", out=plate / "run")


def test_bad_run_settings_are_refused_before_anything_runs(capsys, plate):
    code = main(["run", "--output", str(plate / "run"), "--memfree", "lots", "--halt", "maybe"])
    err = capsys.readouterr().err.strip().splitlines()
    assert_refused(code, err, "--memfree 'lots'", "--halt 'maybe'")


def test_a_run_folder_of_another_pipeline_is_not_reused(capsys, cp_venv, plate):
    out = plate / "run"
    args = ["-d", str(plate / "load_data.csv"), "-p", str(plate / "example_loaddata.cppipe")]
    assert plan(capsys, cp_venv, out, *args)[0] == 0
    before = (out / "plan.json").read_text()
    pipeline = plate / "example_loaddata.cppipe"
    pipeline.write_text(pipeline.read_text().replace("Typical diameter of objects, in pixel units (Min,Max):8,80",
                                                     "Typical diameter of objects, in pixel units (Min,Max):9,80"))
    code, err = plan(capsys, cp_venv, out, *args)
    assert_refused(code, err, "already holds a run whose pipeline changed")
    assert (out / "plan.json").read_text() == before
