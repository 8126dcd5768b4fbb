"""The run's one S3 uploader (bpcp.aws.uploader) against moto's real server on 127.0.0.1.

Jobs are published by the job runner's own publish() (one rename), the uploader is the real
process the engines start; what reached S3 is read back, and the requests counted from moto's log.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from test_s3 import RESULTS, Requests, fake_run, objects

from bpcp.aws import mirror, uploader
from bpcp.errors import BpcpError
from bpcp.jobs import runner
from bpcp.runfolder import RunFolder

CONFIG = {"tables": {"Image": "Image.csv", "Nuclei": "Nuclei.csv"}, "delimiter": ",", "jobs_total": 0}
FILES = ("Image.csv", "Nuclei.csv", "cellprofiler.log", "overlay/A01_s1.png")


def publish(run: RunFolder, job: str, payload: bytes = b"") -> None:
    """A job's output as the runner leaves it (tables, a saved image, bpcp-job.json, the manifest
    last), published by the runner's own rename."""
    out = run.root / "work" / job / "out"
    (out / "overlay").mkdir(parents=True)
    (out / "Image.csv").write_text(f"ImageNumber,Metadata_Job\n1,{job}\n")
    (out / "Nuclei.csv").write_text("ImageNumber,ObjectNumber\n" + "".join(f"1,{i}\n" for i in range(1, 200)))
    (out / "cellprofiler.log").write_text(f"log of {job}\n")
    (out / "overlay" / "A01_s1.png").write_bytes(b"\x89PNG" + job.encode() + payload + os.urandom(2000))
    (out / uploader.MARKER).write_text(json.dumps({"job": job, "started": 1.0, "finished": 2.0}))
    (out / uploader.MANIFEST).write_text(json.dumps(runner.manifest(CONFIG, str(out), job)))
    assert runner.publish(CONFIG, str(run.root), job, str(out))


def puts(seen: Requests) -> list[str]:
    """Keys PUT to the results bucket, in the order moto received them."""
    pattern = re.compile(r'"PUT /' + RESULTS + r'/([^? ]+) HTTP')
    return [m.group(1) for m in map(pattern.search, seen.lines()) if m]


def collect(lines: list[str]):
    def forward(stream) -> None:
        thread = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in stream), daemon=True)
        thread.start()
    return forward


def test_one_uploader_copies_every_published_job_as_it_appears(aws, tmp_path):
    client = aws.client("s3")
    client.create_bucket(Bucket=RESULTS)
    url = f"s3://{RESULTS}/runs/many"
    jobs = [f"P1_W{i:03d}-{i:08x}" for i in range(60)]
    run = RunFolder(fake_run(tmp_path / "run", jobs, []))
    seen = Requests(aws)
    lines: list[str] = []
    up = uploader.Background(run.root, url, collect(lines))
    started = time.monotonic()
    for i, job in enumerate(jobs):              # published while it watches, in three bursts
        publish(run, job)
        if i % 20 == 19:
            time.sleep(1.0)
    assert up.finish() == 0, lines
    seconds = time.monotonic() - started
    keys = puts(seen)
    prefix = "runs/many/published/"
    assert sorted(keys) == sorted(f"{prefix}{j}/{f}" for j in jobs for f in FILES + (uploader.MARKER, uploader.MANIFEST))
    for job in jobs:                             # bpcp-job.json last: its presence means the job is all there
        mine = [k for k in keys if k.startswith(f"{prefix}{job}/")]
        assert mine[-1].endswith(uploader.MARKER), mine
    assert not seen.listings(RESULTS)            # watching published/ costs no S3 listing
    there = objects(client, RESULTS, prefix)
    for job in jobs:
        for path in run.published(job).rglob("*"):
            if path.is_file():
                assert there[f"{job}/{path.relative_to(run.published(job)).as_posix()}"] == path.read_bytes()
    recorded = uploader.read_uploaded(run, url)
    assert sorted(recorded) == sorted(jobs)
    assert all(r.digest == uploader.digest(run.published(r.job)) and r.files == 6 for r in recorded.values())
    assert lines[-1].startswith(f"bpcp: {url}: 60 published jobs copied there by the uploader"), lines
    print(f"\n60 jobs published and uploaded in {seconds:.1f} s")


