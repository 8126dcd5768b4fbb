"""Executing a rendered job script on this host, with its progress in image sets (bpcp.jobs.progress)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from bpcp import planfile
from bpcp.aws.s3 import check_fetcher
from bpcp.aws.uploader import uploading
from bpcp.errors import BpcpError
from bpcp.inputs import cellprofiler as cpmod
from bpcp.jobs import progress, sharedfs
from bpcp.jobs.render import RunSettings, parse_sshlogins, write_script
from bpcp.jobs.write import check_run
from bpcp.runfolder import RunFolder


class Engine(Protocol):
    """Runs the jobs of a rendered run folder (docs/architecture.md, "Where a new engine plugs in")."""

    def execute(self, run: RunFolder, live: bool | None = None) -> int: ...


def render(run: RunFolder, settings: RunSettings, cellprofiler: str | None = None,
           sshloginfile: Path | None = None) -> Path:
    plan = planfile.read(run)
    check_run(run, plan)
    cp = cpmod.for_plan(plan, cellprofiler)
    sshlogins = None
    if sshloginfile is not None:
        if not Path(sshloginfile).is_file():
            raise BpcpError(f"{sshloginfile}: sshlogin file not found; list one host per line (':' is this host)")
        sshlogins = parse_sshlogins(Path(sshloginfile).read_text(), str(sshloginfile))
        sharedfs.make_control_dirs(sshlogins)     # GNU parallel's ssh calls need them too
    if any(job.fetch for job in plan.jobs) and (not sshlogins or ":" in
                                                [s.partition("/")[2] or s for s in sshlogins]):
        check_fetcher(settings.s3_python)     # workers: run.yml checks each before any job starts
    # --shared-fs: every host must see the run folder and the images here (auto: else staging)
    shared = bool(sshlogins) and sharedfs.decide(run, plan, sshlogins or [], settings.shared_fs)
    return write_script(run, plan, settings, cp, sshlogins, shared)


def execute(run: RunFolder, live: bool | None = None, slots: int | None = None, engine: Engine | None = None,
            s3_output: str = "") -> int:
    """Run jobs.sh to the end; its exit status is GNU parallel's (the number of failed jobs).
    Another engine (bpcp.jobs.slurm's) runs the rendered jobs its own way instead. With
    s3_output, whichever engine runs, one uploader (bpcp.aws.uploader) copies each job there as it
    is published, and is drained before this returns.

    Its output goes through bpcp.jobs.progress: on a terminal (live, default: stdout is one) a
    live progress line in image sets with jobs.sh's other lines above it, else one line per job
    and a summary a minute. slots (for the ETA) default to those the plan was made for."""
    if engine is not None:
        with uploading(run.root, s3_output):
            return engine.execute(run, live)
    if not run.jobs_script.exists():
        raise BpcpError(f"{run.root}: no jobs.sh; run `bpcp render --output {run.root}` first")
    if live is None:
        live = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"
    if slots is None:
        slots = planfile.read(run).bundle.slots
    watcher = progress.Watcher(run.root, slots, live)
    proc = subprocess.Popen(["bash", str(run.jobs_script)], cwd=run.root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    watcher.start(proc.stdout, proc.stderr)
    try:
        with uploading(run.root, s3_output, watcher.forward):
            try:
                return proc.wait()
            except KeyboardInterrupt:
                # The terminal sent SIGINT to the whole group; let parallel stop its jobs cleanly.
                proc.send_signal(signal.SIGINT)
                proc.wait()
                raise
    finally:
        watcher.stop()
