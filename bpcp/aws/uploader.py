"""One long-lived uploader per run: each published job to `--s3-output` soon after it appears.

The engine (bpcp.jobs.execute, for every engine) starts `python -m bpcp.aws.uploader RUN_DIR URL`
beside the jobs with a pipe on its stdin (`Background`). It lists published/ every POLL seconds and
uploads each job not uploaded yet, or whose content changed, THREADS jobs at a time through one
boto3 client (bpcp.aws.client: its retries and its error line) and one s3transfer manager (big
files in parts): every file of the job, bpcp-job.json last, so a job whose bpcp-job.json is on S3
is complete there. Each job that went up gets a line in the run folder's s3-uploaded.jsonl
(`Uploaded`), so a restarted uploader, a resume and the run's final pass skip the jobs already
there and upload again any whose bpcp-manifest.json changed (a job rerun after a merge found it
damaged).

It stops by itself: when its stdin closes (the run ended, or the process that started it died)
it lists published/ once more, uploads what is left and exits 0, or 1 naming what did not go
up (the final pass, bpcp.aws.mirror.finish, tries those again and fails the run if they still do
not); SIGTERM (Ctrl-C of the run) ends it sooner: the jobs under way finish and are recorded,
the rest waits for the next run. No credential is written anywhere.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from bpcp.aws import client as aws
from bpcp.aws import s3
from bpcp.errors import BpcpError
from bpcp.runfolder import RunFolder

MARKER = "bpcp-job.json"         # uploaded last: its presence on S3 means the job is all there
MANIFEST = "bpcp-manifest.json"
RECORD = "s3-uploaded.jsonl"
THREADS = 16                     # jobs uploading at once (and the transfer manager's request threads)
POLL = 0.5                       # seconds between listings of published/
SAID_FAILURES = 5                # failure lines printed as they happen; the rest are counted


@dataclass(frozen=True)
class Uploaded:
    """One line of s3-uploaded.jsonl: a published job that is all there under `url`."""
    job: str
    url: str          # the --s3-output prefix, without a trailing /
    digest: str       # digest() of the job's folder when it went up
    files: int
    bytes: int
    uploaded: float   # epoch seconds

    @classmethod
    def parse(cls, line: str) -> Uploaded | None:
        try:
            doc = json.loads(line)
            return cls(str(doc["job"]), str(doc["url"]), str(doc["digest"]), int(doc["files"]), int(doc["bytes"]),
                       float(doc["uploaded"]))
        except (ValueError, KeyError, TypeError):
            return None          # a line cut short by a crash: that job is simply uploaded again


def prefix_text(url: str) -> str:
    return url.rstrip("/")


def read_uploaded(run: RunFolder, url: str) -> dict[str, Uploaded]:
    """The jobs recorded as uploaded to url (the last line of a job wins)."""
    try:
        text = (run.root / RECORD).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    found = {}
    for line in text.splitlines():
        rec = Uploaded.parse(line)
        if rec is not None and rec.url == prefix_text(url):
            found[rec.job] = rec
    return found


class Record:
    """Appends to s3-uploaded.jsonl: one whole line per write (O_APPEND), from any thread. A line
    a crash cut short is ended first, so it spoils no later line."""

    def __init__(self, run: RunFolder):
        self.path = run.root / RECORD
        self.lock = threading.Lock()
        self.checked = False

    def add(self, rec: Uploaded) -> None:
        line = (json.dumps(asdict(rec), sort_keys=True) + "\n").encode()
        with self.lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if not self.checked:
                    size = os.fstat(fd).st_size
                    if size and os.pread(fd, 1, size - 1) != b"\n":
                        line = b"\n" + line
                    self.checked = True
                os.write(fd, line)
            finally:
                os.close(fd)


def digest(folder: Path) -> str:
    """What a job's content is: the sha256 of its manifest (which holds every file's sha256), or,
    for a job published before manifests, of its file names and sizes."""
    manifest = folder / MANIFEST
    h = hashlib.sha256()
    if manifest.is_file():
        h.update(manifest.read_bytes())
        return "manifest:" + h.hexdigest()
    for rel, size in sorted(file_sizes(folder).items()):
        h.update(f"{rel}\t{size}\n".encode())
    return "sizes:" + h.hexdigest()


def file_sizes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def published_names(run: RunFolder) -> list[str]:
    """Job folders of published/ (dot names are a resume's downloads under way)."""
    try:
        with os.scandir(run.published()) as entries:
            return [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]
    except FileNotFoundError:
        return []


@dataclass
class Outcome:
    uploaded: list[str] = field(default_factory=list)
    skipped: int = 0                                         # recorded as there already
    failed: dict[str, str] = field(default_factory=dict)    # job -> one line
    seconds: float = 0.0


class Uploader:
    """Published jobs of one run folder to one prefix, with one client and one transfer manager."""

    def __init__(self, run: RunFolder, url: str, client: Any = None, threads: int = THREADS,
                 say: Callable[[str], None] | None = None):
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        self.run, self.url = run, s3.parse_url(prefix_text(url), "--s3-output", need_key=False)
        self.text = prefix_text(str(self.url))
        self.client = client or aws.client("s3")
        config = TransferConfig(max_concurrency=threads, use_threads=True)
        self.manager = create_transfer_manager(self.client, config)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="bpcp-upload")
        self.record = Record(run)
        self._say = say or _to_stderr
        self._said = threading.Lock()
        self.outcome = Outcome()
        self.lock = threading.Lock()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.manager.shutdown()

    def __enter__(self) -> Uploader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def needs_upload(self, job: str, known: dict[str, Uploaded]) -> bool:
        rec = known.get(job)
        try:
            return rec is None or rec.digest != digest(self.run.published(job))
        except OSError:
            return True        # gone or unreadable: upload_job says why

    def upload_job(self, job: str) -> Uploaded:
        """Every file of published/<job>/ to <prefix>/published/<job>/, bpcp-job.json last; recorded."""
        folder = self.run.published(job)
        stamp = digest(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        first = [p for p in files if p.relative_to(folder).as_posix() != MARKER]
        last = [p for p in files if p.relative_to(folder).as_posix() == MARKER]
        for batch in (first, last):
            sent = [(p, self.url.child("published", job, p.relative_to(folder).as_posix())) for p in batch]
            futures = [(key, self.manager.upload(str(p), key.bucket, key.key)) for p, key in sent]
            for key, future in futures:      # every one waited for, the first failure raised
                aws.call(future.result, str(key), aws.S3_WRITE)
        rec = Uploaded(job, self.text, stamp, len(files), sum(p.stat().st_size for p in files), time.time())
        self.record.add(rec)
        return rec

    def _one(self, job: str) -> None:
        try:
            self.upload_job(job)
        except BpcpError as exc:
            self._failed(job, exc.lines[0])
        except OSError as exc:
            self._failed(job, f"{exc.filename or self.run.published(job)}: {exc.strerror or exc}")
        except Exception as exc:  # one line per job, never a traceback that ends the other uploads
            self._failed(job, f"{type(exc).__name__}: {exc}")
        else:
            with self.lock:
                self.outcome.uploaded.append(job)

    def say(self, line: str) -> None:
        """One line, never interleaved with another thread's (print writes a line and its end apart)."""
        with self._said:
            self._say(line)

    def _failed(self, job: str, line: str) -> None:
        with self.lock:
            self.outcome.failed[job] = line
            count = len(self.outcome.failed)
        if count <= SAID_FAILURES:
            self.say(f"bpcp: {job}: not copied to {self.text}: {line}")

    def submit(self, jobs: Iterable[str]) -> list[Future]:
        return [self.pool.submit(self._one, job) for job in jobs]

    def upload_all(self, jobs: Iterable[str]) -> Outcome:
        """These jobs now (the final pass), THREADS at a time."""
        started = time.monotonic()
        for future in self.submit(jobs):
            future.result()
        self.outcome.seconds += time.monotonic() - started
        return self.outcome

    def watch(self, ended: threading.Event, stop: threading.Event, poll: float = POLL) -> Outcome:
        """Upload each job as it appears in published/ until `ended` (then: what is left) or `stop`
        (then: only the jobs under way)."""
        started = time.monotonic()
        known = read_uploaded(self.run, self.text)
        seen: set[str] = set()
        futures: list[Future] = []
        while not stop.is_set():
            last = ended.is_set()
            new = [job for job in published_names(self.run) if job not in seen]
            seen.update(new)
            todo = [job for job in new if self.needs_upload(job, known)]
            self.outcome.skipped += len(new) - len(todo)
            futures = [f for f in futures if not f.done()] + self.submit(todo)
            if last:
                if futures:
                    self.say(f"bpcp: {self.text}: copying the last {len(futures)} published jobs there")
                break
            ended.wait(poll)
        while futures:                   # the jobs left; on stop only those under way
            if stop.is_set():
                for future in futures:
                    future.cancel()
            futures = [f for f in wait(futures, timeout=poll).not_done if not f.cancelled()]
        self.outcome.seconds = time.monotonic() - started
        return self.outcome


def failure_line(failed: dict[str, str], url: str, run: RunFolder) -> str:
    """One line for jobs that did not upload: how many, which, the first reason, what to do."""
    names = sorted(failed)
    which = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"{len(names)} published jobs were not copied to {url} ({which}): {failed[names[0]]}; "
            f"fix that, then `bpcp merge --output {run.root} --s3-output {url}` copies what is missing")


