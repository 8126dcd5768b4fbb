"""Executing a rendered job script on this host, with its progress on the terminal."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from bpcp import cellprofiler as cpmod
from bpcp.errors import BpcpError
from bpcp.render import RunSettings, parse_sshlogins, write_script
from bpcp.runfolder import RunFolder, read_plan


def cellprofiler_for(plan: dict, override: str | None = None) -> cpmod.CellProfiler:
    """The CellProfiler a plan was made with (or the override), with the plan's version."""
    spec = override or plan["cellprofiler"].get("executable")
    cp = cpmod.locate(spec)
    return cp.with_version(plan["cellprofiler"]["version"])


def render(run: RunFolder, settings: RunSettings, cellprofiler: str | None = None,
           sshloginfile: Path | None = None) -> Path:
    plan = read_plan(run)
    cp = cellprofiler_for(plan, cellprofiler)
    sshlogins = None
    if sshloginfile is not None:
        if not Path(sshloginfile).is_file():
            raise BpcpError(f"{sshloginfile}: sshlogin file not found; list one host per line (':' is this host)")
        sshlogins = parse_sshlogins(Path(sshloginfile).read_text(), str(sshloginfile))
    if any(job.get("fetch") for job in plan["jobs"]) and (not sshlogins or ":" in
                                                          [s.partition("/")[2] or s for s in sshlogins]):
        from bpcp.s3 import check_fetcher

        check_fetcher(settings.s3_python)     # workers: run.yml checks each before any job starts
    return write_script(run, plan, settings, cp.argv(), cp.env, sshlogins)


def execute(run: RunFolder) -> int:
    """Run jobs.sh to the end; its exit status is GNU parallel's (the number of failed jobs)."""
    if not run.jobs_script.exists():
        raise BpcpError(f"{run.root}: no jobs.sh; run `bpcp render --output {run.root}` first")
    proc = subprocess.Popen(["bash", str(run.jobs_script)], cwd=run.root)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The terminal sent SIGINT to the whole group; let parallel stop its jobs cleanly.
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
