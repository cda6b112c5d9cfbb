"""Data validation: StatisticsGen -> ImageSchemaGen -> ExampleValidator -> ValidationGate.

TFX's ExampleValidator only *records* anomalies; nothing stops a pipeline on them. Two
small components close the gaps:

* `ImageSchemaGen` infers a schema from the *train* split's statistics (as SchemaGen
  does) and adds what inference cannot know: the label's integer domain
  [0, num_classes - 1], so an eval label outside the classes is an anomaly (SchemaGen
  leaves integer domains open), and one image, label, height and width per example.
  Image sizes are not pinned: the Examples hold full-resolution images of any size.
* `ValidationGate` reads ExampleValidator's anomalies and fails with every anomaly named
  (split, feature, short description) when there is any; otherwise it passes the schema
  on as `validated_schema`, which the Trainer takes as its `schema` input. The Trainer
  therefore cannot run on data that failed validation, and nothing downstream of it
  (evaluation, Pusher) runs either.

| component | inputs | outputs | parameters |
| --- | --- | --- | --- |
| `StatisticsGen` (TFX) | `examples` (Examples) | `statistics` (ExampleStatistics, per split) | none |
| `ImageSchemaGen` (`byol_tfx.components.validation`) | `statistics` (ExampleStatistics) | `schema` (Schema: `schema.pbtxt`) | `config` (the experiment's JSON, its `data` section: `data.num_classes`, default max train label + 1), `require_label` (True) |
| `ExampleValidator` (TFX) | `statistics`, `schema` | `anomalies` (ExampleAnomalies, per split `SchemaDiff.pb`) | none |
| `ValidationGate` (`byol_tfx.components.validation`) | `anomalies` (ExampleAnomalies), `schema` (Schema) | `validated_schema` (Schema, a copy; the Trainer's `schema`) | none; fails the run naming each anomaly |

`validation_components(examples, config_json)` builds all four.

Pure functions (`curate_schema`, `read_anomalies`, `describe_anomalies`) hold the logic;
the components only move artifacts.
"""

import os
from typing import Dict, List, Optional

# TFDV 1.16 imports a module that TFX 1.21 provides: tfx first (docs/DESIGN.md).
from tfx import v1 as tfx
from tfx.components.statistics_gen import stats_artifact_utils
from tfx.types import artifact_utils, standard_artifacts
from tfx.utils import io_utils

import tensorflow_data_validation as tfdv  # noqa: I001 -- must follow tfx
from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2

from byol_tfx.components import ingestion

SCHEMA_FILE = "schema.pbtxt"  # the file name TFX's SchemaGen writes and readers look for
ANOMALIES_FILE = "SchemaDiff.pb"  # ExampleValidator's per-split binary Anomalies proto
LABEL = "label"
IMAGE = "image"
SIZE_FEATURES = ("height", "width")
# The config sections this step reads: the pipeline passes only these (its cache key).
CONFIG_SECTIONS = ("data",)


class DataValidationError(ValueError):
    """ExampleValidator found anomalies; the pipeline stops before training."""


# --------------------------------------------------------------------------- schema


def _feature(schema: schema_pb2.Schema, name: str) -> Optional[schema_pb2.Feature]:
    for feature in schema.feature:
        if feature.name == name:
            return feature
    return None


def max_label(statistics) -> Optional[int]:
    """The largest `label` value in a DatasetFeatureStatistics, or None without labels."""
    for feature in statistics.features:
        name = feature.path.step[0] if feature.path.step else feature.name
        if name == LABEL and feature.HasField("num_stats"):
            return int(feature.num_stats.max)
    return None


