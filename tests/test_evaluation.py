"""Tests for byol_tf.evaluation (both linear protocols, kNN, baselines) and `byol-tf eval`."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from fixtures import synthetic

from byol_tf import augment, evaluation
from fixtures import images as fx
from fixtures import models
from byol_tf.config import AugmentConfig, Config, EvaluationConfig, NetworkConfig, ViewConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAST = EvaluationConfig(linear_epochs=10, linear_batch_size=64, l2_sweep=(0.0, 1e-4, 1e-2), validation_fraction=0.2)


def _blobs(num, num_classes=4, dim=8, spread=3.0, seed=0):
    """Gaussian blobs: linearly separable with high probability at spread 3."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(num_classes, dim)) * spread
    labels = rng.integers(0, num_classes, num)
    return (centers[labels] + rng.normal(size=(num, dim))).astype(np.float32), labels


def _colour_images(num, size=20, seed=0):
    """Class c = a dominant colour (red, green, blue, grey) under noise: any crop or flip keeps it."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, num)
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [120, 120, 120]])
    images = base[labels][:, None, None, :] + rng.normal(0, 30, size=(num, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _mean_colour_encoder(size=16):
    inputs = keras.Input((size, size, 3))
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))


def _tiny_convnet(size=16, seed=0):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", kernel_initializer=keras.initializers.HeNormal(seed))(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


# ------------------------------------------------------------------ linear protocol


def test_linear_evaluation_separable_reaches_full_accuracy():
    x, y = _blobs(600)
    result = evaluation.linear_evaluation(x[:400], y[:400], x[400:], y[400:], 4, FAST)
    assert result["top1"] >= 0.98
    assert result["top5"] == 1.0  # 4 classes: top-5 is 1.0 by definition
    assert result["num_train"] == 400 and result["num_test"] == 200
    assert result["l2"] in FAST.l2_sweep
    assert set(result["sweep"]) == set(FAST.l2_sweep)
    assert result["val_top1"] == result["sweep"][result["l2"]]


def test_linear_evaluation_random_labels_stay_near_chance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(800, 16)).astype(np.float32)
    y = rng.integers(0, 4, 800)
    result = evaluation.linear_evaluation(x[:600], y[:600], x[600:], y[600:], 4, FAST)
    assert result["top1"] < 0.40  # chance 0.25; 200 test examples give a std of ~0.03


def test_linear_classifier_learns_without_standardization_and_is_seeded():
    x, y = _blobs(300)
    first = evaluation.train_linear_classifier(x, y, 4, 0.0, 5, 32, 0.1, seed=3, standardize=False)
    again = evaluation.train_linear_classifier(x, y, 4, 0.0, 5, 32, 0.1, seed=3, standardize=False)
    other = evaluation.train_linear_classifier(x, y, 4, 0.0, 5, 32, 0.1, seed=4, standardize=False)
    np.testing.assert_array_equal(first.kernel, again.kernel)
    assert not np.array_equal(first.kernel, other.kernel)
    assert np.all(first.mean == 0) and np.all(first.std == 1)
    assert evaluation.top_k_accuracy(first.logits(x), y, 1) > 0.95


def test_l2_penalty_shrinks_the_kernel():
    x, y = _blobs(300)
    free = evaluation.train_linear_classifier(x, y, 4, 0.0, 5, 32, 0.2)
    penalised = evaluation.train_linear_classifier(x, y, 4, 0.1, 5, 32, 0.2)
    assert np.sum(penalised.kernel**2) < 0.5 * np.sum(free.kernel**2)


def test_standardization_uses_train_statistics():
    x, y = _blobs(200)
    x = x * np.arange(1, 9, dtype=np.float32) * 100 + 50
    classifier = evaluation.train_linear_classifier(x, y, 4, 0.0, 1, 32, 0.1)
    np.testing.assert_allclose(classifier.mean, x.mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(classifier.std, x.std(axis=0), rtol=1e-4)


def test_parts_larger_than_the_shuffle_budget_stream_from_the_file(monkeypatch, tmp_path):
    # Two records of features, a budget of 40 floats (5 rows of 8): the carved part streams
    # through a shuffle buffer instead of being read into memory; it learns as well.
    x, y = _blobs(300)
    features = evaluation._write_features([(x[:150], y[:150]), (x[150:], y[150:])], str(tmp_path / "f"), "train")
    mask = np.arange(300) % 4 != 0
    standardization = evaluation.standardization(x[mask])
    config = EvaluationConfig(linear_epochs=5, linear_batch_size=32)
    accuracies = {}
    for budget in (1 << 26, 40):
        monkeypatch.setattr(evaluation, "_SHUFFLE_FEATURE_ELEMENTS", budget)
        classifier = evaluation._fit_features(features, mask, 4, 0.0, config, 0, standardization)
        accuracies[budget] = evaluation.top_k_accuracy(classifier.logits(x[~mask]), y[~mask], 1)
    assert min(accuracies.values()) >= 0.95, accuracies


def test_l2_is_chosen_on_validation_not_test(monkeypatch):
    """l2=0 is right on the training distribution, l2=0.5 on the test set: 0 must win.

    The fake classifier predicts from feature column 0 (l2=0) or column 1 (l2=0.5);
    training / validation labels live in column 0, test labels in column 1.
    """
    num_classes = 3
    rng = np.random.default_rng(0)
    train_y = rng.integers(0, num_classes, 90)
    test_y = rng.integers(0, num_classes, 30)
    train_x = np.stack([train_y, (train_y + 1) % num_classes], axis=1).astype(np.float32)
    test_x = np.stack([(test_y + 1) % num_classes, test_y], axis=1).astype(np.float32)

    class Fake:
        def __init__(self, column):
            self.column = column

        def logits(self, features):
            return np.eye(num_classes, dtype=np.float32)[features[:, self.column].astype(int)]

    calls = []

    def fake_fit(train, mask, num_classes, l2, config, seed, standardization):
        calls.append((len(train.labels) if mask is None else int(mask.sum()), l2))
        return Fake(0 if l2 == 0.0 else 1)

    monkeypatch.setattr(evaluation, "_fit_features", fake_fit)
    config = EvaluationConfig(l2_sweep=(0.5, 0.0), validation_fraction=0.2)
    result = evaluation.linear_evaluation(train_x, train_y, test_x, test_y, num_classes, config)
    assert result["l2"] == 0.0 and result["swept"] == "l2"
    assert result["sweep"] == {0.5: 0.0, 0.0: 1.0} and result["val_top1"] == 1.0
    assert result["top1"] == 0.0  # the test set would have preferred 0.5
    # Sweep on the training part only, then one refit on the whole training split.
    assert calls == [(72, 0.5), (72, 0.0), (90, 0.0)]
    assert result["num_validation"] == 18


def test_chosen_l2_does_not_depend_on_test_labels():
    # Few examples, many noise dimensions: the L2 weight matters, so the sweep has a choice.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 100)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + 2 * (x[:, 2] > 0)
    config = EvaluationConfig(linear_epochs=5, linear_batch_size=32, l2_sweep=(0.0, 0.01, 1.0), validation_fraction=0.3)
    first = evaluation.linear_evaluation(x[:150], y[:150], x[150:], y[150:], 4, config)
    assert len(set(first["sweep"].values())) > 1
    permuted = np.random.default_rng(0).permutation(y[150:])
    second = evaluation.linear_evaluation(x[:150], y[:150], x[150:], permuted, 4, config)
    assert first["l2"] == second["l2"]
    assert first["sweep"] == second["sweep"]
    assert first["top1"] != second["top1"]


def test_single_l2_is_still_scored_on_validation():
    # The blessing reads val_top1, so a sweep of one value still trains on the carved
    # training part and scores the validation part (a reference built from the public
    # pieces: the same split, a classifier on the rest, its top-1 on the part).
    x, y = _blobs(200, spread=1.0)
    config = EvaluationConfig(linear_epochs=2, linear_batch_size=64, l2_sweep=(1e-4,), validation_fraction=0.25)
    result = evaluation.linear_evaluation(x[:150], y[:150], x[150:], y[150:], 4, config, seed=2)
    fit, val = evaluation.validation_split(y[:150], 0.25, seed=2)
    rate = config.linear_base_learning_rate
    classifier = evaluation.train_linear_classifier(x[fit], y[fit], 4, 1e-4, 2, 64, rate, seed=2)
    expected = evaluation.top_k_accuracy(classifier.logits(x[val]), y[val], 1)
    assert result["l2"] == 1e-4 and result["sweep"] == {1e-4: result["val_top1"]}
    assert result["val_top1"] == pytest.approx(expected)
    assert result["num_validation"] == len(val) and 0.0 < result["val_top1"] < 1.0


def test_top_k_accuracy_by_hand():
    logits = np.array([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    labels = np.array([1, 0])
    assert evaluation.top_k_accuracy(logits, labels, 1) == 0.0
    assert evaluation.top_k_accuracy(logits, labels, 2) == 0.5
    assert evaluation.top_k_accuracy(logits, labels, 5) == 0.5
    assert evaluation.top_k_accuracy(logits, labels, 6) == 1.0
    # Fewer classes than k: 1.0 by definition.
    assert evaluation.top_k_accuracy(np.array([[0.0, 1.0]]), np.array([0]), 5) == 1.0
    # A diverged classifier is wrong, not right.
    assert evaluation.top_k_accuracy(np.array([[np.nan, np.nan, np.nan]]), np.array([0]), 1) == 0.0


def test_top5_is_at_least_top1():
    x, y = _blobs(700, num_classes=10, dim=6, spread=0.8, seed=5)
    result = evaluation.linear_evaluation(x[:500], y[:500], x[500:], y[500:], 10, FAST)
    assert 0.1 < result["top1"] < 1.0
    assert result["top5"] >= result["top1"]
    assert result["top5"] < 1.0


def test_validation_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(5), [10, 20, 30, 2, 1])
    train, val = evaluation.validation_split(labels, 0.1, seed=0)
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    counts = np.bincount(labels[val], minlength=5)
    np.testing.assert_array_equal(counts, [1, 2, 3, 1, 0])  # a singleton class stays in train
    again, _ = evaluation.validation_split(labels, 0.1, seed=0)
    other, _ = evaluation.validation_split(labels, 0.1, seed=1)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)


# ------------------------------------------------------------------ streaming pieces


def test_moments_combine_and_group_match_numpy():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(103, 5)) * [1, 10, 100, 1e3, 1e-3] + 1e4).astype(np.float32)
    groups = rng.integers(0, 3, 103)
    batches = [(x[start : start + 16], np.zeros(16)) for start in range(0, 103, 16)]
    parts = evaluation._group_moments(batches, groups, 3)
    for group, part in enumerate(parts):
        rows = x[groups == group]
        assert part.count == len(rows)
        np.testing.assert_allclose(part.mean, rows.astype(np.float64).mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(part.m2, rows.astype(np.float64).var(axis=0) * len(rows), rtol=1e-9)
    mean, std = parts[0].combine(parts[1]).combine(parts[2]).standardization()
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std, x.astype(np.float64).std(axis=0), rtol=1e-5)
    # A constant dimension gets the floor, not a division by zero.
    np.testing.assert_array_equal(evaluation.Moments.of(np.ones((4, 2))).standardization()[1], np.float32(1e-6))


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_validation_folds_partition_each_class_evenly(folds):
    labels = np.random.default_rng(4).choice(5, size=203, p=[0.4, 0.3, 0.2, 0.08, 0.02])
    assignment = evaluation.validation_folds(labels, folds, seed=3)
    assert assignment.shape == labels.shape and set(np.unique(assignment)) == set(range(folds))
    sizes = np.bincount(assignment, minlength=folds)
    assert sizes.sum() == len(labels) and sizes.max() - sizes.min() <= 1
    for label in np.unique(labels):
        per_fold = np.bincount(assignment[labels == label], minlength=folds)
        assert per_fold.max() - per_fold.min() <= 1  # stratified: every class spread evenly
    np.testing.assert_array_equal(assignment, evaluation.validation_folds(labels, folds, seed=3))
    assert not np.array_equal(assignment, evaluation.validation_folds(labels, folds, seed=4))


def test_k_fold_sweep_pools_every_fold_against_a_reference():
    # Reference from the public pieces: for each fold, a classifier on the other folds
    # (standardised by their own moments, as train_linear_classifier does) and its top-1
    # on the fold; pooled = hits over all training examples.
    x, y = _blobs(150, spread=1.0)
    config = EvaluationConfig(linear_epochs=2, linear_batch_size=64, l2_sweep=(1e-4,), validation_folds=3)
    result = evaluation.linear_evaluation(x[:120], y[:120], x[120:], y[120:], 4, config, seed=2)
    assignment = evaluation.validation_folds(y[:120], 3, seed=2)
    hits = 0
    for fold in range(3):
        fit, held = assignment != fold, assignment == fold
        classifier = evaluation.train_linear_classifier(
            x[:120][fit], y[:120][fit], 4, 1e-4, 2, 64, config.linear_base_learning_rate, seed=2
        )
        hits += evaluation.top_k_accuracy(classifier.logits(x[:120][held]), y[:120][held], 1) * held.sum()
    assert result["num_validation"] == 120
    assert result["val_top1"] == pytest.approx(hits / 120)
    assert 0.0 < result["val_top1"] < 1.0


def test_k_fold_sweep_fits_every_fold_then_refits_once(monkeypatch):
    x, y = _blobs(100)

    class Fake:
        def __init__(self, mask):
            self.mask = mask

        def logits(self, features):
            return np.tile(np.eye(4, dtype=np.float32)[0], (len(features), 1))  # always class 0

    calls = []

    def fake_fit(train, mask, num_classes, l2, config, seed, standardization):
        calls.append((None if mask is None else mask.copy(), l2, standardization))
        return Fake(mask)

    monkeypatch.setattr(evaluation, "_fit_features", fake_fit)
    config = EvaluationConfig(l2_sweep=(0.5, 0.0), validation_folds=4)
    result = evaluation.linear_evaluation(x[:80], y[:80], x[80:], y[80:], 4, config, seed=1)
    assignment = evaluation.validation_folds(y[:80], 4, seed=1)
    # Two values x four folds, each fitted on the other three folds, then one refit on all.
    assert [l2 for _, l2, _ in calls] == [0.5] * 4 + [0.0] * 4 + [0.5]
    for index, (mask, _, (mean, std)) in enumerate(calls[:8]):
        np.testing.assert_array_equal(mask, assignment != index % 4)
        np.testing.assert_allclose(mean, x[:80][mask].mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(std, x[:80][mask].std(axis=0), rtol=1e-4)
    assert calls[-1][0] is None
    np.testing.assert_allclose(calls[-1][2][0], x[:80].mean(axis=0), rtol=1e-5, atol=1e-6)
    # Every training example is held out once: pooled top-1 of "always 0" = class 0's share.
    assert result["num_validation"] == 80
    assert result["sweep"][0.5] == pytest.approx(np.mean(y[:80] == 0))


def test_k_fold_needs_as_many_examples_as_folds():
    x, y = _blobs(8)
    config = EvaluationConfig(linear_epochs=1, validation_folds=5)
    with pytest.raises(ValueError, match=r"evaluation\.validation_folds=5 needs at least that many training examples, got 4"):
        evaluation.linear_evaluation(x[:4], y[:4], x[4:], y[4:], 4, config)


def test_feature_file_round_trip_and_label_checks(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3)).astype(np.float32)
    y = np.arange(10) % 4
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    features = evaluation._write_features(batches, str(tmp_path / "f.tfrecord"), "train")
    assert features.dim == 3 and features.labels.tolist() == y.tolist()
    read = list(features.batches(batch_size=3))
    np.testing.assert_array_equal(np.concatenate([batch[0] for batch in read]), x)
    mask = np.arange(10) % 3 == 0
    (chosen, labels), = features.batches(mask)
    np.testing.assert_array_equal(chosen, x[mask])
    assert labels.tolist() == y[mask].tolist()
    streamed = list(features.examples(mask).as_numpy_iterator())
    np.testing.assert_array_equal(np.stack([row["x"] for row in streamed]), x[mask])
    assert [row["label"] for row in streamed] == y[mask].tolist()
    with pytest.raises(evaluation.NoLabelsError, match="'test' split has unlabelled"):
        evaluation._write_features([(x[:2], np.array([0, -1]))], str(tmp_path / "g.tfrecord"), "test")
    with pytest.raises(ValueError, match="'train' split is empty"):
        evaluation._write_features([], str(tmp_path / "h.tfrecord"), "train")


def test_streaming_knn_matches_brute_force_and_breaks_ties_by_index(monkeypatch):
    # Small chunks: three query chunks, each a pass over a bank read four rows at a time.
    monkeypatch.setattr(evaluation, "_KNN_QUERY_ROWS", 10)
    monkeypatch.setattr(evaluation, "_KNN_CHUNK_ELEMENTS", 40)
    rng = np.random.default_rng(3)
    # Random rows, then each axis three times with different labels: a query's similarity
    # to an axis is exactly its coordinate, so those are exact ties the lowest index must win.
    train_x = np.concatenate([rng.normal(size=(15, 4)), np.tile(np.eye(4), (3, 1))]).astype(np.float32)
    train_y = rng.integers(0, 3, len(train_x))
    test_x = rng.normal(size=(25, 4)).astype(np.float32)
    test_y = rng.integers(0, 3, 25)
    train = evaluation._Features.from_arrays(train_x, train_y)
    test = evaluation._Features.from_arrays(test_x, test_y)
    for k in (1, 3, 8):
        expected = _knn_reference(train_x, train_y, test_x, 3, k, 0.1)
        streamed = evaluation._knn_predictions(test_x, train.batches(batch_size=4), 3, k, 0.1)
        np.testing.assert_array_equal(streamed, expected)
        in_memory = evaluation.knn_predict(train_x, train_y, test_x, 3, k, 0.1, chunk_size=7)
        np.testing.assert_array_equal(in_memory, expected)
        accuracy = evaluation._streaming_knn_accuracy(train, test, 3, k, 0.1)
        assert accuracy == pytest.approx(np.mean(expected == test_y))


# ------------------------------------------------------------------------------ kNN


def _knn_reference(train_x, train_y, test_x, num_classes, k, temperature):
    """Brute force in float64: full similarity matrix, full sort."""
    bank = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    queries = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    similarity = queries.astype(np.float64) @ bank.T.astype(np.float64)
    predictions = []
    for row in similarity:
        neighbours = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for index in neighbours:
            votes[train_y[index]] += np.exp(row[index] / temperature)
        predictions.append(np.argmax(votes))
    return np.array(predictions)


@pytest.mark.parametrize("k, temperature, chunk_size", [(1, 0.07, None), (5, 0.07, 7), (20, 0.5, 3), (100, 0.1, None)])
def test_knn_matches_brute_force_reference(k, temperature, chunk_size):
    rng = np.random.default_rng(k)
    train_x = rng.normal(size=(60, 5)).astype(np.float32)
    train_y = rng.integers(0, 4, 60)
    test_x = rng.normal(size=(25, 5)).astype(np.float32)
    test_y = rng.integers(0, 4, 25)
    expected = _knn_reference(train_x, train_y, test_x, 4, min(k, 60), temperature)
    predictions = evaluation.knn_predict(train_x, train_y, test_x, 4, k, temperature, chunk_size)
    np.testing.assert_array_equal(predictions, expected)
    accuracy = evaluation.knn_accuracy(train_x, train_y, test_x, test_y, 4, k, temperature, chunk_size)
    assert accuracy == np.mean(expected == test_y)


def test_knn_uses_cosine_not_euclidean_distance():
    # Query (10, 1) points the same way as class 0's (100, 10) but is Euclid-closer to
    # class 1's (9, -20).
    train_x = np.array([[100.0, 10.0], [9.0, -20.0]], np.float32)
    predictions = evaluation.knn_predict(train_x, np.array([0, 1]), np.array([[10.0, 1.0]], np.float32), 2, k=1)
    assert predictions.tolist() == [0]


def test_knn_of_separating_encoder_beats_random_init():
    images, labels = synthetic.quadrant_images(240)
    accuracies = {}
    for name, encoder in (("trained", synthetic.quadrant_encoder()), ("random", _tiny_convnet(seed=1))):
        features = evaluation.extract_features(encoder, images, 16, batch_size=64, progress=False)
        accuracies[name] = evaluation.knn_accuracy(features[:160], labels[:160], features[160:], labels[160:], 4)
    assert accuracies["trained"] >= 0.95
    assert accuracies["trained"] > accuracies["random"] + 0.2


# ----------------------------------------------------------------------- features


def test_extract_features_is_centre_crop_then_frozen_encoder():
    encoder = _tiny_convnet()
    # Non-trivial moving statistics: a training-mode call would give other numbers.
    batch_norm = encoder.layers[2]
    batch_norm.moving_mean.assign([0.1, -0.2, 0.3, 0.0])
    batch_norm.moving_variance.assign([2.0, 0.5, 1.0, 3.0])
    images = np.random.default_rng(0).integers(0, 256, size=(7, 20, 24, 1), dtype=np.uint8)
    features = evaluation.extract_features(encoder, images, 16, batch_size=3, progress=False)
    expected = encoder(augment.center_crop_resize(images, 16), training=False)
    assert features.shape == (7, 4) and features.dtype == np.float32
    np.testing.assert_allclose(features, keras.ops.convert_to_numpy(expected), atol=1e-6)
    empty = evaluation.extract_features(encoder, images[:0], 16, progress=False)
    assert empty.shape == (0, 4)


def test_pixel_features_flatten_the_centre_crop_and_cap_the_size():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 20, 20, 3), dtype=np.uint8)
    features = evaluation.pixel_features(images, 16)
    np.testing.assert_allclose(features, augment.center_crop_resize(images, 16).numpy().reshape(3, -1))
    large = np.zeros((2, 64, 64, 3), np.uint8)
    assert evaluation.pixel_features(large, 64).shape == (2, 32 * 32 * 3)


# ------------------------------------------------------------------------- evaluate


def _toy_config(**evaluation_overrides):
    settings = dict(linear_epochs=8, linear_batch_size=64, l2_sweep=(0.0, 1e-3), knn_k=5)
    settings.update(evaluation_overrides)
    return Config(
        augment=AugmentConfig(image_size=16),
        network=NetworkConfig(encoder="small_convnet", sync_batchnorm=False),
        evaluation=EvaluationConfig(**settings),
    )


ROW_KEYS = {
    "top1", "top5", "val_top1", "l2", "learning_rate", "swept", "sweep", "num_train", "num_validation",
    "num_test", "knn_top1", "feature_dim", "seconds",
}


def test_evaluate_reports_three_rows_and_serialises():
    images, labels = synthetic.quadrant_images(200)
    arrays = (images[:140], labels[:140], images[140:], labels[140:])
    report = evaluation.evaluate(synthetic.quadrant_encoder(), _toy_config(), arrays=arrays, progress=False)
    assert report.protocol == "transfer"
    assert list(report.rows) == ["byol", "random_init", "raw_pixels"]
    _, validation = evaluation.validation_split(labels[:140], 0.1, seed=0)
    for row in report.rows.values():
        assert set(row) == ROW_KEYS
        assert 0.0 <= row["top1"] <= row["top5"] <= 1.0
        assert row["num_train"] == 140 and row["num_test"] == 60 and row["num_validation"] == len(validation)
        assert 0.0 <= row["knn_top1"] <= 1.0
        assert row["swept"] == "l2" and row["val_top1"] == row["sweep"][row["l2"]]
        assert row["learning_rate"] == 0.2
    assert report.rows["byol"]["top1"] >= 0.95
    assert report.rows["byol"]["feature_dim"] == 12
    assert report.rows["random_init"]["feature_dim"] == 256  # small_convnet at width 1
    assert report.rows["raw_pixels"]["feature_dim"] == 16 * 16 * 3
    table = report.format_table().splitlines()
    assert len(table) == 3 + 3 and "transfer protocol" in table[0]
    assert [line.split()[0] for line in table[3:]] == ["byol", "random_init", "raw_pixels"]
    # The validation column sits after top-1 and top-5.
    assert float(table[3].split()[3]) == pytest.approx(100 * report.rows["byol"]["val_top1"], abs=0.01)
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert set(as_dict) == {"protocol", "num_classes", "num_train", "num_test", "rows"}
    assert as_dict["protocol"] == "transfer"
    assert as_dict["num_classes"] == 4 and set(as_dict["rows"]) == set(report.rows)
    assert as_dict["rows"]["byol"]["top1"] == report.rows["byol"]["top1"]
    assert as_dict["rows"]["byol"]["val_top1"] == report.rows["byol"]["val_top1"]


def test_transfer_protocol_reads_datasets_as_it_reads_arrays():
    images, labels = synthetic.quadrant_images(120)
    arrays = (images[:80], labels[:80], images[80:], labels[80:])
    config = _toy_config(l2_sweep=(0.0, 1e-2), linear_epochs=3)
    from_arrays = evaluation.evaluate(synthetic.quadrant_encoder(), config, arrays=arrays, baselines=False, progress=False)

    def dataset(images, labels):
        # Each element made when read, from its index.
        images, labels = tf.constant(images), tf.constant(labels)
        return tf.data.Dataset.range(len(labels)).map(
            lambda index: {"image": tf.gather(images, index), "label": tf.gather(labels, index)}
        )

    datasets = (dataset(images[:80], labels[:80]), dataset(images[80:], labels[80:]))
    from_datasets = evaluation.evaluate(synthetic.quadrant_encoder(), config, datasets=datasets, baselines=False, progress=False)
    for report in (from_arrays, from_datasets):
        report.rows["byol"].pop("seconds")
    assert from_arrays.rows == from_datasets.rows
    with pytest.raises(ValueError, match="datasets or arrays, not both"):
        evaluation.evaluate(synthetic.quadrant_encoder(), config, datasets=datasets, arrays=arrays, progress=False)


def test_evaluate_without_baselines_and_the_random_init_is_reseeded():
    images, labels = synthetic.quadrant_images(120)
    arrays = (images[:80], labels[:80], images[80:], labels[80:])
    report = evaluation.evaluate(synthetic.quadrant_encoder(), _toy_config(), arrays=arrays, baselines=False, progress=False)
    assert list(report.rows) == ["byol"]
    config = _toy_config(l2_sweep=(0.0,), linear_epochs=1)
    first = evaluation.evaluate(synthetic.quadrant_encoder(), config, arrays=arrays, seed=3, progress=False)
    again = evaluation.evaluate(synthetic.quadrant_encoder(), config, arrays=arrays, seed=3, progress=False)
    assert first.rows["random_init"]["top1"] == again.rows["random_init"]["top1"]
    assert first.rows["random_init"]["knn_top1"] == again.rows["random_init"]["knn_top1"]


@pytest.mark.parametrize("protocol", ["transfer", "imagenet"])
def test_evaluate_rejects_unlabelled_data(protocol):
    images, labels = synthetic.quadrant_images(40)
    arrays = (images[:20], labels[:20], images[20:], -np.ones(20, np.int64))
    with pytest.raises(evaluation.NoLabelsError, match="'test' split has unlabelled"):
        evaluation.evaluate(synthetic.quadrant_encoder(), _toy_config(protocol=protocol), arrays=arrays, progress=False)


# ------------------------------------------------------------------ imagenet protocol


def _images_dataset(images, labels):
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": np.asarray(labels, np.int64)})


def test_imagenet_protocol_end_to_end_with_the_random_init_baseline():
    images, labels = _colour_images(120)
    datasets = (_images_dataset(images[:80], labels[:80]), _images_dataset(images[80:], labels[80:]))
    config = _toy_config(protocol="imagenet", learning_rate_sweep=(0.4, 0.05), linear_epochs=3, validation_fraction=0.2)
    report = evaluation.evaluate(_mean_colour_encoder(), config, datasets=datasets, progress=False)
    assert report.protocol == "imagenet"
    assert list(report.rows) == ["byol", "random_init"]  # raw pixels: transfer only
    _, validation = evaluation.validation_split(labels[:80], 0.2, seed=0)
    for row in report.rows.values():
        assert set(row) == ROW_KEYS
        assert row["swept"] == "learning_rate" and set(row["sweep"]) == {0.4, 0.05}
        assert row["val_top1"] == row["sweep"][row["learning_rate"]] and row["l2"] == 0.0
        assert row["knn_top1"] is None
        assert row["num_train"] == 80 and row["num_test"] == 40 and row["num_validation"] == len(validation)
    byol = report.rows["byol"]
    assert byol["top1"] >= 0.95 and byol["val_top1"] >= 0.9 and byol["feature_dim"] == 3
    table = report.format_table().splitlines()
    assert "imagenet protocol" in table[0] and [line.split()[0] for line in table[3:]] == ["byol", "random_init"]
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["protocol"] == "imagenet" and as_dict["rows"]["random_init"]["knn_top1"] is None
    assert as_dict["rows"]["byol"]["sweep"] == {"0.4": byol["sweep"][0.4], "0.05": byol["sweep"][0.05]}


def test_imagenet_protocol_trains_on_fresh_crops_and_tests_on_centre_crops():
    rng = np.random.default_rng(0)
    # Larger than the 16 px input: the test-time centre crop is 0.875 of the image.
    images = rng.integers(0, 256, size=(30, 24, 24, 3), dtype=np.uint8)
    labels = np.tile([0, 1, 2], 10)
    log = []

    class Recorder(keras.layers.Layer):
        """Passes images through and keeps every batch the encoder sees at run time."""

        def call(self, batch):
            done = tf.py_function(lambda seen: log.append(seen.numpy()) or np.float32(0), [batch], tf.float32)
            with tf.control_dependencies([done]):
                return tf.identity(batch)

    inputs = keras.Input((16, 16, 3))
    encoder = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(Recorder()(inputs)))
    config = _toy_config(
        protocol="imagenet", learning_rate_sweep=(0.1,), linear_epochs=2, standardize=False, validation_fraction=0.25
    )
    arrays = (images[:24], labels[:24], images[24:], labels[24:])
    report = evaluation.evaluate(encoder, config, arrays=arrays, baselines=False, progress=False)
    fit, validation = evaluation.validation_split(labels[:24], 0.25, seed=0)
    # Two epochs on the carved part, its validation part, two epochs on all of train, test.
    assert [len(batch) for batch in log] == [len(fit), len(fit), len(validation), 24, 24, 6]
    assert report.rows["byol"]["num_validation"] == len(validation)

    def centre(x):
        return augment.center_crop_resize(x, 16).numpy()

    def nearest(rows, candidates):
        return np.abs(rows[:, None] - candidates[None]).max(axis=(2, 3, 4)).min(axis=1)

    # Training inputs are crops redrawn every epoch, never the centre crop.
    assert nearest(log[1], log[0]).min() > 1e-3
    assert nearest(log[0], centre(images[:24][fit])).min() > 1e-3
    assert nearest(log[3], centre(images[:24])).min() > 1e-3
    # Validation and test inputs are the centre crops, in order.
    np.testing.assert_allclose(log[2], centre(images[:24][validation]), atol=1e-6)
    np.testing.assert_allclose(log[5], centre(images[24:]), atol=1e-6)


def _channel_reader(channel):
    """A classifier saying class 1 when the channel's mean is above 0.5."""
    kernel = np.zeros((3, 2), np.float32)
    kernel[channel] = [-1.0, 1.0]
    bias = np.array([0.5, -0.5], np.float32)
    return evaluation.LinearClassifier(kernel, bias, np.zeros(3, np.float32), np.ones(3, np.float32))


