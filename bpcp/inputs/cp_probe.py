"""Ask CellProfiler itself about a pipeline (and, optionally, the image sets a dataset makes).

This file runs under CellProfiler's own Python (its venv), not bpcp's: it imports only the
standard library and cellprofiler_core, and must stay Python 3.9 compatible (CellProfiler 4.2).
It writes one JSON document to --out. bpcp.inputs.cellprofiler runs it and reads the result.

Usage: python cp_probe.py --pipeline P [--file-list F | --data-file CSV | --batch] --out OUT.json
(with --batch, P is a Batch_data.h5: its pipeline, image sets and groups are read from it)

What a module aggregates is what the module itself tells CellProfiler: `is_aggregation_module()`
(the image sets of a group must run in one process, in order: CellProfiler's own workers keep such
a group on one worker), and measurements it makes after the whole run (a `post_run` with columns
flagged available post-run, or one that declares no columns at all, such as CalculateStatistics).
Image sets are numbered by running the input modules' prepare_run, as `cellprofiler -c -r` does.
"""
import argparse
import json
import logging
import os
import sys
import traceback

# This folder holds bpcp's own cellprofiler.py: never let it shadow the real package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)


def _setting(module, name, default=None):
    value = getattr(module, name, None)
    if value is None:
        return default
    return getattr(value, "value", value)


def describe_pipeline(pipeline, batch=False):
    """The facts bpcp needs: input style, grouping, what aggregates, what ExportToSpreadsheet writes."""
    modules = [m for m in pipeline.modules() if m.enabled]
    names = [m.module_name for m in modules]
    info = {
        "modules": names,
        "input": "loaddata" if "LoadData" in names else ("images" if "NamesAndTypes" in names else "none"),
        "grouping_keys": [],
        "grouping_module": None,
        "aggregation": [],
        "loaddata_rows": None,
        "exports": [],
        "objects": [],
        "problems": [],
    }
    for m in modules:
        if m.module_name == "LoadData" and _setting(m, "wants_image_groupings", False) \
                and list(m.metadata_fields.selections):
            info["grouping_keys"] = ["Metadata_" + k for k in m.metadata_fields.selections]
            info["grouping_module"] = "LoadData"
        if m.module_name == "LoadData" and _setting(m, "wants_rows", False):
            info["loaddata_rows"] = [int(m.row_range.min), int(m.row_range.max)]
        if m.module_name == "Groups" and _setting(m, "wants_groups", False):
            info["grouping_keys"] = [
                "Metadata_" + g.metadata_choice.value for g in m.grouping_metadata
            ]
            info["grouping_module"] = "Groups"
        info["aggregation"] += aggregation(pipeline, m)
        if m.is_create_batch_module() and not batch:
            info["problems"].append(
                "the pipeline contains CreateBatchFiles; run it once in CellProfiler to make "
                "Batch_data.h5 and give bpcp that file, or remove the module"
            )
    objects = sorted({c[0] for c in pipeline.get_measurement_columns()})
    info["objects"] = objects
    for m in modules:
        if m.module_name == "ExportToSpreadsheet":
            info["exports"].append(_describe_export(m, objects))
        elif m.module_name == "ExportToDatabase":
            info["problems"].append(
                f"module {m.module_num} ExportToDatabase: bpcp merges ExportToSpreadsheet output; "
                "replace ExportToDatabase with ExportToSpreadsheet"
            )
    return info


