"""Progress of a run in image sets, read from the run folder while jobs.sh runs.

The run folder is the truth (docs/run-folder.md), not GNU parallel's output: joblist.tsv lists
every job and its image sets, published/<job>/bpcp-job.json says when and how long a job ran,
failed/<job>/ which failed, joblog.tsv when each attempt ended. `Watcher` reads them once a
second beside jobs.sh and owns the output:

- on a terminal, one live line (image sets done/failed/total, rate, elapsed, ETA) redrawn in
  place; every other line of jobs.sh (failures, warnings) is printed above it;
- elsewhere (logs, CI, run.yml's run.log), a summary at the start, one line per published job and
  a summary when nothing was said for a minute; the runner's own FAILED lines stay the line of a
  failed job.

The runner says "bpcp: <job>: published (N of M jobs done)" for every job; those lines are
dropped here (they count jobs, not image sets) and trigger a read of the run folder, so the
line that replaces them comes at once.

The ETA replays GNU parallel's schedule: jobs start in joblist order, the first one per slot at
the start and each further one when an attempt ends; a job takes the seconds per image set
measured on the jobs published so far. The arithmetic (`eta_seconds`, `measure`) and the wording
(`progress_line`, `job_line`) are pure.

`python -m bpcp.jobs.progress follow RUN_LOG --job-file F` waits up to a minute for a new
progress line in a run.log and prints the latest (run.yml polls it while `bpcp run` goes on).
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bpcp.results.joblog import read_joblog

TICK = 1.0                 # seconds between reads of the run folder
SUMMARY_EVERY = 60.0       # off a terminal: a summary when nothing was said for this long
RUNNER_PUBLISHED = re.compile(r"^bpcp: (\S+): published \(\d+ of \S+ jobs done\)$")
PROGRESS = re.compile(r"^bpcp: .*?(\d+)/(\d+) image sets done, (\d+) failed")


# ----------------------------------------------------------------------------- the run folder
@dataclass(frozen=True)
class Ended:
    """A published job: its image sets and, from bpcp-job.json, how long it ran and when it ended."""
    image_sets: int
    seconds: float | None = None
    finished: float | None = None


@dataclass(frozen=True)
class RunState:
    jobs: tuple[tuple[str, int], ...]          # joblist.tsv: (id, image sets), in start order
    published: dict[str, Ended]
    failed: frozenset[str]                     # in failed/ and not published
    ends: tuple[float, ...] = ()               # when each attempt in joblog.tsv ended, sorted


def read_joblist(path: Path) -> tuple[tuple[str, int], ...]:
    jobs = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ()
    for line in lines:
        job, _, sets = line.partition("\t")
        if job and sets.strip().isdigit():
            jobs.append((job, int(sets)))
    return tuple(jobs)


def _names(folder: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")}
    except OSError:
        return set()


def read_record(folder: Path, image_sets: int) -> Ended:
    try:
        doc = json.loads((folder / "bpcp-job.json").read_text())
        started, finished = float(doc["started"]), float(doc["finished"])
        return Ended(int(doc.get("image_sets") or image_sets), max(0.0, finished - started), finished)
    except (OSError, ValueError, KeyError, TypeError):
        return Ended(image_sets)


class Reader:
    """Reads a RunState, opening only what changed: new published jobs, a grown joblog."""

    def __init__(self, root: Path):
        self.root = root
        self.records: dict[str, Ended] = {}
        self.joblog_size = -1
        self.ends: tuple[float, ...] = ()
        self.joblist_mtime = -1.0
        self.jobs: tuple[tuple[str, int], ...] = ()

    def read(self) -> RunState:
        try:
            mtime = (self.root / "joblist.tsv").stat().st_mtime
        except OSError:
            mtime = -1.0
        if mtime != self.joblist_mtime:
            self.joblist_mtime, self.jobs = mtime, read_joblist(self.root / "joblist.tsv")
        sizes = dict(self.jobs)
        published = _names(self.root / "published") & sizes.keys()
        for job in published - self.records.keys():
            self.records[job] = read_record(self.root / "published" / job, sizes[job])
        for job in self.records.keys() - published:
            del self.records[job]
        failed = frozenset((_names(self.root / "failed") & sizes.keys()) - published)
        try:
            size = (self.root / "joblog.tsv").stat().st_size
        except OSError:
            size = 0
        if size != self.joblog_size:
            self.joblog_size = size
            self.ends = tuple(sorted(a.end for a in read_joblog(self.root / "joblog.tsv")[0]))
        return RunState(self.jobs, dict(self.records), failed, self.ends)


# ----------------------------------------------------------------------------- arithmetic (pure)
@dataclass(frozen=True)
class Progress:
    sets_done: int
    sets_failed: int
    sets_total: int
    jobs_done: int
    jobs_failed: int
    jobs_total: int
    elapsed: float
    rate: float | None          # image sets per second in this session; None before the first
    eta: float | None           # seconds to the end; None while nothing has been measured

    @property
    def left(self) -> int:
        return self.jobs_total - self.jobs_done - self.jobs_failed


def seconds_per_image_set(ended: Iterable[Ended]) -> float | None:
    """Measured job time over image sets, all jobs together (start-up included)."""
    seconds = sets = 0.0
    for e in ended:
        if e.seconds is not None and e.image_sets > 0:
            seconds, sets = seconds + e.seconds, sets + e.image_sets
    return seconds / sets if sets else None


def eta_seconds(now: float, started: float, slots: int, per_set: float | None,
                queue: Sequence[tuple[str, int]], ended: Collection[str], ends: Sequence[float]) -> float | None:
    """Seconds until the last job of the queue ends, GNU parallel's schedule replayed.

    queue: this session's jobs (id, image sets) in the order they start; ended: those published
    or failed; ends: when this session's attempts ended, sorted. Job i of the queue started at
    `started` when i < slots, else when attempt i - slots ended (it took that slot); a job takes
    per_set seconds per image set, less what a running one has already run.
    """
    if per_set is None:
        return None
    slots = max(1, slots)
    busy: list[float] = []             # when each busy slot frees up
    waiting: list[float] = []          # predicted seconds of jobs not started
    for i, (job, sets) in enumerate(queue):
        if job in ended:
            continue
        start = started if i < slots else ends[i - slots] if i - slots < len(ends) else None
        if start is None:
            waiting.append(per_set * sets)
        else:
            busy.append(now + max(0.0, per_set * sets - (now - start)))
    free = sorted(busy) + [now] * max(0, slots - len(busy))
    heapq.heapify(free)
    for seconds in waiting:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(max(free) - now, 0.0) if busy or waiting else 0.0


def measure(state: RunState, started: float, now: float, slots: int,
            queue: Sequence[tuple[str, int]]) -> Progress:
    """Where the run stands: counts in image sets and jobs, rate and ETA of this session."""
    sizes = dict(state.jobs)
    done_sets = sum(sizes[j] for j in state.published)
    queued = {j for j, _ in queue}
    session = [e for j, e in state.published.items() if j in queued]
    this_session = sum(e.image_sets for e in session)
    elapsed = max(0.0, now - started)
    per_set = seconds_per_image_set(session) or seconds_per_image_set(state.published.values())
    ended = set(state.published) | state.failed
    ends = [t for t in state.ends if t >= started - 1.0]
    return Progress(
        sets_done=done_sets, sets_failed=sum(sizes[j] for j in state.failed), sets_total=sum(sizes.values()),
        jobs_done=len(state.published), jobs_failed=len(state.failed), jobs_total=len(state.jobs),
        elapsed=elapsed, rate=this_session / elapsed if this_session and elapsed > 0 else None,
        eta=eta_seconds(now, started, slots, per_set, queue, ended, ends))


# ----------------------------------------------------------------------------- wording (pure)
def duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def rate_text(per_second: float | None) -> str:
    if per_second is None:
        return ""
    if per_second >= 1:
        return f"{per_second:.1f} image sets/s"
    if per_second * 60 >= 1:
        return f"{per_second * 60:.1f} image sets/min"
    return f"{per_second * 3600:.1f} image sets/h"


def _tail(p: Progress) -> str:
    parts = [rate_text(p.rate), f"elapsed {duration(p.elapsed)}"]
    if p.left == 0:
        pass
    elif p.eta is None:
        parts.append("ETA after the first job")
    elif p.eta < 1:
        parts.append("ETA soon")
    else:
        parts.append(f"ETA {duration(p.eta)}")
    return "; ".join(x for x in parts if x)


def counts(p: Progress) -> str:
    return f"{p.sets_done}/{p.sets_total} image sets done, {p.sets_failed} failed"


def progress_line(p: Progress) -> str:
    """The live line and the summary line."""
    return f"bpcp: {counts(p)} ({p.jobs_done} of {p.jobs_total} jobs); {_tail(p)}"


def job_line(job: str, e: Ended, p: Progress) -> str:
    """The line of one published job, off a terminal."""
    took = f", {duration(e.seconds)}" if e.seconds is not None else ""
    return f"bpcp: {job} published ({e.image_sets} image sets{took}): {counts(p)}; {_tail(p)}"


def fit(line: str, width: int) -> str:
    """A live line must never wrap: \\r would then redraw only its last row."""
    return line if len(line) < width else line[:max(1, width - 4)] + "..."


# ----------------------------------------------------------------------------- output
def terminal_width() -> int:
    """The terminal's own width (as it is now: windows get resized), not $COLUMNS of whoever started us."""
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return shutil.get_terminal_size().columns