def test_imagenet_learning_rate_is_chosen_on_validation_not_test(monkeypatch):
    """The classifier fitted at 0.3 reads red, at 0.1 green; train says red, test says green.

    Validation (carved from train) must pick 0.3 although the test set would pick 0.1.
    """

    train_labels, test_labels = np.tile([0, 1], 20), np.tile([0, 1], 5)
    arrays = (synthetic.channel_images(train_labels, 0), train_labels, synthetic.channel_images(test_labels, 1), test_labels)

    calls = []

    def fake_fit(splits, mask, run_epochs, dim, num_classes, base_learning_rate, config, seed, standardization):
        calls.append((len(splits.train_labels) if mask is None else int(mask.sum()), base_learning_rate))
        return _channel_reader(0 if base_learning_rate == 0.3 else 1)

    monkeypatch.setattr(evaluation, "_fit_images", fake_fit)
    config = _toy_config(protocol="imagenet", learning_rate_sweep=(0.1, 0.3), validation_fraction=0.25)
    report = evaluation.evaluate(_mean_colour_encoder(), config, arrays=arrays, baselines=False, progress=False)
    row = report.rows["byol"]
    assert row["learning_rate"] == 0.3 and row["sweep"] == {0.1: 0.0, 0.3: 1.0} and row["val_top1"] == 1.0
    assert row["top1"] == 0.0  # the test set would have preferred 0.1
    assert calls == [(30, 0.1), (30, 0.3), (40, 0.3)]


