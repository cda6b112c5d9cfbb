"""Watching a BYOL run (Keras callbacks): augmentation previews, a collapse monitor, a kNN monitor,
and the held-out images for TensorBoard's Embedding Projector at the end.

Nothing here changes training; `byol_tf.checkpointing` holds the callbacks that do (backups,
the non-finite guard).
"""

from __future__ import annotations

import logging
import math

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)


def view_pair_grid(view1: np.ndarray, view2: np.ndarray) -> np.ndarray:
    """Tiles N view pairs into one image: row i holds view1[i] then view2[i].

    Args:
        view1: [N, S, S, C] floats in [0, 1].
        view2: same shape as view1.

    Returns:
        [1, N*S, 2*S, C] float32, ready for `tf.summary.image`.
    """
    pairs = np.concatenate([view1, view2], axis=2)  # [N, S, 2S, C]
    return np.concatenate(list(pairs), axis=0)[None].astype(np.float32)


class ViewGridLogger(keras.callbacks.Callback):
    """Writes a grid of a few (view1, view2) pairs to TensorBoard when training starts.

    Lets a user see what the two augmentation distributions do to their images.
    """

    def __init__(self, dataset: tf.data.Dataset, log_dir: str, num_images: int = 8):
        super().__init__()
        self.dataset = dataset
        self.log_dir = log_dir
        self.num_images = num_images

    def on_train_begin(self, logs=None):
        if not self.num_images:
            return
        batch = next(iter(self.dataset.take(1)))
        if "view1" not in batch:  # augmentation placed on the device: finished by the model
            batch = self.model.views(batch)
        view1 = np.asarray(batch["view1"][: self.num_images])
        view2 = np.asarray(batch["view2"][: self.num_images])
        writer = tf.summary.create_file_writer(self.log_dir + "/views")
        with writer.as_default():
            tf.summary.image("view_pairs", view_pair_grid(view1, view2), step=0)
        writer.close()


class CollapseGuard(keras.callbacks.Callback):
    """Warns (or stops) when the projections collapse.

    `collapse_std` (std over the batch of L2-normalised projections, averaged over
    dimensions) is about 1/sqrt(d) for healthy features and 0 for collapsed ones.

    Args:
        fraction: warn when collapse_std < fraction / sqrt(d).
        stop: also stop training when it happens.
    """

    def __init__(self, fraction: float = 0.1, stop: bool = False):
        super().__init__()
        self.fraction = fraction
        self.stop = stop
        self.collapsed_epochs = []

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("collapse_std")
        if value is None:
            return
        dim = self.model.projection_dim
        threshold = self.fraction / math.sqrt(dim)
        if value < threshold:
            self.collapsed_epochs.append(epoch)
            logger.warning(
                "epoch %d: collapse_std %.4g < %.4g (healthy is about 1/sqrt(%d) = %.4g): "
                "the representation may be collapsing",
                epoch + 1, value, threshold, dim, 1 / math.sqrt(dim),
            )
            if self.stop:
                self.model.stop_training = True


