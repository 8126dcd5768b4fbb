"""Published jobs per second to `--s3-output`: the old per-job process vs the run's one uploader.

    .venv/bin/python benchmarks/s3_publish.py [--old-jobs 30] [--new-jobs 300] [--scale 1.0]

Both against one local moto server (tests/aws_endpoint.py, the tests' S3), in one invocation, on
the same kind of job folder: the tables of a per-site job (Image, Nuclei, Cells, Cytoplasm,
Experiment), its log, bpcp-job.json and bpcp-manifest.json (--scale multiplies the sizes).

- old: what bpcp did until now for each published job, one after the other (as the controller's
  collector published them): a fresh `python` importing bpcp.aws.mirror and uploading the job's
  folder with 8 threads (the command was `python -m bpcp.aws.mirror upload-job RUN JOB URL`).
- new: `python -m bpcp.aws.uploader RUN URL` (what `bpcp run` starts beside the engine) given all
  the jobs at once, timed from its start to its exit (imports and client included).

Prints jobs/s of each, the ratio, and the load average before and after. moto itself is a Python
server on the same machine, so both numbers are bounded by it: real S3 answers faster.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bpcp.aws import uploader  # noqa: E402
from bpcp.jobs import runner  # noqa: E402
from bpcp.runfolder import RunFolder  # noqa: E402

import aws_endpoint  # noqa: E402

BUCKET = "bpcp-bench"
# name -> bytes at --scale 1: about what one Cell Painting site's job writes at a modest feature count
FILES = {"Image.csv": 24_000, "Nuclei.csv": 120_000, "Cells.csv": 160_000, "Cytoplasm.csv": 150_000,
         "Experiment.csv": 3_000, "cellprofiler.log": 6_000}
CONFIG = {"tables": {"Image": "Image.csv"}, "delimiter": ",", "jobs_total": 0}

# The old per-job command, as `python -m bpcp.aws.mirror upload-job` ran it (same imports, a client
# of its own, the folder with 8 threads, bpcp-job.json last).
OLD = """
import sys
from pathlib import Path
import bpcp.aws.mirror
from bpcp.aws import s3
folder, url = Path(sys.argv[1]), s3.parse_url(sys.argv[2], need_key=False)
s3.upload_folder(folder, url, None, last="bpcp-job.json")
"""


def make_jobs(run: RunFolder, jobs: list[str], scale: float) -> int:
    """Published job folders with real manifests; returns the bytes of one job."""
    for job in jobs:
        folder = run.published(job)
        folder.mkdir(parents=True)
        for name, size in FILES.items():
            n = max(16, int(size * scale))
            line = (f"1,{job}," + "0.123456789," * 12 + "\n").encode()
            (folder / name).write_bytes((b"ImageNumber,Job," + b"F," * 12 + b"\n" + line * (n // len(line) + 1))[:n])
        (folder / uploader.MARKER).write_text(json.dumps({"job": job, "started": 1.0, "finished": 2.0}))
        (folder / uploader.MANIFEST).write_text(json.dumps(runner.manifest(CONFIG, str(folder), job)))
    return sum(p.stat().st_size for p in run.published(jobs[0]).iterdir())


def old_way(run: RunFolder, jobs: list[str], url: str, env: dict[str, str]) -> float:
    started = time.monotonic()
    for job in jobs:
        subprocess.run([sys.executable, "-c", OLD, str(run.published(job)), f"{url}/published/{job}"],
                       env=env, check=True)
    return time.monotonic() - started


def new_way(run: RunFolder, url: str, env: dict[str, str]) -> float:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bpcp.aws.uploader", str(run.root), url], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"the uploader failed: {proc.stdout}{proc.stderr}")
    return seconds


def count_objects(endpoint: aws_endpoint.AwsEndpoint, prefix: str) -> int:
    client = endpoint.client("s3")
    return sum(page.get("KeyCount", 0) for page in
               client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-jobs", type=int, default=30)
    parser.add_argument("--new-jobs", type=int, default=300)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every file's size")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bpcp-s3-bench-"))
    endpoint = aws_endpoint.start(work / "moto.log")
    try:
        env = {**os.environ, **endpoint.env, "PYTHONPATH": str(REPO)}
        endpoint.client("s3").create_bucket(Bucket=BUCKET)
        old_run, new_run = RunFolder(work / "old"), RunFolder(work / "new")
        old_jobs = [f"P1_{i:05d}-{i:08x}" for i in range(args.old_jobs)]
        new_jobs = [f"P1_{i:05d}-{i:08x}" for i in range(args.new_jobs)]
        size = make_jobs(old_run, old_jobs, args.scale)
        make_jobs(new_run, new_jobs, args.scale)
        per_job = len(FILES) + 2
        print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
        print(f"each job: {per_job} files, {size / 1e3:.0f} kB; moto on {endpoint.url}; {os.cpu_count()} cores")
        old_s = old_way(old_run, old_jobs, f"s3://{BUCKET}/old", env)
        new_s = new_way(new_run, f"s3://{BUCKET}/new", env)
        for name, jobs in (("old", old_jobs), ("new", new_jobs)):
            got = count_objects(endpoint, f"{name}/published/")
            if got != len(jobs) * per_job:
                raise SystemExit(f"{name}: {got} objects on S3, expected {len(jobs) * per_job}")
        old_rate, new_rate = len(old_jobs) / old_s, len(new_jobs) / new_s
        print("| way | jobs | seconds | jobs/s |")
        print("| --- | ---: | ---: | ---: |")
        print(f"| old: one process per job, one after the other | {len(old_jobs)} | {old_s:.1f} | {old_rate:.2f} |")
        print(f"| new: one uploader, {uploader.THREADS} jobs at a time | {len(new_jobs)} | {new_s:.1f} | {new_rate:.2f} |")
        print(f"ratio new/old: {new_rate / old_rate:.1f}x")
        print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
    finally:
        aws_endpoint.stop(endpoint)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
