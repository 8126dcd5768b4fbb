"""The run folder every command shares (docs/run-folder.md): its names, writing files into it so
that a reader never sees half of one, and the lock one command holds while it changes the folder.
Imports nothing of bpcp but its error type: every stage may use it."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bpcp.errors import BpcpError

LOCK = ".bpcp.lock"
_held: dict[str, int] = {}       # run folders this process holds, and how deeply


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def jobs_script(self) -> Path:
        return self.root / "jobs.sh"

    @property
    def joblist(self) -> Path:
        return self.root / "joblist.tsv"

    @property
    def joblog(self) -> Path:
        return self.root / "joblog.tsv"

    def pipeline_copy(self, suffix: str) -> Path:
        return self.root / f"pipeline{suffix}"

    def published(self, job: str | None = None) -> Path:
        return self.root / "published" / job if job else self.root / "published"

    def failed(self, job: str | None = None) -> Path:
        return self.root / "failed" / job if job else self.root / "failed"

    def work(self, job: str | None = None) -> Path:
        return self.root / "work" / job if job else self.root / "work"

    @property
    def merged(self) -> Path:
        return self.root / "merged"


def write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary sibling, then rename it over path: readers never see half a file,
    and two writers never share a temporary name. On any error the temporary file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())       # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not exc.filename:
            raise OSError(exc.errno, exc.strerror, str(path)) from None   # a full disk names no file
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def hold(run: RunFolder, command: str, wait: bool = False, timeout: float = 24 * 3600) -> Iterator[None]:
    """Hold the run folder for one command: a second `bpcp run` (or plan, merge) on the same folder
    is told which process has it, instead of both writing the same files. Re-entrant per process."""
    key = str(run.root)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    created = not run.root.exists()
    try:
        run.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(run.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        # Not a folder we can write: nothing to hold, and the command's own checks say so in one line.
        yield
        return
    try:
        deadline, said = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            holder = _holder(fd)
            if not wait or time.monotonic() > deadline:
                raise BpcpError(f"{run.root}: in use by {holder}; wait for it to end (or pass --wait), "
                                "or stop it and run the same command again") from None
            if not said:
                print(f"bpcp: {run.root}: in use by {holder}; waiting for it to end", file=sys.stderr, flush=True)
                said = True
            time.sleep(1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                  "argv": sys.argv, "since": time.time()}).encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            if created and os.listdir(run.root) == [LOCK]:    # refused before writing: leave no folder
                os.unlink(run.root / LOCK)
                os.rmdir(run.root)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        doc = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%H:%M:%S", time.localtime(doc["since"]))
        return f"{doc['command']} (process {doc['pid']} on {doc['host']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another bpcp command"
