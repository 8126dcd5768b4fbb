"""Which planned jobs finished, which failed and why, which are still missing (report.json).

A job is judged from the run folder only (docs/run-folder.md), never from exit codes:

- done:       published/<job>/ holds every table of plan.tables and its Image table has one
              row per planned image set
- incomplete: published/<job>/ exists but a table is missing or the Image table is short
- failed:     failed/<job>/reason.txt exists (its first line is the reason)
- running:    an attempt holds work/<job>/lock (a runner, or the CellProfiler it started)
- missing:    none of the above (its reason names damaged/<job>-<time>/ when a merge moved its
              published output there: the next `bpcp run` reruns it)

report.json also lists every job moved to damaged/ ("damaged") and, once a merge wrote it, what
merged/ holds ("merged": jobs, files with size and sha256, digest; see bpcp.results.verify).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from bpcp import planfile
from bpcp.jobs.runner import lock_is_held
from bpcp.planfile import Job, Plan
from bpcp.results.damaged import damaged_entries
from bpcp.runfolder import RunFolder, write_atomic

STATUSES = ("done", "incomplete", "failed", "running", "missing")
EXPERIMENT = "Experiment"
KEEP = "keep"       # completeness(merged=KEEP): carry report.json's "merged" over as it is


def _first_line(path: Path) -> str:
    try:
        with open(path, errors="replace") as fd:
            return fd.readline().strip()[:500]
    except OSError as exc:
        return f"cannot read {path.name}: {exc}"


def _csv_rows(path: Path, delim: str) -> int:
    """Data rows of a CSV table (quoted newlines allowed); the header is not counted."""
    with open(path, newline="") as fd:
        return max(sum(1 for _ in csv.reader(fd, delimiter=delim)) - 1, 0)


def job_status(run_dir: Path, plan: Plan, job: Job, damaged: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Status of one job with the evidence behind it; damaged: the last damaged/ entry per job."""
    run_dir = Path(run_dir)
    jid = job.id
    published = run_dir / "published" / jid
    result: dict[str, Any] = {"id": jid, "groups": len(job.groups), "image_sets": job.image_sets}
    if published.is_dir():
        missing = [t for t in plan.tables if not (published / plan.table_file(t)).is_file()]
        if missing:
            files = ", ".join(plan.table_file(t) for t in missing)
            return {**result, "status": "incomplete", "missing_tables": missing,
                    "reason": f"published without {files} (the pipeline did not export it)"}
        image = published / plan.table_file("Image")
        if "Image" in plan.tables and result["image_sets"]:
            rows = _csv_rows(image, plan.delimiter)
            if rows != result["image_sets"]:
                return {**result, "status": "incomplete", "missing_tables": [],
                        "reason": f"{image.name} has {rows} rows, the plan expects {result['image_sets']}"}
        return {**result, "status": "done"}
    reason = run_dir / "failed" / jid / "reason.txt"
    if reason.is_file():
        return {**result, "status": "failed", "reason": _first_line(reason) or "(empty reason.txt)"}
    if lock_is_held(str(run_dir / "work" / jid / "lock")):
        return {**result, "status": "running"}
    moved = (damaged or {}).get(jid)
    if moved:
        return {**result, "status": "missing", "reason": f"its published output was damaged ({moved['reason']}) and "
                                                          f"moved to {moved['folder']}/; the next `bpcp run` reruns it"}
    return {**result, "status": "missing"}


def completeness(run_dir: Path, write: bool = True, merged: dict[str, Any] | str | None = KEEP) -> dict[str, Any]:
    """Judge every planned job; write <run>/report.json unless write is False.

    merged: what merged/ holds, for report.json's "merged" (bpcp.results.verify.merged_record);
    KEEP carries over the one report.json has, which only a merge writes; None leaves it out.
    """
    run_dir = Path(run_dir)
    plan = planfile.read(RunFolder(run_dir))
    moved = damaged_entries(run_dir)
    last = {entry["job"]: entry for entry in moved}
    jobs = [job_status(run_dir, plan, job, last) for job in plan.jobs]
    counts: dict[str, dict[str, int]] = {}
    for unit in ("jobs", "groups", "image_sets"):
        counts[unit] = {"expected": 0, **dict.fromkeys(STATUSES, 0)}
        for job in jobs:
            n = 1 if unit == "jobs" else job[unit]
            counts[unit]["expected"] += n
            counts[unit][job["status"]] += n
    report = {
        "format": 1,
        "run_dir": str(run_dir.resolve()),
        "complete": bool(jobs) and all(j["status"] == "done" for j in jobs),
        "tables": list(plan.tables),
        "counts": counts,
        "jobs": jobs,
    }
    if plan.warnings:                           # what planning said (aggregation split over jobs, ...)
        report["warnings"] = list(plan.warnings)
    if moved:
        report["damaged"] = moved
    if merged == KEEP:
        merged = _recorded_merge(run_dir)
    if isinstance(merged, dict):
        report["merged"] = merged
    if (run_dir / "report.html").exists():      # `bpcp report` output, kept linked across merges
        report["report_html"] = "report.html"
    if write:
        write_atomic(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def _recorded_merge(run_dir: Path) -> dict[str, Any] | None:
    """The "merged" of the report.json there, if it has one."""
    try:
        data = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    found = data.get("merged") if isinstance(data, dict) else None
    return found if isinstance(found, dict) else None


def summary(report: dict[str, Any], max_listed: int = 10) -> str:
    """A few lines for the terminal: counts, then the jobs that are not done and why."""
    c = report["counts"]
    state = "COMPLETE" if report["complete"] else "INCOMPLETE"
    lines = [
        f"{state}: {c['jobs']['done']}/{c['jobs']['expected']} jobs done, "
        f"{c['groups']['done']}/{c['groups']['expected']} groups, "
        f"{c['image_sets']['done']}/{c['image_sets']['expected']} image sets",
    ]
    other = [s for s in STATUSES[1:] if c["jobs"][s]]
    if other:
        lines.append("  not done: " + ", ".join(
            f"{c['jobs'][s]} {s} ({c['groups'][s]} groups, {c['image_sets'][s]} image sets)" for s in other))
    pending = [j for j in report["jobs"] if j["status"] != "done"]
    for job in pending[:max_listed]:
        why = f": {job['reason']}" if job.get("reason") else ""
        lines.append(f"  {job['status']:<10} {job['id']}{why}")
    if len(pending) > max_listed:
        lines.append(f"  ... and {len(pending) - max_listed} more (see report.json)")
    return "\n".join(lines)
