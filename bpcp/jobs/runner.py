"""The job runner: runs one job of a plan from start to end. Every engine calls it.

    python3 bpcp_runner.py run --run-dir RUN JOB_ID [--image-sets N]
    python3 bpcp_runner.py collect --run-dir RUN        publish what remote workers returned
    python3 bpcp_runner.py reclaim --run-dir RUN        remove temp folders of dead attempts
    python3 bpcp_runner.py command --run-dir RUN JOB_ID print the CellProfiler command (JSON)
    python3 bpcp_runner.py measure --run-dir RUN JOB_ID --out DIR -- WRAPPER...
                                                        run it under a wrapper (bpcp profile)
    python3 bpcp_runner.py stop-workers --run-dir RUN   end this host's warm workers of the run

Standard library only (botocore is imported only when a job downloads from S3), Python 3.9 or
newer: `bpcp render` copies this file into the run folder beside runner.json (the run's settings),
and GNU parallel ships both to remote workers with each job's stage folder, so workers need no
bpcp install. This is also the one place the CellProfiler command is built (`cellprofiler_argv`,
`job_environment`): `bpcp profile`, playbooks/profile.yml and the massif helper take it from here.

One attempt of a job:
1. lock work/<id>/lock (flock; one attempt at a time; CellProfiler inherits the lock, so one
   orphaned by a killed run keeps it until it ends) and clear what an earlier attempt left,
   including its temp folder on the RAM disk;
2. inputs: the job's LoadData CSV or file list (from stage/<id>/ on a worker), S3 objects of its
   fetch list downloaded into the temp folder;
3. CellProfiler, one thread, output in work/<id>/out, temp on the RAM disk when mounted: a fresh
   `cellprofiler -c -r` process, or (warm_workers) the same argv handed to this slot's warm worker,
   a resident CellProfiler that has paid its imports and JVM once (see "warm workers" below);
4. judged from the done file, every expected table and the Image table's rows (exit codes lie);
5. bpcp-job.json, then bpcp-manifest.json (size, sha256 of every file; rows of every table)
   written last; then published/<id> by one rename, or left for the controller to collect when
   the worker does not share the run folder. A failure leaves failed/<id>/ with the log and one
   line naming the cause.
Exit status: 0 when the job is published (now or before), 1 when it failed, 2 on bad usage.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import fcntl
import gc
import glob
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import typing
import urllib.parse

CONFIG = "runner.json"
RUNNER = "bpcp_runner.py"
MANIFEST = "bpcp-manifest.json"
JOB_RECORD = "bpcp-job.json"
FAILED_MARK = "bpcp-failed.txt"
LOG = "cellprofiler.log"

# One thread per CellProfiler process: unpinned processes burn CPU spinning (see benchmarks/).
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "BLIS_NUM_THREADS": "1",
}
JAVA_THREAD_ENV = {"JAVA_TOOL_OPTIONS": "-XX:ActiveProcessorCount=1 -XX:+UseSerialGC"}


# ------------------------------------------------------------------ the CellProfiler command

def readers(version: str) -> list[str]:
    """Image readers to enable: 5.x must be told to use imageio (Bio-Formats needs Java and Maven)."""
    major = version.split(".")[0]
    return ["imageio_reader"] if major.isdigit() and int(major) >= 5 else []


def base_argv(executable: str, version: str) -> list[str]:
    """The executable and its reader flags."""
    return [executable] + [arg for reader in readers(version) for arg in ("-e", reader)]


def job_environment(version: str, pin_threads: bool = True, cp_env: dict | None = None,
                    base: dict | None = None) -> dict:
    """The environment CellProfiler runs in: threads pinned (and the JVM's on 4.x), no display;
    cp_env (e.g. JAVA_HOME) only where the caller has not set it."""
    env = dict(os.environ if base is None else base)
    env["MPLBACKEND"] = "Agg"
    if pin_threads:
        env.update(THREAD_ENV)
        if version.startswith("4"):
            env.update(JAVA_THREAD_ENV)
    for name, value in (cp_env or {}).items():
        env.setdefault(name, value)
    return env


def input_argv(kind: str, numbering: str, input_path: str | None, group_arg: str | None,
               image_root: str | None = None) -> list[str]:
    """How CellProfiler is told a job's image sets, per dataset kind."""
    if numbering == "global":
        return ["-g", group_arg or ""]
    if kind == "loaddata":
        return ["--data-file", input_path or ""] + (["-i", image_root] if image_root else [])
    return ["--file-list", input_path or ""]


def cellprofiler_argv(config: dict, pipeline: str, inputs: list[str], out: str, tmp: str, done: str) -> list[str]:
    cp = config["cellprofiler"]
    return base_argv(cp["executable"], cp["version"]) + ["-c", "-r", "-p", pipeline] + inputs + [
        "-o", out, "-t", tmp, "-d", done]


# ------------------------------------------------------------------ small helpers

def say(message: str, err: bool = False) -> None:
    with contextlib.suppress(OSError):      # nobody reads it any more (HangUpWhenOutputCloses): go on
        print(f"bpcp: {message}", file=sys.stderr if err else sys.stdout, flush=True)


def host() -> str:
    return socket.gethostname()


def write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)           # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fd:
        for block in iter(lambda: fd.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def table_rows(path: str, delimiter: str) -> int:
    """Data rows of a CellProfiler table (quoted line breaks allowed); the header is not counted."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fd:
        return max(sum(1 for _ in csv.reader(fd, delimiter=delimiter)) - 1, 0)


IMAGE_PATH = re.compile(r"(/|file:/+)[^'\"\n]+?\.(tiff?|png|jpe?g|bmp|gif|dib|c01|flex|nd2|czi|lif|ome\.tiff?)\b", re.I)


EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)|[\w.]+Error):")
FAILED_AT = re.compile(r"Image # (\d+), module (\w+) # \d+")


def last_error(log: str, image_set_files: list[str] | None = None) -> str:
    """The line of a CellProfiler log that best says why it failed: the last exception that was not
    part of a warning (CellProfiler logs tracebacks of optional imports as warnings), with the
    module and image set it happened in and that image set's files when known; else the last
    error-looking line, else the last line."""
    try:
        with open(log, errors="replace") as fd:
            lines = [line.rstrip() for line in fd if line.strip()]
    except OSError:
        return "no log"
    if not lines:
        return "empty log"
    found, in_warning = [], False
    for line in lines:
        if line.startswith("[CP - "):
            in_warning = line.startswith("[CP - WARNING]")
        elif EXCEPTION.match(line):
            if not in_warning:
                found.append(line)
            in_warning = False
    if found:
        why = found[-1]
        where = [m for line in lines for m in FAILED_AT.finditer(line)]
        if where:
            image_set, module = int(where[-1].group(1)), where[-1].group(2)
            why += f" (module {module}, image set {image_set} of the job"
            files = (image_set_files or [])[image_set - 1:image_set]
            why += f": {files[0]})" if files else ")"
        else:
            images = [m.group(0) for line in lines for m in IMAGE_PATH.finditer(line)]
            if images and images[-1] not in why:
                why += f" (last image named in the log: {urllib.parse.unquote(images[-1])})"
        return why[:600]
    errors = [line.strip() for line in lines if re.search(r"(Error|Exception|error:|Failure|Traceback)", line)]
    return (errors or [lines[-1].strip()])[-1][:400]


def image_set_files(input_csv: str) -> list[str]:
    """Per image set of a job's LoadData CSV, its files joined by ', ' (for failure reasons)."""
    try:
        with open(input_csv, newline="", encoding="utf-8-sig") as fd:
            rows = list(csv.reader(fd))
    except OSError:
        return []
    if not rows:
        return []
    header = rows[0]
    pairs = []
    for i, name in enumerate(header):
        for prefix in ("Image_FileName_", "FileName_"):
            if name.startswith(prefix):
                channel = name[len(prefix):]
                path = next((j for j, h in enumerate(header) if h in ("Image_PathName_" + channel, "PathName_" + channel)), None)
                pairs.append((i, path))
    return [", ".join(os.path.join(row[p], row[f]) if p is not None else row[f] for f, p in pairs if f < len(row))
            for row in rows[1:]]


def os_error(exc: OSError) -> str:
    where = exc.filename or "a file"
    if exc.errno == errno.ENOSPC:
        return f"{where}: no space left on its device"
    return f"{where}: {exc.strerror or exc}"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ------------------------------------------------------------------ configuration and layout

def load_config(path: str | None) -> dict:
    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), CONFIG)
    try:
        with open(path, encoding="utf-8") as fd:
            return json.load(fd)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"bpcp: {path}: cannot read the runner's settings ({exc}); run `bpcp render` again") from None