def _to_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------- the process

class Background:
    """The uploader process beside an engine. `finish()` when the jobs ended (it uploads what is
    left, then exits), `stop()` on an interruption (it finishes the jobs under way)."""

    def __init__(self, run_dir: Path, url: str, forward: Callable[[IO[str]], None] | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bpcp.aws.uploader", str(run_dir), url], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if forward else None, stderr=subprocess.STDOUT if forward else None,
            text=True, errors="replace", start_new_session=True)     # Ctrl-C reaches bpcp, which stops it
        if forward and self.proc.stdout is not None:
            forward(self.proc.stdout)

    def finish(self) -> int:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        return self.proc.wait()

    def stop(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        return self.finish()


@contextlib.contextmanager
def uploading(run_dir: Path, url: str, forward: Callable[[IO[str]], None] | None = None) -> Iterator[None]:
    """The uploader running for the block (nothing when url is ''): drained at its normal end,
    stopped when it raises."""
    if not url:
        yield
        return
    up = Background(run_dir, url, forward)
    try:
        yield
        up.finish()
    except BaseException:     # also a Ctrl-C while it uploads the last jobs
        up.stop()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpcp.aws.uploader",
                                     description="Copy a run folder's published jobs to an S3 prefix as they appear, "
                                                 "until stdin closes.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("url", help="s3://bucket/prefix (--s3-output)")
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args(argv)
    ended, stop = threading.Event(), threading.Event()

    def wait_for_eof() -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdin.buffer.read()
        ended.set()

    def terminate(_signum: int, _frame: object) -> None:
        stop.set()
        ended.set()

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    threading.Thread(target=wait_for_eof, daemon=True).start()
    run = RunFolder(args.run_dir.resolve())
    try:
        with Uploader(run, args.url, threads=args.threads) as up:
            outcome = up.watch(ended, stop)
    except BpcpError as exc:
        print(f"bpcp: error: {exc.lines[0]}", file=sys.stderr)
        return 2
    n = len(outcome.uploaded)
    if not n and not outcome.failed:
        return 0
    rate = f" ({n / outcome.seconds:.1f} jobs/s while it ran)" if n and outcome.seconds > 0 else ""
    failed = f", {len(outcome.failed)} not (the end of the run tries those again)" if outcome.failed else ""
    print(f"bpcp: {up.text}: {n} published jobs copied there by the uploader{rate}{failed}", flush=True)
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
