"""Numbering equal to one CellProfiler process: ImageNumber, Group_Number and Group_Index of the merged
tables are what one plain CellProfiler run over the whole dataset records, whatever the bundling.

The group values are neither sorted nor grouped in the dataset, and zero-padded numbers: CellProfiler
reads them as integers (LoadData by their values, the Metadata module when told to) and sorts its
groups by the str() of those, so positions 002, 010, 076, 218 run as 10, 2, 218, 76, and it renumbers
the image sets group by group. Real CellProfiler and GNU parallel throughout.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from test_e2e_local import bpcp, single_process

from bpcp.inputs import cellprofiler as cpmod
from bpcp.inputs.dataset import read_loaddata
from bpcp.jobs.plan import single_run_numbering

from merge_support import assert_table_equal

pytestmark = [pytest.mark.cellprofiler, pytest.mark.slow]
TABLES = ("Image", "Nuclei", "Cells", "Cytoplasm", "PH3")

# one per image set of the example plate (8 wells x 2 sites), in CSV order: not sorted, not grouped
POSITIONS = ["218", "002", "076", "002", "218", "076", "010", "002",
             "218", "076", "010", "010", "002", "218", "076", "010"]


def without_saved_images(text: str) -> str:
    """The example pipeline with its overlay (OverlayOutlines, SaveImages) disabled: faster, and
    the tables hold only measurements."""
    text, n = re.subn(r"^((?:OverlayOutlines|SaveImages):\[.*\|)enabled:True", r"\1enabled:False", text, flags=re.M)
    assert n == 2
    return text


def grouped_loaddata(plate: Path, dest: Path) -> tuple[Path, Path]:
    """The example plate's CSV with a Metadata_Pos column, and its LoadData pipeline grouping by Pos."""
    with open(plate / "load_data.csv", newline="") as fd:
        rows = list(csv.DictReader(fd))
    csv_path = dest / "positions.csv"
    with open(csv_path, "w", newline="") as fd:
        writer = csv.DictWriter(fd, fieldnames=["Metadata_Pos", *rows[0]])
        writer.writeheader()
        writer.writerows({"Metadata_Pos": p, **r} for p, r in zip(POSITIONS, rows))
    text = (plate / "example_loaddata.cppipe").read_text()
    for old, new in (("Group images by metadata?:No", "Group images by metadata?:Yes"),
                     ("Select metadata tags for grouping:\n", "Select metadata tags for grouping:Pos\n")):
        assert old in text, old
        text = text.replace(old, new)
    pipeline = dest / "grouped_loaddata.cppipe"
    pipeline.write_text(without_saved_images(text))
    return csv_path, pipeline


@pytest.fixture(scope="module")
def loaddata_case(example_plate, tmp_path_factory) -> tuple[Path, Path]:
    return grouped_loaddata(example_plate, tmp_path_factory.mktemp("positions"))


def assert_merged_equals(reference: Path, run: Path) -> None:
    """Every merged table equals the plain process's, row for row and value for value."""
    report = json.loads((run / "report.json").read_text())
    assert report["complete"], report["counts"]
    for table in TABLES:
        rows = assert_table_equal(reference / f"{table}.csv", run / "merged" / f"{table}.parquet")
        assert rows > 0 or table == "PH3"


def merged_numbering(run: Path) -> list[tuple[int, int, int, str]]:
    with open(run / "merged" / "Image.csv", newline="") as fd:
        return [(int(r["ImageNumber"]), int(r["Group_Number"]), int(r["Group_Index"]), r["Metadata_Pos"])
                for r in csv.DictReader(fd)]


@pytest.mark.parametrize("version", ["cp_venv", "cp42_venv"])
def test_loaddata_grouping_numbered_as_one_process_whatever_the_bundling(version, request, loaddata_case, tmp_path):
    venv = request.getfixturevalue(version)
    csv_path, pipeline = loaddata_case
    reference = single_process(venv, tmp_path / "ref", "-p", str(pipeline), "--data-file", str(csv_path))
    bundles = ["0", "auto"] if version == "cp_venv" else ["auto"]
    for bundle in bundles:
        run = tmp_path / f"run-{bundle}"
        proc = bpcp("run", "--cellprofiler", venv, "-d", str(csv_path), "-p", str(pipeline), "-o", str(run),
                    "--bundle", bundle, "--slots", "2")
        plan = json.loads((run / "plan.json").read_text())
        assert plan["group_by"] == ["Metadata_Pos"], proc.stdout      # the pipeline's grouping by default
        assert len(plan["jobs"]) == (4 if bundle == "0" else 2)
        assert_merged_equals(reference, run)
        # what CellProfiler itself did: groups 10 < 2 < 218 < 76, image sets renumbered group by group
        numbering = merged_numbering(run)
        assert [pos for _, _, _, pos in numbering] == ["10"] * 4 + ["2"] * 4 + ["218"] * 4 + ["76"] * 4
        assert [(n, g, i) for n, g, i, _ in numbering] == [(4 * g + i + 1, g + 1, i + 1) for g in range(4) for i in range(4)]