class Display:
    """Lines go above the live line on a terminal; off one they are simply printed. An output
    that breaks (a closed pipe) is given up, never raised: jobs.sh's output must go on draining."""

    def __init__(self, live: bool, out: IO[str] | None = None, err: IO[str] | None = None,
                 width: Callable[[], int] = terminal_width):
        self.live, self.width = live, width
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.status = ""
        self.lock = threading.RLock()
        self.broken: set[int] = set()

    def _write(self, stream: IO[str], text: str) -> None:
        if id(stream) in self.broken:
            return
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            self.broken.add(id(stream))

    def say(self, line: str, stderr: bool = False) -> None:
        with self.lock:
            if self.live and self.status:
                self._write(self.out, "\r\x1b[K")
            self._write(self.err if stderr else self.out, line + "\n")
            self._draw()

    def show(self, status: str) -> None:
        with self.lock:
            self.status = status
            self._draw()

    def _draw(self) -> None:
        if self.live and self.status:
            self._write(self.out, "\r" + fit(self.status, self.width()) + "\x1b[K")

    def close(self) -> None:
        """Leave the live line on the screen as the last line."""
        with self.lock:
            if self.live and self.status:
                self._write(self.out, "\n")
            self.status = ""


@dataclass
class Monitor:
    """Turns successive reads of the run folder into lines; `poll` takes the clock as an argument."""
    reader: Reader
    display: Display
    slots: int
    started: float
    queue: tuple[tuple[str, int], ...] = ()
    seen: set[str] = field(default_factory=set)
    said: float | None = None              # when the last line was said (off a terminal)
    last_counts: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(cls, root: Path, slots: int, display: Display, now: float) -> Monitor:
        reader = Reader(root)
        first = reader.read()
        queue = tuple((j, n) for j, n in first.jobs if j not in first.published)
        return cls(reader, display, slots, now, queue, set(first.published))

    def poll(self, now: float, final: bool = False) -> Progress:
        with self.lock:
            state = self.reader.read()
            p = measure(state, self.started, now, self.slots, self.queue)
            new = sorted((j for j in state.published if j not in self.seen),
                         key=lambda j: state.published[j].finished or now)
            self.seen.update(new)
            if self.display.live:
                self.display.show(progress_line(p))
                return p
            if self.said is None:                       # the first line: where the run starts from
                self._say(progress_line(p), p, now)
            for job in new:
                self._say(job_line(job, state.published[job], p), p, now)
            quiet = self.said is not None and now - self.said >= SUMMARY_EVERY
            if (quiet and p.left) or (final and counts(p) != self.last_counts):
                self._say(progress_line(p), p, now)
            return p

    def _say(self, line: str, p: Progress, now: float) -> None:
        self.display.say(line)
        self.said, self.last_counts = now, counts(p)


