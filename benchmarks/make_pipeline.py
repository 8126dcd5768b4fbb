"""Write benchmarks/data/measure_heavy.cppipe: bpcp's ExampleHuman LoadData pipeline plus the
measurement modules of a typical profiling pipeline (image intensity, texture, granularity,
neighbours, intensity distribution), saved by CellProfiler 4.2 so that 4.2 and 5.x both load it.

Run it with CellProfiler 4.2's Python (the committed .cppipe is its output):

    /opt/cellprofiler/4.2.8.1/bin/python benchmarks/make_pipeline.py [OUT]
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "bpcp" / "data" / "example_loaddata.cppipe"
DEFAULT_OUT = HERE / "data" / "measure_heavy.cppipe"


def build(out: Path) -> None:
    from cellprofiler_core.preferences import set_headless
    set_headless()
    import tempfile

    from cellprofiler.modules.measuregranularity import MeasureGranularity
    from cellprofiler.modules.measureimageintensity import MeasureImageIntensity
    from cellprofiler.modules.measureobjectintensitydistribution import MeasureObjectIntensityDistribution
    from cellprofiler.modules.measureobjectneighbors import MeasureObjectNeighbors
    from cellprofiler.modules.measuretexture import MeasureTexture
    from cellprofiler_core.pipeline import Pipeline
    from cellprofiler_core.preferences import set_default_image_directory, set_default_output_directory

    # LoadData reads the CSV header to know the image names: give it one like the plate's
    folder = tempfile.mkdtemp(prefix="bpcp-mkpipe-")
    columns = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    for channel in ("DNA", "PH3", "cellbody"):
        columns += [f"Image_FileName_{channel}", f"Image_PathName_{channel}"]
    values = ["P", "A01", "1"] + ["x.png", folder] * 3
    Path(folder, "load_data.csv").write_text(",".join(columns) + "\n" + ",".join(values) + "\n")
    set_default_image_directory(folder)
    set_default_output_directory(folder)

    pipeline = Pipeline()
    pipeline.load(str(SOURCE))
    names = [m.module_name for m in pipeline.modules()]
    # insert after MeasureObjectSizeShape, before the overlay / save / export modules
    position = names.index("MeasureObjectSizeShape") + 2   # module_num is 1-based

    added = []

    m = MeasureImageIntensity()
    m.images_list.value = "DNA, PH3, cellbody"
    added.append(m)



    m = MeasureTexture()
    m.images_list.value = "DNA, cellbody"
    m.objects_list.value = "Nuclei, Cells"
    m.gray_levels.value = 256
    m.scale_groups[0].scale.value = 3
    m.images_or_objects.value = "Both"
    added.append(m)

    m = MeasureGranularity()
    m.images_list.value = "DNA, cellbody"
    m.wants_objects.value = True
    m.objects_list.value = "Nuclei"
    m.granular_spectrum_length.value = 8
    added.append(m)

    m = MeasureObjectNeighbors()
    m.object_name.value = "Nuclei"
    m.neighbors_name.value = "Nuclei"
    m.distance_method.value = "Within a specified distance"
    m.distance.value = 40
    m.wants_count_image.value = False
    m.wants_percent_touching_image.value = False
    added.append(m)

    m = MeasureObjectNeighbors()
    m.object_name.value = "Cells"
    m.neighbors_name.value = "Cells"
    m.distance_method.value = "Adjacent"
    m.wants_count_image.value = False
    m.wants_percent_touching_image.value = False
    added.append(m)

    m = MeasureObjectIntensityDistribution()
    m.images_list.value = "DNA, cellbody"
    if not m.objects:
        m.add_object(can_remove=False)
    if not m.bin_counts:
        m.add_bin_count(can_remove=False)
    m.objects[0].object_name.value = "Cells"
    m.objects[0].center_choice.value = "Centers of other objects"
    m.objects[0].center_object_name.value = "Nuclei"
    m.bin_counts[0].bin_count.value = 4
    added.append(m)

    for offset, module in enumerate(added):
        module.module_num = position + offset
        pipeline.add_module(module)

    problems = []
    for module in pipeline.modules():
        try:
            module.test_valid(pipeline)
        except Exception as exc:  # ValidationError: the pipeline would fail at run time
            problems.append(f"{module.module_name}: {exc}")
    if problems:
        sys.exit("invalid pipeline:\n" + "\n".join(problems))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fd:
        pipeline.dump(fd)
    print(f"wrote {out}: " + ", ".join(m.module_name for m in pipeline.modules()))


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
