"""Tests of components/validation.py: schema curation, anomaly messages, the gate in a pipeline."""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "0"  # tfx.v1 would hand Keras 2 to child processes

import pytest
from fixtures import images as fx
from tfx import v1 as tfx
from tfx.types import standard_artifacts

from byol_tfx.components import validation
from byol_tfx.components.example_gen import ImageExampleGen, import_example_gen

import tensorflow_data_validation as tfdv  # noqa: I001 -- after tfx (docs/DESIGN.md)
from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2

CLASSES = 3


def records(count, *, label=lambda i: i % CLASSES, height=fx.SIDE, width=fx.SIDE):
    return [fx.tf_example(fx.png(i), label(i), height, width) for i in range(count)]


def statistics(path):
    return tfdv.generate_statistics_from_tfrecord(path)


@pytest.fixture(scope="module")
def train_statistics(tmp_path_factory):
    path = fx.write_tfrecord(str(tmp_path_factory.mktemp("train") / "train.gz"), records(12), gzip=True)
    return statistics(path)


def validate(tmp_path, eval_records, schema):
    path = fx.write_tfrecord(str(tmp_path / "eval.gz"), eval_records, gzip=True)
    return validation.describe_anomalies({"eval": tfdv.validate_statistics(statistics(path), schema)})


# ------------------------------------------------------------------ schema and detection


def test_schema_pins_the_label_range_and_one_value_per_feature_not_the_size(train_statistics):
    schema = validation.infer_curated_schema(train_statistics, num_classes=10)
    features = {feature.name: feature for feature in schema.feature}
    assert (features["label"].int_domain.min, features["label"].int_domain.max) == (0, 9)
    for name in ("height", "width"):
        # Full-resolution images of any size: only a positive value, once per example.
        assert features[name].int_domain.min == 1 and not features[name].int_domain.HasField("max")
        assert features[name].presence.min_fraction == 1.0
    assert features["image"].type == schema_pb2.BYTES
    assert features["image"].presence.min_fraction == 1.0 and features["label"].presence.min_fraction == 1.0


def test_num_classes_defaults_to_largest_train_label_plus_one(train_statistics):
    schema = validation.infer_curated_schema(train_statistics, num_classes=None)
    label = next(feature for feature in schema.feature if feature.name == "label")
    assert label.int_domain.max == CLASSES - 1


def test_clean_eval_split_has_no_anomaly_whatever_the_image_sizes(tmp_path, train_statistics):
    schema = validation.infer_curated_schema(train_statistics, num_classes=CLASSES)
    assert validate(tmp_path, records(6) + records(3, height=300, width=400), schema) == []


def test_eval_label_outside_the_schema_range_is_an_anomaly(tmp_path, train_statistics):
    schema = validation.infer_curated_schema(train_statistics, num_classes=CLASSES)
    lines = validate(tmp_path, records(6, label=lambda i: 7 if i == 0 else 1), schema)
    assert lines == ["split 'eval', feature 'label': Out-of-range values (Unexpectedly large value: 7.)"]


def test_an_image_without_size_is_an_anomaly(tmp_path, train_statistics):
    schema = validation.infer_curated_schema(train_statistics, num_classes=CLASSES)
    lines = validate(tmp_path, records(6, height=0), schema)
    assert lines == ["split 'eval', feature 'height': Out-of-range values (Unexpectedly small value: 0.)"]


def test_curation_needs_image_and_label_features():
    schema = schema_pb2.Schema()
    schema.feature.add(name="image", type=schema_pb2.BYTES)
    with pytest.raises(ValueError, match="no 'label' feature"):
        validation.curate_schema(schema, num_classes=10)
    with pytest.raises(ValueError, match="no 'image' bytes feature"):
        validation.curate_schema(schema_pb2.Schema(), num_classes=10)


def test_gate_message_names_split_feature_and_description():
    anomalies = anomalies_pb2.Anomalies()
    info = anomalies.anomaly_info["label"]
    info.short_description = "Out-of-range values"
    reason = info.reason.add(short_description="Out-of-range values", description="Unexpectedly large value: 12.")
    reason.type = anomalies_pb2.AnomalyInfo.INT_TYPE_BIG_INT
    anomalies.dataset_anomaly_info.short_description = "Low num examples"
    validation.check_anomalies({"train": anomalies_pb2.Anomalies()})  # no anomaly: passes
    with pytest.raises(validation.DataValidationError) as error:
        validation.check_anomalies({"eval": anomalies, "train": anomalies_pb2.Anomalies()}, where="/anomalies/7")
    message = str(error.value)
    assert "ExampleValidator found 2 anomalies; the pipeline stops before training" in message
    assert "split 'eval', feature 'label': Out-of-range values (Unexpectedly large value: 12.)" in message
    assert "split 'eval', whole dataset: Low num examples" in message
    assert "/anomalies/7" in message


