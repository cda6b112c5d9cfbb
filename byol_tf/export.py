"""Encoder export: a TF SavedModel with serving signatures, plus the Keras file, config and metrics.

An export folder holds:

    saved_model.pb, variables/   the SavedModel (`tf.saved_model.load(export_dir)`)
    encoder.keras                the encoder as a Keras file (`keras.models.load_model`)
    config.yaml                  the experiment config, when given
    metrics.json                 evaluation metrics, when given

Signatures (outputs are float32 dicts {"embedding": L2-normalised [B, d],
"representation": raw [B, d]}):

    serving_default(image_bytes: tf.string [B])  JPEG / PNG / GIF / BMP bytes of any size,
        grayscale or RGBA; each image is decoded to RGB and centre-cropped / resized in the
        graph exactly as in evaluation (`augment.center_crop_resize`). Bytes that are not
        an image fail the call with an InvalidArgumentError naming the batch index.
    embed_images(images: float32 [B, S, S, 3] in [0, 1])  already preprocessed images.

The folder is written under a temporary name beside `export_dir` and renamed at the end,
so a crash never leaves a half-written export where a server would look. Every path goes
through `byol_tf.fileio` (`tf.io.gfile`): exports go to gs:// as well.
"""

from __future__ import annotations

from typing import Any, Mapping

import keras
import tensorflow as tf

from byol_tf import augment, fileio
from byol_tf import config as config_lib

ENCODER_FILE = "encoder.keras"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
EVALUATION_FILE = "evaluation.json"  # written into a run folder by `byol-tf train`

SERVING_SIGNATURE = "serving_default"
EMBED_IMAGES_SIGNATURE = "embed_images"

# Magic numbers of the formats tf.io.decode_image reads; checked first so that a batch
# with a non-image fails with a message that names the offending element.
_IMAGE_PREFIXES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")


class EncoderModule(tf.Module):
    """The encoder and its two serving functions, as saved in the SavedModel.

    Args:
        encoder: float32 [B, S, S, 3] images in [0, 1] -> [B, d].
        image_size: S.
    """

    def __init__(self, encoder: keras.Model, image_size: int):
        super().__init__(name="byol_encoder")
        self.encoder = encoder
        self.image_size = image_size
        self.serve_bytes = tf.function(
            self._serve_bytes, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")]
        )
        self.embed_images = tf.function(
            self._embed_images,
            input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")],
        )

    def _outputs(self, images):
        representation = tf.cast(self.encoder(images, training=False), tf.float32)
        return {
            "embedding": tf.math.l2_normalize(representation, axis=-1),
            "representation": representation,
        }

    def _embed_images(self, images):
        return self._outputs(images)

    def _serve_bytes(self, image_bytes):
        images = tf.map_fn(
            self._decode,
            (image_bytes, tf.range(tf.shape(image_bytes)[0])),
            fn_output_signature=tf.TensorSpec([self.image_size, self.image_size, 3], tf.float32),
        )
        return self._outputs(images)

    def _decode(self, element):
        encoded, index = element
        head = tf.strings.substr(encoded, 0, 4)
        is_image = tf.reduce_any(
            [tf.equal(tf.strings.substr(encoded, 0, len(prefix)), prefix) for prefix in _IMAGE_PREFIXES]
        )
        # The first bytes tell e.g. base64 text ("/9j/") apart from raw JPEG bytes.
        message = tf.strings.format(
            "image_bytes[{}] is not a JPEG, PNG, GIF or BMP image (it starts with {})", (index, head)
        )
        check = tf.debugging.Assert(is_image, [message])
        with tf.control_dependencies([check]):
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image = tf.ensure_shape(image, [None, None, 3])
        return augment.center_crop_resize(image, self.image_size)


def export_encoder(
    encoder: keras.Model,
    export_dir: str,
    image_size: int,
    *,
    config: config_lib.Config | None = None,
    metrics: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Writes the encoder as a SavedModel with serving signatures, plus its Keras file.

    Args:
        encoder: float32 [B, S, S, 3] images in [0, 1] -> [B, d].
        export_dir: destination folder, local or any `tf.io.gfile` path (created; must not
            exist unless `overwrite`).
        image_size: S, the side the serving signature resizes images to.
        config: written as config.yaml beside the model.
        metrics: JSON-serialisable evaluation results, written as metrics.json.
        overwrite: replace an existing `export_dir`.

    Returns:
        `export_dir` (absolute when local).

    Raises:
        ValueError: `export_dir` exists and `overwrite` is False.
    """
    export_dir = fileio.absolute(export_dir)
    if fileio.exists(export_dir) and not overwrite:
        raise ValueError(f"export folder {export_dir!r} already exists (overwrite it with --overwrite)")
    # A sibling folder, renamed into place at the end (atomic on a local file system).
    staging = fileio.staging_dir(export_dir)
    try:
        module = EncoderModule(encoder, image_size)
        tf.saved_model.save(
            module,
            staging,
            signatures={
                SERVING_SIGNATURE: module.serve_bytes,
                EMBED_IMAGES_SIGNATURE: module.embed_images,
            },
        )
        encoder.save(fileio.join(staging, ENCODER_FILE))
        if config is not None:
            config_lib.save(config, fileio.join(staging, CONFIG_FILE))
        if metrics is not None:
            fileio.write_json(fileio.join(staging, METRICS_FILE), metrics)
        fileio.replace_dir(staging, export_dir)
    except BaseException:
        fileio.rmtree(staging)
        raise
    return export_dir


def load_run(run_dir: str) -> tuple[keras.Model, config_lib.Config, dict | None]:
    """Reads what `training.train` (and `byol-tf train`) left in a run folder.

    Args:
        run_dir: folder with config.yaml, encoder.keras and optionally evaluation.json.

    Returns:
        (encoder, config, metrics): metrics is {"evaluation": the report} when the run was
        evaluated, else None.

    Raises:
        ValueError: a file is missing.
    """
    encoder_path = fileio.join(run_dir, ENCODER_FILE)
    config_path = fileio.join(run_dir, CONFIG_FILE)
    for path in (config_path, encoder_path):
        if not fileio.isfile(path):
            raise ValueError(f"run folder {run_dir!r} has no {fileio.basename(path)} (is it a byol-tf run?)")
    config = config_lib.load(config_path)
    encoder = keras.models.load_model(encoder_path, compile=False)
    metrics = None
    metrics_path = fileio.join(run_dir, EVALUATION_FILE)
    if fileio.isfile(metrics_path):
        metrics = {"evaluation": fileio.read_json(metrics_path)}
    return encoder, config, metrics


def export_run(run_dir: str, export_dir: str, *, overwrite: bool = False) -> str:
    """Exports the encoder of a run folder, with its config and evaluation metrics if any.

    Args:
        run_dir: a `byol-tf train` run folder.
        export_dir: destination folder.
        overwrite: replace an existing `export_dir`.

    Returns:
        `export_dir` (absolute when local).
    """
    encoder, config, metrics = load_run(run_dir)
    return export_encoder(
        encoder, export_dir, config.augment.image_size, config=config, metrics=metrics, overwrite=overwrite
    )
