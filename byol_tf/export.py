"""Encoder export: a TF SavedModel with serving signatures, plus the Keras file, config and metrics.

An export folder holds:

    saved_model.pb, variables/   the SavedModel (`tf.saved_model.load(export_dir)`)
    assets.extra/tf_serving_warmup_requests
                                 TF Serving warm-up requests (`byol_tf.serving`)
    encoder.keras                the encoder as a Keras file (`keras.models.load_model`)
    config.yaml                  the experiment config, when given
    metrics.json                 evaluation metrics, when given

Signatures (outputs are float32 dicts {"embedding": L2-normalised [B, d],
"representation": raw [B, d]}):

    serving_default(image_bytes: tf.string [B])  JPEG / PNG / GIF / BMP / WebP bytes of any
        size, grayscale or RGBA; each image is decoded to RGB and centre-cropped / resized in
        the graph exactly as in evaluation (`augment.center_crop_resize`). Bytes that are not
        an image fail the call with an InvalidArgumentError naming the batch index.
    embed_images(images: float32 [B, S, S, 3] in [0, 1])  already preprocessed images.
        Another shape, or values far outside [0, 1] (0-255 pixels, mean / std-standardised
        images), fail the call with an InvalidArgumentError naming `images`.

An empty batch (B = 0) is answered with empty [0, d] outputs.

The loaded object itself is callable, as TF-Hub-style loaders expect:
`tf.saved_model.load(export_dir)(images)` takes float32 [B, S, S, 3] images in [0, 1] and
returns the representation [B, d] (a tensor, not a dict), with the range check of
`embed_images`.

How the export is served:

- TF Serving: the folder is one model version (put it at `MODEL_BASE/1/`). The warm-up
  requests call `serving_default` with a PNG, a JPEG and a grayscale PNG of different
  sizes, one at a time and then as one batch, so the server traces the decoding and the
  encoder before it takes traffic. Over REST, bytes travel base64-encoded as
  `{"b64": "..."}`: `{"instances": [{"image_bytes": {"b64": "..."}}]}` (row format) or
  `{"inputs": {"image_bytes": [{"b64": "..."}]}}` (columnar); the server decodes the
  base64, so the signature sees the raw image bytes.
- Keras 3: `keras.layers.TFSMLayer(export_dir, call_endpoint="serving_default")` (or
  `"embed_images"`) is a layer returning the outputs dict.
- `tf.saved_model.load(export_dir)`: `.signatures[...]`, or the root call above.

`python -m byol_tf.serving EXPORT_DIR` loads an export and answers its warm-up requests as
a server would; the pipeline's ServingCheck does that in a fresh process before the Pusher.

The folder is written under a temporary name beside `export_dir` and renamed at the end,
so a crash never leaves a half-written export where a server would look. Every path goes
through `byol_tf.fileio` (`tf.io.gfile`): exports go to gs:// as well.
"""

from __future__ import annotations

from typing import Any, Mapping

import keras
import numpy as np
import tensorflow as tf

from byol_tf import augment, checks, fileio, losses, networks, serving
from byol_tf import config as config_lib

ENCODER_FILE = "encoder.keras"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
EVALUATION_FILE = "evaluation.json"  # written into a run folder by `byol-tf train`

SERVING_SIGNATURE = "serving_default"
EMBED_IMAGES_SIGNATURE = "embed_images"
IMAGE_BYTES_INPUT = "image_bytes"
IMAGES_INPUT = "images"

# (height, width, channels, format) of the warm-up images: both decoders, grayscale, and
# landscape, portrait and square shapes to crop.
_WARMUP_IMAGES = ((24, 32, 3, "png"), (40, 30, 3, "jpeg"), (20, 20, 1, "png"))

# Signatures of the formats the decoder reads (`checks.IMAGE_SIGNATURES`); checked first so
# that a batch with a non-image fails with a message that names the offending element.
_IMAGE_PREFIXES = tuple(signature for signature, _ in checks.IMAGE_SIGNATURES)
# How far outside [0, 1] an `images` value may be: resampling (bicubic, Lanczos) overshoots
# a little, while 0-255 pixels and standardised images (about -2 to 2.6) go well past it.
_IMAGES_RANGE_SLACK = 0.5


