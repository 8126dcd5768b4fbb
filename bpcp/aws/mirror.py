"""A run folder's copy on S3 (`--s3-output s3://bucket/prefix`), and resuming from it.

The local run folder stays the working copy; the S3 prefix mirrors the results, with the run
folder's own layout:

  plan.json, pipeline.<ext>, dataset.csv   before any job runs (plan.json: what the results are of)
  published/<job>/...     each job soon after it is published, by the run's one uploader
                          (bpcp.aws.uploader, beside the engine on the controller); bpcp-job.json
                          goes last, so a job whose bpcp-job.json is there is complete
  merged/..., report.json, report.html     after every merge (`bpcp run`, `bpcp merge`), with any
                          published job s3-uploaded.jsonl does not record as there (the final pass)

Resume: before rendering, `start` lists published/ once and downloads the complete jobs the local
folder lacks into published/, so a rerun (even on a fresh controller with an empty run folder)
skips them and the merge includes them; those, and local jobs whose files are there at their
sizes, are recorded in s3-uploaded.jsonl so nobody uploads them again. A prefix holding another
run's plan is refused.
All calls go through bpcp.aws.s3 and bpcp.aws.client (one client maker, one error line); nothing
here writes a credential.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bpcp import planfile
from bpcp.aws import client as aws
from bpcp.aws import s3, uploader
from bpcp.errors import BpcpError
from bpcp.jobs.prepare import same_work
from bpcp.planfile import Plan
from bpcp.runfolder import RunFolder

MARKER = uploader.MARKER
START_FILES = ("plan.json", "dataset.csv")


def _url(text: str) -> s3.S3Url:
    return s3.parse_url(text.rstrip("/"), "--s3-output", need_key=False)


def check_prefix(url_text: str, client=None) -> None:
    """The bucket exists and these credentials may list it (one request)."""
    url = _url(url_text)
    client = client or aws.client("s3")
    aws.call(lambda: client.list_objects_v2(Bucket=url.bucket, Prefix=url.prefix, MaxKeys=1), str(url),
             "s3:ListBucket")


def remote_plan(url: s3.S3Url, client=None) -> Plan | None:
    """plan.json under the prefix, or None when there is none yet."""
    from botocore.exceptions import ClientError

    client = client or aws.client("s3")
    key = url.child("plan.json")

    def get() -> bytes | None:
        try:
            return client.get_object(Bucket=key.bucket, Key=key.key)["Body"].read()
        except ClientError as exc:
            if aws.error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise

    body = aws.call(get, str(key), "s3:GetObject")
    if body is None:
        return None
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        raise BpcpError(f"{key}: not valid JSON; it is not a bpcp run's plan: choose another --s3-output") from None
    if not isinstance(doc, dict):
        raise BpcpError(f"{key}: it is not a bpcp run's plan: choose another --s3-output")
    return planfile.from_dict(doc, str(key))


def published_files(url: s3.S3Url, client=None) -> dict[str, dict[str, int]]:
    """Complete jobs under prefix/published/ (one paginated listing): job id -> its files' sizes."""
    files: dict[str, dict[str, int]] = defaultdict(dict)
    for rel, size in s3.list_objects(url.child("published"), client).items():
        job, _, name = rel.partition("/")
        if name:
            files[job][name] = size
    return {job: sizes for job, sizes in files.items() if MARKER in sizes}


def published_jobs(url: s3.S3Url, client=None) -> dict[str, list[str]]:
    """Complete jobs under prefix/published/: job id -> its files."""
    return {job: sorted(sizes) for job, sizes in published_files(url, client).items()}


def record_there(run: RunFolder, url: s3.S3Url, there: dict[str, dict[str, int]]) -> int:
    """Record as uploaded every local published job that s3-uploaded.jsonl does not name and whose
    files are all under the prefix at their sizes (an earlier run, or a copy just brought down)."""
    text = uploader.prefix_text(str(url))
    known = uploader.read_uploaded(run, text)
    record = uploader.Record(run)
    added = 0
    for job in uploader.published_names(run):
        if job in there and job not in known:
            sizes = uploader.file_sizes(run.published(job))
            if sizes == there[job]:
                record.add(uploader.Uploaded(job, text, uploader.digest(run.published(job)), len(sizes),
                                             sum(sizes.values()), time.time()))
                added += 1
    return added


