"""A small synthetic plate for the demo and the tests: real images CellProfiler can segment.

Images are 8-bit PNGs written with the standard library (no imaging dependency): dark
background with noise, bright round nuclei (channel 1, DNA), a few bright nuclei in channel 2
(PH3) and dimmer, larger cell bodies (channel 3). The layout matches the example pipelines.
"""
from __future__ import annotations

import csv
import math
import random
import shutil
import struct
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

CHANNELS = ("DNA", "PH3", "cellbody")


@dataclass(frozen=True)
class PlateSpec:
    plates: tuple[str, ...] = ("Plate1",)
    rows: str = "AB"
    columns: int = 4
    sites: int = 2
    size: int = 256
    nuclei: int = 14
    seed: int = 1

    def wells(self) -> list[str]:
        return [f"{r}{c:02d}" for r in self.rows for c in range(1, self.columns + 1)]


def write_png(path: Path, width: int, height: int, pixels: bytearray) -> None:
    """Write an 8-bit grayscale PNG."""
    raw = b"".join(b"\x00" + bytes(pixels[y * width:(y + 1) * width]) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6))
    png += chunk(b"IEND", b"")
    path.write_bytes(png)


def _blob(img: bytearray, size: int, cx: float, cy: float, radius: float, peak: int) -> None:
    r2 = radius * radius
    for y in range(max(0, int(cy - radius)), min(size, int(cy + radius) + 1)):
        dy2 = (y - cy) ** 2
        row = y * size
        for x in range(max(0, int(cx - radius)), min(size, int(cx + radius) + 1)):
            d2 = dy2 + (x - cx) ** 2
            if d2 <= r2:
                v = img[row + x] + int(peak * (1.0 - 0.5 * d2 / r2))
                img[row + x] = 255 if v > 255 else v


def _site_images(spec: PlateSpec, rng: random.Random) -> list[bytearray]:
    size = spec.size
    images = []
    for low, high in ((4, 14), (5, 6), (4, 14)):
        images.append(bytearray(rng.randrange(low, high) for _ in range(size * size)))
    dna, ph3, body = images
    placed: list[tuple[float, float]] = []
    attempts = 0
    while len(placed) < spec.nuclei and attempts < spec.nuclei * 50:
        attempts += 1
        cx, cy = rng.uniform(20, size - 20), rng.uniform(20, size - 20)
        if any(math.hypot(cx - x, cy - y) < 30 for x, y in placed):
            continue
        placed.append((cx, cy))
        radius = rng.uniform(6.0, 9.0)
        _blob(body, size, cx, cy, radius * 1.9, rng.randrange(40, 70))
        _blob(dna, size, cx, cy, radius, rng.randrange(150, 220))
        if len(placed) <= 2 or rng.random() < 0.3:
            _blob(ph3, size, cx, cy, radius, rng.randrange(120, 200))
    return images


def generate_plate(dest: Path, spec: PlateSpec = PlateSpec()) -> Path:
    """Write images/, load_data.csv, filelist.txt and both example pipelines into dest."""
    dest = Path(dest).resolve()
    images_dir = dest / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    rows = []
    files = []
    for plate in spec.plates:
        for well in spec.wells():
            for site in range(1, spec.sites + 1):
                row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": str(site)}
                for ch, pixels in enumerate(_site_images(spec, rng), start=1):
                    name = f"{plate}_{well}_s{site}_w{ch}.png"
                    write_png(images_dir / name, spec.size, spec.size, pixels)
                    row[f"Image_FileName_{CHANNELS[ch - 1]}"] = name
                    row[f"Image_PathName_{CHANNELS[ch - 1]}"] = str(images_dir)
                    files.append(str(images_dir / name))
                rows.append(row)
    with open(dest / "load_data.csv", "w", newline="") as fd:
        writer = csv.DictWriter(fd, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (dest / "filelist.txt").write_text("\n".join(files) + "\n")
    for name in ("example_images.cppipe", "example_loaddata.cppipe"):
        with resources.as_file(resources.files("bpcp") / "data" / name) as src:
            shutil.copyfile(src, dest / name)
    return dest
