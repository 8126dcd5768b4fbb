"""Planning is pure: image sets + options -> jobs. No CellProfiler needed here."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest

from bpcp import planfile
from bpcp.errors import BpcpError
from bpcp.inputs.dataset import ImageSets, read_loaddata
from bpcp.jobs.plan import (
    AUTO,
    PlanOptions,
    auto_bundle,
    bundling_is_safe,
    group_rows,
    job_id,
    job_keys,
    make_plan,
    parse_bundle,
    parse_group_by,
    parse_only,
    single_run_groups,
    single_run_numbering,
)
from bpcp.planfile import CellProfilerInfo, Pipeline

PIPELINE = {"modules": ["LoadData", "IdentifyPrimaryObjects", "ExportToSpreadsheet"], "grouping_keys": []}
# what the probe says of CorrectIlluminationCalculate "All" (module 2)
ILLUM = {"scope": "group", "module": "CorrectIlluminationCalculate", "number": 2,
         "reason": "Return True if aggregation is performed within a group", "warnings": []}


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
    """The plan as plan.json holds it."""
    planned = make_plan(ims, pipeline, PlanOptions(**options), cellprofiler=CellProfilerInfo("5.0.0"),
                        pipeline_file=Pipeline("p.cppipe", "pipeline.cppipe", "sha"), table_files={"Image": "Image.csv"})
    return json.loads(json.dumps(planfile.to_dict(planned.plan)))


def test_parse_group_by_accepts_bare_and_prefixed_keys():
    # not given: the pipeline decides (job_keys), and Plate+Well when it neither groups nor aggregates
    assert parse_group_by(None) is None
    assert job_keys(parse_group_by(None), PIPELINE) == ("Metadata_Plate", "Metadata_Well")
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
    pipeline = {"modules": ["LoadData", "CorrectIlluminationCalculate"], "grouping_keys": [], "aggregation": [ILLUM]}
    with pytest.raises(BpcpError, match="CorrectIlluminationCalculate"):
        plan(plate(), pipeline, bundle=6, group_by=("Metadata_Plate", "Metadata_Well"))
    grouped = {"modules": ["LoadData", "CorrectIlluminationCalculate"],
               "grouping_keys": ["Metadata_Plate", "Metadata_Well"], "aggregation": [ILLUM]}
    assert bundling_is_safe(grouped, ("Metadata_Plate", "Metadata_Well"))
    assert len(plan(plate(), grouped, bundle=6)["jobs"]) == 2


def test_an_aggregating_pipeline_without_groups_is_one_job_and_a_cutting_group_by_is_refused():
    """CorrectIlluminationCalculate "All" over an ungrouped pipeline: one illumination function over
    every image set of the run, so the whole run is one job; --group-by that would cut it is refused."""
    pipeline = {"modules": ["LoadData", "CorrectIlluminationCalculate"], "grouping_keys": [], "aggregation": [ILLUM]}
    doc = plan(plate(), pipeline, bundle=AUTO, slots=4)
    assert len(doc["jobs"]) == 1 and doc["group_by"] == [] and len(doc["jobs"][0]["image_numbers"]) == 9
    assert any(w.startswith("one job over all 9 image sets: CorrectIlluminationCalculate (module 2)")
               for w in doc["warnings"])
    for asked in (("Metadata_Plate", "Metadata_Well"), ("Metadata_Well",)):
        with pytest.raises(BpcpError) as err:
            plan(plate(), pipeline, group_by=asked)
        assert len(err.value.lines) == 1
        line = err.value.lines[0]
        assert line.startswith(f"--group-by {','.join(asked)}: would split what CorrectIlluminationCalculate (module 2)")
        assert "every image set of the run" in line and "leave --group-by out" in line
    # one group over everything is no cut
    assert len(plan(plate(), pipeline, group_by=("Metadata_Plate",))["jobs"]) == 1


def test_the_pipelines_groups_are_the_default_and_only_coarser_group_by_is_allowed():
    grouped = {"modules": ["Groups", "CorrectIlluminationCalculate"], "grouping_keys": ["Metadata_Plate"],
               "grouping_module": "Groups", "aggregation": [ILLUM]}
    ims = plate(plates=("P2", "P1"), wells=("A01", "A02"), sites=2)
    doc = plan(ims, grouped, bundle=0)
    assert doc["group_by"] == ["Metadata_Plate"] and len(doc["jobs"]) == 2
    assert sorted(j["groups"][0]["Metadata_Plate"] for j in doc["jobs"]) == ["P1", "P2"]
    assert len(plan(ims, grouped, group_by=())["jobs"]) == 1                       # coarser: fine
    assert len(plan(ims, grouped, group_by=("Metadata_Plate",))["jobs"]) == 2     # the same: fine
    with pytest.raises(BpcpError) as err:
        plan(ims, grouped, group_by=("Metadata_Plate", "Metadata_Well"))
    line, = err.value.lines
    assert line.startswith("--group-by Metadata_Plate,Metadata_Well: would split the pipeline's groups (it groups "
                           "by Metadata_Plate in its Groups module, and CorrectIlluminationCalculate (module 2) "
                           "aggregates over each group): the group Metadata_Plate=P2 would run in more than one job"), line
    assert "pass --group-by Metadata_Plate" in line
    # finer keys that happen to name the same groups (each well name in one plate only) are no cut
    same = image_sets([{"Metadata_Plate": p, "Metadata_Well": f"{p}-{w}"} for p in ("P1", "P2") for w in "AB"])
    by_well = {**grouped, "grouping_keys": ["Metadata_Well"]}
    assert len(plan(same, by_well, group_by=("Metadata_Plate", "Metadata_Well"), bundle=0)["jobs"]) == 4


def test_bundles_keep_whole_pipeline_groups_and_cellprofilers_order():
    grouped = {"modules": ["LoadData", "TrackObjects"], "grouping_keys": ["Metadata_Well"],
               "grouping_module": "LoadData", "aggregation": [dict(ILLUM, module="TrackObjects")]}
    ims = plate(wells=("B01", "A02", "A01", "B02"), sites=3)
    doc = plan(ims, grouped, bundle=AUTO, slots=2)
    assert len(doc["jobs"]) == 2
    for job in doc["jobs"]:
        assert len(job["image_numbers"]) == 3 * len(job["groups"])
        assert job["image_numbers"] == sorted(job["image_numbers"])     # the job's own run numbers them so
    numbers = sorted(n for j in doc["jobs"] for n in j["image_numbers"])
    assert numbers == list(range(1, 13))


def test_run_wide_values_split_over_jobs_are_a_warning_with_cellprofilers_words():
    said = ("Experiment-wide values for mean threshold, etc calculated by MeasureImageQuality may be incorrect "
            "if the run is split into subsets of images.")
    quality = {"modules": ["LoadData", "MeasureImageQuality"], "grouping_keys": [],
               "aggregation": [{"scope": "run", "module": "MeasureImageQuality", "number": 3,
                                "reason": "Calculate the experiment statistics at the end of a run", "warnings": [said]}]}
    doc = plan(plate(), quality, bundle=0)
    assert len(doc["jobs"]) == 3
    warning, = doc["warnings"]
    assert warning.startswith("MeasureImageQuality (module 3) computes values over all image sets of a run")
    assert said in warning and "--group-by none" in warning
    assert plan(plate(), quality, group_by=())["warnings"] == []


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


def test_auto_bundling_steps_aside_when_cellprofiler_would_not_keep_groups_apart():
    # the pipeline groups by Well and aggregates; jobs by Plate+Well name the same groups here, but
    # CellProfiler keeps apart only the groups it makes itself: bundled, they would be mixed
    pipeline = {"modules": ["LoadData", "CorrectIlluminationCalculate"], "grouping_keys": ["Metadata_Well"],
                "grouping_module": "LoadData", "aggregation": [ILLUM]}
    doc = plan(plate(), pipeline, bundle=AUTO, slots=1, group_by=("Metadata_Plate", "Metadata_Well"))
    assert len(doc["jobs"]) == 3 and "CorrectIlluminationCalculate (module 2) aggregates" in doc["bundle"]["why_not"]
    with pytest.raises(BpcpError, match="--bundle: CorrectIlluminationCalculate"):
        plan(plate(), pipeline, bundle=6, group_by=("Metadata_Plate", "Metadata_Well"))


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
    # and renumbers the image sets group by group
    assert single_run_numbering(ims, ["Metadata_Well"])[0] == [3, 1, 4, 2]


def test_loaddata_groups_sort_by_the_str_of_typed_values():
    """LoadData reads '002' in a column of integers as 2: positions 002, 076, 218 run as 2, 218, 76."""
    rows = [{"Metadata_Pos": p} for p in ("218", "002", "076", "002", "218", "010")]
    numbers, groups, indexes = single_run_numbering(image_sets(rows), ["Metadata_Pos"])
    assert groups == [3, 2, 4, 2, 3, 1] and indexes == [1, 1, 1, 2, 2, 1]
    assert numbers == [4, 2, 6, 3, 5, 1]
    # a column that is not all integers stays text: '002' < '010' < '076' < '218' < 'x'
    mixed = [*rows, {"Metadata_Pos": "x"}]
    assert single_run_numbering(image_sets(mixed), ["Metadata_Pos"])[1] == [4, 1, 3, 1, 4, 2, 5]
    # CellProfiler's own numbering, when the dataset was read with it, wins
    ims = image_sets(rows)
    ims.cp_groups = pa.table({"ImageNumber": [6, 5, 4, 3, 2, 1], "Group_Number": [1] * 6, "Group_Index": [6, 5, 4, 3, 2, 1]})
    assert single_run_numbering(ims, ["Metadata_Pos"]) == ([6, 5, 4, 3, 2, 1], [1] * 6, [6, 5, 4, 3, 2, 1])


def test_jobs_list_image_sets_in_cellprofilers_order_with_its_numbers():
    rows = [{"Metadata_Plate": "P1", "Metadata_Pos": p} for p in ("218", "002", "076", "002", "218", "010")]
    grouped = {"modules": ["LoadData"], "grouping_keys": ["Metadata_Pos"], "grouping_module": "LoadData"}
    for bundle in (0, AUTO):
        doc = plan(image_sets(rows), grouped, bundle=bundle, slots=2)
        by_pos = {}
        for job in doc["jobs"]:
            assert job["image_numbers"] == sorted(job["image_numbers"])
            for group in job["groups"]:
                by_pos[group["Metadata_Pos"]] = job
        assert sorted(n for j in doc["jobs"] for n in j["image_numbers"]) == list(range(1, 7))
        numbered = {(g, i): n for j in doc["jobs"] for n, g, i in zip(j["image_numbers"], j["group_numbers"], j["group_indexes"])}
        assert numbered == {(1, 1): 1, (2, 1): 2, (2, 2): 3, (3, 1): 4, (3, 2): 5, (4, 1): 6}
        assert by_pos["010"]["image_numbers"][by_pos["010"]["group_numbers"].index(1)] == 1


def test_a_job_loaddata_would_type_otherwise_than_the_whole_csv_is_refused():
    rows = [{"Metadata_Plate": p, "Metadata_Well": "A01"} for p in ("0001", "0002", "P3")]
    with pytest.raises(BpcpError) as err:
        plan(image_sets(rows), bundle=0)
    line, = err.value.lines
    assert "reads column Metadata_Plate as text over the whole CSV but as integers in job 0001_A01-" in line
    assert "'0001'" in line
    decimals = [{"Metadata_Plate": "P1", "Metadata_Well": w, "Metadata_Dose": d} for w, d in (("A01", "1"), ("A02", "2.5"))]
    with pytest.raises(BpcpError, match="Metadata_Dose as decimals over the whole CSV but as integers"):
        plan(image_sets(decimals), bundle=0)
    assert len(plan(image_sets(decimals), group_by=())["jobs"]) == 1     # one job reads what one run reads
    # well columns are text to LoadData whatever they hold; all-integer columns stay integers in every job
    assert len(plan(image_sets([{"Metadata_Plate": "P", "Metadata_Well": w, "Metadata_Column": c, "Metadata_Site": s}
                                for w, c, s in (("A01", "01", "1"), ("A02", "x", "2"))]), bundle=0)["jobs"]) == 2


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
    from bpcp.inputs.preflight import normalise

    assert (normalise(a) == normalise(b)) is same