def start(run: RunFolder, url_text: str, client=None) -> dict[str, list[str]]:
    """Before any job runs: refuse a prefix holding another run, put plan.json (and the inputs'
    copies) there, and bring down the jobs already published there. Returns those jobs."""
    url = _url(url_text)
    client = client or aws.client("s3")
    plan = planfile.read(run)
    old = remote_plan(url, client)
    if old is not None:
        diffs = same_work(old, plan)
        if diffs:
            hint = (" (planned into other jobs: pass the --bundle/--slots that run used)"
                    if diffs == ["the groups changed"] else "")
            raise BpcpError(f"{url}: already holds a run whose {' and '.join(d.removeprefix('the ') for d in diffs)}"
                            f"{hint}; choose another --s3-output, or empty that prefix")
    names = [n for n in START_FILES + (plan.pipeline.file,) if (run.root / n).is_file()]
    for name in names:
        if name != "plan.json" or old is None:
            s3.upload_file(run.root / name, url.child(name), client)
    there = published_files(url, client)
    wanted = {job.id for job in plan.jobs}
    missing = [j for j in sorted(there) if j in wanted and not run.published(j).is_dir()]
    pulled = pull_jobs(run, url, {j: sorted(there[j]) for j in missing}, client)
    record_there(run, url, there)
    if there:
        print(f"bpcp: {url}: {len(there)} jobs published there; brought down {pulled} the run folder lacked")
    return {job: sorted(sizes) for job, sizes in there.items()}


def seed_plan(run: RunFolder, url_text: str, client=None) -> bool:
    """An empty run folder takes the plan.json of the S3 copy, so planning keeps that run's jobs
    (its bundling) instead of planning others the prefix would refuse. True when seeded."""
    if run.plan.exists():
        return False
    old = remote_plan(_url(url_text), client)
    if old is None:
        return False
    run.root.mkdir(parents=True, exist_ok=True)
    planfile.write(run, old)
    return True


def pull_jobs(run: RunFolder, url: s3.S3Url, jobs: dict[str, list[str]], client=None) -> int:
    """Download each job's files into published/.<job>.s3 then rename it to published/<job>."""
    client = client or aws.client("s3")
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


def finish(run: RunFolder, url_text: str, client=None) -> None:
    """The final pass, after a merge: every published job s3-uploaded.jsonl does not record as there
    (or whose content changed since), then merged/, report.json and report.html. Anything that did
    not go up is one line (BpcpError) once the rest went up."""
    url = _url(url_text)
    client = client or aws.client("s3")
    local = uploader.published_names(run)
    with uploader.Uploader(run, str(url), client, say=lambda _line: None) as up:
        known = uploader.read_uploaded(run, up.text)
        late = sorted(job for job in local if up.needs_upload(job, known))
        outcome = up.upload_all(late)
    files = []
    if run.merged.is_dir():
        for path in sorted(run.merged.rglob("*")):
            rel = path.relative_to(run.merged)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                files.append((path, url.child("merged", rel.as_posix())))
    merged = len(files)
    files += [(run.root / name, url.child(name)) for name in ("report.json", "report.html") if (run.root / name).is_file()]

    def put(item: tuple[Path, s3.S3Url]) -> str:
        try:
            s3.upload_file(item[0], item[1], client)
        except BpcpError as exc:
            return exc.lines[0]
        return ""

    with ThreadPoolExecutor(8) as pool:
        problems = [line for line in pool.map(put, files) if line]
    print(f"bpcp: {url}: {len(local) - len(outcome.failed)} of {len(local)} published jobs there "
          f"({len(outcome.uploaded)} uploaded now), {merged} merged files and the report")
    lines = [uploader.failure_line(outcome.failed, up.text, run)] if outcome.failed else []
    if problems:
        more = f" (and {len(problems) - 1} more of merged/ and the report)" if len(problems) > 1 else ""
        lines.append(f"{problems[0]}{more}; fix that, then `bpcp merge --output {run.root} --s3-output {up.text}` "
                     "copies them")
    if lines:
        raise BpcpError(lines)
