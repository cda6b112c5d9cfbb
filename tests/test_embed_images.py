"""Tests for byol_tfx.components.embed_images: the Beam executor on a tiny Examples artifact, and the skip."""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "0"  # tfx.v1 would hand Keras 2 to child processes

import numpy as np
import pytest
import tensorflow as tf
from fixtures import exports
from fixtures.artifacts import CLASSES, write_examples
from tfx.types import standard_artifacts

from byol_tf import config as config_lib
from byol_tf import embed
from byol_tfx.components import embed_images

SIDE = 8
CONFIG = config_lib.to_json(config_lib.from_dict({"augment": {"image_size": SIDE}}))
BEAM_ARGS = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def pushed_model(root, pushed=True):
    """A PushedModel artifact as the Pusher leaves it: the SavedModel copied into its folder."""
    artifact = standard_artifacts.PushedModel()
    artifact.uri = root
    if pushed:
        exports.export_random_encoder(root, image_size=SIDE)
        artifact.set_string_custom_property(embed_images.PUSHED_DESTINATION_KEY, "/serving_model/1796000000")
    else:
        os.makedirs(root)
    artifact.set_int_custom_property(embed_images.PUSHED_KEY, int(pushed))
    return artifact


def run_executor(tmp_path, model, split="eval", batch_size=5):
    examples = write_examples(str(tmp_path / "examples"), train=10, eval_=12)
    output = embed_images.Embeddings()
    output.uri = str(tmp_path / "embeddings")
    os.makedirs(output.uri)
    context = embed_images.Executor.Context(beam_pipeline_args=BEAM_ARGS, tmp_dir=str(tmp_path / "tmp"))
    embed_images.Executor(context).Do(
        {"examples": [examples], "pushed_model": [model]},
        {"embeddings": [output]},
        {"config": CONFIG, "split": split, "batch_size": batch_size},
    )
    return examples, output


def test_embeds_every_record_of_the_split_as_serving_does(tmp_path):
    model = pushed_model(str(tmp_path / "pushed"))
    examples, output = run_executor(tmp_path, model)

    result = embed.read(output.uri)  # the byol-tf embed format: the same reader
    manifest = result.manifest
    assert (manifest["count"], manifest["split"], manifest["key"], manifest["dimension"]) == (12, "eval", "record", 256)
    assert manifest["model"] == model.uri and manifest["pushed_destination"] == "/serving_model/1796000000"
    assert manifest["examples"] == os.path.join(examples.uri, "Split-eval")
    assert output.get_int_custom_property(embed_images.EMBEDDED_KEY) == 1
    assert output.get_int_custom_property("count") == 12
    assert all(name.startswith("part-") or name == embed.MANIFEST_FILE for name in os.listdir(output.uri))

    # Rows come in any order; the key says which record each is.
    order = np.argsort([int(key.split(":")[1]) for key in result.keys])
    keys, labels, embeddings = result.keys[order], result.labels[order], result.embeddings[order]
    assert keys.tolist() == [f"data_tfrecord-00000-of-00001.gz:{i}" for i in range(12)]
    np.testing.assert_array_equal(labels, np.arange(12) % CLASSES)
    records = tf.data.TFRecordDataset(
        os.path.join(examples.uri, "Split-eval", "data_tfrecord-00000-of-00001.gz"), compression_type="GZIP"
    )
    images = [embed_images.parse_record(record)[0] for record in records.as_numpy_iterator()]
    serve = tf.saved_model.load(model.uri).signatures["serving_default"]
    expected = serve(image_bytes=tf.constant(images))["embedding"].numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)


def test_an_encoder_that_was_not_pushed_is_not_embedded(tmp_path):
    _, output = run_executor(tmp_path, pushed_model(str(tmp_path / "pushed"), pushed=False))
    assert os.listdir(output.uri) == [embed_images.SKIPPED_FILE]
    assert "did not bless" in open(os.path.join(output.uri, embed_images.SKIPPED_FILE)).read()
    assert output.get_int_custom_property(embed_images.EMBEDDED_KEY) == 0
    with pytest.raises(ValueError, match="no _manifest.json"):
        embed.read(output.uri)


def test_record_keys_and_parsing():
    from fixtures import images as fx

    assert embed_images.record_key("/a/Split-eval/data-00001-of-00004.gz", 17) == "data-00001-of-00004.gz:17"
    assert embed_images.parse_record(fx.tf_example(b"\x89PNG..", 4)) == (b"\x89PNG..", 4)
    assert embed_images.parse_record(fx.tf_example(b"\x89PNG..")) == (b"\x89PNG..", -1)
    with pytest.raises(ValueError, match="no 'image' bytes"):
        embed_images.parse_record(fx.tf_example(label=3))


def test_the_split_must_be_eval_or_train():
    from tfx.types import channel

    with pytest.raises(ValueError, match=r"^embed_split: 'test' is not one of 'eval', 'train'"):
        embed_images.EmbedImages(
            examples=channel.Channel(type=standard_artifacts.Examples),
            pushed_model=channel.Channel(type=standard_artifacts.PushedModel),
            config=CONFIG,
            split="test",
        )
