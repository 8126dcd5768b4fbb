"""Datasets as users have them, read into one table of image sets.

Four kinds: a LoadData CSV (read here, with pyarrow), a file list or an image folder (image sets
built by CellProfiler's own Images/Metadata/NamesAndTypes modules, via cp_probe), and a
Batch_data.h5 (image sets and groups stored by CreateBatchFiles). Whatever the kind, the result
is an `ImageSets`: one row per image set, every column a string, with the numbering one
CellProfiler run over the whole dataset gives them.
"""
from __future__ import annotations

import csv
import hashlib
import os
import tempfile
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow.csv as pacsv

from bpcp.arrow import pa, pc
from bpcp.errors import BpcpError
from bpcp.inputs import cellprofiler as cpmod
from bpcp.jobs.runner import sha256_file as runner_sha256

FILE_PREFIXES = ("Image_FileName_", "FileName_")
PATH_PREFIXES = ("Image_PathName_", "PathName_")
URL_PREFIXES = ("Image_URL_", "URL_")


@dataclass
class ImageSets:
    """One row per image set. Rows are in the order CellProfiler numbers them (ImageNumber = row + 1)
    unless cp_groups has an ImageNumber column (a grouping LoadData CSV, in the CSV's order)."""

    kind: str
    path: Path
    table: pa.Table                      # every column a string
    channels: dict[str, pa.Array]        # channel -> full path (or URL) of each image set's file
    checksum: str
    pipeline_info: dict | None = None    # from the probe, when the dataset needed CellProfiler
    cp_groups: pa.Table | None = None    # Group_Number, Group_Index (and ImageNumber, when rows are not
                                         # in CellProfiler's order) as one CellProfiler run assigns them
    batch_groups: list = field(default_factory=list)   # [(keys, image numbers)] for kind batch

    @property
    def metadata_keys(self) -> list[str]:
        return [c for c in self.table.column_names if c.startswith("Metadata_")]

    def __len__(self) -> int:
        return self.table.num_rows


def detect_kind(dataset: Path, pipeline: Path) -> str:
    if pipeline.suffix.lower() in (".h5", ".hdf5"):
        return "batch"
    if dataset.is_dir():
        return "folder"
    if dataset.suffix.lower() == ".csv":
        return "loaddata"
    if dataset.suffix.lower() in (".h5", ".hdf5"):
        return "batch"
    return "filelist"


def sha256_file(path: Path) -> str:
    return runner_sha256(str(path))       # one checksum for plan, manifest and merge


def load(dataset: Path | None, pipeline: Path, cp: cpmod.CellProfiler | None = None) -> ImageSets:
    """Read any kind of dataset. Needs CellProfiler (cp) for file lists, folders and batch files."""
    pipeline = Path(pipeline)
    if dataset is None:
        if pipeline.suffix.lower() not in (".h5", ".hdf5"):
            raise BpcpError("no dataset given; pass --dataset (a LoadData CSV, a file list or an image folder)")
        dataset = pipeline
    dataset = Path(dataset).expanduser().resolve()
    if not dataset.exists():
        raise BpcpError(f"{dataset}: dataset not found; pass an existing LoadData CSV, file list, image folder or Batch_data.h5")
    kind = detect_kind(dataset, pipeline)
    if kind == "loaddata":
        return read_loaddata(dataset)
    if cp is None:
        raise BpcpError(f"{dataset}: reading a {kind} dataset needs CellProfiler; pass --cellprofiler")
    if kind == "batch":
        return read_batch(pipeline if pipeline.suffix.lower() in (".h5", ".hdf5") else dataset, cp)
    return read_with_cellprofiler(dataset, kind, pipeline, cp)


# ---------------------------------------------------------------- LoadData CSV

