"""Groups of image sets -> jobs. Pure: the same image sets and options give the same plan.

A job never holds part of what the pipeline aggregates over. What that is, CellProfiler's modules
say themselves (the probe's `aggregation` entries, see bpcp.inputs.cp_probe): a module that
aggregates "per group" (illumination over all images, tracking, projections, tiles) sees all the
image sets of a CellProfiler group, and the whole run when the pipeline does not group. So:

- the pipeline groups (Groups module, or LoadData's grouping): its groups are the units. Its keys
  are the default job grouping, and --group-by may only be the same or coarser (every pipeline
  group inside one job group; checked on the data, with CellProfiler's own group numbers);
- it does not group, but a module aggregates per group: the whole run is one job by default, and
  a --group-by that makes more than one job is refused;
- modules that compute values over the whole run after it (MeasureImageQuality's experiment-wide
  thresholds, CalculateStatistics) cannot be kept whole by any grouping that runs in parallel:
  the plan says so in its warnings, with CellProfiler's own words.

Bundled groups share one CellProfiler process, which keeps the pipeline's groups apart. By default
(bundle=AUTO) groups are bundled into about one job per slot, at most AUTO_MAX_SETS image sets
each: every CellProfiler process pays a few seconds of start-up, which on a short job is a large
share of its time, while a huge job makes retries and resumes coarse.

Numbering: each image set's global ImageNumber, Group_Number and Group_Index are what one
CellProfiler process over the whole dataset records (asked of CellProfiler when the dataset was
read; `single_run_numbering`). A job's image sets are listed in that order, which is also the order
the job's own CellProfiler numbers them in, so merge maps local ImageNumber i to image_numbers[i-1].
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

from bpcp.arrow import pa, pc
from bpcp.errors import BpcpError
from bpcp.inputs.dataset import ImageSets
from bpcp.planfile import Bundling, CellProfilerInfo, Dataset, Job, Pipeline, Plan

DEFAULT_GROUP_BY = ("Metadata_Plate", "Metadata_Well")


AUTO = -1            # bundle: about one job per slot, at most AUTO_MAX_SETS image sets per job
AUTO_MAX_SETS = 16   # a 9-site well stays one job; 2-3-site wells bundle by 5-8


@dataclass(frozen=True)
class PlanOptions:
    group_by: tuple[str, ...] | None = None  # None: not given (see job_keys)
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


@dataclass(frozen=True)
class Planned:
    plan: Plan                 # what plan.json will hold
    rows: list[list[int]]      # per job, the 0-based rows of the image set table, in job order


def parse_group_by(text: str | None) -> tuple[str, ...] | None:
    """'Plate,Well' or 'Metadata_Plate, Metadata_Well' -> ('Metadata_Plate', 'Metadata_Well'); 'none' -> ();
    None (not given) -> None: planning then follows the pipeline (job_keys)."""
    if text is None:
        return None
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


# ---------------------------------------------------------------- what the pipeline aggregates over

@dataclass(frozen=True)
class Aggregation:
    """What a pipeline's modules aggregate over, from the probe's description of it."""

    keys: tuple[str, ...] = ()           # the pipeline's grouping keys (empty: it does not group)
    source: str | None = None            # the module that groups: "Groups" or "LoadData"
    per_group: tuple[dict, ...] = ()     # modules that aggregate over a group (the whole run without grouping)
    per_run: tuple[dict, ...] = ()       # modules that compute values over the whole run, after it

    @classmethod
    def of(cls, pipeline: dict) -> Aggregation:
        entries = pipeline.get("aggregation") or ()
        return cls(
            keys=tuple(pipeline.get("grouping_keys") or ()),
            source=pipeline.get("grouping_module") or ("the pipeline" if pipeline.get("grouping_keys") else None),
            per_group=tuple(e for e in entries if e.get("scope") == "group"),
            per_run=tuple(e for e in entries if e.get("scope") == "run"),
        )

    @staticmethod
    def names(entries: tuple[dict, ...], verb: str = "") -> str:
        """'CorrectIlluminationCalculate (module 2) aggregates', 'A (module 2) and B (module 5) aggregate'."""
        items = list(dict.fromkeys(f"{e['module']} (module {e['number']})" for e in entries))
        text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        if verb:
            text += f" {verb}s" if len(items) == 1 else f" {verb}"
        return text


def job_keys(group_by: tuple[str, ...] | None, pipeline: dict) -> tuple[str, ...]:
    """The job grouping: --group-by when given; else the pipeline's own grouping keys; else one job
    when a module aggregates over the whole run; else Plate+Well."""
    if group_by is not None:
        return tuple(group_by)
    unit = Aggregation.of(pipeline)
    if unit.keys:
        return unit.keys
    return () if unit.per_group else DEFAULT_GROUP_BY


def _show(keys: tuple[str, ...]) -> str:
    return ",".join(keys) or "none"


def cut_problem(image_sets: ImageSets, groups: list[tuple[dict[str, str], list[int]]], unit: Aggregation,
                keys: tuple[str, ...], asked: bool, group_numbers: list[int]) -> str | None:
    """The line refusing job groups that would cut what the pipeline aggregates over, or None.

    groups: every job group (before --only); group_numbers: CellProfiler's Group_Number per row.
    """
    if unit.keys:
        owner: dict[int, int] = {}
        for index, (_, rows) in enumerate(groups):
            for row in rows:
                first = owner.setdefault(group_numbers[row], index)
                if first == index:
                    continue
                example = ",".join(f"{k}={image_sets.table[k][row].as_py()}" for k in unit.keys
                                   if k in image_sets.table.column_names)
                aggregates = f", and {Aggregation.names(unit.per_group, 'aggregate')} over each group" if unit.per_group else ""
                if not asked:
                    split = " and ".join(",".join(f"{k}={v!r}" for k, v in groups[i][0].items()) for i in (first, index))
                    return (f"{image_sets.path}: CellProfiler puts {split} in one group of the pipeline's "
                            f"grouping by {_show(unit.keys)} ({unit.source}), but they are written differently; "
                            "write each group's values the same way")
                return (f"--group-by {_show(keys)}: would split the pipeline's groups (it groups by "
                        f"{_show(unit.keys)} in its {unit.source} module{aggregates}): the group {example} would "
                        f"run in more than one job; pass --group-by {_show(unit.keys)} or fewer of these keys "
                        "(or none), or leave --group-by out to follow the pipeline")
        return None
    if unit.per_group and len(groups) > 1:
        return (f"--group-by {_show(keys)}: would split what {Aggregation.names(unit.per_group, 'aggregate')} over, "
                "every image set of the run, since the pipeline does not group; leave --group-by out (or pass "
                "none) for one job over everything, or group the images in the pipeline (Groups module, or "
                "LoadData's 'Group images by metadata') and plan again")
    return None


def aggregation_warnings(unit: Aggregation, keys: tuple[str, ...], jobs: int, image_sets: int) -> list[str]:
    """What the plan's output and report.json say about aggregation: one job for the whole run, and
    values computed over the whole run that a plan of several jobs computes per job."""
    warnings = []
    if unit.per_group and not unit.keys and not keys and image_sets > 1:
        warnings.append(
            f"one job over all {image_sets} image sets: {Aggregation.names(unit.per_group, 'aggregate')} "
            "over every image set of the run, "
            "since the pipeline does not group; group the images in the pipeline (Groups module or "
            "LoadData grouping) to run the groups in parallel")
    if jobs > 1:
        for entry in unit.per_run:
            said = "; ".join(entry.get("warnings") or ()) or entry.get("reason") or "computes after the run"
            warnings.append(
                f"{entry['module']} (module {entry['number']}) computes values over all image sets of a run "
                f"after it ends, and this plan runs {jobs} jobs, so each job's values cover its own image sets "
                f"(CellProfiler: \"{said}\"); plan with --group-by none for one job over everything")
    return warnings


# ---------------------------------------------------------------- numbering as one CellProfiler run

# LoadData's column types (cellprofiler_core get_loaddata_type): int if every value is a 32-bit
# integer, else float if every value is a number, else text; well-column tokens are always text.
_INT, _FLOAT, _TEXT = 0, 1, 2
_WELL_COLUMN_TOKENS = ("wellcol", "well_col", "wellcolumn", "well_column", "column", "col")
_NOT_TYPED = ("FileName_", "PathName_", "URL_", "Image_FileName_", "Image_PathName_", "Image_URL_",
              "ObjectsFileName_", "ObjectsPathName_", "ObjectsURL_", "Objects_")


def _value_type(value: str) -> int:
    try:
        number = int(value)
        return _INT if -(2 ** 31) <= number < 2 ** 31 else _TEXT
    except ValueError:
        try:
            float(value)
            return _FLOAT
        except ValueError:
            return _TEXT


def loaddata_typed(name: str) -> bool:
    """Whether LoadData types a column from its values (metadata and other non-image columns)."""
    if name.startswith(_NOT_TYPED):
        return False
    return not (name.startswith("Metadata_") and name[len("Metadata_"):].lower() in _WELL_COLUMN_TOKENS)


def _row_types(column: pa.ChunkedArray) -> pa.Array:
    """LoadData's type of each value (one call per distinct value)."""
    encoded = column.combine_chunks().dictionary_encode()
    kinds = pa.array([_value_type(v) for v in encoded.dictionary.to_pylist()], pa.int8())
    return pc.take(kinds, encoded.indices)


