"""Small typed plans for unit tests (the shape `bpcp plan` writes)."""
from __future__ import annotations

from bpcp import planfile


def make_plan(sizes: list[int] | None = None, *, jobs: list[tuple[str, int]] | None = None, kind: str = "loaddata",
              sha: str = "a" * 64, version: str = "5.0.0.dev784") -> planfile.Plan:
    """A plan whose jobs have these numbers of image sets (ids j0, j1, ... unless jobs names them)."""
    jobs = jobs if jobs is not None else [(f"j{i}", n) for i, n in enumerate(sizes or [])]
    start, docs = 1, []
    for jid, n in jobs:
        numbers = list(range(start, start + n))
        start += n
        docs.append({"id": jid, "groups": [{}], "image_numbers": numbers, "group_numbers": [1] * n,
                     "group_indexes": list(range(1, n + 1)), "input": f"inputs/{jid}.csv"})
    return planfile.from_dict({
        "format": planfile.FORMAT, "dataset": {"kind": kind, "path": "/x/load_data.csv", "sha256": "d" * 64},
        "pipeline": {"path": "/x/p.cppipe", "file": "pipeline.cppipe", "sha256": sha},
        "cellprofiler": {"version": version}, "group_by": [], "bundle": {"asked": 0, "slots": 1, "sets_per_job": 0},
        "numbering": "local", "tables": ["Image"], "table_files": {"Image": "Image.csv"}, "delimiter": ",",
        "image_sets": sum(n for _, n in jobs), "jobs": docs})
