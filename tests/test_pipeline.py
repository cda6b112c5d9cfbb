"""Tests of the TFX pipeline: blessing rule, LinearEval + Pusher, Trainer input, Vertex compile, end-to-end runs."""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "0"  # tfx.v1 would hand Keras 2 to child processes

import json

import ml_metadata as mlmd
import numpy as np
import pytest
import tensorflow as tf
from fixtures import images as fx
from fixtures.artifacts import CLASSES, write_examples
from tfx.components.pusher import executor as pusher_executor
from tfx.dsl.compiler import constants
from tfx.orchestration import metadata
from tfx.types import standard_artifacts

from byol_tf import config as config_lib
from byol_tf import networks
from byol_tfx.components import examples_io, linear_eval
from byol_tfx.pipeline import kubeflow_v2_runner, local_runner
from byol_tfx.pipeline import pipeline as pipeline_lib

SMOKE = "configs/smoke.yaml"
NAME = "byol-tf-smoke"
INGESTION_AND_VALIDATION = ("ImageExampleGen", "StatisticsGen", "ImageSchemaGen", "ExampleValidator", "ValidationGate")
COMPONENTS = (*INGESTION_AND_VALIDATION, "Trainer", "ServingCheck", "LinearEval", "Pusher")
# Each of these runs after the one before it; ServingCheck runs beside LinearEval.
CHAIN = (*INGESTION_AND_VALIDATION, "Trainer", "LinearEval", "Pusher")


# ------------------------------------------------------------------ the blessing rule


@pytest.mark.parametrize(
    "byol, random_init, margin, baseline, same, blessed, reason",
    [
        (0.60, 0.50, 0.01, None, False, True, "no earlier blessed encoder"),
        (0.505, 0.50, 0.01, None, False, False, "random-init validation top-1 0.5000 + margin 0.0100"),
        (0.51, 0.50, 0.01, None, False, True, "no earlier blessed encoder"),  # exactly the margin
        (0.60, 0.50, 0.01, 0.61, False, False, "latest blessed encoder's 0.6100"),
        (0.61, 0.50, 0.01, 0.61, False, True, "latest blessed encoder's 0.6100"),  # equal is not worse
        (0.60, 0.50, 0.01, 0.61, True, True, "latest blessed encoder itself"),
        (0.40, 0.50, -1.0, None, False, True, "margin -1.0000"),
    ],
)
def test_blessing_rule(byol, random_init, margin, baseline, same, blessed, reason):
    decision = linear_eval.decide_blessing(byol, random_init, margin, baseline, same_model_as_baseline=same)
    assert decision.blessed is blessed
    assert reason in decision.message
    assert decision.message.startswith("blessed" if blessed else "not blessed")


def test_margin_comes_first_even_for_the_latest_blessed_encoder():
    decision = linear_eval.decide_blessing(0.5, 0.6, 0.01, 0.5, same_model_as_baseline=True)
    assert not decision.blessed


# ------------------------------------------------------------------ small artifacts


def smoke_config(**evaluation):
    raw = config_lib.to_dict(config_lib.load(SMOKE))
    raw["evaluation"].update(evaluation)
    return config_lib.from_dict(raw)


def images_of(file_patterns):
    return list(examples_io.image_dataset(file_patterns).as_numpy_iterator())


def test_split_summary_counts_classes_and_fixed_size(tmp_path):
    examples = write_examples(str(tmp_path), train=7, eval_=5)
    summary = examples_io.summarize_split(examples_io.split_file_patterns(examples, "train"))
    assert (summary.num_examples, summary.num_classes, summary.image_shape) == (7, CLASSES, (fx.SIDE, fx.SIDE, 3))
    read = images_of(examples_io.split_file_patterns(examples, "eval"))
    assert [e["image"].shape for e in read] == [(fx.SIDE, fx.SIDE, 3)] * 5 and read[0]["image"].dtype == np.uint8
    np.testing.assert_array_equal([e["label"] for e in read], np.arange(5) % CLASSES)


def test_mixed_sizes_leave_the_shape_open_and_train_through_per_image_crops(tmp_path):
    path = str(tmp_path / "Split-train" / "a.gz")
    shapes = [(fx.SIDE, fx.SIDE), (9, 9), (30, 40), (41, 7)]
    fx.write_tfrecord(path, [fx.tf_example(fx.png(i, (*shape, 3)), i % 3, *shape) for i, shape in enumerate(shapes)], gzip=True)
    patterns = [str(tmp_path / "Split-train" / "*")]
    summary = examples_io.summarize_split(patterns)
    assert summary.image_shape is None and summary.num_examples == 4
    assert [e["image"].shape[:2] for e in images_of(patterns)] == shapes
    from byol_tfx.components import trainer_module

    config = config_lib.load(SMOKE, ["data.batch_size=2"])
    batch = next(iter(trainer_module.training_dataset(config, patterns, summary.image_shape)))
    assert batch["view1"].shape == (2, 28, 28, 3) and batch["view2"].shape == (2, 28, 28, 3)


