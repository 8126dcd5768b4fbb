"""Data on S3: URLs, path maps, per-job fetch lists, and the controller's S3 calls (boto3).

Pure parts (no network): parse_url, parse_path_maps, map_path, remap_loaddata, fetch_list,
fetch_problems. The rest talks to S3 from the controller only, through bpcp.aws.client (boto3's
normal credential chain, AWS_ENDPOINT_URL when set, bpcp's retries, one line per failure); bpcp
never writes a credential anywhere. Jobs never list a bucket: each job downloads exactly the
objects of its fetch list (inputs/<job>.fetch, one s3:// URL per line) on the worker, with botocore.

Existence checks list each distinct image folder once, and only the key range the dataset names
(StartAfter just below its first name, stopping after its last), not one request per image.
"""
from __future__ import annotations

import os
import re
import urllib.parse
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from bpcp.arrow import pa, pc
from bpcp.aws import client as aws
from bpcp.errors import BpcpError
from bpcp.inputs.dataset import PATH_PREFIXES, URL_PREFIXES, loaddata_channels
from bpcp.planfile import Plan

SCHEME = "s3://"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_s3(value) -> bool:
    return value is not None and str(value).startswith(SCHEME)


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str = ""

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    def child(self, *parts: str) -> S3Url:
        key = "/".join([self.key.rstrip("/")] + [p.strip("/") for p in parts if p]) if self.key else \
            "/".join(p.strip("/") for p in parts if p)
        return S3Url(self.bucket, key)

    @property
    def prefix(self) -> str:
        """The key as a folder prefix: '' or ending in '/'."""
        return self.key.rstrip("/") + "/" if self.key.strip("/") else ""


def parse_url(text: str, what: str = "S3 URL", need_key: bool = True) -> S3Url:
    """'s3://bucket/key' -> S3Url; one clear line on anything else."""
    text = str(text)
    if not text.startswith(SCHEME):
        raise BpcpError(f"{text}: not an S3 URL; write {what} as s3://BUCKET/KEY")
    bucket, _, key = text[len(SCHEME):].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise BpcpError(f"{text}: {bucket!r} is not a valid S3 bucket name (3-63 characters: a-z, 0-9, '.', '-'); "
                        f"write {what} as s3://BUCKET/KEY")
    if need_key and not key.strip("/"):
        raise BpcpError(f"{text}: no object key after the bucket; write {what} as s3://BUCKET/KEY")
    if _CONTROL.search(key):
        raise BpcpError(f"{text!r}: the key holds a control character; rename the object")
    return S3Url(bucket, key)


# ---------------------------------------------------------------- path maps (pure)

@dataclass(frozen=True)
class PathMap:
    source: str
    target: str


def parse_path_maps(items: Iterable[str] | None) -> tuple[PathMap, ...]:
    """['/home/ubuntu/bucket=s3://bucket', ...] -> PathMaps, longest source first."""
    maps = []
    for item in items or ():
        source, sep, target = str(item).partition("=")
        source, target = source.strip().rstrip("/"), target.strip().rstrip("/")
        if not sep or not source or not target:
            raise BpcpError(f"--path-map {item!r}: expected FROM=TO, e.g. --path-map /home/ubuntu/bucket=s3://bucket")
        for side in (source, target):
            if is_s3(side):
                try:
                    key = parse_url(side, "its S3 side", need_key=False).key
                except BpcpError as exc:
                    raise BpcpError(f"--path-map {item!r}: {exc.lines[0]}") from None
                if key.startswith("/") or "//" in key:
                    raise BpcpError(f"--path-map {item!r}: {side} has an empty folder name; drop the extra '/'")
            elif not side.startswith("/"):
                raise BpcpError(f"--path-map {item!r}: {side!r} is neither an absolute path nor an s3:// URL")
        maps.append(PathMap(source, target))
    return tuple(sorted(maps, key=lambda m: -len(m.source)))


def map_path(value: str, maps: tuple[PathMap, ...]) -> str:
    """The first (longest) map whose source is value or a folder above it rewrites value."""
    for m in maps:
        if value == m.source or value.startswith(m.source + "/"):
            return m.target + value[len(m.source):]
    return value


def _map_url(value: str, maps: tuple[PathMap, ...]) -> str:
    if value.startswith("file://"):
        path = urllib.parse.unquote(urllib.parse.urlparse(value).path)
        mapped = map_path(path, maps)
        if mapped == path:
            return value
        return mapped if is_s3(mapped) else "file://" + urllib.parse.quote(mapped)
    return map_path(value, maps)


def _is_relative(column: pa.Array) -> pa.Array:
    return pc.invert(pc.or_(pc.starts_with(column, "/"), pc.match_substring(column, "://")))