class Layout:
    """Where one job's files are: in the run folder, or on a worker in the folder GNU parallel
    made for the job (holding stage/<id>/), which returns work/<id>/out to the controller."""

    def __init__(self, config: dict, run_dir: str, job: str, staged: bool | None = None):
        self.config, self.run, self.job = config, os.path.abspath(run_dir), job
        staged_here = os.path.isdir(os.path.join("stage", job))
        self.remote = staged_here and os.path.realpath(os.getcwd()) != os.path.realpath(self.run)
        self.here = os.path.abspath(os.getcwd()) if self.remote else self.run
        self.staged = bool(config.get("staged")) if staged is None else staged
        self.work = os.path.join(self.here, "work", job)
        self.out = os.path.join(self.work, "out")
        self.log = os.path.join(self.work, LOG)
        self.done = os.path.join(self.work, "done.txt")
        self.published = os.path.join(self.run, "published", job)
        self.failed = os.path.join(self.run, "failed", job)

    def stage(self, *parts: str) -> str:
        return os.path.join(self.here, "stage", self.job, *parts)

    def pipeline(self) -> str:
        name = self.config["pipeline"]
        return self.stage(name) if self.staged else os.path.join(self.here, name)

    def inputs(self) -> list[str]:
        c = self.config
        if c["numbering"] == "global":
            with open(os.path.join(self.here, "inputs", self.job + ".group"), encoding="utf-8") as fd:
                return input_argv(c["kind"], "global", None, fd.read())
        if not self.staged:
            suffix = "csv" if c["kind"] == "loaddata" else "txt"
            return input_argv(c["kind"], "local", os.path.join(self.here, "inputs", f"{self.job}.{suffix}"), None)
        if c["kind"] == "loaddata":
            return input_argv("loaddata", "local", self.stage("input.csv"), None, image_root=self.here)
        files = os.path.join(self.work, "files.txt")      # staged paths are relative to the job folder
        with open(self.stage("input.txt"), encoding="utf-8") as src, open(files, "w", encoding="utf-8") as dst:
            for line in src:
                if line.strip():
                    dst.write(os.path.join(self.here, line.rstrip("\n")) + "\n")
        return input_argv(c["kind"], "local", files, None)

    def image_set_files(self) -> list[str]:
        """Each image set's files as the user named them (staged copies mapped back), LoadData only."""
        c = self.config
        if c["kind"] != "loaddata" or c["numbering"] == "global":
            return []
        path = self.stage("input.csv") if self.staged else os.path.join(self.here, "inputs", self.job + ".csv")
        staged = f"stage/{self.job}/root/"
        return [", ".join("/" + f[len(staged):] if f.startswith(staged) else f for f in files.split(", "))
                for files in image_set_files(path)]

    def fetch_list(self) -> str | None:
        path = self.stage("fetch.txt") if self.staged else os.path.join(self.here, "inputs", self.job + ".fetch")
        return path if os.path.isfile(path) else None


def run_tag(run_dir: str) -> str:
    """Short tag of the run folder: temp folders of two runs with the same job ids never meet."""
    return hashlib.sha256(os.path.realpath(run_dir).encode()).hexdigest()[:8]


def temp_root(config: dict) -> str:
    """The RAM disk when it is a mounted, writable tmpfs (tmp_root "auto"), else what was asked;
    "" means on disk: in the job's work folder, or this host's own temp folder when the run folder
    is shared by many hosts (not the network filesystem)."""
    root = os.environ.get("BPCP_TMP_ROOT", config.get("tmp_root", "auto"))
    on_disk = tempfile.gettempdir() if config.get("shared_fs") else ""
    if root != "auto":
        return root or on_disk
    ramdisk = os.environ.get("BPCP_RAMDISK", config.get("ramdisk", ""))
    try:
        with open("/proc/mounts", encoding="utf-8") as fd:
            mounted = any(f" {ramdisk} tmpfs " in line for line in fd)
    except OSError:
        mounted = False
    return ramdisk if mounted and os.access(ramdisk, os.W_OK) else on_disk