def test_restart_and_resume_skip_uploaded_jobs_and_upload_changed_ones(aws, tmp_path):
    client = aws.client("s3")
    client.create_bucket(Bucket=RESULTS)
    url = f"s3://{RESULTS}/runs/again"
    jobs = [f"j{i}" for i in range(8)]
    run = RunFolder(fake_run(tmp_path / "run", jobs, []))
    (run.published()).mkdir(exist_ok=True)
    for job in jobs[:5]:
        publish(run, job)
    assert uploader.Background(run.root, url).finish() == 0      # stdin closed at once: one pass
    with open(run.root / uploader.RECORD, "a") as fd:           # a line cut short by a crash
        fd.write('{"job": "j6", "url": "' + url)

    # a second run: j5-j7 are new, j2 was rerun (another manifest); only those go up
    for job in jobs[5:]:
        publish(run, job)
    os.rename(run.published("j2"), tmp_path / "j2-damaged")
    publish(run, "j2", payload=b"rerun")
    seen = Requests(aws)
    lines: list[str] = []
    assert uploader.Background(run.root, url, collect(lines)).finish() == 0
    sent = {k.split("/")[3] for k in puts(seen)}
    assert sent == {"j2", "j5", "j6", "j7"}, sent
    assert client.get_object(Bucket=RESULTS, Key="runs/again/published/j2/overlay/A01_s1.png")["Body"].read() == \
        run.published("j2").joinpath("overlay/A01_s1.png").read_bytes()
    assert "4 published jobs copied there" in lines[-1]

    # the final pass after a merge: no job goes up again, merged/ and the report do
    (run.merged).mkdir()
    (run.merged / "Image.parquet").write_bytes(b"PAR1")
    (run.root / "report.json").write_text("{}")
    seen = Requests(aws)
    mirror.finish(run, url)
    assert sorted(puts(seen)) == ["runs/again/merged/Image.parquet", "runs/again/report.json"]
    assert not seen.listings(RESULTS)

    # a fresh controller resumes from the S3 copy: the jobs brought down are recorded as there,
    # so neither its uploader nor its final pass sends them back
    fresh = RunFolder(fake_run(tmp_path / "fresh", jobs, []))
    assert sorted(mirror.start(fresh, url)) == jobs
    assert sorted(uploader.read_uploaded(fresh, url)) == jobs
    seen = Requests(aws)
    assert uploader.Background(fresh.root, url).finish() == 0
    mirror.finish(fresh, url)
    assert puts(seen) == []

    # a run folder that had its jobs uploaded before s3-uploaded.jsonl existed: the files on S3 at
    # their sizes count as uploaded, a job whose copy there differs goes up again
    (run.root / uploader.RECORD).unlink()
    client.put_object(Bucket=RESULTS, Key="runs/again/published/j3/Image.csv", Body=b"other")
    seen = Requests(aws)
    mirror.start(run, url)
    assert sorted(set(jobs) - set(uploader.read_uploaded(run, url))) == ["j3"]
    assert uploader.Background(run.root, url).finish() == 0
    assert {k.split("/")[3] for k in puts(seen) if "/published/" in k} == {"j3"}


def test_an_upload_failure_is_one_line_and_fails_the_final_pass(aws, tmp_path):
    jobs = ["j1", "j2", "j3", "j4"]
    run = RunFolder(fake_run(tmp_path / "run", jobs, []))
    url = "s3://no-such-results-bucket/runs/x"
    lines: list[str] = []
    up = uploader.Background(run.root, url, collect(lines))
    for job in jobs:
        publish(run, job)
    assert up.finish() == 1
    says = "bucket no-such-results-bucket does not exist; check the bucket name"
    failed = [line for line in lines if "not copied" in line]
    assert len(failed) == 4 and all(says in line for line in failed), lines
    assert "0 published jobs copied there by the uploader, 4 not" in lines[-1], lines
    assert not (run.root / uploader.RECORD).exists()
    with pytest.raises(BpcpError) as err:
        mirror.finish(run, url)
    assert err.value.lines[0].startswith(f"4 published jobs were not copied to {url} (j1, j2, j3 and 1 more): "
                                         f"{url}/published/j1/"), err.value.lines
    assert says in err.value.lines[0] and f"bpcp merge --output {run.root} --s3-output {url}" in err.value.lines[0]


