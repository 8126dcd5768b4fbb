"""Does the run folder still hold what was written? Published jobs against their manifests,
merged/ against report.json.

- A published job is checked against its bpcp-manifest.json (written by bpcp.jobs.runner, checked
  by runner.verify): every file it lists at its size; the sha256 of its CellProfiler tables always
  (a merge reads them anyway), of every file when asked (`bpcp merge --checksums`, `bpcp verify`).
  The rows a merge reads of each table are compared with the manifest's rows in bpcp.results.merge;
  `bpcp verify` counts them itself.
- A damaged job is moved, never deleted, to damaged/ (bpcp.results.damaged), so it is rerun.
- A job published before bpcp wrote manifests cannot be checked: it is "unverified", said once.
- merged/ holds merge.json (what was merged) and report.json's "merged" records every file of
  merged/ with its size and sha256; check_merged compares them.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpcp import planfile
from bpcp.errors import BpcpError
from bpcp.jobs import runner
from bpcp.planfile import Plan
from bpcp.results.completeness import completeness
from bpcp.runfolder import RunFolder

MANIFEST = runner.MANIFEST
MERGE_RECORD = "merge.json"
# sibling folders of merged/ while a merge builds the next one or swaps it in (bpcp.results.merge)
STAGING_PREFIX = ".merged-new-"
PREVIOUS_PREFIX = ".merged-old-"


@dataclass(frozen=True)
class JobCheck:
    """One published job against its manifest. state: ok, damaged, or unverified (no manifest)."""
    job: str
    state: str
    reason: str = ""
    rows: dict[str, int] = field(default_factory=dict)


def _read_manifest(folder: Path) -> dict[str, Any]:
    data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ValueError("no files")
    for entry in data["files"].values():
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
            raise ValueError("bad entry")
    return data


def check_job(run_dir: Path, plan: Plan, job: str, checksums: bool = False, count_rows: bool = False) -> JobCheck:
    """A published job against its manifest; the reason names the first difference found."""
    folder = Path(run_dir) / "published" / job
    if not (folder / MANIFEST).exists():
        return JobCheck(job, "unverified", f"published/{job} has no {MANIFEST} (published before bpcp wrote manifests)")
    try:
        data = _read_manifest(folder)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return JobCheck(job, "damaged", f"its {MANIFEST} is unreadable ({type(exc).__name__})")
    if data.get("job") != job:
        return JobCheck(job, "damaged", f"its {MANIFEST} is that of job {data.get('job')!r}")
    files: dict[str, dict[str, Any]] = data["files"]
    found = data.get("rows")
    rows: dict[str, Any] = found if isinstance(found, dict) else {}
    tables = {t: plan.table_file(t) for t in plan.tables}
    for table, name in tables.items():
        if name not in files or not isinstance(rows.get(table), int):
            return JobCheck(job, "damaged", f"{name} is not in its {MANIFEST}")
    problem = runner.verify(str(folder), checksums=checksums)
    if not problem and not checksums:   # the tables' checksums are cheap: the merge reads them anyway
        for name in sorted(tables.values()):
            if runner.sha256_file(str(folder / name)) != files[name]["sha256"]:
                problem = f"{name} differs from its manifest (sha256)"
                break
    if not problem and count_rows:
        for table, name in sorted(tables.items()):
            found = runner.table_rows(str(folder / name), plan.delimiter)
            if found != rows[table]:
                problem = f"{name} has {found} rows, its manifest says {rows[table]}"
                break
    if problem:
        return JobCheck(job, "damaged", problem)
    return JobCheck(job, "ok", rows={t: int(rows[t]) for t in tables})


# ---------------------------------------------------------------- merged/ and report.json

def files_digest(folder: Path, checksums: bool = True) -> dict[str, dict[str, Any]]:
    """Every file under folder by relative path: size, and sha256 unless checksums is False."""
    files = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if checksums:
            entry["sha256"] = runner.sha256_file(str(path))
        files[path.relative_to(folder).as_posix()] = entry
    return files


def digest(files: dict[str, dict[str, Any]]) -> str:
    """One sha256 for a whole folder's listing (names, sizes, sha256s)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def merged_record(merged: Path, jobs: list[str]) -> dict[str, Any]:
    """report.json's "merged": the jobs merged/ holds, its files and one digest over them."""
    files = files_digest(merged)
    return {"jobs": list(jobs), "files": files, "digest": digest(files)}


