"""Fault tolerance of byol_tf.training: exact resume after SIGKILL, a backup on SIGTERM, atomic
backups and what a rerun does with a corrupt one, the NaN guard, reruns over a finished run.

The subprocess tests run tests/training_run.py (a tiny real-data run, deterministic ops on),
kill it, run the same command again and compare the final online and target weights with
an uninterrupted run.
"""

import dataclasses
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf import checkpointing, config as config_lib, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "training_run.py")
EPOCHS, STEPS_PER_EPOCH, EVERY = 2, 5, 2
TOTAL = EPOCHS * STEPS_PER_EPOCH


def run_training(run_dir, out, *args, kill_at_step=None, kill_signal=signal.SIGKILL, timeout=300):
    """Runs tests/training_run.py; sends it `kill_signal` when its `kill_at_step`-th step begins.

    Returns:
        (exit status, number of steps it began, output).
    """
    command = [sys.executable, SCRIPT, "--run-dir", str(run_dir), "--out", str(out), *map(str, args)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, process.kill)  # the run stops by itself, hung or not
    watchdog.start()
    lines, steps = [], 0
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("STEP"):
                steps += 1
                if steps == kill_at_step:
                    process.send_signal(kill_signal)
        status = process.wait(timeout=30)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    return status, steps, "".join(lines)


def load_weights(path):
    with np.load(path) as stored:
        return {name: stored[name] for name in stored.files}


def assert_same_weights(actual, expected, atol):
    assert sorted(actual) == sorted(expected)
    assert any(name.startswith("target") for name in expected) and any(name.startswith("online") for name in expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], atol=atol, rtol=0, err_msg=name)


def last_backup_before(step: int) -> int:
    """Global step of the last backup written once `step` steps are done."""
    saves = [s for s in range(1, step + 1) if s % EVERY == 0 or s % STEPS_PER_EPOCH == 0]
    return max(saves, default=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    status, steps, output = run_training(folder / "run", folder / "weights.npz")
    assert status == 0, output[-3000:]
    assert steps == TOTAL
    # Finished runs delete their backup: running the command again starts afresh.
    assert not (folder / "run" / "backup").exists()
    return load_weights(folder / "weights.npz")


# A fixed list: a failure names its seed and replays. Each seed picks the step that has
# begun when the kill lands; with the backup written every EVERY steps and at each epoch
# end, kills land in every phase: right after a backup, between backups, at epoch ends.
KILL_SEEDS = (3, 11, 29)


@pytest.mark.slow
@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_sigkill_at_a_seeded_step_then_same_command_gives_identical_weights(tmp_path, uninterrupted, seed):
    kill_at = random.Random(seed).randrange(2, TOTAL + 1)  # the step that had begun when killed
    status, _, output = run_training(tmp_path / "run", tmp_path / "weights.npz", kill_at_step=kill_at)
    assert status == -signal.SIGKILL, f"seed {seed}, kill at step {kill_at}: {output[-2000:]}"
    assert not (tmp_path / "weights.npz").exists()

    status, steps, output = run_training(tmp_path / "run", tmp_path / "weights.npz")
    assert status == 0, output[-3000:]
    # It resumed (did not start over) from the backup of step kill_at - 1 or, if that step
    # finished before the signal landed, of step kill_at, and said so.
    resumed_from = {last_backup_before(kill_at - 1), last_backup_before(kill_at)}
    assert TOTAL - steps in resumed_from, f"seed {seed}, kill at step {kill_at}: ran {steps} steps after restart"
    if TOTAL - steps:
        assert f"resumed from backup at step {TOTAL - steps} of {TOTAL}" in output
    assert_same_weights(load_weights(tmp_path / "weights.npz"), uninterrupted, atol=1e-6)


@pytest.mark.slow
def test_kill_while_writing_a_backup_leaves_the_previous_one_restorable(tmp_path, uninterrupted):
    # The 3rd backup (global step 4) is half written, and the process dies before the
    # checkpoint index names it.
    status, _, output = run_training(tmp_path / "run", tmp_path / "weights.npz", "--kill-during-save", 3)
    assert status == -signal.SIGKILL and "KILLED DURING SAVE" in output, output[-2000:]
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "backup")).endswith("ckpt-2")

    status, steps, output = run_training(tmp_path / "run", tmp_path / "weights.npz")
    assert status == 0, output[-3000:]
    assert steps == TOTAL - 2
    assert_same_weights(load_weights(tmp_path / "weights.npz"), uninterrupted, atol=1e-6)


