"""`bpcp profile`: /usr/bin/time -v and massif parsed right, and the profile's peak RSS is the
job's real peak RSS. Real CellProfiler and real valgrind; nothing stubbed."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

from bpcp.errors import BpcpError
from bpcp.sizing.profile import choose, derive, parse_massif, parse_time_v, read_raw

from plans import make_plan

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "roles" / "massif" / "files" / "bpcp-profile"
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
BPCP = [sys.executable, "-m", "bpcp.cli"]
RSS_TOLERANCE = 0.10      # two runs of one CellProfiler job differ by a few MiB of ~300 MiB


def _bpcp(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(BPCP + list(args), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_parse_time_v_of_a_real_run(tmp_path):
    """A process that touches 200 MiB: GNU time's numbers, parsed, say so."""
    out = tmp_path / "time.txt"
    code = "b = bytearray(200 * 2**20); import time; t = time.time()\nwhile time.time() - t < 1.2: pass"
    subprocess.run(["/usr/bin/time", "-v", "-o", str(out), sys.executable, "-c", code], check=True)
    t = parse_time_v(out.read_text())
    assert 200 * 2**20 < t["max_rss_bytes"] < 260 * 2**20
    assert 1.2 <= t["wall_seconds"] < 10 and t["user_seconds"] + t["system_seconds"] > 0.5 and t["exit_code"] == 0
    with pytest.raises(BpcpError):
        parse_time_v("")


def test_choose_and_derive():
    plan = make_plan([2] * 8)
    chosen = choose(plan)
    assert [s.image_sets for s in chosen] == [1, 2, 8] and chosen[2].rows[-1] == ("j3", 1)
    uneven = make_plan(jobs=[("big", 9), ("small", 1)])
    assert [(s.label, s.image_sets) for s in choose(uneven)] == [("small", 1), ("big", 9)]
    with pytest.raises(BpcpError, match="LoadData"):
        choose(make_plan([2] * 8, kind="filelist"))
    runs = [{"image_sets": n, "wall_seconds": 3 + 0.5 * n, "user_seconds": 2.5 + 0.5 * n, "system_seconds": 0.4,
             "max_rss_bytes": (300 + 2 * n) * 2**20, "background_load": 0.0} for n in (1, 8)]
    d = derive(runs)
    assert d["startup_seconds"] == pytest.approx(3) and d["seconds_per_image_set"] == pytest.approx(0.5)
    assert d["rss_per_image_set_bytes"] == 2 * 2**20 and d["basis"] == "wall"
    busy = derive([{**r, "wall_seconds": r["wall_seconds"] * 3, "background_load": 4.0} for r in runs])
    assert busy["basis"] == "cpu" and busy["startup_seconds"] == pytest.approx(2.9)
    assert busy["cpu_per_process"] == 1.0 and busy["cpu_per_process_measured"] < 0.5


@pytest.fixture
def planned(example_plate, cp_venv, tmp_path) -> Path:
    run = tmp_path / "run"
    _bpcp("plan", "--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"),
          "-p", str(example_plate / "example_loaddata.cppipe"), "-o", str(run), "--bundle", "0")
    return run


