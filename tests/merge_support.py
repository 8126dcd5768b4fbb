"""Build real run folders for the merge/completeness tests: real CellProfiler, one process per job.

A run folder follows docs/run-folder.md: plan.json, inputs/<job>.csv|txt, published/<job>/ after
success (rename of work/<job>/out), failed/<job>/reason.txt otherwise. A reference folder holds
one CellProfiler process over the whole dataset: the merge must reproduce it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import subprocess
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

TABLES = ["Image", "Nuclei", "PH3", "Cells", "Cytoplasm", "Experiment"]


def job_id(groups: list[dict[str, str]]) -> str:
    """<slug>-<hash8> as in the contract."""
    slug = "_".join(re.sub(r"[^A-Za-z0-9.-]", "", v) for g in groups for v in g.values())[:40]
    digest = hashlib.sha256(json.dumps(groups, sort_keys=True).encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


@dataclass
class Dataset:
    """The image sets of the plate in dataset order (= CellProfiler's ImageNumber order)."""
    plate_dir: Path
    rows: list[dict[str, str]]

    @classmethod
    def load(cls, plate_dir: Path) -> Dataset:
        with open(plate_dir / "load_data.csv", newline="") as fd:
            return cls(plate_dir, list(csv.DictReader(fd)))

    def files(self, row: dict[str, str]) -> list[str]:
        return [str(Path(row[f"Image_PathName_{c}"]) / row[f"Image_FileName_{c}"])
                for c in ("DNA", "PH3", "cellbody")]


def single_run_groups(rows: list[dict[str, str]], group_by: str | None) -> tuple[list[int], list[int]]:
    """Group_Number and Group_Index one CellProfiler process records for each image set."""
    if group_by is None:
        return [1] * len(rows), list(range(1, len(rows) + 1))
    keys = sorted({r[group_by] for r in rows})
    numbers, indexes, seen = [], [], {}
    for row in rows:
        numbers.append(keys.index(row[group_by]) + 1)
        seen[row[group_by]] = seen.get(row[group_by], 0) + 1
        indexes.append(seen[row[group_by]])
    return numbers, indexes


def cp_argv(cmd: list[str], pipeline: Path, kind: str, input_path: Path, out: Path, done: Path) -> list[str]:
    flag = "--data-file" if kind == "loaddata" else "--file-list"
    return [*cmd, "-c", "-r", "-p", str(pipeline), flag, str(input_path), "-o", str(out), "-d", str(done)]


def run_cp(argv: list[str], log: Path, cwd: Path) -> bool:
    with open(log, "w") as fd:
        subprocess.run(argv, stdout=fd, stderr=subprocess.STDOUT, cwd=cwd, timeout=600,
                       env={"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin",
                            **_java_env()})
    return True


def _java_env() -> dict[str, str]:
    import os
    return {"JAVA_HOME": os.environ["JAVA_HOME"]} if os.environ.get("JAVA_HOME") else {}


def write_input(path: Path, kind: str, data: Dataset, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "loaddata":
        with open(path, "w", newline="") as fd:
            writer = csv.DictWriter(fd, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(f + "\n" for r in rows for f in data.files(r)))


def build_run(cmd: list[str], data: Dataset, run_dir: Path, pipeline: Path, kind: str,
              jobs_wells: list[list[str]], group_by: str | None = None,
              plan_extra: dict[str, Any] | None = None, reference: Path | None = None,
              ranges: bool = False) -> dict[str, Any]:
    """Run one CellProfiler per job (2 at a time) and, if asked, one over the whole dataset.

    ranges=True runs each job as `-f first -l last` over the whole input: CellProfiler then keeps
    the global ImageNumber (plan numbering "global"); otherwise each job gets a subset input.
    """
    run_dir.mkdir(parents=True)
    (run_dir / "pipeline.cppipe").write_bytes(pipeline.read_bytes())
    gnums, gidx = single_run_groups(data.rows, group_by)
    plan_jobs, tasks = [], []
    for wells in jobs_wells:
        groups = [{"Metadata_Plate": "Plate1", "Metadata_Well": w} for w in wells]
        jid = job_id(groups)
        positions = [i for i, r in enumerate(data.rows) if r["Metadata_Well"] in wells]
        ext = "csv" if kind == "loaddata" else "txt"
        subset = data.rows if ranges else [data.rows[i] for i in positions]
        write_input(run_dir / "inputs" / f"{jid}.{ext}", kind, data, subset)
        plan_jobs.append({"id": jid, "groups": groups,
                          "image_numbers": [i + 1 for i in positions],
                          "group_numbers": [gnums[i] for i in positions],
                          "group_indexes": [gidx[i] for i in positions],
                          "input": f"inputs/{jid}.{ext}", "group_arg": None})
        work = run_dir / "work" / jid
        (work / "out").mkdir(parents=True)
        argv = cp_argv(cmd, run_dir / "pipeline.cppipe", kind, run_dir / "inputs" / f"{jid}.{ext}",
                       work / "out", work / "done.txt")
        if ranges:
            assert positions == list(range(positions[0], positions[-1] + 1)), "ranges need contiguous wells"
            argv += ["-f", str(positions[0] + 1), "-l", str(positions[-1] + 1)]
        tasks.append((jid, argv, work / "cellprofiler.log"))
    if reference is not None:
        whole = reference.parent / f"{reference.name}.input.{'csv' if kind == 'loaddata' else 'txt'}"
        write_input(whole, kind, data, data.rows)
        reference.mkdir(parents=True)
        tasks.insert(0, (None, cp_argv(cmd, pipeline, kind, whole, reference, reference / "done.txt"),
                         reference.parent / f"{reference.name}.log"))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda t: run_cp(t[1], t[2], data.plate_dir), tasks))
    for jid, _, _log in tasks:
        if jid is not None:
            publish(run_dir, jid)
    if reference is not None:
        assert (reference / "done.txt").read_text().strip() == "Complete", (reference.parent / f"{reference.name}.log").read_text()[-3000:]
    plan_jobs.sort(key=lambda j: -len(j["image_numbers"]))
    extra = dict(plan_extra or {})
    prefix, delimiter = extra.pop("prefix", ""), extra.pop("delimiter", ",")
    ext = ".txt" if delimiter == "\t" else ".csv"
    plan = {"format": 2, "bpcp_version": "0.1.0",
            "dataset": {"kind": kind, "path": str(data.plate_dir), "sha256": ""},
            "pipeline": {"path": str(pipeline), "file": "pipeline.cppipe", "sha256": ""},
            "cellprofiler": {"version": ""},
            "group_by": ["Metadata_Plate", "Metadata_Well"],
            "bundle": {"asked": 0, "slots": 1, "sets_per_job": 0},
            "numbering": "global" if ranges else "local",
            "tables": list(TABLES), "table_files": {t: f"{prefix}{t}{ext}" for t in TABLES},
            "delimiter": delimiter, "image_sets": len(data.rows),
            "jobs": plan_jobs, **extra}
    (run_dir / "plan.json").write_text(json.dumps(plan, indent=2))
    for folder in sorted((run_dir / "published").iterdir()):
        write_manifest(folder, plan)
    return plan


