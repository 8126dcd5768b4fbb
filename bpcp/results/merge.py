"""Merge the CSV tables of all published jobs into one table per CellProfiler table.

DuckDB parses every job's CSV once, as text, into a staging table in an on-disk database under
<run>/merged/.duckdb-tmp (removed afterwards); the sort spills there too, so memory stays bounded by
memory_limit (default 2GB, env BPCP_MERGE_MEMORY). Per table:

1. Headers are read with the csv module; repeated names (Metadata_* in some object tables) get
   private names, are compared with the first copy, and dropped (differences go to the notes).
2. One pass infers each column's type: BIGINT if every value is an integer, DOUBLE if every
   value is a number (nan and inf included), else VARCHAR. Metadata_* stay VARCHAR ("01" must
   stay "01"); a column with no values anywhere is DOUBLE unless it names a file, path or URL.
3. With local numbering, (job, local ImageNumber) maps to the plan's global ImageNumber,
   Group_Number, Group_Index and Group_Length, so the result equals one CellProfiler process.
4. Paths and URLs CellProfiler recorded for files it saved into its -o folder (work/<job>/out,
   on this host or a worker) are rewritten to published/<job>/, where those files now are; those
   of images a job downloaded from S3 (bpcp-s3/<bucket>/<key> in its temp folder) to s3:// URLs.
5. Rows are sorted by (ImageNumber, ObjectNumber), written to parquet and csv, and the keys are
   checked unique and non-null before the files get their final names.

Only jobs that completeness() calls done are merged, so all merged tables cover the same image
sets. ExecutionTime_* and ImageSet_ImageSet keep each job's own values (they cannot match one run).

Before merging, every published job is checked against its manifest (bpcp.results.verify: sizes,
the tables' sha256, every file's with checksums=True) and, after parsing, the rows DuckDB read of
each table against the manifest's rows. A damaged job (or one completeness calls incomplete, or a
CSV DuckDB or the csv module cannot parse) is moved to damaged/ (bpcp.results.damaged), named, and
left out; the next `bpcp run` reruns it.

All or nothing: the new merged/ is built in a sibling folder (<run>/.merged-new-*, DuckDB's spill
files included) and swapped in by one rename (renameat2 RENAME_EXCHANGE where the filesystem has
it, else merged/ -> .merged-old-*, then .merged-new-* -> merged/); then report.json records what
merged/ holds (jobs, every file's size and sha256), and `bpcp status` compares the two. A crash at
any point leaves merged/ all old or all new, and the next merge (which holds <run>/.merge.lock)
puts the rest right before it starts: a leftover .merged-new-* is removed; a .merged-old-* is
renamed back to merged/ when a crash fell between the two renames, else removed; and report.json
is written again after the new swap. Until then `bpcp status` says that merged/ and report.json
do not agree (or that merged/ is missing).
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from bpcp import planfile
from bpcp.arrow import pa
from bpcp.errors import BpcpError
from bpcp.planfile import Job, Plan
from bpcp.results import verify
from bpcp.results.completeness import EXPERIMENT, completeness, job_status, summary
from bpcp.results.damaged import move_aside
from bpcp.runfolder import RunFolder

FILE_COLUMN = "bpcp_source_file"
DUP_MARK = "__bpcp_dup"
STRING_PREFIXES = ("Metadata_", "FileName_", "PathName_", "URL_", "MD5Digest_",
                   "ObjectsFileName_", "ObjectsPathName_", "ObjectsURL_")
# where CellProfiler recorded files it saved into -o (work/<job>/out): rewritten to published/<job>
OUTPUT_PATH_PREFIXES = ("PathName_", "URL_", "ObjectsPathName_", "ObjectsURL_")
URL_PREFIXES = ("URL_", "ObjectsURL_")
# Images a job downloaded from S3 sit in <its temp folder>/bpcp-s3/<bucket>/<key>: name the object.
URL_SCHEME = "file:(?://)?"
FETCHED_PATTERN = f"^(?:{URL_SCHEME})?/.*/bpcp-s3/"
DEFAULT_COMPARTMENTS = {"cells": "Cells", "cytoplasm": "Cytoplasm", "nuclei": "Nuclei"}
# CytoTable's cellprofiler_csv preset: these keep their name (or get a Metadata_ prefix)
IDENTIFYING = ("ImageNumber", "ObjectNumber", "Metadata_Well", "Metadata_Plate",
               "Parent_Cells", "Parent_Nuclei")


class MergeError(BpcpError):
    """The published outputs cannot be merged into tables with unique keys."""


class CorruptSource(Exception):
    """Published tables that cannot be parsed: job id -> what is wrong (the job goes to damaged/)."""

    def __init__(self, jobs: dict[str, str]):
        super().__init__("; ".join(f"{j}: {why}" for j, why in jobs.items()))
        self.jobs = jobs


@dataclass
class Progress:
    """What the merge is writing now, for the one line a full disk or a DuckDB failure gets."""
    what: str = "merged/"


@dataclass
class TableResult:
    table: str
    rows: int
    columns: int
    jobs: int
    files: list[str]
    seconds: float
    dropped_duplicates: dict[str, int] = field(default_factory=dict)


@dataclass
class MergeResult:
    merged_dir: Path
    jobs_merged: list[str]
    jobs_skipped: list[str]
    tables: dict[str, TableResult]
    single_cell: Path | None
    notes: list[str]
    seconds: float
    damaged: list[dict[str, str]] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict, repr=False)   # report.json as written after it

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("report")
        data["merged_dir"] = str(self.merged_dir)
        data["single_cell"] = str(self.single_cell) if self.single_cell else None
        return data


def run_sql(con: duckdb.DuckDBPyConnection, statement: str) -> list[tuple]:
    """Execute and drain (DuckDB refuses new work while a result is unfinished)."""
    return con.execute(statement).fetchall()


def arrow_table(result: duckdb.DuckDBPyRelation) -> pa.Table:
    """The result as a pyarrow Table (to_arrow_table in DuckDB 2, fetch_arrow_table in 1.x)."""
    fetch = getattr(result, "to_arrow_table", None) or result.fetch_arrow_table
    return fetch()


def q(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def lit(value: str) -> str:
    """Quote an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


