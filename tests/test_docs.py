"""docs/run-folder.md describes exactly the fields the code writes; every command is documented."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from bpcp import planfile
from bpcp.cli import build_parser
from bpcp.inputs.cellprofiler import CellProfiler
from bpcp.jobs.render import RunSettings, runner_config

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "run-folder.md").read_text()


def table_fields(heading: str, first_after: str | None = None) -> set[str]:
    """The backquoted names in the first column of the first table after a heading (or after a
    line starting with first_after)."""
    text = DOC.split(heading, 1)[1]
    if first_after:
        text = text.split(first_after, 1)[1]
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    names: set[str] = set()
    for row in rows[2:]:
        names.update(re.findall(r"`([a-z_0-9]+)`", row.split("|")[1]))
    return names


def test_plan_fields_are_documented():
    top = {f.name for f in dataclasses.fields(planfile.Plan)}
    assert table_fields("## plan.json") == top
    job = {f.name for f in dataclasses.fields(planfile.Job)}
    assert table_fields("## plan.json", "Each job:") == job
    for record in (planfile.Dataset, planfile.Pipeline, planfile.CellProfilerInfo, planfile.Bundling):
        for field in dataclasses.fields(record):
            assert f"`{field.name}`" in DOC.split("## plan.json", 1)[1].split("Each job:", 1)[0], field.name


def test_runner_settings_are_documented():
    plan = planfile.from_dict({
        "format": planfile.FORMAT, "dataset": {"kind": "loaddata", "path": "/x.csv", "sha256": ""},
        "pipeline": {"path": "/p", "file": "pipeline.cppipe", "sha256": ""}, "cellprofiler": {"version": "5"},
        "group_by": [], "bundle": {"asked": 0, "slots": 1, "sets_per_job": 0}, "numbering": "local",
        "tables": ["Image"], "table_files": {"Image": "Image.csv"}, "delimiter": ",", "image_sets": 0, "jobs": []})
    config = runner_config(plan, Path("/run"), RunSettings(), CellProfiler(Path("/cp"), Path("/py")), False)
    assert table_fields("## runner.json") == set(config)


def test_s3_upload_record_is_documented():
    from bpcp.aws.uploader import Uploaded

    assert table_fields("## s3-uploaded.jsonl") == {f.name for f in dataclasses.fields(Uploaded)}


def test_every_command_has_help_and_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        assert sub.description or sub.format_help(), name
        assert f"bpcp {name}" in readme, f"`bpcp {name}` is not in README.md"
