"""Planning is pure: image sets + options -> jobs. No CellProfiler needed here."""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest

from bpcp.dataset import ImageSets, read_loaddata
from bpcp.errors import BpcpError
from bpcp.plan import (
    AUTO, PlanOptions, auto_bundle, bundling_is_safe, parse_bundle, group_rows, job_id, make_plan, parse_group_by, parse_only,
    single_run_groups,
)

PIPELINE = {"modules": ["LoadData", "IdentifyPrimaryObjects", "ExportToSpreadsheet"], "grouping_keys": []}


def image_sets(rows: list[dict[str, str]]) -> ImageSets:
    table = pa.table({k: pa.array([r[k] for r in rows], pa.string()) for k in rows[0]})
    channels = {"DNA": pa.array([f"/img/{i}.png" for i in range(len(rows))], pa.string())}
    return ImageSets("loaddata", Path("/data/load_data.csv"), table, channels, "sha")


def plate(plates=("P1",), wells=("A01", "A02", "B01"), sites=3) -> ImageSets:
    return image_sets([
        {"Metadata_Plate": p, "Metadata_Well": w, "Metadata_Site": str(s)}
        for s in range(1, sites + 1) for p in plates for w in wells   # sites interleaved on purpose
    ])


def plan(ims: ImageSets, pipeline: dict = PIPELINE, **options) -> dict:
    return make_plan(ims, pipeline, PlanOptions(**options), cp_version="5.0.0", pipeline_doc={"file": "p.cppipe"},
                     table_files={"Image": "Image.csv"}).doc


def test_parse_group_by_accepts_bare_and_prefixed_keys():
    assert parse_group_by(None) == ("Metadata_Plate", "Metadata_Well")
    assert parse_group_by("Plate, Metadata_Well") == ("Metadata_Plate", "Metadata_Well")
    assert parse_group_by("none") == ()


def test_parse_only_needs_key_value():
    assert parse_only(["Plate=P1,Well=A01"]) == ({"Metadata_Plate": "P1", "Metadata_Well": "A01"},)
    with pytest.raises(BpcpError, match="KEY=VALUE"):
        parse_only(["P1"])


def test_one_job_per_group_with_whole_groups_in_dataset_order():
    doc = plan(plate())
    assert len(doc["jobs"]) == 3
    for job in doc["jobs"]:
        assert len(job["groups"]) == 1
        # the three sites of a well are rows 0,3,6 / 1,4,7 / 2,5,8 of the dataset, in that order
        assert len(job["image_numbers"]) == 3
        assert job["image_numbers"] == sorted(job["image_numbers"])
    numbers = sorted(n for job in doc["jobs"] for n in job["image_numbers"])
    assert numbers == list(range(1, 10))


def test_groups_are_never_split_and_jobs_run_longest_first():
    rows = [{"Metadata_Plate": "P1", "Metadata_Well": w} for w in ["A01"] * 2 + ["A02"] * 5 + ["A03"] * 1]
    doc = plan(image_sets(rows))
    assert [len(j["image_numbers"]) for j in doc["jobs"]] == [5, 2, 1]
    assert doc["jobs"][0]["groups"] == [{"Metadata_Plate": "P1", "Metadata_Well": "A02"}]


def test_bundling_packs_small_groups_without_splitting_any():
    doc = plan(plate(wells=[f"A{i:02d}" for i in range(1, 9)], sites=2), bundle=5)
    sizes = [len(j["image_numbers"]) for j in doc["jobs"]]
    assert sum(sizes) == 16 and max(sizes) <= 5
    for job in doc["jobs"]:
        assert len(job["image_numbers"]) == 2 * len(job["groups"])


def test_bundling_refused_when_pipeline_aggregates_across_image_sets():
    pipeline = {"modules": ["LoadData", "CorrectIlluminationCalculate"], "grouping_keys": []}
    with pytest.raises(BpcpError, match="CorrectIlluminationCalculate"):
        plan(plate(), pipeline, bundle=6)
    grouped = {"modules": ["LoadData", "CorrectIlluminationCalculate"],
               "grouping_keys": ["Metadata_Plate", "Metadata_Well"]}
    assert bundling_is_safe(grouped, ("Metadata_Plate", "Metadata_Well"))
    assert len(plan(plate(), grouped, bundle=6)["jobs"]) == 2


