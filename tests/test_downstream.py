"""What the next tool reads: the merged Experiment table and single_cell.parquet against one plain
CellProfiler process (joined here with pandas, not with bpcp's code), and pycytominer's chain
(aggregate by plate and well, annotate with a platemap, normalize, feature_select) on the merge."""
from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest

from bpcp.results.merge import merge_run

from merge_support import read_reference, write_manifest

pytestmark = pytest.mark.cellprofiler
COMPARTMENTS = ("Cells", "Cytoplasm", "Nuclei")


@pytest.fixture(scope="module")
def merged(loaddata_run):
    run, ref = loaddata_run
    if not (run / "merged" / "single_cell.parquet").exists():
        merge_run(run)
    return run, ref


def test_experiment_equals_single_process(merged):
    """Every key of one process's Experiment table, same value; Run_Timestamp is the first job's start."""
    run, ref = merged
    _, rows = read_reference(ref / "Experiment.csv")
    want = {r["Key"]: r["Value"] for r in rows}
    got = dict(zip(*pq.read_table(run / "merged" / "Experiment.parquet").to_pydict().values()))
    assert list(got) == list(want)
    for key, value in want.items():
        if key != "Run_Timestamp":
            assert got[key] == value, key
    jobs = pq.read_table(run / "merged" / "jobs_experiment.parquet").to_pydict()
    stamps = [v for k, v in zip(jobs["Key"], jobs["Value"]) if k == "Run_Timestamp"]
    assert len(stamps) == 3 and got["Run_Timestamp"] == min(stamps)


def test_experiment_run_timestamp_is_the_earliest_jobs(loaddata_run, tmp_path):
    """Not the first job's in plan order: here that one started last."""
    run = shutil.copytree(loaddata_run[0], tmp_path / "run", ignore=shutil.ignore_patterns("merged", "report.json"))
    first = json.loads((run / "plan.json").read_text())["jobs"][0]["id"]
    path = run / "published" / first / "Experiment.csv"
    lines = path.read_text().splitlines(keepends=True)
    last = [i for i, line in enumerate(lines) if line.startswith("Run_Timestamp,")][-1]
    lines[last] = "Run_Timestamp,2999-01-01T00:00:00.000000\n"
    path.write_text("".join(lines))
    write_manifest(path.parent)
    merge_run(run)
    got = dict(zip(*pq.read_table(run / "merged" / "Experiment.parquet").to_pydict().values()))
    jobs = pq.read_table(run / "merged" / "jobs_experiment.parquet").to_pydict()
    stamps = [v for k, v in zip(jobs["Key"], jobs["Value"]) if k == "Run_Timestamp"]
    assert "2999-01-01T00:00:00.000000" in stamps and got["Run_Timestamp"] == min(stamps) < stamps[0]


def _reference_single_cell(ref) -> pd.DataFrame:
    """Cytoplasm joined to its parent Cells and Nuclei and to its image, from the single process's
    CSVs, named as CytoTable's presets name columns (keys as Metadata_*, the rest prefixed by the
    compartment; Metadata_Plate and Metadata_Well of the image as they are, its other metadata as
    Image_Metadata_*)."""
    def table(name: str) -> pd.DataFrame:
        return pd.read_csv(ref / f"{name}.csv", dtype=dict.fromkeys(("Metadata_Plate", "Metadata_Well", "Metadata_Site"), str))

    def named(df: pd.DataFrame, stem: str) -> pd.DataFrame:
        keys = {"ImageNumber": "Metadata_ImageNumber", "ObjectNumber": "Metadata_ObjectNumber"}
        new = {}
        for col in df.columns:
            if col in keys:
                new[col] = keys[col]
            elif col.startswith("Parent_"):
                new[col] = f"Metadata_{stem}_{col}"
            else:
                new[col] = f"{stem}_{col}"
        return df.rename(columns=new)

    image = table("Image")
    meta = image[["ImageNumber"] + [c for c in image.columns if c.startswith(("Metadata_", "FileName_"))]]
    meta = meta.rename(columns={c: (c if c in ("Metadata_Plate", "Metadata_Well") else f"Image_{c}")
                                for c in meta.columns if c != "ImageNumber"}).rename(columns={"ImageNumber": "Metadata_ImageNumber"})
    cyto, cells, nuclei = (named(table(n), n) for n in ("Cytoplasm", "Cells", "Nuclei"))
    joined = cyto.merge(cells, left_on=["Metadata_ImageNumber", "Metadata_Cytoplasm_Parent_Cells"],
                        right_on=["Metadata_ImageNumber", "Metadata_ObjectNumber"], suffixes=("", "_cells"))
    joined = joined.drop(columns=["Metadata_ObjectNumber_cells"])
    joined = joined.merge(nuclei, left_on=["Metadata_ImageNumber", "Metadata_Cytoplasm_Parent_Nuclei"],
                          right_on=["Metadata_ImageNumber", "Metadata_ObjectNumber"], suffixes=("", "_nuclei"))
    joined = joined.drop(columns=["Metadata_ObjectNumber_nuclei"])
    return joined.merge(meta, on="Metadata_ImageNumber")