# ---------------------------------------------------------------- reading headers and sources

def read_header(path: Path, delim: str) -> list[str]:
    with open(path, newline="") as fd:
        return next(csv.reader(fd, delimiter=delim), [])


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an error message (DuckDB's run to dozens of lines)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def unique_names(header: list[str]) -> list[str]:
    """Give the 2nd, 3rd... copy of a repeated column a private name (DuckDB's own x_1 is ambiguous)."""
    seen: Counter[str] = Counter()
    names = []
    for name in header:
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}{DUP_MARK}{seen[name]}")
    return names


def source_sql(files: list[Path], names: list[str], delim: str) -> str:
    """A read_csv over files sharing one header; every column as text, plus the source file."""
    columns = "{" + ", ".join(f"{lit(n)}: 'VARCHAR'" for n in names) + "}"
    file_list = "[" + ", ".join(lit(str(f)) for f in files) + "]"
    return (f"SELECT * FROM read_csv({file_list}, auto_detect=false, header=true, "
            f"delim={lit(delim)}, quote='\"', escape='\"', columns={columns}, "
            f"filename={lit(FILE_COLUMN)})")


def group_by_header(files: list[Path], delim: str) -> dict[tuple[str, ...], list[Path]]:
    """Files by header; a file without a readable header line makes its job (the folder) corrupt."""
    groups: dict[tuple[str, ...], list[Path]] = defaultdict(list)
    bad = {}
    for path in files:
        try:
            header = tuple(read_header(path, delim))
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            bad[path.parent.name] = f"{path.name} cannot be read ({first_line(exc)})"
            continue
        if not header:
            bad[path.parent.name] = f"{path.name} is empty (no header line)"
            continue
        groups[header].append(path)
    if bad:
        raise CorruptSource(bad)
    return groups


# ---------------------------------------------------------------- numbering map

def _id_pattern(job: str) -> str:
    """A job id as a path holds it, or as a file:// URL does (bundled ids hold '+', written %2B)."""
    quoted = urllib.parse.quote(job)
    return re.escape(job) if quoted == job else f"(?:{re.escape(job)}|{re.escape(quoted)})"


def _rewrite(text: str) -> str:
    """A literal replacement for regexp_replace (RE2: only the backslash is special)."""
    return text.replace("\\", "\\\\")


def jobfiles_table(plan: Plan, jobs: list[Job], table: str, run_dir: Path) -> pa.Table:
    """Source file -> job, and how to turn the job's CellProfiler -o folder (work/<job>/out, on
    this host or a worker) into published/<job> in recorded paths (published) and file:// URLs
    (published_url: percent-encoded as CellProfiler writes them, Path.as_uri, so a run folder with
    spaces or non-ASCII letters still gives valid URLs)."""
    # "file:" or "file://" kept as the job wrote it (4.2 writes file:/path, 5.x file:///path)
    rows = [(str(run_dir / "published" / j.id / plan.table_file(table)), j.id,
             f"^({URL_SCHEME})?.*/work/" + _id_pattern(j.id) + "/out",
             _rewrite(str(run_dir / "published" / j.id)),
             "\\1" + _rewrite(urllib.parse.quote(str(run_dir / "published" / j.id))),
             f"^({URL_SCHEME})?.*/stage/" + _id_pattern(j.id) + "/root/")
            for j in jobs]
    # stage_pattern: inputs a worker read from its staged copy (bpcp.jobs.stage) name the original path
    names = ["file", "job", "work_pattern", "published", "published_url", "stage_pattern"]
    return pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)})


def numbering_table(plan: Plan, jobs: list[Job], table: str, run_dir: Path) -> pa.Table:
    """One row per (source file, local ImageNumber): the global numbers a single run would write."""
    lengths = Counter(n for job in plan.jobs for n in job.group_numbers)
    cols: dict[str, list[Any]] = defaultdict(list)
    for job in jobs:
        path = str(run_dir / "published" / job.id / plan.table_file(table))
        numbers = job.image_numbers
        gnums = job.group_numbers or (None,) * len(numbers)
        gidx = job.group_indexes or (None,) * len(numbers)
        for local, (glob, gn, gi) in enumerate(zip(numbers, gnums, gidx), start=1):
            cols["file"].append(path)
            cols["job"].append(job.id)
            cols["local"].append(local)
            cols["global_number"].append(glob)
            cols["group_number"].append(gn)
            cols["group_index"].append(gi)
            cols["group_length"].append(lengths.get(gn) if gn is not None else None)
    schema = pa.schema([("file", pa.string()), ("job", pa.string()), ("local", pa.int64()),
                        ("global_number", pa.int64()), ("group_number", pa.int64()),
                        ("group_index", pa.int64()), ("group_length", pa.int64())])
    return pa.table({name: cols[name] for name in schema.names}, schema=schema)


# ---------------------------------------------------------------- types

