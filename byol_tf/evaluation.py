"""Evaluation of a frozen encoder: two linear protocols, kNN accuracy and baselines.

Both linear protocols of Grill et al. 2020 run here, chosen by `evaluation.protocol`.
Each sweeps one setting: it trains a linear classifier for every value on the training
split minus a validation part, scores top-1 on that part, keeps the best value (ties: the
earlier one in the sweep), retrains with it on the whole training split and reports top-1
/ top-5 on the held-out split. The validation part is carved from the training split
without keeping any image: `validation_split` picks positions in the split's fixed order,
stratified by label and seeded. The held-out split never chooses anything. A report row
always has `val_top1`, the validation top-1 of the chosen value, even when the sweep
holds a single value. With `validation_folds` k > 1 the one carve becomes stratified
k-fold cross-validation (`validation_folds`): every value is trained on k - 1 folds and
scored on the remaining one, k times, and its `val_top1` is pooled over all training
images (k classifiers per value; for small datasets, where one carve of a few hundred
images lets one image decide).

`transfer` (paper App. D, the protocol of its transfer-learning tables): representations
of centre crops (`augment.center_crop_resize`, no augmentation) are extracted once per
split; an L2-regularised linear classifier is trained on them with SGD, Nesterov momentum
0.9 and a cosine learning rate (`linear_base_learning_rate`), for each L2 weight of
`l2_sweep`. The features are written to a TFRecord file in a scratch folder and every
classifier epoch streams from it: a pass over the images costs one encoder forward per
image, a pass over the file only a read, and memory stays flat for splits whose N x d
features would not fit (ImageNet's train split at d = 2048). Deviations from the paper:
it fits the regularised logistic regression with L-BFGS over a wide logarithmic grid of
L2 weights, here SGD over the short grid of the config; it resizes the shorter side to
the input size (bicubic) and takes the centre square, here images larger than the input
are cropped to 0.875 of the shorter side first (the imagenet protocol's test crop) and
resized bilinearly.

`imagenet` (paper App. C.1): the frozen encoder runs in inference mode (BatchNorm uses
its moving statistics) inside the classifier's training loop; every epoch re-reads the
training images and draws a new random resized crop (area `linear_crop_scale`, default
(0.08, 1), aspect `linear_crop_ratio`) and horizontal flip (`linear_flip_prob`) for each
image; SGD with Nesterov momentum 0.9, no weight decay, cosine schedule over
`linear_epochs`; the base learning rate is chosen from `learning_rate_sweep`. Test images
are centre crops: 0.875 of the shorter side (224 of 256) when images are larger than the
encoder's input, else whole. Deviations: bilinear rather than bicubic resampling (the
library's crop op, as in pretraining); shuffling through a buffer of
`data.shuffle_buffer` decoded images, as pretraining does, since a stream has no random
access. The reference code trains at one base learning rate (0.2) and reserves 10,000
training images as its validation set; here `validation_fraction` of each class.

Deviation in both, stated (`evaluation.standardize`, on by default): features are
standardised with the per-dimension mean and std of the examples the classifier trains on
(the carved part during the sweep, the whole training split for the final fit), computed
in one pass over centre-crop features. The reference feeds raw representations. This is
the BatchNorm-without-affine head of MAE / MoCo v3 linear probing folded into the data;
it makes one learning rate fit encoders whose features differ in scale by orders of
magnitude (a trained net, a random-init net, raw pixels), so the rows of a report are
compared under the same optimiser settings.

kNN accuracy (Wu et al. 2018, InstDisc; `transfer` only, on the cached features): cosine
similarity between L2-normalised features, the k most similar training examples vote for
their class with weight exp(similarity / temperature). The memory bank is streamed.

`evaluate` runs the protocol for the given encoder and, as baselines, a randomly
initialised encoder of the same architecture (both protocols) and the raw pixels
(`transfer` only: a baseline of this project, not of the paper, kept to the cheaper
protocol), so a report says what pretraining added.

Memory does not grow with the number of images beyond a label and a flag per image:
images flow from `tf.data` in batches. `transfer` keeps features on disk and holds at
most 2^26 feature values of them while training a classifier, plus one chunk of kNN
queries; `imagenet` holds a shuffle buffer of `data.shuffle_buffer` images.
"""

from __future__ import annotations

import logging
import dataclasses
import functools
import math
import os
import shutil
import tempfile
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from byol_tf import augment, data, losses
from byol_tf.config import Config, EvaluationConfig, ViewConfig

logger = logging.getLogger(__name__)

# Raw-pixel features are centre crops resized to at most this side: at ImageNet's 224 px
# a linear layer on 150k pixel features is neither feasible nor a meaningful baseline.
RAW_PIXELS_MAX_SIZE = 32
# Standardisation floor: dimensions that are constant on the training split (dead ReLU
# units, black image borders) stay constant (0) instead of dividing by zero.
_STD_FLOOR = 1e-6
# Elements of one chunk of the kNN similarity matrix (float32: 256 MiB).
_KNN_CHUNK_ELEMENTS = 1 << 26
# kNN queries compared with the memory bank per pass over it.
_KNN_QUERY_ROWS = 8192
# Feature values one classifier fit may hold (float32: 256 MiB): a smaller part of a split
# is read into memory and permuted whole every epoch, a larger one streams from its file
# through a shuffle buffer of this size.
_SHUFFLE_FEATURE_ELEMENTS = 1 << 26
# Rows per read of a split's labels or cached features.
_READ_BATCH = 4096
_MOMENTUM = 0.9

BYOL, RANDOM_INIT, RAW_PIXELS = "byol", "random_init", "raw_pixels"
TRANSFER, IMAGENET = "transfer", "imagenet"


class NoLabelsError(ValueError):
    """The evaluation data carries no labels (label -1), so there is nothing to evaluate."""


# ----------------------------------------------------------------------------- features

# One compiled feature function per (encoder, input shape, dtype); weak keys so a dropped
# encoder is not kept alive by the cache (the kNN monitor calls this every N epochs), and
# the functions reach the encoder through a weak reference for the same reason.
_FEATURE_FUNCTIONS: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()


def _feature_function(encoder: keras.Model, image_shape: tuple, dtype, image_size: int):
    functions = _FEATURE_FUNCTIONS.setdefault(encoder, {})
    key = (tuple(image_shape), tf.as_dtype(dtype).name, image_size)
    if key not in functions:
        encoder_ref = weakref.ref(encoder)

        @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], dtype)])
        def features(images):
            representation = encoder_ref()(augment.center_crop_resize(images, image_size), training=False)
            return tf.cast(representation, tf.float32)

        functions[key] = features
    return functions[key]