def images_variant(source: Path, dest: Path) -> Path:
    """example_images.cppipe exporting image metadata into object tables, tab-delimited, with a
    file name prefix, grouped by Well: the other ExportToSpreadsheet layout and real Group_*."""
    text = source.read_text()
    for old, new in (
        ("Add image metadata columns to your object data file?:No",
         "Add image metadata columns to your object data file?:Yes"),
        ("Add a prefix to file names?:No", "Add a prefix to file names?:Yes"),
        ('Select the column delimiter:Comma (",")', "Select the column delimiter:Tab"),
        ("Do you want to group your images?:No", "Do you want to group your images?:Yes"),
        ("    Metadata category:None", "    Metadata category:Well"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    dest.write_text(text)
    return dest


def write_manifest(folder: Path, plan: dict[str, Any] | None = None) -> None:
    """bpcp-manifest.json as the job runner writes it (bpcp.jobs.runner.manifest), for the folder as
    it is now: tests that alter a published table on purpose call it again, as if CellProfiler had
    written the table that way."""
    from bpcp.jobs import runner

    if plan is None:
        plan = json.loads((folder.parent.parent / "plan.json").read_text())
    config = {"tables": plan["table_files"], "delimiter": plan["delimiter"]}
    (folder / runner.MANIFEST).write_text(json.dumps(runner.manifest(config, str(folder), folder.name)) + "\n")


def publish(run_dir: Path, jid: str) -> None:
    """What the job wrapper does: rename out/ to published/<job>/ on Complete, else failed/.
    The manifest is written after the plan (build_run)."""
    work = run_dir / "work" / jid
    done = work / "done.txt"
    if done.is_file() and done.read_text().strip() == "Complete":
        (work / "cellprofiler.log").rename(work / "out" / "cellprofiler.log")
        (run_dir / "published").mkdir(exist_ok=True)
        (work / "out").rename(run_dir / "published" / jid)
        return
    failed = run_dir / "failed" / jid
    failed.mkdir(parents=True)
    (failed / "reason.txt").write_text("CellProfiler did not write Complete\n")


# ---------------------------------------------------------------- comparing tables

def read_reference(path: Path, delim: str = ",") -> tuple[list[str], list[dict[str, str]]]:
    """A CellProfiler CSV as text; of repeated column names the first copy wins."""
    with open(path, newline="") as fd:
        reader = csv.reader(fd, delimiter=delim)
        header = next(reader)
        rows = []
        for values in reader:
            row: dict[str, str] = {}
            for name, value in zip(header, values):
                row.setdefault(name, value)
            rows.append(row)
    return list(dict.fromkeys(header)), rows


def same_value(ref: str, got: Any) -> bool:
    if got is None:
        return ref == ""
    if isinstance(got, str):
        return ref == got
    if isinstance(got, float):
        want = float(ref)
        return (math.isnan(want) and math.isnan(got)) or math.isclose(want, got, rel_tol=1e-12, abs_tol=0)
    return int(ref) == got


# Not comparable between runs: timings, and the serialized image-set (file list positions of the
# job's own input, so a subset input encodes different bytes for the same images).
RUN_SPECIFIC = ("ExecutionTime_", "ImageSet_ImageSet")


def jobs_by_image(run: Path) -> dict[int, str]:
    """Global ImageNumber -> the id of the job that ran that image set (plan.json)."""
    plan = json.loads((run / "plan.json").read_text())
    return {number: job["id"] for job in plan["jobs"] for number in job["image_numbers"]}


def saved_in_job(ref_value: str, ref_out: Path, job_dir: Path) -> str:
    """A reference value naming the single process's output folder, as it must read in the merged
    table: the same file in published/<job>/ (a file:// URL percent-encoded as CellProfiler writes
    it, so a bundled job's '+' reads %2B there; a path as it is)."""
    if ref_value.startswith("file:"):          # file:/path (4.2) or file:///path (5.x), percent-encoded
        return ref_value.replace(urllib.parse.quote(str(ref_out)), urllib.parse.quote(str(job_dir)))
    return ref_value.replace(str(ref_out), str(job_dir))


def assert_saved_file_exists(col: str, value: str, row: dict[str, Any]) -> None:
    """The file a merged PathName_/URL_ value names is there (with its FileName_ for a folder)."""
    if value.startswith("file:"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(value).path))
    else:
        path = Path(value)
        for prefix, file_prefix in (("PathName_", "FileName_"), ("ObjectsPathName_", "ObjectsFileName_")):
            if col.startswith(prefix) and row.get(file_prefix + col[len(prefix):]):
                path = path / row[file_prefix + col[len(prefix):]]
    assert path.exists(), (col, value, f"{path} does not exist")


def assert_table_equal(reference: Path, merged: Path, delim: str = ",", ignore: tuple[str, ...] = RUN_SPECIFIC,
                       ref_out: Path | None = None) -> int:
    """Merged parquet equals a single-process CellProfiler CSV row for row, value for value.

    Values naming the reference's output folder (saved overlays) must name, exactly, the same file
    in published/<job>/ of the job that ran the row's image set, and that file must be there.
    """
    header, ref_rows = read_reference(reference, delim)
    table = pq.read_table(merged)
    assert table.column_names == header, (set(table.column_names) ^ set(header))
    got_rows = table.to_pylist()
    keys = ["ImageNumber"] + (["ObjectNumber"] if "ObjectNumber" in header else [])
    ref_rows.sort(key=lambda r: tuple(int(r[k]) for k in keys))
    assert [tuple(r[k] for k in keys) for r in got_rows] == \
        [tuple(int(r[k]) for k in keys) for r in ref_rows], "rows or their order differ"
    run = merged.parent.parent
    owner = jobs_by_image(run) if ref_out is not None and "ImageNumber" in header else {}
    saved = 0
    for ref, got in zip(ref_rows, got_rows):
        for col in header:
            if col.startswith(ignore):
                continue
            if ref_out is not None and (str(ref_out) in ref[col] or ref_out.as_uri() in ref[col]):
                job = owner[got["ImageNumber"]]
                want = saved_in_job(ref[col], ref_out, run / "published" / job)
                assert got[col] == want, (merged.name, col, "names another job or path", got[col], want)
                assert_saved_file_exists(col, got[col], got)
                saved += 1
                continue
            assert same_value(ref[col], got[col]), (merged.name, col, ref[col], got[col], [got[k] for k in keys])
    for field in table.schema:
        if field.name.startswith("Metadata_"):
            assert str(field.type) == "string", field
    if ref_out is not None and merged.stem == "Image" and got_rows:
        assert saved, f"{reference}: no value names {ref_out}: the saved-image check compared nothing"
    return len(got_rows)
