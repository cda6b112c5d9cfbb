"""Tests for the ServingCheck component: InfraBlessing from a fresh process, and the Pusher obeying it."""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "0"  # tfx.v1 would hand Keras 2 to child processes

import json

import pytest
from fixtures import images as fx
from fixtures import models
from tfx.components.pusher import executor as pusher_executor
from tfx.types import standard_artifacts

from byol_tf import config as config_lib
from byol_tf import serving
from byol_tfx.components import serving_check

CONFIG = config_lib.to_json(config_lib.from_dict({"augment": {"image_size": models.IMAGE}}))


def _artifact(artifact_class, root):
    artifact = artifact_class()
    artifact.uri = str(root)
    os.makedirs(artifact.uri, exist_ok=True)
    return artifact


def _model(root):
    """A Model artifact holding an export where the Trainer puts it (`Format-Serving/`)."""
    models.exported_tiny_encoder(os.path.join(str(root), "Format-Serving"))
    return _artifact(standard_artifacts.Model, root)


def _check(model, root):
    blessing = _artifact(standard_artifacts.InfraBlessing, root)
    serving_check.Executor().Do({"model": [model]}, {"blessing": [blessing]}, {"config": CONFIG})
    with open(os.path.join(blessing.uri, serving_check.REPORT_FILE)) as stream:
        return blessing, json.load(stream)


def _push(model, infra_blessing, root):
    """The standard Pusher with a blessed ModelBlessing: only the InfraBlessing can stop it."""
    model_blessing = _artifact(standard_artifacts.ModelBlessing, root / "model_blessing")
    model_blessing.set_int_custom_property("blessed", 1)
    pushed = _artifact(standard_artifacts.PushedModel, root / "pushed")
    destination = root / "serving_model"
    pusher_executor.Executor().Do(
        {"model": [model], "model_blessing": [model_blessing], "infra_blessing": [infra_blessing]},
        {"pushed_model": [pushed]},
        {"push_destination": json.dumps({"filesystem": {"base_directory": str(destination)}})},
    )
    return pushed, destination


def test_a_servable_export_is_blessed_and_pushed_with_its_warmup_requests(tmp_path):
    model = _model(tmp_path / "model")
    blessing, document = _check(model, tmp_path / "blessing")

    assert blessing.get_int_custom_property("blessed") == 1
    message = blessing.get_string_custom_property("blessing_message")
    assert message.startswith("blessed: 4 warm-up requests answered (serving_default; batch sizes 1, 1, 1, 3)")
    assert document["blessed"] and document["message"] == message
    assert document["report"]["requests"][-1]["outputs"] == {"embedding": [3, 4], "representation": [3, 4]}
    assert os.path.exists(os.path.join(blessing.uri, "INFRA_BLESSED"))

    pushed, destination = _push(model, blessing, tmp_path)
    assert pushed.get_int_custom_property("pushed") == 1
    (version,) = os.listdir(destination)
    assert os.path.isfile(serving.warmup_path(str(destination / version)))


def test_an_export_with_a_corrupt_warmup_file_is_not_blessed_and_not_pushed(tmp_path):
    model = _model(tmp_path / "model")
    fx.write(serving.warmup_path(os.path.join(model.uri, "Format-Serving")), b"\x00" * 64)
    blessing, document = _check(model, tmp_path / "blessing")

    assert blessing.get_int_custom_property("blessed") == 0
    message = blessing.get_string_custom_property("blessing_message")
    assert message.startswith("not blessed: ") and "tf_serving_warmup_requests: not a TFRecord file" in message
    assert not document["blessed"] and document["message"] == message
    assert os.path.exists(os.path.join(blessing.uri, "INFRA_NOT_BLESSED"))

    pushed, destination = _push(model, blessing, tmp_path)
    assert pushed.get_int_custom_property("pushed") == 0
    assert not destination.exists()


def _report(image_size=models.IMAGE, signature="serving_default", passed=True):
    return serving.ServingReport(
        passed,
        "2 warm-up requests answered" if passed else "warm-up request 1 of 2 (serving_default) failed: ...",
        ({"signature": signature, "batch_size": 1, "outputs": {}},),
        {"embed_images": {"inputs": {"images": [None, image_size, image_size, 3]}, "outputs": {}}},
    )


@pytest.mark.parametrize(
    "report, blessed, reason",
    [
        (_report(), True, "blessed: 2 warm-up requests answered"),
        (_report(passed=False), False, "not blessed: warm-up request 1 of 2 (serving_default) failed"),
        (_report(image_size=16), False, "augment.image_size 8 means images of shape [None, 8, 8, 3]"),
        (_report(signature="embed_images"), False, "never call serving_default (they call ['embed_images'])"),
    ],
)
def test_decision(report, blessed, reason):
    decision = serving_check.decide(report, models.IMAGE)
    assert decision.blessed is blessed
    assert reason in decision.message