def extract_features(
    encoder: keras.Model,
    images: np.ndarray,
    image_size: int,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Representations of the centre crops of in-memory `images` under the frozen encoder.

    Args:
        encoder: maps float32 [B, S, S, 3] images in [0, 1] to [B, d]; run with
            `training=False` (BatchNorm uses its moving statistics).
        images: [N, H, W, C] uint8 (or float in [0, 1]), C in {1, 3}.
        image_size: side S the centre crop is resized to (`augment.center_crop_resize`,
            the same preprocessing as the exported SavedModel).
        batch_size: images per forward pass.
        progress: show a progress bar.

    Returns:
        float32 [N, d].
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    features_fn = _feature_function(encoder, images.shape[1:], images.dtype, image_size)
    num = images.shape[0]
    bar = keras.utils.Progbar(num, unit_name="image") if progress and num else None
    outputs = []
    # Slicing numpy in Python avoids copying the whole array into one tensor (2 GiB
    # proto limit in graphs) and needs no tf.data pipeline for in-memory arrays.
    for start in range(0, num, batch_size):
        batch = images[start : start + batch_size]
        outputs.append(features_fn(tf.convert_to_tensor(batch)).numpy())
        if bar is not None:
            bar.add(len(batch))
    if not outputs:
        return np.zeros((0, _representation_dim(encoder)), np.float32)
    return np.concatenate(outputs, axis=0)


def _representation_dim(encoder: keras.Model) -> int:
    return int(encoder.outputs[0].shape[-1])


def pixel_features(images: np.ndarray, image_size: int, batch_size: int = 1024) -> np.ndarray:
    """Raw-pixel baseline features: flattened centre crops at min(image_size, 32) px.

    Args:
        images: [N, H, W, C] uint8 (or float in [0, 1]).
        image_size: the encoder's input size; crops are resized to
            min(image_size, RAW_PIXELS_MAX_SIZE).
        batch_size: images per preprocessing call.

    Returns:
        float32 [N, s * s * 3] in [0, 1].
    """
    size = min(image_size, RAW_PIXELS_MAX_SIZE)
    images = np.asarray(images)
    outputs = [
        tf.reshape(augment.center_crop_resize(images[start : start + batch_size], size), [-1, size * size * 3]).numpy()
        for start in range(0, images.shape[0], batch_size)
    ]
    return np.concatenate(outputs, axis=0) if outputs else np.zeros((0, size * size * 3), np.float32)


def _output_dim(encoder: keras.Model, image_size: int) -> int:
    """d of an encoder's [B, d] output: from a functional model's outputs, else one call."""
    try:
        return _representation_dim(encoder)
    except (AttributeError, IndexError, TypeError, ValueError):
        return int(encoder(tf.zeros([1, image_size, image_size, 3]), training=False).shape[-1])


def _encoder_featurizer(encoder: keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    """float32 [B, S, S, 3] -> float32 [B, d] under the frozen encoder (BN in inference)."""

    def featurize(images):
        return tf.cast(encoder(images, training=False), tf.float32)

    return featurize


def _compiled(featurize: Callable[[tf.Tensor], tf.Tensor], image_size: int):
    """`featurize` as one graph for every batch size of float32 [B, S, S, 3] images."""
    return tf.function(featurize, input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)])


def _flatten(images: tf.Tensor) -> tf.Tensor:
    return tf.reshape(images, [tf.shape(images)[0], -1])


# ------------------------------------------------------------------------------ streams


def _parallel(num_parallel_calls: int) -> int:
    return tf.data.AUTOTUNE if num_parallel_calls == -1 else num_parallel_calls


# Small functions handed to tf.data: skipping AutoGraph's source conversion saves its
# parsing on every pipeline built (several per fit).
_no_autograph = tf.autograph.experimental.do_not_convert


@_no_autograph
def _keep(example, keep):
    return keep


@_no_autograph
def _first(example, keep):
    return example


def _select(examples: tf.data.Dataset, mask: np.ndarray | None) -> tf.data.Dataset:
    """The elements at the positions where `mask` is true (all of them for None)."""
    if mask is None:
        return examples
    flags = tf.data.Dataset.from_tensor_slices(np.asarray(mask, bool))
    return tf.data.Dataset.zip((examples, flags)).filter(_keep).map(_first)


def _check_batch_labels(labels: np.ndarray, split: str):
    if np.any(labels < 0):
        raise NoLabelsError(f"evaluation: the {split!r} split has unlabelled images (label -1)")


def _read_labels(images: tf.data.Dataset, split: str) -> np.ndarray:
    """The labels of a split of images, in order; the images are not kept."""
    labels = []
    for batch in images.map(_no_autograph(lambda example: tf.cast(example["label"], tf.int64))).batch(_READ_BATCH):
        batch = batch.numpy()
        _check_batch_labels(batch, split)
        labels.append(batch)
    if not labels:
        raise ValueError(f"evaluation: the {split!r} split is empty")
    return np.concatenate(labels)


def _centre_crop_features(
    images: tf.data.Dataset,
    featurize: Callable[[tf.Tensor], tf.Tensor],
    image_size: int,
    batch_size: int,
    num_parallel_calls: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features [B, d], labels [B]) of centre crops, batch by batch in the split's order."""
    batches = data.evaluation_dataset(images, image_size, batch_size, num_parallel_calls=num_parallel_calls)
    for batch in batches:
        yield featurize(batch["image"]).numpy(), batch["label"].numpy()


@_no_autograph
def _mask_record(record, keep):
    return {"x": tf.boolean_mask(record["x"], keep), "label": tf.boolean_mask(record["label"], keep)}


@dataclasses.dataclass(frozen=True)
class _Features:
    """Features of one split in a fixed order, as records (batches) {"x": float32 [b, d], "label": int64 [b]}."""

    records: tf.data.Dataset
    record_sizes: tuple[int, ...]
    labels: np.ndarray
    dim: int

    @classmethod
    def from_arrays(cls, features: np.ndarray, labels: np.ndarray) -> "_Features":
        features = np.asarray(features, np.float32)
        labels = np.asarray(labels, np.int64).reshape(-1)
        records = tf.data.Dataset.from_tensor_slices({"x": features, "label": labels}).batch(_READ_BATCH)
        sizes = tuple(min(_READ_BATCH, len(labels) - start) for start in range(0, len(labels), _READ_BATCH))
        return cls(records, sizes, labels, int(features.shape[1]))

    def examples(self, mask: np.ndarray | None = None) -> tf.data.Dataset:
        """Unbatched {"x", "label"} of the rows where `mask` is true, in order (masked record-wise)."""
        if mask is None:
            return self.records.unbatch()
        flags = tf.RaggedTensor.from_row_lengths(np.asarray(mask, bool), np.asarray(self.record_sizes, np.int64))
        masked = tf.data.Dataset.zip((self.records, tf.data.Dataset.from_tensor_slices(flags)))
        return masked.map(_mask_record).unbatch()

    def batches(self, mask: np.ndarray | None = None, batch_size: int = _READ_BATCH):
        """(features, labels) numpy batches of `batch_size` rows (the last may be smaller)
        where `mask` is true, in order."""
        position, count, pending = 0, 0, []
        for record in self.records:
            features, labels = record["x"].numpy(), record["label"].numpy()
            if mask is not None:
                keep = mask[position : position + len(labels)]
                features, labels = features[keep], labels[keep]
                position += len(keep)
            pending.append((features, labels))
            count += len(labels)
            if count >= batch_size:
                features, labels = (np.concatenate(parts) for parts in zip(*pending))
                full = count - count % batch_size
                for start in range(0, full, batch_size):
                    yield features[start : start + batch_size], labels[start : start + batch_size]
                pending, count = [(features[full:], labels[full:])], count - full
        if count:
            yield tuple(np.concatenate(parts) for parts in zip(*pending))


