"""Ask CellProfiler itself about a pipeline (and, optionally, the image sets a file list makes).

This file runs under CellProfiler's own Python (its venv), not bpcp's: it imports only the
standard library and cellprofiler_core, and must stay Python 3.9 compatible (CellProfiler 4.2).
It writes one JSON document to --out. bpcp.cellprofiler runs it and reads the result.

Usage: python cp_probe.py --pipeline P [--file-list F | --batch] --out OUT.json
(with --batch, P is a Batch_data.h5: its pipeline, image sets and groups are read from it)
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
    """The facts bpcp needs: input style, grouping keys, what ExportToSpreadsheet writes."""
    modules = [m for m in pipeline.modules() if m.enabled]
    names = [m.module_name for m in modules]
    info = {
        "modules": names,
        "input": "loaddata" if "LoadData" in names else ("images" if "NamesAndTypes" in names else "none"),
        "grouping_keys": [],
        "exports": [],
        "objects": [],
        "problems": [],
    }
    for m in modules:
        if m.module_name == "LoadData" and _setting(m, "wants_image_groupings", False):
            info["grouping_keys"] = ["Metadata_" + k for k in m.metadata_fields.selections]
        if m.module_name == "Groups" and _setting(m, "wants_groups", False):
            info["grouping_keys"] = [
                "Metadata_" + g.metadata_choice.value for g in m.grouping_metadata
            ]
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
                "module %d ExportToDatabase: bpcp merges ExportToSpreadsheet output; "
                "replace ExportToDatabase with ExportToSpreadsheet" % m.module_num
            )
    return info


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
            if group.wants_automatic_file_name.value:
                fname = name + "." + ext
            else:
                fname = group.file_name.value
            if "\\g<" in fname or "(?" in fname:
                export["unpredictable"].append(name)
                continue
            export["files"][name] = prefix + fname
    return export


def image_sets(pipeline, file_list):
    """Run CellProfiler's own input modules over a file list; return the image sets in order."""
    from cellprofiler_core.measurement import Measurements
    from cellprofiler_core.workspace import Workspace

    with open(file_list) as fd:
        paths = [line.strip() for line in fd if line.strip()]
    pipeline.add_pathnames_to_file_list(paths)
    m = Measurements()
    workspace = Workspace(pipeline, None, m, None, m, None)
    if not pipeline.prepare_run(workspace):
        raise RuntimeError("CellProfiler could not build image sets from the file list")
    numbers = [int(n) for n in m.get_image_numbers()]
    return {"image_numbers": numbers, "columns": _columns(m, numbers)}


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
    parser.add_argument("--batch", action="store_true")
    parser.add_argument("--out", required=True)
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
            filter_active_readers(["imageio_reader"])
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
        result["error"] = "%s: %s" % (type(exc).__name__, exc)
        result["traceback"] = traceback.format_exc()
    with open(args.out, "w") as fd:
        json.dump(result, fd)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
