"""Tests for byol_tf.serving: the warm-up file format and the check that answers its requests."""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from fixtures import images as fx
from fixtures import models
from tensorflow_serving.apis import prediction_log_pb2

from byol_tf import serving


class _RefusingModel(tf.Module):
    """A SavedModel whose serving signature fails every call, as a broken export would."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(self, image_bytes):
        tf.debugging.Assert(tf.size(image_bytes) < 0, ["this model refuses every request"])
        return {"embedding": tf.zeros([tf.size(image_bytes), 4])}


def _requests(*batches, signature="serving_default", name="image_bytes"):
    return [serving.predict_log(signature, {name: batch}) for batch in batches]


def test_predict_logs_round_trip_through_the_warmup_file(tmp_path):
    records = _requests([fx.png(0)], [fx.png(1), fx.jpeg(2)]) + [
        serving.predict_log("embed_images", {"images": np.zeros((2, 8, 8, 3), np.float32)})
    ]
    path = serving.write_warmup_requests(str(tmp_path), records)
    assert path == os.path.join(str(tmp_path), "assets.extra", "tf_serving_warmup_requests")
    read = serving.read_warmup_requests(str(tmp_path))
    assert read == records
    request = read[1].predict_log.request
    assert request.model_spec.signature_name == "serving_default" and list(request.inputs) == ["image_bytes"]
    assert list(tf.make_ndarray(request.inputs["image_bytes"])) == [fx.png(1), fx.jpeg(2)]
    assert tf.make_ndarray(read[2].predict_log.request.inputs["images"]).shape == (2, 8, 8, 3)


def test_a_good_export_answers_every_request(tmp_path):
    export_dir = models.exported_tiny_encoder(tmp_path / "export")
    serving.write_warmup_requests(export_dir, _requests([fx.png(0)], [fx.png(1), fx.jpeg(2), fx.gray_png(3)]))
    report = serving.answer_warmup_requests(export_dir)
    assert report.passed, report.message
    assert [request["batch_size"] for request in report.requests] == [1, 3]
    assert report.requests[1]["outputs"] == {"embedding": [3, 4], "representation": [3, 4]}
    assert report.signatures["embed_images"]["inputs"] == {"images": [None, models.IMAGE, models.IMAGE, 3]}
    assert "2 warm-up requests answered" in report.message
    assert serving.ServingReport.from_dict(report.to_dict()) == report


@pytest.mark.parametrize(
    "records, reason",
    [
        (_requests([fx.png(0)], name="images_b64"), r"gives inputs \['images_b64'\]; the signature takes \['image_bytes'\]"),
        (_requests([fx.png(0)], signature="predict"), "calls signature 'predict', which the model lacks"),
        # base64 text where bytes belong: what a REST body without {"b64": ...} delivers
        (_requests([fx.png(0)], [b"iVBORw0KGgo="]), r"request 2 of 2 .* failed: InvalidArgumentError: .*image_bytes\[0\] is not"),
        ([prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog())], "is a classify_log"),
        ([], "holds no requests"),
    ],
)
def test_a_request_the_export_cannot_answer_fails_the_check_naming_it(tmp_path, records, reason):
    export_dir = models.exported_tiny_encoder(tmp_path / "export")
    serving.write_warmup_requests(export_dir, records)
    report = serving.answer_warmup_requests(export_dir)
    assert not report.passed
    assert report.message == report.message.strip() and "\n" not in report.message
    assert re.search(reason, report.message), report.message


def test_a_signature_that_raises_fails_the_check_with_its_reason(tmp_path):
    module = _RefusingModel()
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.serve})
    serving.write_warmup_requests(str(tmp_path), _requests([fx.png(0)]))
    report = serving.answer_warmup_requests(str(tmp_path))
    assert not report.passed
    assert report.message == (
        "warm-up request 1 of 1 (serving_default, batch of 1) failed: "
        "InvalidArgumentError: assertion failed: [this model refuses every request]"
    )


def test_non_finite_outputs_fail_the_check(tmp_path):
    export_dir = models.exported_tiny_encoder(tmp_path / "export", fill=np.nan)
    serving.write_warmup_requests(export_dir, _requests([fx.png(0)]))
    report = serving.answer_warmup_requests(export_dir)
    assert not report.passed and "non-finite values in 'embedding'" in report.message


def test_a_missing_or_corrupt_warmup_file_is_one_clear_line(tmp_path):
    export_dir = models.exported_tiny_encoder(tmp_path / "export")
    path = serving.warmup_path(export_dir)
    os.remove(path)
    with pytest.raises(ValueError, match="has no assets.extra/tf_serving_warmup_requests"):
        serving.read_warmup_requests(export_dir)
    fx.write(path, b"not a TFRecord file")
    report = serving.answer_warmup_requests(export_dir)
    assert not report.passed
    assert report.message.startswith(f"{path}: not a TFRecord file of PredictionLog protos (corrupted record")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(b"\xff\xff\xff")  # a sound TFRecord, but no PredictionLog in it
    with pytest.raises(ValueError, match="record 0 is not a PredictionLog proto"):
        serving.read_warmup_requests(export_dir)


def test_a_fresh_process_that_does_not_answer_in_time_fails_the_check(tmp_path):
    export_dir = models.exported_tiny_encoder(tmp_path / "export")
    # Starting Python and importing TensorFlow alone takes longer than this.
    report = serving.check_in_fresh_process(export_dir, timeout_seconds=0.5)
    assert not report.passed
    assert report.message == "the serving process did not answer within 0.5 s (killed)"


def test_command_line_exit_status_and_report(tmp_path, capsys):
    export_dir = models.exported_tiny_encoder(tmp_path / "export")
    report_path = str(tmp_path / "report.json")
    assert serving.main([export_dir, "--report", report_path]) == 0
    assert capsys.readouterr().out.startswith("passed: 4 warm-up requests answered")
    with open(report_path) as stream:
        assert serving.ServingReport.from_dict(json.load(stream)).passed
    os.remove(serving.warmup_path(export_dir))
    assert serving.main([export_dir]) == 1
    assert "failed: " in capsys.readouterr().out