def _widest(types: pa.Array, rows: list[int] | None = None) -> int:
    picked = types if rows is None else pc.take(types, pa.array(rows, pa.int64()))
    widest = pc.max(picked).as_py()
    return _INT if widest is None else int(widest)


def _as_cellprofiler_strings(column: pa.ChunkedArray, kind: int) -> list[str]:
    values = column.to_pylist()
    if kind == _INT:
        return [str(int(v)) for v in values]
    if kind == _FLOAT:
        return [str(float(v)) for v in values]
    return values


def single_run_numbering(image_sets: ImageSets, pipeline_keys: list[str]) -> tuple[list[int], list[int], list[int]]:
    """ImageNumber, Group_Number and Group_Index per image set (row) as one CellProfiler process over
    the whole dataset records them.

    CellProfiler's own answer when the dataset was read with it (image_sets.cp_groups); otherwise its
    rules (Measurements.get_groupings, Pipeline.prepare_run): groups sorted by the str() of the
    values (LoadData's typed values: '002' in a column of integers is 2), image sets renumbered
    group by group, in their order within each group.
    """
    n = len(image_sets)
    if image_sets.cp_groups is not None:
        cp = image_sets.cp_groups
        numbers = cp["ImageNumber"].to_pylist() if "ImageNumber" in cp.column_names else list(range(1, n + 1))
        return numbers, cp["Group_Number"].to_pylist(), cp["Group_Index"].to_pylist()
    if not pipeline_keys or not all(k in image_sets.table.column_names for k in pipeline_keys):
        return list(range(1, n + 1)), [1] * n, list(range(1, n + 1))
    columns = []
    for key in pipeline_keys:
        column = image_sets.table[key]
        typed = image_sets.kind == "loaddata" and loaddata_typed(key)
        kind = _widest(_row_types(column)) if typed else _TEXT
        columns.append(_as_cellprofiler_strings(column, kind))
    members: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for row in range(n):
        members.setdefault(tuple((k, col[row]) for k, col in zip(pipeline_keys, columns)), []).append(row)
    numbers, group_numbers, indexes = [0] * n, [0] * n, [0] * n
    next_number = 1
    for group_number, group in enumerate(sorted(members), start=1):
        for index, row in enumerate(members[group], start=1):
            numbers[row], group_numbers[row], indexes[row] = next_number, group_number, index
            next_number += 1
    return numbers, group_numbers, indexes