_RECORD_FEATURES = {"x": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.string)}


def _bytes_feature(tensor: np.ndarray) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[tf.io.serialize_tensor(tensor).numpy()]))


def _write_features(batches: Iterable[tuple[np.ndarray, np.ndarray]], path: str, split: str) -> _Features:
    """Writes feature batches to a TFRecord file (one record per batch) and reads it back lazily.

    Raises:
        NoLabelsError: at the first batch with a label -1.
        ValueError: the split is empty.
    """
    labels, dim = [], None
    with tf.io.TFRecordWriter(path) as writer:
        for features, batch_labels in batches:
            batch_labels = batch_labels.astype(np.int64)
            _check_batch_labels(batch_labels, split)
            record = tf.train.Example(
                features=tf.train.Features(
                    feature={"x": _bytes_feature(features.astype(np.float32)), "label": _bytes_feature(batch_labels)}
                )
            )
            writer.write(record.SerializeToString())
            labels.append(batch_labels)
            dim = int(features.shape[1])
    if not labels:
        raise ValueError(f"evaluation: the {split!r} split is empty")

    @_no_autograph
    def parse(record):
        parsed = tf.io.parse_single_example(record, _RECORD_FEATURES)
        return {
            "x": tf.ensure_shape(tf.io.parse_tensor(parsed["x"], tf.float32), [None, dim]),
            "label": tf.ensure_shape(tf.io.parse_tensor(parsed["label"], tf.int64), [None]),
        }

    records = tf.data.TFRecordDataset(path).map(parse)
    return _Features(records, tuple(len(part) for part in labels), np.concatenate(labels), dim)


# ------------------------------------------------------------------------ moments


@dataclasses.dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations (float64) of a set of feature vectors."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> "Moments":
        features = np.asarray(features, np.float64)
        mean = features.mean(axis=0) if len(features) else np.zeros(features.shape[1])
        return cls(len(features), mean, ((features - mean) ** 2).sum(axis=0))

    def combine(self, other: "Moments") -> "Moments":
        """Moments of the union (Chan et al.'s pairwise update: stable for large counts)."""
        count = self.count + other.count
        if count == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        return Moments(count, mean, m2)

    def standardization(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and (population) std, floored, as float32."""
        std = np.maximum(np.sqrt(self.m2 / max(self.count, 1)), _STD_FLOOR)
        return self.mean.astype(np.float32), std.astype(np.float32)


def _group_moments(batches: Iterable[tuple[np.ndarray, np.ndarray]], groups: np.ndarray, num_groups: int) -> list[Moments]:
    """Moments of the rows of each group (`groups`: int [N], 0..num_groups-1), in one pass over ordered batches."""
    moments = [None] * num_groups
    position = 0
    for features, _ in batches:
        ids = groups[position : position + len(features)]
        position += len(features)
        for group in range(num_groups):
            part = Moments.of(features[ids == group])
            moments[group] = part if moments[group] is None else moments[group].combine(part)
    return [Moments.of(np.zeros((0, 1))) if part is None else part for part in moments]


def _identity_standardization(dim: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(dim, np.float32), np.ones(dim, np.float32)


# ------------------------------------------------------------------ linear classifier


@dataclasses.dataclass(frozen=True)
class LinearClassifier:
    """A trained linear classifier on standardised features: logits = ((x - mean) / std) W + b."""

    kernel: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def logits(self, features: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """float32 [N, num_classes] logits of `features` [N, d]."""
        outputs = [
            ((features[start : start + batch_size] - self.mean) / self.std) @ self.kernel + self.bias
            for start in range(0, len(features), batch_size)
        ]
        if not outputs:
            return np.zeros((0, self.kernel.shape[1]), np.float32)
        return np.concatenate(outputs, axis=0).astype(np.float32)


def standardization(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (floored) of the training features."""
    return Moments.of(features).standardization()


def _make_train_function(featurize: Callable[[tf.Tensor], tf.Tensor]):
    """The linear classifier's SGD over a batched dataset {"x", "label"} (all epochs).

    `featurize` maps a batch's "x" to features [B, d] (identity for cached features, the
    frozen encoder for images); it runs outside the gradient tape, so nothing flows back
    into the encoder. The classifier's state is passed in and returned (no variables), so
    one trace serves every fit with the same input and feature shapes.
    """

    @tf.function
    def run_epochs(batches, state, mean, std, l2, peak_rate, momentum, total_steps):
        kernel, bias, kernel_velocity, bias_velocity, step = state
        for batch in batches:
            features = (featurize(batch["x"]) - mean) / std
            labels = tf.cast(batch["label"], tf.int32)
            with tf.GradientTape() as tape:
                tape.watch([kernel, bias])
                logits = tf.matmul(features, kernel) + bias
                cross_entropy = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
                )
                loss = cross_entropy + l2 * tf.reduce_sum(tf.square(kernel))
            kernel_gradient, bias_gradient = tape.gradient(loss, [kernel, bias])
            rate = peak_rate * 0.5 * (1.0 + tf.cos(math.pi * step / total_steps))
            kernel_velocity = momentum * kernel_velocity + kernel_gradient
            bias_velocity = momentum * bias_velocity + bias_gradient
            kernel -= rate * (kernel_gradient + momentum * kernel_velocity)
            bias -= rate * (bias_gradient + momentum * bias_velocity)
            step += 1.0
        return kernel, bias, kernel_velocity, bias_velocity, step

    return run_epochs


_TRAIN_ON_FEATURES = _make_train_function(tf.identity)


