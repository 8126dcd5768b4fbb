"""Writes the test pipelines beside this file from bpcp's shipped example pipelines.

Runs under CellProfiler 4.2's own Python (its pipelines load in 4.2 and 5.0; 5.0 upgrades them):
  /opt/cellprofiler/4.2.8.1/bin/python tests/data/make_pipelines.py
The outputs are committed; run this again only to change them.

- illum_loaddata.cppipe: LoadData (no grouping), CorrectIlluminationCalculate "All: First cycle"
  on DNA, CorrectIlluminationApply, nuclei found and measured on the corrected image
- illum_images.cppipe: the same after Images/Metadata/NamesAndTypes/Groups (Groups off)
- quality.cppipe: LoadData, nuclei, MeasureImageQuality with thresholds (experiment-wide values)
- aggregators.cppipe: many modules CellProfiler says aggregate, and some that do not (probe only)
"""
import sys
from pathlib import Path

import cellprofiler_core.preferences as prefs

prefs.set_headless()
from cellprofiler_core.utilities.core.modules import fill_modules, instantiate_module  # noqa: E402

fill_modules()
from cellprofiler_core.pipeline import Pipeline  # noqa: E402

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parents[1] / "bpcp" / "data"


def load(name):
    pipeline = Pipeline()
    pipeline.load(str(SHIPPED / name))
    return pipeline


def module(name, **settings):
    m = instantiate_module(name)
    for key, value in settings.items():
        getattr(m, key).value = value
    return m


def keep(pipeline, names):
    """Drop every module but the input modules, the named ones and ExportToSpreadsheet."""
    for m in list(pipeline.modules()):
        if not (m.is_input_module() or m.is_load_module() or m.module_name in names
                or m.module_name == "ExportToSpreadsheet"):
            pipeline.remove_module(m.module_num)


def insert_before_export(pipeline, modules):
    export = next(m for m in pipeline.modules() if m.module_name == "ExportToSpreadsheet")
    number = export.module_num
    for m in modules:
        m.set_module_num(number)
        pipeline.add_module(m)
        number += 1


def nuclei(image):
    m = instantiate_module("IdentifyPrimaryObjects")
    m.x_name.value = image
    m.y_name.value = "Nuclei"
    m.size_range.value = (8, 80)
    return m


def illumination(pipeline, mode="All: First cycle"):
    keep(pipeline, ())
    intensity = instantiate_module("MeasureObjectIntensity")
    intensity.images_list.value = "CorrDNA, DNA"
    intensity.objects_list.value = "Nuclei"
    apply = instantiate_module("CorrectIlluminationApply")
    apply.images[0].image_name.value = "DNA"
    apply.images[0].corrected_image_name.value = "CorrDNA"
    apply.images[0].illum_correct_function_image_name.value = "IllumDNA"
    apply.images[0].divide_or_subtract.value = "Divide"
    image_intensity = instantiate_module("MeasureImageIntensity")
    image_intensity.images_list.value = "CorrDNA"
    insert_before_export(pipeline, [
        module("CorrectIlluminationCalculate", image_name="DNA", illumination_image_name="IllumDNA",
               each_or_all=mode, smoothing_method="Gaussian Filter", automatic_object_width="Manually",
               size_of_smoothing_filter=20),
        apply, nuclei("CorrDNA"), intensity, image_intensity,
    ])
    return pipeline


def quality():
    pipeline = load("example_loaddata.cppipe")
    keep(pipeline, ())
    insert_before_export(pipeline, [nuclei("DNA"), module("MeasureImageQuality")])
    return pipeline


def aggregators():
    pipeline = load("example_loaddata.cppipe")
    keep(pipeline, ())
    tracked = instantiate_module("TrackObjects")
    tracked.object_name.value = "Nuclei"
    rescale = module("RescaleIntensity", x_name="PH3", y_name="RescaledPH3",
                     rescale_method="Choose specific values to be reset to the full intensity range",
                     wants_automatic_low="Minimum of all images", wants_automatic_high="Maximum of all images")
    insert_before_export(pipeline, [
        module("CorrectIlluminationCalculate", image_name="DNA", illumination_image_name="IllumEach",
               each_or_all="Each"),
        module("CorrectIlluminationCalculate", image_name="PH3", illumination_image_name="IllumAcross",
               each_or_all="All: Across cycles"),
        module("MakeProjection", image_name="DNA", projection_image_name="ProjectionDNA"),
        module("Tile", input_image="DNA", output_image="TiledAcross", tile_method="Across cycles"),
        module("Tile", input_image="DNA", output_image="TiledWithin", tile_method="Within cycles"),
        nuclei("DNA"), tracked, module("MeasureImageQuality"), module("CalculateStatistics"), rescale,
        module("SaveImages", image_name="ProjectionDNA", when_to_save="Last cycle"),
    ])
    return pipeline


def write(pipeline, name):
    with open(HERE / name, "w") as fd:
        pipeline.dump(fd)
    print(HERE / name)


if __name__ == "__main__":
    write(illumination(load("example_loaddata.cppipe")), "illum_loaddata.cppipe")
    write(illumination(load("example_images.cppipe")), "illum_images.cppipe")
    write(quality(), "quality.cppipe")
    write(aggregators(), "aggregators.cppipe")
    sys.exit(0)