def single_run_groups(image_sets: ImageSets, pipeline_keys: list[str]) -> tuple[list[int], list[int]]:
    """Group_Number and Group_Index per image set as one CellProfiler run over everything records."""
    _, numbers, indexes = single_run_numbering(image_sets, pipeline_keys)
    return numbers, indexes


def loaddata_type_problem(image_sets: ImageSets, job_rows: list[list[int]], job_ids: list[str]) -> str | None:
    """A job whose rows LoadData would type differently from the whole CSV, or None.

    LoadData types a column from the values it reads: a job whose values of a text column are all
    numbers records 2 where one run over the whole CSV records '002' (and sorts its groups otherwise).
    """
    if image_sets.kind != "loaddata" or len(job_rows) < 2:
        return None
    for name in image_sets.table.column_names:
        if not loaddata_typed(name):
            continue
        types = _row_types(image_sets.table[name])
        whole = _widest(types)
        if whole == _INT:
            continue
        for rows, jid in zip(job_rows, job_ids):
            here = _widest(types, rows) if rows else whole
            if here != whole:
                value = image_sets.table[name][rows[0]].as_py()
                kind = "text" if whole == _TEXT else "decimals"
                seen = "integers" if here == _INT else "decimals"
                return (f"{image_sets.path}: CellProfiler's LoadData reads column {name} as {kind} over the whole "
                        f"CSV but as {seen} in job {jid} (e.g. {value!r}), so that job would record other values "
                        f"than one run over everything; make the column's values {kind} in every group (e.g. a "
                        "letter prefix, or 1.0 for 1), or plan with --group-by none")
    return None


# ---------------------------------------------------------------- jobs

def _matches(values: dict[str, str], only: tuple[dict[str, str], ...]) -> bool:
    return not only or any(all(values.get(k) == v for k, v in cond.items()) for cond in only)


def bundling_is_safe(pipeline: dict, group_by: tuple[str, ...]) -> bool:
    """Bundled groups share one CellProfiler run: safe when CellProfiler groups at least as finely
    as bpcp does, or when no module aggregates over a group."""
    unit = Aggregation.of(pipeline)
    if unit.keys and set(group_by) <= set(unit.keys):
        return True
    return not unit.per_group


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