def test_validation_components_are_wired_in_order():
    config = fx.config_json(source="mnist5k", num_classes=10)
    example_gen = ImageExampleGen(config=config)
    parts = validation.validation_components(example_gen.outputs["examples"], config)
    assert list(parts) == ["statistics_gen", "schema_gen", "example_validator", "validation_gate"]
    assert parts["schema_gen"].exec_properties["config"] == config
    assert parts["example_validator"].inputs["schema"].producer_component_id == parts["schema_gen"].id
    assert parts["validation_gate"].inputs["anomalies"].producer_component_id == parts["example_validator"].id
    assert parts["validation_gate"].outputs["validated_schema"].type is standard_artifacts.Schema


# ------------------------------------------------------------------ pipelines


@tfx.dsl.components.component
def SchemaConsumer(  # noqa: N802 -- stands in for the Trainer: it needs the gate's output
    schema: tfx.dsl.components.InputArtifact[standard_artifacts.Schema],
    model: tfx.dsl.components.OutputArtifact[standard_artifacts.Model],
):
    with open(os.path.join(model.uri, "trained.txt"), "w") as stream:
        stream.write(open(os.path.join(schema.uri, validation.SCHEMA_FILE)).read())


def run_pipeline(root, example_gen, config):
    parts = validation.validation_components(example_gen.outputs["examples"], config)
    consumer = SchemaConsumer(schema=parts["validation_gate"].outputs["validated_schema"])
    pipeline = tfx.dsl.Pipeline(
        pipeline_name="validation_test",
        pipeline_root=os.path.join(root, "pipeline"),
        components=[example_gen, *parts.values(), consumer],
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            os.path.join(root, "metadata.db")
        ),
        # One in-process Beam worker: the machine has two shared cores.
        beam_pipeline_args=["--direct_num_workers=1", "--direct_running_mode=in_memory"],
    )
    tfx.orchestration.LocalDagRunner().run(pipeline)


def executed_components(root):
    """Names of the components that ran to completion, from ML Metadata."""
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    store = metadata_store.MetadataStore(
        tfx.orchestration.metadata.sqlite_metadata_connection_config(os.path.join(root, "metadata.db"))
    )
    done = (metadata_store_pb2.Execution.COMPLETE, metadata_store_pb2.Execution.CACHED)
    types = {t.id: t.name for t in store.get_execution_types()}
    return sorted(types[e.type_id].rsplit(".", 1)[-1] for e in store.get_executions() if e.last_known_state in done)


@pytest.mark.slow
def test_clean_pipeline_passes_the_gate(tmp_path):
    folder = fx.clean_folder(str(tmp_path / "images"), classes=CLASSES, per_class=8)
    config = fx.config_json(source="folder", path=folder, holdout_examples=6)
    run_pipeline(str(tmp_path), ImageExampleGen(config=config), config)
    assert executed_components(str(tmp_path)) == [
        "ExampleValidator",
        "ImageExampleGen",
        "ImageSchemaGen",
        "SchemaConsumer",
        "StatisticsGen",
        "ValidationGate",
    ]


@pytest.mark.slow
def test_injected_anomalies_stop_the_pipeline_at_the_gate(tmp_path):
    # Users' own TFRecords through ImportExampleGen: nothing fixes them on the way in.
    data = tmp_path / "data"
    fx.write_tfrecord(str(data / "train" / "part-0.gz"), records(12), gzip=True)
    bad_eval = records(3, label=lambda i: 7 if i == 0 else 1) + records(3, height=0)
    fx.write_tfrecord(str(data / "eval" / "part-0.gz"), bad_eval, gzip=True)
    example_gen = import_example_gen(str(data), "train/*", "eval/*")

    with pytest.raises(Exception) as error:
        run_pipeline(str(tmp_path), example_gen, fx.config_json(source="mnist5k", num_classes=CLASSES))
    message = str(error.value)
    assert "ExampleValidator found 2 anomalies; the pipeline stops before training" in message
    assert "split 'eval', feature 'label': Out-of-range values (Unexpectedly large value: 7.)" in message
    assert "split 'eval', feature 'height': Out-of-range values (Unexpectedly small value: 0.)" in message
    # Validation ran; the gate and everything that needs its output did not complete.
    assert executed_components(str(tmp_path)) == [
        "ExampleValidator",
        "ImageSchemaGen",
        "ImportExampleGen",
        "StatisticsGen",
    ]
