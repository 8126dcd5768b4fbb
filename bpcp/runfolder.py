"""The run folder every command shares (docs/run-folder.md): names, and reading/writing the plan."""
from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from bpcp.dataset import PATH_PREFIXES, ImageSets
from bpcp.errors import BpcpError
from bpcp.plan import Plan


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def jobs_script(self) -> Path:
        return self.root / "jobs.sh"

    @property
    def joblist(self) -> Path:
        return self.root / "joblist.tsv"

    @property
    def joblog(self) -> Path:
        return self.root / "joblog.tsv"

    def pipeline_copy(self, suffix: str) -> Path:
        return self.root / f"pipeline{suffix}"

    def published(self, job: str | None = None) -> Path:
        return self.root / "published" / job if job else self.root / "published"

    def failed(self, job: str | None = None) -> Path:
        return self.root / "failed" / job if job else self.root / "failed"

    def work(self, job: str | None = None) -> Path:
        return self.root / "work" / job if job else self.root / "work"

    @property
    def merged(self) -> Path:
        return self.root / "merged"


def read_plan(run: RunFolder) -> dict:
    if not run.plan.exists():
        raise BpcpError(f"{run.root}: no plan.json here; run `bpcp plan` (or `bpcp run`) with --output {run.root}")
    try:
        return json.loads(run.plan.read_text())
    except json.JSONDecodeError as exc:
        raise BpcpError(f"{run.plan}: not valid JSON ({exc}); re-create it with `bpcp plan`") from exc


def same_work(old: dict, new: dict) -> list[str]:
    """What differs between two plans in ways that would make published results stale."""
    diffs = []
    if old.get("dataset", {}).get("sha256") != new["dataset"]["sha256"]:
        diffs.append("the dataset changed")
    if old.get("pipeline", {}).get("sha256") != new["pipeline"]["sha256"]:
        diffs.append("the pipeline changed")
    if old.get("cellprofiler", {}).get("version") != new["cellprofiler"]["version"]:
        diffs.append("the CellProfiler version changed")
    if [j["id"] for j in old.get("jobs", [])] != [j["id"] for j in new["jobs"]]:
        diffs.append("the groups changed")
    return diffs


def same_groups(old: dict, new: dict) -> bool:
    """Both plans run the same groups (however they are bundled into jobs)."""
    def groups(doc: dict) -> list[str]:
        return sorted(json.dumps(g, sort_keys=True) for job in doc.get("jobs", []) for g in job["groups"])
    return old.get("group_by") == new.get("group_by") and groups(old) == groups(new)


def _absolute_paths(table: pa.Table, base: Path) -> pa.Table:
    """Job CSVs live in the run folder: turn relative PathName columns into absolute ones."""
    for i, name in enumerate(table.column_names):
        if name.startswith(PATH_PREFIXES):
            col = table[name].combine_chunks()
            rel = pc.invert(pc.or_(pc.starts_with(col, "/"), pc.match_substring(col, "://")))
            if pc.any(rel).as_py():
                fixed = pc.if_else(rel, pc.binary_join_element_wise(str(base), col, "/"), col)
                table = table.set_column(i, name, fixed)
    return table


def _write_loaddata_inputs(run: RunFolder, plan: Plan, table: pa.Table) -> None:
    """Render all rows to CSV once, in job order, then cut the text into one file per job.

    Tens of thousands of small pyarrow writes take minutes; one write and a split take seconds.
    Values holding a line break cannot be cut by lines, so those tables take the slow path.
    """
    options = pacsv.WriteOptions(quoting_style="needed", include_header=False)
    order = pa.array([r for rows in plan.rows for r in rows], pa.int64())
    ordered = table.take(order)
    multiline = any(
        pc.any(pc.match_substring_regex(ordered[c], r"[\r\n]")).as_py() for c in ordered.column_names
    )
    header = ",".join('"' + c.replace('"', '""') + '"' for c in table.column_names) + "\n"
    if multiline:
        for job, rows in zip(plan.doc["jobs"], plan.rows):
            buf = io.BytesIO()
            pacsv.write_csv(table.take(pa.array(rows, pa.int64())), buf, options)
            write_atomic(run.root / job["input"], header + buf.getvalue().decode())
        return
    buf = io.BytesIO()
    pacsv.write_csv(ordered, buf, options)
    lines = buf.getvalue().decode().split("\n")     # not splitlines(): values may hold U+2028 etc.
    start = 0
    for job, rows in zip(plan.doc["jobs"], plan.rows):
        write_atomic(run.root / job["input"], header + "\n".join(lines[start:start + len(rows)]) + "\n")
        start += len(rows)


def write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary sibling, then rename it over path: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_inputs(run: RunFolder, plan: Plan, image_sets: ImageSets) -> None:
    """One LoadData CSV or file list per job, holding exactly that job's image sets."""
    inputs = run.root / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    if image_sets.kind == "batch":
        return
    if image_sets.kind == "loaddata":
        _write_loaddata_inputs(run, plan, _absolute_paths(image_sets.table, image_sets.path.parent))
        return
    channels = [paths.to_pylist() for paths in image_sets.channels.values()]
    for job, rows in zip(plan.doc["jobs"], plan.rows):
        files = dict.fromkeys(paths[r] for r in rows for paths in channels)
        write_atomic(run.root / job["input"], "\n".join(files) + "\n")


def write_fetch_lists(run: RunFolder, plan: Plan, image_sets: ImageSets) -> None:
    """inputs/<job>.fetch: the s3:// objects a job downloads before CellProfiler starts (one URL a
    line); and dataset.csv, the copy of a LoadData CSV that came from S3."""
    from bpcp.s3 import fetch_list, fetch_lists

    for job, urls in zip(plan.doc["jobs"], fetch_lists(image_sets.channels, plan.rows)):
        if job.get("fetch"):
            write_atomic(run.root / job["fetch"], fetch_list(urls))
    if plan.doc["dataset"].get("copy"):
        shutil.copyfile(image_sets.path, run.root / plan.doc["dataset"]["copy"])


def write_plan(run: RunFolder, plan: Plan, image_sets: ImageSets, pipeline: Path) -> None:
    """Write plan.json, the per-job inputs and a copy of the pipeline (atomically where it matters)."""
    run.root.mkdir(parents=True, exist_ok=True)
    for sub in ("published", "failed", "work"):
        (run.root / sub).mkdir(exist_ok=True)
    copy = run.pipeline_copy(pipeline.suffix)
    if not copy.exists():
        shutil.copyfile(pipeline, copy)
    write_inputs(run, plan, image_sets)
    write_fetch_lists(run, plan, image_sets)
    write_atomic(run.plan, json.dumps(plan.doc, indent=1))