def test_auto_bundling_makes_about_one_job_per_slot_and_caps_job_size():
    # the benchmark's shape: 8 wells x 3 sites on 2 slots -> 2 jobs of 4 wells
    doc = plan(plate(wells=[f"A{i:02d}" for i in range(1, 9)]), bundle=AUTO, slots=2)
    assert [len(j["image_numbers"]) for j in doc["jobs"]] == [12, 12]
    assert doc["bundle"] == {"asked": "auto", "slots": 2, "sets_per_job": 12}
    # more slots than groups: one group per job
    assert len(plan(plate(), bundle=AUTO, slots=8)["jobs"]) == 3
    # a 384-well plate of 9-site wells on 96 slots: wells stay apart (16 sets at most per job)
    assert auto_bundle(384 * 9, 96) == 16 and auto_bundle(24, 2) == 12 and auto_bundle(5, 1) == 5
    big = plan(plate(wells=[f"W{i:03d}" for i in range(40)], sites=9), bundle=AUTO, slots=4)
    assert {len(j["groups"]) for j in big["jobs"]} == {1}


def test_auto_bundling_steps_aside_for_aggregating_pipelines():
    pipeline = {"modules": ["LoadData", "CorrectIlluminationCalculate"], "grouping_keys": []}
    doc = plan(plate(), pipeline, bundle=AUTO, slots=1)
    assert len(doc["jobs"]) == 3 and "aggregates across image sets" in doc["bundle"]["why_not"]


def test_parse_bundle():
    assert parse_bundle("auto") == AUTO and parse_bundle("0") == 0 and parse_bundle(" 12 ") == 12
    with pytest.raises(BpcpError, match="give 'auto', a number"):
        parse_bundle("-3")


def test_only_filters_groups_and_an_empty_match_is_an_error():
    doc = plan(plate(), only=({"Metadata_Well": "A02"},))
    assert [j["groups"][0]["Metadata_Well"] for j in doc["jobs"]] == ["A02"]
    with pytest.raises(BpcpError, match="matches no group"):
        plan(plate(), only=({"Metadata_Well": "Z99"},))


def test_group_numbers_follow_cellprofilers_sorted_groups():
    # Pipeline groups by well: CellProfiler numbers groups in sorted key order, indexes within
    ims = plate(wells=("B01", "A01"), sites=2)       # rows: B01 s1, A01 s1, B01 s2, A01 s2
    numbers, indexes = single_run_groups(ims, ["Metadata_Well"])
    assert numbers == [2, 1, 2, 1] and indexes == [1, 1, 2, 2]
    assert single_run_groups(ims, []) == ([1, 1, 1, 1], [1, 2, 3, 4])


@pytest.mark.parametrize("value", ["P1; rm -rf ~", "$(reboot)", "../../etc", "a/b", "`x`", "quote'\"", " "])
def test_job_ids_are_safe_file_names_for_any_group_value(value):
    jid = job_id([{"Metadata_Plate": value, "Metadata_Well": "A01"}])
    assert re.fullmatch(r"[A-Za-z0-9._+-]+-[0-9a-f]{8}", jid), jid
    assert ".." not in jid and "/" not in jid
    assert jid != job_id([{"Metadata_Plate": value + "x", "Metadata_Well": "A01"}])


def test_values_with_underscores_spaces_and_quotes_stay_distinct_groups():
    rows = [{"Metadata_Plate": p, "Metadata_Well": "A01"} for p in ("P_1", "P 1", "P'1", "P-1")]
    doc = plan(image_sets(rows))
    assert len({j["id"] for j in doc["jobs"]}) == 4
    assert sorted(j["groups"][0]["Metadata_Plate"] for j in doc["jobs"]) == ["P 1", "P'1", "P-1", "P_1"]


def test_group_rows_keeps_first_appearance_order():
    ims = plate(wells=("B01", "A01"), sites=2)
    assert [g for g, _ in group_rows(ims.table, ("Metadata_Well",))] == [{"Metadata_Well": "B01"}, {"Metadata_Well": "A01"}]


def test_planning_a_large_loaddata_csv(tmp_path):
    """10 plates x 384 wells x 9 sites (34,560 rows): read, group and plan without CellProfiler."""
    path = tmp_path / "big.csv"
    wells = [f"{r}{c:02d}" for r in "ABCDEFGHIJKLMNOP" for c in range(1, 25)]
    with open(path, "w") as fd:
        fd.write("Metadata_Plate,Metadata_Well,Metadata_Site,Image_FileName_DNA,Image_PathName_DNA\n")
        for p in range(10):
            for w in wells:
                for s in range(1, 10):
                    fd.write(f"Plate{p},{w},{s},P{p}_{w}_s{s}.tif,/data/images\n")
    ims = read_loaddata(path)
    doc = plan(ims)
    assert len(doc["jobs"]) == 3840
    assert all(len(j["image_numbers"]) == 9 for j in doc["jobs"])
    assert doc["image_sets"] == 34560


@pytest.mark.parametrize("a,b,same", [
    ("A01", "a1", True), ("Plate10", "Plate100", False), ("P1", "P01", True), ("A10", "A1", False),
    ("s001", "S1", True), ("100", "10", False), ("0", "00", True),
])
def test_case_and_padding_normalisation(a, b, same):
    from bpcp.preflight import normalise

    assert (normalise(a) == normalise(b)) is same