def test_bpcp_merge_fails_naming_the_jobs_not_uploaded(aws, tmp_path, capsys):
    """The CLI's final pass: exit 1 and the one line, after the merge and the results line."""
    from bpcp.cli import main

    client = aws.client("s3")
    client.create_bucket(Bucket=RESULTS)
    run = RunFolder(fake_run(tmp_path / "run", ["j1"], []))
    publish(run, "j1")
    url = f"s3://{RESULTS}/runs/cli"
    code = main(["merge", "-o", str(run.root), "--s3-output", url])
    capsys.readouterr()
    assert uploader.read_uploaded(run, url).keys() == {"j1"}, code
    client.delete_object(Bucket=RESULTS, Key="runs/cli/published/j1/Image.csv")
    Path(run.published("j1") / "cellprofiler.log").write_text("changed\n")     # its content changed: it goes again
    manifest = json.loads((run.published("j1") / uploader.MANIFEST).read_text())
    manifest["files"]["cellprofiler.log"]["size"] = 8
    (run.published("j1") / uploader.MANIFEST).write_text(json.dumps(manifest))
    for key in [o["Key"] for o in client.list_objects_v2(Bucket=RESULTS)["Contents"]]:
        client.delete_object(Bucket=RESULTS, Key=key)
    client.delete_bucket(Bucket=RESULTS)
    code = main(["merge", "-o", str(run.root), "--s3-output", url])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bpcp: error:")]
    assert code == 1
    assert len(err) == 2, err         # the job, and merged/ with the report
    assert err[0].startswith(f"bpcp: error: 1 published jobs were not copied to {url} (j1): ") and \
        "does not exist" in err[0], err


def gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status        # exited; its new parent has not reaped it yet


def test_the_uploader_ends_by_itself_when_the_run_is_killed(aws, tmp_path):
    """SIGKILL of the process that started it (bpcp run): its stdin closes, it uploads what is
    published and exits instead of lingering."""
    import signal
    import subprocess
    import sys

    client = aws.client("s3")
    client.create_bucket(Bucket=RESULTS)
    url = f"s3://{RESULTS}/runs/killed"
    run = RunFolder(fake_run(tmp_path / "run", ["j1", "j2"], []))
    publish(run, "j1")
    parent = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from bpcp.aws.uploader import Background\n"
                               "up = Background(Path(sys.argv[1]), sys.argv[2])\n"
                               "print(up.proc.pid, flush=True)\ntime.sleep(600)\n", str(run.root), url],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while not (run.root / uploader.RECORD).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    publish(run, "j2")
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gone(pid), "the uploader outlived the run that started it"
    assert sorted(uploader.read_uploaded(run, url)) == ["j1", "j2"]


def test_stop_finishes_the_jobs_under_way_and_records_only_whole_ones(aws, tmp_path):
    """SIGTERM (what bpcp run sends on Ctrl-C): queued jobs wait for the next run, every job
    recorded is all there (bpcp-job.json included), and the next uploader copies the rest."""
    client = aws.client("s3")
    client.create_bucket(Bucket=RESULTS)
    url = f"s3://{RESULTS}/runs/stopped"
    jobs = [f"j{i:03d}" for i in range(120)]
    run = RunFolder(fake_run(tmp_path / "run", jobs, []))
    for job in jobs:
        publish(run, job)
    up = uploader.Background(run.root, url)
    deadline = time.monotonic() + 60
    while not (run.root / uploader.RECORD).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert up.stop() == 0
    first = uploader.read_uploaded(run, url)
    there = objects(client, RESULTS, "runs/stopped/published/")
    assert 0 < len(first) < len(jobs), len(first)
    assert all(f"{job}/{uploader.MARKER}" in there for job in first)
    assert uploader.Background(run.root, url).finish() == 0
    assert sorted(uploader.read_uploaded(run, url)) == jobs


def test_no_credentials_for_the_output_prefix_stop_bpcp_run_before_planning(aws, example_plate, tmp_path, capsys,
                                                                           monkeypatch):
    from bpcp.cli import main

    aws.client("s3").create_bucket(Bucket=RESULTS)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    out = tmp_path / "run"
    code = main(["run", "-d", str(example_plate / "load_data.csv"), "-p", str(example_plate / "example_loaddata.cppipe"),
                 "-o", str(out), "--s3-output", f"s3://{RESULTS}/batch1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"bpcp: error: s3://{RESULTS}/batch1: no AWS credentials "
                                                             "found"), err
    assert not out.exists()


def test_lines_from_many_upload_threads_stay_whole():
    """The uploader's 16 threads each say their failures; every line reaches the pipe whole
    (print() wrote a line and its end apart: 274 of 3,200 lines held two messages)."""
    import subprocess
    import sys

    code = ("import threading\nfrom bpcp.aws import uploader\n"
            "say = uploader.Uploader.say\n"
            "class U: _say = staticmethod(uploader._to_stderr); _said = threading.Lock()\n"
            "u = U()\n"
            "def f(i):\n    for k in range(200):\n        say(u, f'bpcp: j{i}-{k}: not copied to s3://b/p: a reason')\n"
            "ts = [threading.Thread(target=f, args=(i,)) for i in range(16)]\n"
            "[t.start() for t in ts]\n[t.join() for t in ts]\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stderr
    lines = out.splitlines()
    assert len(lines) == 3200 and all(line.count("not copied") == 1 for line in lines), out[-500:]
