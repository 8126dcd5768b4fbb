"""How close `bpcp estimate`'s wall-time forecast comes to real runs on this machine.

Profiles the example plate once (`bpcp profile`), then for jobs of 1 and of 8 image sets: plans,
runs with `bpcp run`, and compares (`bpcp estimate --compare`). This machine may be shared: other
processes' CPU demand is an input of the model (--background-load); it is sampled while each run
runs (our own CellProfiler threads excluded) and given to the forecast the run is compared with;
the forecast from the load sampled just before the run is printed too. Prints forecast/actual per
run; asserts nothing about time (tests/test_estimate.py checks what does not depend on it).

    .venv/bin/python benchmarks/forecast.py [--cellprofiler /opt/cellprofiler/5.0] [--wait-quiet 0.5]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))     # common.py beside this file
from bpcp.example import generate_plate
from bpcp.sizing.slots import background_load

from common import REPO, wait_for_quiet

BPCP = [sys.executable, "-m", "bpcp.cli"]


def bpcp(*args: str) -> str:
    proc = subprocess.run(BPCP + list(args), capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"forecast: bpcp {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def wall_seconds(estimate_output: str) -> tuple[float, float]:
    """(forecast, actual) from `bpcp estimate --compare`'s "wall: forecast F s, actual A s" line."""
    line = next(ln for ln in estimate_output.splitlines() if ln.strip().startswith("wall: forecast"))
    return float(line.split("forecast ")[1].split(" s")[0]), float(line.split("actual ")[1].split(" s")[0])


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cellprofiler", default="/opt/cellprofiler/5.0")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="LOAD")
    p.add_argument("--max-wait", type=float, default=1200.0)
    args = p.parse_args(argv)
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="bpcp-forecast-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    plate = generate_plate(work / "plate")
    data, pipe = str(plate / "load_data.csv"), str(plate / "example_loaddata.cppipe")
    small, big = work / "small", work / "big"
    bpcp("plan", "--cellprofiler", args.cellprofiler, "-d", data, "-p", pipe, "-o", str(small),
         "--group-by", "Plate,Well,Site", "--bundle", "0")
    bpcp("plan", "--cellprofiler", args.cellprofiler, "-d", data, "-p", pipe, "-o", str(big), "--bundle", "8")
    if args.wait_quiet:
        load, waited = wait_for_quiet(args.wait_quiet, args.max_wait)
        print(f"forecast: load average {load:.2f} after waiting {waited:.0f} s", flush=True)
    print(f"forecast: load average before profiling: {loadavg()}", flush=True)
    print(bpcp("profile", "-o", str(small)), flush=True)
    profile = small / "profile.json"
    ratios = []
    for run in (small, big):
        sizes = sorted({len(j["image_numbers"]) for j in json.loads((run / "plan.json").read_text())["jobs"]})
        before = background_load(2.0)
        samples: list[float] = []
        stop = threading.Event()

        def sample(folder: Path = run) -> None:
            while not stop.is_set():
                samples.append(background_load(0.5, 0.1, exclude=str(folder)))

        sampler = threading.Thread(target=sample)
        load_start = loadavg()
        sampler.start()
        try:
            bpcp("run", "-o", str(run), "--no-merge")
        finally:
            stop.set()
            sampler.join()
        during = round(sum(samples) / len(samples), 2) if samples else 0.0
        common = ["estimate", "-o", str(run), "--profile", str(profile), "--compare", str(run)]
        ahead_s, _ = wall_seconds(bpcp(*common, "--background-load", str(before)))
        text = bpcp(*common, "--background-load", str(during))
        forecast_s, actual_s = wall_seconds(text)
        ratios.append((sizes, forecast_s / actual_s))
        print(f"jobs of {sizes} image sets: forecast {forecast_s:.1f} s (other load during the run {during}), "
              f"actual {actual_s:.1f} s, forecast/actual {forecast_s / actual_s:.2f}; forecast from the load "
              f"before the run ({before}): {ahead_s:.1f} s; load average at start {load_start}, end {loadavg()}")
        print(text, flush=True)
    print("forecast/actual: " + ", ".join(f"jobs of {s} image sets {r:.2f}" for s, r in ratios))
    print(f"forecast: run folders in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
