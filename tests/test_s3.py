"""Data on S3 (issue 5, part B): s3:// datasets and images, --path-map, per-job fetch lists, an S3
copy of the results (--s3-output) and resuming from it.

Every AWS call goes to moto's server on 127.0.0.1 (fixtures aws_endpoint / aws); runs use real
CellProfiler and GNU parallel. Requests are counted from moto's own request log.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from bpcp import planfile
from bpcp.aws import s3
from bpcp.aws.client import explain
from bpcp.errors import BpcpError
from bpcp.jobs import runner

from plans import make_plan

ROOT = Path(__file__).resolve().parents[1]
BPCP = [sys.executable, "-m", "bpcp.cli"]
DATA, RESULTS = "bpcp-data", "bpcp-results"
TABLES = ("Image", "Nuclei", "PH3", "Cells", "Cytoplasm")


# ---------------------------------------------------------------- pure parts

def test_parse_url():
    assert s3.parse_url("s3://my-bucket/a/b.csv") == s3.S3Url("my-bucket", "a/b.csv")
    assert str(s3.parse_url("s3://my.bucket/x")) == "s3://my.bucket/x"
    assert s3.parse_url("s3://bkt", need_key=False).prefix == ""
    assert s3.parse_url("s3://bkt/runs/1/", need_key=False).prefix == "runs/1/"
    assert s3.parse_url("s3://bkt/runs", need_key=False).child("published", "j1") == s3.S3Url("bkt", "runs/published/j1")
    assert s3.parse_url("s3://bkt", need_key=False).child("plan.json") == s3.S3Url("bkt", "plan.json")
    for bad, says in [("http://bkt/x", "not an S3 URL"), ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
                      ("s3://bkt/", "no object key"), ("s3://ab/x", "not a valid S3 bucket name"),
                      ("s3://bkt/a\nb", "control character")]:
        with pytest.raises(BpcpError) as err:
            s3.parse_url(bad)
        assert len(err.value.lines) == 1 and says in err.value.lines[0], err.value.lines


def test_path_maps_longest_prefix_first_and_whole_folder_names_only():
    maps = s3.parse_path_maps(["/home/ubuntu/bucket=s3://bkt", "/home/ubuntu/bucket/plates/=s3://other/p/",
                               "s3://old-bkt/x=s3://new-bkt/y"])
    assert [m.source for m in maps] == ["/home/ubuntu/bucket/plates", "/home/ubuntu/bucket", "s3://old-bkt/x"]
    assert s3.map_path("/home/ubuntu/bucket/plates/P1", maps) == "s3://other/p/P1"
    assert s3.map_path("/home/ubuntu/bucket/img", maps) == "s3://bkt/img"
    assert s3.map_path("/home/ubuntu/bucket", maps) == "s3://bkt"
    assert s3.map_path("/home/ubuntu/bucket2/img", maps) == "/home/ubuntu/bucket2/img"     # not a folder above
    assert s3.map_path("s3://old-bkt/x/y.png", maps) == "s3://new-bkt/y/y.png"
    for bad in ["nothing", "=s3://b", "relative/path=s3://bkt", "/a=s3://B", "/a=s3://bkt//x"]:
        with pytest.raises(BpcpError) as err:
            s3.parse_path_maps([bad])
        assert err.value.lines[0].startswith("--path-map"), err.value.lines


def test_remap_loaddata_resolves_relative_paths_then_maps():
    table = pa.table({
        "Metadata_Plate": ["P1", "P1"],
        "Image_FileName_DNA": ["a.png", "b.png"],
        "Image_PathName_DNA": ["images", "/mnt/bucket/images"],
        "Image_URL_X": ["file:///mnt/bucket/x%20y.png", "s3://keep/x.png"],
    })
    maps = s3.parse_path_maps(["/mnt/bucket=s3://bkt/data"])
    out = s3.remap_loaddata(table, "s3://bkt/data/csvs", maps)
    assert out["Image_PathName_DNA"].to_pylist() == ["s3://bkt/data/csvs/images", "s3://bkt/data/images"]
    assert out["Image_URL_X"].to_pylist() == ["s3://bkt/data/x y.png", "s3://keep/x.png"]
    assert out["Metadata_Plate"].to_pylist() == ["P1", "P1"]
    # local base, no maps: only relative paths change
    out = s3.remap_loaddata(table, "/data/csvs", ())
    assert out["Image_PathName_DNA"].to_pylist() == ["/data/csvs/images", "/mnt/bucket/images"]


def test_fetch_lists_hold_exactly_each_jobs_s3_objects_once():
    channels = {
        "DNA": pa.array(["s3://b1/i/a1.png", "s3://b1/i/a2.png", "s3://b1/i/a3.png", "/local/a4.png"]),
        "PH3": pa.array(["s3://b1/i/p1.png", "s3://b1/i/p1.png", "s3://b2/p3.png", "/local/p4.png"]),
    }
    lists = s3.fetch_lists(channels, [[0, 1], [2], [3]])
    assert lists == [["s3://b1/i/a1.png", "s3://b1/i/p1.png", "s3://b1/i/a2.png"],
                     ["s3://b1/i/a3.png", "s3://b2/p3.png"], []]
    assert s3.fetch_list(lists[1]) == "s3://b1/i/a3.png\ns3://b2/p3.png\n"
    assert s3.fetch_lists({"DNA": pa.array(["/x/a.png"])}, [[0]]) == [[]]
    assert s3.fetch_problems("d.csv", [(0, "s3://b1/i/a.png")]) == []
    for bad in ["s3://b1/../etc/passwd", "s3://b1/a//b.png", "s3://b1/./a.png"]:
        assert "cannot be copied to a local folder" in s3.fetch_problems("d.csv", [(4, bad)])[0]


def test_origin_records_sources_and_fetch_lists_and_refuses_s3_outside_loaddata():
    from bpcp.inputs.dataset import ImageSets
    from bpcp.jobs.plan import Planned
    from bpcp.jobs.write import input_texts

    channels = {"DNA": pa.array(["s3://bk1/i/a.png", "/local/b.png"])}
    table = pa.table({"Metadata_Well": ["A01", "A02"]})
    planned = Planned(make_plan(jobs=[("j1", 1), ("j2", 1)]), [[0], [1]])
    plan, texts = input_texts(planned, ImageSets("loaddata", Path("/tmp/x/dataset.csv"), table, channels, "c"))
    remote = s3.RemoteInputs(Path("/tmp/x/dataset.csv"), Path("/tmp/x/p.cppipe"), "s3://bk1/d/load_data.csv",
                             "s3://bk1/p.cppipe")
    plan = s3.origin(plan, remote, s3.parse_path_maps(["/mnt/bk1=s3://bk1"]))
    assert (plan.dataset.path, plan.dataset.copy, plan.dataset.path_map) == (
        "s3://bk1/d/load_data.csv", "dataset.csv", ("/mnt/bk1=s3://bk1",))
    assert plan.pipeline.path == "s3://bk1/p.cppipe"
    assert [(j.fetch, bool(j.fetch_sha256)) for j in plan.jobs] == [("inputs/j1.fetch", True), (None, False)]
    assert texts["inputs/j1.fetch"] == "s3://bk1/i/a.png\n"
    assert remote.dataset_base == "s3://bk1/d"
    renamed = remote.rename(BpcpError("/tmp/x/dataset.csv: group key Metadata_Row not found"))
    assert renamed.lines == ["s3://bk1/d/load_data.csv: group key Metadata_Row not found"]
    with pytest.raises(BpcpError, match="s3:// images work in LoadData CSVs only"):
        input_texts(planned, ImageSets("filelist", Path("/x/files.txt"), table, channels, "c"))


def _plan(fetch: bool = True):
    plan = make_plan(jobs=[("j1", 1)])
    return plan.replace(jobs=tuple(j.replace(fetch="inputs/j1.fetch" if fetch else None) for j in plan.jobs))


def test_job_script_downloads_only_for_plans_with_fetch_lists(tmp_path):
    from bpcp.inputs.cellprofiler import CellProfiler
    from bpcp.jobs.render import RunSettings, render_script, runner_config

    cp = CellProfiler(Path("/opt/cellprofiler/5.0/bin/cellprofiler"), Path("/opt/cellprofiler/5.0/bin/python"))
    plain = render_script(_plan(fetch=False), tmp_path, RunSettings(), multihost=True)
    assert "AWS_ENDPOINT_URL" not in plain
    multi = render_script(_plan(), tmp_path, RunSettings(), multihost=True)
    assert "for name in AWS_ENDPOINT_URL AWS_REGION AWS_DEFAULT_REGION" in multi   # where S3 is, to the workers
    config = runner_config(_plan(), tmp_path, RunSettings(s3_output="s3://bkt/runs/1/"), cp, False)
    assert config["s3_python"] == "/opt/awscli/bin/python3"
    assert "s3_output" not in config     # the runner uploads nothing: the controller's uploader does
    for text in (plain, multi, json.dumps(config)):
        assert "AWS_SECRET" not in text and "AWS_ACCESS_KEY" not in text and "AWS_SESSION" not in text
    with pytest.raises(BpcpError, match="--s3-output"):
        RunSettings(s3_output="s3:/bkt").validate()
    with pytest.raises(BpcpError, match="--s3-python"):
        RunSettings(s3_python="python3").validate()


# ---------------------------------------------------------------- moto-only

class Requests:
    """HTTP requests moto saw from now on (read from its request log up to a marker request, so
    none answered before the read is missed; aws_endpoint.AwsEndpoint.requests_since)."""

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.start = endpoint.log_size()

    def lines(self) -> list[str]:
        return self.endpoint.requests_since(self.start)

    def gets(self, bucket: str) -> list[str]:
        """Keys of objects downloaded (GET without a query string) from bucket."""
        pattern = re.compile(r'"GET /' + re.escape(bucket) + r'/([^? ]+) HTTP')
        return [m.group(1) for m in map(pattern.search, self.lines()) if m]

    def listings(self, bucket: str) -> list[str]:
        return [line for line in self.lines() if re.search(r'"GET /' + re.escape(bucket) + r'/?\?list-type=2', line)]


def upload_plate(client, plate: Path, csv_key: str = "plate/load_data.csv", mangle=None) -> str:
    """The example plate's images under s3://bpcp-data/plate/images/, and its CSV with s3:// PathNames."""
    client.create_bucket(Bucket=DATA)
    for image in sorted((plate / "images").iterdir()):
        client.upload_file(str(image), DATA, f"plate/images/{image.name}")
    text = (plate / "load_data.csv").read_text().replace(str(plate / "images"), f"s3://{DATA}/plate/images")
    if mangle:
        text = mangle(text)
    client.put_object(Bucket=DATA, Key=csv_key, Body=text.encode())
    return f"s3://{DATA}/{csv_key}"


