"""`bpcp report` on real run folders: a `bpcp run` with real CellProfiler and GNU parallel in
which one job fails (an image removed after planning), then a resume that finishes it."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import require

from bpcp.results.report import Attempt, assign_slots, load, read_joblog, write_report

ROOT = Path(__file__).resolve().parents[1]
BPCP = [sys.executable, "-m", "bpcp.cli"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bpcp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(BPCP + list(args), capture_output=True, text=True, timeout=900, cwd=ROOT)


def joblog_lines(run: Path) -> list[str]:
    return [l for l in (run / "joblog.tsv").read_text().splitlines() if l.strip() and not l.startswith("Seq\t")]


@pytest.fixture(scope="module")
def runs(cellprofiler_cmd, tmp_path_factory):
    """(failed_run, resumed_run, first, second): 3 wells x 1 site; well A02 lost an image after
    planning, so its job fails; the first folder is a copy taken then; the second is the same run
    resumed after the image came back, so its joblog holds both sessions; first and second are
    the two `bpcp run` processes."""
    from bpcp.example import PlateSpec, generate_plate

    root = tmp_path_factory.mktemp("report")
    plate = generate_plate(root / "plate", PlateSpec(rows="A", columns=3, sites=1))
    run = root / "run"
    common = ["--dataset", str(plate / "load_data.csv"), "--pipeline", str(plate / "example_loaddata.cppipe"),
              "--output", str(run), "--cellprofiler", str(Path(cellprofiler_cmd[0]).parents[1]), "--bundle", "0"]
    lost = plate / "images" / "Plate1_A02_s1_w1.png"
    saved = root / "saved.png"
    plan = bpcp("plan", *common)
    assert plan.returncode == 0, plan.stderr
    shutil.move(lost, saved)
    first = bpcp("run", *common, "--retries", "1", "--halt", "never", "--skip-image-check")
    assert first.returncode != 0, first.stdout          # one job failed
    failed_copy = root / "failed-run"
    shutil.copytree(run, failed_copy, symlinks=True)
    shutil.move(saved, lost)
    second = bpcp("run", *common, "--retries", "1")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    return failed_copy, run, first, second


def max_overlap(run: Path) -> int:
    """The most joblog attempts running at one time (each from Starttime, for JobRuntime s)."""
    events = []
    for line in joblog_lines(run):
        cols = line.split("\t")
        start, runtime = float(cols[2]), float(cols[3])
        events += [(start, 1), (start + runtime, -1)]
    running = most = 0
    for _, step in sorted(events):           # an end before a start at the same time
        running += step
        most = max(most, running)
    return most


def embedded_png(page: str) -> bytes:
    m = re.search(r"<img id='charts'[^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert m, "no embedded PNG in the report"
    return base64.b64decode(m.group(1))


def test_report_of_a_run_with_a_failure(runs):
    failed_run, *_ = runs
    path, summary = write_report(failed_run, link=True)
    page = path.read_text()
    png = embedded_png(page)
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    # no external assets: the only URL-like attribute is the data URI
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    plan = json.loads((failed_run / "plan.json").read_text())
    lines = joblog_lines(failed_run)
    assert len(lines) == 3 and page.count("<tr class='ok job'>") == 2 and page.count("<tr class='failed job'>") == 1
    for job in plan["jobs"]:
        assert job["id"] in page
    failed = [p.parent.name for p in (failed_run / "failed").glob("*/reason.txt")]
    assert len(failed) == 1 and failed[0].startswith("Plate1_A02")
    reason = (failed_run / "failed" / failed[0] / "reason.txt").read_text().strip()
    assert reason and reason.replace("'", "&#x27;").replace('"', "&quot;")[:60] in page
    assert summary["jobs_published"] == 2 and summary["jobs_failed"] == 1 and summary["failed_attempts"] == 1
    assert summary["image_sets_published"] == 2
    # one host: the report's slots are the most attempts that ran at once (the joblog's own
    # intervals), at most one per job and one per core of this machine
    assert summary["slots"] == max_overlap(failed_run) <= min(len(lines), os.cpu_count() or 1)
    assert 0 < summary["busy_fraction"] <= 1.0
    # no profile.json and no --work-seconds: efficiency is said to be unknown, not made up
    assert summary["efficiency"] is None and "efficiency</th><td>not known" in page
    # ... and what the run does show is said instead, with no errand for the user
    assert f"busy fraction above: {summary['busy_fraction']:.3f}" in page
    assert "benchmark" not in page and "bpcp profile" not in page
    assert json.loads((failed_run / "report.json").read_text())["report_html"] == "report.html"


def test_report_after_resume_counts_both_sessions(runs):
    _, run, *_ = runs
    lines = joblog_lines(run)
    assert len(lines) == 4                               # 3 attempts, then the resumed job
    path, summary = write_report(run, work_seconds=10.0, cores=2)
    page = path.read_text()
    assert summary["jobs_published"] == 3 and summary["jobs_failed"] == 0
    assert "No job is failed." in page and "Failed attempts that later succeeded: Plate1_A02" in page
    attempts, _ = read_joblog(run / "joblog.tsv")
    wall = summary["wall_seconds"]
    # the wall time leaves out the gap between the two sessions, and covers every job
    assert wall <= summary["span_seconds"] and wall >= max(a.runtime for a in attempts)
    assert summary["efficiency"] == pytest.approx(10.0 / (2 * wall))
    assert summary["busy_fraction"] == pytest.approx(sum(a.runtime for a in attempts) / (summary["slots"] * wall))
    assert "<b>0." in page or "<b>1." in page


def results_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.strip().splitlines()[-1]


def test_run_writes_the_report_and_names_it_last(runs):
    """`bpcp run` draws report.html by itself, with or without failed jobs, and its last line
    names it beside merged/ and report.json; the exit status is the run's."""
    failed_run, run, first, second = runs          # failed_run: a copy of run taken after the first
    assert (failed_run / "report.html").is_file() and (run / "report.html").is_file()
    for proc in (first, second):
        assert results_line(proc) == (f"bpcp: results: {run}/merged/ (tables), {run}/report.json (completeness), "
                                      f"{run}/report.html (how the run went: open it in a browser)")
    assert first.returncode == 1 and second.returncode == 0


