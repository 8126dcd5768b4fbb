"""From what the user gave (dataset, pipeline, options) to a planned run folder, checking first.

The only module that strings preflight, dataset, plan and runfolder together; nothing here runs
a job. Every problem found is reported at once, and nothing is written until all checks pass.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bpcp import planfile
from bpcp.aws import s3
from bpcp.errors import BpcpError
from bpcp.inputs import cellprofiler as cpmod
from bpcp.inputs import dataset as dsmod
from bpcp.inputs import preflight
from bpcp.inputs.dataset import ImageSets, sha256_file
from bpcp.jobs.plan import Planned, PlanOptions, job_keys, make_plan
from bpcp.jobs.split import failed_bundles, split
from bpcp.jobs.write import input_texts, write_run
from bpcp.planfile import CellProfilerInfo, Pipeline, Plan
from bpcp.runfolder import RunFolder


@dataclass
class Prepared:
    plan: Plan
    image_sets: ImageSets
    cellprofiler: cpmod.CellProfiler
    reused: bool          # an identical plan was already in the run folder


def same_work(old: Plan, new: Plan) -> list[str]:
    """What differs between two plans in ways that would make published results stale."""
    diffs = []
    if old.dataset.sha256 != new.dataset.sha256:
        diffs.append("the dataset changed")
    if old.pipeline.sha256 != new.pipeline.sha256:
        diffs.append("the pipeline changed")
    if old.cellprofiler.version != new.cellprofiler.version:
        diffs.append("the CellProfiler version changed")
    if [j.id for j in old.jobs] != [j.id for j in new.jobs]:
        diffs.append("the groups changed")
    return diffs


def same_groups(old: Plan, new: Plan) -> bool:
    """Both plans run the same groups (however they are bundled into jobs)."""
    def groups(plan: Plan) -> list[str]:
        return sorted(json.dumps(g, sort_keys=True) for job in plan.jobs for g in job.groups)
    return old.group_by == new.group_by and groups(old) == groups(new)


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
    cp, saved_note = cpmod.choose(cellprofiler, pipeline)
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
    problems = preflight.check_pipeline(pipeline, info, image_sets.kind)
    grouping_problems = preflight.check_pipeline_grouping(image_sets, info)
    problems += grouping_problems
    if not problems and image_sets.kind == "loaddata" and info.get("grouping_module") == "LoadData":
        # a grouping LoadData renumbers the image sets: ask CellProfiler how, over the whole CSV
        image_sets = dsmod.number_loaddata(image_sets, pipeline, cp)
        probe = image_sets.pipeline_info or probe
        info = probe["pipeline"]
    group_by = job_keys(options.group_by, info)
    if grouping_problems and options.group_by is None:
        key_problems = grouping_problems      # the default keys are the pipeline's: said once
    else:
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
    planned = make_plan(
        image_sets, info, options,
        cellprofiler=CellProfilerInfo(version=cp.version, executable=str(cp.executable)),
        pipeline_file=Pipeline(path=str(pipeline), file=f"pipeline{pipeline.suffix}", sha256=sha256_file(pipeline)),
        table_files=files,
        delimiter=delimiter,
    )
    reused = False
    if run.plan.exists():
        old = planfile.read(run)
        diffs = same_work(old, planned.plan)
        if diffs == ["the groups changed"] and same_groups(old, planned.plan):
            # The same groups bundled otherwise (another number of slots, another --bundle, failed
            # bundles split): keep the jobs planned (and perhaps published) before, so nothing
            # finished is redone or lost. Their image sets are the rows their image numbers name,
            # so their inputs can be written again.
            row_of = {n: r for job, rows in zip(planned.plan.jobs, planned.rows)
                      for n, r in zip(job.image_numbers, rows)}
            planned = Planned(planned.plan.replace(jobs=old.jobs, bundle=old.bundle),
                              [[row_of[n] for n in job.image_numbers] for job in old.jobs])
            diffs = []
        if diffs:
            raise BpcpError(
                f"{run.root}: already holds a run whose {' and '.join(d.removeprefix('the ') for d in diffs)}; "
                "its published results would not match: choose a new --output, or delete that folder"
            )
        reused = True
        failed = failed_bundles(run.root, planned)
        if failed and write:
            again = split(planned, image_sets, failed)
            if again is planned:
                print(f"bpcp: {len(failed)} bundled jobs failed; not planned one group per job, since LoadData "
                      "would read a group alone with other column types than the whole CSV")
            else:
                print(f"bpcp: {len(failed)} bundled jobs failed: planned again one group per job, so only the "
                      "groups that fail stay undone")
            planned = again
    plan, texts = input_texts(planned, image_sets)
    plan = s3.origin(plan, remote, maps)
    if saved_note:
        plan = plan.replace(warnings=(*plan.warnings, saved_note))
    if write:
        write_run(run, plan, texts, pipeline, image_sets.path if plan.dataset.copy else None)
    return Prepared(plan, image_sets, cp, reused)
