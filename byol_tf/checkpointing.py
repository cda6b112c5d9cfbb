"""Changing the course of a run safely: atomic training backups for exact resumes, a backup on
SIGTERM (preemption), and a stop at the first non-finite loss (Keras callbacks).
"""

from __future__ import annotations

import logging
import re
import signal
import tempfile
import threading

import keras
import numpy as np
import tensorflow as tf

from byol_tf import fileio

logger = logging.getLogger(__name__)

_NAME = "ckpt"  # checkpoint files are ckpt-<global step>.*
HISTORY_FILE = "history.json"  # beside the checkpoints: each finished epoch's logs


class NonFiniteTrainingError(FloatingPointError):
    """Training produced a NaN or infinite loss or weights, and stopped."""


def _is_finite(value) -> bool:
    return bool(np.all(np.isfinite(np.asarray(value, dtype=np.float64))))


class TrainingBackup(keras.callbacks.Callback):
    """Atomic backups of the whole training state, for exact resumes after a kill.

    A `tf.train.Checkpoint` of the model (online, target, predictor, probe, BN statistics),
    its optimizer (slots, iteration count, loss scale), `position`, the global batches
    consumed so far (a resumed run skips that many batches of its input, whose augmentation
    is keyed by the batch counter), and the running totals of the model's metrics (a run
    resumed inside an epoch puts them back, so that epoch's logged means cover all its
    steps). Saved every `every_steps` global steps and at the end of each epoch through
    `tf.train.CheckpointManager`, which writes the new checkpoint's files first and only then
    atomically replaces the `checkpoint` index file: a kill during a save leaves the previous
    checkpoint the latest one, intact. Non-finite weights are never saved.

    Each finished epoch's logs go to `history.json` beside the checkpoints, before the epoch's
    checkpoint: `history` is the whole run's, earlier epochs included, however often it was
    resumed (a resume after the last step, during the evaluation or export, still has the last
    epoch's metrics).

    `restore` reads every tensor of a checkpoint before loading it: one left incomplete or
    corrupt (a truncated or missing file, an unreadable index) is skipped with a warning for
    the one before it, or a start from step 0; it never loads half a state.

    SIGTERM (what preemptible VMs and schedulers send before a kill) is noted while `fit`
    runs: the state is backed up at the end of the step under way, then the signal takes its
    course (by default the process ends with it; a handler installed before is called).

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
        multi_worker: a MultiWorkerMirroredStrategy run: no backup on SIGTERM (one worker cannot
            save alone), and no metric totals (a resumed epoch's means cover its steps after
            the resume). SIGTERM is otherwise handled from the main thread only.
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
        multi_worker: bool = False,
    ):
        super().__init__()
        self.directory = directory
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps
        self.is_chief = is_chief
        self.multi_worker = multi_worker
        self.position = tf.Variable(0, dtype=tf.int64, trainable=False, name="position")
        self._metric_variables = [variable for metric in model.metrics for variable in metric.variables]
        self._metric_totals = [
            tf.Variable(tf.zeros(variable.shape, variable.dtype), trainable=False) for variable in self._metric_variables
        ]
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=model.optimizer, position=self.position, metric_totals=self._metric_totals
        )
        # Before the manager, which fails on an index it cannot parse.
        self._saved = _saved_checkpoints(directory, remove_unreadable_index=is_chief)
        self.scratch = directory if is_chief else tempfile.mkdtemp(prefix=f"byol-backup-worker{task_id}-")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self.scratch, max_to_keep=keep, checkpoint_name=_NAME
        )
        self.last_saved: str | None = self._saved[-1] if self._saved else None
        self._epoch_start = 0
        self.history: dict[str, list[float]] = {}
        self._terminating = False
        self._previous_sigterm_handler = None

    def restore(self) -> int:
        """Restores the latest complete backup, if there is one.

        Returns:
            The global batches consumed when it was saved (0 without a complete backup).

        Raises:
            ValueError: the backup does not fit this model and optimizer.
        """
        self.last_saved = None
        for path in reversed(self._saved):
            problem = _read_error(path)
            if problem:
                logger.warning("backup %s is incomplete or corrupt, skipped (%s)", path, problem)
                continue
            try:
                self.checkpoint.read(path).assert_existing_objects_matched()
            except (AssertionError, ValueError, tf.errors.OpError) as error:
                raise ValueError(
                    f"backup {path} does not fit this model and optimizer (was the config changed?): "
                    f"delete {self.directory} or pass another backup folder. {error}"
                ) from None
            self.last_saved = path
            position = int(self.position.numpy())
            self.history = self._saved_history(position // self.steps_per_epoch)
            logger.debug("restored %s: resuming after global step %d", path, position)
            return position
        if self._saved:
            logger.warning("no complete backup in %s: training from step 0", self.directory)
        return 0

    def on_train_begin(self, logs=None):
        # A resumed run's first fit covers the rest of a started epoch: fewer steps.
        self._skipped_in_first_epoch = self.steps_per_epoch - self.params["steps"]
        if not self.multi_worker and threading.current_thread() is threading.main_thread():
            self._previous_sigterm_handler = signal.signal(signal.SIGTERM, self._note_sigterm)

    def on_train_end(self, logs=None):
        if self._terminating:  # came after the last step's checks; its epoch end is backed up
            self._save_and_terminate(int(self.position.numpy()), logs)
        self._restore_sigterm_handler()

    def on_epoch_begin(self, epoch, logs=None):
        if self._skipped_in_first_epoch and not self.multi_worker:
            # Keras has just reset the metrics: put back the totals of this epoch's steps before the resume.
            for variable, total in zip(self._metric_variables, self._metric_totals):
                variable.assign(total)
        self._epoch_start = epoch * self.steps_per_epoch + self._skipped_in_first_epoch
        self._skipped_in_first_epoch = 0

    def on_train_batch_end(self, batch, logs=None):
        position = self._epoch_start + batch + 1
        # An epoch's end is saved by on_epoch_end, after its logs.
        if self.every_steps and position % self.every_steps == 0 and position % self.steps_per_epoch:
            self.save(position, logs)
        if self._terminating and position % self.steps_per_epoch:  # at an epoch end: on_epoch_end
            self._save_and_terminate(position, logs)

    def on_epoch_end(self, epoch, logs=None):
        position = (epoch + 1) * self.steps_per_epoch
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        # Before the checkpoint: a kill in between leaves logs of an epoch the rerun trains
        # again, which `restore` cuts off, never a checkpoint without its epoch's logs.
        fileio.write_json(fileio.join(self.scratch, HISTORY_FILE), self.history)
        if int(self.position.numpy()) != position or self.last_saved is None:
            self.save(position, logs)
        if self._terminating:
            self._save_and_terminate(position, logs)

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
        if not self.multi_worker:
            for variable, total in zip(self._metric_variables, self._metric_totals):
                total.assign(variable.numpy())  # summed over replicas
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
        fileio.remove(_index_path(self.scratch))
        fileio.rmtree(self.scratch)

    def _saved_history(self, epochs: int) -> dict[str, list[float]]:
        """history.json's logs of the first `epochs` epochs ({} where it is missing or unreadable)."""
        path = fileio.join(self.directory, HISTORY_FILE)
        try:
            saved = fileio.read_json(path) if fileio.exists(path) else {}
            return {str(name): [float(value) for value in values[:epochs]] for name, values in saved.items()}
        except (ValueError, TypeError, AttributeError, tf.errors.OpError) as error:
            logger.warning("%s is unreadable (%s): the resumed run's history starts at the resume", path, error)
            return {}

    def _note_sigterm(self, signum, frame):
        self._terminating = True  # acted on between steps: a handler must not save mid-step

    def _save_and_terminate(self, position: int, logs):
        if int(self.position.numpy()) != position:
            self.save(position, logs)
        logger.warning(
            "SIGTERM: the state after global step %d is backed up (%s); stopping. Run the same command "
            "again to resume.", position, self.last_saved
        )
        self._terminating = False
        self._restore_sigterm_handler()
        signal.raise_signal(signal.SIGTERM)

    def _restore_sigterm_handler(self):
        if self._previous_sigterm_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm_handler)
            self._previous_sigterm_handler = None


