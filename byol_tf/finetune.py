"""Fine-tuning on a fraction of the labels: the semi-supervised protocol (paper Sec. 4.2, Table 2).

The encoder and a new linear head train end to end on a small labelled subset of the
training split, then the pair is scored on the held-out split; the same procedure runs
from a random-init encoder of the same architecture, so a report says what pretraining
bought at each label budget.

The subset (`finetuning_split`): a validation part is carved from the training split
first (`evaluation.validation_split`: `evaluation.validation_fraction` of each class,
seeded; the same part the linear protocols hold out), and the labelled subset is drawn
from the rest, class-balanced and seeded (`data.balanced_indices`): round(fraction x N)
images for the N training images, at least one per class, at most all images outside the
validation part (so fraction 1.0 is every training image but the validation part). The
subsets of one seed are nested (the 1% subset lies inside the 10% one), and both encoders
fine-tune on the same images.

Why the validation part comes from the rest of train and not from the labelled subset: at
1% a part carved from the subset would hold about one image per class, too few to rank
learning rates, and would take those images from training; the paper, too, chose its
fine-tuning settings on a labelled hold-out of the training split (App. C.2). Its labels
choose the learning rate only: no weight ever trains on them. The held-out split never
chooses anything.

Training (`fine_tune`, App. C.2): a copy of the encoder (trainable, BatchNorm in training
mode on each batch) under a zero-initialised linear head; softmax cross-entropy; SGD with
Nesterov momentum 0.9, no weight decay, a cosine decay of the learning rate (base rate x
batch / 256) to zero over the run; each epoch a new random resized crop and horizontal
flip of every labelled image (`evaluation.linear_training_dataset`: the imagenet linear
protocol's augmentation and its settings `linear_crop_scale`, `linear_crop_ratio`,
`linear_flip_prob`). For every learning rate of `finetune_learning_rates` one run;
validation top-1 of centre crops (`augment.center_crop_resize`, encoder in inference
mode) picks the best (ties: the earlier rate), and that very model is scored on the
held-out split's centre crops: no refit, so the labelled budget stays the subset.

Deviations: one number of epochs (`finetune_epochs`) where the paper also sweeps it;
bilinear rather than bicubic resampling, as everywhere in this library.

Images stream from `tf.data`: the labelled subset, the validation part and the held-out
split are read as masked passes over the splits, never held in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from byol_tf import data, distribute, evaluation
from byol_tf.config import FINETUNE_PROTOCOL, Config, ViewConfig

logger = logging.getLogger(__name__)

HEAD_NAME = "finetune_head"
_MOMENTUM = 0.9


def labelled_count(num_train: int, fraction: float, num_classes: int) -> int:
    """round(fraction x num_train) (halves up), at least `num_classes`: one image per class."""
    return max(int(math.floor(fraction * num_train + 0.5)), num_classes)


def _check_fraction(fraction: float):
    # Checked before any image is read: a bad fraction fails in a second.
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction: {fraction!r} is outside the allowed range (0.0, 1.0]")


def finetuning_split(
    labels: np.ndarray, fraction: float, validation_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The labelled subset and the validation part of a training split (module docstring).

    Args:
        labels: int [N] labels of the training split, in its order.
        fraction: label fraction in (0, 1].
        validation_fraction: of each class, carved first (`evaluation.validation_split`).
        seed: of the validation part and of the subset.

    Returns:
        Sorted int64 positions (labelled, validation), disjoint; `labelled` is
        class-balanced, `labelled_count(N, fraction, classes)` long (capped at the
        images outside the validation part).

    Raises:
        ValueError: `fraction` outside (0, 1], or the validation part is empty.
    """
    _check_fraction(fraction)
    labels = np.asarray(labels).reshape(-1)
    _, validation = evaluation.validation_split(labels, validation_fraction, seed)
    if len(validation) == 0:
        raise ValueError("fine-tuning: the validation part is empty; add training examples")
    pool = np.setdiff1d(np.arange(len(labels)), validation)
    count = min(labelled_count(len(labels), fraction, len(np.unique(labels[pool]))), len(pool))
    labelled = pool[data.balanced_indices(labels[pool], count, seed)]
    return np.sort(labelled).astype(np.int64), validation


def _mask(size: int, positions: np.ndarray) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[positions] = True
    return mask


def _trainable_copy(encoder: keras.Model) -> keras.Model:
    """A new encoder with `encoder`'s architecture and weights (BN statistics included)."""
    copy = keras.models.clone_model(encoder)
    copy.set_weights(encoder.get_weights())
    copy.trainable = True
    return copy


