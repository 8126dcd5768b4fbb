"""Finding a CellProfiler install and asking it questions (via cp_probe.py under its own Python)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bpcp.errors import BpcpError
from bpcp.jobs.runner import base_argv, job_environment, readers
from bpcp.planfile import Plan
from bpcp.runfolder import write_atomic

INSTALL_ROOT = Path("/opt/cellprofiler")
PROBE = Path(__file__).with_name("cp_probe.py")


@dataclass(frozen=True)
class CellProfiler:
    """A CellProfiler install: its executable, its Python, and how to call it headless."""

    executable: Path
    python: Path
    version: str = "unknown"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def major(self) -> int:
        try:
            return int(self.version.split(".")[0])
        except ValueError:
            return 0

    def argv(self) -> list[str]:
        """The command prefix for a headless run (the job runner owns the rule)."""
        return base_argv(str(self.executable), self.version)

    def with_version(self, version: str) -> CellProfiler:
        return CellProfiler(self.executable, self.python, version, _java_env(version))


def _java_env(version: str) -> dict[str, str]:
    """CellProfiler 4.x needs a JDK; export JAVA_HOME when the caller has none."""
    if not version.startswith("4") or os.environ.get("JAVA_HOME"):
        return {}
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    for candidate in (f"/usr/lib/jvm/java-17-openjdk-{arch}", f"/usr/lib/jvm/java-11-openjdk-{arch}"):
        if Path(candidate).is_dir():
            return {"JAVA_HOME": candidate}
    return {}


def locate(spec: str | None = None) -> CellProfiler:
    """Find CellProfiler from a venv folder, an executable in a venv, or an installed version name.

    Order: spec, $BPCP_CELLPROFILER, /opt/cellprofiler/current (the role's default version).
    """
    spec = spec or os.environ.get("BPCP_CELLPROFILER") or str(INSTALL_ROOT / "current")
    path = Path(spec).expanduser()
    if not path.exists() and "/" not in spec:
        path = INSTALL_ROOT / spec  # a version name such as "5.0" or "4.2.8.1"
    executable = path / "bin" / "cellprofiler" if path.is_dir() else path
    if not executable.exists():
        found = shutil.which(spec) if "/" not in spec else None
        hint = f" (found {found} on PATH: pass the venv folder it runs from)" if found else ""
        raise BpcpError(
            f"CellProfiler not found at {spec}{hint}; install it with `ansible-playbook site.yml` "
            "or pass --cellprofiler /path/to/cellprofiler-venv"
        )
    python = executable.parent / "python"
    if not python.exists():
        raise BpcpError(
            f"{executable} is not inside a Python virtualenv (no {python}); "
            "pass --cellprofiler with the venv folder CellProfiler is installed in"
        )
    return CellProfiler(executable=executable, python=python).with_version(installed_version(executable))


def installed_version(executable: Path) -> str:
    """CellProfiler's version from its venv's dist-info (no start-up), or "unknown"."""
    root = Path(executable).parent.parent
    for info in sorted(root.glob("lib/python*/site-packages/[cC]ell[pP]rofiler*-*.dist-info")):
        match = re.match(r"[cC]ell[pP]rofiler(?:_nightly)?-(.+)\.dist-info", info.name)
        if match:
            return match.group(1)
    return "unknown"


AUTO = "auto"


def saved_with(pipeline: Path) -> str | None:
    """The CellProfiler version a .cppipe was saved with, from its DateRevision header (4281 is
    4.2.8.1, 500 is 5.0.0; older pipelines carry a date there), or None when it does not say."""
    try:
        with open(pipeline, "rb") as fd:
            head = fd.read(4096).decode("utf-8", "replace")
    except OSError:
        return None
    match = re.search(r"^DateRevision:\s*(\d+)\s*$", head, re.M)
    if not match:
        return None
    revision = match.group(1)
    if len(revision) > 5:
        return "3 or older"
    return ".".join(revision[:3]) + (f".{revision[3:]}" if len(revision) > 3 else "")


def installed() -> dict[str, Path]:
    """Versions installed by the cellprofiler role under /opt/cellprofiler: version -> venv folder."""
    found: dict[str, Path] = {}
    if INSTALL_ROOT.is_dir():
        for folder in sorted(INSTALL_ROOT.iterdir()):
            exe = folder / "bin" / "cellprofiler"
            if folder.name != "current" and exe.exists() and (folder / "bin" / "python").exists():
                found.setdefault(installed_version(exe), folder)
    return found


def choose(spec: str | None, pipeline: Path) -> tuple[CellProfiler, str | None]:
    """The CellProfiler to plan a pipeline with, and a note when it is not the one that saved it.

    An explicit --cellprofiler or $BPCP_CELLPROFILER wins. With "auto" (the default): an installed
    version of the same major.minor as the one that saved the pipeline, else the default install.
    """
    if spec not in (None, AUTO) or os.environ.get("BPCP_CELLPROFILER"):
        return locate(None if spec == AUTO else spec), None
    saved = saved_with(pipeline)
    versions = installed()
    if saved is None or saved.startswith("3"):
        cp = locate(None)
        return cp, (None if saved is None else f"{pipeline.name} was saved with CellProfiler {saved}; "
                    f"CellProfiler {cp.version} will run it (open and re-save it there to check its settings)")
    wanted = saved.split(".")[:2]
    same = [v for v in versions if v.split(".")[:2] == wanted]
    if same:
        exact = [v for v in same if v.startswith(saved)] or same
        return locate(str(versions[exact[0]])), None
    cp = locate(None)
    return cp, (f"{pipeline.name} was saved with CellProfiler {saved}, which is not installed here; CellProfiler "
                f"{cp.version} will run it (install {saved} with ansible-playbook site.yml -e cellprofiler_version=..., "
                "or pass --cellprofiler)")


def for_plan(plan: Plan, override: str | None = None) -> CellProfiler:
    """The CellProfiler a plan was made with (or the override), with the plan's version."""
    spec = plan.cellprofiler.executable if override in (None, AUTO) else override
    return locate(spec).with_version(plan.cellprofiler.version)


def probe(
    cp: CellProfiler, pipeline: Path, file_list: Path | None = None, batch: bool = False,
    timeout: float = 600, data_file: Path | None = None,
) -> dict:
    """Run cp_probe.py under CellProfiler's Python; return its JSON (raises on failure).

    A pipeline alone (no file list, no batch file), or with a LoadData CSV (data_file: numbered
    as one run would), is probed once per content and CellProfiler install: the answer is kept
    in the cache folder, saving a CellProfiler start-up (seconds) on every later plan of it, e.g.
    run.yml's check and then its run.
    """
    cached = _cache_file(cp, pipeline, data_file) if file_list is None and not batch else None
    if cached is not None and cached.is_file():
        try:
            return json.loads(cached.read_text())
        except ValueError:
            pass
    result = _run_probe(cp, pipeline, file_list, batch, timeout, data_file)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cached, json.dumps(result))
        except OSError:
            pass              # a read-only home only costs the next plan a start-up
    return result