# ------------------------------------------------------------------ locks

def open_lock(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


def lock_is_held(path: str) -> bool:
    """Whether a live process (a runner, or the CellProfiler it started) holds this lock."""
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if try_lock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def reclaim(config: dict, run_dir: str, job: str | None = None) -> list[str]:
    """Remove this run's temp folders (on the RAM disk or any temp root) whose attempt is dead:
    for `job`, every one (the caller holds its lock); otherwise those whose job lock is free."""
    roots = {r for r in (temp_root(config), config.get("ramdisk", "")) if r}
    pattern = f"bpcp-{run_tag(run_dir)}-{job if job else '*'}.*"
    removed = []
    for root in roots:
        for path in glob.glob(os.path.join(glob.escape(root), pattern)):
            name = os.path.basename(path)[len("bpcp-") + 9:].rsplit(".", 1)[0]
            if job is None and lock_is_held(os.path.join(run_dir, "work", name, "lock")):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ------------------------------------------------------------------ S3 downloads

def fetch(listing: str, source_csv: str, dest: str, target_csv: str) -> dict:
    """Download the s3:// objects of `listing` to dest/<bucket>/<key> (16 threads, retries) and
    write target_csv: source_csv with its s3:// PathName_/URL_ values pointing at the copies."""
    from concurrent.futures import ThreadPoolExecutor
    try:
        from botocore.config import Config
        from botocore.session import get_session
    except ImportError:   # AWS CLI v1 >= 1.44 vendors botocore
        try:
            from awscli.botocore.config import Config  # type: ignore[no-redef]
            from awscli.botocore.session import get_session  # type: ignore[no-redef]
        except ImportError:
            raise RuntimeError(f"no botocore for {sys.executable} on {host()}: run ansible-playbook site.yml "
                               "(role awscli), or pass --s3-python with a Python that has botocore") from None
    dest = os.path.realpath(dest)
    with open(listing, encoding="utf-8") as fd:
        urls = [line.rstrip("\n") for line in fd if line.strip()]
    s3 = get_session().create_client("s3", config=Config(
        max_pool_connections=16, retries={"mode": "standard", "max_attempts": 10}))

    def one(url: str) -> int:
        bucket, _, key = url[len("s3://"):].partition("/")
        path = os.path.normpath(os.path.join(dest, bucket, key))
        if not path.startswith(dest + "/"):
            raise ValueError(f"{url}: key would land outside the download folder")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"]
            size = 0
            with open(path, "wb") as out:
                for chunk in iter(lambda: body.read(1 << 20), b""):
                    out.write(chunk)
                    size += len(chunk)
            return size
        except Exception as exc:
            raise RuntimeError(f"{url}: {type(exc).__name__}: {exc}") from None

    started = time.time()
    with ThreadPoolExecutor(16) as pool:
        sizes = list(pool.map(one, urls))
    with open(source_csv, newline="", encoding="utf-8-sig") as fd:
        rows = list(csv.reader(fd))
    paths = [i for i, h in enumerate(rows[0]) if h.startswith(("Image_PathName_", "PathName_"))]
    links = [i for i, h in enumerate(rows[0]) if h.startswith(("Image_URL_", "URL_"))]
    for row in rows[1:]:
        for i in paths:
            if row[i].startswith("s3://"):
                row[i] = os.path.join(dest, row[i][len("s3://"):])
        for i in links:
            if row[i].startswith("s3://"):
                row[i] = "file://" + urllib.parse.quote(os.path.join(dest, row[i][len("s3://"):]))
    with open(target_csv, "w", newline="", encoding="utf-8") as fd:
        csv.writer(fd, lineterminator="\n").writerows(rows)
    return {"files": len(urls), "bytes": sum(sizes), "seconds": round(time.time() - started, 3)}


def _can_import_botocore() -> bool:
    if sys.flags.no_site and "site" not in sys.modules:   # started with -S (jobs.sh): site-packages when needed
        import site
        site.main()
    try:
        import botocore  # noqa: F401
        return True
    except ImportError:
        try:
            import awscli.botocore  # noqa: F401
            return True
        except ImportError:
            return False


def download(config: dict, listing: str, source_csv: str, dest: str, target_csv: str) -> dict:
    """fetch() here when this Python has botocore, else in the worker's S3 Python (config s3_python)."""
    if _can_import_botocore():
        return fetch(listing, source_csv, dest, target_csv)
    python = os.environ.get("BPCP_S3_PYTHON", config.get("s3_python", ""))
    how = "run ansible-playbook site.yml (role awscli), or pass --s3-python with a Python that has botocore"
    if not python or not os.access(python, os.X_OK):
        raise RuntimeError(f"no {python or 'S3 Python'} on {host()} to download S3 images: {how}")
    proc = subprocess.run([python, os.path.abspath(__file__), "fetch", listing, source_csv, dest, target_csv],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(tail[0][:400])
    return json.loads(proc.stdout)


# ------------------------------------------------------------------ warm workers
#
# One resident CellProfiler per slot of a host (runner.json warm_workers): started by the first job
# of the slot under CellProfiler's own Python (this file, `worker`), it runs CellProfiler's own
# main() for each job's argv (a fresh Pipeline loaded from the file, fresh measurements, the job's
# output, temp folder, done file and log), so a job gets what a fresh process gives it without
# paying the imports and, on 4.x, the JVM start again. The runner still judges and publishes.
# A worker listens on <base>-<slot>.sock; the runner holding <base>-<slot>.lock (flock) is the only
# one talking to it. It leaves after worker_jobs jobs, when its RSS passes worker_rss, after
# worker_idle seconds with no job, or when told (stop-workers, at the end of jobs.sh).

WORKER_JOBS = 100        # jobs before a fresh worker replaces one (memory growth, leaks)
WORKER_IDLE = 60.0       # seconds with no job before a worker exits by itself
WORKER_ANSWER = 30.0     # seconds a running worker has to take a job before it is replaced


def warm_workers(config: dict) -> bool:
    """Whether jobs go to warm workers: runner.json's warm_workers, BPCP_WARM_WORKERS=0/1 overriding."""
    forced = os.environ.get("BPCP_WARM_WORKERS", "")
    return forced == "1" if forced in ("0", "1") else bool(config.get("warm_workers"))


def worker_base(config: dict, run_dir: str) -> str:
    """Path prefix of this host's worker sockets and slot locks for a run: on the temp root (host
    local, a RAM disk) when its path is short enough for a unix socket, else in /tmp."""
    name = f"bpcpw-{run_tag(run_dir)}-{hashlib.sha256(host().encode()).hexdigest()[:6]}"
    for root in (temp_root(config), tempfile.gettempdir(), "/tmp"):
        if root and os.path.isdir(root) and len(os.path.join(root, name)) < 90:
            return os.path.join(root, name)
    return os.path.join("/tmp", name)


def cellprofiler_python(config: dict) -> str:
    cp = config["cellprofiler"]
    return cp.get("python") or os.path.join(os.path.dirname(cp["executable"]), "python")


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="utf-8") as fd:
            return int(fd.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _send_line(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    sock.sendall(data)


class WorkerGone(Exception):
    """The worker closed the connection before it said it took the job (it was leaving)."""


class WarmWorker:
    """The runner's side: take a free slot of this host, find or start its worker, hand it a job."""

    def __init__(self, config: dict, run_dir: str):
        self.config, self.run_dir = config, run_dir
        self.base = worker_base(config, run_dir)
        self.pid = 0
        self.jobs_before = 0
        self.handed = False              # the job was sent: from then on the worker's state is the job's
        self.sock: socket.socket | None = None
        self.reader: typing.BinaryIO | None = None
        self.slot, self.slot_lock = self._take_slot()

    def _take_slot(self) -> tuple[int, int]:
        """GNU parallel's slot ({%}) when free, else the first free one (other engines, strays)."""
        preferred = os.environ.get("PARALLEL_JOBSLOT") or os.environ.get("BPCP_SLOT") or "1"
        first = int(preferred) if preferred.isdigit() else 1
        for slot in [first] + [k for k in range(1, 1025) if k != first]:
            fd = open_lock(f"{self.base}-{slot}.lock")
            if try_lock(fd):
                return slot, fd
            os.close(fd)
        raise OSError(errno.EBUSY, "no free warm worker slot", self.base)

    @property
    def path(self) -> str:
        return f"{self.base}-{self.slot}.sock"

    def _spawn(self, env: dict, pipeline: str) -> subprocess.Popen:
        c = self.config
        argv = [cellprofiler_python(c), os.path.abspath(__file__), "worker", "--socket", self.path,
                "--lock", f"{self.base}-{self.slot}.lock", "--jobs", str(int(c.get("worker_jobs") or WORKER_JOBS)),
                "--max-rss", str(int(c.get("worker_rss") or 0)),
                "--idle", str(float(c.get("worker_idle") or WORKER_IDLE)), "--pipeline", pipeline]
        cwd = self.run_dir if os.path.isdir(self.run_dir) else tempfile.gettempdir()
        with open(f"{self.base}-{self.slot}.log", "ab") as log:
            return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)

    def _connect(self, spawned: subprocess.Popen | None) -> socket.socket | None:
        deadline = time.monotonic() + 60
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                return sock
            except OSError:
                sock.close()
                if spawned is None:
                    return None
                if spawned.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the warm CellProfiler worker did not start: {self._log_tail()}") from None
                time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            with open(f"{self.base}-{self.slot}.log", errors="replace") as fd:
                lines = [line.strip() for line in fd if line.strip()]
        except OSError:
            lines = []
        return (lines or ["no output"])[-1][:300]

    def _hand(self, sock: socket.socket, request: dict, lock: int, patience: float | None) -> None:
        """Wait until the worker is ready, send the job; the worker says it took it (its pid, the
        jobs it ran before). patience: seconds a running worker has to say so (a stopped or wedged
        one is replaced), None for one just started (its imports and JVM come first; GNU
        parallel's --timeout still applies). The job is sent only once the worker is ready, so a
        runner stopped while its worker starts (a timeout shorter than CellProfiler's start-up,
        with jobs of a fraction of a second) leaves that worker starting for the retry."""
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid = struct.unpack("3i", creds)[0]           # known before it answers: it can be killed
        sock.settimeout(patience)
        self.reader = sock.makefile("rb")
        if not self.reader.readline():                     # {"ready": true}
            raise WorkerGone()
        self.handed = True
        _send_line(sock, request, [lock])
        line = self.reader.readline()
        if not line:
            raise WorkerGone()
        hello = json.loads(line)
        self.pid, self.jobs_before = int(hello["pid"]), int(hello.get("jobs", 0))
        sock.settimeout(None)

    def start(self, argv: list[str], cwd: str, log: str, tmp: str, env: dict, lock: int, pipeline: str) -> None:
        """Hand the job over (its lock fd passed along, so the job stays locked while the worker
        runs it even if this runner dies); a worker leaving as we came is replaced once."""
        request = {"argv": argv, "cwd": cwd, "log": log, "tmp": tmp}
        for attempt in (1, 2):
            self.handed = False
            sock = self._connect(None)
            spawned = None
            if sock is None:
                _remove(self.path)
                spawned = self._spawn(env, pipeline)
                sock = self._connect(spawned)
            assert sock is not None
            self.sock = sock
            try:
                self._hand(sock, request, lock, None if spawned is not None else WORKER_ANSWER)
                return
            except (WorkerGone, OSError, ValueError):
                sock.close()
                self.sock = None
                if spawned is None:
                    self.kill()          # it left, or did not answer (stopped, wedged): a fresh one
                if spawned is not None or attempt == 2:
                    if spawned is not None and spawned.poll() is None:
                        spawned.kill()
                    raise RuntimeError(f"the warm CellProfiler worker did not take the job: {self._log_tail()}") from None

    def wait(self) -> int | None:
        """CellProfiler's exit status for the job, None when the worker ended during it."""
        assert self.reader is not None
        line = self.reader.readline()
        if not line:
            self.kill()
            return None
        return int(json.loads(line)["exit"])

    def kill(self) -> None:
        """End the worker at once (stopped mid-job, its state is unknown: the next job gets a fresh
        one; GNU parallel KILLs this runner within a second of its TERM, so there is no waiting)."""
        if self.pid:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            _alive(self.pid)
            self.pid = 0
        _remove(self.path)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        os.close(self.slot_lock)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)      # reap it when it is our child
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def stop_workers(config: dict, run_dir: str) -> int:
    """Tell this host's idle workers of the run to leave now (busy ones leave after their job), and
    remove the slot locks and logs no runner or worker holds."""
    told = 0
    base = worker_base(config, run_dir)
    for path in glob.glob(glob.escape(base) + "-*.sock"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)
        try:
            sock.connect(path)
            _send_line(sock, {"stop": True})
            told += 1
        except OSError:
            pass
        finally:
            sock.close()
    deadline = time.monotonic() + 5      # a told worker unlinks its socket as it reads the stop
    while told and glob.glob(glob.escape(base) + "-*.sock") and time.monotonic() < deadline:
        time.sleep(0.05)
    for lock_path in glob.glob(glob.escape(base) + "-*.lock"):
        fd = open_lock(lock_path)
        try:
            if try_lock(fd) and not os.path.exists(lock_path[:-len(".lock")] + ".sock"):
                _remove(lock_path[:-len(".lock")] + ".log")
                _remove(lock_path)
        finally:
            os.close(fd)
    return told


class WarmCellProfiler:
    """The worker's side, under CellProfiler's Python: its modules imported and (4.x) its JVM
    started once; run() is `cellprofiler ARGV` (CellProfiler's own main) with the job's cwd,
    temp folder and log (stdout and stderr, Java's too), leaving no preference of a job behind."""

    def __init__(self, pipeline: str | None):
        import cellprofiler.__main__ as cp_main  # type: ignore[import-not-found]
        import cellprofiler_core  # type: ignore[import-not-found]
        from cellprofiler_core import preferences  # type: ignore[import-not-found]

        self.main, self.prefs = cp_main, preferences
        self.java = str(getattr(cellprofiler_core, "__version__", "")).startswith("4")
        preferences.set_awt_headless(True)
        preferences.set_headless()
        self.stop = cp_main.stop_cellprofiler
        if self.java:
            import bioformats.formatreader  # type: ignore[import-not-found]

            self.clear = bioformats.formatreader.clear_image_reader_cache
        else:
            from cellprofiler_core.constants.reader import ALL_READERS  # type: ignore[import-not-found]

            def clear() -> None:
                for reader in ALL_READERS.values():
                    reader.clear_cached_readers()
            self.clear = clear
        # main() calls stop_cellprofiler() after every run: close the readers, keep the JVM.
        cp_main.stop_cellprofiler = self.clear
        if self.java:
            cp_main.start_java()          # 4.x's main() starts it per run; started, that is a no-op
        self.image_directory = preferences.get_default_image_directory()
        if pipeline and os.path.isfile(pipeline):
            try:                          # imports the modules the pipeline uses; the object is dropped
                from cellprofiler_core.pipeline import Pipeline  # type: ignore[import-not-found]

                Pipeline().load(pipeline)
            except Exception:
                pass
        self.settle()

    @staticmethod
    def settle() -> None:
        """Free the job's garbage, then freeze what is left (the worker's modules and caches) out of
        the collector's reach: a full collection of the ~220,000 objects CellProfiler's imports leave
        took 0.16 s, as long as a one-image-set job's own work on a light pipeline."""
        gc.collect()
        gc.freeze()

    def run(self, request: dict) -> int:
        prefs = self.prefs
        prefs.set_data_file(None)            # what a fresh process starts with
        prefs.clear_image_set_file()
        if prefs.get_default_image_directory() != self.image_directory:
            prefs.set_default_image_directory(self.image_directory)
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        here, tmpdir = os.getcwd(), os.environ.get("TMPDIR")
        try:
            os.chdir(request["cwd"])
            os.environ["TMPDIR"] = tempfile.tempdir = request["tmp"]
            sys.argv = list(request["argv"])
            try:
                code = self.main.main(sys.argv)
            except SystemExit as exc:
                code = exc.code
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
            return code & 0xFF               # as the process's exit status (sys.exit(-1) is 255)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for copy in saved:
                os.close(copy)
            os.chdir(here)
            tempfile.tempdir = None
            if tmpdir is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = tmpdir
            with contextlib.suppress(Exception):
                self.clear()
            self.settle()

    def close(self) -> None:
        self.stop()


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 4)
    while data and not data.endswith(b"\n"):
        more = conn.recv(1 << 16)
        if not more:
            break
        data += more
    return (json.loads(data) if data.strip() else {}), list(fds)