@pytest.mark.slow
def test_kill_while_removing_the_finished_backup_still_ends_with_the_same_weights(tmp_path, uninterrupted):
    status, _, output = run_training(tmp_path / "run", tmp_path / "weights.npz", "--kill-during-delete")
    assert status == -signal.SIGKILL and "KILLED DURING DELETE" in output, output[-2000:]
    assert (tmp_path / "run" / training.ENCODER_FILE).exists()
    # The index went first: what is left is files no index names, not a half-deleted backup.
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "backup")) is None

    status, steps, output = run_training(tmp_path / "run", tmp_path / "weights.npz")
    assert status == 0, output[-3000:]
    assert steps == TOTAL  # nothing to resume: the run is deterministic, so it ends the same
    assert "holds checkpoint files that no index names" in output
    assert "holds an earlier run's outputs and no backup to resume from: moved " in output
    assert_same_weights(load_weights(tmp_path / "weights.npz"), uninterrupted, atol=1e-6)


@pytest.mark.slow
def test_sigterm_backs_up_the_step_under_way_and_the_same_command_resumes_there(tmp_path, uninterrupted):
    # Step 3 is no scheduled backup (every 2 steps and at step 5): without the SIGTERM
    # backup a rerun would go back to step 2.
    status, begun, output = run_training(tmp_path / "run", tmp_path / "weights.npz", kill_at_step=3,
                                          kill_signal=signal.SIGTERM)
    assert status == -signal.SIGTERM, output[-2000:]  # the signal took its course after the backup
    saved = re.search(r"SIGTERM: the state after global step (\d+) is backed up", output)
    assert saved, output[-2000:]
    saved_at = int(saved.group(1))
    assert saved_at == begun >= 3  # the step under way when the signal came; no later one began

    status, steps, output = run_training(tmp_path / "run", tmp_path / "weights.npz")
    assert status == 0, output[-3000:]
    assert steps == TOTAL - saved_at and f"resumed from backup at step {saved_at} of {TOTAL}" in output
    assert_same_weights(load_weights(tmp_path / "weights.npz"), uninterrupted, atol=1e-6)


# ------------------------------------------------------------------- in-process tests

TINY = config_lib.from_dict(
    {
        "data": {"source": "mnist5k", "max_examples": 64, "holdout_examples": 16, "batch_size": 8,
                 "shuffle_buffer": 32, "num_parallel_calls": 1},
        "augment": {"image_size": 8},
        "network": {"encoder": "small_convnet", "projector_hidden_dim": 8, "projection_dim": 4,
                    "predictor_hidden_dim": 8, "sync_batchnorm": False},
        "optimizer": {"name": "sgd", "base_learning_rate": 0.5, "warmup_epochs": 0},
        "train": {"epochs": 2, "steps_per_epoch": 3, "log_images": 0, "verbose": 0, "checkpoint_every_steps": 1},
        "evaluation": {"knn_every_epochs": 0},
    }
)


def random_views(poison_step=None):
    """Batch k is a function of k only (stateless seeds); batch `poison_step` (from 1) is NaN."""

    def batch(index):
        seed = tf.stack([tf.constant(7, tf.int64), index])
        views = {
            name: tf.random.stateless_uniform((8, 8, 8, 3), tf.random.experimental.stateless_fold_in(seed, i))
            for i, name in enumerate(("view1", "view2"))
        }
        if poison_step is not None:
            bad = tf.equal(index, poison_step - 1)
            views["view1"] = tf.where(bad, tf.fill(tf.shape(views["view1"]), np.nan), views["view1"])
        return {**views, "label": tf.zeros((8,), tf.int64)}

    return lambda context: tf.data.Dataset.counter().map(batch)