def cache_dir() -> Path:
    """$BPCP_CACHE, else $XDG_CACHE_HOME/bpcp, else ~/.cache/bpcp."""
    if os.environ.get("BPCP_CACHE"):
        return Path(os.environ["BPCP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bpcp"


def _cache_file(cp: CellProfiler, pipeline: Path, data_file: Path | None = None) -> Path | None:
    try:
        digest = hashlib.sha256()
        digest.update(Path(pipeline).read_bytes())
        if data_file is not None:
            digest.update(b"\0data-file\0" + Path(data_file).read_bytes())
        digest.update(PROBE.read_bytes())
        stat = Path(cp.executable).stat()
        digest.update(f"{cp.executable}:{stat.st_mtime_ns}:{stat.st_size}:{sorted(cp.env.items())}".encode())
    except OSError:
        return None
    return cache_dir() / "probe" / f"{digest.hexdigest()}.json"


def _run_probe(cp: CellProfiler, pipeline: Path, file_list: Path | None, batch: bool, timeout: float,
               data_file: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bpcp-probe-") as tmp:
        out = Path(tmp) / "probe.json"
        argv = [str(cp.python), str(PROBE), "--pipeline", str(pipeline), "--out", str(out),
                "--readers", ",".join(readers(cp.version))]
        if file_list is not None:
            argv += ["--file-list", str(file_list)]
        if batch:
            argv.append("--batch")
        if data_file is not None:
            argv += ["--data-file", str(data_file)]
        env = job_environment(cp.version, True, cp.env)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise BpcpError(f"CellProfiler at {cp.executable} could not be started: {tail[0]}")
        result = json.loads(out.read_text())
    if not result.get("ok"):
        raise BpcpError(
            f"{pipeline}: CellProfiler {result.get('cellprofiler_version', '')} cannot load it: "
            f"{result.get('error')}; open it in CellProfiler, fix or re-save it, and try again"
        )
    return result
