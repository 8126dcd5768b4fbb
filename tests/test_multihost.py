"""run.yml across three Docker containers configured by site.yml, driven over real SSH.

Each container is a worker with its own sshd on a 127.0.0.1 port. The merged result must equal a
single-host run; a host stopped mid-run, a controller killed mid-run and a host unreachable from
the start must all still end with every group published exactly once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from container_hosts import (
    docker, docker_ready, ensure_worker_image, free_port, make_key, start_worker, write_inventory,
)

pytestmark = [pytest.mark.docker, pytest.mark.cellprofiler, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
TABLES = ("Image", "Nuclei", "Cells", "Cytoplasm", "PH3")


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    if not docker_ready():
        pytest.skip("no Docker engine (scripts/ensure-docker.sh starts one)")
    ensure_worker_image()
    folder = tmp_path_factory.mktemp("ssh")
    key = make_key(folder)
    started = [start_worker(f"bpcp-test-w{i}", key) for i in (1, 2, 3)]
    yield started, key
    for w in started:
        docker("rm", "-f", w.name, check=False)


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    """A plate of 12 wells x 2 sites: enough jobs that every host gets some."""
    from bpcp.example import PlateSpec, generate_plate

    return generate_plate(tmp_path_factory.mktemp("mh-plate"), PlateSpec(rows="ABC", columns=4, sites=2))


@pytest.fixture(scope="module")
def single_host(plate, cp_venv, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    proc = subprocess.run([sys.executable, "-m", "bpcp.cli", "run", "--cellprofiler", cp_venv,
                           "-d", str(plate / "load_data.csv"), "-p", str(plate / "example_loaddata.cppipe"),
                           "-o", str(run), "--bundle", "0"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return run


def run_yml(inventory: Path, plate: Path, output: Path, *extra: str, **popen) -> subprocess.Popen:
    argv = [ANSIBLE_PLAYBOOK, "-i", str(inventory), str(ROOT / "run.yml"),
            "-e", f"dataset={plate / 'load_data.csv'}", "-e", f"pipeline={plate / 'example_loaddata.cppipe'}",
            "-e", f"output={output}", "-e", "jobs_per_host=1", "-e", "bundle=0", *extra]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 1800) -> str:
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out[-5000:]
    return out


def published(run: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "bpcp-job.json").read_text()) for p in (run / "published").glob("*")}


def assert_same_tables(a: Path, b: Path) -> None:
    for table in TABLES:
        left = pq.read_table(a / "merged" / f"{table}.parquet")
        right = pq.read_table(b / "merged" / f"{table}.parquet")
        assert left.column_names == right.column_names, table
        keep = [c for c in left.column_names if not c.startswith(("ExecutionTime_", "ImageSet_"))]
        lrows, rrows = left.select(keep).to_pylist(), right.select(keep).to_pylist()
        assert len(lrows) == len(rrows), table
        for lr, rr in zip(lrows, rrows):
            for col in keep:
                lv, rv = lr[col], rr[col]
                if isinstance(lv, str) and "/published/" in lv:      # each run's own folder
                    lv, rv = lv.split("/published/")[1], rv.split("/published/")[1]
                if isinstance(lv, float) and lv != lv:
                    assert rv != rv, (table, col)
                else:
                    assert lv == rv, (table, col, lv, rv)


def assert_complete_once(run: Path, jobs: int) -> None:
    report = json.loads((run / "report.json").read_text())
    assert report["complete"], report["counts"]
    assert len(published(run)) == jobs
    numbers = pq.read_table(run / "merged" / "Image.parquet")["ImageNumber"].to_pylist()
    assert sorted(numbers) == list(range(1, 2 * jobs + 1))


def test_three_hosts_equal_a_single_host_run(workers, plate, single_host, tmp_path):
    hosts, key = workers
    inventory = write_inventory(tmp_path / "inventory.json", hosts, key)
    out = finish(run_yml(inventory, plate, tmp_path / "run"))
    assert "COMPLETE: 12/12 jobs done" in out
    used = {record["workdir"].split("/.parallel/")[0] for record in published(tmp_path / "run").values()}
    hostnames = {h.exec("cat /etc/bpcp-test-host").strip() for h in hosts}
    assert len(hostnames) == 3
    # every job ran in a worker's private folder, not in the controller's run folder
    assert all("/.parallel/tmp/" in r["workdir"] for r in published(tmp_path / "run").values()), used
    assert_same_tables(single_host, tmp_path / "run")
    assert_complete_once(tmp_path / "run", 12)


def test_a_host_stopped_mid_run_loses_nothing(workers, plate, single_host, tmp_path):
    hosts, key = workers
    inventory = write_inventory(tmp_path / "inventory.json", hosts, key)
    proc = run_yml(inventory, plate, tmp_path / "run")
    victim = hosts[2]
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        busy = victim.exec("pgrep -f 'cellprofiler -e' || true").strip()
        if busy and len(published(tmp_path / "run")) >= 2:
            victim.stop()
            break
        time.sleep(0.5)
    assert docker("inspect", "-f", "{{.State.Running}}", victim.name).stdout.strip() == "false", \
        "the victim never ran a job"
    finish(proc)
    assert_complete_once(tmp_path / "run", 12)
    assert_same_tables(single_host, tmp_path / "run")
    docker("start", victim.name)
    hosts[2] = start_worker(victim.name, key)


def test_rerun_after_killing_the_controller_finishes_the_rest(workers, plate, tmp_path):
    hosts, key = workers
    inventory = write_inventory(tmp_path / "inventory.json", hosts, key)
    run = tmp_path / "run"
    proc = run_yml(inventory, plate, run, start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if len(published(run)) >= 3:
            os.killpg(proc.pid, signal.SIGKILL)           # ansible-playbook, bpcp, parallel, ssh: all of it
            break
        time.sleep(0.3)
    proc.wait(timeout=60)
    before = published(run)
    assert 3 <= len(before) < 12, sorted(before)
    out = finish(run_yml(inventory, plate, run))
    after = published(run)
    for job, record in before.items():
        assert after[job]["started"] == record["started"], f"{job} was processed again"
    assert "COMPLETE: 12/12 jobs done" in out
    assert_complete_once(run, 12)


def test_an_unreachable_host_is_reported_and_the_others_do_the_work(workers, plate, tmp_path):
    hosts, key = workers
    dead_port = free_port()
    extra = {"bpcp-test-gone": {**hosts[0].inventory_vars(key), "ansible_port": dead_port}}
    inventory = write_inventory(tmp_path / "inventory.json", hosts[:2], key, extra)
    out = finish(run_yml(inventory, plate, tmp_path / "run"))
    assert "UNREACHABLE" in out and "bpcp-test-gone" in out
    assert "left out (unreachable, see above): bpcp-test-gone; the other 2 do the work" in out
    assert_complete_once(tmp_path / "run", 12)