class WeightsAfterEachStep(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([w.numpy().copy() for w in self.model.weights])


def test_nan_loss_stops_the_run_and_the_last_backup_restores(tmp_path):
    recorder = WeightsAfterEachStep()
    # The NaN batch shows in the loss or, where the kernels keep NaN activations from the
    # loss (observed on CPU with the fused BatchNorm kernel), in the BN moving statistics:
    # either way step 5 is caught before its state is backed up.
    stopped = r"(loss is nan at global step 5 \(epoch 2, batch 2\)|non-finite weights after global step 5)"
    with pytest.raises(checkpointing.NonFiniteTrainingError, match=stopped):
        training.train(
            TINY, run_dir=str(tmp_path), dataset=random_views(poison_step=5), num_classes=3,
            extra_callbacks=[recorder],
        )
    backup = tmp_path / "backup"
    assert tf.train.latest_checkpoint(str(backup)).endswith("ckpt-4")
    assert not (tmp_path / training.ENCODER_FILE).exists()

    # The backup holds the state after step 4 exactly, all finite.
    with tf.distribute.get_strategy().scope():
        model = training.build_model(TINY, total_steps=6, num_classes=3)
        model.compile(optimizer=training.build_optimizer(TINY, 3))
    model.optimizer.build(model.trainable_variables)
    restorer = checkpointing.TrainingBackup(str(backup), model, steps_per_epoch=3)
    assert restorer.restore() == 4
    assert int(model.optimizer.iterations.numpy()) == 4
    for restored, expected in zip(model.weights, recorder.weights[3]):
        assert np.all(np.isfinite(restored.numpy()))
        np.testing.assert_array_equal(restored.numpy(), expected)

    # With the bad batch fixed, the same command resumes after step 4 and finishes.
    result = training.train(TINY, run_dir=str(tmp_path), dataset=random_views(), num_classes=3)
    # Epoch 1 from the backup's history, epoch 2 (from the resume) trained again.
    assert len(result.history["loss"]) == 2 and np.all(np.isfinite(result.history["loss"]))
    assert int(result.model.optimizer.iterations.numpy()) == 6
    assert (tmp_path / training.ENCODER_FILE).exists() and not backup.exists()


def test_non_finite_weights_are_never_backed_up(tmp_path):
    with tf.distribute.get_strategy().scope():
        model = training.build_model(TINY, total_steps=6, num_classes=None)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.optimizer.build(model.trainable_variables)
    backup = checkpointing.TrainingBackup(str(tmp_path), model, steps_per_epoch=3, every_steps=1)
    backup.set_model(model)
    backup.save(1, {"loss": 1.0})
    model.online_weights[0].assign(np.full(model.online_weights[0].shape, np.inf, np.float32))
    with pytest.raises(checkpointing.NonFiniteTrainingError, match="non-finite weights after global step 2"):
        backup.save(2, {"loss": 1.0})
    backup.save(3, {"loss": float("nan")})  # skipped: the guard reports a NaN loss
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-1")


def compiled(config):
    with tf.distribute.get_strategy().scope():
        model = training.build_model(config, total_steps=6, num_classes=None)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.optimizer.build(model.trainable_variables)
    return model


def test_backup_of_another_model_fails_with_a_clear_message(tmp_path):
    model = compiled(TINY)
    backup = checkpointing.TrainingBackup(str(tmp_path), model, steps_per_epoch=3)
    backup.set_model(model)
    backup.save(3)
    wider = dataclasses.replace(TINY, network=dataclasses.replace(TINY.network, projection_dim=6))
    with pytest.raises(ValueError, match="does not fit this model"):
        checkpointing.TrainingBackup(str(tmp_path), compiled(wider), steps_per_epoch=3).restore()


def test_keep_checkpoints_zero_turns_backups_off(tmp_path):
    config = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, keep_checkpoints=0, epochs=1))
    result = training.train(config, run_dir=str(tmp_path), dataset=random_views(), num_classes=3)
    assert len(result.history["loss"]) == 1
    assert not (tmp_path / "backup").exists()


class StopAtStep(keras.callbacks.Callback):
    """Raises `Stopped` when global step `step` (from 1) of a run of 3-step epochs begins: a kill, in-process."""

    class Stopped(Exception):
        pass

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = epoch * 3 + (3 - self.params["steps"])

    def on_train_batch_begin(self, batch, logs=None):
        if self._epoch_start + batch + 1 == self.step:
            raise self.Stopped(f"stopped at step {self.step}")


