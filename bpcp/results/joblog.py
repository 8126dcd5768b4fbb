"""GNU parallel's joblog (joblog.tsv): the one reader of it. One line per attempt of a job."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Attempt:
    """One line of the joblog: one attempt of one job."""
    seq: int
    host: str
    start: float
    runtime: float
    exitval: int
    signal: int
    job: str
    image_sets: int
    slot: int = 0

    @property
    def end(self) -> float:
        return self.start + self.runtime

    @property
    def ok(self) -> bool:
        return self.exitval == 0 and self.signal == 0


def read_joblog(path: Path) -> tuple[list[Attempt], list[str]]:
    """Attempts from a GNU parallel joblog; header lines (one per session) and torn lines skipped."""
    attempts, notes = [], []
    if not path.exists():
        return [], [f"{path.name}: not there (no job has run yet)"]
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip() or line.startswith("Seq\t"):
            continue
        parts = line.split("\t")
        if len(parts) < 9:
            notes.append(f"{path.name} line {number}: {len(parts)} fields, expected 9; skipped")
            continue
        try:
            seq, start, runtime = int(parts[0]), float(parts[2]), float(parts[3])
            exitval, sig = int(parts[6]), int(parts[7])
        except ValueError:
            notes.append(f"{path.name} line {number}: not a joblog line; skipped")
            continue
        words = "\t".join(parts[8:]).split()
        if len(words) >= 2 and words[0] == "bpcp_job":        # jobs.sh: bpcp_job ID IMAGE_SETS
            job = words[1]
            try:
                sets = int(words[2]) if len(words) > 2 else 0
            except ValueError:
                sets = 0
        else:
            job, sets = " ".join(words), 0
        attempts.append(Attempt(seq, parts[1], start, runtime, exitval, sig, job, sets))
    return attempts, notes
