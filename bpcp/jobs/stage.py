"""Per-job input folders for remote workers: stage/<job>/ holds symlinks to exactly the job's
images (under root/, mirroring their absolute paths so folder-name metadata still matches), the
pipeline, and the job's LoadData CSV or file list rewritten to paths relative to the job's folder.
GNU parallel copies stage/<job>/ to the worker with symlinks followed (--transferfile). Images on
S3 are not staged: fetch.txt (the job's fetch list) travels instead, and the worker downloads them."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pyarrow.csv as pacsv

from bpcp.arrow import pa, pc
from bpcp.errors import BpcpError
from bpcp.inputs.dataset import FILE_PREFIXES, PATH_PREFIXES
from bpcp.jobs import runner
from bpcp.planfile import Job, Plan
from bpcp.runfolder import RunFolder


def _link(target: str, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if os.readlink(link) == target:
            return
        link.unlink()
    os.symlink(target, link)


def _stage_loaddata(run: RunFolder, job: Job, folder: Path) -> None:
    table = pacsv.read_csv(run.root / job.input, convert_options=pacsv.ConvertOptions(
        column_types={n: pa.string() for n in _header(run.root / job.input)},
        strings_can_be_null=False, quoted_strings_can_be_null=False))
    rel_root = f"stage/{job.id}/root"
    for i, name in enumerate(table.column_names):
        if not name.startswith(PATH_PREFIXES):
            continue
        channel = name.split("PathName_", 1)[1]
        file_col = next((p + channel for p in FILE_PREFIXES if p + channel in table.column_names), None)
        if file_col is None:
            continue
        for path, fname in zip(table[name].to_pylist(), table[file_col].to_pylist()):
            if not path.startswith("s3://"):      # S3 objects: the worker downloads them (fetch.txt)
                _link(f"{path}/{fname}", folder / "root" / path.lstrip("/") / fname)
        staged = pc.binary_join_element_wise(rel_root, pc.utf8_ltrim(table[name], "/"), "/")
        table = table.set_column(i, name, pc.if_else(pc.starts_with(table[name], "s3://"), table[name], staged))
    tmp = folder / "input.csv.tmp"
    pacsv.write_csv(table, tmp, pacsv.WriteOptions(quoting_style="needed"))
    os.replace(tmp, folder / "input.csv")


def _header(path: Path) -> list[str]:
    with open(path, newline="") as fd:
        return next(csv.reader(fd))


def _stage_filelist(run: RunFolder, job: Job, folder: Path) -> None:
    lines = []
    for path in (run.root / job.input).read_text().splitlines():
        if not path:
            continue
        _link(path, folder / "root" / path.lstrip("/"))
        lines.append(f"stage/{job.id}/root/{path.lstrip('/')}")
    (folder / "input.txt").write_text("\n".join(lines) + "\n")


def write_stage(run: RunFolder, plan: Plan) -> None:
    """stage/<job>/ for every job, with the runner and its settings. Idempotent; cheap (symlinks only)."""
    if plan.dataset.kind == "batch":
        raise BpcpError(
            "a Batch_data.h5 holds absolute image paths, so bpcp cannot stage its images for other "
            "hosts; run it on one host, or give the LoadData CSV or image folder instead"
        )
    shared = [plan.pipeline.file, runner.RUNNER, runner.CONFIG]
    for job in plan.jobs:
        folder = run.root / "stage" / job.id
        folder.mkdir(parents=True, exist_ok=True)
        for name in shared:
            _link(str(run.root / name), folder / name)
        if job.fetch:
            _link(str(run.root / job.fetch), folder / "fetch.txt")
        if plan.dataset.kind == "loaddata":
            _stage_loaddata(run, job, folder)
        else:
            _stage_filelist(run, job, folder)