def test_imagenet_protocol_sweeps_over_folds(monkeypatch):
    labels = np.tile([0, 1], 20)
    arrays = (synthetic.channel_images(labels, 0), labels, synthetic.channel_images(labels[:10], 0), labels[:10])
    calls = []

    def fake_fit(splits, mask, run_epochs, dim, num_classes, base_learning_rate, config, seed, standardization):
        calls.append((None if mask is None else int(mask.sum()), base_learning_rate))
        return _channel_reader(0 if base_learning_rate == 0.3 else 1)  # channel 1: always wrong

    monkeypatch.setattr(evaluation, "_fit_images", fake_fit)
    config = _toy_config(protocol="imagenet", learning_rate_sweep=(0.1, 0.3), validation_folds=4)
    report = evaluation.evaluate(_mean_colour_encoder(), config, arrays=arrays, baselines=False, progress=False)
    row = report.rows["byol"]
    assert calls == [(30, 0.1)] * 4 + [(30, 0.3)] * 4 + [(None, 0.3)]
    assert row["num_validation"] == 40 and row["sweep"] == {0.1: 0.0, 0.3: 1.0} and row["learning_rate"] == 0.3


def _whole_image_view(flip_prob=0.0):
    return ViewConfig(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=flip_prob,
        color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0,
    )


