"""Shared-filesystem mode for SSH hosts: whether every worker sees the run folder and the images
at the paths this host sees them, so jobs read and write the run folder directly (no stage/, no
GNU parallel --transferfile/--return).

The check, before any job starts: this host writes a token into a new folder of the run folder
(.bpcp-check-<token>/); each worker, over its own sshlogin, runs a small python3 program that
reads the token back, writes a file beside it (which this host must then see), checks that the
pipeline copy and plan.json are readable and that every image of the plan exists (one directory
listing per folder, the paths sent on stdin). Every problem is one line naming the host and the
path. `decide` turns the findings into the mode: --shared-fs yes refuses to start on a problem,
auto falls back to staging and says so in one line.

Pure: `image_paths`, `parse_login`, `problems`; the side effects are in `check_hosts`.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bpcp.errors import BpcpError
from bpcp.planfile import Plan
from bpcp.runfolder import RunFolder, write_atomic

MODES = ("no", "yes", "auto")
CHECK_WAIT = 120.0                # seconds per host (ssh, python3, listing every image folder)
CHECK_DIR = ".bpcp-check-"


def image_paths(run_dir: Path, plan: Plan) -> list[str]:
    """Every local image the jobs read, from their inputs in the run folder (s3:// ones are
    downloaded by the jobs; a Batch_data.h5 keeps its paths inside)."""
    seen: dict[str, None] = {}
    for job in plan.jobs:
        if not job.input:
            continue
        path = run_dir / job.input
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as fd:
                rows = csv.reader(fd)
                header = next(rows, [])
                names = {n: i for i, n in enumerate(header)}
                pairs, urls = [], []
                for name, i in names.items():
                    for fp, pp in (("Image_FileName_", "Image_PathName_"), ("FileName_", "PathName_")):
                        if name.startswith(fp) and pp + name[len(fp):] in names:
                            pairs.append((names[pp + name[len(fp):]], i))
                    if name.startswith(("Image_URL_", "URL_")):
                        urls.append(i)
                for row in rows:
                    for p, f in pairs:
                        if max(p, f) < len(row) and row[f]:
                            seen[row[p].rstrip("/") + "/" + row[f]] = None
                    for u in urls:
                        if u < len(row) and row[u].startswith("file:"):
                            seen[urllib.parse.unquote(urllib.parse.urlparse(row[u]).path)] = None
        else:
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    seen[urllib.parse.unquote(urllib.parse.urlparse(line).path) if line.startswith("file:") else line] = None
    return [p for p in seen if "://" not in p]


@dataclass(frozen=True)
class Login:
    """One sshlogin line as GNU parallel reads it: [@groups/][slots/][ssh command ][user@]host[:port]."""
    line: str
    argv: tuple[str, ...]      # the ssh command and its destination ((): this host, ':')
    name: str                  # [user@]host[:port], for messages

    @property
    def local(self) -> bool:
        return not self.argv


def parse_login(line: str) -> Login:
    """The ssh command GNU parallel would run for an sshlogin line, and a short name for messages."""
    s = re.sub(r"^@[^/]+/?", "", line.strip())
    s = re.sub(r"^\d+/", "", s)
    if s == ":":
        return Login(line, (), "this host")
    command, sep, server = s.rpartition(" ")
    ssh = shlex.split(command) if sep else shlex.split(os.environ.get("PARALLEL_SSH", "ssh"))
    user, _, hostport = server.rpartition("@")
    host, port = hostport, ""
    if hostport.count(":") == 1:                 # host:port (IPv6 addresses have more colons)
        host, port = hostport.split(":")
    if ssh and os.path.basename(ssh[0]) == "ssh":
        # a check must never wait for a password or hang on a dead host (first values win in ssh)
        ssh[1:1] = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
    argv = ssh + (["-p", port] if port else []) + [f"{user}@{host}" if user else host]
    for flag, value in itertools.pairwise(ssh):   # run.yml's lines: ssh ... -p PORT ... -l USER HOST
        if flag == "-p" and not port:
            port = value
        elif flag == "-l" and not user:
            user = value
    name = (f"{user}@" if user else "") + host + (f":{port}" if port else "")
    return Login(line, tuple(argv), name)


# Run on a host without bpcp (python3 -c, or a Slurm check task): given `paths` (every image) and
# `result`, one listing per folder; the missing ones counted and the first three named.
MISSING_IMAGES = r'''listings, missing = {}, []
for path in paths:
    parent, _, name = path.rpartition("/")
    if parent not in listings:
        try:
            listings[parent] = set(os.listdir(parent or "/"))
        except OSError:
            listings[parent] = None
    if listings[parent] is None or name not in listings[parent]:
        missing.append(path)
result["images"], result["missing"], result["missing_count"] = len(paths), missing[:3], len(missing)
'''

# What each worker runs (python3 -c, any 3.x): argv run folder, token, mark file, files to read;
# the image paths on stdin, NUL-separated. Prints one JSON object.
CHECK_SCRIPT = r'''
import json, os, socket, sys
run, token, mark = sys.argv[1], sys.argv[2], sys.argv[3]
folder = os.path.join(run, ".bpcp-check-" + token)
result = {"host": socket.gethostname(), "python": list(sys.version_info[:3])}
try:
    with open(os.path.join(folder, "token")) as fd:
        result["token"] = fd.read().strip() == token
except OSError as exc:
    result["token"], result["token_error"] = False, exc.strerror
if result["token"]:
    try:
        with open(os.path.join(folder, mark), "w") as fd:
            fd.write(token)
        result["wrote"] = True
    except OSError as exc:
        result["wrote"], result["write_error"] = False, exc.strerror
result["unreadable"] = [n for n in sys.argv[4:] if not os.access(os.path.join(run, n), os.R_OK)]
paths = [p for p in sys.stdin.read().split("\0") if p]
''' + MISSING_IMAGES + r'''print(json.dumps(result))
'''


def problems(login: Login, run_dir: Path, result: dict, seen_mark: bool, python_min: tuple[int, int] = (3, 9)) -> list[str]:
    """One line per problem of one host's answer ([] when it can run jobs in the run folder)."""
    name = login.name
    fix = (f"mount it on {name} at the same path (NFS or another shared filesystem), or leave out --shared-fs "
           "(run.yml: shared_fs) to copy each job's inputs to the hosts instead")
    found = []
    if "error" in result:
        return [f"{name}: {result['error']}"]
    if tuple(result.get("python", (0, 0)))[:2] < python_min:
        found.append(f"{name}: python3 is {'.'.join(map(str, result.get('python', [])))}; the job runner needs 3.9 "
                     "or newer (ansible-playbook site.yml sets hosts up)")
    if not result.get("token"):
        why = result.get("token_error") or "another folder is there"
        found.append(f"{name}: does not see the run folder {run_dir} ({why}); {fix}")
    elif not result.get("wrote"):
        found.append(f"{name}: cannot write to the run folder {run_dir} ({result.get('write_error')}); the user it "
                     "logs in as needs write access there (the same user id as here, no root squash)")
    elif not seen_mark:
        found.append(f"{name}: wrote into {run_dir} but this host does not see that file: {name} has another folder "
                     f"at that path; {fix}")
    if result.get("token"):
        for file in result.get("unreadable", []):
            found.append(f"{name}: cannot read {run_dir / file}; the user it logs in as needs read access to the run folder")
    if result.get("missing_count"):
        n, first = result["missing_count"], result["missing"][0]
        more = f" (and {n - 1} more of the {result.get('images')} images)" if n > 1 else ""
        found.append(f"{name}: does not see {first}{more}; the images must be on a filesystem {name} shares, at "
                     f"the same paths as here, or leave out --shared-fs to copy them to the hosts")
    return found


