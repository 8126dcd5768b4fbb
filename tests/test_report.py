"""`bpcp report` on real run folders: a `bpcp run` with real CellProfiler and GNU parallel in
which one job fails (an image removed after planning), then a resume that finishes it."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bpcp.report import Attempt, assign_slots, load, read_joblog, write_report

ROOT = Path(__file__).resolve().parents[1]
BPCP = [sys.executable, "-m", "bpcp.cli"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bpcp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(BPCP + list(args), capture_output=True, text=True, timeout=900, cwd=ROOT)


def joblog_lines(run: Path) -> list[str]:
    return [l for l in (run / "joblog.tsv").read_text().splitlines() if l.strip() and not l.startswith("Seq\t")]


@pytest.fixture(scope="module")
def runs(cellprofiler_cmd, tmp_path_factory):
    """(failed_run, resumed_run): 3 wells x 1 site; well A02 lost an image after planning, so its
    job fails; the first folder is a copy taken then; the second is the same run resumed after
    the image came back, so its joblog holds both sessions."""
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
    return failed_copy, run


def embedded_png(page: str) -> bytes:
    m = re.search(r"<img id='charts'[^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert m, "no embedded PNG in the report"
    return base64.b64decode(m.group(1))


def test_report_of_a_run_with_a_failure(runs):
    failed_run, _ = runs
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
    # one host, two cores: the three jobs of the first session overlap on at most two slots
    assert summary["slots"] == 2
    assert 0 < summary["busy_fraction"] <= 1.0
    # no profile.json and no --work-seconds: efficiency is said to be unknown, not made up
    assert summary["efficiency"] is None and "efficiency</th><td>not known" in page
    assert json.loads((failed_run / "report.json").read_text())["report_html"] == "report.html"


def test_report_after_resume_counts_both_sessions(runs):
    _, run = runs
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


def test_report_command(runs):
    _, run = runs
    (run / "report.html").unlink()
    proc = bpcp("report", "--output", str(run), "--work-seconds", "12", "--cores", "2")
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

    with pytest.raises(BpcpError, match="no readable plan.json"):
        load(tmp_path)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_chromium(runs, tmp_path):
    """The page renders and the chart image decodes: naturalWidth > 0 after onload, and the
    screenshot shows the Gantt bars' green."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium (apt-get install -y chromium)")
    _, run = runs
    path, _ = write_report(run)
    page = path.read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace(
        "</body>", "<script>window.addEventListener('load', () => { const i = document.getElementById('charts');"
                   " document.body.setAttribute('data-natural', i.naturalWidth + 'x' + i.naturalHeight); });"
                   "</script></body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tempfile.mkdtemp()}"]
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
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
