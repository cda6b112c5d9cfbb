"""Tests for byol_tf.losses against closed forms and a numpy reference."""

import numpy as np
import pytest
import tensorflow as tf

from byol_tf import losses


def numpy_regression_loss(p, z):
    p = np.asarray(p, np.float64)
    z = np.asarray(z, np.float64)
    p = p / np.sqrt(np.maximum(np.sum(p**2, axis=-1, keepdims=True), 1e-12))
    z = z / np.sqrt(np.maximum(np.sum(z**2, axis=-1, keepdims=True), 1e-12))
    return 2.0 - 2.0 * np.sum(p * z, axis=-1)


def test_regression_loss_matches_numpy(rng):
    p = rng.normal(size=(16, 32)).astype(np.float32)
    z = rng.normal(size=(16, 32)).astype(np.float32)
    loss = losses.regression_loss(p, z)
    assert loss.shape == (16,)
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(loss.numpy(), numpy_regression_loss(p, z), atol=1e-6)


def test_regression_loss_closed_forms(rng):
    x = rng.normal(size=(8, 10)).astype(np.float32)
    np.testing.assert_allclose(losses.regression_loss(x, 3.5 * x).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(losses.regression_loss(x, -2.0 * x).numpy(), 4.0, atol=1e-6)
    # Orthogonal unit vectors: cos = 0.
    orthogonal = losses.regression_loss([[1.0, 0.0]], [[0.0, 5.0]])
    np.testing.assert_allclose(orthogonal.numpy(), [2.0], atol=1e-6)


def test_regression_loss_is_scale_invariant(rng):
    p = rng.normal(size=(8, 10)).astype(np.float32)
    z = rng.normal(size=(8, 10)).astype(np.float32)
    scaled = losses.regression_loss(7.0 * p, 0.01 * z)
    np.testing.assert_allclose(scaled.numpy(), losses.regression_loss(p, z).numpy(), atol=1e-6)


def test_regression_loss_zero_vector_is_finite():
    loss = losses.regression_loss([[0.0, 0.0]], [[1.0, 2.0]])
    np.testing.assert_allclose(loss.numpy(), [2.0], atol=1e-6)


def test_regression_loss_keeps_float32_for_half_inputs(rng):
    p = rng.normal(size=(4, 8)).astype(np.float16)
    z = rng.normal(size=(4, 8)).astype(np.float16)
    loss = losses.regression_loss(tf.constant(p), tf.constant(z))
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(loss.numpy(), numpy_regression_loss(p, z), atol=1e-6)


def test_symmetric_loss_pairs_each_prediction_with_the_other_target(rng):
    p1, p2, z1, z2 = (rng.normal(size=(6, 12)).astype(np.float32) for _ in range(4))
    expected = numpy_regression_loss(p1, z2) + numpy_regression_loss(p2, z1)
    np.testing.assert_allclose(losses.symmetric_loss(p1, p2, z1, z2).numpy(), expected, atol=1e-6)


def test_collapse_std_is_zero_for_constant_projections(rng):
    z = np.tile(rng.normal(size=(1, 64)), (128, 1)).astype(np.float32)
    std = losses.collapse_std(z)
    assert std.shape == ()
    assert std.dtype == tf.float32
    np.testing.assert_allclose(std.numpy(), 0.0, atol=1e-6)


def test_collapse_std_matches_numpy(rng):
    z = rng.normal(size=(32, 16)).astype(np.float32) * 3.0
    normed = z / np.linalg.norm(z.astype(np.float64), axis=1, keepdims=True)
    expected = np.mean(np.std(normed, axis=0))
    np.testing.assert_allclose(losses.collapse_std(z).numpy(), expected, atol=1e-6)


def test_collapse_std_of_random_vectors_is_one_over_sqrt_dim(rng):
    z = rng.normal(size=(4096, 256)).astype(np.float32)
    np.testing.assert_allclose(losses.collapse_std(z).numpy(), 1.0 / 16.0, rtol=0.1)


@pytest.mark.parametrize("dim", [4, 7, 256, 2048])
def test_unit_rows_gives_equal_rows_the_same_bits_wherever_they_sit(dim):
    # 100 copies of one row between other rows: every copy must come out bit-identical,
    # and so must its similarity to any query (kNN and neighbour search break exact ties
    # by index). tf.math.l2_normalize's vectorised rsqrt broke this at d = 4 and 2048 on
    # an AVX-512 Intel Xeon.
    rng = np.random.default_rng(dim)
    row = rng.normal(size=dim).astype(np.float32)
    others = rng.normal(size=(37, dim)).astype(np.float32)
    bank = np.concatenate([others, np.tile(row, (100, 1)), others[:5]])
    unit = losses.unit_rows(bank).numpy()
    copies = unit[37:137]
    assert (copies == copies[0]).all()
    np.testing.assert_allclose(copies[0], row / np.linalg.norm(row), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    queries = losses.unit_rows(rng.normal(size=(23, dim)).astype(np.float32))
    similarity = tf.matmul(queries, unit, transpose_b=True).numpy()[:, 37:137]
    assert (similarity == similarity[:, :1]).all()


def test_unit_rows_keeps_zero_rows_zero_and_computes_in_float32():
    x = tf.constant([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]], tf.float16)
    unit = losses.unit_rows(x)
    assert unit.dtype == tf.float32
    np.testing.assert_array_equal(unit.numpy(), np.array([[0.0, 0.0, 0.0], [0.6, 0.0, 0.8]], np.float32))