class Watcher:
    """Beside a running jobs.sh: forwards its output (less the runner's job-count lines) and
    keeps the progress, reading the run folder every TICK seconds."""

    def __init__(self, root: Path, slots: int, live: bool, display: Display | None = None):
        self.display = display or Display(live)
        self.monitor = Monitor.start(root, slots, self.display, time.time())
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.failed = False

    def poll(self, final: bool = False) -> None:
        """The progress is a view of the run: if reading it fails, say so once and let the run go on."""
        if self.failed:
            return
        try:
            self.monitor.poll(time.time(), final)
        except Exception as exc:  # a view of the run must never end it, nor print a traceback
            self.failed = True
            self.display.status = ""
            self.display.say(f"bpcp: progress not shown any more ({type(exc).__name__}: {exc}); the jobs go on",
                             stderr=True)

    def start(self, stdout: IO[str] | None, stderr: IO[str] | None) -> None:
        self.poll()
        for stream, is_err in ((stdout, False), (stderr, True)):
            if stream is not None:
                self.threads.append(threading.Thread(target=self._forward, args=(stream, is_err), daemon=True))
        self.ticker = threading.Thread(target=self._tick, daemon=True)
        for t in [*self.threads, self.ticker]:
            t.start()

    def forward(self, stream: IO[str], is_err: bool = True) -> None:
        """Another process's lines (the S3 uploader's) printed like jobs.sh's, until it ends."""
        thread = threading.Thread(target=self._forward, args=(stream, is_err), daemon=True)
        self.threads.append(thread)
        thread.start()

    def _forward(self, stream: IO[str], is_err: bool) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            if RUNNER_PUBLISHED.match(line):
                self.poll()
            else:
                self.display.say(line, stderr=is_err)

    def _tick(self) -> None:
        while not self.stopping.wait(TICK):
            self.poll()

    def stop(self) -> None:
        """After jobs.sh ended: its last lines, the last progress line."""
        for t in self.threads:
            t.join(timeout=10)       # a grandchild holding the pipe open must not hang the run
        self.stopping.set()
        self.ticker.join(timeout=10)
        self.poll(final=True)
        self.display.close()


