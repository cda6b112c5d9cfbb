"""Tests for byol_tf.export: SavedModel round trip in a fresh process, bad bytes, atomic writes."""

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
        np.testing.assert_allclose(
            outputs["embed_embedding"], expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5
        )

        served = _in_memory(model, decoded, size)
        assert outputs["serve_representation"].shape == served.shape
        np.testing.assert_allclose(outputs["serve_representation"], served, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(outputs["serve_embedding"], axis=1), 1.0, atol=1e-5)

        assert "image_bytes[1] is not a JPEG, PNG, GIF or BMP image" in info["error"]
        np.testing.assert_allclose(outputs["again_representation"], served[:2], atol=1e-5)


def test_export_folder_holds_keras_file_config_and_metrics(tmp_path):
    encoder = _tiny_encoder()
    config = Config(network=NetworkConfig(encoder="small_convnet"))
    export_dir = export.export_encoder(encoder, str(tmp_path / "out"), SIZE, config=config, metrics={"top1": 0.75})
    assert sorted(os.listdir(export_dir)) == sorted(
        ["assets", "config.yaml", "encoder.keras", "fingerprint.pb", "metrics.json", "saved_model.pb", "variables"]
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
    signature = tf.saved_model.load(export_dir).signatures["embed_images"]
    assert signature.structured_input_signature[1]["images"].shape.as_list() == [None, SIZE, SIZE, 3]


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
