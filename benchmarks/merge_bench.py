"""Build a large synthetic run folder from one real published job, for timing `bpcp merge`.

Every job gets the real job's tables with its image sets repeated `--repeat` times (local
ImageNumber shifted per repeat), so N jobs x image sets x objects grow as far as wanted while every
value stays real CellProfiler output. Then measure the merge, e.g.:

    python benchmarks/merge_bench.py build --source RUN/published/JOB --jobs 2000 --repeat 10 --out /tmp/big
    /usr/bin/time -v python -c "from bpcp.results.merge import run_merge; raise SystemExit(run_merge('/tmp/big'))"
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

TABLES = ["Image", "Nuclei", "PH3", "Cells", "Cytoplasm", "Experiment"]


def repeat_table(source: Path, repeat: int, image_sets: int) -> str:
    """The table's rows repeated, ImageNumber (first column of object tables) shifted per copy."""
    with open(source, newline="") as fd:
        rows = list(csv.reader(fd))
    header, body = rows[0], rows[1:]
    col = header.index("ImageNumber")
    out = [header]
    for r in range(repeat):
        for row in body:
            row = list(row)
            row[col] = str(int(row[col]) + r * image_sets)
            out.append(row)
    from io import StringIO
    buf = StringIO()
    csv.writer(buf, lineterminator="\n").writerows(out)
    return buf.getvalue()


def build(source: Path, jobs: int, repeat: int, out: Path) -> None:
    with open(source / "Image.csv", newline="") as fd:
        image_sets = sum(1 for _ in csv.reader(fd)) - 1
    per_job = image_sets * repeat
    contents = {t: repeat_table(source / f"{t}.csv", repeat, image_sets) for t in TABLES if t != "Experiment"}
    plan_jobs = []
    for j in range(jobs):
        jid = f"Plate{j // 384 + 1}_W{j % 384:03d}-{j:08x}"
        dest = out / "published" / jid
        dest.mkdir(parents=True)
        for table, text in contents.items():
            (dest / f"{table}.csv").write_text(text)
        shutil.copyfile(source / "Experiment.csv", dest / "Experiment.csv")
        first = j * per_job
        plan_jobs.append({"id": jid, "groups": [{"Metadata_Plate": f"Plate{j // 384 + 1}", "Metadata_Well": f"W{j % 384:03d}"}],
                          "image_numbers": list(range(first + 1, first + per_job + 1)),
                          "group_numbers": [1] * per_job,
                          "group_indexes": list(range(first + 1, first + per_job + 1)),
                          "input": None, "group_arg": None})
    plan = {"format": 1, "bpcp_version": "0.1.0", "numbering": "local", "tables": TABLES,
            "table_prefix": "", "image_sets": jobs * per_job, "jobs": plan_jobs,
            "group_by": ["Metadata_Plate", "Metadata_Well"]}
    (out / "plan.json").write_text(json.dumps(plan))
    sizes = {t: len(c) * jobs for t, c in contents.items()}
    rows = {t: (c.count("\n") - 1) * jobs for t, c in contents.items()}
    print(json.dumps({"jobs": jobs, "image_sets": jobs * per_job, "rows": rows, "csv_bytes": sizes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--source", type=Path, required=True, help="a published/<job>/ folder of a real run")
    b.add_argument("--jobs", type=int, default=2000)
    b.add_argument("--repeat", type=int, default=1)
    b.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    build(args.source, args.jobs, args.repeat, args.out)


if __name__ == "__main__":
    main()