def test_image_check_lists_each_folder_once_not_each_image(aws, example_plate):
    client = aws.client("s3")
    upload_plate(client, example_plate)
    for i in range(50):        # other objects in the folder, outside the key range the dataset names
        client.put_object(Bucket=DATA, Key=f"plate/images/zz{i:03}.png", Body=b"x")
    names = sorted(p.name for p in (example_plate / "images").iterdir())
    urls = [f"s3://{DATA}/plate/images/{n}" for n in names]
    seen = Requests(aws)
    assert s3.check_images("d.csv", {"DNA": pa.array(urls[:24]), "PH3": pa.array(urls[24:])}) == []
    assert len(seen.listings(DATA)) == 1 and seen.gets(DATA) == []
    missing = urls[:22] + [f"s3://{DATA}/plate/images/nope1.png", f"s3://{DATA}/plate/images/nope2.png"]
    problems = s3.check_images("d.csv", {"DNA": pa.array(missing), "PH3": pa.array(urls[24:])})
    assert problems == [f"d.csv: image set 23 refers to s3://{DATA}/plate/images/nope1.png, which does not exist "
                        "(and 1 more of 48 images); fix the paths (or --path-map), or upload the images, and plan again"]


def test_s3_errors_are_one_line_saying_what_to_do(aws, tmp_path, monkeypatch):
    client = aws.client("s3")
    client.create_bucket(Bucket=DATA)
    client.put_object(Bucket=DATA, Key="a/x.csv", Body=b"h\n1\n")
    cases = [
        (f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x.csv", "does not exist; check the bucket name"),
        (f"s3://{DATA}/a/missing.csv", "no such object in bucket bpcp-data; check the key"),
        (f"s3://{DATA}/a/x.txt", "a dataset on S3 must be a LoadData CSV"),
    ]
    for url, says in cases:
        with pytest.raises(BpcpError) as err:
            s3.fetch_inputs(url, "p.cppipe", tmp_path)
        assert len(err.value.lines) == 1 and says in err.value.lines[0], err.value.lines
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(BpcpError) as err:
        s3.fetch_inputs(f"s3://{DATA}/a/x.csv", "p.cppipe", tmp_path)
    assert "no AWS credentials found" in err.value.lines[0] and "instance profile" in err.value.lines[0]
    assert not any(tmp_path.rglob("*.csv"))


def test_missing_output_bucket_stops_bpcp_run_before_planning(aws, example_plate, tmp_path, capsys):
    from bpcp.cli import main

    out = tmp_path / "run"
    code = main(["run", "-d", str(example_plate / "load_data.csv"), "-p", str(example_plate / "example_loaddata.cppipe"),
                 "-o", str(out), "--s3-output", "s3://no-such-results-bucket/batch1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["bpcp: error: s3://no-such-results-bucket/batch1: bucket no-such-results-bucket "
                                 "does not exist; check the bucket name"]
    assert not out.exists()


def test_access_denied_says_which_permission(aws):
    from botocore.exceptions import ClientError

    exc = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
    line = explain(exc, "s3://bkt/x.csv", "s3:GetObject").lines[0]
    assert "access denied" in line and "s3:GetObject and s3:ListBucket" in line and "instance profile" in line
    assert "s3:PutObject" in explain(exc, "s3://bkt/out", "s3:PutObject").lines[0]


def test_fetcher_downloads_exactly_its_list_and_points_the_csv_at_the_copies(aws, example_plate, tmp_path):
    from bpcp.jobs.render import RunSettings

    client = aws.client("s3")
    upload_plate(client, example_plate)
    names = sorted(p.name for p in (example_plate / "images").iterdir())[:3]
    (tmp_path / "job.fetch").write_text("".join(f"s3://{DATA}/plate/images/{n}\n" for n in names))
    (tmp_path / "job.csv").write_text(
        '"Metadata_Well","Image_FileName_DNA","Image_PathName_DNA","Image_FileName_PH3","Image_PathName_PH3"\n'
        f"A01,{names[0]},s3://{DATA}/plate/images,{names[1]},s3://{DATA}/plate/images\n"
        f'"A,02",{names[2]},s3://{DATA}/plate/images,local.png,/data/local\n')
    dest = tmp_path / "tmp" / "bpcp-s3"

    def fetch(listing: str, out: str, python: str = RunSettings().s3_python):
        """The job runner's download step, under the workers' S3 Python, as a job runs it."""
        return subprocess.run([python, runner.__file__, "fetch", str(tmp_path / listing), str(tmp_path / "job.csv"),
                               str(dest), str(tmp_path / out)], capture_output=True, text=True)

    seen = Requests(aws)
    proc = fetch("job.fetch", "out.csv")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(seen.gets(DATA)) == sorted(f"plate/images/{n}" for n in names) and not seen.listings(DATA)
    for name in names:
        assert (dest / DATA / "plate/images" / name).read_bytes() == (example_plate / "images" / name).read_bytes()
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[1] == f"A01,{names[0]},{dest}/{DATA}/plate/images,{names[1]},{dest}/{DATA}/plate/images"
    assert lines[2] == f'"A,02",{names[2]},{dest}/{DATA}/plate/images,local.png,/data/local'
    summary = json.loads(proc.stdout)
    assert summary["files"] == 3 and summary["bytes"] == sum((example_plate / "images" / n).stat().st_size
                                                             for n in names)
    # a missing object fails the job with one line naming it; no Python with botocore likewise
    (tmp_path / "bad.fetch").write_text(f"s3://{DATA}/plate/images/missing.png\n")
    proc = fetch("bad.fetch", "out2.csv")
    assert proc.returncode != 0 and "plate/images/missing.png: NoSuchKey" in proc.stdout + proc.stderr
    # the runner's own Python has no botocore: it hands the download to the S3 Python, which must have it
    monkey = pytest.MonkeyPatch()
    monkey.setattr(runner, "_can_import_botocore", lambda: False)
    try:
        args = (str(tmp_path / "job.fetch"), str(tmp_path / "job.csv"), str(dest), str(tmp_path / "out3.csv"))
        with pytest.raises(RuntimeError, match="no /nonexistent/python3 on .* to download S3 images"):
            runner.download({"s3_python": "/nonexistent/python3"}, *args)
        bare = tmp_path / "bare-python"          # a Python without site-packages: no botocore
        bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S -I \"$@\"\n")
        bare.chmod(0o755)
        with pytest.raises(RuntimeError, match=r"no botocore for .*\(role awscli\), or pass --s3-python"):
            runner.download({"s3_python": str(bare)}, *args)
        assert runner.download({"s3_python": RunSettings().s3_python}, *args)["files"] == 3
    finally:
        monkey.undo()


def fake_run(root: Path, jobs: list[str], published: list[str]) -> Path:
    """A run folder with a plan and some published jobs (tables are dummies: no merge here)."""
    (root / "published").mkdir(parents=True)
    plan = planfile.to_dict(make_plan(jobs=[(j, 1) for j in jobs], sha="p" * 64))
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "pipeline.cppipe").write_text("pipeline")
    for job in published:
        (root / "published" / job / "sub").mkdir(parents=True)
        (root / "published" / job / "Image.csv").write_text(f"ImageNumber\n1\n# {job}\n")
        (root / "published" / job / "sub" / "x.png").write_bytes(b"\x89PNG" + job.encode())
        (root / "published" / job / "bpcp-job.json").write_text(json.dumps({"job": job, "started": 1.5}))
    return root