def curate_schema(schema: schema_pb2.Schema, *, num_classes: int, require_label: bool = True) -> schema_pb2.Schema:
    """Adds the constraints inference cannot know to an inferred image schema.

    Args:
        schema: inferred from the train split (tfdv.infer_schema); not modified.
        num_classes: the label must lie in [0, num_classes - 1].
        require_label: every example must have exactly one label.

    Returns:
        The curated copy.

    Raises:
        ValueError: the schema has no `image` or no `label` feature.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be at least 1")
    curated = schema_pb2.Schema()
    curated.CopyFrom(schema)
    image = _feature(curated, IMAGE)
    if image is None or image.type != schema_pb2.BYTES:
        names = [feature.name for feature in curated.feature]
        raise ValueError(f"the examples have no '{IMAGE}' bytes feature (features: {names})")
    _require_one_value(image)

    label = _feature(curated, LABEL)
    if label is None:
        raise ValueError(f"the examples have no '{LABEL}' feature: linear evaluation needs labels")
    # A label domain replaces whatever inference put there (e.g. a string domain).
    label.ClearField("domain_info")
    label.int_domain.CopyFrom(schema_pb2.IntDomain(min=0, max=num_classes - 1))
    if require_label:
        _require_one_value(label)

    for name in SIZE_FEATURES:
        feature = _feature(curated, name)
        if feature is not None:
            # Any size, but a positive one: the value inference saw in train is no limit.
            feature.ClearField("domain_info")
            feature.int_domain.CopyFrom(schema_pb2.IntDomain(min=1))
            _require_one_value(feature)
    return curated


def _require_one_value(feature: schema_pb2.Feature):
    feature.presence.min_fraction = 1.0
    feature.presence.min_count = 1
    if not feature.HasField("shape"):
        feature.value_count.min = 1
        feature.value_count.max = 1


def infer_curated_schema(
    train_statistics, *, num_classes: Optional[int], require_label: bool = True
) -> schema_pb2.Schema:
    """tfdv.infer_schema on the train split's statistics, then `curate_schema`.

    Args:
        train_statistics: a DatasetFeatureStatisticsList of the train split only, so the
            eval split is checked against what pretraining saw.
        num_classes: None takes the largest train label + 1.
        require_label: as for `curate_schema`.
    """
    schema = tfdv.infer_schema(train_statistics, infer_feature_shape=True)
    if num_classes is None:
        largest = max_label(train_statistics.datasets[0])
        if largest is None:
            raise ValueError(f"the train split has no '{LABEL}' values to count the classes from; set num_classes")
        num_classes = largest + 1
    return curate_schema(schema, num_classes=num_classes, require_label=require_label)


# --------------------------------------------------------------------------- anomalies


def read_anomalies(anomalies_artifact) -> Dict[str, anomalies_pb2.Anomalies]:
    """ExampleValidator's Anomalies proto of every split, by split name."""
    result = {}
    for split in artifact_utils.decode_split_names(anomalies_artifact.split_names):
        path = os.path.join(artifact_utils.get_split_uri([anomalies_artifact], split), ANOMALIES_FILE)
        anomalies = anomalies_pb2.Anomalies()
        anomalies.ParseFromString(io_utils.read_bytes_file(path))
        result[split] = anomalies
    return result


def describe_anomalies(anomalies_by_split: Dict[str, anomalies_pb2.Anomalies]) -> List[str]:
    """One readable line per anomaly: split, feature, short description and detail."""
    lines = []
    for split, anomalies in sorted(anomalies_by_split.items()):
        for feature, info in sorted(anomalies.anomaly_info.items()):
            lines.append(f"split '{split}', feature '{feature}': {_describe(info)}")
        if anomalies.HasField("dataset_anomaly_info"):
            lines.append(f"split '{split}', whole dataset: {_describe(anomalies.dataset_anomaly_info)}")
    return lines


def _describe(info: anomalies_pb2.AnomalyInfo) -> str:
    reasons = [reason for reason in info.reason if reason.short_description or reason.description]
    if not reasons:
        return f"{info.short_description} ({info.description})" if info.description else info.short_description
    return "; ".join(
        f"{reason.short_description} ({reason.description})" if reason.description else reason.short_description
        for reason in reasons
    )


def check_anomalies(anomalies_by_split: Dict[str, anomalies_pb2.Anomalies], where: str = ""):
    """Raises DataValidationError naming every anomaly, if there is any."""
    lines = describe_anomalies(anomalies_by_split)
    if lines:
        count = f"{len(lines)} anomal{'y' if len(lines) == 1 else 'ies'}"
        location = f"\nDetails: {where}" if where else ""
        raise DataValidationError(
            f"ExampleValidator found {count}; the pipeline stops before training:\n  "
            + "\n  ".join(lines)
            + location
            + "\nFix the data, or change data.num_classes if the change is intended."
        )