def test_single_cell_equals_an_independent_join_of_one_process(merged):
    run, ref = merged
    ours = pq.read_table(run / "merged" / "single_cell.parquet").to_pandas()
    theirs = _reference_single_cell(ref)
    assert set(ours.columns) == set(theirs.columns), set(ours.columns) ^ set(theirs.columns)
    key = ["Metadata_ImageNumber", "Metadata_ObjectNumber"]
    theirs = theirs.sort_values(key).reset_index(drop=True)
    assert len(ours) == len(theirs) > 0
    assert ours[key].values.tolist() == theirs[key].values.tolist()
    for col in theirs.columns:
        for a, b in zip(theirs[col].tolist(), ours[col].tolist()):
            if isinstance(a, float) and math.isnan(a):
                assert isinstance(b, float) and math.isnan(b), col
            elif isinstance(a, float):
                assert math.isclose(a, b, rel_tol=1e-12), (col, a, b)
            else:
                assert a == b, (col, a, b)
    for col in ("Metadata_Plate", "Metadata_Well", "Image_Metadata_Site"):
        assert ours[col].notna().all() and ours[col].map(type).eq(str).all(), col


def test_pycytominer_aggregate_annotate_normalize_feature_select(merged, tmp_path):
    """pycytominer's own defaults (strata Metadata_Plate, Metadata_Well; annotate joins the
    platemap's well_position to Metadata_Well) on single_cell.parquet as it is: no join needed."""
    from pycytominer import aggregate, annotate, feature_select, normalize

    run, _ = merged
    cells = pd.read_parquet(run / "merged" / "single_cell.parquet")
    profiles = aggregate(cells, operation="median")
    wells = sorted(cells["Metadata_Well"].unique())
    assert profiles[["Metadata_Plate", "Metadata_Well"]].values.tolist() == [["Plate1", w] for w in wells]
    first = cells[cells["Metadata_Well"] == wells[0]]["Cells_AreaShape_Area"].median()
    assert profiles.loc[profiles["Metadata_Well"] == wells[0], "Cells_AreaShape_Area"].item() == pytest.approx(first)

    platemap = pd.DataFrame({"well_position": wells, "treatment": ["DMSO"] * (len(wells) - 1) + ["drug"]})
    annotated = annotate(profiles, platemap)
    assert annotated["Metadata_treatment"].tolist() == ["DMSO"] * (len(wells) - 1) + ["drug"]
    normalized = normalize(annotated, samples="Metadata_treatment == 'DMSO'", method="standardize")
    assert normalized["Cells_AreaShape_Area"].notna().all()
    selected = feature_select(normalized, operation=["variance_threshold", "drop_na_columns", "correlation_threshold"])
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_treatment"} <= set(selected.columns)
    assert any(c.startswith(("Cells_", "Nuclei_", "Cytoplasm_")) for c in selected.columns)
    # the single cells themselves too: normalize against the plate's own cells, then select
    per_cell = normalize(cells, method="mad_robustize")
    assert len(feature_select(per_cell, operation=["drop_na_columns"])) == len(cells)
