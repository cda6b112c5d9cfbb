"""Tests for byol_tf.evaluation (linear protocol, kNN, baselines) and `byol-tf eval`."""

import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf import augment, evaluation
from byol_tf.config import Config, EvaluationConfig, NetworkConfig, AugmentConfig

FAST = EvaluationConfig(linear_epochs=10, linear_batch_size=64, l2_sweep=(0.0, 1e-4, 1e-2), validation_fraction=0.2)


def _blobs(num, num_classes=4, dim=8, spread=3.0, seed=0):
    """Gaussian blobs: linearly separable with high probability at spread 3."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(num_classes, dim)) * spread
    labels = rng.integers(0, num_classes, num)
    return (centers[labels] + rng.normal(size=(num, dim))).astype(np.float32), labels


def _quadrant_images(num, size=16, seed=0):
    """Class c = a bright 4x4 square somewhere in quadrant c, on noise; uint8 [N, S, S, 3].

    Separable by where the square is, not by how much brightness there is, so a
    translation-invariant random network (conv + global pooling) cannot tell classes apart.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, num)
    images = rng.uniform(0, 60, size=(num, size, size, 3))
    half = size // 2
    for image, label in zip(images, labels):
        top = (label // 2) * half + rng.integers(1, half - 4)
        left = (label % 2) * half + rng.integers(1, half - 4)
        image[top : top + 4, left : left + 4] = 255
    return images.astype(np.uint8), labels


def _quadrant_encoder(size=16):
    """A "trained" encoder for `_quadrant_images`: mean brightness of each quadrant."""
    inputs = keras.Input((size, size, 3))
    pooled = keras.layers.AveragePooling2D(size // 2)(inputs)
    return keras.Model(inputs, keras.layers.Flatten()(pooled))


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

    def fake_train(x, y, num_classes, l2, **kwargs):
        calls.append((len(y), l2))
        return Fake(0 if l2 == 0.0 else 1)

    monkeypatch.setattr(evaluation, "train_linear_classifier", fake_train)
    config = EvaluationConfig(l2_sweep=(0.5, 0.0), validation_fraction=0.2)
    result = evaluation.linear_evaluation(train_x, train_y, test_x, test_y, num_classes, config)
    assert result["l2"] == 0.0
    assert result["sweep"] == {0.5: 0.0, 0.0: 1.0}
    assert result["top1"] == 0.0  # the test set would have preferred 0.5
    # Sweep on the training part only, then one refit on the whole training split.
    assert calls[:2] == [(72, 0.5), (72, 0.0)] and calls[2] == (90, 0.0)


def test_chosen_l2_does_not_depend_on_test_labels():
    # Few examples, many noise dimensions: the L2 weight matters, so the sweep has a choice.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 40)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + 2 * (x[:, 2] > 0)
    config = EvaluationConfig(linear_epochs=5, linear_batch_size=32, l2_sweep=(0.0, 0.01, 1.0), validation_fraction=0.3)
    first = evaluation.linear_evaluation(x[:150], y[:150], x[150:], y[150:], 4, config)
    assert len(set(first["sweep"].values())) > 1
    permuted = np.random.default_rng(0).permutation(y[150:])
    second = evaluation.linear_evaluation(x[:150], y[:150], x[150:], permuted, 4, config)
    assert first["l2"] == second["l2"]
    assert first["sweep"] == second["sweep"]
    assert first["top1"] != second["top1"]


def test_single_l2_skips_the_sweep():
    x, y = _blobs(200)
    config = EvaluationConfig(linear_epochs=2, linear_batch_size=64, l2_sweep=(1e-4,))
    result = evaluation.linear_evaluation(x[:150], y[:150], x[150:], y[150:], 4, config)
    assert result["l2"] == 1e-4 and result["val_top1"] is None and result["sweep"] == {}


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
    images, labels = _quadrant_images(240)
    accuracies = {}
    for name, encoder in (("trained", _quadrant_encoder()), ("random", _tiny_convnet(seed=1))):
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


def test_evaluate_reports_three_rows_and_serialises():
    images, labels = _quadrant_images(200)
    arrays = (images[:140], labels[:140], images[140:], labels[140:])
    report = evaluation.evaluate(_quadrant_encoder(), _toy_config(), arrays=arrays, progress=False)
    assert list(report.rows) == ["byol", "random_init", "raw_pixels"]
    for row in report.rows.values():
        assert 0.0 <= row["top1"] <= row["top5"] <= 1.0
        assert row["num_train"] == 140 and row["num_test"] == 60
        assert 0.0 <= row["knn_top1"] <= 1.0
    assert report.rows["byol"]["top1"] >= 0.95
    assert report.rows["byol"]["feature_dim"] == 12
    assert report.rows["random_init"]["feature_dim"] == 256  # small_convnet at width 1
    assert report.rows["raw_pixels"]["feature_dim"] == 16 * 16 * 3
    table = report.format_table().splitlines()
    assert len(table) == 3 + 3
    assert [line.split()[0] for line in table[3:]] == ["byol", "random_init", "raw_pixels"]
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["num_classes"] == 4 and set(as_dict["rows"]) == set(report.rows)
    assert as_dict["rows"]["byol"]["top1"] == report.rows["byol"]["top1"]


def test_evaluate_without_baselines_and_the_random_init_is_reseeded():
    images, labels = _quadrant_images(120)
    arrays = (images[:80], labels[:80], images[80:], labels[80:])
    report = evaluation.evaluate(_quadrant_encoder(), _toy_config(), arrays=arrays, baselines=False, progress=False)
    assert list(report.rows) == ["byol"]
    config = _toy_config(l2_sweep=(0.0,), linear_epochs=1)
    first = evaluation.evaluate(_quadrant_encoder(), config, arrays=arrays, seed=3, progress=False)
    again = evaluation.evaluate(_quadrant_encoder(), config, arrays=arrays, seed=3, progress=False)
    assert first.rows["random_init"]["top1"] == again.rows["random_init"]["top1"]
    assert first.rows["random_init"]["knn_top1"] == again.rows["random_init"]["knn_top1"]


def test_evaluate_rejects_unlabelled_data():
    images, labels = _quadrant_images(40)
    arrays = (images[:20], labels[:20], images[20:], -np.ones(20, np.int64))
    with pytest.raises(evaluation.NoLabelsError, match="'test' split has unlabelled"):
        evaluation.evaluate(_quadrant_encoder(), _toy_config(), arrays=arrays, progress=False)


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
