"""Evaluation of a frozen encoder: the linear protocol, kNN accuracy and baselines.

Linear evaluation (Grill et al. 2020, Sec. 4.1 / App. C.1): representations of centre
crops (no augmentation) are extracted once from the frozen encoder and cached; a linear
classifier is trained on them with SGD + Nesterov momentum 0.9 and a cosine learning
rate, for each L2 weight of a small sweep on a validation split carved from the training
images; the best L2 by validation top-1 is retrained on the whole training split and
top-1 / top-5 are reported on the held-out split. The test split never chooses anything.

Deviation from the reference, stated: features are standardised with the training
split's per-dimension mean and std before the linear layer (the reference feeds raw
representations). This is the BatchNorm-without-affine head of MAE / MoCo v3 linear
probing folded into the data; it makes one learning rate fit encoders whose features
differ in scale by orders of magnitude (a trained net, a random-init net, raw pixels),
so the three rows of a report are compared under the same optimiser settings.

kNN accuracy (Wu et al. 2018, InstDisc): cosine similarity between L2-normalised
features, the k most similar training examples vote for their class with weight
exp(similarity / temperature).

`evaluate` runs the protocol for the given encoder and, as baselines, a randomly
initialised encoder of the same architecture and the raw pixels, so a report says what
pretraining added.
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from byol_tf import augment
from byol_tf.config import Config, EvaluationConfig

# Raw-pixel features are centre crops resized to at most this side: at ImageNet's 224 px
# a linear layer on 150k pixel features is neither feasible nor a meaningful baseline.
RAW_PIXELS_MAX_SIZE = 32
# Standardisation floor: dimensions that are constant on the training split (dead ReLU
# units, black image borders) stay constant (0) instead of dividing by zero.
_STD_FLOOR = 1e-6
# Elements of one chunk of the kNN similarity matrix (float32: 256 MiB).
_KNN_CHUNK_ELEMENTS = 1 << 26

BYOL, RANDOM_INIT, RAW_PIXELS = "byol", "random_init", "raw_pixels"


class NoLabelsError(ValueError):
    """The evaluation data carries no labels (label -1), so there is nothing to evaluate."""


# ----------------------------------------------------------------------------- features

# One compiled feature function per (encoder, input shape, dtype); weak keys so a dropped
# encoder is not kept alive by the cache (the kNN monitor calls this every N epochs).
_FEATURE_FUNCTIONS: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()


def _feature_function(encoder: keras.Model, image_shape: tuple, dtype, image_size: int):
    functions = _FEATURE_FUNCTIONS.setdefault(encoder, {})
    key = (tuple(image_shape), tf.as_dtype(dtype).name, image_size)
    if key not in functions:

        @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], dtype)])
        def features(images):
            representation = encoder(augment.center_crop_resize(images, image_size), training=False)
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
    """Representations of the centre crops of `images` under the frozen encoder.

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
    features = np.asarray(features, np.float64)
    mean = features.mean(axis=0)
    std = np.maximum(features.std(axis=0), _STD_FLOOR)
    return mean.astype(np.float32), std.astype(np.float32)


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
    momentum: float = 0.9,
    standardize: bool = True,
) -> LinearClassifier:
    """Trains a linear classifier on fixed features, as the linear evaluation protocol.

    Loss: mean softmax cross-entropy + l2 * ||W||^2 (the kernel only, not the bias).
    Optimiser: SGD with Nesterov momentum (PyTorch's form: v <- m v + g,
    w <- w - lr (g + m v)), learning rate base_learning_rate x batch_size / 256 decayed
    to 0 over the run by a half cosine. Weights start at zero, so the result depends on
    the seed only through the shuffling order. The last batch of an epoch may be smaller.

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
    train_x = np.asarray(train_x, np.float32)
    train_y = np.asarray(train_y, np.int64)
    num, dim = train_x.shape
    if num == 0:
        raise ValueError("train_linear_classifier: no training examples")
    if train_y.min() < 0 or train_y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{train_y.min()}, {train_y.max()}]")
    if standardize:
        mean, std = standardization(train_x)
    else:
        mean, std = np.zeros(dim, np.float32), np.ones(dim, np.float32)

    kernel, bias = _fit_linear(
        tf.constant((train_x - mean) / std),
        tf.constant(train_y.astype(np.int32)),
        tf.constant(num_classes, tf.int32),
        tf.constant(l2, tf.float32),
        tf.constant(epochs, tf.int32),
        tf.constant(min(batch_size, num), tf.int32),
        tf.constant(base_learning_rate * min(batch_size, num) / 256.0, tf.float32),
        tf.constant(momentum, tf.float32),
        tf.constant([seed, 0], tf.int32),
    )
    return LinearClassifier(kernel=kernel.numpy(), bias=bias.numpy(), mean=mean, std=std)


# One trace serves every fit (feature sizes, class counts and settings are tensors), so a
# sweep over L2 weights and three report rows compile the loop once.
@tf.function(
    input_signature=[
        tf.TensorSpec([None, None], tf.float32),  # standardised features
        tf.TensorSpec([None], tf.int32),  # labels
        tf.TensorSpec([], tf.int32),  # num_classes
        tf.TensorSpec([], tf.float32),  # l2
        tf.TensorSpec([], tf.int32),  # epochs
        tf.TensorSpec([], tf.int32),  # batch_size
        tf.TensorSpec([], tf.float32),  # peak learning rate
        tf.TensorSpec([], tf.float32),  # momentum
        tf.TensorSpec([2], tf.int32),  # shuffling seed
    ]
)
def _fit_linear(features, labels, num_classes, l2, epochs, batch_size, learning_rate, momentum, seed):
    num = tf.shape(features)[0]
    steps_per_epoch = (num + batch_size - 1) // batch_size
    total_steps = tf.cast(epochs * steps_per_epoch, tf.float32)
    kernel = tf.zeros(tf.stack([tf.shape(features)[1], num_classes]))
    bias = tf.zeros(tf.reshape(num_classes, [1]))
    kernel_velocity, bias_velocity = tf.zeros_like(kernel), tf.zeros_like(bias)
    step = tf.constant(0.0)
    for epoch in tf.range(epochs):
        permutation = tf.random.experimental.stateless_shuffle(tf.range(num), seed=seed + tf.stack([0, epoch]))
        for index in tf.range(steps_per_epoch):
            batch = permutation[index * batch_size : (index + 1) * batch_size]
            x, y = tf.gather(features, batch), tf.gather(labels, batch)
            with tf.GradientTape() as tape:
                tape.watch([kernel, bias])
                logits = tf.matmul(x, kernel) + bias
                cross_entropy = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
                loss = cross_entropy + l2 * tf.reduce_sum(tf.square(kernel))
            kernel_gradient, bias_gradient = tape.gradient(loss, [kernel, bias])
            rate = learning_rate * 0.5 * (1.0 + tf.cos(math.pi * step / total_steps))
            kernel_velocity = momentum * kernel_velocity + kernel_gradient
            bias_velocity = momentum * bias_velocity + bias_gradient
            kernel -= rate * (kernel_gradient + momentum * kernel_velocity)
            bias -= rate * (bias_gradient + momentum * bias_velocity)
            step += 1.0
    return kernel, bias



def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of examples whose label is among the k largest logits.

    With k >= num_classes every label is in the top k, so the accuracy is 1.0 by
    definition (e.g. top-5 on a 2-class problem).
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    if k >= logits.shape[1]:
        return 1.0
    # A label counts as in the top k when fewer than k classes score strictly higher.
    label_logits = np.take_along_axis(logits, labels[:, None].astype(np.int64), axis=1)
    higher = np.sum(logits > label_logits, axis=1)
    # NaN compares false with everything: without this a diverged classifier scores 100%.
    finite = np.all(np.isfinite(logits), axis=1)
    return float(np.mean((higher < k) & finite))


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


def linear_evaluation(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    config: EvaluationConfig,
    seed: int = 0,
) -> dict[str, Any]:
    """The linear evaluation protocol on cached features.

    For each L2 weight in `config.l2_sweep`, trains on the training split minus a
    stratified `config.validation_fraction` and scores top-1 on that validation part;
    the best weight (ties: the earlier one in the sweep) is retrained on the whole
    training split and scored on the test split. Test labels are used only for the
    final score. With a single L2 value there is nothing to choose: no sweep is run and
    `val_top1` is None.

    Args:
        train_x, train_y: training features [N, d] and labels [N].
        test_x, test_y: held-out features [M, d] and labels [M].
        num_classes: number of classes.
        config: epochs, batch size, learning rate, L2 sweep and validation fraction.
        seed: seed of the validation split and of the shuffling.

    Returns:
        {"top1", "top5", "l2", "val_top1", "num_train", "num_test", "sweep"} where
        sweep maps each L2 weight to its validation top-1; top5 is 1.0 with fewer than
        5 classes.
    """
    train_y = np.asarray(train_y)
    test_y = np.asarray(test_y)

    def fit(x, y, l2):
        return train_linear_classifier(
            x,
            y,
            num_classes,
            l2=l2,
            epochs=config.linear_epochs,
            batch_size=config.linear_batch_size,
            base_learning_rate=config.linear_base_learning_rate,
            seed=seed,
        )

    sweep = {}
    if len(config.l2_sweep) > 1:
        fit_indices, val_indices = validation_split(train_y, config.validation_fraction, seed)
        if len(val_indices) == 0:
            raise ValueError("linear_evaluation: the validation split is empty; add training examples")
        for l2 in config.l2_sweep:
            classifier = fit(train_x[fit_indices], train_y[fit_indices], l2)
            sweep[float(l2)] = top_k_accuracy(classifier.logits(train_x[val_indices]), train_y[val_indices], 1)
            logging.info("linear evaluation: l2=%g validation top-1 %.4f", l2, sweep[float(l2)])
        best_l2 = max(sweep, key=lambda l2: (sweep[l2], -list(sweep).index(l2)))
    else:
        best_l2 = float(config.l2_sweep[0])

    classifier = fit(train_x, train_y, best_l2)
    logits = classifier.logits(test_x)
    return {
        "top1": top_k_accuracy(logits, test_y, 1),
        "top5": top_k_accuracy(logits, test_y, 5),
        "l2": best_l2,
        "val_top1": sweep.get(best_l2),
        "num_train": int(len(train_y)),
        "num_test": int(len(test_y)),
        "sweep": sweep,
    }


# -------------------------------------------------------------------------------- kNN


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
    bank = tf.math.l2_normalize(tf.constant(np.asarray(train_x, np.float32)), axis=1)
    bank_labels = tf.one_hot(np.asarray(train_y, np.int32), num_classes)
    queries = tf.math.l2_normalize(tf.constant(np.asarray(test_x, np.float32)), axis=1)
    k = min(k, len(train_y))
    chunk_size = chunk_size or max(1, _KNN_CHUNK_ELEMENTS // len(train_y))
    predictions = [np.zeros([0], np.int32)]
    for start in range(0, queries.shape[0], chunk_size):
        similarity = tf.matmul(queries[start : start + chunk_size], bank, transpose_b=True)
        top_similarity, top_indices = tf.math.top_k(similarity, k=k)
        # Shifting by the row's top similarity scales a row's votes by one constant (same
        # argmax) and keeps exp finite for any temperature.
        weights = tf.exp((top_similarity - top_similarity[:, :1]) / temperature)
        votes = tf.reduce_sum(tf.gather(bank_labels, top_indices) * weights[..., None], axis=1)
        predictions.append(tf.argmax(votes, axis=1, output_type=tf.int32).numpy())
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


# ---------------------------------------------------------------------------- reports


@dataclasses.dataclass
class EvaluationReport:
    """Linear (and kNN) accuracy of each evaluated representation.

    Attributes:
        rows: name ("byol", "random_init", "raw_pixels") -> linear_evaluation's dict plus
            "knn_top1", "feature_dim" and "seconds" (feature extraction + fits).
        num_classes: classes of the labelled data.
        num_train: training (memory bank / classifier training) examples.
        num_test: held-out examples the accuracies are measured on.
    """

    rows: dict[str, dict[str, Any]]
    num_classes: int
    num_train: int
    num_test: int

    def format_table(self) -> str:
        """Plain-text table, one row per representation, accuracies in percent."""
        header = f"{'representation':<14} {'top-1':>7} {'top-5':>7} {'kNN':>7} {'l2':>8} {'dim':>6}"
        lines = [
            f"linear evaluation: {self.num_train} train / {self.num_test} test images, {self.num_classes} classes",
            header,
            "-" * len(header),
        ]
        for name, row in self.rows.items():
            knn = row.get("knn_top1")
            knn_text = f"{100 * knn:7.2f}" if knn is not None else f"{'-':>7}"
            lines.append(
                f"{name:<14} {100 * row['top1']:7.2f} {100 * row['top5']:7.2f} {knn_text} "
                f"{row['l2']:8.1g} {row['feature_dim']:6d}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (L2 sweep keys as strings)."""
        rows = {}
        for name, row in self.rows.items():
            row = dict(row)
            row["sweep"] = {repr(l2): accuracy for l2, accuracy in row.get("sweep", {}).items()}
            rows[name] = row
        return {
            "num_classes": self.num_classes,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "rows": rows,
        }