def test_cellprofilers_numbering_of_a_csv_matches_bpcps_reading_of_its_rules(cp_venv, loaddata_case, tmp_path,
                                                                             monkeypatch):
    """The probe's answer (CellProfiler's LoadData and prepare_run) and bpcp's rules agree, on integers
    and on a column LoadData keeps as text because one value is not a number."""
    monkeypatch.setenv("BPCP_CACHE", str(tmp_path / "cache"))
    csv_path, pipeline = loaddata_case
    cp = cpmod.locate(cp_venv)
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(csv_path.read_text().replace("\n218,", "\nP218,", 1))
    for path in (csv_path, mixed):
        answer = cpmod.probe(cp, pipeline, data_file=path)["numbering"]
        rules = single_run_numbering(read_loaddata(path), ["Metadata_Pos"])
        assert rules == (answer["image_number"], answer["group_number"], answer["group_index"]), path.name
    assert answer["group_number"][0] == 5        # 'P218' sorts after the digits: a text column


def images_case(plate: Path, dest: Path) -> tuple[Path, Path]:
    """The plate's images renamed to four 'plates' 218, 002, 076, 010 (file names give the metadata),
    and the images pipeline grouping by Plate, read as an integer by the Metadata module."""
    images = dest / "images"
    images.mkdir()
    sets = [(f"{r}{c:02d}", s) for r in "AB" for c in range(1, 5) for s in (1, 2)]
    for i, (well, site) in enumerate(sets):
        for channel in (1, 2, 3):
            shutil.copy(plate / "images" / f"Plate1_{well}_s{site}_w{channel}.png",
                        images / f"{POSITIONS[i * 3 % 16]}_{well}_s{site}_w{channel}.png")
    text = (plate / "example_images.cppipe").read_text()
    for old, new in (("Do you want to group your images?:No", "Do you want to group your images?:Yes"),
                     ("    Metadata category:None", "    Metadata category:Plate"),
                     ("Metadata data type:Text", "Metadata data type:Choose for each"),
                     ("Metadata types:{}", 'Metadata types:{"Plate": "integer"}')):
        assert old in text, old
        text = text.replace(old, new)
    pipeline = dest / "grouped_images.cppipe"
    pipeline.write_text(without_saved_images(text))
    return images, pipeline


def test_images_metadata_groups_numbered_as_one_process_whatever_the_bundling(example_plate, cp_venv, tmp_path):
    images, pipeline = images_case(example_plate, tmp_path)
    reference = single_process(cp_venv, tmp_path / "ref", "-p", str(pipeline), "-i", str(images))
    for bundle in ("0", "auto"):
        run = tmp_path / f"run-{bundle}"
        bpcp("run", "--cellprofiler", cp_venv, "-d", str(images), "-p", str(pipeline), "-o", str(run),
             "--bundle", bundle, "--slots", "2")
        plan = json.loads((run / "plan.json").read_text())
        assert plan["group_by"] == ["Metadata_Plate"] and len(plan["jobs"]) == (4 if bundle == "0" else 2)
        assert_merged_equals(reference, run)
        with open(run / "merged" / "Image.csv", newline="") as fd:
            order = [(r["Metadata_Plate"], r["Group_Number"]) for r in csv.DictReader(fd)]
        assert [p for p, _ in order][::4] == ["10", "2", "218", "76"]


def test_a_plan_kept_for_other_slots_writes_the_same_job_inputs(cp_venv, loaddata_case, tmp_path):
    """Planning again for other slots keeps the jobs; their inputs are the rows their image numbers
    name in CellProfiler's numbering, which for a grouping LoadData is not the CSV's order."""
    csv_path, pipeline = loaddata_case
    run = tmp_path / "run"
    # bundled (the default with warm workers is one group per job, which --slots does not change)
    args = ("plan", "--cellprofiler", cp_venv, "-d", str(csv_path), "-p", str(pipeline), "-o", str(run),
            "--bundle", "auto")
    bpcp(*args, "--slots", "2")
    before = {p.name: p.read_bytes() for p in (run / "inputs").iterdir()}
    assert len(before) == 2
    again = bpcp(*args, "--slots", "8")
    assert "same as the plan already there" in again.stdout
    assert {p.name: p.read_bytes() for p in (run / "inputs").iterdir()} == before