def _first_paragraph(function):
    doc = (getattr(function, "__doc__", None) or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def aggregation(pipeline, m):
    """How a module uses image sets other than the current one, in CellProfiler's own terms.

    "group": it aggregates over the image sets of a CellProfiler group (the whole run when the
    pipeline does not group); "run": it computes values over every image set of the run after
    the run. Each entry has CellProfiler's own words: the docstring of the method that says so,
    and the warnings the module gives (validate_module_warnings, and what its prepare_run logs).
    """
    from cellprofiler_core.constants.measurement import MCA_AVAILABLE_POST_RUN
    from cellprofiler_core.module import Module

    found = []
    cls = type(m)
    try:
        per_group = bool(m.is_aggregation_module())
    except Exception:
        per_group = False
    if per_group:
        found.append({"scope": "group", "reason": _first_paragraph(cls.is_aggregation_module)})
    if cls.post_run is not Module.post_run and not m.should_stop_writing_measurements() \
            and not m.is_create_batch_module():
        try:
            columns = list(m.get_measurement_columns(pipeline))
        except Exception:
            columns = []
        post_run = [c[1] for c in columns
                    if len(c) > 3 and isinstance(c[3], dict) and c[3].get(MCA_AVAILABLE_POST_RUN)]
        if post_run or not columns:
            found.append({"scope": "run", "reason": _first_paragraph(cls.post_run),
                          "features": post_run[:5]})
    if not found:
        return []
    warnings = _module_warnings(pipeline, m, run_prepare=any(f["scope"] == "run" for f in found))
    for entry in found:
        entry.update(module=m.module_name, number=m.module_num, warnings=warnings)
    return found


def _module_warnings(pipeline, m, run_prepare):
    """CellProfiler's own warnings about a module: validate_module_warnings, and (for modules that
    compute after the run) what its prepare_run logs at WARNING level in a headless run."""
    from cellprofiler_core.module import Module

    found = []
    try:
        m.validate_module_warnings(pipeline)
    except Exception as exc:
        found.append(str(getattr(exc, "message", None) or exc))
    if not run_prepare or type(m).prepare_run is Module.prepare_run or m.is_load_module() \
            or m.is_input_module() or m.is_create_batch_module():
        return found

    class Collect(logging.Handler):
        def emit(self, record):
            found.append(record.getMessage())

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = [Collect(logging.WARNING)]
    root.setLevel(logging.WARNING)      # setLevel, not .level: it clears the loggers' caches
    try:
        from cellprofiler_core.measurement import Measurements
        from cellprofiler_core.workspace import Workspace

        measurements = Measurements()
        m.prepare_run(Workspace(pipeline, m, measurements, None, measurements, None))
    except Exception:
        pass
    finally:
        root.handlers = handlers
        root.setLevel(level)
    return list(dict.fromkeys(found))


def _describe_export(m, objects):
    delimiter = _setting(m, "delimiter", "Comma (\",\")")
    ext = "csv" if delimiter.startswith("Comma") else "txt"
    prefix = _setting(m, "prefix", "") if _setting(m, "wants_prefix", False) else ""
    directory = m.directory
    choice = directory.dir_choice
    export = {
        "module": m.module_num,
        "delimiter": "," if ext == "csv" else "\t",
        "directory": choice,
        "custom_path": directory.custom_path,
        "files": {},
        "unpredictable": [],
    }
    if _setting(m, "wants_everything", True):
        for name in objects:
            export["files"][name] = prefix + name + "." + ext
    else:
        for group in m.object_groups:
            name = group.name.value
            fname = name + "." + ext if group.wants_automatic_file_name.value else group.file_name.value
            if "\\g<" in fname or "(?" in fname:
                export["unpredictable"].append(name)
                continue
            export["files"][name] = prefix + fname
    return export


def _prepare_inputs(pipeline, what):
    """prepare_run of the input and load modules only (analysis modules' prepare_run can write
    files, e.g. CreateBatchFiles'); numbers the image sets and their groups as a run does."""
    from cellprofiler_core.measurement import Measurements
    from cellprofiler_core.workspace import Workspace

    modules = list(pipeline.modules())
    last = max([i for i, m in enumerate(modules) if m.is_input_module() or m.is_load_module()], default=-1)
    end = modules[last + 1] if last + 1 < len(modules) else None
    m = Measurements()
    workspace = Workspace(pipeline, None, m, None, m, None)
    if not pipeline.prepare_run(workspace, end_module=end):
        raise RuntimeError("CellProfiler could not build image sets from the " + what)
    return m


def image_sets(pipeline, file_list):
    """Run CellProfiler's own input modules over a file list; return the image sets in order."""
    with open(file_list) as fd:
        paths = [line.strip() for line in fd if line.strip()]
    pipeline.add_pathnames_to_file_list(paths)
    m = _prepare_inputs(pipeline, "file list")
    numbers = [int(n) for n in m.get_image_numbers()]
    return {"image_numbers": numbers, "columns": _columns(m, numbers)}


ROW = "Metadata_bpcpCsvRow"


def loaddata_numbering(pipeline, data_file, scratch):
    """ImageNumber, Group_Number and Group_Index LoadData gives each row of a CSV in one run.

    LoadData types each column from its values (int, float or text), groups by the str() of the
    typed values, sorted, and the run renumbers image sets group by group. A copy of the CSV with
    one more column (the row's position) tells which row became which image set.
    """
    import csv

    from cellprofiler_core.constants.measurement import GROUP_INDEX, GROUP_NUMBER
    from cellprofiler_core.preferences import set_data_file

    copy = os.path.join(scratch, "numbering.csv")
    rows = 0
    with open(data_file, newline="", encoding="utf-8-sig") as src, open(copy, "w", newline="") as dst:
        reader, writer = csv.reader(src), csv.writer(dst)
        header = next(reader)
        if ROW in header:
            raise RuntimeError("the CSV has a column named " + ROW)
        writer.writerow(header + [ROW])
        for row in reader:
            if row:
                writer.writerow(row + [str(rows)])
                rows += 1
    set_data_file(copy)
    m = _prepare_inputs(pipeline, "LoadData CSV")
    numbers = [int(n) for n in m.get_image_numbers()]
    image_number, group_number, group_index = [0] * rows, [0] * rows, [0] * rows
    for n, row, g, i in zip(numbers, m.get_measurement("Image", ROW, numbers),
                            m.get_measurement("Image", GROUP_NUMBER, numbers),
                            m.get_measurement("Image", GROUP_INDEX, numbers)):
        image_number[int(row)], group_number[int(row)], group_index[int(row)] = n, int(g), int(i)
    return {"rows": rows, "image_number": image_number, "group_number": group_number,
            "group_index": group_index, "grouping_keys": list(m.get_grouping_tags_or_metadata() or [])}


def _columns(m, numbers):
    keep = sorted(
        f for f in m.get_feature_names("Image") if f.startswith(("Metadata_", "URL_", "Group_"))
    )
    columns = {}
    for f in keep:
        values = m.get_measurement("Image", f, numbers)
        columns[f] = [v if isinstance(v, str) else (None if v is None else str(v)) for v in values]
    return columns


def batch_file(path):
    """Pipeline, image sets and groups stored in a Batch_data.h5 (CreateBatchFiles output)."""
    import io

    from cellprofiler_core.measurement import Measurements
    from cellprofiler_core.pipeline import Pipeline

    m = Measurements(filename=path, mode="r")
    pipeline = Pipeline()
    pipeline.loadtxt(io.StringIO(m.get_experiment_measurement("Pipeline_Pipeline")))
    numbers = [int(n) for n in m.get_image_numbers()]
    keys = list(m.get_grouping_tags_or_metadata())
    groups = [(dict(k), [int(n) for n in v]) for k, v in m.get_groupings(keys)]
    return pipeline, {"image_numbers": numbers, "columns": _columns(m, numbers),
                      "grouping_keys": keys, "groups": groups}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--file-list")
    parser.add_argument("--data-file", help="a LoadData CSV: number its rows as one run would")
    parser.add_argument("--batch", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--readers", default="", help="comma-separated readers for CellProfiler 5 (as its -e)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    result = {"ok": False}
    try:
        import cellprofiler_core
        import cellprofiler_core.preferences as prefs

        prefs.set_headless()
        from cellprofiler_core.utilities.core.modules import fill_modules

        fill_modules()
        try:  # CellProfiler 5: readers are plugins; only imageio works offline without Java
            from cellprofiler_core.reader import fill_readers, filter_active_readers

            fill_readers(check_config=True)
            if args.readers:
                filter_active_readers(args.readers.split(","))
        except ImportError:
            pass
        try:
            from cellprofiler import __version__ as cp_version
        except Exception:  # pragma: no cover - very old layouts
            cp_version = getattr(cellprofiler_core, "__version__", "unknown")
        result["cellprofiler_version"] = str(cp_version)
        result["python"] = sys.executable
        from cellprofiler_core.pipeline import Pipeline

        pipeline = Pipeline()
        errors = []

        def on_event(caller, event):
            if type(event).__name__ == "LoadException":
                errors.append(str(getattr(event, "error", event)))

        pipeline.add_listener(on_event)
        if args.batch:
            pipeline, result["image_sets"] = batch_file(os.path.abspath(args.pipeline))
        else:
            pipeline.load(os.path.abspath(args.pipeline))
        if errors:
            raise RuntimeError("; ".join(errors))
        if not list(pipeline.modules()):
            raise RuntimeError("the pipeline has no modules")
        result["pipeline"] = describe_pipeline(pipeline, batch=args.batch)
        if args.data_file:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="bpcp-probe-") as scratch:
                result["numbering"] = loaddata_numbering(pipeline, os.path.abspath(args.data_file), scratch)
        if args.file_list:
            java = str(cp_version).startswith("4")   # 4.x builds image sets in Java
            if java:
                from cellprofiler_core.utilities.java import start_java

                start_java()
            try:
                result["image_sets"] = image_sets(pipeline, args.file_list)
            finally:
                if java:
                    from cellprofiler_core.utilities.java import stop_java

                    stop_java()
        result["ok"] = True
    except Exception as exc:  # report, don't crash: the caller turns this into one clear line
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    with open(args.out, "w") as fd:
        json.dump(result, fd)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
