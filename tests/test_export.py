"""Tests for byol_tf.export: SavedModel round trip in a fresh process, bad bytes, atomic writes,
and what servers and loaders see: warm-up requests, TF Serving REST bodies, Keras TFSMLayer."""

import base64
import io
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import prediction_log_pb2

from byol_tf import augment, cli, export, networks
from byol_tf import config as config_lib
from byol_tf.config import Config, NetworkConfig

SIZE = 16

# Runs in a fresh interpreter: nothing of the exporting process (Python objects, traced
# functions, Keras layers) can leak into what is loaded.
_LOAD_AND_SERVE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    for export_dir, inputs_path, outputs_path in json.loads(sys.argv[1]):
        inputs = np.load(inputs_path, allow_pickle=False)
        model = tf.saved_model.load(export_dir)
        serve = model.signatures["serving_default"]
        embed = model.signatures["embed_images"]
        results = {}
        for name, value in embed(images=tf.constant(inputs["images"])).items():
            results["embed_" + name] = value.numpy()
        # TF-Hub style: the loaded object itself maps images to the representation.
        results["call_representation"] = model(tf.constant(inputs["images"])).numpy()
        encoded = [bytes(item) for item in inputs["encoded"]]
        for name, value in serve(image_bytes=tf.constant(encoded)).items():
            results["serve_" + name] = value.numpy()
        try:
            serve(image_bytes=tf.constant([encoded[0], b"definitely not an image"]))
            error = ""
        except tf.errors.InvalidArgumentError as caught:
            error = caught.message
        # The process survives a bad request and serves the next one.
        again = serve(image_bytes=tf.constant(encoded[:2]))
        results["again_representation"] = again["representation"].numpy()
        np.savez(outputs_path, **results)
        with open(outputs_path + ".json", "w") as stream:
            json.dump({"error": error, "signatures": sorted(model.signatures)}, stream)
    """
)


def _tiny_encoder(size=SIZE):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", kernel_initializer=keras.initializers.HeNormal(0))(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    # Non-trivial moving statistics: a training-mode call in the export would differ.
    model.get_layer("bn").moving_mean.assign([0.1, -0.2, 0.3, 0.0])
    model.get_layer("bn").moving_variance.assign([2.0, 0.5, 1.0, 3.0])
    return model


def _encode(array, image_format, **options):
    stream = io.BytesIO()
    Image.fromarray(array).save(stream, format=image_format, **options)
    return stream.getvalue()


def _request(seed=0):
    """Mixed sizes, modes and formats; returns (encoded bytes, decoded uint8 RGB pixels)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(20, 31, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(40, 25), dtype=np.uint8)
    rgba = rng.integers(0, 256, size=(12, 12, 4), dtype=np.uint8)
    photo = np.clip(
        np.linspace(0, 255, 45)[:, None, None] + rng.normal(0, 20, size=(45, 60, 3)), 0, 255
    ).astype(np.uint8)
    encoded = [
        _encode(rgb, "PNG"),
        _encode(gray, "PNG"),
        _encode(rgba, "PNG"),
        _encode(photo, "JPEG", quality=90),
        _encode(gray, "JPEG"),
    ]
    # PNG is lossless; JPEG is not, so its reference pixels come from the same decoder the
    # graph uses (the comparison is about the graph, not about JPEG loss).
    decoded = [
        rgb,
        np.repeat(gray[..., None], 3, axis=-1),
        rgba[..., :3],
        tf.io.decode_image(encoded[3], channels=3).numpy(),
        tf.io.decode_image(encoded[4], channels=3).numpy(),
    ]
    return encoded, decoded


def _in_memory(encoder, decoded, size=SIZE):
    crops = [augment.center_crop_resize(image, size)[None] for image in decoded]
    return np.concatenate([keras.ops.convert_to_numpy(encoder(crop, training=False)) for crop in crops])