def infer_types(con: duckdb.DuckDBPyConnection, view: str, columns: list[str]) -> dict[str, str]:
    """One scan: BIGINT if all values are integers, DOUBLE if all are numbers, else VARCHAR."""
    probe = [c for c in columns if not c.startswith("Metadata_")]
    types = dict.fromkeys(columns, "VARCHAR")
    if not probe:
        return types
    aggs = []
    for c in probe:
        # canonical integers only: round-trips through BIGINT (regexp_full_match costs 10x more)
        aggs.append(f"bool_and({q(c)} IS NULL OR coalesce(CAST(TRY_CAST({q(c)} AS BIGINT) AS VARCHAR) = {q(c)}, false))")
        aggs.append(f"bool_and({q(c)} IS NULL OR TRY_CAST({q(c)} AS DOUBLE) IS NOT NULL)")
        aggs.append(f"count({q(c)})")
    row = con.execute(f"SELECT {', '.join(aggs)} FROM {view}").fetchall()[0]
    for i, c in enumerate(probe):
        is_int, is_num, non_null = row[3 * i], row[3 * i + 1], row[3 * i + 2]
        if c in ("ImageNumber", "ObjectNumber"):
            types[c] = "BIGINT"
        elif non_null == 0:
            types[c] = "VARCHAR" if c.startswith(STRING_PREFIXES) else "DOUBLE"
        elif is_int:
            types[c] = "BIGINT"
        elif is_num:
            types[c] = "DOUBLE"
    return types


def cast(column: str, sql_type: str, source: str = "s") -> str:
    ref = f"{source}.{q(column)}"
    return ref if sql_type == "VARCHAR" else f"CAST({ref} AS {sql_type})"


# ---------------------------------------------------------------- one table