def test_mirror_uploads_published_jobs_and_a_fresh_folder_resumes_from_it(aws, tmp_path):
    from bpcp.aws import mirror, uploader
    from bpcp.runfolder import RunFolder

    client = aws.client("s3")
    client.create_bucket(Bucket=RESULTS)
    url = f"s3://{RESULTS}/runs/batch1"
    run = RunFolder(fake_run(tmp_path / "run", ["j1", "j2", "j3"], ["j1", "j2"]))
    assert mirror.start(run, url) == {}
    with uploader.Uploader(run, url) as up:          # what the run's uploader does as j1 is published
        assert up.upload_job("j1").files == 3
    (run.root / "merged").mkdir()
    (run.root / "merged" / "Image.parquet").write_bytes(b"PAR1")
    (run.root / "report.json").write_text("{}")
    mirror.finish(run, url)          # j2 was not uploaded when it was published: it goes up now
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=RESULTS)["Contents"]}
    assert keys == {f"runs/batch1/{k}" for k in [
        "plan.json", "pipeline.cppipe", "merged/Image.parquet", "report.json",
        *[f"published/{j}/{f}" for j in ("j1", "j2") for f in ("Image.csv", "sub/x.png", "bpcp-job.json")]]}
    # a job whose bpcp-job.json is not there (upload cut short) is not complete
    client.put_object(Bucket=RESULTS, Key="runs/batch1/published/j3/Image.csv", Body=b"partial")
    fresh = RunFolder(fake_run(tmp_path / "fresh", ["j1", "j2", "j3"], []))
    seen = Requests(aws)
    there = mirror.start(fresh, url)
    assert sorted(there) == ["j1", "j2"]
    assert len(seen.listings(RESULTS)) == 1
    for job in ("j1", "j2"):
        for name in ("Image.csv", "sub/x.png", "bpcp-job.json"):
            assert (fresh.published(job) / name).read_bytes() == (run.published(job) / name).read_bytes()
    assert not fresh.published("j3").exists()
    assert not [p for p in fresh.published().iterdir() if p.name.startswith(".")]
    # another run's plan under the prefix: refused, nothing brought down
    other = fake_run(tmp_path / "other", ["k1"], [])
    plan = json.loads((other / "plan.json").read_text())
    plan["dataset"]["sha256"] = "e" * 64
    (other / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(BpcpError, match="already holds a run whose dataset changed"):
        mirror.start(RunFolder(other), url)
    assert not any((other / "published").iterdir())


# ---------------------------------------------------------------- end to end (real CellProfiler)

def bpcp(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(BPCP + list(args), capture_output=True, text=True, timeout=1800, cwd=ROOT,
                          env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def s3_reference(example_plate, cp_venv, tmp_path_factory) -> Path:
    """One CellProfiler process over the local plate, with its image paths and URLs written as the
    S3 objects the S3 runs read (the merge names those)."""
    from test_e2e_local import single_process

    plate = example_plate
    local = single_process(cp_venv, tmp_path_factory.mktemp("ref-local"),
                           "-p", str(plate / "example_loaddata.cppipe"), "--data-file", str(plate / "load_data.csv"))
    ref = tmp_path_factory.mktemp("ref-s3")
    images = str(plate / "images")
    for table in TABLES + ("Experiment",):
        text = (local / f"{table}.csv").read_text()
        text = text.replace("file://" + images, f"s3://{DATA}/plate/images").replace(images, f"s3://{DATA}/plate/images")
        (ref / f"{table}.csv").write_text(text)
    (ref / "output-folder.txt").write_text(str(local))    # saved overlays name it: published/<job> here
    return ref


def assert_merged_equals(reference: Path, run: Path) -> None:
    from merge_support import assert_table_equal

    report = json.loads((run / "report.json").read_text())
    assert report["complete"], report["counts"]
    ref_out = Path((reference / "output-folder.txt").read_text())
    for table in TABLES:
        rows = assert_table_equal(reference / f"{table}.csv", run / "merged" / f"{table}.parquet", ref_out=ref_out)
        assert rows > 0 or table == "PH3"


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix):]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


@pytest.mark.cellprofiler
@pytest.mark.slow
def test_run_from_s3_to_s3_equals_local_and_resumes_from_s3(aws, example_plate, cp_venv, s3_reference, tmp_path,
                                                            monkeypatch, session_tmp_root):
    secret = f"bpcp-planted-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)      # moto accepts any; it must show up nowhere
    client = aws.client("s3")
    dataset = upload_plate(client, example_plate)
    client.create_bucket(Bucket=RESULTS)
    output = f"s3://{RESULTS}/runs/batch1"
    run = tmp_path / "run"
    seen = Requests(aws)
    started = time.monotonic()
    proc = bpcp("run", "--cellprofiler", cp_venv, "-d", dataset, "-p", str(example_plate / "example_loaddata.cppipe"),
                "-o", str(run), "--bundle", "0", "--s3-output", output, "--tmp-root", str(session_tmp_root))
    seconds = time.monotonic() - started
    assert "COMPLETE: 8/8 jobs done" in proc.stdout
    assert "8 of 8 jobs download their images from S3" in proc.stdout
    assert_merged_equals(s3_reference, run)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["dataset"]["path"] == dataset and plan["dataset"]["copy"] == "dataset.csv"

    # each job downloaded exactly its own images, each image once; nobody listed per job
    wanted = []
    for job in plan["jobs"]:
        urls = (run / job["fetch"]).read_text().split()
        assert len(urls) == 3 * len(job["image_numbers"])
        wanted += urls
    images = sorted(f"plate/images/{p.name}" for p in (example_plate / "images").iterdir())
    assert sorted(u.removeprefix(f"s3://{DATA}/") for u in wanted) == images
    gets = seen.gets(DATA)
    assert sorted(gets) == sorted(images + ["plate/load_data.csv"]), "downloads other than the planned objects"
    assert len(seen.listings(DATA)) == 1                      # the image folder, once, at plan time
    assert len(seen.listings(RESULTS)) == 2      # access check (1 key), published/ at the start (the end reads s3-uploaded.jsonl)
    assert (run / "dataset.csv").read_bytes() == client.get_object(Bucket=DATA, Key="plate/load_data.csv")["Body"].read()
    fetched = [json.loads((run / "published" / j["id"] / "bpcp-job.json").read_text())["fetch"] for j in plan["jobs"]]
    assert all(f["files"] == 6 for f in fetched)
    per_job = ", ".join(f"{f['seconds']:.3f}" for f in fetched)
    print(f"\nS3 run: {seconds:.1f} s; download per job: {per_job} s ({fetched[0]['bytes']} bytes each)")
    # the downloads went into the jobs' temp folders (in this session's temp root: the RAM disk when
    # mounted), as the paths CellProfiler read them from say, and went away with them
    from bpcp.jobs.runner import run_tag

    from merge_support import read_reference

    prefix = f"{session_tmp_root}/bpcp-{run_tag(str(run))}-"
    for job in plan["jobs"]:
        _, rows = read_reference(run / "published" / job["id"] / "Image.csv")
        read_from = {v for r in rows for k, v in r.items() if k.startswith("PathName_") and "/bpcp-s3/" in v}
        assert read_from and all(v.startswith(f"{prefix}{job['id']}.") for v in read_from), (job["id"], read_from)
    assert not list(session_tmp_root.glob(f"bpcp-{run_tag(str(run))}-*"))
    assert not list(run.rglob("bpcp-s3"))

    # the S3 copy: every published job, the merged tables, the report and the plan
    there = objects(client, RESULTS, "runs/batch1/")
    for job in plan["jobs"]:
        for path in (run / "published" / job["id"]).rglob("*"):
            if path.is_file():
                assert there[f"published/{job['id']}/{path.relative_to(run / 'published' / job['id'])}"] == \
                    path.read_bytes()
    for name in ["plan.json", "report.json", "dataset.csv", "pipeline.cppipe"] + \
            [f"merged/{p.name}" for p in (run / "merged").iterdir() if p.is_file()]:
        assert name in there, name
    # no credential anywhere
    assert files_holding(run, secret.encode()) == []
    assert [k for k, v in there.items() if secret.encode() in v] == []

    # resume on a fresh controller: empty local folder, same command: nothing runs again
    fresh = tmp_path / "fresh"
    before = {j["id"]: json.loads((run / "published" / j["id"] / "bpcp-job.json").read_text()) for j in plan["jobs"]}
    seen = Requests(aws)
    again = bpcp("run", "--cellprofiler", cp_venv, "-d", dataset, "-p", str(example_plate / "example_loaddata.cppipe"),
                 "-o", str(fresh), "--bundle", "0", "--s3-output", output)
    assert "8 of 8 jobs already published, 0 to run" in again.stdout
    assert "COMPLETE: 8/8 jobs done" in again.stdout
    assert not (fresh / "joblog.tsv").exists() or (fresh / "joblog.tsv").read_text().count("\n") <= 1
    for job, record in before.items():
        assert json.loads((fresh / "published" / job / "bpcp-job.json").read_text()) == record
    assert [g for g in seen.gets(DATA) if g.startswith("plate/images/")] == []
    assert_merged_equals(s3_reference, fresh)
    assert files_holding(fresh, secret.encode()) == []

    # and one with another number of slots and --bundle auto: the S3 copy's jobs are kept
    other = bpcp("run", "--cellprofiler", cp_venv, "-d", dataset, "-p", str(example_plate / "example_loaddata.cppipe"),
                 "-o", str(tmp_path / "fresh2"), "--slots", "3", "--s3-output", output, "--bundle", "auto")
    assert "8 of 8 jobs already published, 0 to run" in other.stdout
    assert json.loads((tmp_path / "fresh2" / "plan.json").read_text())["jobs"] == plan["jobs"]


@pytest.mark.cellprofiler
@pytest.mark.slow
def test_path_map_turns_mounted_bucket_paths_into_s3_in_multihost_mode(aws, example_plate, cp_venv, s3_reference,
                                                                        tmp_path):
    """The CSV names the images by a local (e.g. s3fs-mounted) path; --path-map points them at S3.
    Run through the multi-host job script (sshlogin ':'): the fetch list travels in stage/<job>/."""
    client = aws.client("s3")
    upload_plate(client, example_plate)
    run = tmp_path / "run"
    logins = tmp_path / "hosts.sshlogin"
    logins.write_text("2/:\n")
    seen = Requests(aws)
    bpcp("run", "--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"),
         "-p", str(example_plate / "example_loaddata.cppipe"), "-o", str(run), "--bundle", "0",
         "--path-map", f"{example_plate / 'images'}=s3://{DATA}/plate/images", "--sshloginfile", str(logins))
    assert_merged_equals(s3_reference, run)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["dataset"]["path_map"] == [f"{example_plate / 'images'}=s3://{DATA}/plate/images"]
    images = sorted(f"plate/images/{p.name}" for p in (example_plate / "images").iterdir())
    assert sorted(seen.gets(DATA)) == images and len(seen.listings(DATA)) == 1
    job = plan["jobs"][0]["id"]
    assert (run / "stage" / job / "fetch.txt").read_text() == (run / "inputs" / f"{job}.fetch").read_text()
    assert f"s3://{DATA}/plate/images" in (run / "stage" / job / "input.csv").read_text()
    assert not (run / "stage" / job / "root").exists()          # nothing local to stage


