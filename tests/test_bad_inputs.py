"""Every bad input bpcp handles: one clear line per problem, exit 2, nothing started or written.

These run the real `bpcp plan` command (in-process) against real CellProfiler, which loads the
pipeline; no job runs.
"""
from __future__ import annotations

import json
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


# ---------------------------------------------------------------- preflight gaps, one line each

def _rewrite(csv: Path, fn) -> None:
    csv.write_text("".join(fn(i, line) + "\n" for i, line in enumerate(csv.read_text().splitlines())))


def test_csv_with_a_pandas_index_column(capsys, cp_venv, plate):
    csv = plate / "load_data.csv"
    _rewrite(csv, lambda i, line: ("" if i == 0 else str(i - 1)) + "," + line)   # df.to_csv() with its index
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(csv), "-p", str(plate / "example_loaddata.cppipe"))
    assert_refused(code, err, "load_data.csv: column 1 of the header has no name (a pandas index column",
                   "to_csv(index=False)", out=plate / "run")
    assert len(err) == 1


def test_csv_with_a_stray_empty_column_name(capsys, cp_venv, plate):
    csv = plate / "load_data.csv"
    _rewrite(csv, lambda i, line: line.replace(",", ",,", 1))
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(csv), "-p", str(plate / "example_loaddata.cppipe"))
    assert_refused(code, err, "load_data.csv: column 2 of the header has no name", out=plate / "run")
    assert len(err) == 1


@pytest.mark.parametrize("sep,name", [(";", "';'"), ("\t", "tabs")])
def test_csv_separated_by_semicolons_or_tabs(capsys, cp_venv, plate, sep, name):
    csv = plate / "load_data.csv"
    _rewrite(csv, lambda i, line: line.replace(",", sep))
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(csv), "-p", str(plate / "example_loaddata.cppipe"))
    assert_refused(code, err, f"load_data.csv: its columns are separated by {name}, and LoadData reads only "
                              "comma-separated CSVs", out=plate / "run")
    assert len(err) == 1


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_pipeline_file(capsys, cp_venv, plate, content):
    empty = plate / "empty.cppipe"
    empty.write_bytes(content)
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(plate / "load_data.csv"), "-p", str(empty))
    assert_refused(code, err, "empty.cppipe: empty file", "File > Export > Pipeline", out=plate / "run")
    assert len(err) == 1


def test_file_list_with_a_utf8_bom(capsys, cp_venv, plate, example_plate):
    """Excel and Notepad start UTF-8 files with a BOM: it is not part of the first path."""
    files = plate / "files.txt"
    files.write_bytes(b"\xef\xbb\xbf" + (example_plate / "filelist.txt").read_bytes())
    out = plate / "run"
    code, err = plan(capsys, cp_venv, out, "-d", str(files), "-p", str(plate / "example_images.cppipe"))
    assert code == 0, err
    doc = json.loads((out / "plan.json").read_text())
    assert doc["image_sets"] == 16
    first = (out / sorted(j["input"] for j in doc["jobs"])[0]).read_bytes()
    assert b"\xef\xbb\xbf" not in first and first.startswith(b"/")


def test_group_values_that_differ_only_by_surrounding_spaces(capsys, cp_venv, plate):
    csv = plate / "load_data.csv"
    _rewrite(csv, lambda i, line: line.replace("Plate1,A01,", "Plate1,A01 ,", 1) if i == 1 else line)
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(csv), "-p", str(plate / "example_loaddata.cppipe"))
    assert_refused(code, err, "Metadata_Well values 'A01' and 'A01 ' differ only by surrounding spaces",
                   out=plate / "run")
    assert len(err) == 1


def test_pipeline_grouping_by_a_key_the_dataset_lacks(capsys, cp_venv, plate):
    pipeline = plate / "grouped.cppipe"
    text = (plate / "example_loaddata.cppipe").read_text()
    pipeline.write_text(text.replace("Group images by metadata?:No", "Group images by metadata?:Yes")
                        .replace("Select metadata tags for grouping:\n", "Select metadata tags for grouping:Pos\n"))
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(plate / "load_data.csv"), "-p", str(pipeline))
    assert_refused(code, err, "load_data.csv: the pipeline groups by Metadata_Pos (LoadData module), which the "
                              "dataset does not have", out=plate / "run")
    assert len(err) == 1


def test_loaddata_processing_a_range_of_rows(capsys, cp_venv, plate):
    pipeline = plate / "rows.cppipe"
    text = (plate / "example_loaddata.cppipe").read_text()
    pipeline.write_text(text.replace("Process just a range of rows?:No", "Process just a range of rows?:Yes")
                        .replace("Rows to process:1,100000", "Rows to process:3,10"))
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(plate / "load_data.csv"), "-p", str(pipeline))
    assert_refused(code, err, "LoadData processes only rows 3-10", "set it to No", out=plate / "run")
    assert len(err) == 1


def test_a_column_loaddata_would_type_otherwise_in_a_job(capsys, cp_venv, plate):
    """Plate 'Plate1' for all wells but A01, whose plate is '0001': one run reads the column as text
    ('0001'), a job of A01 alone as the integer 1."""
    csv = plate / "load_data.csv"
    _rewrite(csv, lambda i, line: line.replace("Plate1,A01,", "0001,A01,", 1))
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(csv), "-p", str(plate / "example_loaddata.cppipe"),
                     "--bundle", "0")
    assert_refused(code, err, "reads column Metadata_Plate as text over the whole CSV but as integers in job "
                              "0001_A01-", "(e.g. '0001')", out=plate / "run")
    assert len(err) == 1


def test_a_createbatchfiles_pipeline_is_refused_without_writing_a_batch_file(capsys, cp_venv, plate, example_plate):
    """Reading the images with CellProfiler runs only its input modules: CreateBatchFiles' own
    prepare_run would write Batch_data.h5 while bpcp is only checking."""
    import subprocess

    from test_e2e_local import MAKE_BATCH, cp_env

    pipeline, batch_dir = plate / "with_batch.cppipe", plate / "batch"
    subprocess.run([str(Path(cp_venv) / "bin" / "python"), "-c", MAKE_BATCH, str(plate / "example_images.cppipe"),
                    str(pipeline), str(batch_dir)], check=True, capture_output=True, env=cp_env())
    batch_dir.mkdir()
    code, err = plan(capsys, cp_venv, plate / "run", "-d", str(example_plate / "images"), "-p", str(pipeline))
    assert_refused(code, err, "with_batch.cppipe: the pipeline contains CreateBatchFiles", out=plate / "run")
    assert len(err) == 1 and not list(batch_dir.iterdir())
