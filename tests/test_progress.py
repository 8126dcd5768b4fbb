"""Progress in image sets (bpcp.jobs.progress): the arithmetic and wording as pure functions, the
monitor on a hand-made run folder with the clock passed in, and `bpcp run` in a real terminal
(tmux) on the example plate with real CellProfiler and GNU parallel."""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require

from bpcp.jobs import progress
from bpcp.jobs.progress import (
    Display,
    Ended,
    Monitor,
    Progress,
    RunState,
    Watcher,
    duration,
    eta_seconds,
    follow,
    job_line,
    measure,
    progress_line,
    rate_text,
    seconds_per_image_set,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_000_000.0


# ----------------------------------------------------------------------------- wording
def test_durations_and_rates_read_as_a_person_would_say_them():
    assert [duration(s) for s in (0, 4.4, 59.6, 61, 3599, 3600, 5 * 3600 + 7 * 60)] == [
        "0 s", "4 s", "1 min 00 s", "1 min 01 s", "59 min 59 s", "1 h 00 min", "5 h 07 min"]
    assert rate_text(None) == ""
    assert rate_text(2.5) == "2.5 image sets/s"
    assert rate_text(0.5) == "30.0 image sets/min"
    assert rate_text(0.001) == "3.6 image sets/h"


def test_progress_and_job_lines():
    p = Progress(sets_done=8, sets_failed=4, sets_total=16, jobs_done=2, jobs_failed=1, jobs_total=4,
                 elapsed=75, rate=0.2, eta=31)
    assert progress_line(p) == ("bpcp: 8/16 image sets done, 4 failed (2 of 4 jobs); 12.0 image sets/min; "
                                "elapsed 1 min 15 s; ETA 31 s")
    assert job_line("P1_A01-1234abcd", Ended(4, 12.4, T0), p) == (
        "bpcp: P1_A01-1234abcd published (4 image sets, 12 s): 8/16 image sets done, 4 failed; "
        "12.0 image sets/min; elapsed 1 min 15 s; ETA 31 s")
    before = Progress(0, 0, 16, 0, 0, 4, elapsed=3, rate=None, eta=None)
    assert progress_line(before) == "bpcp: 0/16 image sets done, 0 failed (0 of 4 jobs); elapsed 3 s; ETA after the first job"
    late = Progress(12, 0, 16, 3, 0, 4, elapsed=30, rate=0.4, eta=0.2)
    assert progress_line(late).endswith("; ETA soon")
    done = Progress(16, 0, 16, 4, 0, 4, elapsed=40, rate=0.4, eta=0)
    assert progress_line(done) == "bpcp: 16/16 image sets done, 0 failed (4 of 4 jobs); 24.0 image sets/min; elapsed 40 s"
    for line in (progress_line(p), job_line("j", Ended(4), p), progress_line(done)):
        assert progress.PROGRESS.match(line), line


def test_a_live_line_never_wraps():
    assert progress.fit("x" * 50, 80) == "x" * 50
    cut = progress.fit("x" * 100, 80)
    assert len(cut) < 80 and cut.endswith("...")


# ----------------------------------------------------------------------------- arithmetic
QUEUE = (("a", 4), ("b", 4), ("c", 4), ("d", 4))


def test_eta_is_unknown_before_anything_was_measured():
    assert eta_seconds(T0 + 3, T0, 2, None, QUEUE, set(), []) is None
    assert seconds_per_image_set([Ended(4)]) is None          # a record without times measures nothing


def test_eta_replays_the_schedule_from_measured_job_times():
    # 2 s per image set: 8 s a job. 3 s in, a and b run (5 s left each); c and d follow: 5 + 8.
    assert eta_seconds(T0 + 3, T0, 2, 2.0, QUEUE, set(), []) == pytest.approx(13)
    # a ended at +8 (c took its slot), b at +9 (d took it); at +10: c has 6 s left, d 7 s.
    assert eta_seconds(T0 + 10, T0, 2, 2.0, QUEUE, {"a", "b"}, [T0 + 8, T0 + 9]) == pytest.approx(7)
    # one slot: a runs (5 s left), then b, c, d one after another
    assert eta_seconds(T0 + 3, T0, 1, 2.0, QUEUE, set(), []) == pytest.approx(5 + 3 * 8)
    # more slots than jobs: the longest running job decides
    assert eta_seconds(T0 + 3, T0, 8, 2.0, (("a", 4), ("b", 1)), set(), []) == pytest.approx(5)
    # a job running longer than predicted ends any moment, not in negative time
    assert eta_seconds(T0 + 30, T0, 2, 2.0, QUEUE[:2], set(), []) == 0
    # nothing left
    assert eta_seconds(T0 + 30, T0, 2, 2.0, QUEUE, {"a", "b", "c", "d"}, [T0 + 8] * 4) == 0


def test_measure_counts_image_sets_of_this_session():
    state = RunState(jobs=(("old", 2), *QUEUE), published={"old": Ended(2, 100.0, T0 - 50), "a": Ended(4, 8.0, T0 + 8)},
                     failed=frozenset({"b"}), ends=(T0 - 50, T0 + 8, T0 + 9))
    p = measure(state, T0, T0 + 10, 2, QUEUE)
    assert (p.sets_done, p.sets_failed, p.sets_total) == (6, 4, 18)
    assert (p.jobs_done, p.jobs_failed, p.jobs_total, p.left) == (2, 1, 5, 2)
    assert p.rate == pytest.approx(4 / 10)                   # the earlier session's job is not this session's rate
    # measured this session: 2 s per image set (not the earlier job's 50): c started at +8, d at +9
    assert p.eta == pytest.approx(7)


# ----------------------------------------------------------------------------- the monitor
def make_run(root: Path, jobs: dict[str, int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "joblist.tsv").write_text("".join(f"{j}\t{n}\n" for j, n in jobs.items()))
    for sub in ("published", "failed", "work"):
        (root / sub).mkdir(exist_ok=True)
    return root


def attempt(root: Path, job: str, sets: int, started: float, finished: float, exitval: int) -> None:
    """One line of GNU parallel's joblog, as jobs.sh's parallel writes it when an attempt ends."""
    log = root / "joblog.tsv"
    if not log.exists():
        log.write_text("Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n")
    seq = len(log.read_text().splitlines())
    with log.open("a") as fd:
        fd.write(f"{seq}\t:\t{started:.3f}\t{finished - started:.3f}\t0\t0\t{exitval}\t0\tbpcp_job {job} {sets}\n")


def publish(root: Path, job: str, sets: int, started: float, finished: float) -> None:
    folder = root / "published" / job
    folder.mkdir()
    (folder / "bpcp-job.json").write_text(json.dumps({"job": job, "image_sets": sets, "started": started,
                                                      "finished": finished}))
    attempt(root, job, sets, started, finished, 0)


def fail(root: Path, job: str, sets: int, started: float, finished: float) -> None:
    (root / "failed" / job).mkdir()
    (root / "failed" / job / "reason.txt").write_text("CellProfiler said no\n")
    attempt(root, job, sets, started, finished, 1)


def test_off_a_terminal_a_start_line_one_line_per_job_and_a_summary_a_quiet_minute(tmp_path):
    root = make_run(tmp_path / "run", {"a": 4, "b": 4, "c": 4, "d": 4})
    out = io.StringIO()
    mon = Monitor.start(root, 2, Display(live=False, out=out, err=out), T0)

    def said() -> list[str]:
        lines = out.getvalue().splitlines()
        out.seek(0)
        out.truncate()
        return lines

    mon.poll(T0 + 5)
    assert said() == ["bpcp: 0/16 image sets done, 0 failed (0 of 4 jobs); elapsed 5 s; ETA after the first job"]
    mon.poll(T0 + 6)
    assert said() == []
    publish(root, "a", 4, T0, T0 + 8)
    mon.poll(T0 + 9)
    mon.poll(T0 + 10)                                  # said once, not again
    # 2 s per image set; b has run 9 s of its 8 (any moment), c since a ended (7 s left), d after b: 8 s
    assert said() == ["bpcp: a published (4 image sets, 8 s): 4/16 image sets done, 0 failed; 26.7 image sets/min; "
                      "elapsed 9 s; ETA 8 s"]
    fail(root, "b", 4, T0, T0 + 20)                    # the runner's FAILED line says it; counted from here
    mon.poll(T0 + 30)
    mon.poll(T0 + 68)
    assert said() == []                                # not a minute since the last line
    mon.poll(T0 + 69)
    assert said() == ["bpcp: 4/16 image sets done, 4 failed (1 of 4 jobs); 3.5 image sets/min; elapsed 1 min 09 s; "
                      "ETA soon"]
    mon.poll(T0 + 100)
    assert said() == []
    publish(root, "c", 4, T0 + 8, T0 + 101)
    publish(root, "d", 4, T0 + 20, T0 + 102)
    mon.poll(T0 + 103)
    assert [l.split(" published")[0] for l in said()] == ["bpcp: c", "bpcp: d"]
    mon.poll(T0 + 500, final=True)                     # the last job line already has the final counts
    assert said() == []


def test_the_last_summary_comes_when_the_counts_changed_since_the_last_line(tmp_path):
    root = make_run(tmp_path / "run", {"a": 4, "b": 2})
    out = io.StringIO()
    mon = Monitor.start(root, 2, Display(live=False, out=out, err=out), T0)
    publish(root, "a", 4, T0, T0 + 8)
    mon.poll(T0 + 9)
    fail(root, "b", 2, T0, T0 + 10)
    mon.poll(T0 + 10, final=True)
    assert out.getvalue().splitlines()[-1] == "bpcp: 4/6 image sets done, 2 failed (1 of 2 jobs); 24.0 image sets/min; elapsed 10 s"


def test_a_resumed_run_counts_what_was_published_before(tmp_path):
    root = make_run(tmp_path / "run", {"a": 4, "b": 4})
    publish(root, "a", 4, T0 - 100, T0 - 90)
    out = io.StringIO()
    mon = Monitor.start(root, 1, Display(live=False, out=out, err=out), T0)
    p = mon.poll(T0 + 2)
    assert (p.sets_done, p.rate) == (4, None)
    assert p.eta == pytest.approx(10 * 4 / 4 - 2)            # measured on the earlier job: 2.5 s per image set
    assert out.getvalue() == "bpcp: 4/8 image sets done, 0 failed (1 of 2 jobs); elapsed 2 s; ETA 8 s\n"


class Tty(io.StringIO):
    """What a terminal would show: \\r returns to the line's start, ESC[K clears to its end."""

    def screen(self) -> list[str]:
        rows, line = [], ""
        for part in re.split(r"(\r|\n|\x1b\[K)", self.getvalue()):
            if part == "\r":
                line = ""                  # every redraw rewrites the whole line, then clears the rest
            elif part == "\n":
                rows.append(line)
                line = ""
            elif part != "\x1b[K":
                line += part
        return rows + ([line] if line else [])


def test_on_a_terminal_one_live_line_with_other_lines_above_it(tmp_path):
    root = make_run(tmp_path / "run", {"a": 4, "b": 4})
    tty = Tty()
    display = Display(live=True, out=tty, err=tty, width=lambda: 200)
    mon = Monitor.start(root, 2, display, T0)
    mon.poll(T0 + 1)
    assert tty.screen() == ["bpcp: 0/8 image sets done, 0 failed (0 of 2 jobs); elapsed 1 s; ETA after the first job"]
    display.say("bpcp: b: FAILED on host: CellProfiler said no", stderr=True)
    publish(root, "a", 4, T0, T0 + 8)
    mon.poll(T0 + 9)
    assert tty.screen() == ["bpcp: b: FAILED on host: CellProfiler said no",
                            "bpcp: 4/8 image sets done, 0 failed (1 of 2 jobs); 26.7 image sets/min; elapsed 9 s; ETA soon"]
    display.close()
    assert tty.getvalue().endswith("\n") and len(tty.screen()) == 2


def test_the_watcher_drops_the_runners_job_count_lines_and_keeps_the_rest(tmp_path):
    root = make_run(tmp_path / "run", {"a": 4})
    out = io.StringIO()
    watcher = Watcher(root, 1, live=False, display=Display(live=False, out=out, err=out))
    publish(root, "a", 4, time.time() - 8, time.time())
    stdout = io.StringIO("bpcp: 0 of 1 jobs already published, 1 to run\nbpcp: a: published (1 of 1 jobs done)\n"
                         "bpcp: 1 of 1 jobs published in /x/published\n")
    stderr = io.StringIO("parallel: Warning: something\n")
    watcher.start(stdout, stderr)
    watcher.stop()
    lines = out.getvalue().splitlines()
    assert "bpcp: a: published (1 of 1 jobs done)" not in lines
    assert "bpcp: 0 of 1 jobs already published, 1 to run" in lines
    assert "parallel: Warning: something" in lines and "bpcp: 1 of 1 jobs published in /x/published" in lines
    assert [l for l in lines if l.startswith("bpcp: a published (4 image sets")]


class Closed(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_output_or_a_progress_error_never_stops_the_run(tmp_path):
    """`bpcp run | head`: the output breaks, jobs.sh's lines go on being read (else it would
    block on a full pipe), nothing is raised. A failure to read the progress is one line."""
    root = make_run(tmp_path / "run", {"a": 4})
    watcher = Watcher(root, 1, live=True, display=Display(live=True, out=Closed(), err=Closed(), width=lambda: 80))
    stdout = io.StringIO("".join(f"bpcp: line {i}\n" for i in range(10_000)))
    watcher.start(stdout, None)
    watcher.stop()
    assert stdout.tell() == len(stdout.getvalue())              # read to the end

    out = io.StringIO()
    watcher = Watcher(root, 1, live=False, display=Display(live=False, out=out, err=out))

    def unreadable():
        raise PermissionError(13, "Permission denied", str(root / "published"))

    watcher.monitor.reader.read = unreadable
    watcher.start(io.StringIO("bpcp: 0 of 1 jobs already published, 1 to run\n"), None)
    watcher.stop()
    lines = out.getvalue().splitlines()
    assert [l for l in lines if "progress not shown" in l] == [
        f"bpcp: progress not shown any more (PermissionError: [Errno 13] Permission denied: '{root / 'published'}'); "
        "the jobs go on"]
    assert "bpcp: 0 of 1 jobs already published, 1 to run" in lines


# ----------------------------------------------------------------------------- run.yml's follower
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_follow_returns_on_a_new_progress_line_on_the_end_or_after_its_time(tmp_path):
    log, job = tmp_path / "run.log", tmp_path / "job"
    job.write_text(json.dumps({"started": True, "finished": False, "ansible_job_id": "1"}))
    log.write_text("bpcp: planned 2 jobs\n")
    clock = Clock()
    assert follow(log, job, 60, clock, clock.sleep) == ("", False)
    assert clock.now == 60                                           # waited its minute, bounded

    def wall() -> float:                                             # the log was last written a minute ago
        return log.stat().st_mtime + 60

    line = "bpcp: a published (4 image sets, 8 s): 4/8 image sets done, 0 failed; elapsed 9 s; ETA 8 s"

    def sleep_then_publish(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now >= 65:
            log.write_text(log.read_text() + line + "\nbpcp: x: FAILED on h: no\n")

    assert follow(log, job, 60, clock, sleep_then_publish, wall) == (line, False)
    assert clock.now == 65
    # a line already there when follow starts: shown at once when the log has just been written,
    # else only once something new comes (here: nothing, so after its minute)
    assert follow(log, job, 60, clock, clock.sleep, wall=lambda: log.stat().st_mtime + 1) == (line, False)
    assert clock.now == 65
    assert follow(log, job, 60, clock, clock.sleep, wall) == (line, False)
    assert clock.now == 125
    job.write_text(json.dumps({"rc": 0, "changed": True}))          # the async job's result: it ended
    assert follow(log, job, 60, clock, clock.sleep, wall) == (line, True)
    assert clock.now == 125


def test_follow_command_exit_status(tmp_path):
    log, job = tmp_path / "run.log", tmp_path / "job"
    log.write_text("bpcp: 16/16 image sets done, 0 failed (2 of 2 jobs); elapsed 40 s\n")
    job.write_text(json.dumps({"rc": 0}))
    proc = subprocess.run([sys.executable, "-m", "bpcp.jobs.progress", "follow", str(log), "--job-file", str(job)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "bpcp: 16/16 image sets done, 0 failed (2 of 2 jobs); elapsed 40 s\n"
    job.write_text(json.dumps({"started": True, "finished": False}))
    proc = subprocess.run([sys.executable, "-m", "bpcp.jobs.progress", "follow", str(log), "--job-file", str(job),
                           "--seconds", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == progress.RUNNING and proc.stdout.startswith("bpcp: 16/16 image sets done")


def test_jobs_sh_leaves_the_progress_to_bpcp(tmp_path):
    """No GNU parallel --eta (a job count, interleaved with the job lines) in any jobs.sh, even
    run by hand on a terminal: `bpcp run` shows the progress in image sets."""
    from test_render import plan

    from bpcp.jobs.render import RunSettings, render_script

    for multihost in (False, True):
        text = render_script(plan(), tmp_path / "run", RunSettings(), multihost)
        assert "--eta" not in text and "--bar" not in text and "--progress" not in text


# ----------------------------------------------------------------------------- a real terminal
@pytest.mark.cellprofiler
@pytest.mark.slow
def test_bpcp_run_in_a_terminal_shows_one_progress_line(example_plate, cp_venv, tmp_path):
    """`bpcp run` in tmux: while it runs and at its end, the screen holds exactly one progress
    line in image sets; no GNU parallel ETA and no per-job lines."""
    tmux = shutil.which("tmux")
    require("tmux", tmux, "no tmux (apt-get install -y tmux)")
    sock = tmp_path / "tmux.sock"
    run = tmp_path / "run"
    bpcp = Path(sys.executable).parent / "bpcp"
    command = (f"{bpcp} run -d {example_plate / 'load_data.csv'} -p {example_plate / 'example_loaddata.cppipe'} "
               f"-o {run} --cellprofiler {cp_venv} --bundle 4 --slots 2 --jobs 2; echo BPCP_EXIT=$?; sleep 3600")
    subprocess.run([tmux, "-S", str(sock), "new-session", "-d", "-x", "200", "-y", "50", f"cd {ROOT} && {command}"],
                   check=True, timeout=60)
    pattern = re.compile(r"^bpcp: (\d+)/16 image sets done, (\d+) failed \((\d) of 4 jobs\)")
    screens = []
    try:
        for _ in range(900):                                   # bounded: 15 minutes at most
            screen = subprocess.run([tmux, "-S", str(sock), "capture-pane", "-p"], capture_output=True, text=True,
                                    timeout=60).stdout
            screens.append(screen)
            if "BPCP_EXIT=" in screen:
                break
            time.sleep(1)
    finally:
        subprocess.run([tmux, "-S", str(sock), "kill-server"], capture_output=True, timeout=60)
    last = screens[-1]
    assert "BPCP_EXIT=0" in last, last
    for screen in screens:
        assert len([l for l in screen.splitlines() if pattern.match(l)]) <= 1, screen
        assert "jobs done)" not in screen and "ETA:" not in screen and "Computers / CPU cores" not in screen, screen
    final = [l for l in last.splitlines() if pattern.match(l)]
    assert len(final) == 1 and final[0].startswith("bpcp: 16/16 image sets done, 0 failed (4 of 4 jobs)"), last
    # it was live: the line was on the screen before the end, counting up
    during = [pattern.match(l) for s in screens[:-1] for l in s.splitlines() if pattern.match(l)]
    assert during and int(during[0].group(1)) < 16, screens[:3]
    assert "elapsed" in final[0]