@pytest.mark.cellprofiler
@pytest.mark.slow
def test_run_yml_with_dataset_and_output_on_s3(aws, example_plate, cp_venv, s3_reference, tmp_path, monkeypatch):
    secret = f"bpcp-planted-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    client = aws.client("s3")
    dataset = upload_plate(client, example_plate)
    client.create_bucket(Bucket=RESULTS)
    ansible = str(Path(sys.executable).parent / "ansible-playbook")
    proc = subprocess.run([ansible, "run.yml", "-e", f"dataset={dataset}",
                           "-e", f"pipeline={example_plate / 'example_loaddata.cppipe'}",
                           "-e", f"output={tmp_path / 'run'}", "-e", f"s3_output=s3://{RESULTS}/yml",
                           "-e", f"cellprofiler_version={Path(cp_venv).name}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert re.search(r"COMPLETE: (\d+)/\1 jobs done, 8/8 groups, 16/16 image sets", proc.stdout)
    assert_merged_equals(s3_reference, tmp_path / "run")
    keys = objects(client, RESULTS, "yml/")
    assert "report.json" in keys and "merged/Nuclei.parquet" in keys
    assert sum(1 for k in keys if k.endswith("/bpcp-job.json")) == len(
        json.loads((tmp_path / "run" / "plan.json").read_text())["jobs"])
    assert files_holding(tmp_path / "run", secret.encode()) == [] and secret not in proc.stdout
    assert [k for k, v in keys.items() if secret.encode() in v] == []


# ---------------------------------------------------------------- bad inputs (bpcp plan, in-process)

def plan_cmd(capsys, cp_venv, out: Path, *args: str) -> tuple[int, list[str]]:
    from bpcp.cli import main

    code = main(["plan", "--cellprofiler", cp_venv, "--output", str(out), *args])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.cellprofiler
@pytest.mark.parametrize("case", ["bucket", "key", "image", "bad-url", "bad-map"])
def test_bad_s3_inputs_are_one_line_and_write_nothing(case, aws, example_plate, cp_venv, capsys, tmp_path):
    client = aws.client("s3")
    dataset = upload_plate(client, example_plate, "plate/bad.csv",
                           mangle=lambda t: t.replace("Plate1_A02_s1_w2.png", "Plate1_A02_s1_w2_MISSING.png"))
    pipeline = str(example_plate / "example_loaddata.cppipe")
    args, says = {
        "bucket": (["-d", "s3://no-such-bucket-here/load_data.csv"], "bucket no-such-bucket-here does not exist"),
        "key": (["-d", f"s3://{DATA}/plate/nope.csv"], "no such object in bucket bpcp-data"),
        "image": (["-d", dataset], f"image set 3 refers to s3://{DATA}/plate/images/Plate1_A02_s1_w2_MISSING.png, "
                                   "which does not exist"),
        "bad-url": (["-d", "s3://B/x.csv"], "not a valid S3 bucket name"),
        "bad-map": (["-d", str(example_plate / "load_data.csv"), "--path-map", "images=s3://x"],
                    "neither an absolute path nor an s3:// URL"),
    }[case]
    out = tmp_path / "run"
    code, err = plan_cmd(capsys, cp_venv, out, *args, "-p", pipeline)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("bpcp: error: ") and says in err[0], err
    assert not out.exists() or not any(out.iterdir())
    if case == "image":
        assert err[0].startswith(f"bpcp: error: {dataset}: ")       # the URL given, not a temporary copy


@pytest.mark.cellprofiler
def test_no_python_with_botocore_stops_the_run_before_any_job(aws, example_plate, cp_venv, tmp_path):
    client = aws.client("s3")
    dataset = upload_plate(client, example_plate)
    run = tmp_path / "run"
    proc = bpcp("run", "--cellprofiler", cp_venv, "-d", dataset, "-p", str(example_plate / "example_loaddata.cppipe"),
                "-o", str(run), "--s3-python", "/nonexistent/python3", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "/nonexistent/python3: not found on this host" in err[0] and "role awscli" in err[0]
    assert not (run / "jobs.sh").exists() and not any((run / "published").iterdir())


@pytest.mark.cellprofiler
@pytest.mark.slow
def test_run_yml_names_a_worker_without_botocore_before_running(aws, example_plate, cp_venv, tmp_path):
    client = aws.client("s3")
    dataset = upload_plate(client, example_plate)
    ansible = str(Path(sys.executable).parent / "ansible-playbook")
    proc = subprocess.run([ansible, "run.yml", "-e", f"dataset={dataset}",
                           "-e", f"pipeline={example_plate / 'example_loaddata.cppipe'}",
                           "-e", f"output={tmp_path / 'run'}", "-e", "s3_python=/nonexistent/python3",
                           "-e", f"cellprofiler_version={Path(cp_venv).name}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "no Python with botocore at /nonexistent/python3" in proc.stdout, proc.stdout[-3000:]
    assert "Run the jobs" not in proc.stdout
    assert not (tmp_path / "run" / "plan.json").exists()
