"""The run folder every command shares (docs/run-folder.md): names, and reading/writing the plan."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
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


def _absolute_paths(table: pa.Table, base: Path) -> pa.Table:
    """Job CSVs live in the run folder: turn relative PathName columns into absolute ones."""
    import pyarrow.compute as pc

    for i, name in enumerate(table.column_names):
        if name.startswith(PATH_PREFIXES):
            col = table[name].combine_chunks()
            rel = pc.invert(pc.starts_with(col, "/"))
            if pc.any(rel).as_py():
                fixed = pc.if_else(rel, pc.binary_join_element_wise(str(base), col, "/"), col)
                table = table.set_column(i, name, fixed)
    return table


def write_inputs(run: RunFolder, plan: Plan, image_sets: ImageSets) -> None:
    """One LoadData CSV or file list per job, holding exactly that job's image sets."""
    inputs = run.root / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    if image_sets.kind == "batch":
        return
    if image_sets.kind == "loaddata":
        table = _absolute_paths(image_sets.table, image_sets.path.parent)
        options = pacsv.WriteOptions(quoting_style="needed")
        for job, rows in zip(plan.doc["jobs"], plan.rows):
            tmp = run.root / (job["input"] + ".tmp")
            pacsv.write_csv(table.take(pa.array(rows, pa.int64())), tmp, options)
            os.replace(tmp, run.root / job["input"])
        return
    channels = [paths.to_pylist() for paths in image_sets.channels.values()]
    for job, rows in zip(plan.doc["jobs"], plan.rows):
        files = dict.fromkeys(paths[r] for r in rows for paths in channels)
        tmp = run.root / (job["input"] + ".tmp")
        tmp.write_text("\n".join(files) + "\n")
        os.replace(tmp, run.root / job["input"])


def write_plan(run: RunFolder, plan: Plan, image_sets: ImageSets, pipeline: Path) -> None:
    """Write plan.json, the per-job inputs and a copy of the pipeline (atomically where it matters)."""
    run.root.mkdir(parents=True, exist_ok=True)
    for sub in ("published", "failed", "work"):
        (run.root / sub).mkdir(exist_ok=True)
    copy = run.pipeline_copy(pipeline.suffix)
    if not copy.exists():
        shutil.copyfile(pipeline, copy)
    write_inputs(run, plan, image_sets)
    tmp = run.plan.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plan.doc, indent=1))
    os.replace(tmp, run.plan)