class EncoderModule(tf.Module):
    """The encoder, its two signatures and its root call, as saved in the SavedModel.

    Args:
        encoder: float32 [B, S, S, 3] images in [0, 1] -> [B, d].
        image_size: S.
    """

    def __init__(self, encoder: keras.Model, image_size: int):
        super().__init__(name="byol_encoder")
        self.encoder = encoder
        self.image_size = image_size
        images_spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name=IMAGES_INPUT)
        self.serve_bytes = tf.function(
            self._serve_bytes, input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_INPUT)]
        )
        self.embed_images = tf.function(self._embed_images, input_signature=[images_spec])
        # TF-Hub's convention for a reusable SavedModel: the loaded object is callable and
        # returns the feature vector itself. Saved as an attribute, so `loaded(images)`
        # works after `tf.saved_model.load`.
        self.__call__ = tf.function(self._call, input_signature=[images_spec])

    def _call(self, images):
        return self._representation(self._checked_images(images))

    def _representation(self, images):
        dimension = self.encoder.output_shape[-1]
        # On CPU, Conv2D gives an empty batch a wrong shape and the next layer fails
        # ("Incompatible shapes"); an empty request gets no rows instead.
        return tf.cond(
            tf.shape(images)[0] > 0,
            lambda: tf.cast(self.encoder(images, training=False), tf.float32),
            lambda: tf.zeros([0, dimension], tf.float32),
        )

    def _checked_images(self, images):
        """`images`, after asserting the [B, S, S, 3] shape and [0, 1] range they promise.

        A signature loaded from a SavedModel (and TF Serving) does not check the shape it
        declares, and the encoder maps any size, any channel count or 0-255 pixels to
        features without an error: wrong features, silently, without these checks.
        """
        size = self.image_size
        shape_message = tf.strings.format(
            "images: expected float32 [B, {}, {}, 3] in [0, 1], got shape {}", (size, size, tf.shape(images))
        )
        check_shape = tf.debugging.Assert(_has_shape(images, [None, size, size, 3]), [shape_message])
        with tf.control_dependencies([check_shape]):
            low, high = tf.reduce_min(images), tf.reduce_max(images)
            in_range = tf.logical_and(low >= -_IMAGES_RANGE_SLACK, high <= 1.0 + _IMAGES_RANGE_SLACK)
            in_range = tf.logical_or(tf.equal(tf.size(images), 0), in_range)
            range_message = tf.strings.format(
                "images: expected values in [0, 1] (uint8 pixels / 255), got values from {} to {}", (low, high)
            )
            check_range = tf.debugging.Assert(in_range, [range_message])
        with tf.control_dependencies([check_range]):
            return tf.identity(images)

    def _outputs(self, images):
        representation = self._representation(images)
        return {
            # unit_rows: equal images get equal embeddings wherever they sit in a batch.
            "embedding": losses.unit_rows(representation),
            "representation": representation,
        }

    def _embed_images(self, images):
        return self._outputs(self._checked_images(images))

    def _serve_bytes(self, image_bytes):
        rank_message = tf.strings.format(
            "image_bytes: expected a batch (a list) of encoded images, got shape {}", tf.shape(image_bytes)
        )
        with tf.control_dependencies([tf.debugging.Assert(_has_shape(image_bytes, [None]), [rank_message])]):
            image_bytes = tf.identity(image_bytes)
        images = tf.map_fn(
            self._decode,
            (image_bytes, tf.range(tf.shape(image_bytes)[0])),
            fn_output_signature=tf.TensorSpec([self.image_size, self.image_size, 3], tf.float32),
        )
        return self._outputs(images)

    def _decode(self, element):
        encoded, index = element
        head = tf.strings.substr(encoded, 0, 4)
        # RIFF....WEBP, as `checks.image_format`; padded, since substr fails past the end.
        padded = tf.strings.join([tf.strings.substr(encoded, 0, 12), b"\0" * 12])
        is_webp = tf.logical_and(tf.equal(head, b"RIFF"), tf.equal(tf.strings.substr(padded, 8, 4), b"WEBP"))
        is_image = tf.reduce_any(
            [tf.equal(tf.strings.substr(encoded, 0, len(prefix)), prefix) for prefix in _IMAGE_PREFIXES] + [is_webp]
        )
        # The first bytes tell e.g. base64 text ("/9j/") apart from raw JPEG bytes.
        message = tf.strings.format(
            "image_bytes[{}] is not a JPEG, PNG, GIF, BMP or WebP image (it starts with {})", (index, head)
        )
        check = tf.debugging.Assert(is_image, [message])
        with tf.control_dependencies([check]):
            image = checks.decode_image(encoded)  # the decoder of training and evaluation
        return augment.center_crop_resize(image, self.image_size)


def _has_shape(tensor, dims) -> tf.Tensor:
    """Whether `tensor`'s run-time shape is `dims` (None: any size), a scalar bool tensor.

    Compares the shape padded with -1s, not `tf.rank`: Grappler folds the rank to the one a
    signature declares, and a loaded signature does not check that its input has it.
    """
    padded = tf.concat([tf.shape(tensor), tf.fill([len(dims) + 1], -1)], 0)[: len(dims) + 1]
    known = tf.constant([size is not None for size in dims] + [True])
    expected = tf.constant([-1 if size is None else size for size in dims] + [-1])
    return tf.reduce_all(tf.where(known, tf.equal(padded, expected), padded >= 0))


def warmup_images() -> list[bytes]:
    """The images of the warm-up requests: an RGB PNG, a JPEG and a grayscale PNG, each of another size.

    Gradients with a checkerboard, made here (nothing is read or downloaded).
    """
    images = []
    for height, width, channels, image_format in _WARMUP_IMAGES:
        rows, columns = np.mgrid[0:height, 0:width]
        red, green = 255 * columns / (width - 1), 255 * rows / (height - 1)
        checker = 255 * ((rows // 4 + columns // 4) % 2)
        pixels = np.stack([red, green, checker], axis=-1) if channels == 3 else ((red + green + checker) / 3)[..., None]
        encode = tf.io.encode_png if image_format == "png" else tf.io.encode_jpeg
        images.append(encode(pixels.round().astype(np.uint8)).numpy())
    return images


def warmup_requests() -> list:
    """The `serving_default` Predict requests written into every export, as PredictionLogs.

    Each warm-up image alone (batch of 1), then all of them as one batch: TF Serving
    replays them in this order when it loads the model.
    """
    images = warmup_images()
    batches = [[image] for image in images] + [images]
    return [serving.predict_log(SERVING_SIGNATURE, {IMAGE_BYTES_INPUT: batch}) for batch in batches]


def export_encoder(
    encoder: keras.Model,
    export_dir: str,
    image_size: int,
    *,
    config: config_lib.Config | None = None,
    metrics: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Writes the encoder as a SavedModel with serving signatures and warm-up requests, plus its Keras file.

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
    fileio.remove_leftovers(export_dir)
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
        serving.write_warmup_requests(staging, warmup_requests())
        networks.portable_copy(encoder).save(fileio.join(staging, ENCODER_FILE))
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