def test_linear_training_dataset_epochs_are_reshuffled_and_recropped():
    images = np.random.default_rng(0).integers(0, 256, size=(10, 12, 12, 3), dtype=np.uint8)
    source = _images_dataset(images, np.arange(10))
    # Whole-image crops at the image's own size are the image itself; a flip mirrors it.
    for flip, expected in ((0.0, images / 255.0), (1.0, images[:, :, ::-1] / 255.0)):
        dataset = evaluation.linear_training_dataset(
            source, 12, _whole_image_view(flip), 4, seed=1, epochs=2, shuffle_buffer=10
        )
        batches = list(dataset.as_numpy_iterator())
        assert [len(batch["label"]) for batch in batches] == [4, 4, 2, 4, 4, 2]  # per-epoch partial batches
        first, second = (np.concatenate([batch["label"] for batch in part]) for part in (batches[:3], batches[3:]))
        assert sorted(first) == sorted(second) == list(range(10)) and first.tolist() != second.tolist()
        for batch in batches:
            np.testing.assert_allclose(batch["x"], expected[batch["label"]], atol=1e-6)
    # The paper's crops: every image gets a new crop in the next epoch.
    view = evaluation.linear_view(EvaluationConfig())
    epochs = list(evaluation.linear_training_dataset(source, 8, view, 10, seed=1, epochs=2, shuffle_buffer=10))
    crops = [batch["x"].numpy()[np.argsort(batch["label"].numpy())] for batch in epochs]
    assert crops[0].shape == (10, 8, 8, 3)
    assert np.abs(crops[0] - crops[1]).max(axis=(1, 2, 3)).min() > 1e-3


