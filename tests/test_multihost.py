"""run.yml across three Docker containers configured by site.yml, driven over real SSH.

Each container is a worker with its own sshd on a 127.0.0.1 port. The merged result must equal one
plain CellProfiler process over the whole plate, value for value (saved overlays named in their own
job's published/ folder, and there); the joblog must show jobs on more than one host; a host
stopped mid-run, a controller killed mid-run and a host unreachable from the start must all still
end with every group published exactly once and the same values. With -e shared_fs=true, two
workers that bind-mount the run folder and the plate at the same paths run the jobs in the run
folder itself (nothing staged or returned), and a worker without the mount is one line before any
job starts.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import require
from test_e2e_local import assert_merged_equals, single_process

from bpcp import planfile
from bpcp.jobs.sharedfs import image_paths
from bpcp.results.joblog import Attempt, read_joblog
from bpcp.runfolder import RunFolder

from container_hosts import (
    SSHD_SLOTS,
    docker,
    docker_ready,
    ensure_worker_image,
    free_port,
    make_key,
    start_worker,
    write_inventory,
)

pytestmark = [pytest.mark.docker, pytest.mark.cellprofiler, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    require("Docker", docker_ready(), "no Docker engine (scripts/ensure-docker.sh starts one)")
    ensure_worker_image()
    folder = tmp_path_factory.mktemp("ssh")
    key = make_key(folder)
    session = secrets.token_hex(3)          # names of this session's own: another session's stay
    started = [start_worker(f"bpcp-test-{session}-w{i}", key) for i in (1, 2, 3)]
    yield started, key
    for w in started:
        docker("rm", "-f", w.name, check=False)


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    """A plate of 12 wells x 2 sites: enough jobs that every host gets some."""
    from bpcp.example import PlateSpec, generate_plate

    return generate_plate(tmp_path_factory.mktemp("mh-plate"), PlateSpec(rows="ABC", columns=4, sites=2))


@pytest.fixture(scope="module")
def reference(plate, cp_venv, tmp_path_factory) -> Path:
    """One plain CellProfiler process over the whole plate: what every multi-host run must merge to."""
    return single_process(cp_venv, tmp_path_factory.mktemp("mh-ref"), "-p", str(plate / "example_loaddata.cppipe"),
                          "--data-file", str(plate / "load_data.csv"))


def run_yml(inventory: Path, plate: Path, output: Path, *extra: str) -> subprocess.Popen:
    """ansible-playbook run.yml in a session of its own (stop() ends it and the run it started)."""
    argv = [ANSIBLE_PLAYBOOK, "-i", str(inventory), str(ROOT / "run.yml"),
            "-e", f"dataset={plate / 'load_data.csv'}", "-e", f"pipeline={plate / 'example_loaddata.cppipe'}",
            "-e", f"output={output}", "-e", "jobs_per_host=1", "-e", "bundle=0", *extra]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def run_processes(run: Path) -> list[int]:
    """Processes of this run on the controller: the run folder in their command line (bpcp run,
    the shell Ansible's async task started it with) or their working folder in it (GNU parallel,
    its ssh and perl children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(run) in cmdline or cwd == str(run) or cwd.startswith(f"{run}/"):
            found.append(int(entry.name))
    return found


def stop(proc: subprocess.Popen, run: Path) -> None:
    """What the controller's death does to a run: ansible-playbook's session and the bpcp run it
    started detached (Ansible async: its own session), with all their children, end at once."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for _ in range(50):
        pids = run_processes(run)
        if not pids:
            break
        for pid in pids:
            try:
                group = os.getpgid(pid)
                if group != os.getpgrp():
                    os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    else:
        raise AssertionError(f"processes of {run} still running: {run_processes(run)}")
    proc.communicate(timeout=60)


def finish(proc: subprocess.Popen, run: Path, timeout: float = 1800) -> str:
    try:
        out = proc.communicate(timeout=timeout)[0]
    finally:
        stop(proc, run)
    assert proc.returncode == 0, out[-5000:]
    return out


def published(run: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "bpcp-job.json").read_text()) for p in (run / "published").glob("*")}


def attempts_by_host(run: Path, hosts) -> dict[str, list[Attempt]]:
    """The joblog's attempts by worker: GNU parallel records each attempt's sshlogin, whose -p names
    the worker's sshd port (the controller itself would be ':')."""
    names = {str(h.port): h.name for h in hosts}
    attempts, notes = read_joblog(run / "joblog.tsv")
    assert attempts and not notes, notes
    out: dict[str, list[Attempt]] = {}
    for a in attempts:
        port = re.search(r"-p (\d+)", a.host)
        out.setdefault(names.get(port.group(1), a.host) if port else a.host, []).append(a)
    return out


def done_by_host(run: Path, hosts) -> dict[str, set[str]]:
    return {host: {a.job for a in tries if a.ok} for host, tries in attempts_by_host(run, hosts).items()}


def assert_complete_once(run: Path, jobs: int) -> None:
    report = json.loads((run / "report.json").read_text())
    assert report["complete"], report["counts"]
    assert len(published(run)) == jobs
    numbers = pq.read_table(run / "merged" / "Image.parquet")["ImageNumber"].to_pylist()
    assert sorted(numbers) == list(range(1, 2 * jobs + 1))


def test_three_hosts_equal_one_cellprofiler_process(workers, plate, reference, tmp_path):
    hosts, key = workers
    inventory = write_inventory(tmp_path / "inventory.json", hosts, key)
    run = tmp_path / "run"
    out = finish(run_yml(inventory, plate, run), run)
    assert "COMPLETE: 12/12 jobs done" in out
    # the joblog says where each job ran: more than one worker did, and only the workers
    done = done_by_host(run, hosts)
    print(f"\njobs done per host: { {h: len(j) for h, j in done.items()} }")
    assert set(done) <= {h.name for h in hosts}, sorted(done)
    assert len([h for h, jobs in done.items() if jobs]) >= 2, done
    assert set().union(*done.values()) == set(published(run)), "a published job the joblog has no success for"
    # every job ran in a worker's private folder, not in the controller's run folder
    assert all("/.parallel/tmp/" in r["workdir"] for r in published(run).values()), published(run)
    assert_complete_once(run, 12)
    assert_merged_equals(reference, run)


def test_a_host_stopped_mid_run_loses_nothing(workers, plate, reference, tmp_path):
    hosts, key = workers
    inventory = write_inventory(tmp_path / "inventory.json", hosts, key)
    run = tmp_path / "run"
    proc = run_yml(inventory, plate, run)
    victim = hosts[2]
    try:
        deadline = time.monotonic() + 900
        stopped_at = None
        while time.monotonic() < deadline and proc.poll() is None:
            busy = victim.exec("pgrep -f 'cellprofiler -e' || true").strip()
            if busy and len(published(run)) >= 2:
                victim.stop()
                stopped_at = time.time()
                break
            time.sleep(0.5)
        assert docker("inspect", "-f", "{{.State.Running}}", victim.name).stdout.strip() == "false", \
            "the victim never ran a job"
        finish(proc, run)
        assert_complete_once(run, 12)
        assert_merged_equals(reference, run)
        # the joblog (GNU parallel logs a retried job's last attempt only): the job the victim was
        # running went to another host, and nothing started on the victim after it stopped
        tries = attempts_by_host(run, hosts)
        assert stopped_at and all(a.start < stopped_at for a in tries.get(victim.name, [])), tries.get(victim.name)
        assert len([h for h, jobs in done_by_host(run, hosts).items() if jobs and h != victim.name]) == 2, tries
    finally:
        stop(proc, run)
        hosts[2] = start_worker(victim.name, key)     # a fresh container for the tests after this one


def test_rerun_after_killing_the_controller_finishes_the_rest(workers, plate, reference, tmp_path):
    hosts, key = workers
    inventory = write_inventory(tmp_path / "inventory.json", hosts, key)
    run = tmp_path / "run"
    proc = run_yml(inventory, plate, run)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None and len(published(run)) < 3:
            time.sleep(0.3)
    finally:
        stop(proc, run)          # the controller dies: ansible-playbook, bpcp, parallel, ssh, all of it
    before = published(run)
    assert 3 <= len(before) < 12, sorted(before)
    out = finish(run_yml(inventory, plate, run), run)
    after = published(run)
    for job, record in before.items():
        assert after[job]["started"] == record["started"], f"{job} was processed again"
    assert "COMPLETE: 12/12 jobs done" in out
    assert_complete_once(run, 12)
    assert_merged_equals(reference, run)


def test_an_unreachable_host_is_reported_and_the_others_do_the_work(workers, plate, reference, tmp_path):
    hosts, key = workers
    dead_port = free_port()
    extra = {"bpcp-test-gone": {**hosts[0].inventory_vars(key), "ansible_port": dead_port}}
    inventory = write_inventory(tmp_path / "inventory.json", hosts[:2], key, extra)
    out = finish(run_yml(inventory, plate, tmp_path / "run"), tmp_path / "run")
    assert "UNREACHABLE" in out and "bpcp-test-gone" in out
    assert "left out (unreachable, see above): bpcp-test-gone; the other 2 do the work" in out
    assert_complete_once(tmp_path / "run", 12)
    done = done_by_host(tmp_path / "run", hosts[:2])
    assert set(done) <= {h.name for h in hosts[:2]}, sorted(done)          # nothing went to the gone host
    assert_merged_equals(reference, tmp_path / "run")


@pytest.fixture(scope="module")
def shared_workers(workers, tmp_path_factory):
    """Two more workers that share this session's temp folders with the controller (a bind mount at
    the same path, as NFS would): every test's run folder and the plate are in them."""
    _, key = workers
    shared = tmp_path_factory.getbasetemp().resolve()
    session = secrets.token_hex(3)
    started = [start_worker(f"bpcp-test-{session}-s{i}", key, shared=(shared,)) for i in (1, 2)]
    yield started, key
    for w in started:
        docker("rm", "-f", w.name, check=False)


def test_shared_fs_hosts_equal_one_cellprofiler_process(shared_workers, plate, reference, tmp_path):
    """run.yml -e shared_fs=true: the hosts read the images and write published/ in the run folder
    itself; no stage/, no GNU parallel --transferfile/--return, nothing in the workers' own folders."""
    hosts, key = shared_workers
    inventory = write_inventory(tmp_path / "inventory.json", hosts, key)
    run = tmp_path / "run"
    out = finish(run_yml(inventory, plate, run, "-e", "shared_fs=true"), run)
    assert "COMPLETE: 12/12 jobs done" in out
    log = (run / "run.log").read_text()
    assert f"bpcp: shared filesystem: 2 host(s) see {run} and the 72 images at the same paths" in log, log[-3000:]
    assert json.loads((run / "runner.json").read_text())["shared_fs"] is True
    script = (run / "jobs.sh").read_text()
    assert "--transferfile" not in script and "--return" not in script and not (run / "stage").exists()
    assert {r["workdir"] for r in published(run).values()} == {str(run)}
    for w in hosts:          # GNU parallel never made a folder for a staged job there (--workdir ...)
        assert w.exec("test -e /root/.parallel/tmp && echo staged || echo none").strip() == "none", w.name
    done = done_by_host(run, hosts)
    assert len([h for h, jobs in done.items() if jobs]) == 2, done
    assert_complete_once(run, 12)
    assert_merged_equals(reference, run)


def test_shared_fs_host_without_the_mount_is_one_line_before_any_job(workers, shared_workers, plate, tmp_path):
    (unmounted, *_), key = workers
    mounted = shared_workers[0][0]
    inventory = write_inventory(tmp_path / "inventory.json", [mounted, unmounted], key)
    run = tmp_path / "run"
    proc = run_yml(inventory, plate, run, "-e", "shared_fs=true")
    try:
        out = proc.communicate(timeout=900)[0]
    finally:
        stop(proc, run)
    assert proc.returncode != 0, out[-3000:]
    errors = [line for line in (run / "run.log").read_text().splitlines() if line.startswith("bpcp: error:")]
    # one line per path it does not see: the run folder, and the plate's images (not mounted either)
    name, first = f"root@127.0.0.1:{unmounted.port}", image_paths(run, planfile.read(RunFolder(run)))[0]
    assert errors == [
        f"bpcp: error: {name}: does not see the run folder {run} (No such file or directory); mount it on {name} at the "
        "same path (NFS or another shared filesystem), or leave out --shared-fs (run.yml: shared_fs) to copy each "
        "job's inputs to the hosts instead",
        f"bpcp: error: {name}: does not see {first} (and 71 more of the 72 images); the images must be on a filesystem "
        f"{name} shares, at the same paths as here, or leave out --shared-fs to copy them to the hosts"], errors
    assert all(line in out for line in errors)          # run.yml shows them
    assert not (run / "joblog.tsv").exists() and not published(run) and not list((run / "work").glob("*"))


# ------------------------------------------------------------------ sshd, shared connections, controller loss
def test_worker_sshd_is_sized_by_the_role(workers, tmp_path):
    """The bpcp_worker role's drop-in (the image was built with bpcp_worker_sshd_slots=96) is what
    the running sshd uses: 40 jobs at once over one shared connection (sshd's default MaxSessions
    is 10), GNU parallel's start-up probe finds every slot, and all of it costs one handshake."""
    hosts, key = workers
    worker = hosts[0]
    effective = worker.exec("/usr/sbin/sshd -T").splitlines()
    sessions, startups = 2 * SSHD_SLOTS + 10, f"{2 * SSHD_SLOTS + 10}:30:{4 * SSHD_SLOTS + 20}"
    for line in (f"maxsessions {sessions}", f"maxstartups {startups}", "clientaliveinterval 10",
                 "clientalivecountmax 2"):
        assert line in effective, [x for x in effective if x.startswith(("maxs", "clientalive"))]
    title = worker.exec("tr '\\0' ' ' </proc/$(cat /run/sshd.pid)/cmdline")
    assert f"of {startups.replace(':30:', '-')} startups" in title, title
    control = tempfile.mkdtemp(prefix="cm", dir="/tmp")     # a short socket path
    login = (f"ssh -o ControlMaster=auto -o ControlPath={control}/%C -o ControlPersist=10 -o BatchMode=yes "
             f"-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -i {key} "
             f"-p {worker.port} -l root 127.0.0.1")
    before = worker.handshakes()
    subprocess.run(["bash", "-c", f"{login} true"], check=True, timeout=60)
    proc = subprocess.run(["parallel", "--will-cite", "-S", f"40/{login}", "-j", "40", "sleep 2; echo {}", ":::",
                           *map(str, range(80))], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(proc.stdout.split(), key=int) == [str(i) for i in range(80)]
    assert "simultaneous logins" not in proc.stderr and "refused" not in proc.stderr, proc.stderr[-2000:]
    assert worker.handshakes() - before == 1
    subprocess.run(["bash", "-c", f"{login} -O exit 2>/dev/null"], timeout=60)


def test_a_shared_connection_per_host_saves_the_handshakes(workers, plate, reference, tmp_path):
    """run.yml's sshlogins share one connection per host (ControlMaster): the same run costs about
    one handshake per host instead of several per job; ssh_share=false gives the old count."""
    hosts, key = workers
    inventory = write_inventory(tmp_path / "inventory.json", hosts, key)
    counts = {}
    for mode in ("false", "true"):
        before = sum(w.handshakes() for w in hosts)
        started = time.monotonic()
        run = tmp_path / f"run-{mode}"
        finish(run_yml(inventory, plate, run, "-e", f"ssh_share={mode}"), run)
        counts[mode] = (sum(w.handshakes() for w in hosts) - before, time.monotonic() - started)
        assert_complete_once(run, 12)
    print(f"\nSSH handshakes for 12 jobs on {len(hosts)} hosts (run.yml, Ansible's own included): "
          f"unshared {counts['false'][0]} ({counts['false'][0] / 12:.1f} per job, {counts['false'][1]:.0f} s), "
          f"shared {counts['true'][0]} ({counts['true'][0] / 12:.2f} per job, {counts['true'][1]:.0f} s)")
    assert counts["false"][0] >= 4 * 12, counts
    assert counts["true"][0] <= 3 * len(hosts), counts
    assert_merged_equals(reference, tmp_path / "run-true")


def _masters(run: Path) -> list[int]:
    """This run's shared SSH connections on the controller (ssh's ControlMaster processes)."""
    found = []
    for pid in run_processes(run):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ssh: ") and b"[mux]" in Path(
                    f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def _busy(worker) -> list[str]:
    """The job runners and CellProfiler processes (warm or not) running on a worker."""
    out = worker.exec("ps -eo args | grep -E 'bpcp_runner[.]py|cellprofile[r]' || true")
    return [line for line in out.splitlines() if line.strip()]


def test_a_controller_lost_with_its_connections_half_open(workers, plate, reference, tmp_path):
    """The controller dies without closing its connections (everything SIGKILLed but its SSH
    connections, which are stopped: the workers' kernels still answer, ssh no longer does). sshd's
    ClientAlive probes (the role's drop-in) drop them within about a minute and the jobs there end;
    a rerun then publishes every job exactly once, the ones published before untouched."""
    hosts, key = workers
    inventory = write_inventory(tmp_path / "inventory.json", hosts, key)
    run = tmp_path / "run"
    proc = run_yml(inventory, plate, run)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            if len(published(run)) >= 2 and sum(1 for w in hosts if _busy(w)) >= 2:
                break
            time.sleep(0.3)
        busy = [w for w in hosts if _busy(w)]
        assert len(busy) >= 2 and proc.poll() is None, "no jobs running on two workers to lose"
        masters = _masters(run)
        assert masters, "no shared SSH connection on the controller"
        for pid in masters:
            os.kill(pid, signal.SIGSTOP)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in set(run_processes(run)) - set(masters):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        lost = time.monotonic()
        before = published(run)
        while time.monotonic() - lost < 180 and any(_busy(w) for w in hosts):
            time.sleep(1)
        ended = time.monotonic() - lost
        print(f"\njobs on {len(busy)} workers ended {ended:.0f} s after the controller was lost")
        assert not any(_busy(w) for w in hosts), {w.name: _busy(w) for w in hosts}
        assert ended < 150, ended
        for w in busy:      # sshd dropped them for not answering, not because they were closed
            log = w.exec("cat /var/log/bpcp-sshd.log")   # (a job may have finished before that)
            while "Timeout, client not responding" not in log and time.monotonic() - lost < 150:
                time.sleep(2)
                log = w.exec("cat /var/log/bpcp-sshd.log")
            assert "Timeout, client not responding" in log, log[-2000:]
    finally:
        for pid in _masters(run):      # the controller comes back: its old connections are gone
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stop(proc, run)
    assert 2 <= len(before) < 12, sorted(before)
    started = time.monotonic()
    out = finish(run_yml(inventory, plate, run), run)
    print(f"the rerun finished the other {12 - len(before)} jobs in {time.monotonic() - started:.0f} s")
    assert "COMPLETE: 12/12 jobs done" in out
    after = published(run)
    for job, record in before.items():
        assert after[job]["started"] == record["started"], f"{job} was processed again"
    assert_complete_once(run, 12)
    assert_merged_equals(reference, run)
