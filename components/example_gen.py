"""ImageExampleGen: the pipeline's ingestion component, and the ImportExampleGen path.

A thin TFX adapter over `byol_tfx.components.ingestion.ingest`; all decisions about records live
there. The component reads the embedded dataset (mnist5k), scikit-learn digits, a TFDS
name, a folder of class sub-folders or TFRecords of tf.Examples, checks every record,
and writes a standard `Examples` artifact that StatisticsGen, ExampleValidator and the
Trainer read like any ExampleGen's output.

| component | inputs | outputs | parameters |
| --- | --- | --- | --- |
| `ImageExampleGen` (`byol_tfx.components.example_gen`) | none | `examples` (Examples: splits `train`, `eval`; GZIP TFRecords of tf.Example {image: PNG bytes, label, height, width: int64}), `report` (`byol_tf.IngestionReport`: `ingestion_report.json`, counts per category and split) | `config` (the experiment's canonical JSON: its `data` section and `augment.image_size`), `max_bad_fraction` (0.01), `num_shards` (1), `source_fingerprint` (cache key only) |
| `ImportExampleGen` (TFX; `byol_tfx.components.example_gen.import_example_gen`) | none | `examples` (Examples: splits `train`, `eval`, the user's own files) | `train_pattern`, `eval_pattern` (globs relative to `input_base`), `input_base` |

Users who already have TFRecords of tf.Examples with `image` bytes and `label` int64
(byol_tf.data's `tfrecord` contract) have two paths:
  * `ImageExampleGen(source="tfrecord", path=<glob>)` re-reads, checks, converts and
    re-splits them (train / eval by the seeded shuffle): the safe default.
  * `import_example_gen(input_base, train_pattern, eval_pattern)`: TFX's ImportExampleGen
    copies the user's own train / eval files as they are. Nothing is checked, so bad
    records reach ExampleValidator (which stops the pipeline on schema anomalies) or the
    trainer; records without `height` / `width` features cannot be size-checked there.
"""

import os

from tfx import v1 as tfx
from tfx.components.example_gen import utils as example_gen_utils
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils, standard_artifacts

from byol_tfx.components import ingestion


class IngestionReport(tfx.dsl.Artifact):
    """JSON counts of every per-record ingestion decision (`ingestion_report.json`)."""

    # Kubeflow v2 compiles custom artifact types only with a `namespace.Name` type name.
    TYPE_NAME = "byol_tf.IngestionReport"


REPORT_FILE = ingestion.REPORT_FILE
# The config sections this step reads: the pipeline passes only these (its cache key).
CONFIG_SECTIONS = ("data", "augment")


@tfx.dsl.components.component
def ImageExampleGen(  # noqa: N802 -- TFX names a component after its function
    examples: tfx.dsl.components.OutputArtifact[standard_artifacts.Examples],
    report: tfx.dsl.components.OutputArtifact[IngestionReport],
    config: tfx.dsl.components.Parameter[str],
    max_bad_fraction: tfx.dsl.components.Parameter[float] = 0.01,
    num_shards: tfx.dsl.components.Parameter[int] = 1,
    source_fingerprint: tfx.dsl.components.Parameter[str] = None,
):
    """Reads an image source, checks every record, writes train / eval tf.Examples.

    Inputs: none.

    Outputs:
        examples: `Examples` with splits `train` and `eval` (the held-out images, never
            used in pretraining) under Split-train/ and Split-eval/, as GZIP TFRecords
            `data_tfrecord-00000-of-00001.gz` of tf.Example {image: 8-bit RGB PNG bytes
            (original bytes for unchanged PNG/JPEG files), label, height, width: int64}.
        report: `byol_tf.IngestionReport`, `ingestion_report.json`: per split, records
            read / written / ok / converted / resized / dropped, drops per reason, source
            modes converted, and the first dropped records by name.

    Parameters:
        config: the experiment, `byol_tf.config.to_json(config)`: `data` names the source and
            the hold-out, `augment.image_size` the size written.
        max_bad_fraction: fail the run when more than this fraction of records is
            dropped (default 1%); the error names the counts. A runtime parameter on Vertex.
        num_shards: TFRecord files per split.
        source_fingerprint: unused by the code; part of the cache key, so that changed
            folder / TFRecord files are read again (see
            `byol_tfx.components.ingestion.source_fingerprint`).

    Raises:
        byol_tfx.components.ingestion.IngestionError: too many bad records, an empty split,
            or a source that cannot be read; byol_tf.config.ConfigError: a bad setting.
    """
    from byol_tf import config as config_lib

    del source_fingerprint  # only keys the cache
    set_examples_properties(examples)
    result = ingestion.ingest(
        config_lib.from_json(config),
        examples.uri,
        os.path.join(report.uri, REPORT_FILE),
        max_bad_fraction=max_bad_fraction,
        num_shards=num_shards,
    )
    # The headline counts also as properties, visible in ML Metadata and the Vertex UI.
    totals = result.totals()
    for key in ("total", "written", "converted", "resized", "dropped"):
        report.set_int_custom_property(key, int(totals[key]))
    report.set_float_custom_property("bad_fraction", float(result.bad_fraction))


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

    The files must hold GZIP or plain TFRecords of tf.Examples with `image` (encoded
    PNG/JPEG bytes) and `label` (int64) features, and ideally `height` / `width` (int64)
    so that ExampleValidator can check image sizes.

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
