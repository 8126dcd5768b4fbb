"""Groups of image sets -> jobs. Pure: the same image sets and options give the same plan.

A group is never split across jobs: pipelines that aggregate over a group (illumination
correction over a plate, tracking over a time series) must see the whole group in one process.
Small groups may be bundled into one job, but only when CellProfiler will still keep them apart.
By default (bundle=AUTO) groups are bundled into about one job per slot, at most AUTO_MAX_SETS
image sets each: every CellProfiler process pays a few seconds of start-up, which on a short job
is a large share of its time, while a huge job makes retries and resumes coarse.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

import pyarrow as pa

from bpcp import __version__
from bpcp.dataset import ImageSets
from bpcp.errors import BpcpError

DEFAULT_GROUP_BY = ("Metadata_Plate", "Metadata_Well")
# Modules whose results depend on every image set of a run (or of a CellProfiler group).
AGGREGATING_MODULES = frozenset({
    "CorrectIlluminationCalculate", "TrackObjects", "MakeProjection", "Tile",
    "CalculateStatistics", "CreateBatchFiles",
})


AUTO = -1            # bundle: about one job per slot, at most AUTO_MAX_SETS image sets per job
AUTO_MAX_SETS = 16   # a 9-site well stays one job; 2-3-site wells bundle by 5-8


@dataclass(frozen=True)
class PlanOptions:
    group_by: tuple[str, ...] = DEFAULT_GROUP_BY
    only: tuple[dict[str, str], ...] = ()    # keep groups matching any of these (all keys equal)
    bundle: int = 0                          # image sets per job to pack groups into; 0: never, AUTO: per slots
    slots: int = 1                           # CellProfiler processes the run will have (for AUTO)


def parse_bundle(text: str | int) -> int:
    """'auto' -> AUTO, '0' -> 0 (one group per job), 'N' -> N image sets per job."""
    value = str(text).strip().lower()
    if value == "auto":
        return AUTO
    if not value.isdigit():
        raise BpcpError(f"--bundle {text}: give 'auto', a number of image sets per job, or 0 for one group per job")
    return int(value)


def auto_bundle(image_sets: int, slots: int, max_sets: int = AUTO_MAX_SETS) -> int:
    """Image sets per job for about one job per slot (never more than max_sets per job)."""
    jobs = max(1, slots, math.ceil(image_sets / max_sets))
    return math.ceil(image_sets / jobs)


@dataclass
class Plan:
    doc: dict                  # what plan.json holds
    rows: list[list[int]]      # per job, the 0-based rows of the image set table, in job order


def parse_group_by(text: str | None) -> tuple[str, ...]:
    """'Plate,Well' or 'Metadata_Plate, Metadata_Well' -> ('Metadata_Plate', 'Metadata_Well'); 'none' -> ()."""
    if text is None:
        return DEFAULT_GROUP_BY
    text = text.strip()
    if text.lower() in ("", "none"):
        return ()
    keys = [k.strip() for k in text.split(",") if k.strip()]
    return tuple(k if k.startswith("Metadata_") or k == "ImageNumber" else f"Metadata_{k}" for k in keys)


def parse_only(items: list[str] | None) -> tuple[dict[str, str], ...]:
    """['Plate=P1,Well=A01', 'Plate=P2'] -> ({'Metadata_Plate': 'P1', ...}, {...})."""
    result = []
    for item in items or ():
        cond = {}
        for part in item.split(","):
            if "=" not in part:
                raise BpcpError(f"--only {item!r}: expected KEY=VALUE[,KEY=VALUE], e.g. --only Plate=P1")
            key, value = part.split("=", 1)
            key = key.strip()
            cond[key if key.startswith("Metadata_") else f"Metadata_{key}"] = value
        result.append(cond)
    return tuple(result)


def slug(values: list[str], limit: int = 40) -> str:
    text = "_".join(values)
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return text[:limit].rstrip("-._") or "group"


def job_id(groups: list[dict[str, str]]) -> str:
    digest = hashlib.sha256(json.dumps(groups, sort_keys=True).encode()).hexdigest()[:8]
    first = slug(list(groups[0].values())) if groups and groups[0] else "all"
    more = f"+{len(groups) - 1}" if len(groups) > 1 else ""
    return f"{first}{more}-{digest}"


def group_rows(table: pa.Table, keys: tuple[str, ...]) -> list[tuple[dict[str, str], list[int]]]:
    """(group values, rows) for every group, in order of first appearance; rows keep table order."""
    n = table.num_rows
    if not keys:
        return [({}, list(range(n)))]
    indexed = table.select(list(keys)).append_column("__row", pa.array(range(n), pa.int64()))
    grouped = indexed.group_by(list(keys), use_threads=False).aggregate([("__row", "list")])
    key_columns = [grouped[k].to_pylist() for k in keys]
    row_lists = grouped["__row_list"].to_pylist()
    return [
        ({k: col[i] for k, col in zip(keys, key_columns)}, rows)
        for i, rows in enumerate(row_lists)
    ]


def single_run_groups(image_sets: ImageSets, pipeline_keys: list[str]) -> tuple[list[int], list[int]]:
    """Group_Number and Group_Index per image set as one CellProfiler run over everything records."""
    if image_sets.cp_groups is not None:
        return (image_sets.cp_groups["Group_Number"].to_pylist(),
                image_sets.cp_groups["Group_Index"].to_pylist())
    n = len(image_sets)
    if not pipeline_keys or not all(k in image_sets.table.column_names for k in pipeline_keys):
        return [1] * n, list(range(1, n + 1))
    groups = group_rows(image_sets.table, tuple(pipeline_keys))
    # CellProfiler sorts groups by their (key, str(value)) tuples: Measurements.get_groupings
    groups.sort(key=lambda g: tuple(g[0][k] for k in pipeline_keys))
    numbers, indexes = [0] * n, [0] * n
    for number, (_, rows) in enumerate(groups, start=1):
        for index, row in enumerate(rows, start=1):
            numbers[row], indexes[row] = number, index
    return numbers, indexes


def _matches(values: dict[str, str], only: tuple[dict[str, str], ...]) -> bool:
    return not only or any(all(values.get(k) == v for k, v in cond.items()) for cond in only)


def bundling_is_safe(pipeline: dict, group_by: tuple[str, ...]) -> bool:
    """Bundled groups share one CellProfiler run: safe when CellProfiler groups at least as finely
    as bpcp does, or when no module aggregates across image sets."""
    keys = set(pipeline.get("grouping_keys") or ())
    if keys and set(group_by) <= keys:
        return True
    return not AGGREGATING_MODULES.intersection(pipeline.get("modules", ()))


def _bundle(groups: list[tuple[dict, list[int]]], target: int) -> list[list[tuple[dict, list[int]]]]:
    jobs: list[list[tuple[dict, list[int]]]] = []
    current: list[tuple[dict, list[int]]] = []
    size = 0
    for group in groups:
        if current and size + len(group[1]) > target:
            jobs.append(current)
            current, size = [], 0
        current.append(group)
        size += len(group[1])
    if current:
        jobs.append(current)
    return jobs


def make_plan(image_sets: ImageSets, pipeline: dict, options: PlanOptions, *, cp_version: str,
              pipeline_doc: dict, table_files: dict[str, str], delimiter: str = ",") -> Plan:
    """The plan: which image sets each job runs, and what a finished job must publish."""
    keys = tuple(options.group_by)
    groups = [g for g in group_rows(image_sets.table, keys) if _matches(g[0], options.only)]
    if not groups:
        wanted = " or ".join(",".join(f"{k}={v}" for k, v in c.items()) for c in options.only)
        raise BpcpError(f"--only {wanted}: matches no group of {image_sets.path}; check the values in the dataset (Metadata_* columns)")
    groups.sort(key=lambda g: tuple(g[0].values()))
    target = options.bundle
    bundling = {"asked": "auto" if target == AUTO else target, "slots": options.slots}
    if target == AUTO:
        target = auto_bundle(sum(len(g[1]) for g in groups), options.slots)
        if target > 1 and image_sets.kind == "batch":
            target, bundling["why_not"] = 0, "a Batch_data.h5 job runs one CellProfiler group (-g)"
        elif target > 1 and not bundling_is_safe(pipeline, keys):
            target, bundling["why_not"] = 0, "the pipeline aggregates across image sets without grouping by " + ",".join(keys)
    bundling["sets_per_job"] = max(target, 0)
    if target > 1 and image_sets.kind == "batch":
        raise BpcpError("--bundle: a Batch_data.h5 job runs exactly one CellProfiler group (-g); "
                        "drop --bundle (or pass --bundle 0), or plan from the LoadData CSV or images instead")
    if target > 1:
        if not bundling_is_safe(pipeline, keys):
            raise BpcpError(
                f"--bundle: the pipeline aggregates across image sets ({', '.join(sorted(AGGREGATING_MODULES.intersection(pipeline.get('modules', ()))))}) "
                f"but does not group by {','.join(keys)}, so bundled groups would be mixed; "
                "group by these keys in LoadData or the Groups module, or drop --bundle"
            )
        job_groups = _bundle(groups, target)
    else:
        job_groups = [[g] for g in groups]
    group_numbers, group_indexes = single_run_groups(image_sets, pipeline.get("grouping_keys") or [])
    numbering = "global" if image_sets.kind == "batch" else "local"
    jobs, rows = [], []
    for members in job_groups:
        job_rows = [r for _, group in members for r in group]
        values = [g for g, _ in members]
        jid = job_id(values)
        job = {
            "id": jid,
            "groups": values,
            "image_numbers": [r + 1 for r in job_rows],
            "group_numbers": [group_numbers[r] for r in job_rows],
            "group_indexes": [group_indexes[r] for r in job_rows],
            "input": None if numbering == "global" else f"inputs/{jid}.{'csv' if image_sets.kind == 'loaddata' else 'txt'}",
            "group_arg": ",".join(f"{k}={v}" for k, v in values[0].items()) if numbering == "global" else None,
        }
        jobs.append(job)
        rows.append(job_rows)
    order = sorted(range(len(jobs)), key=lambda i: -len(rows[i]))   # longest first; stable
    doc = {
        "format": 1,
        "bpcp_version": __version__,
        "dataset": {"kind": image_sets.kind, "path": str(image_sets.path), "sha256": image_sets.checksum},
        "pipeline": pipeline_doc,
        "cellprofiler": {"version": cp_version},
        "group_by": list(keys),
        "bundle": bundling,
        "pipeline_grouping": pipeline.get("grouping_keys") or [],
        "numbering": numbering,
        "tables": sorted(table_files),
        "table_files": table_files,
        "delimiter": delimiter,
        "image_sets": sum(len(r) for r in rows),
        "jobs": [jobs[i] for i in order],
    }
    return Plan(doc, [rows[i] for i in order])