class _TableMerger:
    """Merges one CellProfiler table; a class only to share the connection and names."""

    def __init__(self, con: duckdb.DuckDBPyConnection, run_dir: Path, plan: Plan,
                 jobs: list[Job], table: str, notes: list[str],
                 manifest_rows: dict[str, dict[str, int]] | None = None):
        self.con, self.run_dir, self.plan, self.jobs, self.table = con, run_dir, plan, jobs, table
        self.notes = notes
        self.manifest_rows = manifest_rows or {}
        self.delim = plan.delimiter
        self.files = [run_dir / "published" / j.id / plan.table_file(table) for j in jobs]
        self.view = f"stage_{table}"

    def build_source(self) -> tuple[list[str], dict[str, int]]:
        """Parse every file once into a text staging table (on disk, so memory stays bounded);
        return the column order and, per repeated column, the rows where it differed."""
        groups = group_by_header(self.files, self.delim)
        order: list[str] = []
        dups: list[str] = []
        parts = []
        for header, files in groups.items():
            names = unique_names(list(header))
            order += [n for n in names if DUP_MARK not in n and n not in order]
            dups += [n for n in names if DUP_MARK in n and n not in dups]
            parts.append(source_sql(files, names, self.delim))
        union = " UNION ALL BY NAME ".join(f"({p})" for p in parts)
        # staging order is irrelevant (sorted later); keeping it costs memory per open file
        run_sql(self.con, "SET preserve_insertion_order = false")
        try:
            run_sql(self.con, f"CREATE OR REPLACE TABLE {q(self.view)} AS {union}")
        except duckdb.Error as exc:
            if _no_space(exc):
                raise
            bad = self._unparsable(groups)
            if bad:
                raise CorruptSource(bad) from None
            raise
        finally:
            run_sql(self.con, "SET preserve_insertion_order = true")
        self._check_rows()
        return order, self._compare_duplicates(dups)

    def _unparsable(self, groups: dict[tuple[str, ...], list[Path]]) -> dict[str, str]:
        """After DuckDB refused the union: which files it refuses alone (job -> DuckDB's first line)."""
        bad = {}
        for header, files in groups.items():
            names = unique_names(list(header))
            for path in files:
                try:
                    run_sql(self.con, f"SELECT count(*) FROM ({source_sql([path], names, self.delim)})")
                except duckdb.Error as exc:
                    if _no_space(exc):
                        raise
                    bad[path.parent.name] = f"{path.name} cannot be parsed ({first_line(exc)})"
        return bad

    def _check_rows(self) -> None:
        """The rows DuckDB read of each file are the rows its manifest counted (csv module)."""
        counts = dict(self.con.execute(f"SELECT {FILE_COLUMN}, count(*) FROM {q(self.view)} GROUP BY 1").fetchall())
        for job, path in zip(self.jobs, self.files):
            want = self.manifest_rows.get(job.id, {}).get(self.table)
            got = counts.get(str(path), 0)
            if want is not None and got != want:
                raise MergeError(f"{self.table}: DuckDB read {got} rows of {path}, its manifest (which the file "
                                 f"matches) counts {want}: the two CSV readers disagree; please report it with that file")

    def _compare_duplicates(self, dups: list[str]) -> dict[str, int]:
        """Rows where a (non-empty) repeated copy differs from the first; the copies are dropped."""
        if not dups:
            return {}
        checks = ", ".join(f"count(*) FILTER (WHERE {q(d)} IS NOT NULL AND "
                           f"{q(d.split(DUP_MARK)[0])} IS DISTINCT FROM {q(d)})" for d in dups)
        diffs = self.con.execute(f"SELECT {checks} FROM {q(self.view)}").fetchall()[0]
        dropped = {}
        for dup, diff in zip(dups, diffs):
            name, copy = dup.split(DUP_MARK)
            dropped[f"{name}#{copy}"] = diff
            if diff:
                self.notes.append(f"{self.table}: repeated column {name} copy {copy} differs from "
                                  f"the first in {diff} rows; kept the first copy")
        return dropped

    def select_sql(self, order: list[str], types: dict[str, str]) -> tuple[str, list[str]]:
        keys = ["ImageNumber"] + (["ObjectNumber"] if "ObjectNumber" in order else [])
        missing = [k for k in keys if k not in order]
        if missing:
            raise MergeError(f"{self.table}: no {missing[0]} column in the published CSVs; "
                             "is this a CellProfiler ExportToSpreadsheet table?")
        local = self.plan.numbering == "local"
        rewrite = {"ImageNumber": "m.global_number", "Group_Number": "m.group_number",
                   "Group_Index": "m.group_index", "Group_Length": "m.group_length"}
        exprs = []
        for c in order:
            if local and c in rewrite and (c == "ImageNumber" or self._has_groups()):
                exprs.append(f"{rewrite[c]} AS {q(c)}")
            elif types[c] == "VARCHAR" and c.startswith(OUTPUT_PATH_PREFIXES):
                published = "f.published_url" if c.startswith(URL_PREFIXES) else "f.published"
                exprs.append(f"regexp_replace(regexp_replace(regexp_replace(s.{q(c)}, f.work_pattern, {published}), "
                             f"f.stage_pattern, '\\1/'), {lit(FETCHED_PATTERN)}, 's3://') AS {q(c)}")
            else:
                exprs.append(f"{cast(c, types[c])} AS {q(c)}")
        source = f"{q(self.view)} s JOIN jobfiles f ON f.file = s.{FILE_COLUMN}"
        if local:
            source += (f" LEFT JOIN numbering m ON m.file = s.{FILE_COLUMN} "
                       f"AND m.local = TRY_CAST(s.ImageNumber AS BIGINT)")
        sort = ", ".join(q(k) for k in keys)
        return f"SELECT * FROM (SELECT {', '.join(exprs)} FROM {source}) ORDER BY {sort}", keys

    def _has_groups(self) -> bool:
        return all(j.group_numbers and j.group_indexes for j in self.jobs)

    def check_keys(self, parquet: Path, keys: list[str]) -> None:
        """Fail loudly on a missing or repeated key; name the culprit jobs when we can."""
        key_list = ", ".join(q(k) for k in keys)
        nulls = self.con.execute(
            f"SELECT count(*) FROM read_parquet({lit(str(parquet))}) WHERE "
            + " OR ".join(f"{q(k)} IS NULL" for k in keys)).fetchall()[0][0]
        if nulls:
            raise MergeError([f"{self.table}: {nulls} rows have no {'/'.join(keys)} after renumbering."]
                             + self._unmapped_jobs())
        dup = self.con.execute(
            f"SELECT {key_list}, count(*) AS n FROM read_parquet({lit(str(parquet))}) "
            f"GROUP BY ALL HAVING count(*) > 1 ORDER BY ALL LIMIT 5").fetchall()
        if dup:
            shown = "; ".join(f"{dict(zip(keys, d[:-1]))} x{d[-1]}" for d in dup)
            raise MergeError([
                f"{self.table}: key ({', '.join(keys)}) is not unique after merging: {shown}.",
                "Check plan.json numbering (local vs global) and that no two jobs share image sets."])

    def _unmapped_jobs(self) -> list[str]:
        if self.plan.numbering != "local":
            return []
        rows = self.con.execute(
            f"SELECT s.{FILE_COLUMN}, max(TRY_CAST(s.ImageNumber AS BIGINT)) FROM {q(self.view)} s "
            f"ANTI JOIN numbering m ON m.file = s.{FILE_COLUMN} "
            f"AND m.local = TRY_CAST(s.ImageNumber AS BIGINT) GROUP BY 1 ORDER BY 1 LIMIT 5").fetchall()
        return [f"  {f}: local ImageNumber up to {n}, more than the plan's image_numbers for that job"
                for f, n in rows]

    def run(self, out_dir: Path, formats: Iterable[str], progress: Progress) -> TableResult:
        started = time.monotonic()
        progress.what = f"DuckDB's staging copy of the {self.table} tables"
        order, dropped = self.build_source()
        progress.what = f"{self.table}.parquet and .csv"
        types = infer_types(self.con, q(self.view), order)
        self.con.register("jobfiles", jobfiles_table(self.plan, self.jobs, self.table, self.run_dir))
        if self.plan.numbering == "local":
            self.con.register("numbering", numbering_table(self.plan, self.jobs, self.table, self.run_dir))
        select, keys = self.select_sql(order, types)
        tmp = out_dir / f".{self.table}.parquet.tmp"
        try:
            run_sql(self.con, f"COPY ({select}) TO {lit(str(tmp))} (FORMAT parquet, COMPRESSION zstd)")
            self.check_keys(tmp, keys)
            rows = self.con.execute(f"SELECT count(*) FROM read_parquet({lit(str(tmp))})").fetchall()[0][0]
            written = publish_formats(self.con, tmp, out_dir, self.table, formats)
        finally:  # on failure leave no half-written files; earlier merged files stay as they were
            for leftover in (tmp, out_dir / f".{self.table}.csv.tmp"):
                leftover.unlink(missing_ok=True)
        run_sql(self.con, f"DROP TABLE IF EXISTS {q(self.view)}")
        return TableResult(self.table, rows, len(order), len(self.jobs), written,
                           round(time.monotonic() - started, 3), dropped)