def read_loaddata(path: Path) -> ImageSets:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fd:
            header = next(csv.reader(fd), None)
    except UnicodeDecodeError as exc:
        raise BpcpError(f"{path}: not a UTF-8 text CSV ({exc.reason}); save it as UTF-8 CSV") from exc
    if not header:
        raise BpcpError(f"{path}: empty file; a LoadData CSV needs a header and one row per image set")
    for sep, name in ((";", "';'"), ("\t", "tabs")):
        fields = [f for h in header for f in h.split(sep)]
        if len(fields) > len(header) and any(_image_column(f) for f in fields):
            raise BpcpError(
                f"{path}: its columns are separated by {name}, and LoadData reads only comma-separated "
                "CSVs; save it with ',' as the separator (e.g. pandas to_csv(sep=','))"
            )
    unnamed = [i + 1 for i, h in enumerate(header) if not h.strip()]
    if unnamed:
        which = ", ".join(str(i) for i in unnamed)
        raise BpcpError(
            f"{path}: column {which} of the header has no name (a pandas index column, or a stray ',' "
            "in the header), which CellProfiler cannot load; remove it (pandas: to_csv(index=False)) or name it"
        )
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise BpcpError(f"{path}: column(s) {', '.join(dupes)} appear twice in the header; keep one of each")
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=1 << 24),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise BpcpError(
            f"{path}: malformed CSV ({str(exc).splitlines()[0]}); every row needs the header's "
            "columns, quoted with \" where a value holds a comma"
        ) from exc
    if table.num_rows == 0:
        raise BpcpError(f"{path}: no image sets (only a header); add one row per image set")
    channels = loaddata_channels(path, table)
    return ImageSets("loaddata", path, table, channels, sha256_file(path))


def number_loaddata(image_sets: ImageSets, pipeline: Path, cp: cpmod.CellProfiler) -> ImageSets:
    """The image sets with the ImageNumber, Group_Number and Group_Index one CellProfiler run over
    the whole CSV gives each row, and CellProfiler's description of the pipeline given this CSV.

    Asked of CellProfiler (its LoadData and prepare_run, through cp_probe), because a grouping
    LoadData sorts its groups by the str() of the values it typed ('002' in a column of integers
    runs as 2, so 2 < 218 < 76) and renumbers the image sets group by group.
    """
    result = cpmod.probe(cp, pipeline, data_file=image_sets.path)
    numbering = result.get("numbering") or {}
    numbers = numbering.get("image_number") or []
    n = len(image_sets)
    if numbering.get("rows") != n or sorted(numbers) != list(range(1, n + 1)):
        made = sum(1 for x in numbers if x)
        raise BpcpError(
            f"{image_sets.path}: CellProfiler's LoadData makes {made} image sets of its rows, bpcp reads {n} rows; "
            "check the CSV has one image set per row (no blank or partial rows)"
        )
    groups = pa.table({
        "ImageNumber": pa.array(numbers, pa.int64()),
        "Group_Number": pa.array(numbering["group_number"], pa.int64()),
        "Group_Index": pa.array(numbering["group_index"], pa.int64()),
    })
    return replace(image_sets, cp_groups=groups, pipeline_info=result)


def _image_column(name: str) -> bool:
    return name.strip().startswith(FILE_PREFIXES + PATH_PREFIXES + URL_PREFIXES)


