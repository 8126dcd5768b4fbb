"""How long `bpcp plan` takes on a large LoadData CSV (default: 100 plates x 384 wells x 9 sites).

    .venv/bin/python benchmarks/plan_scale.py [--plates 100] [--image-plates 2] [--cellprofiler /opt/cellprofiler/5.0]

Writes the CSV (3 channels), times reading + grouping + planning + writing one CSV per job
(the full `bpcp plan` minus the image check, which needs the files), then times the image check
on --image-plates plates whose (empty) image files it creates. Prints seconds for each part.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bpcp.example import generate_plate
from bpcp.inputs import preflight
from bpcp.inputs.dataset import read_loaddata
from bpcp.jobs.plan import PlanOptions
from bpcp.jobs.prepare import prepare

WELLS = [f"{r}{c:02d}" for r in "ABCDEFGHIJKLMNOP" for c in range(1, 25)]
CHANNELS = ("DNA", "PH3", "cellbody")


def write_csv(path: Path, plates: int, images: Path) -> int:
    rows = 0
    with open(path, "w") as fd:
        fd.write("Metadata_Plate,Metadata_Well,Metadata_Site,"
                 + ",".join(f"Image_FileName_{c},Image_PathName_{c}" for c in CHANNELS) + "\n")
        for p in range(1, plates + 1):
            folder = images / f"Plate{p}"
            for well in WELLS:
                for site in range(1, 10):
                    files = ",".join(f"Plate{p}_{well}_s{site}_w{i}.tif,{folder}" for i in range(1, 4))
                    fd.write(f"Plate{p},{well},{site},{files}\n")
                    rows += 1
    return rows


def touch_images(images: Path, plates: int) -> int:
    n = 0
    for p in range(1, plates + 1):
        folder = images / f"Plate{p}"
        folder.mkdir(parents=True, exist_ok=True)
        for well in WELLS:
            for site in range(1, 10):
                for i in range(1, 4):
                    (folder / f"Plate{p}_{well}_s{site}_w{i}.tif").touch()
                    n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plates", type=int, default=100)
    parser.add_argument("--image-plates", type=int, default=2)
    parser.add_argument("--cellprofiler", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bpcp-plan-scale-"))
    try:
        example = generate_plate(work / "example")
        csv = work / "load_data.csv"
        t = time.perf_counter()
        rows = write_csv(csv, args.plates, work / "images")
        print(f"wrote {rows} rows in {time.perf_counter() - t:.1f} s ({csv.stat().st_size / 1e6:.0f} MB)")

        t = time.perf_counter()
        prepared = prepare(csv, example / "example_loaddata.cppipe", work / "run", PlanOptions(),
                           args.cellprofiler, check_images=False)
        total = time.perf_counter() - t
        jobs = len(prepared.plan.doc["jobs"])
        print(f"bpcp plan (probe pipeline, read, preflight, group, plan, write {jobs} job CSVs): {total:.1f} s")

        t = time.perf_counter()
        image_sets = read_loaddata(csv)
        print(f"  of which reading the CSV alone: {time.perf_counter() - t:.1f} s")

        if args.image_plates:
            small = work / "small.csv"
            write_csv(small, args.image_plates, work / "images")
            n = touch_images(work / "images", args.image_plates)
            subset = read_loaddata(small)
            t = time.perf_counter()
            problems = preflight.check_images_exist(subset)
            seconds = time.perf_counter() - t
            assert not problems, problems
            print(f"image check: {n} files of {args.image_plates} plates in {seconds:.2f} s "
                  f"({seconds / n * 1e6:.1f} us per file; x{rows * 3 / n:.0f} for all plates: "
                  f"about {seconds * rows * 3 / n:.0f} s)")
        del image_sets
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
