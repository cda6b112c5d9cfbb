"""Fault tolerance of byol_tf.training: exact resume after SIGKILL, atomic backups, NaN guard.

The subprocess tests run tests/training_run.py (a tiny real-data run, deterministic ops on),
kill it, run the same command again and compare the final online and target weights with
an uninterrupted run.
"""

import dataclasses
import os
import random
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


def run_training(run_dir, out, *args, kill_at_step=None, timeout=300):
    """Runs tests/training_run.py; SIGKILLs it when its `kill_at_step`-th step begins.

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
                    process.send_signal(signal.SIGKILL)
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
    assert len(result.history["loss"]) == 1  # only epoch 2, which it finished
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


def test_backup_of_another_model_fails_with_a_clear_message(tmp_path):
    def compiled(config):
        with tf.distribute.get_strategy().scope():
            model = training.build_model(config, total_steps=6, num_classes=None)
            model.compile(optimizer=keras.optimizers.SGD(0.1))
        model.optimizer.build(model.trainable_variables)
        return model

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
