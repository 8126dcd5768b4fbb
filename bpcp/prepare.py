"""From what the user gave (dataset, pipeline, options) to a planned run folder, checking first.

The only module that strings preflight, dataset, plan and runfolder together; nothing here runs
a job. Every problem found is reported at once, and nothing is written until all checks pass.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from bpcp import cellprofiler as cpmod
from bpcp import dataset as dsmod
from bpcp import preflight
from bpcp import s3
from bpcp.dataset import ImageSets, sha256_file
from bpcp.errors import BpcpError
from bpcp.plan import AUTO, Plan, PlanOptions, make_plan
from bpcp.runfolder import RunFolder, read_plan, same_groups, same_work, write_plan


@dataclass
class Prepared:
    plan: Plan
    image_sets: ImageSets
    cellprofiler: cpmod.CellProfiler
    reused: bool          # an identical plan was already in the run folder


def table_files(info: dict) -> tuple[dict[str, str], str]:
    """CellProfiler table -> file name (relative to the job's output folder), and the delimiter."""
    files: dict[str, str] = {}
    delimiter = ","
    for export in info.get("exports", []):
        sub = ""
        if export["directory"] != "Default Output Folder" and export.get("custom_path"):
            sub = export["custom_path"].strip("/") + "/"
        for table, name in export["files"].items():
            files.setdefault(table, sub + name)
        delimiter = export["delimiter"]
    return files, delimiter


def prepare(dataset, pipeline, run_dir: Path, options: PlanOptions, cellprofiler: str | None = None,
            check_images: bool = True, path_map: tuple[str, ...] = (), **kwargs) -> Prepared:
    """Local paths or s3:// URLs: a dataset or pipeline on S3 is downloaded to a temporary folder
    first (the CSV is kept in the run folder); --path-map rewrites the CSV's image paths."""
    maps = s3.parse_path_maps(path_map)
    if not (s3.is_s3(dataset) or s3.is_s3(pipeline)):
        return _prepare(dataset, pipeline, run_dir, options, cellprofiler, check_images, maps, None, **kwargs)
    with tempfile.TemporaryDirectory(prefix="bpcp-s3-") as tmp:
        remote = s3.fetch_inputs(dataset, pipeline, Path(tmp))
        try:
            return _prepare(remote.dataset, remote.pipeline, run_dir, options, cellprofiler, check_images,
                            maps, remote, **kwargs)
        except BpcpError as exc:
            raise remote.rename(exc) from None


def _prepare(dataset: Path | None, pipeline: Path, run_dir: Path, options: PlanOptions,
             cellprofiler: str | None, check_images: bool, maps: tuple,
             remote: s3.RemoteInputs | None, write: bool = True) -> Prepared:
    """Check everything, plan, and (unless write=False) write the run folder."""
    pipeline = Path(pipeline).expanduser().resolve()
    run = RunFolder(Path(run_dir).expanduser().resolve())
    problems = preflight.check_pipeline_file(pipeline) + preflight.check_output(run.root)
    if dataset is not None and not Path(dataset).expanduser().exists():
        problems.append(
            f"{dataset}: dataset not found; pass an existing LoadData CSV, file list, image folder or Batch_data.h5"
        )
    if problems:
        raise BpcpError(problems)
    cp = cpmod.locate(cellprofiler)
    kind = dsmod.detect_kind(Path(dataset or pipeline).expanduser().resolve(), pipeline)
    if kind == "loaddata":
        probe = cpmod.probe(cp, pipeline)
        image_sets = dsmod.load(dataset, pipeline, cp)
        image_sets.pipeline_info = probe
    else:
        image_sets = dsmod.load(dataset, pipeline, cp)
        probe = image_sets.pipeline_info or {}
    if maps or remote is not None:
        image_sets = s3.remap(image_sets, maps, remote.dataset_base if remote else None)
    cp = cp.with_version(probe.get("cellprofiler_version", "unknown"))
    info = probe["pipeline"]
    group_by = tuple(options.group_by)
    problems = preflight.check_pipeline(pipeline, info, image_sets.kind)
    key_problems = preflight.check_group_keys(image_sets, group_by)
    problems += key_problems
    if not key_problems:
        problems += preflight.check_batch_grouping(image_sets, group_by, probe)
        problems += preflight.check_group_values(image_sets, group_by)
    if check_images:
        problems += preflight.check_images_exist(image_sets)
        problems += s3.check_images(str(image_sets.path), image_sets.channels)
    if problems:
        raise BpcpError(problems)
    files, delimiter = table_files(info)
    plan = make_plan(
        image_sets, info, options,
        cp_version=cp.version,
        pipeline_doc={"path": str(pipeline), "file": f"pipeline{pipeline.suffix}", "sha256": sha256_file(pipeline)},
        table_files=files,
        delimiter=delimiter,
    )
    plan.doc["cellprofiler"]["executable"] = str(cp.executable)
    reused = False
    if run.plan.exists():
        old = read_plan(run)
        diffs = same_work(old, plan.doc)
        if diffs == ["the groups changed"] and options.bundle == AUTO and same_groups(old, plan.doc):
            # Automatic bundling for another number of slots: keep the jobs planned (and perhaps
            # published) before, so nothing finished is redone or lost. Their image sets are the
            # rows their image numbers name, so their inputs can be written again.
            plan = Plan({**plan.doc, "jobs": old["jobs"], "bundle": old.get("bundle", plan.doc.get("bundle"))},
                        [[n - 1 for n in job["image_numbers"]] for job in old["jobs"]])
            diffs = []
        if diffs:
            raise BpcpError(
                f"{run.root}: already holds a run whose {' and '.join(d.removeprefix('the ') for d in diffs)}; "
                "its published results would not match: choose a new --output, or delete that folder"
            )
        reused = True
    s3.annotate(plan, image_sets, remote, maps)
    if write:
        write_plan(run, plan, image_sets, pipeline)
    return Prepared(plan, image_sets, cp, reused)
