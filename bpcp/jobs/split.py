"""Failed bundled jobs, planned again one group per job, so one bad image fails only its group.

A bundle packs whole groups into one CellProfiler process to save start-ups; when it fails (a
corrupt image, a module error in one well), every group in it would stay undone. `split` replaces
such jobs with one job per group: the same image sets, the same global numbering, the job ids the
groups get with `--bundle 0`. Pure: the run folder is read by `failed_bundles` only.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from bpcp.inputs.dataset import ImageSets
from bpcp.jobs.plan import Planned, job_id, loaddata_type_problem
from bpcp.planfile import Job


def failed_bundles(run_root: Path, planned: Planned) -> set[str]:
    """Jobs of several groups that gave up (failed/<id>/reason.txt) and are not published."""
    return {job.id for job in planned.plan.jobs
            if len(job.groups) > 1 and (run_root / "failed" / job.id / "reason.txt").is_file()
            and not (run_root / "published" / job.id).is_dir()}


def split(planned: Planned, image_sets: ImageSets, ids: set[str]) -> Planned:
    """The plan with each job of `ids` replaced by one job per group, longest first as before; the
    plan as it was when LoadData would type a group's values otherwise than the whole CSV's."""
    if not ids:
        return planned
    plan = planned.plan
    keys = plan.group_by
    columns = {k: image_sets.table[k].to_pylist() for k in keys}
    jobs: list[Job] = []
    rows: list[list[int]] = []
    for job, job_rows in zip(plan.jobs, planned.rows):
        if job.id not in ids or len(job.groups) < 2:
            jobs.append(job)
            rows.append(job_rows)
            continue
        positions: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, row in enumerate(job_rows):
            positions[tuple(columns[k][row] for k in keys)].append(i)
        suffix = job.input.rsplit(".", 1)[1] if job.input else None
        for group in job.groups:
            mine = positions[tuple(group[k] for k in keys)]
            jid = job_id([group])
            jobs.append(Job(
                id=jid, groups=(group,),
                image_numbers=tuple(job.image_numbers[i] for i in mine),
                group_numbers=tuple(job.group_numbers[i] for i in mine),
                group_indexes=tuple(job.group_indexes[i] for i in mine),
                input=f"inputs/{jid}.{suffix}" if suffix else None,
            ))
            rows.append([job_rows[i] for i in mine])
    if loaddata_type_problem(image_sets, rows, [j.id for j in jobs]):
        return planned      # a group alone would be read with other types than the whole CSV: keep the bundles
    order = sorted(range(len(jobs)), key=lambda i: -len(rows[i]))
    return Planned(plan.replace(jobs=tuple(jobs[i] for i in order)), [rows[i] for i in order])