def _ask(login: Login, run_dir: Path, token: str, mark: str, files: list[str], paths: bytes) -> dict:
    remote = " ".join(shlex.quote(a) for a in ["python3", "-c", CHECK_SCRIPT, str(run_dir), token, mark, *files])
    try:
        proc = subprocess.run([*login.argv, remote], input=paths, capture_output=True, timeout=CHECK_WAIT)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer over ssh within {CHECK_WAIT:.0f} s ({login.line}); check that it is up"}
    except OSError as exc:
        return {"error": f"cannot start {login.argv[0]} ({exc.strerror}); check the sshlogin {login.line!r}"}
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    last = (err.strip().splitlines() or ["no message"])[-1][:300]
    if proc.returncode == 255:
        return {"error": f"cannot log in over ssh ({last}); check the sshlogin {login.line!r}"}
    if proc.returncode == 127:
        return {"error": f"no python3 ({last}); set the host up with ansible-playbook site.yml"}
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"the check gave no answer (exit {proc.returncode}: {last})"}


_CONTROL_PATH = re.compile(r"^(?:-o)?ControlPath[= ](.+)$", re.IGNORECASE)


def make_control_dirs(logins: list[str]) -> list[Path]:
    """Make the folders of the sshlogins' ControlPath (run.yml's is ~/.ssh/bpcp-%C), private: ssh
    cannot share a connection whose socket folder is missing ("unix_listener: cannot bind"), and
    ~/.ssh is missing for a user who has never run ssh. Returns the folders made."""
    made = []
    for line in logins:
        try:
            words = parse_login(line).argv
        except ValueError:            # unbalanced quotes: the login check says so
            continue
        for word in words:
            match = _CONTROL_PATH.match(word)
            if not match or match.group(1).lower() == "none":
                continue
            folder = Path(os.path.expanduser(match.group(1))).parent
            if "%" not in str(folder) and not folder.is_dir():
                try:
                    folder.mkdir(mode=0o700, parents=True)
                    made.append(folder)
                except OSError:
                    pass             # ssh then says why in its own words, in the login check
    return made