def test_uncompressed_records_and_the_common_feature_names_are_read_too(tmp_path):
    path = str(tmp_path / "Split-train" / "data.gz")  # named .gz, but plain TFRecords
    records = [
        fx.tf_example(fx.png(i), i, image_key="image/encoded", label_key="image/class/label") for i in range(4)
    ]
    fx.write_tfrecord(path, records, gzip=False)
    read = images_of([str(tmp_path / "Split-train" / "*")])
    assert [e["image"].shape for e in read] == [(fx.SIDE, fx.SIDE, 3)] * 4
    np.testing.assert_array_equal([e["label"] for e in read], np.arange(4))
    assert examples_io.summarize_split([str(tmp_path / "Split-train" / "*")]).num_classes == 4


def test_no_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no TFRecord file matches"):
        examples_io.summarize_split([str(tmp_path / "nothing" / "*")])
    fx.write_tfrecord(str(tmp_path / "odd" / "a.gz"), [fx.tf_example(fx.png(0), 1, image_key="pixels")], gzip=True)
    with pytest.raises(ValueError, match=r"data.image_key: .*no image feature .*its features: label, pixels"):
        examples_io.image_dataset([str(tmp_path / "odd" / "*")])


# ------------------------------------------------------------------ one image, every path

PHOTO_SHAPE = (300, 400, 3)  # a 400 x 300 JPEG


