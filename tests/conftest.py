"""Shared fixtures. `cellprofiler_cmd`: the argv prefix of a real CellProfiler, or a clean skip."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DEFAULTS = ("/opt/cellprofiler/current", "/opt/cellprofiler/5.0")
JAVA_HOMES = ("/usr/lib/jvm/java-17-openjdk-amd64", "/usr/lib/jvm/java-17-openjdk-arm64")


def _executable(spec: str) -> Path | None:
    path = Path(spec)
    exe = path / "bin" / "cellprofiler" if path.is_dir() else path
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def _version(exe: Path) -> str:
    """Read the version from the venv's dist-info (no 3 s CellProfiler start-up)."""
    for info in sorted(exe.parent.parent.glob("lib/python*/site-packages/[cC]ell[pP]rofiler-*.dist-info")):
        match = re.match(r"[cC]ell[pP]rofiler-(.+)\.dist-info", info.name)
        if match:
            return match.group(1)
    return "unknown"


def find_cellprofiler() -> tuple[list[str], str] | None:
    """BPCP_CELLPROFILER (venv folder or executable), else the default install folders."""
    specs = [os.environ["BPCP_CELLPROFILER"]] if os.environ.get("BPCP_CELLPROFILER") else list(DEFAULTS)
    for spec in specs:
        exe = _executable(spec)
        if exe:
            version = _version(exe)
            argv = [str(exe)]
            if not version.startswith("4"):
                argv += ["-e", "imageio_reader"]  # 5.x: no Bio-Formats download (offline)
            return argv, version
    return None


@pytest.fixture(scope="session")
def cellprofiler_cmd() -> list[str]:
    found = find_cellprofiler()
    if found is None:
        where = os.environ.get("BPCP_CELLPROFILER") or " or ".join(DEFAULTS)
        pytest.skip(f"no CellProfiler at {where} (set BPCP_CELLPROFILER to a venv or executable)")
    argv, version = found
    if version.startswith("4") and not os.environ.get("JAVA_HOME"):
        for home in JAVA_HOMES:
            if Path(home).is_dir():
                os.environ["JAVA_HOME"] = home
    return argv