def test_a_report_that_cannot_be_drawn_never_fails_the_run(runs, tmp_path):
    """`bpcp merge` with report.html unwritable (a folder there): one line says so, the exit
    status stays the run's (0 complete, 1 not), the results line leaves report.html out."""
    failed_run, run, *_ = runs
    for source, status in ((run, 0), (failed_run, 1)):
        copy = tmp_path / source.name
        shutil.copytree(source, copy, symlinks=True)
        (copy / "report.html").unlink(missing_ok=True)
        (copy / "report.html").mkdir()
        proc = bpcp("merge", "--output", str(copy))
        assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr + proc.stdout
        said = [l for l in proc.stderr.splitlines() if "report.html" in l]
        assert len(said) == 1 and said[0].startswith("bpcp: report.html not written ("), proc.stderr
        assert results_line(proc) == f"bpcp: results: {copy}/merged/ (tables), {copy}/report.json (completeness)"


def test_efficiency_from_profile_json(runs, tmp_path):
    _, run, *_ = runs
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    (copy / "profile.json").write_text(json.dumps({"derived": {"startup_seconds": 4.0, "seconds_per_image_set": 2.0}}))
    path, summary = write_report(copy, cores=2)
    assert summary["work_seconds"] == pytest.approx(4.0 + 2.0 * 3)
    assert summary["efficiency"] == pytest.approx(10.0 / (2 * summary["wall_seconds"]))
    assert "W from profile.json: 4.00 s start-up + 2.000 s x 3 image sets" in path.read_text()


def test_report_command(runs):
    _, run, *_ = runs
    (run / "report.html").unlink()
    proc = bpcp("report", "--output", str(run), "--work-seconds", "12", "--total-cores", "2")
    assert proc.returncode == 0, proc.stderr
    assert "efficiency" in proc.stdout and (run / "report.html").exists()


def test_slots_follow_overlap():
    def att(seq, host, start, runtime):
        return Attempt(seq, host, start, runtime, 0, 0, f"j{seq}", 1)

    a = [att(1, ":", 0, 10), att(2, ":", 0, 5), att(3, ":", 5, 5), att(4, ":", 10, 3), att(5, ":", 11, 1),
         att(6, "h2", 0, 100), att(7, "h2", 1, 1)]
    assign_slots(a)
    assert [x.slot for x in a] == [0, 1, 1, 0, 1, 0, 1]


