"""A run folder's copy on S3 (`--s3-output s3://bucket/prefix`), and resuming from it.

The local run folder stays the working copy; the S3 prefix mirrors the results, with the run
folder's own layout:

  plan.json, pipeline.<ext>, dataset.csv   before any job runs (plan.json: what the results are of)
  published/<job>/...     each job as soon as it is published (on the controller, which publishes
                          in multi-host runs too); bpcp-job.json goes last, so a job whose
                          bpcp-job.json is there is complete
  merged/..., report.json, report.html     after every merge (`bpcp run`, `bpcp merge`)

Resume: before rendering, `pull` lists published/ once and downloads the complete jobs the local
folder lacks into published/, so a rerun (even on a fresh controller with an empty run folder)
skips them and the merge includes them. A prefix holding another run's plan is refused.
All calls go through bpcp.s3 (boto3's normal credential chain); nothing here writes a credential.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bpcp import s3
from bpcp.errors import BpcpError
from bpcp.runfolder import RunFolder, same_work, write_atomic

MARKER = "bpcp-job.json"
START_FILES = ("plan.json", "dataset.csv")


def _url(text: str) -> s3.S3Url:
    return s3.parse_url(text.rstrip("/"), "--s3-output", need_key=False)


def check_prefix(url_text: str, client=None) -> None:
    """The bucket exists and these credentials may list it (one request)."""
    url = _url(url_text)
    client = client or s3.client()
    s3._call(lambda: client.list_objects_v2(Bucket=url.bucket, Prefix=url.prefix, MaxKeys=1), str(url))


def remote_plan(url: s3.S3Url, client=None) -> dict | None:
    """plan.json under the prefix, or None when there is none yet."""
    from botocore.exceptions import ClientError

    client = client or s3.client()
    key = url.child("plan.json")
    try:
        body = client.get_object(Bucket=key.bucket, Key=key.key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise s3.explain(exc, str(key)) from None
    except Exception as exc:     # botocore's other errors (credentials, endpoint)
        raise s3.explain(exc, str(key)) from None
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        raise BpcpError(f"{key}: not valid JSON; it is not a bpcp run's plan: choose another --s3-output") from None


def published_jobs(url: s3.S3Url, client=None) -> dict[str, list[str]]:
    """Complete jobs under prefix/published/ (one paginated listing): job id -> its files."""
    files: dict[str, list[str]] = defaultdict(list)
    for rel in s3.list_objects(url.child("published"), client):
        job, _, name = rel.partition("/")
        if name:
            files[job].append(name)
    return {job: names for job, names in files.items() if MARKER in names}


def start(run: RunFolder, url_text: str, client=None) -> dict[str, list[str]]:
    """Before any job runs: refuse a prefix holding another run, put plan.json (and the inputs'
    copies) there, and bring down the jobs already published there. Returns those jobs."""
    url = _url(url_text)
    client = client or s3.client()
    plan = json.loads(run.plan.read_text())
    old = remote_plan(url, client)
    if old is not None:
        diffs = same_work(old, plan)
        if diffs:
            hint = (" (planned into other jobs: pass the --bundle/--slots that run used)"
                    if diffs == ["the groups changed"] else "")
            raise BpcpError(f"{url}: already holds a run whose {' and '.join(d.removeprefix('the ') for d in diffs)}"
                            f"{hint}; choose another --s3-output, or empty that prefix")
    names = [n for n in START_FILES + (plan["pipeline"]["file"],) if (run.root / n).is_file()]
    for name in names:
        if name != "plan.json" or old is None:
            s3.upload_file(run.root / name, url.child(name), client)
    there = published_jobs(url, client)
    wanted = {job["id"] for job in plan["jobs"]}
    missing = [j for j in sorted(there) if j in wanted and not run.published(j).is_dir()]
    pulled = pull_jobs(run, url, {j: there[j] for j in missing}, client)
    if there:
        print(f"bpcp: {url}: {len(there)} jobs published there; brought down {pulled} the run folder lacked")
    return there


def seed_plan(run: RunFolder, url_text: str, client=None) -> bool:
    """An empty run folder takes the plan.json of the S3 copy, so planning keeps that run's jobs
    (its bundling) instead of planning others the prefix would refuse. True when seeded."""
    if run.plan.exists():
        return False
    old = remote_plan(_url(url_text), client)
    if old is None:
        return False
    run.root.mkdir(parents=True, exist_ok=True)
    write_atomic(run.plan, json.dumps(old, indent=1))
    return True


def pull_jobs(run: RunFolder, url: s3.S3Url, jobs: dict[str, list[str]], client=None) -> int:
    """Download each job's files into published/.<job>.s3 then rename it to published/<job>."""
    client = client or s3.client()
    run.published().mkdir(parents=True, exist_ok=True)

    def one(item):
        job, names = item
        part = run.published() / f".{job}.s3"
        shutil.rmtree(part, ignore_errors=True)
        for name in names:
            s3.download(str(url.child("published", job, name)), part / name, client)
        os.replace(part, run.published(job))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, jobs.items()))
    return len(jobs)


def push_job(run: RunFolder, url_text: str, job: str, client=None) -> int:
    """published/<job>/ to prefix/published/<job>/, bpcp-job.json last."""
    return s3.upload_folder(run.published(job), _url(url_text).child("published", job), client, last=MARKER)


def finish(run: RunFolder, url_text: str, client=None) -> None:
    """After a merge: any published job not yet there, then merged/, report.json and report.html."""
    url = _url(url_text)
    client = client or s3.client()
    there = published_jobs(url, client)
    local = sorted(p.name for p in run.published().iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if run.published().is_dir() else []
    late = [job for job in local if job not in there]
    for job in late:
        push_job(run, url_text, job, client)
    merged = 0
    if run.merged.is_dir():
        for path in sorted(run.merged.rglob("*")):
            rel = path.relative_to(run.merged)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                s3.upload_file(path, url.child("merged", rel.as_posix()), client)
                merged += 1
    for name in ("report.json", "report.html"):
        if (run.root / name).is_file():
            s3.upload_file(run.root / name, url.child(name), client)
    print(f"bpcp: {url}: {len(local)} published jobs there ({len(late)} uploaded now), "
          f"{merged} merged files and the report")


def main(argv: list[str]) -> int:
    """python -m bpcp.mirror upload-job RUN_DIR JOB URL (called by jobs.sh when it publishes a job)."""
    if len(argv) != 4 or argv[0] != "upload-job":
        print("usage: python -m bpcp.mirror upload-job RUN_DIR JOB s3://bucket/prefix", file=sys.stderr)
        return 2
    _, run_dir, job, url = argv
    try:
        count = push_job(RunFolder(Path(run_dir)), url, job)
    except BpcpError as exc:
        print(f"bpcp: {job}: {exc.lines[0]}", file=sys.stderr)
        return 1
    print(f"bpcp: {job}: {count} files copied to {url.rstrip('/')}/published/{job}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