@pytest.fixture(scope="module")
def photo_examples(tmp_path_factory):
    """ImageExampleGen over a folder holding a 400 x 300 JPEG, and the config that reads it."""
    from fixtures.example_gen import run_example_gen

    root = tmp_path_factory.mktemp("photo")
    folder = fx.clean_folder(str(root / "images"), classes=2, per_class=3)
    photo = fx.encode(fx.smooth(*PHOTO_SHAPE[:2]) // 2 + fx.pixels(3, PHOTO_SHAPE) // 2, "JPEG")
    fx.write(os.path.join(folder, "class_1", "photo.jpg"), photo)
    held_out = fx.clean_folder(str(root / "held_out"), classes=2, per_class=2)
    data = {"source": "folder", "path": folder, "eval_split": held_out}
    examples, _ = run_example_gen(root, **data)
    config = config_lib.load(SMOKE, [f"data.{key}={value}" for key, value in data.items()] + ["augment.image_size=32"])
    return examples, config, photo


def the_photo(images):
    """The decoded photo of a stream of {"image", "label"} examples."""
    (photo,) = [e for e in images.as_numpy_iterator() if e["image"].shape == PHOTO_SHAPE]
    return photo


def test_trainer_and_byol_tf_train_draw_views_from_the_same_full_resolution_image(photo_examples):
    from byol_tf import data

    examples, config, photo = photo_examples
    trainer_input = the_photo(examples_io.image_dataset(examples_io.split_file_patterns(examples, "train")))
    library_input = the_photo(data.load_split(config.data, "train"))
    np.testing.assert_array_equal(trainer_input["image"], library_input["image"])  # decoded, full size
    np.testing.assert_array_equal(trainer_input["image"], tf.io.decode_jpeg(photo).numpy())
    assert trainer_input["label"] == library_input["label"] == 1

    def views(example):
        single = tf.data.Dataset.from_tensors({"image": example["image"], "label": example["label"]})
        dataset = data.pretraining_dataset(single, config.augment, 1, seed=5, shuffle_buffer=1, repeat=False)
        return next(iter(dataset))

    # The random resized crops both paths take (data.pretraining_dataset) see the same pixels.
    ours, theirs = views(trainer_input), views(library_input)
    for view in ("view1", "view2"):
        np.testing.assert_array_equal(ours[view].numpy(), theirs[view].numpy())
        assert ours[view].shape == (1, 32, 32, 3)


def test_linear_eval_byol_tf_eval_and_serving_use_the_same_centre_crop(photo_examples, tmp_path):
    from byol_tf import data, export

    examples, config, photo = photo_examples
    encoder = networks.build_encoder(config.network, config.augment.image_size)

    def features(images):
        # What evaluation.evaluate does to each image (transfer protocol): data.evaluation_dataset.
        single = tf.data.Dataset.from_tensors(the_photo(images))
        batch = next(iter(data.evaluation_dataset(single, config.augment.image_size, 1)))
        return encoder(batch["image"], training=False).numpy()

    linear_eval = features(examples_io.image_dataset(examples_io.split_file_patterns(examples, "train")))
    byol_tf_eval = features(data.load_split(config.data, "train"))
    exported = tf.saved_model.load(export.export_encoder(encoder, str(tmp_path / "export"), config.augment.image_size))
    serving = exported.signatures["serving_default"](image_bytes=tf.constant([photo]))["representation"].numpy()
    np.testing.assert_allclose(linear_eval, byol_tf_eval, atol=1e-5)
    np.testing.assert_allclose(serving, byol_tf_eval, atol=1e-5)


def model_artifact(root, config, artifact_id=11):
    """A Model artifact holding a random-init encoder where the Trainer puts it."""
    serving = os.path.join(root, "Format-Serving")
    os.makedirs(serving)
    networks.build_encoder(config.network, config.augment.image_size).save(os.path.join(serving, "encoder.keras"))
    model = standard_artifacts.Model()
    model.uri = root
    model.id = artifact_id
    return model


def output(artifact_class, root):
    artifact = artifact_class()
    artifact.uri = root
    os.makedirs(root)
    return artifact


def test_linear_eval_does_not_bless_a_regression_and_pusher_pushes_nothing(tmp_path):
    config = smoke_config(l2_sweep=[0.0], linear_epochs=2)
    examples = write_examples(str(tmp_path / "examples"))
    model = model_artifact(str(tmp_path / "model"), config)
    baseline_model = standard_artifacts.Model()
    baseline_model.uri, baseline_model.id = str(tmp_path / "old_model"), 5
    baseline_blessing = output(standard_artifacts.ModelBlessing, str(tmp_path / "old_blessing"))
    baseline_blessing.set_int_custom_property("blessed", 1)
    baseline_blessing.set_float_custom_property(linear_eval.BYOL_VAL_TOP1_KEY, 1.0)  # nothing can beat it
    metrics = output(linear_eval.LinearEvalMetrics, str(tmp_path / "metrics"))
    blessing = output(standard_artifacts.ModelBlessing, str(tmp_path / "blessing"))

    linear_eval.Executor().Do(
        {
            "examples": [examples],
            "model": [model],
            "baseline_model": [baseline_model],
            "baseline_blessing": [baseline_blessing],
        },
        {"evaluation": [metrics], "blessing": [blessing]},
        # A margin of -1 passes the random-init test: only the regression can refuse it.
        {"config": config_lib.to_json(config), "blessing_margin": -1.0},
    )

    with open(os.path.join(metrics.uri, linear_eval.METRICS_FILE)) as stream:
        document = json.load(stream)
    assert list(document["rows"]) == ["byol", "random_init", "raw_pixels"]
    assert document["blessing"]["baseline_val_top1"] == 1.0 and not document["blessing"]["blessed"]
    assert blessing.get_int_custom_property("blessed") == 0
    assert blessing.get_int_custom_property("current_model_id") == 11
    assert blessing.get_int_custom_property("baseline_model_id") == 5
    assert "latest blessed encoder's 1.0000" in blessing.get_string_custom_property("blessing_message")
    assert os.path.exists(os.path.join(blessing.uri, linear_eval.NOT_BLESSED_FILE))
    assert metrics.get_float_custom_property("byol_top1") == document["rows"]["byol"]["top1"]
    assert metrics.get_float_custom_property("byol_val_top1") == document["rows"]["byol"]["val_top1"]

    destination = tmp_path / "serving_model"
    pushed = output(standard_artifacts.PushedModel, str(tmp_path / "pushed"))
    pusher_executor.Executor().Do(
        {"model": [model], "model_blessing": [blessing]},
        {"pushed_model": [pushed]},
        {"push_destination": json.dumps({"filesystem": {"base_directory": str(destination)}})},
    )
    assert pushed.get_int_custom_property("pushed") == 0
    assert not destination.exists()


def test_a_foreign_blessing_without_validation_top1_is_refused(tmp_path):
    blessing = output(standard_artifacts.ModelBlessing, str(tmp_path / "blessing"))
    with pytest.raises(ValueError, match="records no byol validation top-1"):
        linear_eval.baseline_val_top1_of(blessing)


def fake_linear_report(byol_val_top1, byol_top1):
    """What `evaluation.evaluate` returns, with random init at 0.5 on validation and test."""
    from byol_tf import evaluation

    rows = {
        name: {
            "top1": byol_top1 if name == "byol" else 0.5,
            "top5": 1.0,
            "val_top1": byol_val_top1 if name == "byol" else 0.5,
            "l2": 0.0,
            "learning_rate": 0.1,
            "feature_dim": 8,
        }
        for name in ("byol", "random_init")
    }
    return evaluation.EvaluationReport(rows=rows, num_classes=3, num_train=24, num_test=12, protocol="transfer")


def run_linear_eval(tmp_path, config):
    """LinearEval's executor on tiny examples and a random-init model; returns (metrics, blessing)."""
    metrics = output(linear_eval.LinearEvalMetrics, str(tmp_path / "metrics"))
    blessing = output(standard_artifacts.ModelBlessing, str(tmp_path / "blessing"))
    linear_eval.Executor().Do(
        {"examples": [write_examples(str(tmp_path / "examples"))], "model": [model_artifact(str(tmp_path / "model"), config)]},
        {"evaluation": [metrics], "blessing": [blessing]},
        {"config": config_lib.to_json(config), "blessing_margin": 0.01},
    )
    return metrics, blessing


@pytest.mark.parametrize("val_top1, test_top1, blessed", [(0.9, 0.1, True), (0.1, 0.9, False)])
def test_validation_decides_the_blessing_never_test(tmp_path, monkeypatch, val_top1, test_top1, blessed):
    from byol_tf import evaluation

    monkeypatch.setattr(evaluation, "evaluate", lambda encoder, config, **kwargs: fake_linear_report(val_top1, test_top1))
    _, blessing = run_linear_eval(tmp_path, smoke_config())
    assert blessing.get_int_custom_property("blessed") == int(blessed)
    assert blessing.get_float_custom_property(linear_eval.BYOL_VAL_TOP1_KEY) == val_top1


@pytest.mark.parametrize("in_pipeline", [False, True])
def test_fine_tuning_rows_join_the_metrics_only_when_asked_and_never_bless(tmp_path, monkeypatch, in_pipeline):
    from byol_tf import evaluation, finetune

    seen = {}

    def fake_evaluate(encoder, config, **kwargs):
        seen["linear"] = kwargs["datasets"]
        return fake_linear_report(0.9, 0.5)

    def fake_finetune(encoder, config, **kwargs):
        seen["finetune"] = kwargs["datasets"]
        row = {"top1": 0.2, "top5": 1.0, "val_top1": 0.1, "learning_rate": 0.1, "sweep": {0.1: 0.1}, "epochs": 1,
               "batch_size": 4, "label_fraction": 0.5, "num_labelled": 4, "num_validation": 3, "num_test": 12}
        return finetune.FinetuneReport(
            rows={0.5: {"byol": row, "random_init": dict(row, top1=0.6)}},
            num_classes=3, num_train=24, num_validation=3, num_test=12,
        )

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    monkeypatch.setattr(finetune, "evaluate", fake_finetune)
    metrics, blessing = run_linear_eval(tmp_path, smoke_config(finetune_in_pipeline=in_pipeline))
    with open(os.path.join(metrics.uri, linear_eval.METRICS_FILE)) as stream:
        document = json.load(stream)
    # The blessing is the linear protocol's, whatever fine-tuning says (random init wins there).
    assert blessing.get_int_custom_property("blessed") == 1
    assert ("finetune" in seen) == ("finetune" in document) == metrics.has_custom_property(
        "finetune_0.5_byol_top1") == in_pipeline
    if in_pipeline:
        assert seen["finetune"] is seen["linear"]  # the same streamed splits
        assert document["finetune"]["rows"]["0.5"]["random_init"]["top1"] == 0.6
        assert metrics.get_float_custom_property("finetune_0.5_random_init_top1") == 0.6
        assert metrics.get_float_custom_property("finetune_0.5_byol_val_top1") == 0.1
        summary = local_runner.RunSummary(
            run_id="r1", states={}, linear_eval=document, blessed=True, blessing_message="blessed",
            pushed_to=None, latest_pushed=None,
        )
        lines = summary.format().splitlines()
        assert lines[0].startswith("linear evaluation") and any(line.startswith("fine-tuning") for line in lines)


# ------------------------------------------------------------------ runner


def test_run_summary_says_where_the_blessed_encoder_is_when_nothing_was_pushed():
    summary = local_runner.RunSummary(
        run_id="r2",
        states={},
        linear_eval={"table": "TABLE"},
        blessed=False,
        blessing_message="not blessed: byol top-1 0.5 < latest blessed encoder's 0.6",
        pushed_to=None,
        latest_pushed="/out/serving_model/17",
    )
    assert summary.format().splitlines() == [
        "TABLE",
        "LinearEval: not blessed: byol top-1 0.5 < latest blessed encoder's 0.6",
        "nothing pushed in this run",
        "latest blessed encoder (an earlier run): /out/serving_model/17",
    ]


def test_run_paths_and_pipeline_name():
    assert pipeline_lib.default_pipeline_name("configs/mnist5k.yaml") == "byol-tf-mnist5k"
    assert pipeline_lib.default_pipeline_name("my config.v2.yml") == "byol-tf-my-config-v2"
    paths = local_runner.run_paths("out", "byol-tf-x")
    assert paths.metadata_path == os.path.abspath("out/byol-tf-x/metadata.sqlite")
    assert paths.serving_model_dir == os.path.abspath("out/byol-tf-x/serving_model")


# ------------------------------------------------------------------ pipeline definition


def test_create_pipeline_writes_nothing_and_validates_its_arguments(tmp_path):
    config = config_lib.load(SMOKE)
    pipeline = pipeline_lib.create_pipeline(
        pipeline_name="p",
        pipeline_root=str(tmp_path / "root"),
        config=config,
        push_destination=str(tmp_path / "push"),
    )
    components = {component.id: component for component in pipeline.components}
    ids = list(components)
    # TFX sorts the nodes topologically: ServingCheck and LinearEval both come before the Pusher.
    assert ids[0] == "ImageExampleGen" and ids[-1] == "Pusher"
    assert set(ids) == {*COMPONENTS, "latest_blessed_model_resolver"}
    assert pipeline.enable_cache
    assert list(tmp_path.iterdir()) == []
    # One serialised config reaches every custom component, and the Trainer, unchanged;
    # the data steps get only the sections they read, which keeps them cached when
    # training settings change.
    config_json = config_lib.to_json(config)
    for node in ("ServingCheck", "LinearEval"):
        assert components[node].exec_properties["config"] == config_json, node
    for node in ("ImageExampleGen", "ImageSchemaGen"):
        data_json = components[node].exec_properties["config"]
        assert set(json.loads(data_json)) == {"data"}, node
        assert config_lib.from_json(data_json).data == config.data, node
    # The ingestion gate defaults to the config's data.max_bad_fraction.
    assert components["ImageExampleGen"].exec_properties["max_bad_fraction"] == config.data.max_bad_fraction
    retrained = pipeline_lib.create_pipeline(
        "p", str(tmp_path / "root"),
        config_lib.load(SMOKE, ["train.seed=7", "optimizer.base_learning_rate=0.1", "augment.image_size=32"]),
        push_destination="x",
    )
    for old, new in zip(pipeline.components, retrained.components):
        if old.id in ("ImageExampleGen", "ImageSchemaGen"):
            assert old.exec_properties == new.exec_properties, old.id
    # The Pusher needs both blessings: LinearEval's and the serving check's.
    pusher_inputs = components["Pusher"].inputs
    assert pusher_inputs["model_blessing"].producer_component_id == "LinearEval"
    assert pusher_inputs["infra_blessing"].producer_component_id == "ServingCheck"
    assert json.loads(components["Trainer"].exec_properties["custom_config"]) == {"config": config_json}
    fingerprinted = pipeline_lib.create_pipeline(
        "p", str(tmp_path / "root"), config, push_destination="x", source_fingerprint="abc123"
    )
    assert fingerprinted.components[0].exec_properties["source_fingerprint"] == "abc123"
    with pytest.raises(ValueError, match="push_destination"):
        pipeline_lib.create_pipeline("p", str(tmp_path), config, push_destination=None)
    assert "EmbedImages" not in ids


def test_embed_split_adds_embed_images_after_the_pusher(tmp_path):
    config = config_lib.load(SMOKE)
    pipeline = pipeline_lib.create_pipeline("p", str(tmp_path), config, push_destination="x", embed_split="train")
    embed = pipeline.components[-1]
    assert embed.id == "EmbedImages" and pipeline.components[-2].id == "Pusher"
    assert embed.exec_properties["config"] == config_lib.to_json(config)
    assert embed.exec_properties["split"] == "train"
    assert embed.inputs["pushed_model"].producer_component_id == "Pusher"
    with pytest.raises(ValueError, match="embed_split: 'test' is not one of"):
        pipeline_lib.create_pipeline("p", str(tmp_path), config, push_destination="x", embed_split="test")


def test_compiled_vertex_pipeline_has_the_components_in_order_and_runtime_parameters(tmp_path):
    image = "europe-docker.pkg.dev/my-project/byol/byol-tf:test"
    path = kubeflow_v2_runner.compile_pipeline(
        config_lib.load(SMOKE, ["train.epochs=2"]),
        str(tmp_path / "out" / "byol.json"),
        "byol-tf-smoke",
        image=image,
        pipeline_root="gs://bucket/root",
        blessing_margin=0.02,
    )
    with open(path) as stream:
        job = json.load(stream)
    spec = job["pipelineSpec"]
    tasks = spec["root"]["dag"]["tasks"]
    resolvers = {
        "latest_blessed_model_resolver-model-blessing-resolver",
        "latest_blessed_model_resolver-model-resolver",
    }
    assert set(tasks) == set(COMPONENTS) | resolvers

    def upstream(name, seen=None):
        seen = set() if seen is None else seen
        for dependency in tasks[name].get("dependentTasks", []):
            if dependency not in seen:
                seen.add(dependency)
                upstream(dependency, seen)
        return seen

    for before, after in zip(CHAIN, CHAIN[1:]):
        assert before in upstream(after), f"{after} does not run after {before}"
    assert "latest_blessed_model_resolver-model-resolver" in upstream("LinearEval")
    assert {"Trainer", "LinearEval", "ServingCheck"} <= set(tasks["Pusher"]["dependentTasks"])
    assert tasks["ServingCheck"]["dependentTasks"] == ["Trainer"]
    assert tasks["Pusher"]["inputs"]["artifacts"]["infra_blessing"]["taskOutputArtifact"] == {
        "outputArtifactKey": "blessing",
        "producerTask": "ServingCheck",
    }

    # Runtime parameters: declared at the root, defaults in the job, wired into the tasks.
    assert spec["root"]["inputDefinitions"]["parameters"] == {
        "blessing_margin": {"type": "DOUBLE"},
        "max_bad_fraction": {"type": "DOUBLE"},
    }
    assert job["runtimeConfig"]["parameters"] == {
        "blessing_margin": {"doubleValue": 0.02},
        "max_bad_fraction": {"doubleValue": 0.01},
    }
    assert job["runtimeConfig"]["gcsOutputDirectory"] == "gs://bucket/root"
    parameters = tasks["LinearEval"]["inputs"]["parameters"]
    assert parameters["blessing_margin"] == {"componentInputParameter": "blessing_margin"}
    assert tasks["ImageExampleGen"]["inputs"]["parameters"]["max_bad_fraction"] == {
        "componentInputParameter": "max_bad_fraction"
    }

    # The Trainer gets the whole config, overrides applied, and our run_fn.
    trainer = tasks["Trainer"]["inputs"]["parameters"]
    custom_config = json.loads(trainer["custom_config"]["runtimeValue"]["constantValue"]["stringValue"])
    assert config_lib.from_json(custom_config["config"]).train.epochs == 2
    assert trainer["run_fn"]["runtimeValue"]["constantValue"]["stringValue"] == pipeline_lib.TRAINER_RUN_FN
    push = json.loads(tasks["Pusher"]["inputs"]["parameters"]["push_destination"]["runtimeValue"]["constantValue"]["stringValue"])
    assert push["filesystem"]["base_directory"] == "gs://bucket/root/serving_model"

    executors = spec["deploymentSpec"]["executors"]
    containers = [executor["container"] for executor in executors.values() if "container" in executor]
    assert len(containers) == len(COMPONENTS)
    assert {container["image"] for container in containers} == {image}
    linear_eval_args = executors["LinearEval_executor"]["container"]["args"]
    assert linear_eval_args[linear_eval_args.index("--executor_class_path") + 1] == "byol_tfx.components.linear_eval.Executor"
    output_types = spec["components"]["LinearEval"]["outputDefinitions"]["artifacts"]
    assert "byol_tf.LinearEvalMetrics" in output_types["evaluation"]["artifactType"]["instanceSchema"]
    serving_check_args = executors["ServingCheck_executor"]["container"]["args"]
    assert serving_check_args[serving_check_args.index("--executor_class_path") + 1] == (
        "byol_tfx.components.serving_check.Executor"
    )
    output_types = spec["components"]["ServingCheck"]["outputDefinitions"]["artifacts"]
    assert "tfx.InfraBlessing" in output_types["blessing"]["artifactType"]["instanceSchema"]


def test_compiled_vertex_pipeline_has_embed_images_when_enabled(tmp_path):
    # Without --embed-split the compiled tasks are exactly COMPONENTS and the resolvers
    # (the test above); with it, EmbedImages runs after the Pusher, on Beam.
    path = kubeflow_v2_runner.compile_pipeline(
        config_lib.load(SMOKE),
        str(tmp_path / "byol.json"),
        "byol-tf-smoke",
        beam_pipeline_args=["--runner=DataflowRunner"],
        embed_split="eval",
    )
    with open(path) as stream:
        spec = json.load(stream)["pipelineSpec"]
    tasks = spec["root"]["dag"]["tasks"]
    assert "Pusher" in tasks["EmbedImages"]["dependentTasks"]
    parameters = tasks["EmbedImages"]["inputs"]["parameters"]
    assert parameters["split"]["runtimeValue"]["constantValue"]["stringValue"] == "eval"
    args = spec["deploymentSpec"]["executors"]["EmbedImages_executor"]["container"]["args"]
    assert args[args.index("--executor_class_path") + 1] == "byol_tfx.components.embed_images.Executor"
    assert "--runner=DataflowRunner" in args
    output_types = spec["components"]["EmbedImages"]["outputDefinitions"]["artifacts"]
    assert "byol_tf.Embeddings" in output_types["embeddings"]["artifactType"]["instanceSchema"]
VERTEX_TRAINING = [
    "vertex_training.enabled=true", "vertex_training.project=my-project", "vertex_training.region=europe-west4",
    "vertex_training.machine_type=n1-standard-16", "vertex_training.accelerator_type=NVIDIA_TESLA_T4",
    "vertex_training.accelerator_count=2", "vertex_training.replica_count=3", "distribute.strategy=multi_worker",
]


def test_compiled_vertex_trainer_is_a_custom_job_with_the_configs_worker_pools(tmp_path):
    image = "europe-docker.pkg.dev/my-project/byol/byol-tf:test"
    config = config_lib.load(SMOKE, VERTEX_TRAINING)
    path = kubeflow_v2_runner.compile_pipeline(
        config, str(tmp_path / "byol.json"), "byol-tf-smoke", image=image, pipeline_root="gs://bucket/root"
    )
    with open(path) as stream:
        spec = json.load(stream)["pipelineSpec"]
    args = spec["deploymentSpec"]["executors"]["Trainer_executor"]["container"]["args"]
    assert args[args.index("--executor_class_path") + 1] == (
        "tfx.extensions.google_cloud_ai_platform.trainer.executor.GenericExecutor"
    )
    parameters = spec["root"]["dag"]["tasks"]["Trainer"]["inputs"]["parameters"]
    custom = json.loads(parameters["custom_config"]["runtimeValue"]["constantValue"]["stringValue"])
    assert config_lib.from_json(custom["config"]) == config  # run_fn still gets the whole experiment
    assert custom["ai_platform_enable_vertex"] is True and custom["ai_platform_vertex_region"] == "europe-west4"
    job = custom["ai_platform_training_args"]
    assert job["project"] == "my-project"
    machine = {"machine_type": "n1-standard-16", "accelerator_type": "NVIDIA_TESLA_T4", "accelerator_count": 2}
    # One chief, two workers: Vertex names them chief / worker in TF_CONFIG (byol_tf.distribute).
    assert job["job_spec"]["worker_pool_specs"] == [
        {"machine_spec": machine, "replica_count": 1, "container_spec": {"image_uri": image}},
        {"machine_spec": machine, "replica_count": 2, "container_spec": {"image_uri": image}},
    ]
    assert parameters["run_fn"]["runtimeValue"]["constantValue"]["stringValue"] == pipeline_lib.TRAINER_RUN_FN

    # Local runs are unaffected: the same config trains in the Trainer's own step.
    local = pipeline_lib.create_pipeline("p", str(tmp_path / "root"), config, push_destination="x")
    trainer = next(component for component in local.components if component.id == "Trainer")
    assert type(trainer).__module__ == "tfx.components.trainer.component"
    assert "ai_platform_training_args" not in json.loads(trainer.exec_properties["custom_config"])


def test_vertex_training_settings_are_validated():
    with pytest.raises(config_lib.ConfigError, match="vertex_training.project: is required"):
        config_lib.load(SMOKE, ["vertex_training.enabled=true", "vertex_training.region=us-central1"])
    with pytest.raises(config_lib.ConfigError, match="vertex_training.replica_count: 3 replicas .*multi_worker"):
        config_lib.load(SMOKE, VERTEX_TRAINING[:-1])
    with pytest.raises(config_lib.ConfigError, match="vertex_training.accelerator_count"):
        config_lib.load(SMOKE, ["vertex_training.accelerator_type=NVIDIA_TESLA_T4"])
    with pytest.raises(config_lib.ConfigError, match="vertex_training.accelerator_type: 'nvidia-t4'"):
        config_lib.load(SMOKE, ["vertex_training.accelerator_type=nvidia-t4", "vertex_training.accelerator_count=1"])


# ------------------------------------------------------------------ end to end


def executions_by_node(metadata_path, pipeline_name):
    """node id -> [(run context name, state name)] of every execution in the store."""
    store = mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(metadata_path))
    type_names = {t.id: t.name for t in store.get_context_types()}
    result = {}
    for execution in store.get_executions():
        contexts = store.get_contexts_by_execution(execution.id)
        by_type = {type_names[c.type_id]: c.name for c in contexts}
        if by_type.get(constants.PIPELINE_CONTEXT_TYPE_NAME) != pipeline_name:
            continue
        node = by_type[constants.NODE_CONTEXT_TYPE_NAME].split(".", 1)[1]
        state = mlmd.proto.Execution.State.Name(execution.last_known_state)
        result.setdefault(node, []).append((by_type[constants.PIPELINE_RUN_CONTEXT_TYPE_NAME], state))
    return result


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("pipeline_output"))
    # Smoke training is too short to beat random init: a margin of -1 makes it blessed, so
    # the push path is exercised; the rule itself is tested above.
    summary = local_runner.run(
        config_lib.load(SMOKE), NAME, output_dir=output_dir, blessing_margin=-1.0, embed_split="eval"
    )
    return output_dir, summary