def remap_loaddata(table: pa.Table, base: str, maps: tuple[PathMap, ...]) -> pa.Table:
    """PathName_* made absolute against base (the CSV's folder, local or s3://), then path-mapped;
    URL_* path-mapped. Every other column is left alone."""
    for i, name in enumerate(table.column_names):
        if name.startswith(PATH_PREFIXES):
            col = table[name].combine_chunks()
            rel = _is_relative(col)
            if pc.any(rel).as_py():
                col = pc.if_else(rel, pc.binary_join_element_wise(base.rstrip("/"), col, "/"), col)
            if maps:
                col = pa.array([map_path(v, maps) for v in col.to_pylist()], pa.string())
            table = table.set_column(i, name, col)
        elif name.startswith(URL_PREFIXES) and maps:
            col = pa.array([_map_url(v, maps) for v in table[name].to_pylist()], pa.string())
            table = table.set_column(i, name, col)
    return table


# ---------------------------------------------------------------- fetch lists (pure)

def fetch_lists(channels: dict[str, pa.Array], jobs_rows: list[list[int]]) -> list[list[str]]:
    """Per job, the S3 objects its image sets name, each once, in image set then channel order."""
    columns = [paths.to_pylist() for paths in channels.values()
               if pc.any(pc.starts_with(paths, SCHEME)).as_py()]
    if not columns:
        return [[] for _ in jobs_rows]
    return [list(dict.fromkeys(col[r] for r in rows for col in columns if is_s3(col[r]))) for rows in jobs_rows]


def fetch_list(urls: list[str]) -> str:
    return "".join(u + "\n" for u in urls)


def fetch_problems(source: str, urls: Iterable[tuple[int, str]]) -> list[str]:
    """Objects that cannot be mirrored into a local folder (their key would escape it)."""
    for row, url in urls:
        key = url[len(SCHEME):].partition("/")[2]
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts) or _CONTROL.search(key):
            return [f"{source}: image set {row + 1} refers to {url!r}, whose key has an empty, '.' or '..' "
                    "folder name or a control character, so it cannot be copied to a local folder; rename it"]
    return []


# ---------------------------------------------------------------- S3 calls (controller)

FETCHER_PROBE = ("try:\n import botocore\nexcept ImportError:\n import awscli.botocore\n")


def check_fetcher(python: str) -> None:
    """The Python that jobs download S3 objects with has botocore (here, on this host)."""
    import subprocess

    how = "run ansible-playbook site.yml (role awscli installs it), or pass --s3-python with a Python that has botocore"
    if not os.access(python, os.X_OK):
        raise BpcpError(f"{python}: not found on this host, and jobs need it to download their S3 images; {how}")
    probe = subprocess.run([python, "-c", FETCHER_PROBE], capture_output=True, text=True)
    if probe.returncode != 0:
        raise BpcpError(f"{python}: has no botocore, and jobs need it to download their S3 images; {how}")


def download(url: str, dest: Path, s3=None) -> Path:
    """One object to a local file (written beside it, then renamed)."""
    u = parse_url(url)
    s3 = s3 or aws.client("s3")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")

    def get():
        body = s3.get_object(Bucket=u.bucket, Key=u.key)["Body"]
        with open(tmp, "wb") as fd:
            for chunk in iter(lambda: body.read(1 << 20), b""):
                fd.write(chunk)

    try:
        aws.call(get, url, "s3:GetObject")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return dest


def list_objects(url: S3Url, s3=None, delimiter: str | None = None, start_after: str = "",
                 stop_after: str | None = None) -> dict[str, int]:
    """Key (relative to url.prefix) -> size, for every object under url's prefix (paginated).
    With stop_after, pages stop once a key at or past url.prefix + stop_after was seen."""
    s3 = s3 or aws.client("s3")
    prefix = url.prefix
    kwargs = {"Bucket": url.bucket, "Prefix": prefix}
    if delimiter:
        kwargs["Delimiter"] = delimiter
    if start_after:
        kwargs["StartAfter"] = prefix + start_after
    found: dict[str, int] = {}

    def walk():
        for page in s3.get_paginator("list_objects_v2").paginate(**kwargs):
            contents = page.get("Contents", [])
            for obj in contents:
                found[obj["Key"][len(prefix):]] = obj["Size"]
            if stop_after is not None and contents and contents[-1]["Key"] >= prefix + stop_after:
                return

    aws.call(walk, str(url), "s3:ListBucket")
    return found


def check_images(source: str, channels: dict[str, pa.Array], s3=None) -> list[str]:
    """Problem lines for s3:// images that do not exist: each distinct folder listed once."""
    wanted: list[tuple[int, str]] = []
    for paths in channels.values():
        if not pc.any(pc.starts_with(paths, SCHEME)).as_py():
            continue
        for row, path in enumerate(paths.to_pylist()):
            if is_s3(path):
                wanted.append((row, path))
    if not wanted:
        return []
    folders: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row, url in wanted:
        try:
            u = parse_url(url, "image paths")
        except BpcpError as exc:
            return [f"{source}: image set {row + 1}: {exc.lines[0]}"]
        folder, _, name = u.key.rpartition("/")
        folders[(u.bucket, folder)].add(name)
    problems = fetch_problems(source, wanted)
    if problems:
        return problems
    s3 = s3 or aws.client("s3")

    def listing(item):
        (bucket, folder), names = item
        low, high = min(names), max(names)
        return (bucket, folder), set(list_objects(S3Url(bucket, folder), s3, delimiter="/",
                                                  start_after=low[:-1], stop_after=high))

    with ThreadPoolExecutor(8) as pool:
        present = dict(pool.map(listing, folders.items()))
    missing = []
    for row, url in wanted:
        u = parse_url(url)
        folder, _, name = u.key.rpartition("/")
        if name not in present[(u.bucket, folder)]:
            missing.append((row, url))
    if not missing:
        return []
    row, url = missing[0]
    more = f" (and {len(missing) - 1} more of {len(wanted)} images)" if len(missing) > 1 else ""
    return [f"{source}: image set {row + 1} refers to {url}, which does not exist{more}; "
            "fix the paths (or --path-map), or upload the images, and plan again"]