def test_linear_training_dataset_crops_images_of_different_sizes():
    images = np.random.default_rng(0).integers(0, 256, size=(6, 12, 12, 3), dtype=np.uint8)
    # Heights 8 to 12: the element spec has an unknown height.
    source = _images_dataset(images, np.arange(6)).map(
        lambda example: {"image": example["image"][: 8 + example["label"] % 5], "label": example["label"]}
    )
    batches = list(evaluation.linear_training_dataset(source, 8, _whole_image_view(), 4, seed=0, shuffle_buffer=6))
    assert [len(batch["label"]) for batch in batches] == [4, 2]
    for batch in batches:
        for crop, label in zip(batch["x"].numpy(), batch["label"].numpy()):
            # A square crop of the whole area does not fit a non-square image: the largest
            # centred square, as a centre crop of fraction 1.
            expected = augment.center_crop_resize(images[label][: 8 + label % 5], 8, crop_fraction=1.0)
            np.testing.assert_allclose(crop, expected, atol=1e-6)


_MEMORY_SCRIPT = """
import json, os, resource, sys
import keras, tensorflow as tf
from byol_tf import evaluation
from byol_tf.config import AugmentConfig, Config, DataConfig, EvaluationConfig

num = int(sys.argv[1])


def example(index):
    # The source holds nothing: each image is drawn from its index when read.
    image = tf.random.stateless_uniform([64, 64, 3], tf.stack([index, 0]), maxval=256, dtype=tf.int32)
    return {"image": tf.cast(image, tf.uint8), "label": index % 10}


train = tf.data.Dataset.range(num).map(example)
test = tf.data.Dataset.range(num, num + num // 4).map(example)
inputs = keras.Input((32, 32, 3))
features = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
encoder = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(features))
config = Config(
    data=DataConfig(shuffle_buffer=1000),
    augment=AugmentConfig(image_size=32),
    evaluation=EvaluationConfig(protocol="imagenet", linear_epochs=1, learning_rate_sweep=(0.1,)),
)
report = evaluation.evaluate(encoder, config, datasets=(train, test), baselines=False, progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_rss_kb": peak, "num_train": report.num_train, "num_test": report.num_test}))
"""