# --------------------------------------------------------------------------- components


@tfx.dsl.components.component
def ImageSchemaGen(  # noqa: N802 -- TFX names a component after its function
    statistics: tfx.dsl.components.InputArtifact[standard_artifacts.ExampleStatistics],
    schema: tfx.dsl.components.OutputArtifact[standard_artifacts.Schema],
    config: tfx.dsl.components.Parameter[str],
    require_label: tfx.dsl.components.Parameter[bool] = True,
):
    """Infers the schema from the train split's statistics and pins labels and sizes.

    Inputs:
        statistics: ExampleStatistics from StatisticsGen (splits train and eval).

    Outputs:
        schema: Schema, `schema.pbtxt`: the inferred schema with `label` int domain
            [0, num_classes - 1]; `image`, `label`, `height` and `width` once per example
            (sizes open: full-resolution images of any size).

    Parameters:
        config: the experiment's `data` section, `byol_tf.config.to_json(config, CONFIG_SECTIONS)`:
            `data.num_classes` (default: the largest train label + 1).
        require_label: every example must carry a label.
    """
    from byol_tf import config as config_lib

    experiment = config_lib.from_json(config)
    train_statistics = stats_artifact_utils.load_statistics(statistics, ingestion.TRAIN_SPLIT).proto()
    curated = infer_curated_schema(
        train_statistics,
        num_classes=experiment.data.num_classes,
        require_label=require_label,
    )
    io_utils.write_pbtxt_file(os.path.join(schema.uri, SCHEMA_FILE), curated)


@tfx.dsl.components.component
def ValidationGate(  # noqa: N802
    anomalies: tfx.dsl.components.InputArtifact[standard_artifacts.ExampleAnomalies],
    schema: tfx.dsl.components.InputArtifact[standard_artifacts.Schema],
    validated_schema: tfx.dsl.components.OutputArtifact[standard_artifacts.Schema],
):
    """Stops the pipeline on any anomaly; otherwise passes the schema on to the Trainer.

    Inputs:
        anomalies: ExampleAnomalies from ExampleValidator.
        schema: the Schema ExampleValidator checked against.

    Outputs:
        validated_schema: a copy of `schema`, produced only when there is no anomaly:
            give it to the Trainer as `schema=` so training depends on validation.

    Raises:
        DataValidationError: listing split, feature and short description of every
            anomaly (e.g. "split 'eval', feature 'label': Out-of-range values
            (Unexpectedly large value: 12.)").
    """
    check_anomalies(read_anomalies(anomalies), where=anomalies.uri)
    source = io_utils.get_only_uri_in_dir(schema.uri)
    io_utils.copy_file(source, os.path.join(validated_schema.uri, SCHEMA_FILE), overwrite=True)


def validation_components(examples, config: str, *, require_label: bool = True) -> Dict[str, object]:
    """The validation chain for `examples`, to add to a pipeline in this order.

    Args:
        examples: an Examples channel, e.g. `example_gen.outputs["examples"]`.
        config: the experiment's canonical JSON (`byol_tf.config.to_json`, its data section):
            the label range [0, data.num_classes - 1] (largest train label + 1 when unset).
        require_label: every example must carry a label.

    Returns:
        {"statistics_gen", "schema_gen", "example_validator", "validation_gate"}: give
        `validation_gate.outputs["validated_schema"]` to the Trainer as `schema=`.
    """
    statistics_gen = tfx.components.StatisticsGen(examples=examples)
    schema_gen = ImageSchemaGen(
        statistics=statistics_gen.outputs["statistics"], config=config, require_label=require_label
    )
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"]
    )
    validation_gate = ValidationGate(
        anomalies=example_validator.outputs["anomalies"], schema=schema_gen.outputs["schema"]
    )
    return {
        "statistics_gen": statistics_gen,
        "schema_gen": schema_gen,
        "example_validator": example_validator,
        "validation_gate": validation_gate,
    }