@pytest.mark.slow
def test_whole_pipeline_runs_every_component_once_and_pushes_a_working_encoder(first_run, capsys):
    output_dir, summary = first_run
    name = NAME
    paths = local_runner.run_paths(output_dir, name)

    executions = executions_by_node(paths.metadata_path, name)
    for component in (*COMPONENTS, "EmbedImages"):
        assert [state for _, state in executions[component]] == ["COMPLETE"], component

    document = summary.linear_eval
    assert list(document["rows"]) == ["byol", "random_init", "raw_pixels"]
    for row in document["rows"].values():
        assert 0.0 <= row["top1"] <= row["top5"] <= 1.0
    assert document["num_test"] == config_lib.load(SMOKE).data.holdout_examples
    assert summary.blessed

    assert summary.pushed_to and os.path.dirname(summary.pushed_to) == paths.serving_model_dir
    pushed = os.listdir(summary.pushed_to)
    assert {"saved_model.pb", "assets.extra", "encoder.keras", "config.yaml", "metrics.json"} <= set(pushed)
    assert summary.serving_check.startswith("blessed: 4 warm-up requests answered")
    loaded = tf.saved_model.load(summary.pushed_to)
    outputs = loaded.signatures["serving_default"](image_bytes=tf.constant([fx.png(1), fx.png(2, (40, 30, 3))]))
    embedding = outputs["embedding"].numpy()
    assert embedding.shape == (2, document["rows"]["byol"]["feature_dim"])
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-4)

    text = summary.format()
    assert f"blessed encoder pushed to {summary.pushed_to}" in text and "random_init" in text
    assert f"ServingCheck: {summary.serving_check}" in text

    # EmbedImages embedded the held-out split with the pushed encoder.
    from byol_tf import embed

    embedded = embed.read(summary.embeddings)
    assert f"embeddings written to {summary.embeddings}" in text
    assert len(embedded.keys) == document["num_test"] == embedded.manifest["count"]
    assert embedded.embeddings.shape[1] == document["rows"]["byol"]["feature_dim"]


