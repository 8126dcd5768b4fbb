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

from bpcp.errors import BpcpError
from bpcp.profile import choose, derive, parse_massif, parse_time_v

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
    plan = {"image_sets": 16, "dataset": {"kind": "loaddata"},
            "jobs": [{"id": f"j{i}", "image_numbers": [0, 1]} for i in range(8)]}
    chosen = choose(plan)
    assert [s.image_sets for s in chosen] == [1, 2, 8] and chosen[2].rows[-1] == ("j3", 1)
    uneven = {**plan, "jobs": [{"id": "big", "image_numbers": list(range(9))}, {"id": "small", "image_numbers": [0]}]}
    assert [(s.label, s.image_sets) for s in choose(uneven)] == [("small", 1), ("big", 9)]
    with pytest.raises(BpcpError, match="LoadData"):
        choose({**plan, "dataset": {"kind": "filelist"}})
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
    proc = _bpcp("profile", "-o", str(planned), "--jobs", job["id"], "--massif", "--massif-timeout", "60")
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
    if shutil.which("ms_print") is None:
        pytest.skip("ms_print not installed (comes with valgrind: ansible-playbook site.yml)")
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
