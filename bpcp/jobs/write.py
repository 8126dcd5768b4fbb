"""A plan into the run folder: plan.json, the pipeline copy, and each job's input and fetch list.

`input_texts` is pure (the text of every file a job reads, by run-folder path); `write_run` puts
them in place. Every file jobs read is recorded with its sha256 in plan.json, and `check_run`
compares the files with it before any job starts, rewriting what is stale or partial, so jobs
always run what the plan says (a pipeline copy left by another plan, a 0-byte file after a full
disk). Every file is written beside its final name and renamed over it.
"""
from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import pyarrow.csv as pacsv

from bpcp import planfile
from bpcp.arrow import pa, pc
from bpcp.aws.s3 import fetch_list, fetch_lists
from bpcp.errors import BpcpError
from bpcp.inputs.dataset import PATH_PREFIXES, ImageSets, sha256_file
from bpcp.jobs.plan import Planned
from bpcp.planfile import Plan
from bpcp.runfolder import RunFolder, write_atomic


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


def _loaddata_texts(planned: Planned, table: pa.Table) -> list[str]:
    """Render all rows to CSV once, in job order, then cut the text into one piece per job.

    Tens of thousands of small pyarrow writes take minutes; one write and a split take seconds.
    Values holding a line break cannot be cut by lines, so those tables take the slow path.
    """
    options = pacsv.WriteOptions(quoting_style="needed", include_header=False)
    header = ",".join('"' + c.replace('"', '""') + '"' for c in table.column_names) + "\n"
    ordered = table.take(pa.array([r for rows in planned.rows for r in rows], pa.int64()))
    multiline = any(pc.any(pc.match_substring_regex(ordered[c], r"[\r\n]")).as_py() for c in ordered.column_names)
    if multiline:
        texts = []
        for rows in planned.rows:
            buf = io.BytesIO()
            pacsv.write_csv(table.take(pa.array(rows, pa.int64())), buf, options)
            texts.append(header + buf.getvalue().decode())
        return texts
    buf = io.BytesIO()
    pacsv.write_csv(ordered, buf, options)
    lines = buf.getvalue().decode().split("\n")     # not splitlines(): values may hold U+2028 etc.
    texts, start = [], 0
    for rows in planned.rows:
        texts.append(header + "\n".join(lines[start:start + len(rows)]) + "\n")
        start += len(rows)
    return texts


def input_texts(planned: Planned, image_sets: ImageSets) -> tuple[Plan, dict[str, str]]:
    """Each job's input (LoadData CSV or file list) and fetch list, and the plan with their sha256."""
    plan = planned.plan
    texts: dict[str, str] = {}
    if image_sets.kind == "loaddata":
        inputs = _loaddata_texts(planned, _absolute_paths(image_sets.table, image_sets.path.parent))
    elif image_sets.kind == "batch":
        inputs = [""] * len(plan.jobs)
    else:
        channels = [paths.to_pylist() for paths in image_sets.channels.values()]
        inputs = ["\n".join(dict.fromkeys(paths[r] for r in rows for paths in channels)) + "\n"
                  for rows in planned.rows]
    jobs = []
    for job, text, urls in zip(plan.jobs, inputs, fetch_lists(image_sets.channels, planned.rows)):
        changes = {}
        if job.input is not None:
            texts[job.input] = text
            changes["input_sha256"] = _sha256(text)
        if urls:
            if image_sets.kind != "loaddata":
                raise BpcpError(f"{image_sets.path}: names {urls[0]}; s3:// images work in LoadData CSVs only: "
                                "list the images in one (Image_FileName_*/Image_PathName_* columns)")
            listing = fetch_list(urls)
            changes["fetch"] = f"inputs/{job.id}.fetch"
            changes["fetch_sha256"] = _sha256(listing)
            texts[changes["fetch"]] = listing
        jobs.append(job.replace(**changes) if changes else job)
    return plan.replace(jobs=tuple(jobs)), texts


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_run(run: RunFolder, plan: Plan, texts: dict[str, str], pipeline: Path,
              dataset_copy: Path | None = None) -> None:
    """plan.json last, after the pipeline copy, the inputs and (for S3 datasets) the CSV copy."""
    for sub in ("published", "failed", "work", "inputs"):
        (run.root / sub).mkdir(parents=True, exist_ok=True)
    _copy_checked(pipeline, run.root / plan.pipeline.file, plan.pipeline.sha256)
    if dataset_copy is not None and plan.dataset.copy:
        _copy_checked(dataset_copy, run.root / plan.dataset.copy, None)
    for name, text in texts.items():
        write_atomic(run.root / name, text)
    planfile.write(run, plan)


def _copy_checked(source: Path, target: Path, sha256: str | None) -> None:
    if sha256 is not None and target.is_file() and sha256_file(target) == sha256:
        return
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        shutil.copyfile(source, tmp)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(target)) from None
    if sha256 is not None and sha256_file(tmp) != sha256:
        tmp.unlink()
        raise BpcpError(f"{source}: changed while it was being copied into the run folder; plan again")
    tmp.replace(target)


def stale_files(run: RunFolder, plan: Plan) -> list[str]:
    """Run-folder files jobs read whose content is not what plan.json recorded (missing included)."""
    wanted: list[tuple[str | None, str | None]] = [(plan.pipeline.file, plan.pipeline.sha256)]
    for job in plan.jobs:
        wanted += [(job.input, job.input_sha256), (job.fetch, job.fetch_sha256)]
    stale = []
    for name, digest in wanted:
        if name is None or digest is None:
            continue
        path = run.root / name
        try:
            if sha256_file(path) != digest:
                stale.append(name)
        except OSError:
            stale.append(name)
    return stale


def check_run(run: RunFolder, plan: Plan) -> None:
    """Refuse to start jobs whose files differ from the plan (`bpcp run` with the inputs rewrites them)."""
    stale = stale_files(run, plan)
    if stale:
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        raise BpcpError(
            f"{run.root}: {', '.join(stale[:3])}{more} differ from plan.json (changed or partly written); "
            "run `bpcp plan` (or `bpcp run`) again with the same --dataset and --pipeline to rewrite them"
        )