@pytest.mark.slow
def test_rerun_reuses_cached_ingestion_and_validation_and_blesses_only_if_not_worse(first_run):
    output_dir, first = first_run
    name = NAME
    metadata_path = local_runner.run_paths(output_dir, name).metadata_path

    # Same config: everything up to the Trainer is reused; the encoder IS the latest
    # blessed one, so it stays blessed.
    second = local_runner.run(
        config_lib.load(SMOKE), NAME, output_dir=output_dir, blessing_margin=-1.0, embed_split="eval"
    )
    for component in (*INGESTION_AND_VALIDATION, "Trainer", "ServingCheck"):
        assert second.states[component] == ["CACHED"], component
    assert second.states["LinearEval"] == ["COMPLETE"]
    assert second.blessed and "latest blessed encoder itself" in second.blessing_message

    # Another training seed: data steps still cached, a new encoder is trained and blessed
    # only if its validation top-1 is not below the blessed one's.
    third = local_runner.run(
        config_lib.load(SMOKE, ["train.seed=1"]), NAME, output_dir=output_dir, blessing_margin=-1.0, embed_split="eval"
    )
    for component in INGESTION_AND_VALIDATION:
        assert third.states[component] == ["CACHED"], component
    assert third.states["Trainer"] == ["COMPLETE"]
    new_top1 = third.linear_eval["rows"]["byol"]["val_top1"]
    blessed_top1 = second.linear_eval["rows"]["byol"]["val_top1"]
    assert third.linear_eval["blessing"]["baseline_val_top1"] == pytest.approx(blessed_top1)
    assert third.blessed == (new_top1 >= blessed_top1)
    assert (third.pushed_to is not None) == third.blessed

    executions = executions_by_node(metadata_path, name)
    assert len({run for run, _ in executions["ImageExampleGen"]}) == 3
    assert [state for _, state in executions["Trainer"]].count("COMPLETE") == 2
    assert first.run_id != second.run_id != third.run_id