# ----------------------------------------------------------------------------- run.yml
def latest_progress(log: Path) -> str:
    """The last progress line of a run.log ("" when there is none yet); reads its end only."""
    try:
        with open(log, "rb") as fd:
            fd.seek(max(0, os.fstat(fd.fileno()).st_size - 65536))
            text = fd.read().decode(errors="replace")
    except OSError:
        return ""
    for line in reversed(text.splitlines()):
        if PROGRESS.match(line):
            return line
    return ""


def job_ended(results_file: Path) -> bool:
    """Whether the Ansible async job writing this results file has ended (async_status's test:
    the file no longer says "started")."""
    try:
        return "started" not in json.loads(results_file.read_text())
    except (OSError, ValueError):
        return False


FRESH = 3.0      # seconds: a log written this recently may hold a line the last follow did not see


def follow(log: Path, results_file: Path, seconds: float, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep, wall: Callable[[], float] = time.time) -> tuple[str, bool]:
    """Wait until the latest progress line of the log changes, the job ends, or seconds pass;
    return the latest line and whether the job has ended. A log written in the last FRESH
    seconds returns at once: its newest line may have come while the previous call returned
    (run.yml shows each line once, so an early return costs nothing)."""
    first = latest_progress(log)
    try:
        if first and wall() - log.stat().st_mtime < FRESH:
            return first, job_ended(results_file)
    except OSError:
        pass
    deadline = clock() + seconds
    while True:
        ended = job_ended(results_file)
        line = latest_progress(log)
        if ended or line != first or clock() >= deadline:
            return line, ended
        sleep(TICK)


RUNNING = 75     # follow's exit status while the job still runs (EX_TEMPFAIL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpcp.jobs.progress",
                                     description="print the latest progress line of a bpcp run log")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("follow", help=f"wait for a new progress line; exit 0 once the job ended, {RUNNING} before")
    p.add_argument("log", type=Path, help="the run.log `bpcp run` writes")
    p.add_argument("--job-file", type=Path, required=True, help="the Ansible async job's results_file")
    p.add_argument("--seconds", type=float, default=SUMMARY_EVERY, help="wait at most this long (default 60)")
    args = parser.parse_args(argv)
    line, ended = follow(args.log, args.job_file, max(0.0, args.seconds))
    print(line or f"bpcp: starting; tail -f {args.log} shows every line", flush=True)
    return 0 if ended else RUNNING


if __name__ == "__main__":
    sys.exit(main())
