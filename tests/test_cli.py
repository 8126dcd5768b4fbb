"""The command line for scripts and people: exit statuses, errors on stderr, --json, completion."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BPCP = [sys.executable, "-m", "bpcp"]


def bpcp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(BPCP + list(args), capture_output=True, text=True, timeout=600)


def test_usage_errors_and_bad_input_exit_differently(tmp_path):
    usage = bpcp("run", "--no-such-option")
    assert usage.returncode == 64 and "error: unrecognized arguments: --no-such-option" in usage.stderr
    bad = bpcp("status", "-o", str(tmp_path / "nothing"))
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1
    assert "no plan.json here" in bad.stderr


def test_exit_statuses_are_documented():
    help_text = bpcp("--help").stdout
    readme = (ROOT / "README.md").read_text()
    for code, words in ((0, "every job published"), (1, "some jobs failed"), (2, "bad input"), (64, "usage error"),
                        (130, "interrupted")):
        assert f"  {code} " in help_text and words in help_text, code
        assert f"| {code} |" in readme, f"exit status {code} is not in README.md"


def test_completion_script_knows_the_commands():
    script = bpcp("completion", "bash")
    assert script.returncode == 0
    for word in ("run", "merge", "status", "--sshloginfile", "--bundle"):
        assert word in script.stdout, word
    check = subprocess.run(["bash", "-n"], input=script.stdout, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.cellprofiler
def test_json_of_plan_status_and_merge(example_plate, cp_venv, tmp_path):
    run = tmp_path / "run"
    plan = bpcp("plan", "--json", "--cellprofiler", cp_venv, "-d", str(example_plate / "load_data.csv"),
                "-p", str(example_plate / "example_loaddata.cppipe"), "-o", str(run), "--only", "Well=A01")
    assert plan.returncode == 0, plan.stderr
    doc = json.loads(plan.stdout)
    assert doc["jobs"] == 1 and doc["image_sets"] == 2 and doc["written"] is True and "planned 1 jobs" in plan.stderr
    status = bpcp("status", "-o", str(run), "--json")
    assert status.returncode == 1
    report = json.loads(status.stdout)
    assert report["complete"] is False and report["counts"]["jobs"]["missing"] == 1
    ran = bpcp("run", "-o", str(run), "--no-merge")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    merged = bpcp("merge", "-o", str(run), "--json")
    assert merged.returncode == 0, merged.stderr
    doc = json.loads(merged.stdout)
    assert doc["report"]["complete"] is True and "Image" in doc["merge"]["tables"]
    done = json.loads(bpcp("status", "-o", str(run), "--json").stdout)
    assert done["complete"] is True and done["merged_check"] == "ok"