@pytest.mark.slow
def test_imagenet_protocol_peak_memory_does_not_grow_with_the_number_of_images():
    # Each size in a fresh process: peak RSS is a high-water mark of the whole process.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    peaks = {}
    for num in (5000, 20000):
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, str(num)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert (result["num_train"], result["num_test"]) == (num, num // 4)
        peaks[num] = result["peak_rss_kb"]
    # 20,000 images of 64 x 64 x 3 bytes are 246 MB: holding them would show.
    assert abs(peaks[20000] - peaks[5000]) <= 0.1 * peaks[5000], peaks


# ----------------------------------------------------------------------------- CLI


def test_cli_eval_prints_the_table_and_writes_json(tmp_path, capsys):
    from byol_tf import cli

    config_path = tmp_path / "digits.yaml"
    config_path.write_text(
        "data: {source: digits, max_examples: 240, holdout_examples: 80}\n"
        "augment: {image_size: 8}\n"
        "network: {encoder: small_convnet, sync_batchnorm: false}\n"
        "evaluation: {linear_epochs: 3, linear_batch_size: 64, l2_sweep: [0.0, 0.001]}\n"
    )
    encoder_path = str(tmp_path / "encoder.keras")
    _tiny_convnet(size=8).save(encoder_path)
    out = str(tmp_path / "report" / "evaluation.json")
    argv = ["eval", "--encoder", encoder_path, "--config", str(config_path), "--set", "train.seed=1", "--out", out]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "160 train / 80 test images" in printed
    for name in ("byol", "random_init", "raw_pixels"):
        assert f"\n{name} " in printed
    with open(out) as stream:
        report = json.load(stream)
    assert list(report["rows"]) == ["byol", "random_init", "raw_pixels"]
    assert report["num_train"] == 160 and report["num_test"] == 80
    # A missing encoder is one clear line, not a traceback.
    assert cli.main(["eval", "--encoder", str(tmp_path / "nope.keras"), "--config", str(config_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