def read_report(run_dir: Path) -> dict[str, Any] | None:
    """report.json as written last, or None when there is none or it cannot be read."""
    try:
        data = json.loads((Path(run_dir) / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_merged(run_dir: Path, report: dict[str, Any] | None, done: set[str] | None = None,
                 checksums: bool = False) -> str:
    """'' when merged/ is what report.json says it is (and holds every done job, when done is
    given), else one line saying what differs and how to put it right. Sizes are compared, and
    merge.json's sha256 (small); every file's sha256 with checksums."""
    run_dir = Path(run_dir)
    merged = run_dir / "merged"
    again = f"run `bpcp merge -o {run_dir}`"
    recorded = report.get("merged") if isinstance(report, dict) else None
    if not merged.is_dir():
        if any(run_dir.glob(PREVIOUS_PREFIX + "*")):
            return f"merged/ is missing: a merge was stopped while swapping it in; {again} to put it right"
        if isinstance(recorded, dict):
            return f"merged/ is missing but report.json describes a merge of {len(recorded.get('jobs', []))} jobs; {again}"
        return ""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), dict):
        return ("report.json does not say what merged/ holds (merged by an older bpcp, or the merge was stopped "
                f"before it wrote report.json); {again}")
    want: dict[str, dict[str, Any]] = recorded["files"]
    have = files_digest(merged, checksums=False)
    for name in sorted(set(want) | set(have)):
        if name not in have:
            return f"merged/ does not match report.json: {name} is missing; {again}"
        if name not in want:
            return f"merged/ does not match report.json: {name} is not in it (merged/ changed after the merge); {again}"
        if have[name]["size"] != want[name].get("size"):
            return (f"merged/ does not match report.json: {name} has {have[name]['size']} bytes, report.json says "
                    f"{want[name].get('size')}; {again}")
        if (checksums or name == MERGE_RECORD) and runner.sha256_file(str(merged / name)) != want[name].get("sha256"):
            return f"merged/ does not match report.json: {name} differs (sha256); {again}"
    jobs = set(recorded.get("jobs", []))
    if done is not None and jobs != done:
        new = sorted(done - jobs)
        gone = sorted(jobs - done)
        what = (f"{len(new)} done jobs are not merged yet (e.g. {new[0]})" if new
                else f"it holds {len(gone)} jobs that are no longer done (e.g. {gone[0]})")
        return f"merged/ is out of date: {what}; {again}"
    return ""


# ---------------------------------------------------------------- `bpcp verify`

def verify_run(run_dir: Path) -> tuple[list[str], list[str]]:
    """Every published job against its manifest (sizes, sha256, rows), merged/ against report.json
    (sha256). Returns (problems, notes): one line each; changes nothing."""
    run_dir = Path(run_dir).resolve()
    plan = planfile.read(RunFolder(run_dir))
    problems, unverified, checked = [], [], 0
    fix = f"`bpcp merge -o {run_dir}` moves it to damaged/ and the next `bpcp run` reruns it"
    for job in plan.jobs:
        if not (run_dir / "published" / job.id).is_dir():
            continue
        check = check_job(run_dir, plan, job.id, checksums=True, count_rows=True)
        if check.state == "damaged":
            problems.append(f"published/{job.id}: {check.reason}: {fix}")
        elif check.state == "unverified":
            unverified.append(job.id)
        else:
            checked += 1
    notes = [f"{checked} published jobs match their manifests"]
    if unverified:
        notes.append(f"{len(unverified)} published jobs have no {MANIFEST} (published before bpcp wrote manifests, "
                     f"e.g. {unverified[0]}): they cannot be checked; move them out of published/ to rerun them")
    report = read_report(run_dir)
    done = {j["id"] for j in completeness(run_dir, write=False)["jobs"] if j["status"] == "done"}
    problem = check_merged(run_dir, report, done, checksums=True)
    if problem:
        problems.append(problem)
    elif (run_dir / "merged").is_dir():
        notes.append(f"merged/ matches report.json ({len(report['merged']['files']) if report else 0} files, sha256)")
    return problems, notes


def run_verify(run_dir: Path) -> int:
    """`bpcp verify`: 0 when everything matches, 1 when something does not, 2 on bad input."""
    try:
        problems, notes = verify_run(run_dir)
    except BpcpError as exc:
        for line in exc.lines:
            print(f"bpcp: error: {line}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"bpcp: {note}")
    for problem in problems:
        print(f"bpcp: damaged: {problem}")
    return 1 if problems else 0
