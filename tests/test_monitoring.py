"""Tests for byol_tf.monitoring: the kNN monitor, its class-balanced subset, the collapse guard."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from fixtures import images as fx
from fixtures import synthetic

from byol_tf import augment, data, monitoring
from byol_tf import config as config_lib


class WithEncoder(keras.Model):
    """A trainable model exposing `.encoder`, as BYOLModel does."""

    def __init__(self, encoder):
        super().__init__()
        self.inner = encoder
        self.head = keras.layers.Dense(1)

    @property
    def encoder(self):
        return self.inner

    def call(self, images):
        return self.head(self.inner(images))


def test_knn_monitor_logs_every_n_epochs_before_tensorboard(tmp_path):
    images, labels = synthetic.quadrant_images(80)
    monitor = monitoring.KNNMonitor(
        images[:60], labels[:60], images[60:], labels[60:], image_size=16, every_epochs=2, k=5
    )
    model = WithEncoder(synthetic.quadrant_encoder())
    model.compile(optimizer="sgd", loss="mse")
    inputs = augment.center_crop_resize(images, 16).numpy()
    history = model.fit(
        inputs,
        np.zeros((80, 1), np.float32),
        epochs=4,
        batch_size=40,
        verbose=0,
        callbacks=[monitor, keras.callbacks.TensorBoard(str(tmp_path), update_freq="epoch")],
    )
    assert [epoch for epoch, _ in monitor.history] == [2, 4]
    assert monitor.history[0][1] >= 0.95
    # History sees the key only on the epochs that measured it.
    assert history.history["knn_accuracy"] == [accuracy for _, accuracy in monitor.history]
    logged = {}
    for path in glob.glob(os.path.join(str(tmp_path), "train", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "epoch_knn_accuracy":
                    logged[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(logged) == [1, 3]  # TensorBoard's epoch steps count from 0
    assert logged[1] == pytest.approx(monitor.history[0][1])


# ------------------------------------------------------------------ balanced subsets


@pytest.mark.parametrize("count", [1, 7, 40, 200])
def test_balanced_indices_spread_over_classes(count):
    # Sorted by class and unequal: 50 of class 0, 30 of class 1, 5 of class 2, 15 unlabelled.
    labels = np.array([0] * 50 + [1] * 30 + [2] * 5 + [-1] * 15)
    chosen = data.balanced_indices(labels, count, seed=3)
    assert len(chosen) == min(count, 85) and len(set(chosen)) == len(chosen)
    assert np.all(labels[chosen] >= 0) and np.all(np.diff(chosen) > 0)
    counts = np.bincount(labels[chosen], minlength=3)
    # Round robin: no class has two more than another unless the other ran out.
    available = np.array([50, 30, 5])
    for a in range(3):
        for b in range(3):
            if counts[a] > counts[b] + 1:
                assert counts[b] == available[b]
    np.testing.assert_array_equal(chosen, data.balanced_indices(labels, count, seed=3))  # seeded


def test_balanced_indices_depend_on_the_seed():
    labels = np.repeat(np.arange(4), 25)
    assert not np.array_equal(data.balanced_indices(labels, 8, seed=0), data.balanced_indices(labels, 8, seed=1))


def _sorted_folder(root, classes=5, per_class=12):
    """A folder of class sub-folders, files named so that listing order is class order."""
    return fx.clean_folder(root, classes=classes, per_class=per_class)


def test_knn_monitor_from_config_is_class_balanced_on_a_folder_sorted_by_class(tmp_path):
    folder = _sorted_folder(str(tmp_path / "images"))
    config = config_lib.from_dict(
        {
            "data": {"source": "folder", "path": folder, "holdout_examples": 20},
            "augment": {"image_size": 16},
            "evaluation": {"knn_examples": 10, "knn_every_epochs": 3, "knn_k": 3},
        }
    )
    monitor = monitoring.KNNMonitor.from_config(config)
    assert monitor.train_images.shape == (10, 16, 16, 3) and monitor.train_images.dtype == np.uint8
    # 5 classes, 10 images: two of each (the first 10 files would be classes 0 and 1 only).
    assert np.bincount(monitor.train_labels, minlength=5).tolist() == [2, 2, 2, 2, 2]
    assert len(np.unique(monitor.test_labels)) >= 4
    assert monitor.every_epochs == 3 and monitor.k == 3 and monitor.num_classes == 5


def test_balanced_subset_of_a_tfrecord_stream_sorted_by_class(tmp_path):
    records = [fx.tf_example(fx.png(label), label) for label in range(4) for _ in range(10)]
    path = fx.write_tfrecord(str(tmp_path / "sorted.tfrecord"), records)
    cfg = config_lib.DataConfig(source="tfrecord", path=path, holdout_examples=0, eval_split=path)
    images, labels = data.load_balanced_subset(cfg, "train", 8, seed=0, image_size=fx.SIDE)
    assert images.shape == (8, fx.SIDE, fx.SIDE, 3)
    assert np.bincount(labels, minlength=4).tolist() == [2, 2, 2, 2]


def test_knn_monitor_from_config_on_the_embedded_digits():
    config = config_lib.from_dict(
        {
            "data": {"source": "digits", "max_examples": 300, "holdout_examples": 100},
            "augment": {"image_size": 8},
            "evaluation": {"knn_examples": 40, "knn_every_epochs": 3, "knn_k": 7},
        }
    )
    monitor = monitoring.KNNMonitor.from_config(config)
    assert monitor.train_images.shape == (40, 8, 8, 3) and monitor.test_images.shape == (40, 8, 8, 3)
    assert np.bincount(monitor.train_labels, minlength=10).tolist() == [4] * 10
    assert monitor.num_classes == 10


# ------------------------------------------------------------------ collapse guard


class _Projections(keras.Model):
    projection_dim = 16


@pytest.mark.parametrize("value, warned", [(0.25 / 4, False), (0.001, True)])
def test_collapse_guard_warns_below_a_tenth_of_one_over_sqrt_dim(value, warned, caplog):
    guard = monitoring.CollapseGuard(stop=True)
    guard.set_model(_Projections())
    guard.model.stop_training = False
    with caplog.at_level("WARNING", logger="byol_tf"):
        guard.on_epoch_end(0, {"collapse_std": value})
    assert bool(guard.collapsed_epochs) is warned
    assert guard.model.stop_training is warned
    assert ("may be collapsing" in caplog.text) is warned


# ------------------------------------------------------------------ embedding projector


def test_projector_logger_writes_the_trained_encoders_features_at_the_end(tmp_path):
    from byol_tf import embedding_projector, evaluation

    images, labels = synthetic.quadrant_images(20)
    logger = monitoring.ProjectorLogger(images[:9], labels[:9], str(tmp_path / "logs"), image_size=16)
    model = WithEncoder(synthetic.quadrant_encoder())
    model.compile(optimizer="sgd", loss="mse")
    inputs = augment.center_crop_resize(images, 16).numpy()
    model.fit(inputs, np.zeros((20, 1)), epochs=1, verbose=0, callbacks=[logger])

    folder = str(tmp_path / "logs" / embedding_projector.RUN_NAME)
    assert logger.written == folder
    stored = tf.train.load_checkpoint(tf.train.latest_checkpoint(folder)).get_tensor(embedding_projector.TENSOR_NAME)
    expected = evaluation.extract_features(model.encoder, images[:9], 16, progress=False)
    np.testing.assert_allclose(stored, expected, rtol=1e-6)


def test_projector_logger_from_config_is_class_balanced(tmp_path):
    config = config_lib.from_dict(
        {
            "data": {"source": "digits", "max_examples": 300, "holdout_examples": 100},
            "augment": {"image_size": 8},
            "evaluation": {"projector_images": 30},
        }
    )
    logger = monitoring.ProjectorLogger.from_config(config, str(tmp_path))
    assert logger.images.shape == (30, 8, 8, 3) and logger.images.dtype == np.uint8
    assert np.bincount(logger.labels, minlength=10).tolist() == [3] * 10


def test_projector_logger_from_config_shows_unlabelled_images_too(tmp_path):
    folder = tmp_path / "images"
    for index in range(10):  # no class sub-folders: label -1
        fx.write(str(folder / f"{index:02d}.png"), fx.png(index, (20, 12, 3)))
    config = config_lib.from_dict(
        {
            "data": {"source": "folder", "path": str(folder), "holdout_examples": 4},
            "augment": {"image_size": 8},
            "evaluation": {"projector_images": 3},
        }
    )
    logger = monitoring.ProjectorLogger.from_config(config, str(tmp_path))
    assert logger.images.shape == (3, 8, 8, 3)
    assert logger.labels.tolist() == [-1, -1, -1]
    # The held-out images, centre-cropped as the encoder sees them.
    held_out = next(iter(data.load_split(config.data, "test").batch(3)))["image"]
    expected = tf.cast(tf.round(augment.center_crop_resize(held_out, 8) * 255.0), tf.uint8).numpy()
    np.testing.assert_array_equal(logger.images, expected)
