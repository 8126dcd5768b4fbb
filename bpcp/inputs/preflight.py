"""Everything checkable before work starts. Each check returns problem lines; none has side effects
except reading files. A problem line names the file, the row or group, and the fix."""
from __future__ import annotations

import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

from bpcp.arrow import pc
from bpcp.inputs.dataset import ImageSets

MAX_LISTED = 5


def _more(items: list, shown: int = MAX_LISTED) -> str:
    return f" (and {len(items) - shown} more)" if len(items) > shown else ""


def check_pipeline_file(pipeline: Path) -> list[str]:
    if not pipeline.exists():
        return [f"{pipeline}: pipeline not found; pass --pipeline with a .cppipe file or a Batch_data.h5"]
    if not pipeline.is_file():
        return [f"{pipeline}: is a folder, not a pipeline; pass a .cppipe file or a Batch_data.h5"]
    if not os.access(pipeline, os.R_OK):
        return [f"{pipeline}: not readable; fix its permissions"]
    with open(pipeline, "rb") as fd:
        start = fd.read(4096)
    if not start.strip():
        return [f"{pipeline}: empty file ({'0 bytes' if not start else 'only blank lines'}); pass the pipeline "
                "CellProfiler saved (File > Export > Pipeline, a .cppipe) or a Batch_data.h5"]
    return []


def check_output(run_dir: Path) -> list[str]:
    """The run folder exists or can be made, and a file can be written in it (as root too)."""
    existed = run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".bpcp-write-test-"):
            pass
    except OSError as exc:
        return [f"{run_dir}: output folder not writable ({exc.strerror}); choose another --output "
                "or fix its permissions"]
    finally:
        if not existed and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
    return []


def check_pipeline(pipeline: Path, info: dict, kind: str) -> list[str]:
    """The pipeline suits the dataset and writes tables bpcp can collect."""
    problems = [f"{pipeline}: {p}" for p in info.get("problems", ())]
    wants = {"loaddata": "loaddata", "filelist": "images", "folder": "images"}.get(kind)
    if wants == "loaddata" and info["input"] != "loaddata":
        problems.append(
            f"{pipeline}: the dataset is a LoadData CSV but the pipeline has no LoadData module; "
            "use a pipeline that starts with LoadData, or pass the image folder or a file list as --dataset"
        )
    if wants == "images" and info["input"] != "images":
        problems.append(
            f"{pipeline}: the dataset is a {kind} but the pipeline reads a LoadData CSV; "
            "pass the CSV as --dataset, or use a pipeline with Images/NamesAndTypes"
        )
    exports = info.get("exports", [])
    if not exports:
        problems.append(
            f"{pipeline}: no ExportToSpreadsheet module, so there are no tables to collect; add "
            "ExportToSpreadsheet (Export all measurement types: Yes) at the end of the pipeline"
        )
    for export in exports:
        if not export["directory"].startswith("Default Output Folder"):
            problems.append(
                f"{pipeline}: ExportToSpreadsheet (module {export['module']}) writes to "
                f"'{export['directory']}'; set its output file location to Default Output Folder "
                "so every job keeps its tables in its own folder"
            )
        if export["unpredictable"]:
            problems.append(
                f"{pipeline}: ExportToSpreadsheet (module {export['module']}) names files from metadata "
                f"({', '.join(export['unpredictable'])}); use the object names as file names"
            )
    return problems


def check_pipeline_grouping(image_sets: ImageSets, info: dict) -> list[str]:
    """The keys the pipeline groups by are in the dataset; LoadData reads every row of the CSV."""
    problems = []
    keys = info.get("grouping_keys") or []
    missing = [k for k in keys if k not in image_sets.table.column_names]
    if missing and image_sets.kind != "batch":
        listing = ", ".join(image_sets.metadata_keys) or "none"
        problems.append(
            f"{image_sets.path}: the pipeline groups by {', '.join(missing)} ({info.get('grouping_module') or 'grouping'} "
            f"module), which the dataset does not have (metadata keys here: {listing}); fix the pipeline's "
            "grouping or the dataset's Metadata_* columns"
        )
    rows = info.get("loaddata_rows")
    if rows and image_sets.kind == "loaddata":
        problems.append(
            f"{image_sets.path}: the pipeline's LoadData processes only rows {rows[0]}-{rows[1]} ('Process just a "
            "range of rows?': Yes), which each job would apply to its own rows; set it to No and give bpcp "
            "a CSV of the rows to run (or use --only)"
        )
    return problems