@pytest.mark.cellprofiler
def test_profile_rss_matches_a_plain_run(planned, cp_venv, tmp_path):
    """The profile's peak RSS of one job against /usr/bin/time -v on that job run by hand.

    With CellProfiler 5.x, --massif must say it cannot, and not hang."""
    plan = json.loads((planned / "plan.json").read_text())
    job = plan["jobs"][0]
    proc = _bpcp("profile", "-o", str(planned), "--job", job["id"], "--massif", "--massif-timeout", "60")
    print(proc.stdout)
    prof = json.loads((planned / "profile.json").read_text())
    assert prof["format"] == 1 and prof["pipeline"]["sha256"] == plan["pipeline"]["sha256"]
    assert prof["cellprofiler"]["version"] == plan["cellprofiler"]["version"]
    (run,) = prof["runs"]
    assert run["job"] == job["id"] and run["image_sets"] == len(job["image_numbers"])
    if plan["cellprofiler"]["version"].startswith("5"):
        assert "crashes under valgrind" in prof["massif_note"] and run["massif"] is None
        assert "massif skipped" in proc.stdout

    # the same job, run by hand: CellProfiler's own command line under GNU time
    plain = tmp_path / "plain"
    (plain / "out").mkdir(parents=True)
    (plain / "tmp").mkdir()
    exe = str(Path(cp_venv) / "bin" / "cellprofiler")
    argv = [exe] + (["-e", "imageio_reader"] if plan["cellprofiler"]["version"].startswith("5") else [])
    argv += ["-c", "-r", "-p", str(planned / "pipeline.cppipe"), "--data-file", str(planned / job["input"]),
             "-o", str(plain / "out"), "-t", str(plain / "tmp"), "-d", str(plain / "done.txt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    subprocess.run(["/usr/bin/time", "-v", "-o", str(plain / "time.txt")] + argv, env=env, cwd=plain,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    assert (plain / "done.txt").read_text().strip() == "Complete"
    text = (plain / "time.txt").read_text()
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    plain_rss, profiled = kib * 1024, run["max_rss_bytes"]
    print(f"peak RSS: profile {profiled / 2**20:.1f} MiB, plain run {plain_rss / 2**20:.1f} MiB "
          f"({(profiled - plain_rss) / plain_rss:+.1%}; tolerance {RSS_TOLERANCE:.0%}); "
          f"load average {Path('/proc/loadavg').read_text().split()[:3]}")
    assert plain_rss > 100 * 2**20                 # a real CellProfiler, not a wrapper's RSS
    assert abs(profiled - plain_rss) <= RSS_TOLERANCE * plain_rss


def _ms_print_peak(path: Path) -> tuple[int, int]:
    """(peak snapshot, its total bytes) as ms_print reports them."""
    text = subprocess.run(["ms_print", str(path)], capture_output=True, text=True, check=True).stdout
    peak = int(re.search(r"(\d+) \(peak\)", text).group(1))
    for line in text.splitlines():
        cols = line.split()
        if len(cols) == 6 and cols[0] == str(peak) and all(re.fullmatch(r"[\d,]+", c) for c in cols):
            return peak, int(cols[2].replace(",", ""))
    raise AssertionError(f"ms_print shows no row for snapshot {peak}")


@pytest.mark.cellprofiler
@pytest.mark.cp42
@pytest.mark.slow
def test_massif_of_cellprofiler_42(planned, cp42_venv):
    """massif over a 1-image-set job with CellProfiler 4.2: bpcp's peak is ms_print's peak."""
    require("ms_print", shutil.which("ms_print"), "ms_print not installed (comes with valgrind: ansible-playbook site.yml)")
    proc = _bpcp("profile", "-o", str(planned), "--sizes", "1", "--massif", "--massif-cellprofiler", cp42_venv,
                 "--massif-timeout", "900")
    print(proc.stdout)
    prof = json.loads((planned / "profile.json").read_text())
    m = prof["runs"][0]["massif"]
    assert m["error"] is None, m
    assert m["cellprofiler_version"].startswith("4.2")
    out = Path(m["out"])
    snapshot, total = _ms_print_peak(out)
    parsed = parse_massif(out.read_text())
    print(f"massif peak: bpcp {parsed['peak_heap_bytes']} B (snapshot {parsed['peak_snapshot']}), "
          f"ms_print {total} B (snapshot {snapshot}); RSS {prof['runs'][0]['max_rss_bytes']} B")
    assert parsed["peak_heap_bytes"] == m["peak_heap_bytes"] == prof["derived"]["heap_peak_bytes"]
    assert parsed["marked_peak_snapshot"] == snapshot
    # massif marks its peak within --peak-inaccuracy (1%); bpcp takes the largest snapshot
    assert total <= parsed["peak_heap_bytes"] <= total * 1.01
    if parsed["peak_snapshot"] == snapshot:
        assert parsed["peak_heap_bytes"] == total
    assert 10 * 2**20 < parsed["peak_heap_bytes"] < prof["runs"][0]["max_rss_bytes"] * 2
    # a file cut short keeps its complete snapshots
    text = out.read_text()
    cut = parse_massif(text[: len(text) // 3])
    assert 0 < cut["snapshots"] < parsed["snapshots"] and cut["peak_heap_bytes"] <= parsed["peak_heap_bytes"]
    with pytest.raises(BpcpError, match="no complete snapshot"):
        parse_massif(text[:200])


# ------------------------------------------------------------------ the bpcp-profile helper, parsed by bpcp
ALLOC = "import time; x = bytearray(50_000_000); time.sleep(0.2); print(len(x))"


def _helper(out: Path, *command: str, massif: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/python3", str(HELPER), "--out", str(out)] + (["--massif"] if massif else [])
                          + ["--", *command], capture_output=True, text=True, timeout=600)


def test_helper_keeps_raw_outputs_and_bpcp_parses_them(tmp_path):
    """The helper only runs and keeps time.txt and massif.out.*; `bpcp profile --parse` reads the
    50 MB allocation from them (peak RSS from time -v, massif's heap peak)."""
    require("valgrind", shutil.which("valgrind"), "valgrind not installed (role massif)")
    proc = _helper(tmp_path / "alloc", sys.executable, "-c", ALLOC, massif=True)
    assert proc.returncode == 0, proc.stderr
    helper = json.loads((tmp_path / "alloc" / "bpcp-profile.json").read_text())
    assert helper["command"][0] == sys.executable and helper["exit_code"] == 0 and helper["wall_seconds"] >= 0.2
    assert "max_rss_kib" not in helper and "massif_peak_heap_bytes" not in helper     # parsing is bpcp's
    assert helper["massif"]["exit_code"] == 0 and helper["massif"]["outs"]
    [parsed] = json.loads(_bpcp("profile", "--parse", str(tmp_path / "alloc")).stdout)
    assert parsed["time"]["max_rss_bytes"] >= 50_000_000 and parsed["time"]["wall_seconds"] >= 0.2
    assert parsed["massif"]["error"] is None and parsed["massif"]["peak_heap_bytes"] >= 50_000_000
    assert parsed == read_raw(tmp_path / "alloc")

    failing = _helper(tmp_path / "fail", "sh", "-c", "exit 7")
    assert failing.returncode == 7
    assert json.loads((tmp_path / "fail" / "bpcp-profile.json").read_text())["exit_code"] == 7
    assert read_raw(tmp_path / "fail")["time"]["exit_code"] == 7
    bad = subprocess.run(BPCP + ["profile", "--parse", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no readable bpcp-profile.json" in bad.stderr


def test_helper_runs_massif_with_an_interpreting_jvm_and_bpcp_names_a_5x_crash(planned, tmp_path):
    """The massif run gets -Xint in JAVA_TOOL_OPTIONS (the plain run does not); a massif run that
    fails makes the helper exit 3, and importing it into a 5.x plan says why massif cannot."""
    require("valgrind", shutil.which("valgrind"), "valgrind not installed (role massif)")
    probe = ("import os, sys; o = os.environ.get('JAVA_TOOL_OPTIONS', ''); print('opts=' + o); "
             "sys.exit(1 if '-Xint' in o else 0)")
    job = json.loads((planned / "plan.json").read_text())["jobs"][0]
    folder = tmp_path / "remote" / job["id"]
    proc = _helper(folder, sys.executable, "-c", probe, massif=True)
    assert proc.returncode == 3, proc.stderr
    assert "opts=-Xint" in (folder / "massif.log").read_text()
    assert "-Xint" not in (folder / "command.log").read_text()
    version = json.loads((planned / "plan.json").read_text())["cellprofiler"]["version"]
    (folder / "meta.json").write_text(json.dumps({"job": job["id"], "image_sets": len(job["image_numbers"]),
                                                  "cellprofiler_version": version}))
    _bpcp("profile", "-o", str(planned), "--import", str(folder))
    prof = json.loads((planned / "profile.json").read_text())
    m = prof["runs"][0]["massif"]
    assert m["peak_heap_bytes"] is None and m["error"].startswith("massif run failed (exit 1)")
    if version.startswith("5"):
        assert "crashes under valgrind" in prof["massif_note"]


def test_helper_without_valgrind_or_a_writable_folder_is_one_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}          # no valgrind on PATH
    proc = subprocess.run(["/usr/bin/python3", str(HELPER), "--out", str(tmp_path / "m"), "--massif", "--", "/bin/true"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr == "bpcp-profile: valgrind: No such file or directory (install it: ansible-playbook site.yml, " \
        "role massif)\n"
    (tmp_path / "file").write_text("")
    proc = _helper(tmp_path / "file" / "out", "/bin/true")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Not a directory" in proc.stderr, proc.stderr


# ------------------------------------------------------------------ the job runner's command, measured
WRAPPER = ("import json, os, sys; json.dump({'argv': sys.argv[1:], 'env': dict(os.environ), 'cwd': os.getcwd()}, "
           "open(os.environ['SEEN'], 'w'))")


def _runner_command(run: Path, job: str) -> dict:
    proc = subprocess.run(["python3", str(run / "bpcp_runner.py"), "command", "--run-dir", str(run), job],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def test_runner_measure_runs_the_jobs_command_and_environment_under_a_wrapper(planned, tmp_path, monkeypatch):
    """`bpcp_runner.py measure JOB --out DIR -- WRAPPER...`: the wrapper gets its own arguments
    (a '--' of its own included) and then exactly the job's CellProfiler command, in the job's
    environment (threads pinned, Java options on 4.x), with outputs under DIR."""
    _bpcp("render", "-o", str(planned))
    job = json.loads((planned / "plan.json").read_text())["jobs"][0]["id"]
    monkeypatch.setenv("SEEN", str(tmp_path / "seen.json"))
    out = tmp_path / "measured"
    proc = subprocess.run(["python3", str(planned / "bpcp_runner.py"), "measure", "--run-dir", str(planned), job,
                           "--out", str(out), "--", sys.executable, "-c", WRAPPER, "--out", "x", "--"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["argv"][:3] == ["--out", "x", "--"]
    expected = _runner_command(planned, job)
    work = str(planned / "work" / job)
    assert [a.replace(str(out), work) for a in seen["argv"][3:]] == expected["argv"]
    assert {k: seen["env"].get(k) for k in expected["env"]} == expected["env"]
    assert seen["env"]["OMP_NUM_THREADS"] == "1" and seen["cwd"] == str(out)
    refused = subprocess.run(["python3", str(planned / "bpcp_runner.py"), "command", "--run-dir", str(planned), job,
                              "--", "x"], capture_output=True, text=True)
    assert refused.returncode == 2 and "only measure runs a wrapper" in refused.stderr
    missing = subprocess.run(["python3", str(planned / "bpcp_runner.py"), "measure", "--run-dir", str(planned), job,
                              "--out", str(out), "--", str(tmp_path / "no-such-wrapper")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr == f"bpcp: {job}: cannot start {tmp_path / 'no-such-wrapper'}: " \
        "No such file or directory\n"


@pytest.mark.cellprofiler
@pytest.mark.slow
def test_profile_yml_measures_the_runners_command_on_the_worker(planned, cp_venv, tmp_path):
    """profile.yml on this machine as the worker (default inventory): a run folder that was only
    planned is rendered, the job is measured through bpcp_runner.py measure and the helper, and
    bpcp parses what came back into profile.json."""
    plan = json.loads((planned / "plan.json").read_text())
    job = plan["jobs"][-1]
    assert not (planned / "runner.json").exists()
    proc = subprocess.run([ANSIBLE_PLAYBOOK, "playbooks/profile.yml", "-e", f"output={planned}",
                           "-e", f"cellprofiler_version={Path(cp_venv).name}", "-e", f"profile_helper={HELPER}",
                           "-e", json.dumps({"profile_jobs": [job["id"]]})],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert (planned / "runner.json").exists() and (planned / "bpcp_runner.py").exists()
    raw = planned / "profile" / "remote-localhost" / job["id"]
    helper = json.loads((raw / "bpcp-profile.json").read_text())
    scratch = str(Path(helper["command"][helper["command"].index("-p") + 1]).parent)
    assert scratch != str(planned) and scratch.endswith(".bpcp-profile")
    work = str(planned / "work" / job["id"])
    measured = [a.replace(f"{scratch}/{job['id']}", work).replace(scratch, str(planned)) for a in helper["command"]]
    assert measured == _runner_command(planned, job["id"])["argv"]      # the job's own command, nothing else
    prof = json.loads((planned / "profile.json").read_text())
    (run,) = prof["runs"]
    assert run["job"] == job["id"] and run["image_sets"] == len(job["image_numbers"])
    assert run["max_rss_bytes"] == read_raw(raw)["time"]["max_rss_bytes"] > 100 * 2**20
    assert not Path(scratch).exists()


def test_profile_yml_stops_in_one_line_when_the_worker_lacks_the_helper(planned, cp_venv, tmp_path):
    proc = subprocess.run([ANSIBLE_PLAYBOOK, "playbooks/profile.yml", "-e", f"output={planned}",
                           "-e", f"cellprofiler_version={Path(cp_venv).name}",
                           "-e", f"profile_helper={tmp_path / 'no-such-helper'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert f"localhost has no {tmp_path / 'no-such-helper'}: run ansible-playbook site.yml" in proc.stdout, \
        proc.stdout[-3000:]
    assert "Measure each job" not in proc.stdout and not (planned / "profile.json").exists()
