"""The pipeline probe is asked once per pipeline content and CellProfiler install."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bpcp.inputs import cellprofiler as cpmod

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


def test_auto_picks_the_installed_version_that_saved_the_pipeline(tmp_path, monkeypatch):
    """--cellprofiler auto: 4.2.x for a pipeline saved by 4.2.8.1 when it is installed; a one-line
    note (and the default install) when the saving version is not installed."""
    from bpcp.inputs import cellprofiler as cpmod

    monkeypatch.delenv("BPCP_CELLPROFILER", raising=False)
    versions = cpmod.installed()
    text = (Path(__file__).resolve().parents[1] / "bpcp" / "data" / "example_loaddata.cppipe").read_text()
    assert "DateRevision:4281" in text
    saved42 = tmp_path / "p42.cppipe"
    saved42.write_text(text)
    assert cpmod.saved_with(saved42) == "4.2.8.1"
    cp, note = cpmod.choose("auto", saved42)
    if "4.2.8.1" in versions:
        assert (cp.version, note) == ("4.2.8.1", None)
    else:
        assert "saved with CellProfiler 4.2.8.1, which is not installed here" in note
    saved3 = tmp_path / "p3.cppipe"
    saved3.write_text(text.replace("DateRevision:4281", "DateRevision:300"))
    cp, note = cpmod.choose(None, saved3)
    assert note.startswith("p3.cppipe was saved with CellProfiler 3.0.0; CellProfiler ") and "re-save it" in note
    explicit, none = cpmod.choose(str(cp.executable.parent.parent), saved42)
    assert explicit.executable == cp.executable and none is None