def serve(sock_path: str, lock_path: str, max_jobs: int, max_rss: int, idle: float, pipeline: str | None) -> int:
    """The worker's loop: one job at a time, each connection one job (or a stop)."""
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)                   # the run folder: nothing there may shadow CellProfiler
    _remove(sock_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(8)
    inode = os.stat(sock_path).st_ino

    def leave() -> None:                  # never unlink a socket a newer worker has bound there
        try:
            if os.stat(sock_path).st_ino == inode:
                os.unlink(sock_path)
        except OSError:
            pass

    warm = WarmCellProfiler(pipeline)
    done = 0
    server.settimeout(idle)
    try:
        while True:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                slot = open_lock(lock_path)
                if try_lock(slot):       # no runner is about to hand us a job: leave
                    leave()
                    return 0
                os.close(slot)
                continue
            with conn:
                conn.settimeout(30)
                with contextlib.suppress(OSError):     # stop-workers sends without reading this
                    _send_line(conn, {"ready": True})
                try:
                    request, fds = _read_request(conn)
                except (OSError, ValueError):
                    continue
                if request.get("stop"):
                    leave()
                    return 0
                if "argv" not in request:         # a runner stopped before it handed its job over
                    for fd in fds:
                        os.close(fd)
                    continue
                conn.settimeout(None)
                try:
                    _send_line(conn, {"pid": os.getpid(), "jobs": done})
                    code = warm.run(request)
                finally:
                    for fd in fds:           # the job's lock: released once its output is complete
                        os.close(fd)
                done += 1
                rss = resident_bytes()
                retire = done >= max_jobs or bool(max_rss and rss > max_rss)
                if retire:
                    leave()
                with contextlib.suppress(OSError):
                    _send_line(conn, {"exit": code, "jobs": done, "rss": rss, "retire": retire})
                if retire:
                    return 0
    finally:
        leave()
        server.close()
        warm.close()


# ------------------------------------------------------------------ judging and recording

def judge(config: dict, layout: Layout, expected: int, returncode: int | None, seconds: float) -> str:
    """'' when the attempt succeeded, else one line saying why not."""

    def why() -> str:           # read the log only for a failure
        return last_error(layout.log, layout.image_set_files())

    if returncode is None:
        return (f"the warm CellProfiler worker ended during the job after {seconds:.0f} s (killed, out of memory, "
                f"or crashed; a retry starts a fresh one): {why()}")
    if returncode < 0:
        sig = -returncode
        causes = {int(signal.SIGKILL): " (the kernel's out-of-memory killer, a memory limit, or a stopped run)",
                  int(signal.SIGTERM): " (a timeout, or a stopped run)"}
        cause = causes.get(sig, "")
        return f"CellProfiler was killed by {signal_name(sig)} after {seconds:.0f} s{cause}: {why()}"
    try:
        with open(layout.done, errors="replace") as fd:
            done = fd.read().strip()
    except OSError:
        done = ""
    if done != "Complete":
        what = f"done file says {done!r}" if done else "no done file"
        return f"CellProfiler exit {returncode}, {what}: {why()}"
    files = config["tables"]
    for _table, name in sorted(files.items()):
        if not os.path.isfile(os.path.join(layout.out, name)):
            return f"CellProfiler said Complete (exit {returncode}) but did not write {name}: {why()}"
    if "Image" in files and expected:
        rows = table_rows(os.path.join(layout.out, files["Image"]), config["delimiter"])
        if rows != expected:
            return f"{files['Image']} has {rows} rows for {expected} image sets: {why()}"
    return ""


def manifest(config: dict, folder: str, job: str) -> dict:
    """Every file of an output folder with its size and sha256, and the rows of every table."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel == MANIFEST or os.path.islink(path):
                continue
            files[rel] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
    rows = {table: table_rows(os.path.join(folder, name), config["delimiter"])
            for table, name in sorted(config["tables"].items()) if name in files}
    return {"format": 1, "job": job, "files": files, "rows": rows}


def verify(folder: str, checksums: bool = True) -> str:
    """'' when the folder holds exactly what its manifest lists, else one line saying what differs."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as fd:
            listed = json.load(fd)["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"no readable {MANIFEST} ({type(exc).__name__})"
    for rel, want in listed.items():
        path = os.path.join(folder, rel)
        try:
            size = os.path.getsize(path)
        except OSError:
            return f"{rel} is missing"
        if size != want["size"]:
            return f"{rel} has {size} bytes, its manifest says {want['size']}"
        if checksums and sha256_file(path) != want["sha256"]:
            return f"{rel} differs from its manifest (sha256)"
    return ""


def record_failure(run_dir: str, job: str, reason: str, log: str | None) -> None:
    """failed/<job>/: reason.txt (one line) and the attempt's log, replaced as a whole."""
    failed = os.path.join(run_dir, "failed")
    os.makedirs(failed, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=failed, prefix=f".{job}.")
    try:
        if log and os.path.isfile(log):
            shutil.copyfile(log, os.path.join(tmp, LOG))
        with open(os.path.join(tmp, "reason.txt"), "w", encoding="utf-8") as fd:
            fd.write(reason.replace("\n", " ") + "\n")
        target = os.path.join(failed, job)
        old = target + ".old"
        if os.path.isdir(target):
            _remove(old)
            os.rename(target, old)
        os.rename(tmp, target)
        _remove(old)
    except OSError:
        _remove(tmp)
        raise


def publish(config: dict, run_dir: str, job: str, out: str) -> bool:
    """Rename a checked output folder into published/ (atomic, once). True when it is published."""
    target = os.path.join(run_dir, "published", job)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.rename(out, target)
    except OSError:
        return os.path.isdir(target)
    _remove(os.path.join(run_dir, "failed", job))
    total = config.get("jobs_total", "?")
    count = len(os.listdir(os.path.join(run_dir, "published")))
    say(f"{job}: published ({count} of {total} jobs done)")
    return True


# ------------------------------------------------------------------ one attempt

def available_memory() -> int | None:
    """MemAvailable of this host in bytes (None when /proc/meminfo does not say)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as fd:
            for line in fd:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def wait_for_memory(config: dict, job: str) -> str:
    """Admission on the host that runs the job (GNU parallel's --memfree would see only the controller, and polls):
    wait, boundedly, until the host has the memory a job needs; '' when it has, else why not."""
    need = int(config.get("memory_needed") or 0)
    if not need:
        return ""
    patience = float(os.environ.get("BPCP_ADMISSION_WAIT", config.get("admission_wait", 600)))
    deadline, said = time.monotonic() + patience, False
    while True:
        available = available_memory()
        if available is None or available >= need:
            return ""
        if time.monotonic() >= deadline:
            return (f"not enough memory on {host()} to start it: {available / 2**30:.1f} GiB available for "
                    f"{patience:.0f} s, a job needs {need / 2**30:.1f} GiB (--memfree, or profile.json's peak RSS with "
                    "its margin); it is retried on another host, or by the next run")
        if not said:
            say(f"{job}: waiting for {need / 2**30:.1f} GiB of memory on {host()} ({available / 2**30:.1f} GiB available)",
                err=True)
            said = True
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def planned_image_sets(run_dir: str, job: str) -> int | None:
    """A job's number of image sets, from joblist.tsv (id TAB image sets)."""
    try:
        with open(os.path.join(run_dir, "joblist.tsv"), encoding="utf-8") as fd:
            for line in fd:
                name, _, sets = line.rstrip("\n").partition("\t")
                if name == job:
                    return int(sets)
    except (OSError, ValueError):
        pass
    return None


def stopped_reason(signum: int, seconds: float, timeout: str) -> str:
    """Why an attempt was stopped, from the signal it got: GNU parallel's --timeout sends SIGTERM, a
    Ctrl-C SIGINT to the whole terminal, a closed SSH connection SIGHUP."""
    if signum == signal.SIGTERM:
        limit = f" (GNU parallel's --timeout {timeout})" if timeout else ""
        return f"timed out after {seconds:.0f} s{limit}, or stopped by SIGTERM"
    if signum == signal.SIGINT:
        return f"stopped by an interrupt (Ctrl-C) after {seconds:.0f} s"
    return f"stopped by {signal_name(signum)} after {seconds:.0f} s (the terminal or the SSH connection closed)"


class Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class HangUpWhenOutputCloses:
    """Send this runner SIGHUP (stopping the attempt) as soon as whoever reads its output is gone.
    On a worker that is sshd closing the session's pipes: the controller's connection dropped
    (ClientAliveInterval) or its ssh client died, also one of a shared connection (ControlMaster),
    which GNU parallel's remote wrapper does not see (it waits for sshd itself to end). Without a
    terminal sshd sends no SIGHUP. Output into files (GNU parallel --group, Slurm) never closes."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.armed.set()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        poller, fds = select.poll(), {1, 2}
        for fd in fds:
            poller.register(fd, 0)                  # errors and hang-ups only
        while fds:
            for fd, events in poller.poll():
                if events & select.POLLNVAL:        # not open at all: nothing to watch
                    poller.unregister(fd)
                    fds.discard(fd)
                elif events & (select.POLLERR | select.POLLHUP):
                    if self.armed.is_set():
                        os.kill(os.getpid(), signal.SIGHUP)
                    return

    def disarm(self) -> None:
        self.armed.clear()


def run_job(config: dict, run_dir: str, job: str, expected: int | None) -> int:
    layout = Layout(config, run_dir, job)
    if expected is None:
        expected = planned_image_sets(run_dir, job)
        if expected is None:
            say(f"{job}: not a job of this run ({run_dir}); `bpcp status` lists them", err=True)
            return 2
    if not layout.remote and os.path.isdir(layout.published):
        say(f"{job}: already published")
        return 0
    os.makedirs(layout.work, exist_ok=True)
    lock = open_lock(os.path.join(layout.work, "lock"))
    if not try_lock(lock):
        say(f"{job}: waiting for an earlier attempt that is still running", err=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    if not layout.remote and os.path.isdir(layout.published):
        say(f"{job}: already published")
        return 0
    # Whoever holds the lock owns work/<id>/: clear what an earlier attempt left and start afresh.
    for name in ("out", "tmp", "done.txt", LOG, "files.txt", "fetch.json"):
        _remove(os.path.join(layout.work, name))
    reclaim(config, run_dir, job)
    os.makedirs(layout.out)

    def fail(reason: str) -> int:
        say(f"{job}: FAILED on {host()}: {reason}", err=True)
        try:
            if layout.remote:
                if os.path.isfile(layout.log):
                    shutil.copyfile(layout.log, os.path.join(layout.out, LOG))
                write_atomic(os.path.join(layout.out, FAILED_MARK), reason + "\n")
            else:
                record_failure(run_dir, job, reason, layout.log)
        except OSError as exc:
            say(f"{job}: could not record the failure ({os_error(exc)})", err=True)
        return 1

    short = wait_for_memory(config, job)
    if short:
        return fail(short)
    root = temp_root(config)
    if root:
        tmp = tempfile.mkdtemp(dir=root, prefix=f"bpcp-{run_tag(run_dir)}-{job}.")
    else:
        tmp = os.path.join(layout.work, "tmp")
        os.makedirs(tmp)

    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    hangup = HangUpWhenOutputCloses()
    child = None
    worker: WarmWorker | None = None
    started = time.time()
    try:
        inputs = layout.inputs()
        fetched = None
        listing = layout.fetch_list()
        if listing is not None:
            source = inputs[1]
            try:
                fetched = download(config, listing, source, os.path.join(tmp, "bpcp-s3"),
                                   os.path.join(tmp, "bpcp-input.csv"))
            except Exception as exc:
                _remove(tmp)
                return fail(f"could not download its S3 images on {host()}: {str(exc)[:400]}")
            inputs[1] = os.path.join(tmp, "bpcp-input.csv")
        argv = cellprofiler_argv(config, layout.pipeline(), inputs, layout.out, tmp, layout.done)
        env = job_environment(config["cellprofiler"]["version"], config.get("pin_threads", True),
                              config["cellprofiler"].get("env"))
        started = time.time()
        if warm_workers(config):
            with open(layout.log, "wb"):
                pass
            worker = WarmWorker(config, run_dir)
            try:
                worker.start(argv, layout.work, layout.log, tmp, env, lock, layout.pipeline())
            except RuntimeError as exc:
                _remove(tmp)
                return fail(str(exc))
            returncode = worker.wait()
        else:
            with open(layout.log, "wb") as log:
                child = subprocess.Popen(argv, cwd=layout.work, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, pass_fds=(lock,))
                returncode = child.wait()
    except Stopped as exc:
        # GNU parallel follows its first TERM with more and a KILL within a second: record first.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        fail(stopped_reason(exc.signum, time.time() - started, config.get("timeout", "")))
        if worker is not None and worker.handed:
            worker.kill()                # mid-job its state is unknown; one still starting is kept
        if child is not None and child.poll() is None:
            child.send_signal(exc.signum)
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
        _remove(tmp)
        return 128 + exc.signum
    finally:
        hangup.disarm()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        if worker is not None:
            worker.close()
    finished = time.time()
    _remove(tmp)
    reason = judge(config, layout, expected, returncode, finished - started)
    if os.path.isfile(layout.log):
        shutil.copyfile(layout.log, os.path.join(layout.out, LOG))
    if reason:
        return fail(reason)
    record = {"job": job, "host": host(), "started": started, "finished": finished, "exit_code": returncode,
              "image_sets": expected, "workdir": layout.here, "fetch": fetched,
              "worker": {"pid": worker.pid, "slot": worker.slot, "jobs_before": worker.jobs_before}
              if worker is not None else None}
    write_atomic(os.path.join(layout.out, JOB_RECORD), json.dumps(record) + "\n")
    write_atomic(os.path.join(layout.out, MANIFEST), json.dumps(manifest(config, layout.out, job)) + "\n")
    if layout.remote:
        say(f"{job}: done on {host()}, returning its output")
        return 0
    if not publish(config, run_dir, job, layout.out):
        return fail(f"could not move {layout.out} into published/")
    for name in ("done.txt", LOG, "files.txt"):
        _remove(os.path.join(layout.work, name))
    return 0


def collect(config: dict, run_dir: str) -> int:
    """Publish outputs that workers returned into work/<id>/out once they match their manifest;
    record the failures they returned. Returns how many were published."""
    published = 0
    for out in sorted(glob.glob(os.path.join(glob.escape(run_dir), "work", "*", "out"))):
        job = os.path.basename(os.path.dirname(out))
        lock = open_lock(os.path.join(os.path.dirname(out), "lock"))
        try:
            if not try_lock(lock):
                continue                      # an attempt on this host still runs
            if os.path.isfile(os.path.join(out, MANIFEST)):
                if verify(out) == "":
                    with open(os.path.join(out, MANIFEST), encoding="utf-8") as fd:
                        listed = set(json.load(fd)["files"]) | {MANIFEST}
                    for root, _, names in os.walk(out):
                        for name in names:
                            if os.path.relpath(os.path.join(root, name), out) not in listed:
                                os.unlink(os.path.join(root, name))
                    published += publish(config, run_dir, job, out)
            elif os.path.isfile(os.path.join(out, FAILED_MARK)):
                mark = os.path.join(out, FAILED_MARK)
                reason_file = os.path.join(run_dir, "failed", job, "reason.txt")
                if not (os.path.isfile(reason_file) and os.path.getmtime(reason_file) >= os.path.getmtime(mark)):
                    with open(mark, encoding="utf-8", errors="replace") as fd:
                        record_failure(run_dir, job, fd.read().strip(), os.path.join(out, LOG))
        finally:
            os.close(lock)
    return published


def measure(config: dict, run_dir: str, job: str, out_dir: str, wrapper: list[str]) -> int:
    """Run a job's exact CellProfiler command under a wrapper (GNU time, massif) into out_dir."""
    layout = Layout(config, run_dir, job, staged=os.path.isdir(os.path.join(run_dir, "stage", job)))
    for sub in ("out", "tmp"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    layout.work = out_dir
    argv = cellprofiler_argv(config, layout.pipeline(), layout.inputs(), os.path.join(out_dir, "out"),
                             os.path.join(out_dir, "tmp"), os.path.join(out_dir, "done.txt"))
    env = job_environment(config["cellprofiler"]["version"], config.get("pin_threads", True),
                          config["cellprofiler"].get("env"))
    try:
        return subprocess.run(wrapper + argv, cwd=out_dir, env=env, stdin=subprocess.DEVNULL).returncode
    except OSError as exc:      # the wrapper or CellProfiler is not there: one line, exit 2
        say(f"{job}: cannot start {os_error(exc)}", err=True)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    wrapper: list[str] = []
    if "--" in argv:     # measure's WRAPPER, taken as it is: argparse drops a '--' the wrapper itself needs
        wrapper, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    parser = argparse.ArgumentParser(prog="bpcp_runner.py", description="Run one job of a bpcp plan.")
    parser.add_argument("--config", help=f"the run's settings (default: {CONFIG} beside this file)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run one job to the end: publish it, or record why it failed")
    p.add_argument("--run-dir", default=os.environ.get("BPCP_RUN_DIR"))
    p.add_argument("job")
    p.add_argument("--image-sets", type=int, default=None)
    p = sub.add_parser("collect", help="publish the outputs remote workers returned")
    p.add_argument("--run-dir", default=os.environ.get("BPCP_RUN_DIR"))
    p = sub.add_parser("reclaim", help="remove temp folders of attempts that no longer run")
    p.add_argument("--run-dir", default=os.environ.get("BPCP_RUN_DIR"))
    p = sub.add_parser("command", help="print a job's CellProfiler command and environment as JSON")
    p.add_argument("--run-dir", default=os.environ.get("BPCP_RUN_DIR"))
    p.add_argument("job")
    p = sub.add_parser("measure", help="run a job's CellProfiler command under a wrapper",
                       usage="%(prog)s [--run-dir RUN] JOB --out DIR [-- WRAPPER...]")
    p.add_argument("--run-dir", default=os.environ.get("BPCP_RUN_DIR"))
    p.add_argument("job")
    p.add_argument("--out", required=True)
    p = sub.add_parser("stop-workers", help="tell this host's idle warm workers of the run to leave now")
    p.add_argument("--run-dir", default=os.environ.get("BPCP_RUN_DIR"))
    p = sub.add_parser("fetch", help=argparse.SUPPRESS)
    p.add_argument("args", nargs=4)
    p = sub.add_parser("worker", help=argparse.SUPPRESS)     # under CellProfiler's Python, started by run
    p.add_argument("--socket", required=True)
    p.add_argument("--lock", required=True)
    p.add_argument("--jobs", type=int, default=WORKER_JOBS)
    p.add_argument("--max-rss", type=int, default=0)
    p.add_argument("--idle", type=float, default=WORKER_IDLE)
    p.add_argument("--pipeline", default=None)
    args = parser.parse_args(argv)
    if args.command == "worker":
        return serve(args.socket, args.lock, args.jobs, args.max_rss, args.idle, args.pipeline)
    if wrapper and args.command != "measure":
        parser.error(f"{args.command} takes no '-- ...' (only measure runs a wrapper)")
    if args.command == "fetch":
        try:
            print(json.dumps(fetch(*args.args)))
            return 0
        except Exception as exc:
            sys.exit(str(exc)[:400])
    if not args.run_dir:
        parser.error("--run-dir is required (or BPCP_RUN_DIR)")
    config = load_config(args.config)
    run_dir = os.path.abspath(args.run_dir)
    if args.command == "run":
        try:
            return run_job(config, run_dir, args.job, args.image_sets)
        except OSError as exc:
            say(f"{args.job}: FAILED on {host()}: {os_error(exc)}", err=True)
            return 1
    if args.command == "collect":
        collect(config, run_dir)
        return 0
    if args.command == "stop-workers":
        stop_workers(config, run_dir)
        return 0
    if args.command == "reclaim":
        for path in reclaim(config, run_dir):
            say(f"removed {path}, the temp folder of an attempt that no longer runs")
        return 0
    layout = Layout(config, run_dir, args.job)
    if args.command == "command":
        work = os.path.join(run_dir, "work", args.job)
        argv = cellprofiler_argv(config, layout.pipeline(), layout.inputs(), os.path.join(work, "out"),
                                 os.path.join(work, "tmp"), os.path.join(work, "done.txt"))
        env = job_environment(config["cellprofiler"]["version"], config.get("pin_threads", True),
                              config["cellprofiler"].get("env"), base={})
        print(json.dumps({"argv": argv, "env": env}))
        return 0
    return measure(config, run_dir, args.job, os.path.abspath(args.out), wrapper)


if __name__ == "__main__":
    sys.exit(main())
