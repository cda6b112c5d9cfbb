"""Keras callbacks for BYOL runs: augmentation previews, a collapse monitor and a kNN monitor."""

from __future__ import annotations

import math
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl import logging


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
            logging.warning(
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
        """Monitor on the first `evaluation.knn_examples` labelled images of each split.

        The splits come in a fixed order that does not follow the labels (a seeded shuffle
        for in-memory sources), and only those images are read: a large TFDS or TFRecord
        source is not loaded whole.

        Args:
            config: a `byol_tf.config.Config`; uses `data`, `augment.image_size` and the
                `evaluation.knn_*` fields.

        Raises:
            ValueError: a split has no labelled images.
        """
        from byol_tf import augment, data  # deferred: only runs that monitor kNN read data here

        evaluation = config.evaluation
        size = config.augment.image_size

        def resize(example):
            # As data.load_arrays(..., image_size): one uint8 size for images of any size.
            image = augment.center_crop_resize(example["image"], size)
            return tf.cast(tf.round(image * 255.0), tf.uint8), example["label"]

        subsets = []
        for split in ("train", "test"):
            examples = (
                data.load_split(config.data, split)
                .filter(lambda example: example["label"] >= 0)
                .take(evaluation.knn_examples)
                .map(resize, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(evaluation.knn_examples)
            )
            batch = next(iter(examples.as_numpy_iterator()), None)
            if batch is None:
                raise ValueError(f"evaluation.knn_every_epochs: the {split!r} split has no labelled images for kNN")
            subsets += list(batch)
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
        logging.info("epoch %d: kNN accuracy %.4f (k=%d)", epoch + 1, accuracy, self.k)


class NonFiniteTrainingError(FloatingPointError):
    """Training produced a NaN or infinite loss or weights, and stopped."""


def _is_finite(value) -> bool:
    return bool(np.all(np.isfinite(np.asarray(value, dtype=np.float64))))


class TrainingBackup(keras.callbacks.Callback):
    """Atomic backups of the whole training state, for exact resumes after a kill.

    A `tf.train.Checkpoint` of the model (online, target, predictor, probe, BN statistics),
    its optimizer (slots, iteration count, loss scale) and `position`, the global batches
    consumed so far: a resumed run skips that many batches of its input, whose augmentation
    is keyed by the batch counter. Saved every `every_steps` global steps and at the end of
    each epoch through `tf.train.CheckpointManager`, which writes the new checkpoint's files
    first and only then atomically replaces the `checkpoint` index file: a kill during a save
    leaves the previous checkpoint the latest one, intact. Non-finite weights are never saved.

    Under MultiWorkerMirroredStrategy every worker saves (saving may run collectives); only
    the chief writes into `directory`, the others into a local scratch folder deleted right after.

    Args:
        directory: backup folder (local, or a tf.io.gfile URL such as gs://), seen by all workers.
        model: the compiled model; its optimizer must be built (`distribute.prepare_for_fit`).
        steps_per_epoch: global steps per epoch.
        every_steps: also save every this many global steps; 0 saves at epoch ends only.
        keep: checkpoints kept.
        is_chief: this process writes `directory`.
        task_id: this worker's index (names the scratch folder of a non-chief worker).
    """

    def __init__(
        self,
        directory: str,
        model: keras.Model,
        steps_per_epoch: int,
        every_steps: int = 0,
        keep: int = 2,
        is_chief: bool = True,
        task_id: int = 0,
    ):
        super().__init__()
        self.directory = directory
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps
        self.is_chief = is_chief
        self.position = tf.Variable(0, dtype=tf.int64, trainable=False, name="position")
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, position=self.position)
        self.scratch = directory if is_chief else tempfile.mkdtemp(prefix=f"byol-backup-worker{task_id}-")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self.scratch, max_to_keep=keep, checkpoint_name="ckpt"
        )
        self.last_saved: str | None = tf.train.latest_checkpoint(directory)
        self._epoch_start = 0

    def restore(self) -> int:
        """Restores the latest backup, if there is one.

        Returns:
            The global batches consumed when it was saved (0 without a backup).

        Raises:
            ValueError: the backup does not fit this model and optimizer.
        """
        latest = tf.train.latest_checkpoint(self.directory)
        if latest is None:
            return 0
        try:
            self.checkpoint.read(latest).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise ValueError(
                f"backup {latest} does not fit this model and optimizer (was the config changed?): "
                f"delete {self.directory} or pass another backup folder. {error}"
            ) from None
        self.last_saved = latest
        position = int(self.position.numpy())
        logging.info("restored %s: resuming after global step %d", latest, position)
        return position

    def on_train_begin(self, logs=None):
        # A resumed run's first fit covers the rest of a started epoch: fewer steps.
        self._skipped_in_first_epoch = self.steps_per_epoch - self.params["steps"]

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = epoch * self.steps_per_epoch + self._skipped_in_first_epoch
        self._skipped_in_first_epoch = 0

    def on_train_batch_end(self, batch, logs=None):
        position = self._epoch_start + batch + 1
        if self.every_steps and position % self.every_steps == 0:
            self.save(position, logs)

    def on_epoch_end(self, epoch, logs=None):
        position = (epoch + 1) * self.steps_per_epoch
        if int(self.position.numpy()) != position or self.last_saved is None:
            self.save(position, logs)

    def save(self, position: int, logs=None):
        """Backs up the state after `position` global batches (skipped after a non-finite loss).

        Raises:
            NonFiniteTrainingError: a weight is NaN or infinite.
        """
        if logs and "loss" in logs and not _is_finite(logs["loss"]):
            return  # TerminateOnNonFiniteLoss reports it; the last good backup stays.
        if not all(_is_finite(weight.numpy()) for weight in self.model.weights):
            raise NonFiniteTrainingError(
                f"non-finite weights after global step {position}: training stopped before "
                f"backing them up; the last good backup is {self.last_saved}"
            )
        self.position.assign(position)
        path = self.manager.save(checkpoint_number=position)
        if self.is_chief:
            self.last_saved = path
        else:
            tf.io.gfile.rmtree(self.scratch)

    def delete(self):
        """Removes the backups (the chief's job; others remove their scratch), once the run has finished."""
        if tf.io.gfile.exists(self.scratch):
            tf.io.gfile.rmtree(self.scratch)


class TerminateOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite loss with a `NonFiniteTrainingError`.

    Raised from `on_train_batch_end`, so callbacks after it in the list (put `TrainingBackup`
    after it) never see the bad step: the last good backup stays the latest one.

    Args:
        steps_per_epoch: global steps per epoch, to report the global step.
        backup: the run's `TrainingBackup`, named in the message; optional.
    """

    def __init__(self, steps_per_epoch: int, backup: TrainingBackup | None = None):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.backup = backup
        self._epoch = 0
        self._epoch_start = 0

    def on_train_begin(self, logs=None):
        self._skipped_in_first_epoch = self.steps_per_epoch - self.params["steps"]

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = epoch * self.steps_per_epoch + self._skipped_in_first_epoch
        self._skipped_in_first_epoch = 0

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or _is_finite(loss):
            return
        step = self._epoch_start + batch + 1
        if self.backup is None:
            where = "backups are off (train.keep_checkpoints=0)"
        elif self.backup.last_saved is None:
            where = "no backup was written yet"
        else:
            where = f"the last good backup, {self.backup.last_saved}, is intact and a rerun resumes from it"
        raise NonFiniteTrainingError(
            f"loss is {float(np.asarray(loss).reshape(-1)[0])} at global step {step} (epoch {self._epoch + 1}, "
            f"batch {batch + 1}): training stopped; {where}. Check the input for NaN/Inf values, lower "
            "the learning rate, or train in float32."
        )
