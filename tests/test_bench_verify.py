"""The benchmark's equality check (benchmarks/common.py compare_runs) must catch a changed value,
a lost row, a duplicated key and a missing column, and must not care how the image sets were
split into runs (local ImageNumber, Group_*, ExecutionTime_*, the saved overlay's folder)."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import compare_runs

SETS = [("P1", "A01", "1"), ("P1", "A01", "2"), ("P1", "A02", "1")]


def write(folder: Path, sets: list[tuple[str, str, str]], first_number: int = 1, tweak=None) -> Path:
    folder.mkdir(parents=True)
    image = [["ImageNumber", "Metadata_Plate", "Metadata_Well", "Metadata_Site", "Count_Nuclei",
              "ExecutionTime_01LoadData", "Group_Index", "PathName_OrigOverlay", "Intensity_Mean"]]
    nuclei = [["ImageNumber", "ObjectNumber", "AreaShape_Area", "Texture_X"]]
    for i, (plate, well, site) in enumerate(sets):
        n = first_number + i
        seed = int(site) + 10 * int(well[1:])
        image.append([n, plate, well, site, 2, 0.1 * n, i + 1, str(folder), f"{seed / 7:.15g}"])
        for obj in (1, 2):
            nuclei.append([n, obj, seed * 10 + obj, f"{(seed + obj) / 3:.15g}"])
    if tweak:
        tweak(image, nuclei)
    for name, rows in (("Image", image), ("Nuclei", nuclei)):
        with open(folder / f"{name}.csv", "w", newline="") as fd:
            csv.writer(fd).writerows(rows)
    return folder


@pytest.fixture
def reference(tmp_path):
    return [write(tmp_path / "ref", SETS)]


def split(tmp_path, tweak=None, tweak_part=1):
    """The same image sets as two runs with local numbering (and other timings/folders)."""
    return [write(tmp_path / "part0", SETS[:2], first_number=5),
            write(tmp_path / "part1", SETS[2:], first_number=1, tweak=tweak if tweak_part == 1 else None)]


def test_split_runs_equal_the_reference(reference, tmp_path):
    problems, stats = compare_runs(reference, split(tmp_path), ["Image", "Nuclei"])
    assert problems == []
    assert stats["tables"] == {"Image": {"rows": 3, "columns": 5}, "Nuclei": {"rows": 6, "columns": 3}}


def test_last_digit_rounding_is_tolerated_but_counted(reference, tmp_path):
    def nudge(image, nuclei):
        nuclei[1][3] = repr(float(nuclei[1][3]) * (1 + 1e-13))
    problems, stats = compare_runs(reference, split(tmp_path, nudge), ["Image", "Nuclei"])
    assert problems == [] and stats["inexact"] == 1


@pytest.mark.parametrize("tweak, expected", [
    (lambda image, nuclei: nuclei[2].__setitem__(2, "999"), "AreaShape_Area: '212' != '999'"),
    (lambda image, nuclei: image[1].__setitem__(4, "3"), "Count_Nuclei: '2' != '3'"),
    (lambda image, nuclei: nuclei.pop(), "1 rows missing"),
    (lambda image, nuclei: nuclei.append(list(nuclei[-1])), "appears twice"),
    (lambda image, nuclei: [r.pop(3) for r in nuclei], "columns differ"),
    (lambda image, nuclei: image[1].__setitem__(3, "9"), "rows missing"),
])
def test_differences_are_caught(reference, tmp_path, tweak, expected):
    problems, _ = compare_runs(reference, split(tmp_path, tweak), ["Image", "Nuclei"])
    assert any(expected in p for p in problems), problems