def make_plan(image_sets: ImageSets, pipeline: dict, options: PlanOptions, *, cellprofiler: CellProfilerInfo,
              pipeline_file: Pipeline, table_files: dict[str, str], delimiter: str = ",") -> Planned:
    """The plan: which image sets each job runs, and what a finished job must publish."""
    unit = Aggregation.of(pipeline)
    keys = job_keys(options.group_by, pipeline)
    image_numbers, group_numbers, group_indexes = single_run_numbering(image_sets, list(unit.keys))
    every = group_rows(image_sets.table, keys)
    cut = cut_problem(image_sets, every, unit, keys, options.group_by is not None, group_numbers)
    if cut:
        raise BpcpError(cut)
    groups = [g for g in every if _matches(g[0], options.only)]
    if not groups:
        wanted = " or ".join(",".join(f"{k}={v}" for k, v in c.items()) for c in options.only)
        raise BpcpError(f"--only {wanted}: matches no group of {image_sets.path}; check the values in the dataset (Metadata_* columns)")
    groups.sort(key=lambda g: tuple(g[0].values()))
    target = options.bundle
    why_not = None
    if target == AUTO:
        target = auto_bundle(sum(len(g[1]) for g in groups), options.slots)
        if target > 1 and image_sets.kind == "batch":
            target, why_not = 0, "a Batch_data.h5 job runs one CellProfiler group (-g)"
        elif target > 1 and len(groups) > 1 and not bundling_is_safe(pipeline, keys):
            target, why_not = 0, (f"{Aggregation.names(unit.per_group, 'aggregate')} over the pipeline's groups "
                                  f"({_show(unit.keys)}), which CellProfiler would not keep apart in a job of "
                                  f"several {_show(keys)} groups")
    bundling = Bundling(asked="auto" if options.bundle == AUTO else options.bundle, slots=options.slots,
                        sets_per_job=max(target, 0), why_not=why_not)
    if target > 1 and image_sets.kind == "batch":
        raise BpcpError("--bundle: a Batch_data.h5 job runs exactly one CellProfiler group (-g); "
                        "drop --bundle (or pass --bundle 0), or plan from the LoadData CSV or images instead")
    if target > 1:
        if len(groups) > 1 and not bundling_is_safe(pipeline, keys):
            raise BpcpError(
                f"--bundle: {Aggregation.names(unit.per_group, 'aggregate')} over the pipeline's groups "
                f"({_show(unit.keys)}), and a job of several {_show(keys)} groups would mix them; "
                f"pass --group-by {_show(unit.keys)} to bundle, or drop --bundle"
            )
        job_groups = _bundle(groups, target)
    else:
        job_groups = [[g] for g in groups]
    numbering = "global" if image_sets.kind == "batch" else "local"
    suffix = "csv" if image_sets.kind == "loaddata" else "txt"
    jobs, rows = [], []
    for members in job_groups:
        # CellProfiler's order: the job's own run numbers its image sets the same way
        job_rows = sorted((r for _, group in members for r in group), key=lambda r: image_numbers[r])
        values = tuple(g for g, _ in members)
        jid = job_id(list(values))
        jobs.append(Job(
            id=jid,
            groups=values,
            image_numbers=tuple(image_numbers[r] for r in job_rows),
            group_numbers=tuple(group_numbers[r] for r in job_rows),
            group_indexes=tuple(group_indexes[r] for r in job_rows),
            input=None if numbering == "global" else f"inputs/{jid}.{suffix}",
            group_arg=",".join(f"{k}={v}" for k, v in values[0].items()) if numbering == "global" else None,
        ))
        rows.append(job_rows)
    typing = loaddata_type_problem(image_sets, rows, [j.id for j in jobs])
    if typing:
        raise BpcpError(typing)
    order = sorted(range(len(jobs)), key=lambda i: -len(rows[i]))   # longest first; stable
    plan = Plan(
        dataset=Dataset(kind=image_sets.kind, path=str(image_sets.path), sha256=image_sets.checksum),
        pipeline=pipeline_file,
        cellprofiler=cellprofiler,
        group_by=keys,
        bundle=bundling,
        numbering=numbering,
        tables=tuple(sorted(table_files)),
        table_files=dict(table_files),
        delimiter=delimiter,
        image_sets=sum(len(r) for r in rows),
        jobs=tuple(jobs[i] for i in order),
        warnings=tuple(aggregation_warnings(unit, keys, len(jobs), sum(len(r) for r in rows))),
    )
    return Planned(plan, [rows[i] for i in order])
