"""merge_run against real CellProfiler output: per-job runs merged must equal one process."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpcp.results.merge import MergeError, cytotable_name, cytotable_sort_key, merge_run, run_merge

from merge_support import assert_table_equal, read_reference, write_manifest

pytestmark = pytest.mark.cellprofiler
OBJECTS = ["Nuclei", "PH3", "Cells", "Cytoplasm"]
TABLES = ["Image", *OBJECTS]


def copy_run(run: Path, dest: Path) -> Path:
    """A private copy to damage; merged/ and report.json of earlier merges are left behind."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("merged", "report.json"))
    return dest


def plan_of(run: Path) -> dict:
    return json.loads((run / "plan.json").read_text())


def rewrite_csv(path: Path, edit, delim: str = ",") -> None:
    """Apply edit(header, rows) -> (header, rows) to a CellProfiler table in place, and write the
    job's manifest again (as if CellProfiler had written the table so: it is not damage)."""
    with open(path, newline="") as fd:
        reader = csv.reader(fd, delimiter=delim)
        header = next(reader)
        rows = list(reader)
    header, rows = edit(header, rows)
    with open(path, "w", newline="") as fd:
        writer = csv.writer(fd, delimiter=delim, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    write_manifest(path.parent)


@pytest.fixture(scope="module")
def merged_loaddata(loaddata_run):
    run, ref = loaddata_run
    return run, ref, merge_run(run)


# ---------------------------------------------------------------- equal to one CellProfiler process

@pytest.mark.parametrize("table", TABLES)
def test_merged_table_equals_single_process(merged_loaddata, table):
    run, ref, result = merged_loaddata
    rows = assert_table_equal(ref / f"{table}.csv", run / "merged" / f"{table}.parquet", ref_out=ref)
    assert rows == result.tables[table].rows > 0


@pytest.mark.parametrize("table", TABLES)
def test_merged_csv_equals_merged_parquet(merged_loaddata, table):
    run, _, _ = merged_loaddata
    assert_table_equal(run / "merged" / f"{table}.csv", run / "merged" / f"{table}.parquet", ignore=())


def test_numbers_and_groups_are_rewritten(merged_loaddata):
    run, _, _ = merged_loaddata
    plan = plan_of(run)
    local = [int(r["ImageNumber"]) for j in plan["jobs"]
             for r in read_reference(run / "published" / j["id"] / "Image.csv")[1]]
    assert sorted(local) != list(range(1, 9)), "jobs should restart numbering: the rewrite is untested"
    image = pq.read_table(run / "merged" / "Image.parquet").to_pydict()
    assert image["ImageNumber"] == list(range(1, 9))
    assert image["Group_Number"] == [1] * 8 and image["Group_Index"] == list(range(1, 9))
    assert image["Group_Length"] == [8] * 8


def test_saved_image_paths_point_to_published(merged_loaddata):
    run, _, _ = merged_loaddata
    image = pq.read_table(run / "merged" / "Image.parquet").to_pylist()
    for row in image:
        path = Path(row["PathName_OrigOverlay"]) / row["FileName_OrigOverlay"]
        assert path.is_file() and path.parent.parent == run / "published", path
        assert row["URL_OrigOverlay"] == f"file://{path}"


def test_experiment_once_and_run_info_per_job(merged_loaddata):
    run, ref, _ = merged_loaddata
    exp = dict(zip(*pq.read_table(run / "merged" / "Experiment.parquet").to_pydict().values()))
    ref_exp = dict(read_reference(ref / "Experiment.csv")[1][i].values() for i in range(2))
    assert exp["CellProfiler_Version"] == ref_exp["CellProfiler_Version"]
    assert exp["Pipeline_Pipeline"].startswith("CellProfiler Pipeline")
    jobs = pq.read_table(run / "merged" / "jobs_experiment.parquet").to_pydict()
    assert set(jobs["job"]) == {j["id"] for j in plan_of(run)["jobs"]}
    assert "Pipeline_Pipeline_sha256" in jobs["Key"] and "Pipeline_Pipeline" not in jobs["Key"]
    assert (run / "merged" / "Experiment.csv").read_text().startswith("Key,Value\n")


def test_merge_json_and_cli_exit_code(merged_loaddata, capsys):
    run, _, result = merged_loaddata
    saved = json.loads((run / "merged" / "merge.json").read_text())
    assert saved["jobs_merged"] == result.jobs_merged and saved["jobs_skipped"] == []
    assert run_merge(run) == 0
    out = capsys.readouterr().out
    assert "COMPLETE: 3/3 jobs done, 4/4 groups, 8/8 image sets" in out
    assert str(run / "merged" / "Nuclei.parquet") in out


# ---------------------------------------------------------------- single cell (CytoTable layout)

def test_single_cell_joins_compartments_per_cell(merged_loaddata):
    run, _, result = merged_loaddata
    sc = pq.read_table(result.single_cell)
    cols = sc.column_names
    assert cols[0] == "Metadata_ImageNumber"
    assert cols == sorted(sorted(cols), key=cytotable_sort_key)
    for needed in ("Metadata_ObjectNumber", "Metadata_Cytoplasm_Parent_Cells", "Metadata_Cytoplasm_Parent_Nuclei",
                   "Metadata_Cells_Parent_Nuclei", "Image_FileName_DNA", "Cytoplasm_AreaShape_Area",
                   "Cells_AreaShape_Area", "Nuclei_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA"):
        assert needed in cols, needed
    # of the Image table: file names and (for pycytominer) its metadata; no image measurements
    assert not any(c.startswith("Image_") and not c.startswith(("Image_FileName_", "Image_Metadata_")) for c in cols)
    cyto = pq.read_table(run / "merged" / "Cytoplasm.parquet")
    assert sc.num_rows == cyto.num_rows
    cells = {(r["ImageNumber"], r["ObjectNumber"]): r for r in pq.read_table(run / "merged" / "Cells.parquet").to_pylist()}
    nuclei = {(r["ImageNumber"], r["ObjectNumber"]): r for r in pq.read_table(run / "merged" / "Nuclei.parquet").to_pylist()}
    image = {r["ImageNumber"]: r for r in pq.read_table(run / "merged" / "Image.parquet").to_pylist()}
    keys = []
    for row in sc.to_pylist():
        img = row["Metadata_ImageNumber"]
        keys.append((img, row["Metadata_ObjectNumber"]))
        cell = cells[(img, row["Metadata_Cytoplasm_Parent_Cells"])]
        nucleus = nuclei[(img, row["Metadata_Cytoplasm_Parent_Nuclei"])]
        assert row["Cells_AreaShape_Area"] == cell["AreaShape_Area"]
        assert row["Nuclei_AreaShape_Area"] == nucleus["AreaShape_Area"]
        assert row["Metadata_Cells_Parent_Nuclei"] == cell["Parent_Nuclei"]
        assert row["Image_FileName_DNA"] == image[img]["FileName_DNA"]
    assert keys == sorted(keys)


def test_single_cell_equals_cytotable(cytotable_python, merged_loaddata, tmp_path):
    """CytoTable itself on the single-process CSVs gives the same table as our DuckDB join."""
    _run, ref, result = merged_loaddata
    python = cytotable_python
    source = tmp_path / "source"
    source.mkdir()
    for table in ("Image", "Cells", "Cytoplasm", "Nuclei"):
        shutil.copy(ref / f"{table}.csv", source)
    home = tmp_path / "home"
    site = next(python.parent.parent.glob("lib/python*/site-packages"))
    for ext in site.glob("duckdb_extension_*/extensions/v*/*.duckdb_extension"):
        dest = home / ".duckdb" / "extensions" / ext.parent.name / "linux_amd64"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(ext, dest)
    out = tmp_path / "cytotable.parquet"
    # the cellprofiler_csv preset's join, plus the image metadata its JUMP presets carry (and ours does)
    code = ("import cytotable, sys; from cytotable.presets import config; "
            "join = config['cellprofiler_csv']['CONFIG_JOINS']; old = \"COLUMNS('Image_FileName_.*'),\"; "
            "assert old in join, join; join = join.replace(old, old + \" image.Metadata_Plate, image.Metadata_Well, "
            "COLUMNS('Image_Metadata_.*'),\"); "
            "cytotable.convert(source_path=sys.argv[1], dest_path=sys.argv[2], "
            "dest_datatype='parquet', preset='cellprofiler_csv', joins=join)")
    env = {**os.environ, "HOME": str(home), "PATH": f"{python.parent}:{os.environ['PATH']}"}
    subprocess.run([str(python), "-c", code, str(source), str(out)], check=True, env=env, timeout=300,
                   cwd=tmp_path)  # parsl writes runinfo/ into the working folder
    theirs, ours = pq.read_table(out), pq.read_table(result.single_cell)
    assert theirs.column_names == ours.column_names
    # The image metadata stays text in bpcp (as CellProfiler's CSVs hold it: '002' is not 2); CytoTable's
    # DuckDB read infers numbers where it can. Every other column has CytoTable's type.
    meta = {c for c in ours.column_names if c in ("Metadata_Plate", "Metadata_Well") or c.startswith("Image_Metadata_")}
    assert meta and all(pa.types.is_string(ours.schema.field(c).type) for c in meta)
    assert [f.type for f in theirs.schema if f.name not in meta] == [f.type for f in ours.schema if f.name not in meta]
    key = lambda r: (r["Metadata_ImageNumber"], r["Metadata_ObjectNumber"])  # noqa: E731
    for a, b in zip(sorted(theirs.to_pylist(), key=key), ours.to_pylist()):
        for col, value in a.items():
            other = b[col]
            if col.startswith("Image_FileName_OrigOverlay"):
                continue
            if col in meta:
                assert str(value) == other, col
            elif isinstance(value, float) and math.isnan(value):
                assert math.isnan(other), col
            else:
                assert value == pytest.approx(other, rel=1e-12) if isinstance(value, float) else value == other, col


# ---------------------------------------------------------------- other layouts and numbering

@pytest.mark.parametrize("table", TABLES)
def test_images_pipeline_tab_prefix_grouped(images_run, table):
    run, ref = images_run
    if not (run / "merged" / "Image.parquet").exists():
        merge_run(run)
    assert_table_equal(ref / f"MyExpt_{table}.txt", run / "merged" / f"{table}.parquet", delim="\t", ref_out=ref)
    if table == "Image":
        image = pq.read_table(run / "merged" / "Image.parquet").to_pydict()
        assert image["Group_Number"] == [1, 1, 2, 2, 3, 3, 4, 4]
        assert image["Group_Index"] == [1, 2] * 4 and image["Group_Length"] == [2] * 8


@pytest.mark.parametrize("table", TABLES)
def test_global_numbering_equals_single_process(global_run, loaddata_run, table):
    _, ref = loaddata_run
    if not (global_run / "merged" / "Image.parquet").exists():
        merge_run(global_run)
    assert_table_equal(ref / f"{table}.csv", global_run / "merged" / f"{table}.parquet", ref_out=ref)


def test_local_outputs_declared_global_fail_uniqueness(loaddata_run, tmp_path):
    run = copy_run(loaddata_run[0], tmp_path / "run")
    plan = plan_of(run)
    plan["numbering"] = "global"
    (run / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(MergeError, match=r"Image: key \(ImageNumber\) is not unique"):
        merge_run(run)
    assert not (run / "merged" / "Image.parquet").exists()
    assert not list((run / "merged").glob(".*.tmp"))
    assert not list(run.glob(".merged-*")), "the half-built merge is removed"
    assert run_merge(run) == 2


def test_jobs_sharing_image_numbers_fail_uniqueness(loaddata_run, tmp_path):
    run = copy_run(loaddata_run[0], tmp_path / "run")
    plan = plan_of(run)
    plan["jobs"][1]["image_numbers"] = plan["jobs"][2]["image_numbers"]
    (run / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(MergeError, match="not unique"):
        merge_run(run)


# ---------------------------------------------------------------- awkward CSVs

def test_repeated_metadata_columns_keep_first(images_run, tmp_path):
    """Some CellProfiler versions repeat Metadata_* in object tables (the CP 5.0 and 4.2.8.1 runs
    here did not, so the copies are appended to real output): equal copies are dropped silently,
    differing ones are dropped with a note."""
    run = copy_run(images_run[0], tmp_path / "run")
    ref = images_run[1]
    first_job = plan_of(run)["jobs"][0]["id"]
    for job in plan_of(run)["jobs"]:
        def add_copies(header, rows, altered=job["id"] == first_job):
            well, site = header.index("Metadata_Well"), header.index("Metadata_Site")
            header = header + ["Metadata_Well", "Metadata_Site", "Metadata_Well"]
            rows = [r + [r[well], "9" if altered else r[site], r[well]] for r in rows]
            return header, rows
        rewrite_csv(run / "published" / job["id"] / "MyExpt_Nuclei.txt", add_copies, "\t")
    result = merge_run(run)
    assert_table_equal(ref / "MyExpt_Nuclei.txt", run / "merged" / "Nuclei.parquet", delim="\t")
    dropped = result.tables["Nuclei"].dropped_duplicates
    assert dropped["Metadata_Well#2"] == 0 and dropped["Metadata_Well#3"] == 0
    assert dropped["Metadata_Site#2"] > 0
    assert any("Metadata_Site copy 2 differs" in n for n in result.notes)


def test_header_only_table_nan_column_and_padded_metadata(loaddata_run, tmp_path):
    """A job with no PH3 objects writes a header-only PH3 table; a column that is all nan in one
    job stays numeric; Metadata '01' stays '01'."""
    run = copy_run(loaddata_run[0], tmp_path / "run")
    ref = loaddata_run[1]
    jobs = {len(j["image_numbers"]): j for j in plan_of(run)["jobs"]}
    small, big = plan_of(run)["jobs"][-1], jobs[4]
    rewrite_csv(run / "published" / small["id"] / "PH3.csv", lambda h, rows: (h, []))

    def nan_column(header, rows):
        cols = [header.index("AreaShape_Area"), header.index("AreaShape_BoundingBoxMaximum_X")]
        return header, [[("nan" if i in cols else v) for i, v in enumerate(r)] for r in rows]
    rewrite_csv(run / "published" / big["id"] / "Nuclei.csv", nan_column)
    for job in plan_of(run)["jobs"]:
        rewrite_csv(run / "published" / job["id"] / "Image.csv", lambda h, rows: (
            h, [[("0" + v if name == "Metadata_Site" else v) for name, v in zip(h, r)] for r in rows]))
    result = merge_run(run)

    ph3 = pq.read_table(run / "merged" / "PH3.parquet")
    _, ref_ph3 = read_reference(ref / "PH3.csv")
    kept = [r for r in ref_ph3 if int(r["ImageNumber"]) not in small["image_numbers"]]
    assert ph3.num_rows == len(kept) < len(ref_ph3) and result.tables["PH3"].rows == len(kept)
    assert str(ph3.schema.field("Location_Center_X").type) == "double"

    nuclei = pq.read_table(run / "merged" / "Nuclei.parquet")
    assert str(nuclei.schema.field("AreaShape_Area").type) == "double"
    assert str(nuclei.schema.field("AreaShape_BoundingBoxMaximum_X").type) == "double"
    assert str(nuclei.schema.field("AreaShape_BoundingBoxMinimum_X").type) == "int64"
    values = nuclei.select(["ImageNumber", "AreaShape_Area"]).to_pylist()
    in_big = [v["AreaShape_Area"] for v in values if v["ImageNumber"] in big["image_numbers"]]
    others = [v["AreaShape_Area"] for v in values if v["ImageNumber"] not in big["image_numbers"]]
    assert in_big and all(math.isnan(v) for v in in_big)
    assert others and all(v > 0 for v in others)

    image = pq.read_table(run / "merged" / "Image.parquet")
    assert image.column("Metadata_Site").to_pylist() == ["01", "02"] * 4
    assert "Metadata_Site" in (run / "merged" / "Image.csv").read_text().splitlines()[0]
    assert ",01," in (run / "merged" / "Image.csv").read_text() or ",01\n" in (run / "merged" / "Image.csv").read_text()


def test_merge_streams_with_small_memory_limit(loaddata_run, tmp_path):
    """The same merge under a tight DuckDB memory limit and one thread gives the same bytes of data."""
    run = copy_run(loaddata_run[0], tmp_path / "run")
    merge_run(run, memory_limit="64MB", threads=1)
    ref = loaddata_run[1]
    for table in TABLES:  # the copy's outputs name the original run's work/: rewritten all the same
        assert_table_equal(ref / f"{table}.csv", run / "merged" / f"{table}.parquet", ref_out=ref)
    overlay = pq.read_table(run / "merged" / "Image.parquet").column("PathName_OrigOverlay").to_pylist()
    assert all(p.startswith(str(run / "published")) for p in overlay)
    assert not (run / "merged" / ".duckdb-tmp").exists()


@pytest.mark.parametrize("column,stem,expected", [
    ("ImageNumber", "Image", "Metadata_ImageNumber"),
    ("ImageNumber", "Cells", "Metadata_ImageNumber"),
    ("ObjectNumber", "Cells", "Metadata_ObjectNumber"),
    ("Parent_Nuclei", "Cells", "Metadata_Cells_Parent_Nuclei"),
    ("Metadata_Well", "Image", "Metadata_Well"),
    ("Metadata_Site", "Image", "Image_Metadata_Site"),
    ("FileName_DNA", "Image", "Image_FileName_DNA"),
    ("AreaShape_Area", "Cytoplasm", "Cytoplasm_AreaShape_Area"),
])
def test_cytotable_column_names(column, stem, expected):
    """The renaming of cytotable.convert._prepend_column_name for the cellprofiler_csv preset."""
    assert cytotable_name(column, stem) == expected
