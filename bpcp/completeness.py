"""Which planned jobs finished, which failed and why, which are still missing (report.json).

A job is judged from the run folder only (docs/run-folder.md), never from exit codes:

- done:       published/<job>/ holds every table of plan["tables"] and its Image table has one
              row per planned image set
- incomplete: published/<job>/ exists but a table is missing or the Image table is short
- failed:     failed/<job>/reason.txt exists (its first line is the reason)
- running:    work/<job>/ exists
- missing:    none of the above
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from bpcp.errors import BpcpError
from bpcp.runfolder import write_atomic

STATUSES = ("done", "incomplete", "failed", "running", "missing")
EXPERIMENT = "Experiment"


def load_plan(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "plan.json"
    if not path.is_file():
        raise BpcpError(f"{path} not found: run `bpcp plan` first, or pass the right run folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BpcpError(f"{path} is not valid JSON ({exc}): rerun `bpcp plan`") from exc


def delimiter(plan: dict[str, Any]) -> str:
    """ExportToSpreadsheet writes comma (.csv) or tab (.txt) delimited tables."""
    value = plan.get("delimiter", ",")
    return "\t" if value in ("\t", "tab", "Tab") else ","


def table_file(plan: dict[str, Any], table: str) -> str:
    """The file name a job publishes for a table: plan["table_files"], else prefix + name + ext."""
    files = plan.get("table_files") or {}
    if table in files:
        return files[table]
    ext = ".txt" if delimiter(plan) == "\t" else ".csv"
    return f"{plan.get('table_prefix', '')}{table}{ext}"


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


def job_status(run_dir: Path, plan: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Status of one job with the evidence behind it."""
    run_dir = Path(run_dir)
    jid = job["id"]
    published = run_dir / "published" / jid
    result: dict[str, Any] = {
        "id": jid,
        "groups": len(job.get("groups", [])),
        "image_sets": len(job.get("image_numbers", [])),
    }
    if published.is_dir():
        missing = [t for t in plan.get("tables", []) if not (published / table_file(plan, t)).is_file()]
        if missing:
            files = ", ".join(table_file(plan, t) for t in missing)
            return {**result, "status": "incomplete", "missing_tables": missing,
                    "reason": f"published without {files} (the pipeline did not export it)"}
        image = published / table_file(plan, "Image")
        if "Image" in plan.get("tables", []) and result["image_sets"]:
            rows = _csv_rows(image, delimiter(plan))
            if rows != result["image_sets"]:
                return {**result, "status": "incomplete", "missing_tables": [],
                        "reason": f"{image.name} has {rows} rows, the plan expects {result['image_sets']}"}
        return {**result, "status": "done"}
    reason = run_dir / "failed" / jid / "reason.txt"
    if reason.is_file():
        return {**result, "status": "failed", "reason": _first_line(reason) or "(empty reason.txt)"}
    if (run_dir / "work" / jid).is_dir():
        return {**result, "status": "running"}
    return {**result, "status": "missing"}


def completeness(run_dir: Path, write: bool = True) -> dict[str, Any]:
    """Judge every planned job; write <run>/report.json unless write is False."""
    run_dir = Path(run_dir)
    plan = load_plan(run_dir)
    jobs = [job_status(run_dir, plan, job) for job in plan.get("jobs", [])]
    counts: dict[str, dict[str, int]] = {}
    for unit in ("jobs", "groups", "image_sets"):
        counts[unit] = {"expected": 0, **{s: 0 for s in STATUSES}}
        for job in jobs:
            n = 1 if unit == "jobs" else job[unit]
            counts[unit]["expected"] += n
            counts[unit][job["status"]] += n
    report = {
        "format": 1,
        "run_dir": str(run_dir.resolve()),
        "complete": bool(jobs) and all(j["status"] == "done" for j in jobs),
        "tables": list(plan.get("tables", [])),
        "counts": counts,
        "jobs": jobs,
    }
    if (run_dir / "report.html").exists():      # `bpcp report` output, kept linked across merges
        report["report_html"] = "report.html"
    if write:
        write_atomic(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    return report


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