def check_hosts(run: RunFolder, plan: Plan, logins: list[str]) -> tuple[list[str], int, int]:
    """Every remote host's problems (one line each), the number of hosts checked and of images."""
    make_control_dirs(logins)
    remote = [login for login in map(parse_login, logins) if not login.local]
    paths = image_paths(run.root, plan)
    if not remote:
        return [], 0, len(paths)
    for old in run.root.glob(f"{CHECK_DIR}*"):     # a check that was killed (render holds the run folder)
        shutil.rmtree(old, ignore_errors=True)
    token = secrets.token_hex(8)
    folder = run.root / f"{CHECK_DIR}{token}"
    folder.mkdir()
    try:
        write_atomic(folder / "token", token + "\n")
        files = [plan.pipeline.file, run.plan.name]
        data = "\0".join(paths).encode()
        with ThreadPoolExecutor(min(16, len(remote))) as pool:
            answers = list(pool.map(lambda ix: _ask(ix[1], run.root, token, f"host-{ix[0]}", files, data),
                                    enumerate(remote)))
        found = []
        for i, (login, answer) in enumerate(zip(remote, answers)):
            mark = folder / f"host-{i}"
            seen = mark.is_file() and mark.read_text().strip() == token
            found += problems(login, run.root, answer, seen)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return found, len(remote), len(paths)


def decide(run: RunFolder, plan: Plan, logins: list[str], mode: str,
           say: Callable[[str], None] = print) -> bool:
    """True: jobs run in the run folder on every host. mode yes: a problem stops the run (one line
    each); auto: a problem means staging, said in one line; no: staging, nothing checked."""
    if mode == "no":
        return False
    found, hosts, images = check_hosts(run, plan, logins)
    if not found:
        say(f"bpcp: shared filesystem: {hosts} host(s) see {run.root} and the {images} images at the same paths; "
            "jobs read and write the run folder directly (no staging)" if hosts else
            "bpcp: shared filesystem: only this host in the sshlogin file; jobs run in the run folder (no staging)")
        return True
    if mode == "yes":
        raise BpcpError(found)
    what = found[0].split("; ")[0]            # the problem without its fix: staging is the fix taken
    more = f", and {len(found) - 1} more (--shared-fs yes lists them)" if len(found) > 1 else ""
    say(f"bpcp: shared filesystem: not used, staging each job's inputs instead ({what}{more})")
    return False