def check_group_keys(image_sets: ImageSets, group_by: tuple[str, ...]) -> list[str]:
    available = image_sets.metadata_keys
    missing = [k for k in group_by if k not in image_sets.table.column_names]
    if not missing:
        return []
    listing = ", ".join(available) if available else "none"
    return [
        f"{image_sets.path}: group key {k} not found (metadata keys here: {listing}); "
        "pass --group-by with keys from that list, or --group-by none for a single group"
        for k in missing
    ]


def how_they_differ(values: list[str]) -> str:
    """What separates values that are equal once normalised: 'surrounding spaces', 'case',
    'zero padding', or several of these ('case or zero padding')."""
    stripped = {v.strip() for v in values}
    kinds = []
    if any(v != v.strip() for v in values):
        kinds.append("surrounding spaces")
    if len({re.sub(r"(?<!\d)0+(?=\d)", "", v) for v in stripped}) > 1:
        kinds.append("case")
    if len({v.lower() for v in stripped}) > 1:
        kinds.append("zero padding")
    if not kinds:
        return "case or zero padding"
    return kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " or " + kinds[-1]


def normalise(value: str) -> str:
    """Case and zero padding dropped: 'A01' and 'a1' both become 'a1'."""
    return re.sub(r"(?<!\d)0+(?=\d)", "", value.strip().lower())


def check_group_values(image_sets: ImageSets, group_by: tuple[str, ...]) -> list[str]:
    problems = []
    table = image_sets.table
    for key in group_by:
        column = table[key].combine_chunks()
        empty = pc.indices_nonzero(pc.equal(pc.utf8_trim_whitespace(column), "")).to_pylist()
        if empty:
            rows = ", ".join(str(r + 1) for r in empty[:MAX_LISTED])
            problems.append(
                f"{image_sets.path}: image set(s) {rows}{_more(empty)} have an empty {key}; "
                "fill it in, or group by other keys"
            )
        variants: dict[str, list[str]] = defaultdict(list)
        for value in pc.unique(column).to_pylist():
            variants[normalise(value)].append(value)
        clashes = [sorted(v) for v in variants.values() if len(v) > 1]
        for clash in clashes[:MAX_LISTED]:
            problems.append(
                f"{image_sets.path}: {key} values {' and '.join(repr(v) for v in clash)} differ only "
                f"by {how_they_differ(clash)}, so they would be separate groups; make them consistent"
            )
        if image_sets.kind == "batch":
            bad = [v for v in pc.unique(column).to_pylist() if "," in v or "=" in v]
            if bad:
                problems.append(
                    f"{image_sets.path}: {key} value {bad[0]!r} holds ',' or '=', which CellProfiler's "
                    "-g option cannot pass; rename it, or use a LoadData CSV instead of Batch_data.h5"
                )
    return problems


def check_batch_grouping(image_sets: ImageSets, group_by: tuple[str, ...], info: dict) -> list[str]:
    if image_sets.kind != "batch":
        return []
    keys = info.get("image_sets", {}).get("grouping_keys") or []
    if sorted(keys) != sorted(group_by):
        have = ",".join(keys) or "nothing"
        return [
            f"{image_sets.path}: the batch file groups by {have}, and CellProfiler can only run its "
            f"own groups; pass --group-by {have if keys else 'none'} (or re-create it grouped by "
            f"{','.join(group_by)})"
        ]
    return []


def check_images_exist(image_sets: ImageSets) -> list[str]:
    """Every referenced local image exists. Lists each folder once instead of a stat per file.
    s3:// images are bpcp.aws.s3.check_images' business."""
    listings: dict[str, set[str] | None] = {}
    missing: list[tuple[int, str]] = []
    remote = []
    for _channel, paths in image_sets.channels.items():
        for row, path in enumerate(paths.to_pylist()):
            if path.startswith("s3://"):
                continue
            if "://" in path:
                remote.append(path)
                continue
            folder, _, name = path.rpartition("/")
            if folder not in listings:
                try:
                    listings[folder] = set(os.listdir(folder or "/"))
                except OSError:
                    listings[folder] = None
            names = listings[folder]
            if names is None or name not in names:
                missing.append((row, path))
    problems = []
    if missing:
        row, path = missing[0]
        problems.append(
            f"{image_sets.path}: image set {row + 1} refers to {path}, which does not exist"
            f"{_more(missing, 1)}; fix the paths (or mount the images) and plan again"
        )
    if remote:
        problems.append(
            f"{image_sets.path}: {remote[0]} is a remote URL{_more(remote, 1)}; this version of bpcp "
            "reads local and s3:// images only: copy them there and point the paths at them"
        )
    return problems
