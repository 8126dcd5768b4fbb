"""The controller vanishes in the middle of a multi-host run: the workers' jobs end, a rerun
publishes every job exactly once.

The worker is a real sshd on 127.0.0.1 (tests/local_sshd.py) with the bpcp_worker role's
ClientAlive settings; the controller is `bpcp run` over an sshlogin as run.yml writes it (one
shared connection per host). Losing the controller is SIGKILL of everything it started, with its
shared connection either stopped (half-open: the kernel still answers, ssh does not; only sshd's
ClientAlive probes find out) or left running (its sessions close, the connection stays). The
container tests (test_multihost.py) do the same against hosts configured by the role itself.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require
from local_sshd import ROLE_CLIENT_ALIVE, Host, sshd_ready, start_host

pytestmark = [pytest.mark.cellprofiler, pytest.mark.slow]


@pytest.fixture
def worker(tmp_path_factory):
    require("sshd", sshd_ready(), "needs /usr/sbin/sshd, ssh and root (apt-get install openssh-server)")
    (Path.home() / ".ssh").mkdir(mode=0o700, exist_ok=True)       # run.yml makes it for the sockets
    host = start_host(tmp_path_factory.mktemp("loss-ssh"), settings=ROLE_CLIENT_ALIVE)
    yield host
    host.stop()


def start_run(run: Path, plate: Path, cp_venv: str, logins: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bpcp.cli", "run", "--cellprofiler", cp_venv,
                             "-d", str(plate / "load_data.csv"), "-p", str(plate / "example_loaddata.cppipe"),
                             "-o", str(run), "--bundle", "0", "--sshloginfile", str(logins)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def processes() -> dict[int, tuple[int, bytes, bytes]]:
    """pid -> (parent pid, command line, environment) of every process this test may see."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            out[int(entry.name)] = (ppid, (entry / "cmdline").read_bytes(), (entry / "environ").read_bytes())
        except (OSError, ValueError, IndexError):
            continue
    return out


def controller(root: int, host: Host) -> tuple[set[int], set[int]]:
    """(what `bpcp run` started, its shared SSH connections to host: ssh's ControlMaster daemons)."""
    table = processes()
    tree, grown = {root}, True
    while grown:
        more = {pid for pid, (ppid, _, _) in table.items() if ppid in tree} - tree
        tree |= more
        grown = bool(more)
    path = subprocess.run(["bash", "-c", f"ssh -G -p {host.port} -l root 127.0.0.1 -o ControlPath=~/.ssh/bpcp-%C "
                                         "| sed -n 's/^controlpath //p'"], capture_output=True, text=True).stdout.strip()
    masters = {pid for pid, (_, cmd, _) in table.items() if cmd.startswith(f"ssh: {path} [mux]".encode())}
    return tree - masters, masters


def holds_a_job(pid: int) -> bool:
    """Whether a warm worker is running a job: it holds that job's work/<id>/lock (passed by the
    runner), not only its slot's bpcpw-*.lock. An idle worker holds no job and leaves by itself."""
    with contextlib.suppress(OSError):
        return any(os.readlink(fd).endswith("/lock") for fd in Path(f"/proc/{pid}/fd").iterdir())
    return False


def jobs_on_worker(run: Path, skip: set[int]) -> list[str]:
    """This run's job runners, CellProfiler processes and busy warm workers that the worker's sshd started."""
    mark = f"BPCP_RUN_DIR={run}\0".encode()
    return [cmd.replace(b"\0", b" ").decode(errors="replace")[:120] for pid, (_, cmd, env) in processes().items()
            if pid not in skip and mark in env and (b"bpcp_runner.py" in cmd or b"cellprofiler" in cmd)
            and (b"\0worker\0" not in cmd or holds_a_job(pid))]


def freeze_cellprofiler(run: Path, skip: set[int]) -> set[int]:
    """SIGSTOP this run's CellProfiler processes (a cold child, or a warm worker holding a job) so
    their jobs cannot end by finishing: only the lost connection may end them. Returns the pids."""
    mark = f"BPCP_RUN_DIR={run}\0".encode()
    frozen = set()
    for pid, (_, cmd, env) in processes().items():
        if pid in skip or mark not in env or b"\0run\0" in cmd:
            continue
        if (b"cellprofiler" in cmd and b"bpcp_runner.py" not in cmd) or (b"\0worker\0" in cmd and holds_a_job(pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                frozen.add(pid)
    return frozen


def published(run: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "bpcp-job.json").read_text()) for p in (run / "published").glob("*")}


@pytest.mark.parametrize("connection", ["half-open", "left-open"])
def test_the_workers_jobs_end_and_a_rerun_publishes_each_job_once(worker, example_plate, cp_venv, tmp_path,
                                                                   connection):
    logins = tmp_path / "hosts.sshlogin"
    logins.write_text(worker.sshlogin(slots=2) + "\n")
    run = tmp_path / "run"
    proc = start_run(run, example_plate, cp_venv, logins)
    masters: set[int] = set()
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            tree, masters = controller(proc.pid, worker)
            if published(run) and len(jobs_on_worker(run, tree)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None and masters, "no job running over a shared connection to lose"
        # A job near its end would finish before any lost connection is noticed: freeze the running
        # ones. GNU parallel is stopped first, so no session is half set up when its ssh dies (a mux
        # client killed mid-setup leaves its channel open in the master until the master exits).
        frozen = freeze_cellprofiler(run, tree | masters)
        table = processes()
        for pid in tree & table.keys():
            if any(arg.endswith(b"/parallel") for arg in table[pid][1].split(b"\0")[:2]):
                os.kill(pid, signal.SIGSTOP)
        time.sleep(2)
        frozen |= freeze_cellprofiler(run, tree | masters | frozen)
        assert frozen, "no CellProfiler job was running when the controller was lost"
        if connection == "half-open":
            for pid in masters:
                os.kill(pid, signal.SIGSTOP)
        tree, _ = controller(proc.pid, worker)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        lost = time.monotonic()
        before = published(run)
        while time.monotonic() - lost < 150 and jobs_on_worker(run, tree | masters):
            time.sleep(0.5)
        ended = time.monotonic() - lost
        print(f"\n{connection}: the worker's jobs ended {ended:.1f} s after the controller was lost")
        assert not jobs_on_worker(run, tree | masters), jobs_on_worker(run, tree | masters)
        sshd_log = Path(worker.key).parent / f"sshd-{worker.port}.log"
        if connection == "half-open":   # sshd dropped the connection for not answering, within about a minute
            assert 30 < ended < 120, ended
            assert "Timeout, client not responding" in sshd_log.read_text()
        else:                           # the sessions closed: the runners noticed at once
            assert ended < 15, ended
    finally:
        for pid in masters:             # the controller comes back: its old connections are gone
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert 1 <= len(before) < 8, sorted(before)
    again = start_run(run, example_plate, cp_venv, logins)
    out = again.communicate(timeout=900)[0]
    assert again.returncode == 0, out[-3000:]
    assert "COMPLETE: 8/8 jobs done" in out, out[-3000:]
    after = published(run)
    assert len(after) == 8 and not list((run / "failed").glob("*")), sorted(after)
    for job, record in before.items():
        assert after[job]["started"] == record["started"], f"{job} was processed again"
    report = json.loads((run / "report.json").read_text())
    assert report["complete"], report["counts"]