def test_joblog_with_session_headers_and_torn_line(tmp_path):
    log = tmp_path / "joblog.tsv"
    log.write_text(
        "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n"
        "1\t:\t100.0\t5.0\t0\t10\t0\t0\tbpcp_job A-1 3\n"
        "2\t:\t100.5\t2.0\t0\t10\t1\t0\tbpcp_job B-2 2\n"
        "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n"
        "1\tw1\t200.0\t4.0\t0\t10\t0\t0\tbpcp_job B-2 2\n"
        "2\tw1\t201.0\t4")
    attempts, notes = read_joblog(log)
    assert [(a.job, a.image_sets, a.host, a.ok) for a in attempts] == [
        ("A-1", 3, ":", True), ("B-2", 2, ":", False), ("B-2", 2, "w1", True)]
    assert len(notes) == 1 and "line 6" in notes[0]


def test_report_without_plan_is_a_one_line_error(tmp_path):
    from bpcp.errors import BpcpError

    with pytest.raises(BpcpError, match="no plan.json here"):
        load(tmp_path)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_chromium(runs, tmp_path):
    """The page renders and the chart image decodes: naturalWidth > 0 after onload, and the
    screenshot shows the Gantt bars' green. Every bar names its job: a hover box lies on it
    (mostly the bar's colour under it in the screenshot) titled with the job id, and the well
    is written in it (white text inside the bar)."""
    browser = _chromium()
    require("Chromium", browser, "no chromium (apt-get install -y chromium)")
    _, run, *_ = runs
    path, _ = write_report(run)
    page = path.read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace(
        "</body>", "<script>window.addEventListener('load', () => { const i = document.getElementById('charts');"
                   " document.body.setAttribute('data-natural', i.naturalWidth + 'x' + i.naturalHeight);"
                   " const bars = [...document.querySelectorAll('.charts .bar')].map(b => { const r ="
                   " b.getBoundingClientRect(); return [r.left, r.top, r.width, r.height, b.title, b.dataset.label]; });"
                   " document.body.setAttribute('data-bars', JSON.stringify(bars)); });"
                   "</script></body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tempfile.mkdtemp()}"]
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--window-size=1400,1800", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r'data-natural="(\d+)x(\d+)"', dom.stdout)
    assert m, dom.stdout[:500] + dom.stderr[-500:]
    width, height = int(m.group(1)), int(m.group(2))
    assert width > 300 and height > 200

    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1400,1800", path.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.read_bytes().startswith(PNG_MAGIC)
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(io.BytesIO(shot.read_bytes()), format="png")[..., :3]
    rgb = (img * 255).round().astype(int)
    green = np.all(np.abs(rgb - np.array([0x4C, 0x9F, 0x70])) <= 6, axis=-1).sum()
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50      # not blank
    assert green > 2000, f"only {green} pixels of the Gantt bars' green in the screenshot"

    import html as html_mod

    m = re.search(r'data-bars="([^"]*)"', dom.stdout)
    assert m, dom.stdout[:500]
    bars = json.loads(html_mod.unescape(m.group(1)))
    plan = json.loads((run / "plan.json").read_text())
    wells = {j["id"]: j["groups"][0]["Metadata_Well"] for j in plan["jobs"]}
    assert len(bars) == len(joblog_lines(run)) == 4
    assert {title.splitlines()[0] for *_, title, _ in bars} == set(wells)
    bar_colours = np.array([[0x4C, 0x9F, 0x70], [0xD1, 0x49, 0x5B]])
    for left, top, w, h, title, label in bars:
        job = title.splitlines()[0]
        assert label == wells[job], (label, title)
        x0, y0, x1, y1 = (round(v) for v in (left, top, left + w, top + h))
        box = rgb[y0:y1, x0:x1].reshape(-1, 3)
        coloured = (np.abs(box[:, None, :] - bar_colours[None]) <= 8).all(-1).any(-1).mean()
        assert coloured > 0.6, f"{job}: the hover box is not on its bar ({coloured:.2f} of it in a bar colour)"
        # the label is centred and may fill its bar up to 2 px from each end (the report's room);
        # the bar's white edge lies at its ends and its top and bottom. Text is anti-aliased and
        # the chart is scaled to the page, so few pixels stay pure white (10-21 seen): count the
        # pixels lighter in every channel than any part of either bar colour (46-52 seen here, 0 with no label)
        inner = rgb[y0 + (y1 - y0) // 4:y1 - (y1 - y0) // 4, x0 + 3:x1 - 3]
        light = (inner.min(-1) >= 180).sum()
        assert light > 8, f"{job}: no label written in its bar ({light} light pixels)"