def upload_file(path: Path, url: S3Url, s3=None) -> None:
    s3 = s3 or aws.client("s3")
    aws.call(lambda: s3.upload_file(str(path), url.bucket, url.key), str(url), "s3:PutObject")


def upload_folder(folder: Path, url: S3Url, s3=None, last: str | None = None) -> int:
    """Every file under folder to url/<relative path>; `last` (a relative name) goes up last, so its
    presence in S3 means the whole folder is there. Returns the number of files."""
    s3 = s3 or aws.client("s3")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    rel = [p.relative_to(folder).as_posix() for p in files]
    first = [(p, r) for p, r in zip(files, rel) if r != last]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda pr: upload_file(pr[0], url.child(pr[1]), s3), first))
    for p, r in zip(files, rel):
        if r == last:
            upload_file(p, url.child(r), s3)
    return len(files)


# ---------------------------------------------------------------- planning from S3 (prepare's edges)

@dataclass
class RemoteInputs:
    """A dataset and/or pipeline given as s3:// URLs, downloaded to local copies for planning."""
    dataset: str | Path | None          # what prepare reads: the local copy, or the local path given
    pipeline: str | Path
    dataset_url: str | None = None
    pipeline_url: str | None = None

    @property
    def dataset_base(self) -> str | None:
        """The CSV's S3 folder: relative PathName_* values count from there."""
        return self.dataset_url.rpartition("/")[0] if self.dataset_url else None

    def rename(self, exc: BpcpError) -> BpcpError:
        """Problem lines name the URLs the user gave, not the temporary copies."""
        pairs = [(str(self.dataset), self.dataset_url), (str(self.pipeline), self.pipeline_url)]
        lines = []
        for line in exc.lines:
            for local, url in pairs:
                if url:
                    line = line.replace(local, url)
            lines.append(line)
        return BpcpError(lines)


def fetch_inputs(dataset, pipeline, folder: Path) -> RemoteInputs:
    """Download an s3:// dataset (a LoadData CSV) and/or pipeline into folder."""
    s3 = None
    result = RemoteInputs(dataset, pipeline)
    if is_s3(dataset):
        url = parse_url(dataset, "--dataset")
        if not url.key.lower().endswith(".csv"):
            raise BpcpError(f"{dataset}: a dataset on S3 must be a LoadData CSV (.csv); list the images in one "
                            "(Image_FileName_*/Image_PathName_* columns, paths may be s3:// URLs)")
        s3 = aws.client("s3")
        result.dataset = download(str(url), folder / "dataset" / url.key.rpartition("/")[2], s3)
        result.dataset_url = str(url)
    if is_s3(pipeline):
        url = parse_url(pipeline, "--pipeline")
        s3 = s3 or aws.client("s3")
        result.pipeline = download(str(url), folder / "pipeline" / url.key.rpartition("/")[2], s3)
        result.pipeline_url = str(url)
    return result


def remap(image_sets, maps: tuple[PathMap, ...], base: str | None = None):
    """The image sets with relative PathName_* resolved against base (default: the CSV's folder)
    and --path-map applied; channels recomputed."""
    if image_sets.kind != "loaddata":
        raise BpcpError(f"{image_sets.path}: --path-map and s3:// images work with LoadData CSVs only; "
                        f"this dataset is a {image_sets.kind}: list its images in a LoadData CSV")
    table = remap_loaddata(image_sets.table, base or str(image_sets.path.parent), maps)
    return replace(image_sets, table=table, channels=loaddata_channels(image_sets.path, table))


DATASET_COPY = "dataset.csv"


def origin(plan: Plan, remote: RemoteInputs | None, maps: tuple[PathMap, ...]) -> Plan:
    """The plan recording where its inputs came from: S3 URLs, the dataset's run-folder copy, path maps."""
    dataset, pipeline = plan.dataset, plan.pipeline
    if remote is not None and remote.dataset_url:
        dataset = replace(dataset, path=remote.dataset_url, copy=DATASET_COPY)
    if remote is not None and remote.pipeline_url:
        pipeline = replace(pipeline, path=remote.pipeline_url)
    if maps:
        dataset = replace(dataset, path_map=tuple(f"{m.source}={m.target}" for m in maps))
    return plan.replace(dataset=dataset, pipeline=pipeline)
