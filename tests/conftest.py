"""Shared fixtures. `cellprofiler_cmd`: the argv prefix of a real CellProfiler, or a clean skip.

Every fixture or test that needs a real component (CellProfiler, 4.2.8.1, Docker, ms_print,
Chromium, CytoTable, a tmpfs mount, ...) asks for it through `require`: a missing one skips the
test on a developer's machine and fails it under CI (BPCP_CI=1, or CI=true as CI sets it), so CI
never passes by skipping. Each session also gets its own probe cache (BPCP_CACHE) and its own
temp root for jobs (`session_tmp_root`), so no test sees another session's leftovers.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

RAMDISK = Path("/mnt/bpcp-ramdisk")


def in_ci() -> bool:
    """BPCP_CI=1 (or 0 to say no), else CI=true/1 as CI runners set it."""
    value = os.environ.get("BPCP_CI")
    if value is None:
        value = os.environ.get("CI", "")
    return value.strip().lower() in ("1", "true", "yes")


def require(component: str, available: object, why: str) -> None:
    """Go on when `available` is true; else skip (a developer's machine) or fail (under CI).

    `why` says what is missing and how to get it, e.g. "no chromium (apt-get install -y chromium)"."""
    if available:
        return
    if in_ci():
        pytest.fail(f"{component} is required under CI and missing: {why} (.ci/run installs it)", pytrace=False)
    pytest.skip(f"{component}: {why}")


_SESSION_CACHE: list[str] = []


def pytest_configure(config):
    """A probe cache of this session's own (BPCP_CACHE, inherited by every bpcp the tests start),
    unless the caller chose one: no test reads an answer another session or a user left."""
    if not os.environ.get("BPCP_CACHE"):
        _SESSION_CACHE.append(tempfile.mkdtemp(prefix="bpcp-test-cache-"))
        os.environ["BPCP_CACHE"] = _SESSION_CACHE[0]


def pytest_unconfigure(config):
    for folder in _SESSION_CACHE:
        shutil.rmtree(folder, ignore_errors=True)


def ramdisk_mounted(path: Path = RAMDISK) -> bool:
    try:
        mounts = Path("/proc/mounts").read_text()
    except OSError:
        return False
    return f" {path} tmpfs " in mounts and os.access(path, os.W_OK)


@pytest.fixture(scope="session")
def session_tmp_root(tmp_path_factory):
    """This session's own temp root for jobs (pass it as --tmp-root): a folder on the RAM disk when
    one is mounted, else under the session's tmp folder; removed at the end of the session. Tests
    that look for jobs' temp folders look only here: other sessions' runs leave theirs elsewhere."""
    if ramdisk_mounted():
        root = RAMDISK / f"bpcp-tests-{os.getpid()}-{secrets.token_hex(4)}"
        root.mkdir()
    else:
        root = tmp_path_factory.mktemp("tmp-root")
    yield root
    shutil.rmtree(root, ignore_errors=True)

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
    where = os.environ.get("BPCP_CELLPROFILER") or " or ".join(DEFAULTS)
    require("CellProfiler", found, f"no CellProfiler at {where} (set BPCP_CELLPROFILER to a venv or executable)")
    assert found is not None
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
    from bpcp.example import PlateSpec, generate_plate

    from merge_support import Dataset

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
              plan_extra={"delimiter": "\t", "prefix": "MyExpt_"})
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
    require("CellProfiler 4.2.8.1", exe is not None and _version(exe).startswith("4.2"),
            f"no CellProfiler 4.2 at {spec} (set BPCP_CELLPROFILER_42; make test installs it when a Python 3.9 is found)")
    assert exe is not None
    return str(exe.parent.parent)


@pytest.fixture(scope="session")
def cytotable_python() -> Path:
    """The Python of a CytoTable environment (BPCP_CYTOTABLE_PYTHON; scripts/make-cytotable-env.sh
    makes one from PyPI at pinned versions, outside the repository), or a skip (a failure under CI)."""
    value = os.environ.get("BPCP_CYTOTABLE_PYTHON", "")
    require("CytoTable", value and Path(value).is_file(),
            f"BPCP_CYTOTABLE_PYTHON={value!r} is not a Python; make the environment and point at it: "
            'export BPCP_CYTOTABLE_PYTHON="$(bash scripts/make-cytotable-env.sh | tail -n 1)"')
    return Path(value)


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
