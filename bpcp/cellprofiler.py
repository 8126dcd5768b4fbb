"""Finding a CellProfiler install and asking it questions (via cp_probe.py under its own Python)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bpcp.errors import BpcpError

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
        """The command prefix for a headless run. 5.x must be told to use imageio (offline)."""
        argv = [str(self.executable)]
        if self.major >= 5:
            argv += ["-e", "imageio_reader"]
        return argv

    def with_version(self, version: str) -> "CellProfiler":
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
    if path.is_dir():
        executable = path / "bin" / "cellprofiler"
    else:
        executable = path
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
    return CellProfiler(executable=executable, python=python)


def probe(
    cp: CellProfiler, pipeline: Path, file_list: Path | None = None, batch: bool = False,
    timeout: float = 600,
) -> dict:
    """Run cp_probe.py under CellProfiler's Python; return its JSON (raises on failure).

    A pipeline alone (no file list, no batch file) is probed once per pipeline content and
    CellProfiler install: the answer is kept in the cache folder, saving a CellProfiler start-up
    (seconds) on every later plan of it, e.g. run.yml's check and then its run.
    """
    cached = _cache_file(cp, pipeline) if file_list is None and not batch else None
    if cached is not None and cached.is_file():
        try:
            return json.loads(cached.read_text())
        except ValueError:
            pass
    result = _run_probe(cp, pipeline, file_list, batch, timeout)
    if cached is not None:
        from bpcp.runfolder import write_atomic

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


def _cache_file(cp: CellProfiler, pipeline: Path) -> Path | None:
    try:
        digest = hashlib.sha256()
        digest.update(Path(pipeline).read_bytes())
        digest.update(PROBE.read_bytes())
        stat = Path(cp.executable).stat()
        digest.update(f"{cp.executable}:{stat.st_mtime_ns}:{stat.st_size}:{sorted(cp.env.items())}".encode())
    except OSError:
        return None
    return cache_dir() / "probe" / f"{digest.hexdigest()}.json"


def _run_probe(cp: CellProfiler, pipeline: Path, file_list: Path | None, batch: bool, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bpcp-probe-") as tmp:
        out = Path(tmp) / "probe.json"
        argv = [str(cp.python), str(PROBE), "--pipeline", str(pipeline), "--out", str(out)]
        if file_list is not None:
            argv += ["--file-list", str(file_list)]
        if batch:
            argv.append("--batch")
        env = {**os.environ, **cp.env, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
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