@pytest.mark.slow
def test_tfrecords_with_the_common_keys_run_through_the_pipeline_with_no_setting(tmp_path):
    records = fx.coloured_records(str(tmp_path / "records"))
    config = config_lib.load(
        SMOKE,
        ["data.source=tfrecord", f"data.path={records}", "data.holdout_examples=12",
         "data.batch_size=12", "evaluation.linear_epochs=2"],
    )
    summary = local_runner.run(config, "byol-tf-records", output_dir=str(tmp_path / "out"), blessing_margin=-1.0)
    for component in COMPONENTS:
        assert summary.states[component] == ["COMPLETE"], component
    assert (summary.linear_eval["num_train"], summary.linear_eval["num_test"]) == (36, 12)
    assert summary.linear_eval["num_classes"] == CLASSES and summary.pushed_to


# ------------------------------------------------------------------ command line


def test_cli_compile_writes_the_vertex_file(tmp_path, capsys):
    from byol_tfx.pipeline import cli

    out = tmp_path / "vertex" / "byol.json"
    assert cli.main(["compile", "--target", "vertex", "--config", SMOKE, "--out", str(out),
                     "--image", "gcr.io/p/byol-tf:1", "--beam-arg=--runner=DataflowRunner"]) == 0
    assert f"Vertex AI pipeline written to {out}" in capsys.readouterr().out
    executors = json.loads(out.read_text())["pipelineSpec"]["deploymentSpec"]["executors"]
    args = executors["StatisticsGen_executor"]["container"]["args"]
    assert "--runner=DataflowRunner" in args