def fine_tune(
    encoder: keras.Model,
    images: tf.data.Dataset,
    num_examples: int,
    num_classes: int,
    *,
    image_size: int,
    view: ViewConfig,
    epochs: int,
    batch_size: int,
    base_learning_rate: float,
    seed: int,
    shuffle_buffer: int,
    num_parallel_calls: int = -1,
    jit_compile: bool = False,
) -> keras.Model:
    """Fine-tunes a copy of `encoder` under a new linear head; `encoder` itself is untouched.

    Args:
        encoder: a functional or Sequential Keras model, float32 [B, S, S, 3] in [0, 1]
            -> [B, d].
        images: the labelled images, unbatched {"image": uint8 [H, W, C] (or float in
            [0, 1]), "label"}, finite, `num_examples` long.
        num_examples: images in `images` (sets the steps of the cosine schedule).
        num_classes: outputs of the head; labels must lie in [0, num_classes).
        image_size: S.
        view: the training augmentation (`evaluation.linear_view`: crop and flip).
        epochs: passes over `images`, each with new crops.
        batch_size: images per step (the last batch of an epoch may be smaller).
        base_learning_rate: for a batch of 256; the peak rate is this x batch / 256.
        seed: of the shuffles and crops.
        shuffle_buffer: images in the shuffle buffer.
        num_parallel_calls: parallelism of the input maps; -1 is tf.data.AUTOTUNE.
        jit_compile: XLA for the train step (`distribute.resolve_jit_compile`).

    Returns:
        The classifier: float32 [B, S, S, 3] in [0, 1] -> logits [B, num_classes]. Its
        fine-tuned encoder is `classifier.get_layer(encoder.name)`, its head
        `classifier.get_layer(HEAD_NAME)`.
    """
    if num_examples <= 0:
        raise ValueError("fine-tuning: no labelled training images")
    keras.utils.set_random_seed(seed)
    copy = _trainable_copy(encoder)
    inputs = keras.Input((image_size, image_size, 3))
    # Zero weights, as the linear protocols' classifiers start: no random head to undo.
    head = keras.layers.Dense(num_classes, kernel_initializer="zeros", name=HEAD_NAME)
    classifier = keras.Model(inputs, head(copy(inputs)), name="finetuned_classifier")

    batch = min(batch_size, num_examples)
    total_steps = epochs * -(-num_examples // batch)
    schedule = keras.optimizers.schedules.CosineDecay(base_learning_rate * batch / 256.0, total_steps)
    classifier.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=_MOMENTUM, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    batches = evaluation.linear_training_dataset(
        images,
        image_size,
        view,
        batch,
        seed,
        epochs=epochs,
        shuffle_buffer=shuffle_buffer,
        num_parallel_calls=num_parallel_calls,
    )
    # fit calls the classifier with training=True: the encoder's BatchNorm normalises with
    # each batch's statistics and updates its moving ones, as in fine-tuning proper.
    # One pass over a dataset of all epochs (new crops each epoch); its known length tells
    # Keras where it ends.
    batches = batches.map(_as_pair).apply(tf.data.experimental.assert_cardinality(total_steps))
    classifier.fit(batches, epochs=1, shuffle=False, verbose=0)
    return classifier


@tf.autograph.experimental.do_not_convert
def _as_pair(batch):
    return batch["x"], batch["label"]


def _logits_function(classifier: keras.Model, image_size: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """The classifier in inference mode (BN on its moving statistics), one graph for any batch."""
    return evaluation._compiled(lambda images: classifier(images, training=False), image_size)


def score(
    classifier: keras.Model,
    images: tf.data.Dataset,
    image_size: int,
    batch_size: int,
    num_parallel_calls: int = -1,
) -> tuple[float, float]:
    """Top-1 and top-5 of the classifier on the centre crops of `images` (unbatched, labelled)."""
    batches = evaluation._centre_crop_features(
        images, _logits_function(classifier, image_size), image_size, batch_size, num_parallel_calls
    )
    return evaluation.logit_accuracies(batches)


# ---------------------------------------------------------------------------- protocol


@dataclasses.dataclass(frozen=True)
class _Splits:
    """One label fraction's inputs: the training stream and the positions it is cut into."""

    train: tf.data.Dataset
    test: tf.data.Dataset
    labelled: np.ndarray  # bool [N train]
    validation: np.ndarray  # bool [N train]
    num_test: int


def _finetune_row(encoder: keras.Model, splits: _Splits, num_classes: int, config: Config, seed: int, fraction: float):
    """The learning-rate sweep for one encoder: fine-tune per rate, keep the best on validation, test it."""
    evaluation_config = config.evaluation
    image_size = config.augment.image_size
    num_labelled = int(splits.labelled.sum())
    labelled_images = evaluation._select(splits.train, splits.labelled)
    validation_images = evaluation._select(splits.train, splits.validation)
    jit_compile = distribute.resolve_jit_compile(
        config.train.jit_compile, tf.distribute.get_strategy(), config.train.deterministic
    )
    sweep, best = {}, None
    for learning_rate in evaluation_config.finetune_learning_rates:
        classifier = fine_tune(
            encoder,
            labelled_images,
            num_labelled,
            num_classes,
            image_size=image_size,
            view=evaluation.linear_view(evaluation_config),
            epochs=evaluation_config.finetune_epochs,
            batch_size=evaluation_config.finetune_batch_size,
            base_learning_rate=learning_rate,
            seed=seed,
            shuffle_buffer=max(1, min(config.data.shuffle_buffer, num_labelled)),
            num_parallel_calls=config.data.num_parallel_calls,
            jit_compile=jit_compile,
        )
        sweep[float(learning_rate)] = score(
            classifier, validation_images, image_size, evaluation_config.finetune_batch_size,
            config.data.num_parallel_calls,
        )[0]
        logger.info("fine-tuning %g of the labels: learning rate %g validation top-1 %.4f",
                    fraction, learning_rate, sweep[float(learning_rate)])
        # Only the best model so far is kept; the rule is the linear protocols' (ties: earlier).
        if evaluation._best(sweep) == float(learning_rate):
            best = classifier
    chosen = evaluation._best(sweep)
    top1, top5 = score(
        best, splits.test, image_size, evaluation_config.finetune_batch_size, config.data.num_parallel_calls
    )
    return {
        "top1": top1,
        "top5": top5,
        "val_top1": sweep[chosen],
        "learning_rate": chosen,
        "sweep": sweep,
        "epochs": evaluation_config.finetune_epochs,
        "batch_size": min(evaluation_config.finetune_batch_size, num_labelled),
        "label_fraction": float(fraction),
        "num_labelled": num_labelled,
        "num_validation": int(splits.validation.sum()),
        "num_test": splits.num_test,
    }


@dataclasses.dataclass
class FinetuneReport:
    """Fine-tuning accuracy per label fraction and encoder.

    Attributes:
        rows: label fraction -> name ("byol", "random_init") -> {"top1", "top5" (held-out
            split), "val_top1" (validation part, chosen rate), "learning_rate" (chosen),
            "sweep" (rate -> validation top-1), "epochs", "batch_size", "label_fraction",
            "num_labelled", "num_validation", "num_test", "seconds"}.
        num_classes: classes of the labelled data.
        num_train: images of the training split (labelled subset, validation part and the
            unlabelled rest).
        num_validation: images of the validation part.
        num_test: held-out images the accuracies are measured on.
        protocol: "finetune".
    """

    rows: dict[float, dict[str, dict[str, Any]]]
    num_classes: int
    num_train: int
    num_validation: int
    num_test: int
    protocol: str = FINETUNE_PROTOCOL

    def format_table(self) -> str:
        """Plain-text table, one row per label fraction and encoder, accuracies in percent."""
        header = (
            f"{'labels':>7} {'representation':<14} {'top-1':>7} {'top-5':>7} {'val':>7} "
            f"{'lr':>8} {'epochs':>6} {'labelled':>8}"
        )
        lines = [
            f"fine-tuning ({self.protocol} protocol): {self.num_train} train / {self.num_test} test images, "
            f"{self.num_classes} classes; labelled subsets class-balanced from the train images outside "
            f"the {self.num_validation}-image validation part; val = top-1 on that part",
            header,
            "-" * len(header),
        ]
        for fraction, rows in self.rows.items():
            for name, row in rows.items():
                lines.append(
                    f"{100 * fraction:6.3g}% {name:<14} {100 * row['top1']:7.2f} {100 * row['top5']:7.2f} "
                    f"{100 * row['val_top1']:7.2f} {row['learning_rate']:8.3g} {row['epochs']:6d} "
                    f"{row['num_labelled']:8d}"
                )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: fractions and sweep rates as repr strings ("0.1")."""
        rows = {
            repr(fraction): {name: evaluation.json_row(row) for name, row in by_name.items()}
            for fraction, by_name in self.rows.items()
        }
        return {
            "protocol": self.protocol,
            "num_classes": self.num_classes,
            "num_train": self.num_train,
            "num_validation": self.num_validation,
            "num_test": self.num_test,
            "rows": rows,
        }

    def metric_values(self) -> dict[str, float]:
        """Flat {"finetune_<fraction>_<name>_<top1|top5|val_top1>": value}, e.g. for ML Metadata properties."""
        return {
            f"{FINETUNE_PROTOCOL}_{fraction!r}_{name}_{key}": float(row[key])
            for fraction, rows in self.rows.items()
            for name, row in rows.items()
            for key in ("top1", "top5", "val_top1")
        }


def evaluate(
    encoder: keras.Model,
    config: Config,
    *,
    fractions: Sequence[float] | None = None,
    baselines: bool | None = None,
    datasets: Sequence[tf.data.Dataset] | None = None,
    arrays: Sequence[np.ndarray] | None = None,
    num_classes: int | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> FinetuneReport:
    """Fine-tunes `encoder` (and a random-init one) at each label fraction and scores them.

    Args:
        encoder: the pretrained encoder (float32 [B, S, S, 3] in [0, 1] -> [B, d]); it is
            copied, never changed.
        config: the experiment; `evaluation.finetune_*`, `validation_fraction` and the
            `linear_crop_*` / `linear_flip_prob` augmentation set the protocol, `data` the
            images (`data.load_split(config.data, "train" / "test")`), shuffle buffer and
            parallelism, `network` and `augment.image_size` the random-init encoder.
        fractions: label fractions in (0, 1]; default `evaluation.finetune_label_fractions`.
        baselines: add the "random_init" rows; default `evaluation.baselines`.
        datasets: (train, test) unbatched `tf.data.Dataset`s of {"image", "label"}, each
            finite and in the same order on every pass, instead of `config.data`.
        arrays: (train_images, train_labels, test_images, test_labels), not with `datasets`.
        num_classes: default `config.data.num_classes`, else max label + 1.
        seed: of the validation part, the subsets, shuffles and crops, and (plus one) of the
            random-init weights; default `config.train.seed`.
        progress: print what is being computed.

    Returns:
        The report, fractions in the given order, rows byol then random_init.

    Raises:
        NoLabelsError: the data has no labels.
        ValueError: a fraction outside (0, 1], an empty split or validation part, labels
            beyond `num_classes`.
    """
    evaluation_config = config.evaluation
    fractions = tuple(evaluation_config.finetune_label_fractions if fractions is None else fractions)
    if not fractions:
        raise ValueError("label fraction: none given")
    for fraction in fractions:
        _check_fraction(fraction)
    baselines = evaluation_config.baselines if baselines is None else baselines
    seed = config.train.seed if seed is None else seed
    train_images, test_images = evaluation._input_splits(config, datasets, arrays)
    keras.utils.set_random_seed(seed)
    if progress:
        print("fine-tuning: reading the labels of the train and test splits")
    train_labels = evaluation._read_labels(train_images, "train")
    test_labels = evaluation._read_labels(test_images, "test")
    num_classes = evaluation._resolve_num_classes(num_classes, config, train_labels, test_labels)
    # Built once, before any fine-tuning: every rate and fraction starts from the same weights.
    encoders = [(evaluation.BYOL, encoder)]
    if baselines:
        encoders.append((evaluation.RANDOM_INIT, evaluation._random_init_encoder(config, seed)))

    rows, validation = {}, None
    for fraction in fractions:
        labelled, validation = finetuning_split(train_labels, fraction, evaluation_config.validation_fraction, seed)
        splits = _Splits(
            train=train_images,
            test=test_images,
            labelled=_mask(len(train_labels), labelled),
            validation=_mask(len(train_labels), validation),
            num_test=len(test_labels),
        )
        rows[float(fraction)] = {}
        for name, model in encoders:
            started = time.perf_counter()
            if progress:
                print(
                    f"{name}: fine-tuning on {len(labelled)} labelled images ({100 * fraction:g}%), "
                    f"{len(evaluation_config.finetune_learning_rates)} learning rate(s) x "
                    f"{evaluation_config.finetune_epochs} epochs"
                )
            row = _finetune_row(model, splits, num_classes, config, seed, fraction)
            row["seconds"] = round(time.perf_counter() - started, 2)
            logger.info(
                "%s at %g of the labels: top-1 %.4f top-5 %.4f val top-1 %.4f (lr=%g), %.1f s",
                name, fraction, row["top1"], row["top5"], row["val_top1"], row["learning_rate"], row["seconds"],
            )
            rows[float(fraction)][name] = row
    return FinetuneReport(
        rows=rows,
        num_classes=num_classes,
        num_train=len(train_labels),
        num_validation=0 if validation is None else len(validation),
        num_test=len(test_labels),
    )