def _evaluate_features(name, train_x, train_y, test_x, test_y, num_classes, config, seed, started):
    row = linear_evaluation(train_x, train_y, test_x, test_y, num_classes, config, seed=seed)
    row["knn_top1"] = knn_accuracy(
        train_x, train_y, test_x, test_y, num_classes, k=config.knn_k, temperature=config.knn_temperature
    )
    row["feature_dim"] = int(train_x.shape[1])
    row["seconds"] = round(time.perf_counter() - started, 2)
    logging.info(
        "%s: linear top-1 %.4f top-5 %.4f (l2=%g), kNN top-1 %.4f, %.1f s",
        name, row["top1"], row["top5"], row["l2"], row["knn_top1"], row["seconds"],
    )
    return row


def _check_labels(labels: np.ndarray, split: str):
    if len(labels) == 0:
        raise ValueError(f"evaluation: the {split!r} split is empty")
    if np.any(np.asarray(labels) < 0):
        raise NoLabelsError(f"evaluation: the {split!r} split has unlabelled images (label -1)")


def evaluate(
    encoder: keras.Model,
    config: Config,
    *,
    baselines: bool | None = None,
    arrays: Sequence[np.ndarray] | None = None,
    num_classes: int | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Linear evaluation of `encoder` and, optionally, of the two baselines.

    Args:
        encoder: the frozen encoder (float32 [B, S, S, 3] in [0, 1] -> [B, d]).
        config: the experiment; `evaluation` sets the protocol, `data` the images
            (`data.load_arrays(config.data, "train" / "test")`), `network` and
            `augment.image_size` the random-init baseline.
        baselines: add the "random_init" and "raw_pixels" rows; default
            `config.evaluation.baselines`.
        arrays: (train_images, train_labels, test_images, test_labels) to use instead
            of loading `config.data` (e.g. a TFX component's examples).
        num_classes: default `config.data.num_classes`, else max label + 1.
        seed: of the validation split, shuffling and the random-init encoder's
            weights; default `config.train.seed`.
        progress: show feature-extraction progress bars.

    Returns:
        The report, rows in the order byol, random_init, raw_pixels.

    Raises:
        NoLabelsError: the data has no labels.
    """
    baselines = config.evaluation.baselines if baselines is None else baselines
    seed = config.train.seed if seed is None else seed
    if arrays is None:
        from byol_tf import data  # the data layer is needed only when loading from the config

        # Loaded at the encoder's input size: images of mixed sizes become one array, and
        # large images take S x S memory. The later centre crop of an S x S image is the
        # identity, so features differ from the serving path only by uint8 rounding.
        train_images, train_labels = data.load_arrays(config.data, "train", config.augment.image_size)
        test_images, test_labels = data.load_arrays(config.data, "test", config.augment.image_size)
    else:
        train_images, train_labels, test_images, test_labels = arrays
    train_labels = np.asarray(train_labels).astype(np.int64).reshape(-1)
    test_labels = np.asarray(test_labels).astype(np.int64).reshape(-1)
    _check_labels(train_labels, "train")
    _check_labels(test_labels, "test")
    num_classes = num_classes or config.data.num_classes or int(max(train_labels.max(), test_labels.max()) + 1)
    image_size = config.augment.image_size
    batch_size = config.evaluation.linear_batch_size
    common = dict(
        train_y=train_labels, test_y=test_labels, num_classes=num_classes, config=config.evaluation, seed=seed
    )

    def encoder_row(name, model):
        started = time.perf_counter()
        if progress:  # a heading for the two progress bars that follow
            print(f"{name}: features of {len(train_labels)} train + {len(test_labels)} test images")
        train_x = extract_features(model, train_images, image_size, batch_size, progress)
        test_x = extract_features(model, test_images, image_size, batch_size, progress)
        return _evaluate_features(name, train_x, test_x=test_x, started=started, **common)

    rows = {BYOL: encoder_row(BYOL, encoder)}
    if baselines:
        from byol_tf import networks

        # A fresh seed: the random-init baseline must not share the BYOL run's initial weights.
        keras.utils.set_random_seed(seed + 1)
        rows[RANDOM_INIT] = encoder_row(RANDOM_INIT, networks.build_encoder(config.network, image_size))
        started = time.perf_counter()
        rows[RAW_PIXELS] = _evaluate_features(
            RAW_PIXELS,
            pixel_features(train_images, image_size),
            test_x=pixel_features(test_images, image_size),
            started=started,
            **common,
        )
    return EvaluationReport(
        rows=rows, num_classes=num_classes, num_train=len(train_labels), num_test=len(test_labels)
    )
