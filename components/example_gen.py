"""ImageExampleGen: the pipeline's ingestion as a Beam pipeline, and the ImportExampleGen path.

A thin TFX adapter over the library: `byol_tf.sources` lists and splits the source and reads
its records, `byol_tf.checks` decides about each (the rule `byol-tf train` applies), and
`byol_tfx.components.ingestion` says what is written and counts it. Beam spreads the reading
and checking over workers:

    units (byol_tf.sources.plan, written as JSON lines to the executor's temporary folder)
      -> ReadFromText -> Reshuffle -> read + check + encode (one DoFn; Beam counters per
         split and outcome, a progress line per worker every 30 s)
      -> Split-train/, Split-eval/: WriteToTFRecord, data_tfrecord-*.gz (GZIP tf.Examples)
      -> the first dropped records (by split and name) -> the IngestionReport

so it runs in one process (DirectRunner in memory), on the cores of one machine
(`--direct_running_mode=multi_processing --direct_num_workers=N`) or on Dataflow from
Vertex (`beam_pipeline_args`, as StatisticsGen). Memory does not grow with the dataset:
records stream from the reading DoFn to the file writers, and output files are not
gathered on one worker unless `num_shards` asks for a fixed number of files.

| component | inputs | outputs | parameters |
| --- | --- | --- | --- |
| `ImageExampleGen` (`byol_tfx.components.example_gen`) | none | `examples` (Examples: splits `train`, `eval`; GZIP TFRecords of tf.Example {image: the original JPEG/PNG bytes or a lossless PNG, label, height, width: int64}), `report` (`byol_tf.IngestionReport`: `ingestion_report.json`, counts per outcome and split) | `config` (the experiment's canonical JSON, its `data` section), `max_bad_fraction` (default `data.max_bad_fraction`; a runtime parameter on Vertex), `num_shards` (0: as Beam bundles the work), `source_fingerprint` (cache key only) |
| `ImportExampleGen` (TFX; `byol_tfx.components.example_gen.import_example_gen`) | none | `examples` (Examples: splits `train`, `eval`, the user's own files) | `train_pattern`, `eval_pattern` (globs relative to `input_base`), `input_base` |

Users who already have TFRecords of tf.Examples have two paths:
  * `ImageExampleGen` with `data.source: tfrecord` re-reads, checks and re-splits them
    (train / eval by the seeded shuffle of `byol_tf.sources`): the safe default. The common
    feature names (`image` / `image/encoded`, `label` / `image/class/label`) need no setting.
  * `import_example_gen(input_base, train_pattern, eval_pattern)`: TFX's ImportExampleGen
    takes the user's own train / eval files as they are. Nothing is checked, so bad records
    reach ExampleValidator (which stops the pipeline on schema anomalies) or the Trainer.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from tfx import types
from tfx import v1 as tfx
from tfx.components.example_gen import utils as example_gen_utils
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils, channel, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from byol_tf import fileio, sources
from byol_tfx.components import ingestion, ingestion_beam

logger = logging.getLogger(__name__)

REPORT_FILE = ingestion.REPORT_FILE
# The config sections this step reads: the pipeline passes only these (its cache key).
CONFIG_SECTIONS = ("data",)
UNITS_FILE = "units.jsonl"
DROPPED_FILE = "first_dropped.json"


class IngestionReport(tfx.dsl.Artifact):
    """JSON counts of every per-record ingestion decision (`ingestion_report.json`)."""

    # Kubeflow v2 compiles custom artifact types only with a `namespace.Name` type name.
    TYPE_NAME = "byol_tf.IngestionReport"


# ---------------------------------------------------------------------------- executor


class Executor(base_beam_executor.BaseBeamExecutor):
    """Plans the reading in the driver, runs the Beam stages, writes the report, applies the gate."""

    def Do(self, input_dict: dict[str, list[types.Artifact]], output_dict, exec_properties: dict[str, Any]):
        from byol_tf import config as config_lib

        del input_dict  # no inputs
        config = config_lib.from_json(exec_properties["config"])
        data = config.data
        max_bad_fraction = exec_properties.get("max_bad_fraction")
        max_bad_fraction = data.max_bad_fraction if max_bad_fraction is None else float(max_bad_fraction)
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ingestion.IngestionError(f"max_bad_fraction={max_bad_fraction} must lie in [0, 1]")
        num_shards = int(exec_properties.get("num_shards") or 0)
        examples = artifact_utils.get_single_instance(output_dict["examples"])
        report = artifact_utils.get_single_instance(output_dict["report"])
        set_examples_properties(examples)

        try:
            plan = sources.plan(data)
        except ValueError as error:
            raise ingestion.IngestionError(str(error)) from None
        scratch = fileio.join(self._get_tmp_dir(), "image_example_gen")
        fileio.makedirs(scratch)
        units_path = fileio.join(scratch, UNITS_FILE)
        dropped_path = fileio.join(scratch, DROPPED_FILE)
        fileio.write_text(units_path, "".join(unit.to_json() + "\n" for unit in plan.units))
        logger.info("ImageExampleGen: %d records in %d units to read and check", plan.records, len(plan.units))

        started = time.monotonic()
        pipeline = ingestion_beam.build_pipeline(
            self._make_beam_pipeline(), units_path, plan, config_lib.to_json(config, CONFIG_SECTIONS),
            examples.uri, dropped_path, num_shards,
        )
        result = pipeline.run()
        result.wait_until_finish()
        dropped = fileio.read_json(dropped_path) if fileio.exists(dropped_path) else []
        settings = {
            **config_lib.to_dict(config)["data"],
            "num_classes_used": plan.num_classes,
            "max_bad_fraction": max_bad_fraction,
            "seconds": round(time.monotonic() - started, 1),
        }
        outcome = ingestion.IngestionReport.from_counters(ingestion_beam.counters(result), dropped, **settings)
        report_path = os.path.join(report.uri, REPORT_FILE)
        outcome.write(report_path)
        fileio.rmtree(scratch)
        logger.info("%s", outcome.summary())
        # The headline counts also as properties, visible in ML Metadata and the Vertex UI.
        totals = outcome.totals()
        for key in ("total", "written", ingestion.CONVERTED, ingestion.RESIZED, "dropped"):
            report.set_int_custom_property(key, int(totals[key]))
        report.set_float_custom_property("bad_fraction", float(outcome.bad_fraction))
        outcome.check(max_bad_fraction, report_path)


class ImageExampleGenSpec(ComponentSpec):
    """Parameters and outputs of ImageExampleGen."""

    PARAMETERS = {
        # The experiment, byol_tf.config.to_json(config, CONFIG_SECTIONS): its data section.
        "config": ExecutionParameter(type=str),
        "max_bad_fraction": ExecutionParameter(type=float, optional=True),
        "num_shards": ExecutionParameter(type=int, optional=True),
        # Not read: part of the cache key, so that changed folder / TFRecord files are read again.
        "source_fingerprint": ExecutionParameter(type=str, optional=True),
    }
    INPUTS = {}
    OUTPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        "report": ChannelParameter(type=IngestionReport),
    }


class ImageExampleGen(base_beam_component.BaseBeamComponent):
    """Reads an image source, checks every record, writes train / eval tf.Examples (Beam).

    Args:
        config: the experiment, `byol_tf.config.to_json(config, CONFIG_SECTIONS)`: `data`
            names the source, the hold-out, the record features and the size cap.
        max_bad_fraction: fail the run when more than this fraction of records is dropped;
            None takes `data.max_bad_fraction`. A float or a RuntimeParameter.
        num_shards: TFRecord files per split; 0 (default) lets Beam decide (one per bundle),
            which keeps memory flat; a fixed number gathers each split's records on its writers.
        source_fingerprint: `byol_tf.sources.fingerprint` of a folder / TFRecord source
            (computed by the runner): changed files make the step a cache miss.

    Outputs:
        examples: `Examples` with splits `train` and `eval` (the held-out images, never used
            in pretraining) under Split-train/ and Split-eval/, as GZIP TFRecords
            `data_tfrecord-*.gz` of tf.Example {image, label, height, width}
            (`byol_tfx.components.ingestion`).
        report: `byol_tf.IngestionReport`, `ingestion_report.json`: per split, records
            read / written / ok / converted / resized / dropped, drops per reason, source
            modes converted, the first dropped records by name; the headline counts also
            as custom properties.

    Raises (when run):
        byol_tfx.components.ingestion.IngestionError: too many bad records, an empty split,
            or a source that cannot be read.
    """

    SPEC_CLASS = ImageExampleGenSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(self, config: str, max_bad_fraction=None, num_shards: int = 0, source_fingerprint: str | None = None):
        super().__init__(
            spec=ImageExampleGenSpec(
                config=config,
                max_bad_fraction=max_bad_fraction,
                num_shards=num_shards,
                source_fingerprint=source_fingerprint,
                examples=channel.Channel(type=standard_artifacts.Examples),
                report=channel.Channel(type=IngestionReport),
            )
        )


def set_examples_properties(examples: standard_artifacts.Examples):
    """Marks an Examples artifact the way TFX's own ExampleGen does, so readers find the data."""
    examples.split_names = artifact_utils.encode_split_names(list(ingestion.SPLITS))
    examples.span = 0
    examples.version = 0
    examples.set_string_custom_property(example_gen_utils.FILE_FORMAT_PROPERTY_NAME, "tfrecords_gzip")
    examples.set_string_custom_property(
        example_gen_utils.PAYLOAD_FORMAT_PROPERTY_NAME,
        example_gen_pb2.PayloadFormat.Name(example_gen_pb2.FORMAT_TF_EXAMPLE),
    )


def import_example_gen(input_base: str, train_pattern: str, eval_pattern: str):
    """TFX's ImportExampleGen over users' own train / eval TFRecord files.

    The files must hold GZIP or plain TFRecords of tf.Examples with an encoded PNG/JPEG
    image (`image` or `image/encoded`) and an int64 label (`label` or `image/class/label`).

    Args:
        input_base: folder holding the files.
        train_pattern: glob relative to `input_base` of the pretraining files.
        eval_pattern: glob relative to `input_base` of the held-out files.

    Returns:
        An ImportExampleGen whose `examples` output has splits `train` and `eval`.
    """
    input_config = tfx.proto.Input(
        splits=[
            tfx.proto.Input.Split(name=ingestion.TRAIN_SPLIT, pattern=train_pattern),
            tfx.proto.Input.Split(name=ingestion.EVAL_SPLIT, pattern=eval_pattern),
        ]
    )
    return tfx.components.ImportExampleGen(input_base=input_base, input_config=input_config)
