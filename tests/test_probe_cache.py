"""The pipeline probe is asked once per pipeline content and CellProfiler install."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bpcp import cellprofiler as cpmod

pytestmark = pytest.mark.cellprofiler


def test_probe_answers_from_the_cache_and_only_for_the_same_pipeline(cp_venv, example_plate, tmp_path, monkeypatch):
    monkeypatch.setenv("BPCP_CACHE", str(tmp_path / "cache"))
    cp = cpmod.locate(cp_venv)
    pipeline = tmp_path / "p.cppipe"
    pipeline.write_bytes((example_plate / "example_loaddata.cppipe").read_bytes())
    first = cpmod.probe(cp, pipeline)
    assert first["ok"] and len(list((tmp_path / "cache" / "probe").glob("*.json"))) == 1
    # a CellProfiler that cannot start: the answer must come from the cache
    broken = dataclasses.replace(cp, python=Path("/nonexistent/python"))
    assert cpmod.probe(broken, pipeline) == first
    # another pipeline content is probed again (and here fails to start)
    pipeline.write_text(pipeline.read_text() + "\n")
    with pytest.raises(OSError):
        cpmod.probe(broken, pipeline)