def _index_path(directory: str) -> str:
    return directory.rstrip("/") + "/checkpoint"


def _saved_checkpoints(directory: str, remove_unreadable_index: bool) -> list[str]:
    """The checkpoints the backup folder's index names, oldest first.

    An index that cannot be parsed (cut short, overwritten) is reported and removed (by the
    chief), and the checkpoints are found by their files. Without an index the folder's files
    are ignored: `TrainingBackup.delete` removes the index first, so they are a finished run's
    leftovers.
    """
    index = _index_path(directory)
    if not fileio.exists(index):
        if fileio.glob(fileio.join(directory, f"{_NAME}-*.index")):
            logger.warning(
                "%s holds checkpoint files that no index names (a first save or the removal of a finished "
                "run's backup was cut short, or the index was deleted): ignored, training from step 0", directory
            )
        return []
    try:
        state = tf.train.get_checkpoint_state(directory)
    except ValueError:
        state = None
    if state is not None and state.all_model_checkpoint_paths:
        return list(state.all_model_checkpoint_paths)  # made absolute by TF
    numbered = []
    for path in fileio.glob(fileio.join(directory, f"{_NAME}-*.index")):
        match = re.fullmatch(rf"{_NAME}-(\d+)\.index", fileio.basename(path))
        if match:
            numbered.append((int(match.group(1)), path[: -len(".index")]))
    logger.warning("backup index %s is unreadable: trying the checkpoint files found (%d)", index, len(numbered))
    if remove_unreadable_index:
        fileio.remove(index)
    return [path for _, path in sorted(numbered)]


def _read_error(path: str) -> str | None:
    """Why checkpoint `path` cannot be read whole; None when every tensor reads back, checksums checked."""
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (tf.errors.OpError, IndexError, ValueError) as error:  # a file cut short raises IndexError
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


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