def publish_formats(con: duckdb.DuckDBPyConnection, tmp: Path, out_dir: Path, table: str,
                    formats: Iterable[str]) -> list[str]:
    """Give the checked parquet its final name and write the CSV copy from it (order preserved)."""
    formats = list(formats)
    names = []
    if "csv" in formats:
        csv_tmp = out_dir / f".{table}.csv.tmp"
        # one thread: an order-preserving parallel COPY buffers per thread (out of memory at 256MB
        # with 2 threads); one thread streams in ~120 MB and was no slower (CSV formatting is cheap)
        threads = con.execute("SELECT current_setting('threads')").fetchall()[0][0]
        run_sql(con, "SET threads = 1")
        try:
            run_sql(con, f"COPY (SELECT * FROM read_parquet({lit(str(tmp))})) TO {lit(str(csv_tmp))} "
                         f"(FORMAT csv, HEADER true, DELIMITER ',')")
        finally:
            run_sql(con, f"SET threads = {int(threads)}")
        os.replace(csv_tmp, out_dir / f"{table}.csv")
        names.append(f"{table}.csv")
    if "parquet" in formats:
        os.replace(tmp, out_dir / f"{table}.parquet")
        names.insert(0, f"{table}.parquet")
    else:
        tmp.unlink()
    return names


# ---------------------------------------------------------------- Experiment

def read_key_values(path: Path, delim: str) -> list[tuple[str, str]]:
    with open(path, newline="") as fd:
        rows = list(csv.reader(fd, delimiter=delim))
    return [(r[0], r[1] if len(r) > 1 else "") for r in rows[1:] if r]


def merge_experiment(run_dir: Path, plan: Plan, jobs: list[Job],
                     out_dir: Path, formats: Iterable[str], notes: list[str]) -> TableResult | None:
    """Experiment (key/value rows) once from the first job; every job's run info beside it."""
    started = time.monotonic()
    delim = plan.delimiter
    per_job = []
    bad = {}
    for job in jobs:
        path = run_dir / "published" / job.id / plan.table_file(EXPERIMENT)
        try:
            per_job.append((job.id, read_key_values(path, delim)))
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            bad[job.id] = f"{path.name} cannot be read ({first_line(exc)})"
    if bad:
        raise CorruptSource(bad)
    if not per_job:
        return None
    # one process would have started at the first job's start: the earliest Run_Timestamp
    stamps = [v for _, pairs in per_job for k, v in pairs if k == "Run_Timestamp" and v]
    first = [(k, min(stamps) if k == "Run_Timestamp" and stamps else v) for k, v in per_job[0][1]]
    table = pa.table({"Key": [k for k, _ in first], "Value": [v for _, v in first]})
    written = []
    if "parquet" in formats:
        pq.write_table(table, out_dir / f"{EXPERIMENT}.parquet")
        written.append(f"{EXPERIMENT}.parquet")
    if "csv" in formats:
        with open(out_dir / f"{EXPERIMENT}.csv", "w", newline="") as fd:
            writer = csv.writer(fd)
            writer.writerow(["Key", "Value"])
            writer.writerows(first)
        written.append(f"{EXPERIMENT}.csv")
    rows: dict[str, list[str]] = {"job": [], "Key": [], "Value": []}
    for jid, pairs in per_job:
        for key, value in pairs:
            if key == "Pipeline_Pipeline":  # the whole pipeline text: keep its hash per job
                key, value = "Pipeline_Pipeline_sha256", hashlib.sha256(value.encode()).hexdigest()
            rows["job"].append(jid)
            rows["Key"].append(key)
            rows["Value"].append(value)
    pq.write_table(pa.table(rows), out_dir / "jobs_experiment.parquet")
    written.append("jobs_experiment.parquet")
    for key in ("CellProfiler_Version", "Pipeline_Pipeline_sha256"):
        values = {v for k, v in zip(rows["Key"], rows["Value"]) if k == key}
        if len(values) > 1:
            notes.append(f"jobs differ in {key}: {sorted(values)[:3]} (see jobs_experiment.parquet)")
    return TableResult(EXPERIMENT, len(first), 2, len(jobs), written,
                       round(time.monotonic() - started, 3))


# ---------------------------------------------------------------- single cell (CytoTable layout)

def cytotable_name(column: str, stem: str) -> str:
    """CytoTable's column renaming (cytotable.convert._prepend_column_name, metadata=("image",))."""
    if column not in IDENTIFYING and not column.startswith(stem):
        return f"{stem}_{column}"
    if column in IDENTIFYING and column.startswith(stem):
        return f"Metadata_{column}"
    if (column in IDENTIFYING and not column.startswith("Metadata_") and "Image" not in column
            and "ObjectNumber" not in column and "TableNumber" not in column):
        return f"Metadata_{stem}_{column}"
    if not column.startswith("Metadata_") and column in IDENTIFYING:
        return f"Metadata_{column}"
    return column


def cytotable_sort_key(column: str) -> int:
    """CytoTable's column order (cytotable.utils._column_sort), applied after an alphabetical sort."""
    first = ["tablenumber", "metadata_tablenumber", "imagenumber", "metadata_imagenumber",
             "objectnumber", "object_number"]
    later = ["image", "cytoplasm", "cells", "nuclei"]
    low = column.lower()
    if low in first:
        return first.index(low)
    if "metadata" in low:
        return len(first)
    for i, prefix in enumerate(later, start=len(first) + 1):
        if low.startswith(prefix):
            return i
    return len(first) + len(later) + 1


def renamed_view(con: duckdb.DuckDBPyConnection, parquet: Path, view: str, stem: str) -> dict[str, str]:
    """A view of a merged table with CytoTable's column names; returns original -> new name."""
    cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({lit(str(parquet))})").fetchall()]
    new = {c: cytotable_name(c, stem) for c in cols}
    select = ", ".join(f"{q(c)} AS {q(n)}" for c, n in new.items())
    run_sql(con, f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT {select} "
                f"FROM read_parquet({lit(str(parquet))})")
    return new