def test_cli_pipeline_run_stops_at_ingestion_in_one_line_above_max_bad_fraction(tmp_path, capsys):
    from byol_tfx.pipeline import cli

    folder = fx.add_bad_files(fx.clean_folder(str(tmp_path / "images")))
    code = cli.main(["run", "--config", SMOKE, "--output-dir", str(tmp_path / "out"), "--set", "data.source=folder",
                     "--set", f"data.path={folder}", "--set", "data.holdout_examples=6"])
    assert code == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("byol-tf-pipeline run: error:"))
    # The same counts as byol-tf train (tests/test_checks.py), and where the report is.
    assert "ingestion: dropped 7 of 39 records (17.95%), more than max_bad_fraction=1.00%" in line
    assert "empty_file=1, not_an_image=3, corrupt_image=2, missing_label=1" in line and "ingestion_report.json" in line
    assert "Traceback" not in err


def test_cli_pipeline_run_rejects_a_bad_config_in_one_line(tmp_path, capsys):
    from byol_tfx.pipeline import cli

    code = cli.main(["run", "--config", SMOKE, "--set", "train.epochs=0", "--output-dir", str(tmp_path)])
    assert code == 2
    assert "byol-tf-pipeline run: error: train.epochs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_trainer_projector_reads_the_held_out_eval_split_of_the_examples(tmp_path):
    from byol_tf import augment, monitoring
    from byol_tfx.components import trainer_module

    examples = write_examples(str(tmp_path / "examples"), train=12, eval_=9)
    config = smoke_config(projector_images=6)
    holdout = trainer_module.examples_data_config(
        config, examples_io.split_file_patterns(examples, "train"), examples_io.split_file_patterns(examples, "eval")
    )
    logger = monitoring.ProjectorLogger.from_config(config, str(tmp_path / "logs"), holdout)
    # Two of each class, all from the eval split (its images are seeds 1000+).
    assert np.bincount(logger.labels, minlength=CLASSES).tolist() == [2, 2, 2]
    eval_records = examples_io.image_dataset(examples_io.split_file_patterns(examples, "eval")).take(6)
    size = config.augment.image_size
    expected = np.concatenate(
        [np.round(augment.center_crop_resize(record["image"][None], size).numpy() * 255) for record in eval_records]
    )
    assert logger.images.shape == (6, size, size, 3)
    np.testing.assert_array_equal(logger.images, expected)


def test_trainer_backup_dir_is_stable_across_executions_of_the_same_training():
    import types

    from byol_tfx.components import trainer_module

    def fn_args(execution, config, files):
        return types.SimpleNamespace(
            model_run_dir=f"/root/Trainer/model_run/{execution}", custom_config=config, train_files=files
        )

    first = trainer_module.backup_dir(fn_args(7, {"train": {"epochs": 2}}, ["b", "a"]))
    retry = trainer_module.backup_dir(fn_args(9, {"train": {"epochs": 2}}, ["a", "b"]))
    assert first == retry and first.startswith("/root/Trainer/model_run/backup/")
    assert trainer_module.backup_dir(fn_args(9, {"train": {"epochs": 3}}, ["a", "b"])) != first
    assert trainer_module.backup_dir(fn_args(9, {"train": {"epochs": 2}}, ["a", "c"])) != first