def test_an_epoch_resumed_midway_logs_the_means_of_all_its_steps(tmp_path):
    # Keras resets the metrics at each epoch's start: without their backed-up totals the
    # resumed epoch's loss would be the mean of steps 5-6 only, not of 4-6.
    uninterrupted = training.train(TINY, run_dir=str(tmp_path / "uninterrupted"), dataset=random_views(), num_classes=3)
    run_dir = str(tmp_path / "resumed")
    with pytest.raises(StopAtStep.Stopped):
        training.train(TINY, run_dir=run_dir, dataset=random_views(), num_classes=3, extra_callbacks=[StopAtStep(5)])
    resumed = training.train(TINY, run_dir=run_dir, dataset=random_views(), num_classes=3)
    assert int(resumed.model.optimizer.iterations.numpy()) == 6
    # Both epochs: epoch 1 from the backup's history, epoch 2 with its steps before the resume.
    for name in ("loss", "collapse_std", "probe_loss", "probe_accuracy"):
        np.testing.assert_allclose(resumed.history[name], uninterrupted.history[name], rtol=1e-5, err_msg=name)


def _weights(model):
    return [weight.numpy().copy() for weight in model.weights]


def _backups_at_steps_3_and_4(folder):
    """Backups of steps 3 and 4 of a model whose weights differ between them; returns both states."""
    model = compiled(TINY)
    backup = checkpointing.TrainingBackup(str(folder), model, steps_per_epoch=3)
    backup.set_model(model)
    states = {}
    for step in (3, 4):
        for weight in model.online_weights:
            weight.assign(np.full(weight.shape, step, weight.dtype))
        backup.save(step)
        states[step] = _weights(model)
    return states


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


# What a kill (or a disk) can leave in a backup folder, and the backup a rerun must then resume from.
BACKUP_DAMAGE = {
    "newest data cut short": (lambda d: _truncate(d / "ckpt-4.data-00000-of-00001"), 3),
    "newest data missing": (lambda d: os.remove(d / "ckpt-4.data-00000-of-00001"), 3),
    "newest index cut short": (lambda d: _truncate(d / "ckpt-4.index"), 3),
    "folder index empty": (lambda d: (d / "checkpoint").write_text(""), 4),
    "folder index garbage": (lambda d: (d / "checkpoint").write_text("\x00{{ not a proto"), 4),
    "both data cut short": (lambda d: [_truncate(d / f"ckpt-{n}.data-00000-of-00001") for n in (3, 4)], 0),
}


@pytest.mark.parametrize("damage", BACKUP_DAMAGE)
def test_a_damaged_backup_is_skipped_with_a_warning_for_the_last_complete_one(tmp_path, caplog, damage):
    states = _backups_at_steps_3_and_4(tmp_path)
    spoil, expected = BACKUP_DAMAGE[damage]
    spoil(tmp_path)

    model = compiled(TINY)
    untouched = _weights(model)
    with caplog.at_level(logging.WARNING, logger="byol_tf"):
        backup = checkpointing.TrainingBackup(str(tmp_path), model, steps_per_epoch=3)
        assert backup.restore() == expected
    if expected:
        assert backup.last_saved.endswith(f"ckpt-{expected}")
    # Never half a state: all of the backup restored, or nothing (a fresh start).
    for restored, wanted in zip(_weights(model), states[expected] if expected else untouched):
        np.testing.assert_array_equal(restored, wanted)
    if damage.startswith("folder index"):
        assert "backup index" in caplog.text and "is unreadable" in caplog.text
    else:
        assert re.search(r"backup \S*ckpt-4 is incomplete or corrupt, skipped", caplog.text)
    if not expected:
        assert "no complete backup in" in caplog.text and "training from step 0" in caplog.text
    # The next save works and is what a later rerun resumes from.
    backup.set_model(model)
    backup.save(5)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-5")


