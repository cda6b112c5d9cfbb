"""Changing the course of a run safely: atomic training backups for exact resumes, and a stop at
the first non-finite loss (Keras callbacks).
"""

from __future__ import annotations

import logging
import tempfile

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)


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
        logger.debug("restored %s: resuming after global step %d", latest, position)
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
        """Removes the backups (the chief's job; others remove their scratch), once the run has finished.

        The `checkpoint` index goes first: a kill during the removal then leaves no index
        naming half-deleted files (which a rerun would fail to restore), only files no
        index names, which the rerun ignores and overwrites.
        """
        index = self.scratch.rstrip("/") + "/checkpoint"
        if tf.io.gfile.exists(index):
            tf.io.gfile.remove(index)
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
