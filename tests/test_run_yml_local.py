"""run.yml on the default inventory (this machine): the README's main job, and its bad inputs."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cellprofiler, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")


def run_yml(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([ANSIBLE_PLAYBOOK, "run.yml", *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)


def test_run_yml_on_localhost_ends_complete(example_plate, tmp_path, cp_venv):
    version = Path(cp_venv).name
    proc = run_yml("-e", f"dataset={example_plate / 'load_data.csv'}",
                   "-e", f"pipeline={example_plate / 'example_loaddata.cppipe'}", "-e", f"output={tmp_path / 'run'}",
                   "-e", f"cellprofiler_version={version}")
    assert proc.returncode == 0, proc.stdout[-4000:]
    # bpcp's own default, which run.yml leaves alone: with warm workers one group (well) per job
    jobs = len(json.loads((tmp_path / "run" / "plan.json").read_text())["jobs"])
    assert jobs == 8, jobs
    assert "one group per job" in proc.stdout, proc.stdout[-4000:]
    assert f"COMPLETE: {jobs}/{jobs} jobs done, 8/8 groups, 16/16 image sets" in proc.stdout
    assert f"merged tables in {tmp_path / 'run'}/merged" in proc.stdout
    assert f"the run's report (Gantt chart, job times, failures) in {tmp_path / 'run'}/report.html" in proc.stdout
    assert (tmp_path / "run" / "report.html").is_file()
    # while the jobs ran: their progress in image sets, printed as it came (at the start of a line:
    # not the log's tail shown at the end), no "FAILED - RETRYING" and no skipped tasks
    live = re.findall(r"^bpcp: .*?(\d+)/16 image sets done, (\d+) failed", proc.stdout, re.M)
    assert live and live[-1] == ("16", "0"), proc.stdout[-4000:]
    assert "FAILED - RETRYING" not in proc.stdout and "skipping" not in proc.stdout, proc.stdout[-4000:]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["complete"]
    assert (tmp_path / "run" / "merged" / "Nuclei.parquet").exists()
    # ... and what it merged is what one plain CellProfiler process over the plate gives, value for
    # value, saved overlays named in their own job's published/ folder
    from test_e2e_local import assert_merged_equals, single_process

    reference = single_process(cp_venv, tmp_path / "ref", "-p", str(example_plate / "example_loaddata.cppipe"),
                               "--data-file", str(example_plate / "load_data.csv"))
    assert_merged_equals(reference, tmp_path / "run")
    # the same command again resumes: nothing left to do
    again = run_yml("-e", f"dataset={example_plate / 'load_data.csv'}",
                    "-e", f"pipeline={example_plate / 'example_loaddata.cppipe'}", "-e", f"output={tmp_path / 'run'}",
                    "-e", f"cellprofiler_version={version}")
    assert again.returncode == 0 and f"{jobs} of {jobs} jobs already published, 0 to run" in again.stdout


def test_run_yml_without_a_pipeline_says_what_it_needs(tmp_path):
    proc = run_yml("-e", f"output={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "run.yml needs -e dataset=PATH" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_run_yml_reports_preflight_problems_before_touching_hosts(example_plate, tmp_path, cp_venv):
    proc = run_yml("-e", f"dataset={example_plate / 'load_data.csv'}",
                   "-e", f"pipeline={example_plate / 'example_loaddata.cppipe'}", "-e", f"output={tmp_path / 'run'}",
                   "-e", "group_by=Plate,Row", "-e", f"cellprofiler_version={Path(cp_venv).name}")
    assert proc.returncode != 0
    assert "group key Metadata_Row not found" in proc.stdout
    assert "Check the workers" not in proc.stdout
    assert not (tmp_path / "run" / "plan.json").exists()


def test_run_yml_refuses_a_cellprofiler_version_the_hosts_do_not_have(example_plate, tmp_path):
    proc = run_yml("-e", f"dataset={example_plate / 'load_data.csv'}",
                   "-e", f"pipeline={example_plate / 'example_loaddata.cppipe'}", "-e", f"output={tmp_path / 'run'}",
                   "-e", "cellprofiler_version=3.1.9")
    assert proc.returncode != 0
    assert "CellProfiler not found at /opt/cellprofiler/3.1.9" in proc.stdout


def test_run_yml_check_mode_plans_nothing_and_runs_nothing(example_plate, tmp_path, cp_venv):
    """--check: the inputs are checked and the plan shown, but no run folder is written."""
    proc = run_yml("--check", "-e", f"dataset={example_plate / 'load_data.csv'}",
                   "-e", f"pipeline={example_plate / 'example_loaddata.cppipe'}", "-e", f"output={tmp_path / 'run'}",
                   "-e", f"cellprofiler_version={Path(cp_venv).name}")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "would plan" in proc.stdout and "16 image sets" in proc.stdout
    assert not (tmp_path / "run").exists()