class KNNMonitor(keras.callbacks.Callback):
    """Adds `knn_accuracy` (weighted kNN top-1 of `model.encoder`) to the epoch logs every N epochs.

    The memory bank is a labelled subset of the pretraining images, the queries a labelled
    subset of the held-out split; features are centre crops through the frozen encoder
    (`evaluation.extract_features`), scored by `evaluation.knn_accuracy`.

    The value is written into the shared `logs` dict, so callbacks AFTER this one see it:
    place it BEFORE `keras.callbacks.TensorBoard` in the callback list, and TensorBoard
    logs it as `epoch_knn_accuracy` beside `epoch_probe_accuracy` (`training.train` puts
    it first). Epochs without a measurement carry no `knn_accuracy` key.

    Args:
        train_images: [N, H, W, C] uint8 memory-bank images.
        train_labels: [N] int labels.
        test_images: [M, H, W, C] uint8 query images, never seen in pretraining.
        test_labels: [M] int labels.
        image_size: encoder input side S.
        every_epochs: measure after epochs N, 2N, ... (and never when 0).
        k: neighbours.
        temperature: vote temperature.
        num_classes: default max label + 1.
        batch_size: feature-extraction batch.
    """

    def __init__(
        self,
        train_images,
        train_labels,
        test_images,
        test_labels,
        image_size: int,
        every_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        num_classes: int | None = None,
        batch_size: int = 256,
    ):
        super().__init__()
        self.train_images = np.asarray(train_images)
        self.train_labels = np.asarray(train_labels).reshape(-1)
        self.test_images = np.asarray(test_images)
        self.test_labels = np.asarray(test_labels).reshape(-1)
        self.image_size = image_size
        self.every_epochs = every_epochs
        self.k = k
        self.temperature = temperature
        self.num_classes = num_classes or int(max(self.train_labels.max(), self.test_labels.max()) + 1)
        self.batch_size = batch_size
        self.history = []  # (epoch, accuracy) pairs, epochs counted from 1

    @classmethod
    def from_config(cls, config) -> "KNNMonitor":
        """Monitor on a seeded, class-balanced subset of `evaluation.knn_examples` images per split.

        Balanced, not the first images: a folder or TFRecord files sorted by class would
        otherwise give a memory bank of a few classes, and a kNN accuracy that says nothing
        about the others (`byol_tf.data.load_balanced_subset`).

        Args:
            config: a `byol_tf.config.Config`; uses `data`, `augment.image_size` and the
                `evaluation.knn_*` fields.

        Raises:
            ValueError: a split has no labelled images.
        """
        from byol_tf import data  # deferred: only runs that monitor kNN read data here

        evaluation = config.evaluation
        size = config.augment.image_size
        subsets = []
        for split in ("train", "test"):
            images, labels = data.load_balanced_subset(
                config.data, split, evaluation.knn_examples, seed=config.data.seed, image_size=size
            )
            if len(labels) == 0:
                raise ValueError(f"evaluation.knn_every_epochs: the {split!r} split has no labelled images for kNN")
            subsets += [images, labels]
        return cls(
            *subsets,
            image_size=size,
            every_epochs=evaluation.knn_every_epochs,
            k=evaluation.knn_k,
            temperature=evaluation.knn_temperature,
            num_classes=config.data.num_classes,
            batch_size=evaluation.linear_batch_size,
        )

    def on_epoch_end(self, epoch, logs=None):
        if not self.every_epochs or (epoch + 1) % self.every_epochs:
            return
        from byol_tf import evaluation  # evaluation imports augment/tf; keep this module light

        encoder = self.model.encoder
        bank = evaluation.extract_features(encoder, self.train_images, self.image_size, self.batch_size, False)
        queries = evaluation.extract_features(encoder, self.test_images, self.image_size, self.batch_size, False)
        accuracy = evaluation.knn_accuracy(
            bank, self.train_labels, queries, self.test_labels, self.num_classes, self.k, self.temperature
        )
        self.history.append((epoch + 1, accuracy))
        if logs is not None:
            logs["knn_accuracy"] = accuracy
        logger.info("epoch %d: kNN accuracy %.4f (k=%d)", epoch + 1, accuracy, self.k)


class ProjectorLogger(keras.callbacks.Callback):
    """Writes held-out images for TensorBoard's Embedding Projector when training ends.

    The representations of `images` under the trained encoder (`model.encoder`, centre
    crops, `evaluation.extract_features`), their labels and thumbnails go to
    LOG_DIR/embeddings (`byol_tf.embedding_projector.write`).

    Args:
        images: [N, S, S, 3] uint8 held-out images.
        labels: [N] int labels (-1: unknown).
        log_dir: the run's TensorBoard folder (RUN_DIR/logs).
        image_size: encoder input side S.
        batch_size: feature-extraction batch.
    """

    def __init__(self, images, labels, log_dir: str, image_size: int, batch_size: int = 256):
        super().__init__()
        self.images = np.asarray(images)
        self.labels = np.asarray(labels).reshape(-1)
        self.log_dir = log_dir
        self.image_size = image_size
        self.batch_size = batch_size
        self.written = None  # the projector folder, once written

    @classmethod
    def from_config(cls, config, log_dir: str, data_config=None) -> "ProjectorLogger":
        """A logger on `evaluation.projector_images` held-out images of the config's data.

        Labelled images are a seeded, class-balanced subset (`data.load_balanced_subset`),
        so every class shows; unlabelled data gives the first images of the held-out split.

        Args:
            config: a `byol_tf.config.Config`.
            log_dir: the run's TensorBoard folder.
            data_config: where the held-out split is read; default `config.data` (the TFX
                Trainer passes its Examples artifact as a TFRecord source).

        Raises:
            ValueError: the data has no held-out split, or it is empty.
        """
        from byol_tf import augment, data

        cfg = data_config or config.data
        count, size = config.evaluation.projector_images, config.augment.image_size
        images, labels = data.load_balanced_subset(cfg, "test", count, seed=cfg.seed, image_size=size)
        if not len(labels):
            unlabelled = data.load_split(cfg, "test").take(count).map(
                lambda example: (
                    tf.cast(tf.round(augment.center_crop_resize(example["image"], size) * 255.0), tf.uint8),
                    example["label"],
                ),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            pairs = list(unlabelled.as_numpy_iterator())
            if not pairs:
                raise ValueError("evaluation.projector_images: the held-out split has no images")
            images, labels = np.stack([image for image, _ in pairs]), np.array([label for _, label in pairs])
        return cls(images, labels, log_dir, size, config.evaluation.linear_batch_size)

    def on_train_end(self, logs=None):
        from byol_tf import embedding_projector, evaluation

        features = evaluation.extract_features(
            self.model.encoder, self.images, self.image_size, self.batch_size, progress=False
        )
        self.written = embedding_projector.write(self.log_dir, features, self.labels, self.images)
        logger.info("embedding projector: %d held-out images in %s", len(self.images), self.written)
