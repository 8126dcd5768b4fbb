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


# ---------------------------------------------------------------- real run folders (merge tests)
# A 4-well x 2-site plate (8 image sets); jobs of 2, 1 and 1 wells. Each fixture runs real
# CellProfiler once per session: about 25-35 s each on 2 cores.
JOB_WELLS = [["A01", "A02"], ["A03"], ["A04"]]


@pytest.fixture(scope="session")
def cp_plate(tmp_path_factory):
    from merge_support import Dataset

    from bpcp.example import PlateSpec, generate_plate

    root = tmp_path_factory.mktemp("plate")
    generate_plate(root, PlateSpec(rows="A", columns=4, sites=2))
    return Dataset.load(root)


@pytest.fixture(scope="session")
def loaddata_run(cellprofiler_cmd, cp_plate, tmp_path_factory):
    """(run folder, reference folder): LoadData pipeline, subset CSV per job, local numbering."""
    from merge_support import build_run

    root = tmp_path_factory.mktemp("loaddata")
    build_run(cellprofiler_cmd, cp_plate, root / "run", cp_plate.plate_dir / "example_loaddata.cppipe",
              "loaddata", JOB_WELLS, reference=root / "ref")
    return root / "run", root / "ref"


@pytest.fixture(scope="session")
def images_run(cellprofiler_cmd, cp_plate, tmp_path_factory):
    """(run folder, reference folder): Images/NamesAndTypes input, grouped by Well, tab-delimited
    MyExpt_*.txt tables with image metadata in the object tables; subset file list per job."""
    from merge_support import build_run, images_variant

    root = tmp_path_factory.mktemp("images")
    pipeline = images_variant(cp_plate.plate_dir / "example_images.cppipe", root / "variant.cppipe")
    build_run(cellprofiler_cmd, cp_plate, root / "run", pipeline, "filelist", [["A01"], ["A02", "A03"], ["A04"]],
              group_by="Metadata_Well", reference=root / "ref",
              plan_extra={"delimiter": "tab", "table_prefix": "MyExpt_"})
    return root / "run", root / "ref"


@pytest.fixture(scope="session")
def global_run(cellprofiler_cmd, cp_plate, tmp_path_factory):
    """Run folder whose jobs ran `-f/-l` over the whole CSV: global numbering (same reference as
    loaddata_run: same pipeline, same data)."""
    from merge_support import build_run

    root = tmp_path_factory.mktemp("global")
    build_run(cellprofiler_cmd, cp_plate, root / "run", cp_plate.plate_dir / "example_loaddata.cppipe",
              "loaddata", JOB_WELLS, ranges=True)
    return root / "run"


def _venv_of(argv: list[str]) -> str:
    return str(Path(argv[0]).parent.parent)


@pytest.fixture(scope="session")
def cp_venv(cellprofiler_cmd) -> str:
    """The CellProfiler venv folder bpcp is pointed at (--cellprofiler)."""
    return _venv_of(cellprofiler_cmd)


@pytest.fixture(scope="session")
def cp42_venv() -> str:
    """CellProfiler 4.2.8.1 (BPCP_CELLPROFILER_42 or /opt/cellprofiler/4.2.8.1), or a clean skip."""
    spec = os.environ.get("BPCP_CELLPROFILER_42", "/opt/cellprofiler/4.2.8.1")
    exe = _executable(spec)
    if exe is None or not _version(exe).startswith("4.2"):
        pytest.skip(f"no CellProfiler 4.2 at {spec} (set BPCP_CELLPROFILER_42)")
    return str(exe.parent.parent)


@pytest.fixture(scope="session")
def example_plate(tmp_path_factory) -> Path:
    """The synthetic example plate (8 wells x 2 sites), written once per session. Read-only for tests."""
    from bpcp.example import generate_plate

    return generate_plate(tmp_path_factory.mktemp("plate"))


# ---------------------------------------------------------------- a local AWS endpoint (issue 5)
@pytest.fixture(scope="session")
def aws_endpoint(tmp_path_factory):
    """moto's server on 127.0.0.1 for the whole session; `aws_endpoint.env` points clients at it."""
    import aws_endpoint as ae

    endpoint = ae.start(tmp_path_factory.mktemp("moto") / "moto.log")
    yield endpoint
    ae.stop(endpoint)


@pytest.fixture
def aws(aws_endpoint, monkeypatch):
    """The endpoint, emptied, with this process's environment pointing at it."""
    aws_endpoint.reset()
    for key, value in aws_endpoint.env.items():
        monkeypatch.setenv(key, value)
    return aws_endpoint