def image_pages(con: duckdb.DuckDBPyConnection, parquet: Path, page_rows: int) -> list[tuple[int, int]]:
    """(first, last) ImageNumber ranges holding about page_rows rows each (whole images)."""
    counts = con.execute(f"SELECT ImageNumber, count(*) FROM read_parquet({lit(str(parquet))}) "
                         "GROUP BY 1 ORDER BY 1").fetchall()
    pages, first, rows = [], None, 0
    for number, n in counts:
        first = number if first is None else first
        rows += n
        if rows >= page_rows:
            pages.append((first, number))
            first, rows = None, 0
    if first is not None:
        pages.append((first, counts[-1][0]))
    return pages


def single_cell(con: duckdb.DuckDBPyConnection, out_dir: Path,
                compartments: dict[str, str] = DEFAULT_COMPARTMENTS, page_rows: int = 50_000) -> Path:
    """Cytoplasm joined to its parent Cells and Nuclei, plus the image's file names and every
    Metadata_* of the Image table, named as CytoTable's JUMP presets name them (Metadata_Plate and
    Metadata_Well as they are, Image_Metadata_<key> for the rest): pycytominer's aggregate (strata
    Metadata_Plate, Metadata_Well) and annotate (join on Metadata_Well) need them on every cell."""
    cyto, cells, nuclei = compartments["cytoplasm"], compartments["cells"], compartments["nuclei"]
    image_names = renamed_view(con, out_dir / "Image.parquet", "sc_image", "Image")
    cyto_cols = list(renamed_view(con, out_dir / f"{cyto}.parquet", "sc_cytoplasm", cyto).values())
    cell_cols = list(renamed_view(con, out_dir / f"{cells}.parquet", "sc_cells", cells).values())
    nuc_cols = list(renamed_view(con, out_dir / f"{nuclei}.parquet", "sc_nuclei", nuclei).values())
    keys = ("Metadata_ImageNumber", "Metadata_ObjectNumber")
    picked: dict[str, str] = {"Metadata_ImageNumber": "image"}
    picked.update({new: "image" for old, new in image_names.items()
                   if old.startswith("Metadata_") or new.startswith("Image_FileName_")})
    # CytoTable keeps the last of repeated names (e.g. Metadata_Plate in every compartment)
    for alias, cols, skip in (("cytoplasm", cyto_cols, keys[:1]), ("cells", cell_cols, keys),
                              ("nuclei", nuc_cols, keys)):
        picked.update({c: alias for c in cols if c not in skip})
    order = sorted(sorted(picked), key=cytotable_sort_key)
    select = ", ".join(f"{picked[c]}.{q(c)}" for c in order)
    parent_cells = f"Metadata_{cyto}_Parent_{cells}"
    parent_nuclei = f"Metadata_{cyto}_Parent_{nuclei}"
    for need in (parent_cells, parent_nuclei):
        if need not in cyto_cols:
            raise MergeError(f"{cyto} has no {need.replace('Metadata_' + cyto + '_', '')} column: "
                             "cannot join compartments per cell")
    join = f"""
        SELECT {select}
        FROM sc_cytoplasm AS cytoplasm
        JOIN sc_cells AS cells ON cells.Metadata_ImageNumber = cytoplasm.Metadata_ImageNumber
             AND cells.Metadata_ObjectNumber = cytoplasm.{q(parent_cells)}
        JOIN sc_nuclei AS nuclei ON nuclei.Metadata_ImageNumber = cytoplasm.Metadata_ImageNumber
             AND nuclei.Metadata_ObjectNumber = cytoplasm.{q(parent_nuclei)}
        JOIN sc_image AS image ON image.Metadata_ImageNumber = cytoplasm.Metadata_ImageNumber
        WHERE cytoplasm.Metadata_ImageNumber BETWEEN $first AND $last
        ORDER BY image.Metadata_ImageNumber, cytoplasm.Metadata_ObjectNumber"""
    tmp = out_dir / ".single_cell.parquet.tmp"
    writer = None
    try:
        # page by ImageNumber ranges (as CytoTable does): one wide sort of every cell would spill
        # gigabytes; the merged inputs are sorted, so each page reads only its row groups
        for first, last in image_pages(con, out_dir / f"{cyto}.parquet", page_rows):
            batch = arrow_table(con.sql(join, params={"first": first, "last": last}))
            if writer is None:
                writer = pq.ParquetWriter(tmp, batch.schema, compression="zstd")
            writer.write_table(batch)
        if writer is None:  # no cytoplasm at all: an empty table with the right columns
            empty = arrow_table(con.sql(join, params={"first": 0, "last": -1}))
            writer = pq.ParquetWriter(tmp, empty.schema, compression="zstd")
            writer.write_table(empty)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    final = out_dir / "single_cell.parquet"
    os.replace(tmp, final)
    return final


# ---------------------------------------------------------------- the run

def connect(out_dir: Path, memory_limit: str | None, threads: int | None) -> duckdb.DuckDBPyConnection:
    spill = out_dir / ".duckdb-tmp"
    spill.mkdir(parents=True, exist_ok=True)
    # a database file, not :memory:, so the text staging tables live on disk, not in RAM
    con = duckdb.connect(str(spill / "stage.duckdb"))
    run_sql(con, f"SET temp_directory = {lit(str(spill))}")
    run_sql(con, f"SET memory_limit = {lit(memory_limit or os.environ.get('BPCP_MERGE_MEMORY', '2GB'))}")
    if threads:
        run_sql(con, f"SET threads = {int(threads)}")
    run_sql(con, "SET enable_progress_bar = false")
    return con


NO_SPACE = ("No space left on device", "Disk quota exceeded")


