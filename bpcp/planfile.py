"""plan.json: what a run will do, as typed, frozen records. The only reader and writer of the file.

Every step after planning reads the plan through `read`; only planning writes it (`write`). The
file stays JSON (docs/run-folder.md describes it field by field, and a test keeps that page true to
these classes). A plan of another format is refused with one line that says what to do.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from bpcp import __version__
from bpcp.errors import BpcpError
from bpcp.runfolder import RunFolder, write_atomic

FORMAT = 2


@dataclass(frozen=True)
class Dataset:
    kind: str                     # loaddata | filelist | folder | batch
    path: str                     # absolute path or s3:// URL the user gave
    sha256: str                   # of the dataset file (or of the file list a folder gave)
    copy: str | None = None       # run-folder copy of a dataset that came from S3
    path_map: tuple[str, ...] = ()   # FROM=TO rewrites of image paths (--path-map)


@dataclass(frozen=True)
class Pipeline:
    path: str                     # the pipeline the user gave (path or s3:// URL)
    file: str                     # its copy in the run folder, which jobs run
    sha256: str


@dataclass(frozen=True)
class CellProfilerInfo:
    version: str
    executable: str | None = None


@dataclass(frozen=True)
class Bundling:
    asked: str | int              # "auto" or the --bundle number
    slots: int
    sets_per_job: int             # 0 or 1: one group per job
    why_not: str | None = None    # why auto bundling was not done


@dataclass(frozen=True)
class Job:
    id: str
    groups: tuple[dict[str, str], ...]
    image_numbers: tuple[int, ...]      # global ImageNumber of the job's image sets, in job order
    group_numbers: tuple[int, ...]      # Group_Number one CellProfiler run over everything records
    group_indexes: tuple[int, ...]      # Group_Index one CellProfiler run over everything records
    input: str | None = None            # inputs/<id>.csv|txt; None for a Batch_data.h5 job
    input_sha256: str | None = None     # of that file, so a stale or partial copy is found
    group_arg: str | None = None        # the -g value of a Batch_data.h5 job
    fetch: str | None = None            # inputs/<id>.fetch: s3:// objects the job downloads
    fetch_sha256: str | None = None

    @property
    def image_sets(self) -> int:
        return len(self.image_numbers)

    def replace(self, **changes: Any) -> Job:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Plan:
    dataset: Dataset
    pipeline: Pipeline
    cellprofiler: CellProfilerInfo
    group_by: tuple[str, ...]
    bundle: Bundling
    numbering: str                      # "local": job ImageNumbers restart at 1; "global": -g
    tables: tuple[str, ...]             # CellProfiler tables every job must publish
    table_files: dict[str, str]         # table -> file name in the job's output folder
    delimiter: str                      # "," or "\t" (ExportToSpreadsheet's choice)
    image_sets: int
    jobs: tuple[Job, ...]               # longest first
    warnings: tuple[str, ...] = ()      # what the user should know about this plan
    format: int = FORMAT
    bpcp_version: str = __version__

    def job(self, job_id: str) -> Job:
        for job in self.jobs:
            if job.id == job_id:
                return job
        raise BpcpError(f"no job {job_id} in this plan; `bpcp status` lists the jobs")

    def table_file(self, table: str) -> str:
        """The file name a job publishes for a table."""
        if table in self.table_files:
            return self.table_files[table]
        return f"{table}{'.txt' if self.delimiter == chr(9) else '.csv'}"

    def replace(self, **changes: Any) -> Plan:
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    """JSON-ready: records as dicts without their unset (None) fields, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(plan: Plan) -> dict[str, Any]:
    doc = _plain(plan)
    return {"format": doc.pop("format"), "bpcp_version": doc.pop("bpcp_version"), **doc}


def from_dict(doc: dict[str, Any], source: str = "plan.json") -> Plan:
    """A Plan from the parsed JSON; a plan of another format is refused in one line."""
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise BpcpError(
            f"{source}: written by bpcp {doc.get('bpcp_version', 'of an older format')} (format {fmt}), this bpcp "
            f"reads format {FORMAT}; plan into a new --output (published results there stay readable by that bpcp)"
        )
    try:
        return Plan(
            dataset=Dataset(**{**doc["dataset"], "path_map": tuple(doc["dataset"].get("path_map", ()))}),
            pipeline=Pipeline(**doc["pipeline"]),
            cellprofiler=CellProfilerInfo(**doc["cellprofiler"]),
            group_by=tuple(doc["group_by"]),
            bundle=Bundling(**doc["bundle"]),
            numbering=doc["numbering"],
            tables=tuple(doc["tables"]),
            table_files=dict(doc["table_files"]),
            delimiter=doc["delimiter"],
            image_sets=int(doc["image_sets"]),
            jobs=tuple(
                Job(**{**job, "groups": tuple(job["groups"]), "image_numbers": tuple(job["image_numbers"]),
                       "group_numbers": tuple(job["group_numbers"]), "group_indexes": tuple(job["group_indexes"])})
                for job in doc["jobs"]
            ),
            warnings=tuple(doc.get("warnings", ())),
            format=fmt,
            bpcp_version=doc.get("bpcp_version", "?"),
        )
    except (KeyError, TypeError) as exc:
        raise BpcpError(f"{source}: not a bpcp plan ({type(exc).__name__}: {exc}); plan again into a new --output") from None


def read(run: RunFolder) -> Plan:
    if not run.plan.exists():
        raise BpcpError(f"{run.root}: no plan.json here; run `bpcp plan` (or `bpcp run`) with --output {run.root}")
    try:
        doc = json.loads(run.plan.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BpcpError(f"{run.plan}: not a readable plan ({exc}); plan again with `bpcp plan`") from None
    if not isinstance(doc, dict):
        raise BpcpError(f"{run.plan}: not a bpcp plan; plan again with `bpcp plan`")
    return from_dict(doc, str(run.plan))


def write(run: RunFolder, plan: Plan) -> None:
    write_atomic(run.plan, json.dumps(to_dict(plan), indent=1))
