"""damaged/: published jobs found damaged, moved aside (never deleted) so that they are rerun.

damaged/<job>-<UTC time>/ is the job's published folder as it was found; damaged/<job>-<UTC
time>.json beside it says why (job, folder, reason, moved). A moved job is no longer in published/,
so the next `bpcp run` reruns it (jobs.sh runs every job that is not published).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from bpcp.jobs.runner import write_atomic

DAMAGED = "damaged"


def move_aside(run_dir: Path, job: str, reason: str) -> Path:
    """Move published/<job> to damaged/<job>-<UTC time>/ with the reason beside it; returns where."""
    damaged = Path(run_dir) / DAMAGED
    damaged.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = damaged / f"{job}-{stamp}"
    for n in range(2, 1000):            # the same job moved twice in one second
        if not target.exists():
            break
        target = damaged / f"{job}-{stamp}.{n}"
    os.rename(Path(run_dir) / "published" / job, target)
    note = {"job": job, "folder": f"{DAMAGED}/{target.name}", "reason": reason, "moved": time.time()}
    with contextlib.suppress(OSError):  # the move is what matters; the caller names the reason too
        write_atomic(str(target) + ".json", json.dumps(note, indent=2) + "\n")
    return target


def damaged_entries(run_dir: Path) -> list[dict[str, Any]]:
    """Every job moved to damaged/: job, folder, reason, moved (epoch seconds); oldest first."""
    entries = []
    for note in (Path(run_dir) / DAMAGED).glob("*.json"):
        try:
            data = json.loads(note.read_text(encoding="utf-8"))
            entries.append({"job": str(data["job"]), "folder": str(data["folder"]), "reason": str(data["reason"]),
                            "moved": float(data.get("moved", 0))})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue                    # a note cut short by a full disk: its folder is still there
    return sorted(entries, key=lambda e: (e["moved"], e["folder"]))