class SendSigterm(keras.callbacks.Callback):
    """Sends this process SIGTERM during global step `step` (from 1) of a run of 3-step epochs,
    or with step None once the last step is done (from `on_train_end`, before `TrainingBackup`'s)."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_begin(self, batch, logs=None):
        if self.step is not None and self._epoch * 3 + batch + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_end(self, logs=None):
        if self.step is None:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("step, backed_up", [(2, 2), (None, 6)])
def test_sigterm_during_training_backs_up_then_calls_the_handler_installed_before(tmp_path, caplog, step, backed_up):
    # Backups at epoch ends only (steps 3 and 6): one at step 2 comes from the SIGTERM.
    config = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, checkpoint_every_steps=0))
    backup_dir = str(tmp_path / "backup")
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(tf.train.latest_checkpoint(backup_dir)))
    try:
        with caplog.at_level(logging.WARNING, logger="byol_tf"):
            result = training.train(
                config, run_dir=str(tmp_path), dataset=random_views(), num_classes=3,
                extra_callbacks=[SendSigterm(step)],
            )
        # The backup was written before the signal went on to the handler, which let training go on.
        assert len(seen) == 1 and seen[0].endswith(f"ckpt-{backed_up}")
        assert f"SIGTERM: the state after global step {backed_up} is backed up" in caplog.text
        assert int(result.model.optimizer.iterations.numpy()) == 6
        assert signal.getsignal(signal.SIGTERM) is not previous  # the test's handler is back
        assert signal.getsignal(signal.SIGTERM).__name__ == "<lambda>"
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_training_again_in_a_finished_run_folder_moves_its_outputs_aside_first(tmp_path, caplog):
    config = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, epochs=1))
    training.train(config, run_dir=str(tmp_path), dataset=random_views(), num_classes=3)
    (tmp_path / "evaluation.json").write_text(json.dumps({"rows": {}}))  # as `byol-tf train` leaves it
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "saved_model.pb").write_bytes(b"earlier export")
    earlier = {name: (tmp_path / name).read_bytes() for name in ("encoder.keras", "evaluation.json", "config.yaml")}
    (tmp_path / "other.txt").write_text("not a run output")

    stopped = RuntimeError("stopped during the rerun's first step")

    class StopAtFirstStep(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            raise stopped

    with caplog.at_level(logging.WARNING, logger="byol_tf"), pytest.raises(RuntimeError, match="first step"):
        training.train(config, run_dir=str(tmp_path), dataset=random_views(), num_classes=3,
                       extra_callbacks=[StopAtFirstStep()])
    assert "holds an earlier run's outputs and no backup to resume from: moved evaluation.json, encoder.keras, " \
        "config.yaml, export, logs to " in caplog.text
    # Stopped before it wrote its own: no encoder or evaluation of the earlier run beside this run's config.
    assert not (tmp_path / training.ENCODER_FILE).exists() and not (tmp_path / "evaluation.json").exists()
    # ... and nothing of it lost: every output whole in earlier-<time>/, other files left alone.
    (aside,) = tmp_path.glob("earlier-*")
    assert {name: (aside / name).read_bytes() for name in earlier} == earlier
    assert (aside / "export" / "saved_model.pb").read_bytes() == b"earlier export"
    assert any((aside / "logs").rglob("events.out.tfevents.*"))
    assert (tmp_path / "other.txt").read_text() == "not a run output"


def test_saving_the_encoder_removes_what_a_killed_save_left(tmp_path):
    model = compiled(TINY)
    (tmp_path / ".encoder.keras.tmp-0123abcd.keras").write_bytes(b"half a zip")
    (tmp_path / "other.txt").write_text("kept")
    training.save_keras_atomically(model.encoder, str(tmp_path / training.ENCODER_FILE))
    assert sorted(os.listdir(tmp_path)) == ["encoder.keras", "other.txt"]
    keras.models.load_model(tmp_path / training.ENCODER_FILE, compile=False)


@pytest.mark.parametrize("saved, expected", [
    # Written before its epoch's checkpoint: a kill in between leaves an epoch the rerun trains again.
    ('{"loss": [1.5, 2.5], "tau": [0.9, 0.95]}', {"loss": [1.5], "tau": [0.9]}),
    ("{not json", {}),
])
def test_the_history_of_a_resumed_run_is_cut_to_the_epochs_its_backup_finished(tmp_path, caplog, saved, expected):
    _backups_at_steps_3_and_4(tmp_path)  # step 4: one epoch of 3 steps finished
    (tmp_path / checkpointing.HISTORY_FILE).write_text(saved)
    with caplog.at_level(logging.WARNING, logger="byol_tf"):
        backup = checkpointing.TrainingBackup(str(tmp_path), compiled(TINY), steps_per_epoch=3)
        assert backup.restore() == 4
    assert backup.history == expected
    assert ("is unreadable" in caplog.text) == (not expected)