def _load_in_fresh_process(jobs, tmp_path):
    """Loads and calls each export in ONE new interpreter; jobs are (export_dir, images, encoded)."""
    paths = []
    for index, (export_dir, images, encoded) in enumerate(jobs):
        inputs_path = str(tmp_path / f"inputs{index}.npz")
        np.savez(inputs_path, images=images, encoded=np.array(encoded, dtype=object).astype(bytes))
        paths.append((export_dir, inputs_path, str(tmp_path / f"outputs{index}.npz")))
    script = tmp_path / "serve.py"
    script.write_text(_LOAD_AND_SERVE)
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    completed = subprocess.run(
        [sys.executable, str(script), json.dumps(paths)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = []
    for _, _, outputs_path in paths:
        with open(outputs_path + ".json") as stream:
            results.append((dict(np.load(outputs_path)), json.load(stream)))
    return results


def test_round_trip_in_fresh_process_matches_in_memory_encoder(tmp_path):
    encoder = _tiny_encoder()
    small_convnet = networks.build_encoder(NetworkConfig(encoder="small_convnet", sync_batchnorm=False), 28)
    export_dir = export.export_encoder(encoder, str(tmp_path / "tiny"), SIZE, metrics={"top1": 0.5})
    convnet_dir = export.export_encoder(small_convnet, str(tmp_path / "convnet"), 28)
    encoded, decoded = _request()

    rng = np.random.default_rng(1)
    cases = [(export_dir, encoder, SIZE), (convnet_dir, small_convnet, 28)]
    images = [rng.uniform(size=(3, size, size, 3)).astype(np.float32) for _, _, size in cases]
    results = _load_in_fresh_process(
        [(directory, batch, encoded) for (directory, _, _), batch in zip(cases, images)], tmp_path
    )
    for (_, model, size), batch, (outputs, info) in zip(cases, images, results):
        assert info["signatures"] == ["embed_images", "serving_default"]

        expected = keras.ops.convert_to_numpy(model(batch, training=False))
        np.testing.assert_allclose(outputs["embed_representation"], expected, atol=1e-5)
        np.testing.assert_allclose(outputs["call_representation"], expected, atol=1e-5)
        np.testing.assert_allclose(
            outputs["embed_embedding"], expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5
        )

        served = _in_memory(model, decoded, size)
        assert outputs["serve_representation"].shape == served.shape
        np.testing.assert_allclose(outputs["serve_representation"], served, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(outputs["serve_embedding"], axis=1), 1.0, atol=1e-5)

        assert "image_bytes[1] is not a JPEG, PNG, GIF, BMP or WebP image" in info["error"]
        np.testing.assert_allclose(outputs["again_representation"], served[:2], atol=1e-5)


def test_export_folder_holds_keras_file_config_and_metrics(tmp_path):
    encoder = _tiny_encoder()
    config = Config(network=NetworkConfig(encoder="small_convnet"))
    export_dir = export.export_encoder(encoder, str(tmp_path / "out"), SIZE, config=config, metrics={"top1": 0.75})
    assert sorted(os.listdir(export_dir)) == sorted(
        ["assets", "assets.extra", "config.yaml", "encoder.keras", "fingerprint.pb", "metrics.json", "saved_model.pb",
         "variables"]
    )
    with open(os.path.join(export_dir, "metrics.json")) as stream:
        assert json.load(stream) == {"top1": 0.75}
    assert config_lib.load(os.path.join(export_dir, "config.yaml")) == config
    reloaded = keras.models.load_model(os.path.join(export_dir, "encoder.keras"))
    images = np.random.default_rng(0).uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(reloaded(images, training=False), encoder(images, training=False), atol=1e-6)
    # Nothing else was left in the parent folder (no staging folders).
    assert os.listdir(tmp_path) == ["out"]


def test_bad_bytes_fail_clearly_in_process(tmp_path):
    export_dir = export.export_encoder(_tiny_encoder(), str(tmp_path / "out"), SIZE)
    serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    encoded, _ = _request()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes\[0\] is not a JPEG.*starts with"):
        serve(image_bytes=tf.constant([b"/9j/4AAQSkZJRg=="]))  # base64 text, not JPEG bytes
    with pytest.raises(tf.errors.InvalidArgumentError, match="image_bytes\\[0\\]"):
        serve(image_bytes=tf.constant([b""]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?i)png"):
        serve(image_bytes=tf.constant([encoded[0][:40]]))  # a truncated PNG
    assert serve(image_bytes=tf.constant(encoded))["embedding"].shape == (len(encoded), 4)


def test_webp_bytes_are_served_as_pil_decodes_them(tmp_path):
    # The training data checks and decoder take WebP; the serving signature must too.
    encoder = _tiny_encoder()
    export_dir = export.export_encoder(encoder, str(tmp_path / "out"), SIZE)
    serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    pixels = np.random.default_rng(3).integers(0, 256, size=(21, 30, 3), dtype=np.uint8)
    encoded = _encode(pixels, "WEBP", lossless=True)
    decoded = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    np.testing.assert_array_equal(decoded, pixels)
    served = serve(image_bytes=tf.constant([_request()[0][0], encoded]))["representation"].numpy()
    np.testing.assert_allclose(served[1:], _in_memory(encoder, [pixels]), atol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes\[0\] is not a JPEG.*RIFF"):
        serve(image_bytes=tf.constant([b"RIFF\0\0\0\0WAVEfmt "]))  # RIFF, but audio


def test_images_of_another_shape_or_range_fail_naming_the_input(tmp_path):
    encoder = _tiny_encoder()
    model = tf.saved_model.load(export.export_encoder(encoder, str(tmp_path / "out"), SIZE))
    embed_images = model.signatures["embed_images"]
    images = np.random.default_rng(4).uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    # A signature does not check the shape it declares, and a pooling encoder embeds any size.
    for bad in (images[..., :1], np.zeros((2, SIZE + 4, SIZE + 4, 3), np.float32), images[0]):
        with pytest.raises(tf.errors.InvalidArgumentError, match=rf"images: expected float32 \[B, {SIZE}, {SIZE}, 3\]"):
            embed_images(images=tf.constant(bad))
    for bad in (images * 255.0, (images - 0.45) / 0.225):  # 0-255 pixels; mean / std standardised
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"images: expected values in \[0, 1\]"):
            embed_images(images=tf.constant(bad))
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"images: expected values in \[0, 1\]"):
            model(tf.constant(bad))
    # A little resampling overshoot is no mistake: embedded as given.
    overshoot = np.clip(images * 1.4 - 0.2, -0.2, 1.2).astype(np.float32)
    expected = keras.ops.convert_to_numpy(encoder(overshoot, training=False))
    np.testing.assert_allclose(embed_images(images=tf.constant(overshoot))["representation"], expected, atol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes: expected a batch"):
        model.signatures["serving_default"](image_bytes=tf.constant(_request()[0][0]))


def test_an_empty_batch_is_answered_with_empty_outputs(tmp_path):
    model = tf.saved_model.load(export.export_encoder(_tiny_encoder(), str(tmp_path / "out"), SIZE))
    outputs = [
        model.signatures["serving_default"](image_bytes=tf.zeros([0], tf.string)),
        model.signatures["embed_images"](images=tf.zeros([0, SIZE, SIZE, 3])),
    ]
    for answer in outputs:
        assert {name: tuple(value.shape) for name, value in answer.items()} == {
            "embedding": (0, 4), "representation": (0, 4)
        }
    assert tuple(model(tf.zeros([0, SIZE, SIZE, 3])).shape) == (0, 4)


def test_export_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    def broken_save(config, path):
        raise OSError("disk full")

    monkeypatch.setattr(export.config_lib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export.export_encoder(_tiny_encoder(), str(tmp_path / "out"), SIZE, config=Config())
    assert os.listdir(tmp_path) == []


def test_existing_export_is_kept_unless_overwrite(tmp_path):
    target = str(tmp_path / "out")
    export.export_encoder(_tiny_encoder(), target, SIZE, metrics={"version": 1})
    with pytest.raises(ValueError, match="already exists"):
        export.export_encoder(_tiny_encoder(), target, SIZE, metrics={"version": 2})
    export.export_encoder(_tiny_encoder(), target, SIZE, metrics={"version": 2}, overwrite=True)
    with open(os.path.join(target, "metrics.json")) as stream:
        assert json.load(stream) == {"version": 2}
    assert os.listdir(tmp_path) == ["out"]


def test_export_removes_what_a_killed_export_left(tmp_path):
    target = str(tmp_path / "out")
    export.export_encoder(_tiny_encoder(), target, SIZE, metrics={"version": 1})
    # A kill while staging, and one between replace_dir's two renames (the old copy moved aside).
    os.makedirs(tmp_path / ".out.tmp-0123abcd" / "variables")
    os.rename(target, tmp_path / "out.old-4567cdef")
    (tmp_path / "outside").write_text("kept")
    export.export_encoder(_tiny_encoder(), target, SIZE, metrics={"version": 2})
    assert sorted(os.listdir(tmp_path)) == ["out", "outside"]
    with open(os.path.join(target, "metrics.json")) as stream:
        assert json.load(stream) == {"version": 2}


def _fake_run(run_dir, evaluation=None):
    os.makedirs(run_dir)
    config = config_lib.from_dict({"augment": {"image_size": SIZE}, "network": {"encoder": "small_convnet"}})
    config_lib.save(config, os.path.join(run_dir, "config.yaml"))
    _tiny_encoder().save(os.path.join(run_dir, "encoder.keras"))
    if evaluation is not None:
        with open(os.path.join(run_dir, "evaluation.json"), "w") as stream:
            json.dump(evaluation, stream)
    return config


def test_export_run_records_config_and_evaluation(tmp_path):
    run_dir = str(tmp_path / "run")
    config = _fake_run(run_dir, evaluation={"rows": {"byol": {"top1": 0.9}}})
    export_dir = export.export_run(run_dir, str(tmp_path / "export"))
    with open(os.path.join(export_dir, "metrics.json")) as stream:
        assert json.load(stream) == {"evaluation": {"rows": {"byol": {"top1": 0.9}}}}
    assert config_lib.load(os.path.join(export_dir, "config.yaml")) == config
    loaded = tf.saved_model.load(export_dir)
    signature = loaded.signatures["embed_images"]
    assert signature.structured_input_signature[1]["images"].shape.as_list() == [None, SIZE, SIZE, 3]
    # The root call is traced once, for exactly the images the encoder takes.
    assert loaded.__call__.input_signature == (tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name="images"),)


def test_cli_export(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    _fake_run(run_dir)
    out = str(tmp_path / "export")
    assert cli.main(["export", "--run", run_dir, "--out", out]) == 0
    assert os.path.isfile(os.path.join(out, "saved_model.pb"))
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    assert out in capsys.readouterr().out
    # A second export to the same folder is refused with one clear line, not a traceback.
    assert cli.main(["export", "--run", run_dir, "--out", out]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["export", "--run", str(tmp_path / "missing"), "--out", out + "2"]) == 2
    assert "has no config.yaml" in capsys.readouterr().err


# ------------------------------------------------------------------ what servers and loaders see


def test_warmup_requests_are_prediction_logs_the_serving_signature_answers(tmp_path):
    encoder = _tiny_encoder()
    export_dir = export.export_encoder(encoder, str(tmp_path / "out"), SIZE)
    path = os.path.join(export_dir, "assets.extra", "tf_serving_warmup_requests")
    records = [prediction_log_pb2.PredictionLog.FromString(record) for record in tf.data.TFRecordDataset(path).as_numpy_iterator()]
    serve = tf.saved_model.load(export_dir).signatures["serving_default"]

    batches = []
    for record in records:
        request = record.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        assert set(request.inputs) == set(serve.structured_input_signature[1]) == {"image_bytes"}
        assert request.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
        encoded = [bytes(item) for item in tf.make_ndarray(request.inputs["image_bytes"])]
        outputs = serve(image_bytes=tf.constant(encoded))
        assert {name: value.shape.as_list() for name, value in outputs.items()} == {
            "embedding": [len(encoded), 4],
            "representation": [len(encoded), 4],
        }
        decoded = [tf.io.decode_image(item, channels=3).numpy() for item in encoded]
        np.testing.assert_allclose(outputs["representation"], _in_memory(encoder, decoded), atol=1e-5)
        batches.append(encoded)

    # Each image alone, then all together; a PNG and a JPEG among them, of different sizes.
    singles = [batch[0] for batch in batches[:-1]]
    assert [len(batch) for batch in batches] == [1] * len(singles) + [len(singles)] and batches[-1] == singles
    assert {item[:4] for item in singles} >= {b"\x89PNG", b"\xff\xd8\xff\xe0"}
    assert len({Image.open(io.BytesIO(item)).size for item in singles}) == len(singles)
    assert {Image.open(io.BytesIO(item)).mode for item in singles} >= {"RGB", "L"}


def _tf_serving_inputs(body):
    """Stands in for TF Serving's REST front end: a predict body -> the signature's input tensors.

    As the model server decodes it: a {"b64": ...} object is the decoded bytes of one
    DT_STRING element; the row format ("instances", one object per example keyed by input
    name) is stacked into one batch per input; the columnar format ("inputs": input name
    -> batch) is taken as it is.
    """

    def value(item):
        if isinstance(item, dict):
            assert set(item) == {"b64"}, item
            return base64.b64decode(item["b64"], validate=True)
        if isinstance(item, list):
            return [value(element) for element in item]
        return item

    request = json.loads(body)
    if "instances" in request:
        names = set(request["instances"][0])
        columns = {name: [] for name in names}
        for instance in request["instances"]:
            assert set(instance) == names, "every instance names the same inputs"
            for name, item in instance.items():
                columns[name].append(value(item))
    else:
        columns = {name: value(batch) for name, batch in request["inputs"].items()}
    return {name: tf.constant(batch) for name, batch in columns.items()}


def test_tf_serving_rest_bodies_with_b64_reach_the_signature_as_image_bytes(tmp_path):
    export_dir = export.export_encoder(_tiny_encoder(), str(tmp_path / "out"), SIZE)
    serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    encoded, _ = _request()
    images = [encoded[0], encoded[3]]  # a PNG and a JPEG
    text = [base64.b64encode(image).decode("ascii") for image in images]
    bodies = {
        "row": json.dumps({"instances": [{"image_bytes": {"b64": item}} for item in text]}),
        "columnar": json.dumps({"inputs": {"image_bytes": [{"b64": item} for item in text]}}),
    }
    expected = serve(image_bytes=tf.constant(images))
    for layout, body in bodies.items():
        inputs = _tf_serving_inputs(body)
        assert set(inputs) == set(serve.structured_input_signature[1]), layout
        outputs = serve(**inputs)
        assert set(outputs) == set(expected) == {"embedding", "representation"}
        for name, value in expected.items():
            np.testing.assert_allclose(outputs[name], value, atol=1e-6, err_msg=f"{layout}: {name}")
    # Without the {"b64": ...} wrapper the server passes the base64 text itself: refused,
    # naming the element.
    unwrapped = json.dumps({"instances": [{"image_bytes": text[0]}]})
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes\[0\] is not a JPEG, PNG"):
        serve(**_tf_serving_inputs(unwrapped))


# A Keras 3 user's session: nothing but the export folder and keras.
_KERAS_LOAD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    import tensorflow as tf

    export_dir, inputs_path, outputs_path = sys.argv[1:]
    inputs = np.load(inputs_path, allow_pickle=False)
    results = {}
    served = keras.layers.TFSMLayer(export_dir, call_endpoint="serving_default")
    for name, value in served(tf.constant([bytes(item) for item in inputs["encoded"]])).items():
        results["serve_" + name] = keras.ops.convert_to_numpy(value)
    # The encoder as a layer of a user's functional model.
    embed = keras.layers.TFSMLayer(export_dir, call_endpoint="embed_images")
    images = keras.Input(inputs["images"].shape[1:])
    model = keras.Model(images, embed(images)["representation"])
    results["model_representation"] = model.predict(inputs["images"], verbose=0)
    for name, value in embed(inputs["images"]).items():
        results["embed_" + name] = keras.ops.convert_to_numpy(value)
    np.savez(outputs_path, **results)
    """
)


def test_keras_tfsm_layer_loads_both_endpoints_in_a_fresh_process(tmp_path):
    encoder = _tiny_encoder()
    export_dir = export.export_encoder(encoder, str(tmp_path / "out"), SIZE)
    encoded, decoded = _request()
    images = np.random.default_rng(2).uniform(size=(3, SIZE, SIZE, 3)).astype(np.float32)
    inputs_path, outputs_path = str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")
    np.savez(inputs_path, images=images, encoded=np.array(encoded, dtype=object).astype(bytes))
    script = tmp_path / "keras_user.py"
    script.write_text(_KERAS_LOAD)
    completed = subprocess.run(
        [sys.executable, str(script), export_dir, inputs_path, outputs_path],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES=""),
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    outputs = dict(np.load(outputs_path))

    expected = keras.ops.convert_to_numpy(encoder(images, training=False))
    for name in ("embed_representation", "model_representation"):
        np.testing.assert_allclose(outputs[name], expected, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(
        outputs["embed_embedding"], expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5
    )
    served = _in_memory(encoder, decoded)
    np.testing.assert_allclose(outputs["serve_representation"], served, atol=1e-5)
    np.testing.assert_allclose(
        outputs["serve_embedding"], served / np.linalg.norm(served, axis=1, keepdims=True), atol=1e-5
    )