def _no_space(exc: BaseException) -> bool:
    """A full disk, whoever says it (OSError's errno; DuckDB and Arrow only in their message)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(exc) for text in NO_SPACE)


@contextlib.contextmanager
def merge_lock(run_dir: Path) -> Iterator[None]:
    """One merge of a run folder at a time (<run>/.merge.lock, flock); another is refused in one line."""
    fd = os.open(run_dir / ".merge.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise MergeError(f"{run_dir} is being merged by process {holder} right now; wait for it to end "
                             "(it writes the same merged/ and report.json)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def recover(run_dir: Path) -> list[str]:
    """Put right what a merge that was killed left (see the module doc); returns what was done."""
    done = []
    merged = run_dir / "merged"
    previous = sorted(run_dir.glob(verify.PREVIOUS_PREFIX + "*"), key=lambda p: p.stat().st_mtime)
    if not merged.exists() and previous:   # killed between merged/ -> old and new -> merged/
        os.rename(previous.pop(), merged)
        done.append("put back the previous merged/ (a merge was stopped while swapping it in)")
    for leftover in previous + sorted(run_dir.glob(verify.STAGING_PREFIX + "*")):
        shutil.rmtree(leftover, ignore_errors=True)
        done.append(f"removed {leftover.name}, left by a merge that was stopped")
    return done


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    func = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if func is None:
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(staging: Path, merged: Path) -> None:
    """staging becomes merged/ in one step; the previous merged/ is removed after."""
    if not merged.exists():
        os.rename(staging, merged)
        return
    if _exchange(staging, merged):
        shutil.rmtree(staging, ignore_errors=True)        # now the previous merge
        return
    previous = merged.with_name(verify.PREVIOUS_PREFIX + staging.name[len(verify.STAGING_PREFIX):])
    os.rename(merged, previous)
    os.rename(staging, merged)
    shutil.rmtree(previous, ignore_errors=True)


def set_aside_damaged(run_dir: Path, plan: Plan, checksums: bool) -> tuple[list[dict[str, str]], list[str],
                                                                            dict[str, dict[str, int]]]:
    """Check every published job (bpcp.results.verify); move the damaged ones and those completeness
    calls incomplete to damaged/. Returns (moved, unverified job ids, manifest rows per job)."""
    moved, unverified, rows = [], [], {}
    for job in plan.jobs:
        if not (run_dir / "published" / job.id).is_dir():
            continue
        check = verify.check_job(run_dir, plan, job.id, checksums=checksums)
        if check.state == "unverified":
            unverified.append(job.id)
        if check.state == "ok":
            rows[job.id] = check.rows
        reason = check.reason if check.state == "damaged" else ""
        if not reason:
            status = job_status(run_dir, plan, job)
            reason = status.get("reason", "") if status["status"] == "incomplete" else ""
        if reason:
            moved.append(_move(run_dir, job.id, reason))
    return moved, unverified, rows


def _move(run_dir: Path, job: str, reason: str) -> dict[str, str]:
    target = move_aside(run_dir, job, reason)
    return {"job": job, "folder": f"{target.parent.name}/{target.name}", "reason": reason}


def merge_run(run_dir: Path, formats: Iterable[str] = ("parquet", "csv"),
              memory_limit: str | None = None, threads: int | None = None,
              compartments: dict[str, str] | None = DEFAULT_COMPARTMENTS, checksums: bool = False) -> MergeResult:
    """Merge every done job of the run into <run>/merged/, all or nothing; see the module doc.

    Damaged published jobs are moved to damaged/ first (checksums: sha256 of every file, not
    only of the tables). Jobs that are not done (completeness) are left out of every table, so the
    merged tables stay consistent with each other. compartments=None skips the single-cell table.
    Every failure is a MergeError of one line; published/ and the previous merged/ stay as they were.
    """
    started = time.monotonic()
    run_dir = Path(run_dir).resolve()
    plan = planfile.read(RunFolder(run_dir))
    progress = Progress()
    swapped = False
    try:
        progress.what = ".merge.lock"
        with merge_lock(run_dir):
            progress.what = "merged/ (putting right what a stopped merge left)"
            notes = recover(run_dir)
            progress.what = "damaged/ (moving damaged jobs aside)"
            damaged, unverified, manifest_rows = set_aside_damaged(run_dir, plan, checksums)
            report = completeness(run_dir, write=False)
            done = {j["id"] for j in report["jobs"] if j["status"] == "done"}
            jobs = [j for j in plan.jobs if j.id in done]
            if unverified:
                notes.append(f"{len(unverified)} published jobs have no {verify.MANIFEST} (published before bpcp "
                             f"wrote manifests, e.g. {unverified[0]}): merged without checking their files")
            for _attempt in range(len(jobs) + 1):   # each retry leaves out at least one more job
                progress.what = f"the next merged/ ({verify.STAGING_PREFIX}*)"
                staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=verify.STAGING_PREFIX))
                try:
                    tables, sc_path = _build(run_dir, plan, jobs, staging, tuple(formats), memory_limit, threads,
                                             compartments, notes, manifest_rows, progress)
                    break
                except CorruptSource as bad:
                    shutil.rmtree(staging, ignore_errors=True)
                    damaged += [_move(run_dir, job, why) for job, why in sorted(bad.jobs.items())]
                    jobs = [j for j in jobs if j.id not in bad.jobs]
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
            else:
                raise MergeError("published tables kept failing to parse after leaving out every job that failed")
            out_dir = run_dir / "merged"
            skipped = [j.id for j in plan.jobs if j.id not in {job.id for job in jobs}]
            result = MergeResult(out_dir, [j.id for j in jobs], skipped, tables, sc_path, notes,
                                 round(time.monotonic() - started, 3), damaged, unverified)
            progress.what = f"{verify.MERGE_RECORD}"
            record = result.to_json()
            record["files"] = verify.files_digest(staging)
            (staging / verify.MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            progress.what = "merged/ (swapping the new merge in)"
            swap_in(staging, out_dir)
            swapped = True
            progress.what = "report.json"
            result.report = completeness(run_dir, merged=verify.merged_record(out_dir, result.jobs_merged))
            return result
    except (OSError, duckdb.Error, pa.ArrowException) as exc:
        (run_dir / "report.json.tmp").unlink(missing_ok=True)
        state = ("merged/ holds the new merge but report.json still describes the previous one" if swapped
                 else "published/ and the previous merged/ are as they were")
        if _no_space(exc):
            raise MergeError(f"no space left on device in {run_dir} while writing {progress.what}: free some space "
                             f"there and run `bpcp merge -o {run_dir}` again ({state})") from None
        what = "DuckDB" if isinstance(exc, duckdb.Error) else type(exc).__name__
        raise MergeError(f"{what} failed while writing {progress.what}: {first_line(exc)} ({state})") from None


def _build(run_dir: Path, plan: Plan, jobs: list[Job], out_dir: Path, formats: tuple[str, ...],
           memory_limit: str | None, threads: int | None, compartments: dict[str, str] | None,
           notes: list[str], manifest_rows: dict[str, dict[str, int]],
           progress: Progress) -> tuple[dict[str, TableResult], Path | None]:
    """Every table of the given jobs into out_dir (a fresh folder); raises CorruptSource."""
    tables: dict[str, TableResult] = {}
    if not jobs:
        notes.append("no job is done yet: nothing merged")
        return tables, None
    con = connect(out_dir, memory_limit, threads)
    try:
        for table in plan.tables:
            if table == EXPERIMENT:
                progress.what = f"{EXPERIMENT}.parquet and .csv"
                merged = merge_experiment(run_dir, plan, jobs, out_dir, formats, notes)
            else:
                merged = _TableMerger(con, run_dir, plan, jobs, table, notes, manifest_rows).run(out_dir, formats, progress)
            if merged:
                tables[table] = merged
        progress.what = "single_cell.parquet"
        sc_path = _maybe_single_cell(con, plan, out_dir, formats, compartments, notes)
    finally:
        con.close()
        shutil.rmtree(out_dir / ".duckdb-tmp", ignore_errors=True)
    final = run_dir / "merged" / sc_path.name if sc_path else None
    return tables, final


def _maybe_single_cell(con: duckdb.DuckDBPyConnection, plan: Plan, out_dir: Path,
                       formats: tuple[str, ...], compartments: dict[str, str] | None,
                       notes: list[str]) -> Path | None:
    if not compartments:
        return None
    need = ["Image", *compartments.values()]
    absent = [t for t in need if t not in plan.tables]
    if absent or "parquet" not in formats:
        why = f"no {', '.join(absent)} table" if absent else "parquet output is off"
        notes.append(f"single_cell.parquet skipped: {why}")
        return None
    return single_cell(con, out_dir, compartments)


# ---------------------------------------------------------------- CLI entry points

def _error(command: str, exc: BpcpError) -> int:
    for line in exc.lines:
        print(f"bpcp {command}: error: {line}", file=sys.stderr)
    return 2


def run_merge(run_dir: Path, memory_limit: str | None = None, checksums: bool = False, as_json: bool = False) -> int:
    """`bpcp merge`: merge what is published, print where it went, what was damaged, what is missing.

    Returns 0 when every job is done and merged, 1 when some are not (merged anyway), 2 on error.
    Never deletes job outputs: damaged ones are moved to damaged/.
    """
    try:
        result = merge_run(Path(run_dir), memory_limit=memory_limit, checksums=checksums)
    except BpcpError as exc:
        return _error("merge", exc)
    for moved in result.damaged:
        print(f"bpcp merge: damaged: published/{moved['job']}: {moved['reason']}; moved to {moved['folder']}/ "
              f"(kept, not merged); the next `bpcp run -o {result.merged_dir.parent}` reruns it", file=sys.stderr)
    report = result.report
    if as_json:
        print(json.dumps({"merge": result.to_json(), "report": report}))
        return 0 if report["complete"] else 1
    for name, table in result.tables.items():
        print(f"{name:<12} {table.rows:>10} rows {table.columns:>5} columns  "
              f"-> {', '.join(str(result.merged_dir / f) for f in table.files)}")
    if result.single_cell:
        print(f"{'single cell':<12} -> {result.single_cell}")
    for note in result.notes:
        print(f"note: {note}")
    print(summary(report))
    print(f"merged {len(result.jobs_merged)} jobs in {result.seconds:.1f} s; "
          f"report: {Path(run_dir) / 'report.json'}")
    return 0 if report["complete"] else 1


def run_status(run_dir: Path, as_json: bool = False) -> int:
    """`bpcp status`: write report.json, print the summary and whether merged/ is what report.json
    says; 0 when complete and merged/ agrees (or is not made yet), else 1."""
    try:
        report = completeness(Path(run_dir))
    except BpcpError as exc:
        return _error("status", exc)
    done = {j["id"] for j in report["jobs"] if j["status"] == "done"}
    problem = verify.check_merged(Path(run_dir), report, done if (Path(run_dir) / "merged").is_dir() else None)
    if as_json:
        print(json.dumps({**report, "merged_check": problem or "ok"}))
        return 0 if report["complete"] and not problem else 1
    print(summary(report))
    if problem:
        print(f"bpcp status: {problem}", file=sys.stderr)
    return 0 if report["complete"] and not problem else 1