def _fit_linear(
    make_batches: Callable[[int, int], tf.data.Dataset],
    run_epochs,
    *,
    dim: int,
    num_classes: int,
    num_examples: int,
    epochs: int,
    batch_size: int,
    base_learning_rate: float,
    l2: float,
    mean: np.ndarray,
    std: np.ndarray,
    momentum: float = _MOMENTUM,
) -> LinearClassifier:
    """Trains a linear classifier from zero weights, streaming its batches.

    Loss: mean softmax cross-entropy + l2 * ||W||^2 (the kernel only, not the bias).
    Optimiser: SGD with Nesterov momentum (PyTorch's form: v <- m v + g,
    w <- w - lr (g + m v)), learning rate base_learning_rate x batch / 256 decayed to 0
    over the run by a half cosine. The last batch of an epoch may be smaller.

    Args:
        make_batches: (epochs, batch size) -> the batched {"x", "label"} dataset of all
            epochs, each a full pass (its last batch may be smaller).
        run_epochs: from `_make_train_function`.
        dim, num_classes: shape of the kernel.
        num_examples: examples per epoch (sets the steps of the cosine schedule).
        mean, std: standardisation of the features, folded into the result.
    """
    if num_examples == 0:
        raise ValueError("linear classifier: no training examples")
    batch = min(batch_size, num_examples)
    total_steps = epochs * -(-num_examples // batch)
    state = (
        tf.zeros([dim, num_classes]),
        tf.zeros([num_classes]),
        tf.zeros([dim, num_classes]),
        tf.zeros([num_classes]),
        tf.constant(0.0),
    )
    settings = (
        tf.constant(mean, tf.float32),
        tf.constant(std, tf.float32),
        tf.constant(l2, tf.float32),
        tf.constant(base_learning_rate * batch / 256.0, tf.float32),
        tf.constant(momentum, tf.float32),
        tf.constant(float(total_steps), tf.float32),
    )
    state = run_epochs(make_batches(epochs, batch), state, *settings)
    return LinearClassifier(kernel=state[0].numpy(), bias=state[1].numpy(), mean=mean, std=std)


def _shuffled_feature_batches(features: _Features, mask: np.ndarray | None, num_examples: int, seed: int):
    """make_batches for cached features: a new order every epoch.

    A part that fits the shuffle budget is read into memory once and permuted whole every
    epoch (batches gathered by index, as cheap as an in-memory loop); a larger part streams
    from the file through a shuffle buffer of that budget.
    """
    if num_examples * features.dim <= _SHUFFLE_FEATURE_ELEMENTS:
        parts = list(features.batches(mask))
        values = tf.constant(np.concatenate([part[0] for part in parts]))
        labels = tf.constant(np.concatenate([part[1] for part in parts]))

        @_no_autograph
        def gather(indices):
            return {"x": tf.gather(values, indices), "label": tf.gather(labels, indices)}

        def make_batches(epochs: int, batch_size: int) -> tf.data.Dataset:
            @_no_autograph
            def one_epoch(epoch):
                key = tf.stack([tf.constant(seed, tf.int64), epoch])
                order = tf.random.experimental.stateless_shuffle(tf.range(num_examples, dtype=tf.int64), key)
                return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

            return tf.data.Dataset.range(epochs).flat_map(one_epoch).map(gather).prefetch(tf.data.AUTOTUNE)

        return make_batches

    buffer = max(1, _SHUFFLE_FEATURE_ELEMENTS // features.dim)
    examples = features.examples(mask)

    def make_batches(epochs: int, batch_size: int) -> tf.data.Dataset:
        # Batching before repeating keeps each epoch's last partial batch its own.
        shuffled = examples.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        return shuffled.batch(batch_size).repeat(epochs).prefetch(tf.data.AUTOTUNE)

    return make_batches


def train_linear_classifier(
    train_x: np.ndarray,
    train_y: np.ndarray,
    num_classes: int,
    l2: float,
    epochs: int,
    batch_size: int,
    base_learning_rate: float,
    seed: int = 0,
    *,
    momentum: float = _MOMENTUM,
    standardize: bool = True,
) -> LinearClassifier:
    """Trains a linear classifier on fixed in-memory features, as the transfer protocol does.

    The optimiser and loss are `_fit_linear`'s. Weights start at zero, so the result
    depends on the seed only through the shuffling order.

    Args:
        train_x: float [N, d] features.
        train_y: int [N] labels in [0, num_classes).
        num_classes: output classes.
        l2: weight of the squared L2 norm of the kernel.
        epochs: passes over the data.
        batch_size: examples per step.
        base_learning_rate: learning rate for a batch of 256.
        seed: shuffling seed.
        momentum: Nesterov momentum.
        standardize: standardise features with the training mean / std (see the module
            docstring); when False mean = 0 and std = 1.

    Returns:
        The classifier, with its standardisation folded in.
    """
    features = _Features.from_arrays(train_x, train_y)
    num = len(features.labels)
    if num == 0:
        raise ValueError("train_linear_classifier: no training examples")
    _check_label_range(features.labels, num_classes)
    mean, std = standardization(train_x) if standardize else _identity_standardization(features.dim)
    return _fit_linear(
        _shuffled_feature_batches(features, None, num, seed),
        _TRAIN_ON_FEATURES,
        dim=features.dim,
        num_classes=num_classes,
        num_examples=num,
        epochs=epochs,
        batch_size=batch_size,
        base_learning_rate=base_learning_rate,
        l2=l2,
        mean=mean,
        std=std,
        momentum=momentum,
    )


def _check_label_range(labels: np.ndarray, num_classes: int):
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")


def _top_k_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """Number of examples whose label is among the k largest logits (all of them if k >= classes)."""
    if k >= logits.shape[1]:
        return len(labels)
    # A label counts as in the top k when fewer than k classes score strictly higher.
    label_logits = np.take_along_axis(logits, labels[:, None].astype(np.int64), axis=1)
    higher = np.sum(logits > label_logits, axis=1)
    # NaN compares false with everything: without this a diverged classifier scores 100%.
    finite = np.all(np.isfinite(logits), axis=1)
    return int(np.sum((higher < k) & finite))


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of examples whose label is among the k largest logits.

    With k >= num_classes every label is in the top k, so the accuracy is 1.0 by
    definition (e.g. top-5 on a 2-class problem).
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    return _top_k_hits(logits, labels, k) / len(labels)


def _accuracies(classifier, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """Top-1 and top-5 of `classifier.logits` over (features, labels) batches."""
    return logit_accuracies((classifier.logits(features), labels) for features, labels in batches)


def logit_accuracies(batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """Top-1 and top-5 over (logits [B, classes], labels [B]) batches; NaN for no examples."""
    top1 = top5 = count = 0
    for logits, labels in batches:
        top1 += _top_k_hits(logits, labels, 1)
        top5 += _top_k_hits(logits, labels, 5)
        count += len(labels)
    if count == 0:
        return float("nan"), float("nan")
    return top1 / count, top5 / count


def validation_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of indices into (train, validation).

    Each class puts round(fraction x count) of its examples into validation, at least
    one when it has two or more, so every class is seen on both sides where possible.

    Returns:
        Sorted int64 index arrays (train_indices, validation_indices).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    validation = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(fraction * len(members)))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        else:
            count = 0
        validation.append(members[:count])
    validation = np.sort(np.concatenate(validation)).astype(np.int64)
    train = np.setdiff1d(np.arange(len(labels)), validation).astype(np.int64)
    return train, validation


def _validation_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True at the positions of the validation part carved from the training split."""
    _, validation = validation_split(labels, fraction, seed)
    if len(validation) == 0:
        raise ValueError("linear evaluation: the validation split is empty; add training examples")
    mask = np.zeros(len(labels), bool)
    mask[validation] = True
    return mask


def validation_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Stratified, seeded k-fold assignment: int64 [N], the fold (0..folds-1) of each example.

    Each class's examples, in a seeded random order, are dealt to the folds in turn,
    carrying on from the fold where the previous class stopped: fold sizes differ by at
    most one, and a class with at least `folds` examples is in every fold.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    assignment = np.zeros(len(labels), np.int64)
    start = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        assignment[members] = (start + np.arange(len(members))) % folds
        start = (start + len(members)) % folds
    return assignment


def _best(sweep: dict[float, float]) -> float:
    """The value with the best validation top-1; ties go to the earlier value of the sweep."""
    order = list(sweep)
    return max(order, key=lambda value: (sweep[value], -order.index(value)))


@dataclasses.dataclass(frozen=True)
class _Carve:
    """Where a sweep is scored: `folds` held-out parts of the training split.

    groups[i] is the held-out part of training example i: 0..folds-1, or `folds` for
    examples that are never held out (the rest of the split when folds is 1).
    """

    groups: np.ndarray  # int64 [N]
    folds: int

    @classmethod
    def of(cls, labels: np.ndarray, config: EvaluationConfig, seed: int) -> "_Carve":
        """One `validation_fraction` carve, or stratified k-fold when `validation_folds` > 1."""
        if config.validation_folds == 1:
            return cls(np.where(_validation_mask(labels, config.validation_fraction, seed), 0, 1), 1)
        if len(labels) < config.validation_folds:
            raise ValueError(
                f"linear evaluation: evaluation.validation_folds={config.validation_folds} needs at least "
                f"that many training examples, got {len(labels)}"
            )
        return cls(validation_folds(labels, config.validation_folds, seed), config.validation_folds)

    def held_out(self, fold: int) -> np.ndarray:
        return self.groups == fold

    @property
    def num_groups(self) -> int:
        """The folds, plus the never-held-out rest when there is one carve."""
        return self.folds + 1 if self.folds == 1 else self.folds

    @property
    def fold_sizes(self) -> np.ndarray:
        """int64 [folds]: how many examples each fold holds out."""
        return np.bincount(self.groups, minlength=self.num_groups)[: self.folds]

    @property
    def num_validation(self) -> int:
        return int(self.fold_sizes.sum())

    def standardizations(self, batches, dim: int) -> tuple[list, tuple[np.ndarray, np.ndarray]]:
        """(the standardisation of each fold's fitting part, the whole split's), from one
        pass over the split's feature batches; identities when `batches` is None."""
        if batches is None:
            identity = _identity_standardization(dim)
            return [identity] * self.folds, identity
        moments = _group_moments(batches, self.groups, self.num_groups)

        def union(parts):
            return functools.reduce(Moments.combine, parts)

        per_fold = [union([m for group, m in enumerate(moments) if group != fold]).standardization()
                    for fold in range(self.folds)]
        return per_fold, union(moments).standardization()

    def sweep(self, values, score: Callable[[float, int], float]) -> dict[float, float]:
        """Each value's top-1 pooled over the held-out parts; score(value, fold) is the
        top-1 on held-out part `fold` of a classifier fitted on the rest of the split."""
        sizes = self.fold_sizes
        result = {}
        for value in values:
            # top-1 x count is a whole number of hits: pooled, one fold gives its top-1 exactly.
            hits = sum(round(score(value, fold) * int(size)) for fold, size in enumerate(sizes))
            result[float(value)] = hits / int(sizes.sum())
        return result


def _row(*, top1, top5, val_top1, l2, learning_rate, swept, sweep, num_train, num_validation, num_test):
    return {
        "top1": top1,
        "top5": top5,
        "val_top1": val_top1,
        "l2": float(l2),
        "learning_rate": float(learning_rate),
        "swept": swept,
        "sweep": sweep,
        "num_train": int(num_train),
        "num_validation": int(num_validation),
        "num_test": int(num_test),
    }


# ------------------------------------------------------------------ transfer protocol


def _fit_features(
    train: _Features,
    mask: np.ndarray | None,
    num_classes: int,
    l2: float,
    config: EvaluationConfig,
    seed: int,
    standardization: tuple[np.ndarray, np.ndarray],
) -> LinearClassifier:
    """The transfer protocol's classifier on the cached features where `mask` is true."""
    num = len(train.labels) if mask is None else int(mask.sum())
    return _fit_linear(
        _shuffled_feature_batches(train, mask, num, seed),
        _TRAIN_ON_FEATURES,
        dim=train.dim,
        num_classes=num_classes,
        num_examples=num,
        epochs=config.linear_epochs,
        batch_size=config.linear_batch_size,
        base_learning_rate=config.linear_base_learning_rate,
        l2=l2,
        mean=standardization[0],
        std=standardization[1],
    )


def _transfer_linear(
    train: _Features, test: _Features, num_classes: int, config: EvaluationConfig, seed: int
) -> dict[str, Any]:
    """The transfer protocol on cached features: L2 swept on validation, refit, test."""
    carve = _Carve.of(train.labels, config, seed)
    fold_standardization, all_standardization = carve.standardizations(
        train.batches() if config.standardize else None, train.dim
    )

    def score(l2, fold):
        held_out = carve.held_out(fold)
        classifier = _fit_features(train, ~held_out, num_classes, l2, config, seed, fold_standardization[fold])
        top1 = _accuracies(classifier, train.batches(held_out))[0]
        logger.debug("transfer protocol: l2=%g fold %d validation top-1 %.4f", l2, fold, top1)
        return top1

    sweep = carve.sweep(config.l2_sweep, score)
    best_l2 = _best(sweep)
    classifier = _fit_features(train, None, num_classes, best_l2, config, seed, all_standardization)
    top1, top5 = _accuracies(classifier, test.batches())
    return _row(
        top1=top1,
        top5=top5,
        val_top1=sweep[best_l2],
        l2=best_l2,
        learning_rate=config.linear_base_learning_rate,
        swept="l2",
        sweep=sweep,
        num_train=len(train.labels),
        num_validation=carve.num_validation,
        num_test=len(test.labels),
    )


def linear_evaluation(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    config: EvaluationConfig,
    seed: int = 0,
) -> dict[str, Any]:
    """The transfer protocol on in-memory features (what `evaluate` runs on cached ones).

    For each L2 weight in `config.l2_sweep`, trains on the training split minus a
    stratified `config.validation_fraction` and scores top-1 on that validation part;
    the best weight (ties: the earlier one in the sweep) is retrained on the whole
    training split and scored on the test split. Test labels are used only for the
    final score. A single L2 value is still scored on the validation part.

    Args:
        train_x, train_y: training features [N, d] and labels [N].
        test_x, test_y: held-out features [M, d] and labels [M].
        num_classes: number of classes.
        config: epochs, batch size, learning rate, L2 sweep, validation fraction and
            whether to standardise.
        seed: seed of the validation split and of the shuffling.

    Returns:
        {"top1", "top5", "val_top1", "l2", "learning_rate", "swept", "sweep",
        "num_train", "num_validation", "num_test"}: swept is "l2" and sweep maps each L2
        weight to its validation top-1; top5 is 1.0 with fewer than 5 classes.
    """
    train = _Features.from_arrays(train_x, train_y)
    _check_label_range(train.labels, num_classes)
    return _transfer_linear(train, _Features.from_arrays(test_x, test_y), num_classes, config, seed)


# ------------------------------------------------------------------ imagenet protocol


def linear_view(config: EvaluationConfig) -> ViewConfig:
    """The imagenet protocol's training augmentation as a view: crop and flip, nothing else."""
    return ViewConfig(
        crop_scale=config.linear_crop_scale,
        crop_ratio=config.linear_crop_ratio,
        flip_prob=config.linear_flip_prob,
        color_jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
        solarize_prob=0.0,
    )


def linear_training_dataset(
    images: tf.data.Dataset,
    image_size: int,
    view: ViewConfig,
    batch_size: int,
    seed: int,
    *,
    epochs: int = 1,
    shuffle_buffer: int,
    num_parallel_calls: int = -1,
) -> tf.data.Dataset:
    """The imagenet protocol's training batches {"x": float32 [B, S, S, 3], "label"}, `epochs` passes.

    Every epoch re-reads `images`, shuffles them through a buffer of `shuffle_buffer`
    images and gives each a new random resized crop (`augment.random_resized_crop`, area
    `view.crop_scale`, aspect `view.crop_ratio`) to S x S and a horizontal flip with
    probability `view.flip_prob` (`augment.view_transform`). All randomness is keyed by
    (seed, epoch). An epoch's last partial batch is kept.

    Args:
        images: unbatched {"image": uint8 [H, W, C] (or float in [0, 1]), "label"}.
        image_size: S.
        view: from `linear_view` (its colour, blur and solarise parts are off).
        batch_size: images per batch.
        seed: seed of the shuffles and augmentations.
        epochs: passes over `images`.
        shuffle_buffer: images in the shuffle buffer.
        num_parallel_calls: parallelism of every map; -1 means tf.data.AUTOTUNE.
    """
    parallel = _parallel(num_parallel_calls)
    examples = images.map(
        _no_autograph(lambda example: {"image": example["image"], "label": tf.cast(example["label"], tf.int64)}),
        num_parallel_calls=parallel,
    )
    fixed_size = examples.element_spec["image"].shape.is_fully_defined()

    def crop(images, key):
        return augment.random_resized_crop(images, image_size, view.crop_scale, view.crop_ratio, key)

    def fold_in(key, data):
        return tf.random.experimental.stateless_fold_in(key, data)

    # The shuffle draws a new order each time an epoch re-reads it.
    shuffled = examples.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    crop_base, flip_base = tf.constant([seed, 1], tf.int64), tf.constant([seed, 2], tf.int64)

    @_no_autograph
    def one_epoch(epoch):
        crop_key, flip_key = fold_in(crop_base, epoch), fold_in(flip_base, epoch)

        @_no_autograph
        def crop_batch(batch, step):
            return {"x": crop(batch["image"], fold_in(crop_key, step)), "label": batch["label"]}

        @_no_autograph
        def crop_image(example, index):
            return {"x": crop(example["image"][None], fold_in(crop_key, index))[0], "label": example["label"]}

        @_no_autograph
        def flip_batch(batch, step):
            return {"x": augment.view_transform(batch["x"], view, fold_in(flip_key, step)), "label": batch["label"]}

        if fixed_size:
            crops = tf.data.Dataset.zip((shuffled.batch(batch_size), tf.data.Dataset.counter()))
            crops = crops.map(crop_batch, num_parallel_calls=parallel)
        else:
            # Images of different sizes: crop each (giving a common size), then batch.
            crops = tf.data.Dataset.zip((shuffled, tf.data.Dataset.counter()))
            crops = crops.map(crop_image, num_parallel_calls=parallel).batch(batch_size)
        return tf.data.Dataset.zip((crops, tf.data.Dataset.counter())).map(flip_batch, num_parallel_calls=parallel)

    options = tf.data.Options()
    options.deterministic = True
    batches = tf.data.Dataset.range(epochs).flat_map(one_epoch)
    return batches.with_options(options).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class _ImageSplits:
    """Image streams and their labels; `validation` is fine-tuning's carved part (the linear
    protocols carve their own, `_Carve`)."""

    train: tf.data.Dataset
    train_labels: np.ndarray
    test: tf.data.Dataset
    test_labels: np.ndarray
    validation: np.ndarray | None = None  # bool [N train]


def _fit_images(
    splits: _ImageSplits,
    mask: np.ndarray | None,
    run_epochs,
    dim: int,
    num_classes: int,
    base_learning_rate: float,
    config: Config,
    seed: int,
    standardization: tuple[np.ndarray, np.ndarray],
) -> LinearClassifier:
    """The imagenet protocol's classifier on freshly augmented crops of the images where `mask` is true."""
    evaluation = config.evaluation
    num = len(splits.train_labels) if mask is None else int(mask.sum())
    images = _select(splits.train, mask)
    view = linear_view(evaluation)

    def make_batches(epochs: int, batch_size: int) -> tf.data.Dataset:
        return linear_training_dataset(
            images,
            config.augment.image_size,
            view,
            batch_size,
            seed,
            epochs=epochs,
            shuffle_buffer=max(1, min(config.data.shuffle_buffer, num)),
            num_parallel_calls=config.data.num_parallel_calls,
        )

    return _fit_linear(
        make_batches,
        run_epochs,
        dim=dim,
        num_classes=num_classes,
        num_examples=num,
        epochs=evaluation.linear_epochs,
        batch_size=evaluation.linear_batch_size,
        base_learning_rate=base_learning_rate,
        l2=0.0,
        mean=standardization[0],
        std=standardization[1],
    )


def _imagenet_linear(
    encoder: keras.Model, splits: _ImageSplits, num_classes: int, config: Config, seed: int
) -> dict[str, Any]:
    """The imagenet protocol for one encoder: learning rate swept on validation, refit, test."""
    evaluation = config.evaluation
    featurize = _encoder_featurizer(encoder)
    centre_featurize = _compiled(featurize, config.augment.image_size)
    dim = _output_dim(encoder, config.augment.image_size)
    carve = _Carve.of(splits.train_labels, evaluation, seed)

    def centre_features(images, mask=None):
        return _centre_crop_features(
            _select(images, mask),
            centre_featurize,
            config.augment.image_size,
            evaluation.linear_batch_size,
            config.data.num_parallel_calls,
        )

    fold_standardization, all_standardization = carve.standardizations(
        centre_features(splits.train) if evaluation.standardize else None, dim
    )
    run_epochs = _make_train_function(featurize)

    def score(learning_rate, fold):
        held_out = carve.held_out(fold)
        classifier = _fit_images(
            splits, ~held_out, run_epochs, dim, num_classes, learning_rate, config, seed, fold_standardization[fold]
        )
        top1 = _accuracies(classifier, centre_features(splits.train, held_out))[0]
        logger.debug("imagenet protocol: learning rate %g fold %d validation top-1 %.4f", learning_rate, fold, top1)
        return top1

    sweep = carve.sweep(evaluation.learning_rate_sweep, score)
    best_rate = _best(sweep)
    classifier = _fit_images(
        splits, None, run_epochs, dim, num_classes, best_rate, config, seed, all_standardization
    )
    top1, top5 = _accuracies(classifier, centre_features(splits.test))
    row = _row(
        top1=top1,
        top5=top5,
        val_top1=sweep[best_rate],
        l2=0.0,
        learning_rate=best_rate,
        swept="learning_rate",
        sweep=sweep,
        num_train=len(splits.train_labels),
        num_validation=carve.num_validation,
        num_test=len(splits.test_labels),
    )
    row["knn_top1"] = None
    row["feature_dim"] = dim
    return row


# -------------------------------------------------------------------------------- kNN


def _knn_predictions(
    queries: tf.Tensor,
    bank_batches: Iterable[tuple[Any, Any]],
    num_classes: int,
    k: int,
    temperature: float,
) -> np.ndarray:
    """kNN predictions of one chunk of queries, the memory bank read batch by batch.

    The k most similar bank rows are kept as the bank streams past: top-k of the kept
    rows followed by the new batch. `tf.math.top_k` prefers the earlier of equal values,
    so ties go to the lower bank index, as a top-k over the whole similarity row would.
    """
    queries = losses.unit_rows(queries)
    rows = tf.shape(queries)[0]
    top_similarity = tf.fill(tf.stack([rows, k]), -np.inf)
    top_labels = tf.zeros(tf.stack([rows, k]), tf.int32)
    for bank, bank_labels in bank_batches:
        bank = losses.unit_rows(bank)
        similarity = tf.concat([top_similarity, tf.matmul(queries, bank, transpose_b=True)], axis=1)
        labels = tf.concat([top_labels, tf.tile(tf.cast(bank_labels, tf.int32)[None], tf.stack([rows, 1]))], axis=1)
        top_similarity, indices = tf.math.top_k(similarity, k=k)
        top_labels = tf.gather(labels, indices, batch_dims=1)
    # Shifting by the row's top similarity scales a row's votes by one constant (same
    # argmax) and keeps exp finite for any temperature.
    weights = tf.exp((top_similarity - top_similarity[:, :1]) / temperature)
    votes = tf.reduce_sum(tf.one_hot(top_labels, num_classes) * weights[..., None], axis=1)
    return tf.argmax(votes, axis=1, output_type=tf.int32).numpy()


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Weighted k-nearest-neighbour predictions with cosine similarity (Wu et al. 2018).

    Features are L2-normalised; each test example's k most similar training examples
    (k is capped at the number of training examples) add exp(similarity / temperature)
    to their class's score; the prediction is the class with the highest score (ties:
    the lowest class index). The similarity matrix is computed `chunk_size` test rows at
    a time so memory stays bounded.

    Args:
        train_x, train_y: memory bank features [N, d] and labels [N].
        test_x: query features [M, d].
        num_classes: number of classes.
        k: neighbours.
        temperature: temperature of the vote weights.
        chunk_size: test rows per similarity chunk; default keeps a chunk at 2^26 floats.

    Returns:
        int32 [M] predicted classes.
    """
    if len(train_y) == 0:
        raise ValueError("knn: empty memory bank")
    bank = [(np.asarray(train_x, np.float32), np.asarray(train_y, np.int32))]
    queries = np.asarray(test_x, np.float32)
    k = min(k, len(train_y))
    chunk_size = chunk_size or max(1, _KNN_CHUNK_ELEMENTS // len(train_y))
    predictions = [np.zeros([0], np.int32)]
    for start in range(0, len(queries), chunk_size):
        predictions.append(_knn_predictions(queries[start : start + chunk_size], bank, num_classes, k, temperature))
    return np.concatenate(predictions)


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int | None = None,
) -> float:
    """Top-1 accuracy of `knn_predict` (same arguments) against `test_y`; NaN without queries."""
    if len(test_y) == 0:
        return float("nan")
    predictions = knn_predict(train_x, train_y, test_x, num_classes, k, temperature, chunk_size)
    return float(np.mean(predictions == np.asarray(test_y)))


def _streaming_knn_accuracy(
    train: _Features, test: _Features, num_classes: int, k: int, temperature: float
) -> float:
    """`knn_accuracy` on cached features: one pass over the bank per chunk of queries."""
    k = min(k, len(train.labels))
    bank_rows = max(k, _KNN_CHUNK_ELEMENTS // _KNN_QUERY_ROWS)
    correct = count = 0
    for queries, labels in test.batches(batch_size=_KNN_QUERY_ROWS):
        predictions = _knn_predictions(queries, train.batches(batch_size=bank_rows), num_classes, k, temperature)
        correct += int(np.sum(predictions == labels))
        count += len(labels)
    return correct / count if count else float("nan")


# ---------------------------------------------------------------------------- reports


@dataclasses.dataclass
class EvaluationReport:
    """Linear (and kNN) accuracy of each evaluated representation.

    Attributes:
        rows: name ("byol", "random_init", "raw_pixels") -> {"top1", "top5" (held-out
            split), "val_top1" (validation part, chosen setting), "l2", "learning_rate"
            (the chosen or fixed settings of the final classifier), "swept" ("l2" or
            "learning_rate"), "sweep" (swept value -> validation top-1), "num_train",
            "num_validation", "num_test", "knn_top1" (None for imagenet), "feature_dim",
            "seconds"}.
        num_classes: classes of the labelled data.
        num_train: training (memory bank / classifier training) examples.
        num_test: held-out examples the accuracies are measured on.
        protocol: "transfer" or "imagenet".
    """

    rows: dict[str, dict[str, Any]]
    num_classes: int
    num_train: int
    num_test: int
    protocol: str

    def format_table(self) -> str:
        """Plain-text table, one row per representation, accuracies in percent."""
        header = (
            f"{'representation':<14} {'top-1':>7} {'top-5':>7} {'val':>7} {'kNN':>7} "
            f"{'l2':>8} {'lr':>8} {'dim':>6}"
        )
        lines = [
            f"linear evaluation ({self.protocol} protocol): {self.num_train} train / {self.num_test} test "
            f"images, {self.num_classes} classes; val = top-1 on the validation part of train",
            header,
            "-" * len(header),
        ]

        def percent(value):
            return f"{100 * value:7.2f}" if value is not None else f"{'-':>7}"

        for name, row in self.rows.items():
            lines.append(
                f"{name:<14} {percent(row['top1'])} {percent(row['top5'])} {percent(row['val_top1'])} "
                f"{percent(row.get('knn_top1'))} {row['l2']:8.1g} {row['learning_rate']:8.3g} "
                f"{row['feature_dim']:6d}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (sweep keys as strings)."""
        rows = {name: json_row(row) for name, row in self.rows.items()}
        return {
            "protocol": self.protocol,
            "num_classes": self.num_classes,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "rows": rows,
        }


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A copy of a report row with its sweep's keys (floats) as repr strings, for JSON."""
    row = dict(row)
    row["sweep"] = {repr(value): accuracy for value, accuracy in row.get("sweep", {}).items()}
    return row


def _input_splits(
    config: Config, datasets: Sequence[tf.data.Dataset] | None, arrays: Sequence[np.ndarray] | None
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    if datasets is not None and arrays is not None:
        raise ValueError("evaluate: pass datasets or arrays, not both")
    if datasets is not None:
        train, test = datasets
        return train, test
    if arrays is not None:
        train_images, train_labels, test_images, test_labels = arrays

        def dataset(images, labels):
            labels = np.asarray(labels).astype(np.int64).reshape(-1)
            return tf.data.Dataset.from_tensor_slices({"image": np.asarray(images), "label": labels})

        return dataset(train_images, train_labels), dataset(test_images, test_labels)
    return data.load_split(config.data, "train"), data.load_split(config.data, "test")


def _resolve_num_classes(num_classes, config: Config, train_labels, test_labels) -> int:
    num_classes = num_classes or config.data.num_classes or int(max(train_labels.max(), test_labels.max()) + 1)
    _check_label_range(train_labels, num_classes)
    _check_label_range(test_labels, num_classes)
    return num_classes


def _random_init_encoder(config: Config, seed: int) -> keras.Model:
    from byol_tf import networks

    # A fresh seed: the random-init baseline must not share the BYOL run's initial weights.
    keras.utils.set_random_seed(seed + 1)
    return networks.build_encoder(config.network, config.augment.image_size)


def _evaluate_transfer(encoder, config, train_images, test_images, baselines, num_classes, seed, progress, work_dir):
    evaluation = config.evaluation
    image_size = config.augment.image_size
    representations = [(BYOL, lambda: (_encoder_featurizer(encoder), image_size))]
    if baselines:
        representations.append(
            (RANDOM_INIT, lambda: (_encoder_featurizer(_random_init_encoder(config, seed)), image_size))
        )
        representations.append((RAW_PIXELS, lambda: (_flatten, min(image_size, RAW_PIXELS_MAX_SIZE))))
    scratch = tempfile.mkdtemp(prefix="byol_tf_eval-", dir=work_dir)
    rows, train = {}, None
    try:
        for name, make in representations:
            started = time.perf_counter()
            featurize, size = make()
            featurize = _compiled(featurize, size)
            if progress:
                print(f"{name}: features of centre crops, train then test split")
            splits = {}
            for split, images in (("train", train_images), ("test", test_images)):
                batches = _centre_crop_features(
                    images, featurize, size, evaluation.linear_batch_size, config.data.num_parallel_calls
                )
                path = os.path.join(scratch, f"{name}-{split}.tfrecord")
                splits[split] = _write_features(batches, path, split)
            train, test = splits["train"], splits["test"]
            num_classes = _resolve_num_classes(num_classes, config, train.labels, test.labels)
            row = _transfer_linear(train, test, num_classes, evaluation, seed)
            row["knn_top1"] = _streaming_knn_accuracy(
                train, test, num_classes, evaluation.knn_k, evaluation.knn_temperature
            )
            row["feature_dim"] = train.dim
            row["seconds"] = round(time.perf_counter() - started, 2)
            _log_row(name, row)
            rows[name] = row
            for split in splits:
                os.remove(os.path.join(scratch, f"{name}-{split}.tfrecord"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows, num_classes, len(train.labels), len(test.labels)


def _evaluate_imagenet(encoder, config, train_images, test_images, baselines, num_classes, seed, progress):
    if progress:
        print("imagenet protocol: reading the labels of the train and test splits")
    train_labels = _read_labels(train_images, "train")
    test_labels = _read_labels(test_images, "test")
    num_classes = _resolve_num_classes(num_classes, config, train_labels, test_labels)
    splits = _ImageSplits(
        train=train_images,
        train_labels=train_labels,
        test=test_images,
        test_labels=test_labels,
    )
    encoders = [(BYOL, lambda: encoder)]
    if baselines:
        encoders.append((RANDOM_INIT, lambda: _random_init_encoder(config, seed)))
    rows = {}
    for name, make in encoders:
        started = time.perf_counter()
        if progress:
            print(f"{name}: linear classifier on augmented crops, {len(config.evaluation.learning_rate_sweep)} "
                  f"learning rate(s) x {config.evaluation.linear_epochs} epochs, then a refit")
        row = _imagenet_linear(make(), splits, num_classes, config, seed)
        row["seconds"] = round(time.perf_counter() - started, 2)
        _log_row(name, row)
        rows[name] = row
    return rows, num_classes, len(train_labels), len(test_labels)


def _log_row(name, row):
    knn = row.get("knn_top1")
    logger.info(
        "%s: linear top-1 %.4f top-5 %.4f val top-1 %.4f (l2=%g lr=%g), kNN top-1 %s, %.1f s",
        name, row["top1"], row["top5"], row["val_top1"], row["l2"], row["learning_rate"],
        "-" if knn is None else f"{knn:.4f}", row["seconds"],
    )


def evaluate(
    encoder: keras.Model,
    config: Config,
    *,
    baselines: bool | None = None,
    datasets: Sequence[tf.data.Dataset] | None = None,
    arrays: Sequence[np.ndarray] | None = None,
    num_classes: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    work_dir: str | None = None,
) -> EvaluationReport:
    """Linear evaluation of `encoder` by `config.evaluation.protocol`, optionally with baselines.

    Images stream from `tf.data`; no split of images is held in memory (module docstring).

    Args:
        encoder: the frozen encoder (float32 [B, S, S, 3] in [0, 1] -> [B, d]).
        config: the experiment; `evaluation` sets the protocol, `data` the images
            (`data.load_split(config.data, "train" / "test")`) and the shuffle buffer /
            parallelism of the imagenet protocol's input, `network` and
            `augment.image_size` the random-init baseline.
        baselines: add the "random_init" row and, for the transfer protocol, the
            "raw_pixels" row; default `config.evaluation.baselines`.
        datasets: (train, test) unbatched `tf.data.Dataset`s of {"image": uint8
            [H, W, C], "label": int}, each finite and in the same order on every pass,
            to use instead of `config.data` (e.g. a TFX component's examples).
        arrays: (train_images, train_labels, test_images, test_labels) numpy arrays, a
            convenience for in-memory data; not with `datasets`.
        num_classes: default `config.data.num_classes`, else max label + 1.
        seed: of the validation split, shuffling, augmentation and the random-init
            encoder's weights; default `config.train.seed`. The global random seed is set
            to it (and to seed + 1 before building the random-init encoder).
        progress: print what is being computed.
        work_dir: local folder for the transfer protocol's feature files (a temporary
            folder inside it, removed at the end); default the system's temp folder.

    Returns:
        The report, rows in the order byol, random_init, raw_pixels.

    Raises:
        NoLabelsError: the data has no labels.
        ValueError: a split is empty, labels exceed `num_classes`, or the validation
            part would be empty.
    """
    baselines = config.evaluation.baselines if baselines is None else baselines
    seed = config.train.seed if seed is None else seed
    train_images, test_images = _input_splits(config, datasets, arrays)
    keras.utils.set_random_seed(seed)
    protocol = config.evaluation.protocol
    if protocol == IMAGENET:
        rows, num_classes, num_train, num_test = _evaluate_imagenet(
            encoder, config, train_images, test_images, baselines, num_classes, seed, progress
        )
    elif protocol == TRANSFER:
        rows, num_classes, num_train, num_test = _evaluate_transfer(
            encoder, config, train_images, test_images, baselines, num_classes, seed, progress, work_dir
        )
    else:
        raise ValueError(f"evaluation.protocol: {protocol!r} is not one of {TRANSFER!r}, {IMAGENET!r}")
    return EvaluationReport(
        rows=rows, num_classes=num_classes, num_train=num_train, num_test=num_test, protocol=protocol
    )