def _strip(name: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def loaddata_channels(path: Path, table: pa.Table) -> dict[str, pa.Array]:
    """Full path of every image of every channel; relative PathNames count from the CSV's folder."""
    names = table.column_names
    files = {_strip(n, FILE_PREFIXES): n for n in names if _strip(n, FILE_PREFIXES)}
    paths = {_strip(n, PATH_PREFIXES): n for n in names if _strip(n, PATH_PREFIXES)}
    urls = {_strip(n, URL_PREFIXES): n for n in names if _strip(n, URL_PREFIXES)}
    channels: dict[str, pa.Array] = {}
    for channel, file_col in files.items():
        if channel not in paths:
            raise BpcpError(
                f"{path}: column {file_col} has no matching PathName column; "
                f"add Image_PathName_{channel} with the folder of each file"
            )
        folder = table[paths[channel]].combine_chunks()
        is_relative = pc.invert(pc.or_(pc.starts_with(folder, "/"), pc.match_substring(folder, "://")))
        if pc.any(is_relative).as_py():
            base = str(path.parent)
            folder = pc.if_else(
                is_relative, pc.binary_join_element_wise(base, folder, "/"), folder
            )
        channels[channel] = pc.binary_join_element_wise(folder, table[file_col].combine_chunks(), "/")
    for channel, url_col in urls.items():
        channels.setdefault(channel, table[url_col].combine_chunks())
    if not channels:
        raise BpcpError(
            f"{path}: no image columns; a LoadData CSV needs Image_FileName_<Channel> and "
            "Image_PathName_<Channel> (or FileName_/PathName_, or URL_) columns"
        )
    return channels


# ---------------------------------------------------------------- file list / folder / batch

def _file_list_paths(path: Path, kind: str) -> list[str]:
    if kind == "folder":
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith("."))
        return found
    lines = []
    try:
        text = path.read_text(encoding="utf-8-sig")     # a BOM is not part of the first path
    except UnicodeDecodeError as exc:
        raise BpcpError(f"{path}: not a UTF-8 text file list ({exc.reason}); save it as UTF-8, one path a line") from exc
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("file:"):
            line = urllib.parse.unquote(urllib.parse.urlparse(line).path)
        elif "://" not in line and not line.startswith("/"):
            line = str((path.parent / line).resolve())
        lines.append(line)
    return lines


def url_to_path(url: str) -> str:
    if url.startswith("file:"):
        return urllib.parse.unquote(urllib.parse.urlparse(url).path)
    return url


def _from_probe(kind: str, path: Path, image_sets: dict, checksum: str, info: dict) -> ImageSets:
    columns = image_sets["columns"]
    numbers = image_sets["image_numbers"]
    if not numbers:
        raise BpcpError(
            f"{path}: CellProfiler made no image sets from it; check the pipeline's Images and "
            "NamesAndTypes rules match these files"
        )
    if numbers != list(range(1, len(numbers) + 1)):
        raise BpcpError(f"{path}: image numbers are not 1..N; re-create the batch file")
    meta = {k: pa.array(["" if v in (None, "None") else v for v in vals], pa.string())
            for k, vals in columns.items() if k.startswith("Metadata_")}
    table = pa.table(meta) if meta else pa.table({"ImageNumber": pa.array([str(n) for n in numbers])})
    channels = {k[len("URL_"):]: pa.array([url_to_path(u or "") for u in vals], pa.string())
                for k, vals in columns.items() if k.startswith("URL_")}
    cp_groups = None
    if "Group_Number" in columns and "Group_Index" in columns:
        cp_groups = pa.table({
            "Group_Number": pa.array([int(float(v)) for v in columns["Group_Number"]], pa.int64()),
            "Group_Index": pa.array([int(float(v)) for v in columns["Group_Index"]], pa.int64()),
        })
    return ImageSets(kind, path, table, channels, checksum, info, cp_groups,
                     image_sets.get("groups", []))


def read_with_cellprofiler(path: Path, kind: str, pipeline: Path, cp: cpmod.CellProfiler) -> ImageSets:
    files = _file_list_paths(path, kind)
    if not files:
        raise BpcpError(f"{path}: no files in it; point --dataset at the folder or list that holds the images")
    digest = hashlib.sha256("\n".join(files).encode()).hexdigest()
    # a folder's files were just listed; only a file list can name files that are not there
    missing = [f for f in files if "://" not in f and not os.path.exists(f)] if kind == "filelist" else []
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BpcpError(f"{path}: lists {missing[0]}{more}, which does not exist; fix the file list")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="bpcp-files-", delete=False) as fd:
        fd.write("\n".join(files) + "\n")
        list_path = Path(fd.name)
    try:
        result = cpmod.probe(cp, pipeline, file_list=list_path)
    finally:
        list_path.unlink(missing_ok=True)
    return _from_probe(kind, path, result["image_sets"], digest, result)


def read_batch(path: Path, cp: cpmod.CellProfiler) -> ImageSets:
    result = cpmod.probe(cp, path, batch=True)
    return _from_probe("batch", path, result["image_sets"], sha256_file(path), result)
