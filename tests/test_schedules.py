"""Tests for byol_tf.schedules against hand tables and numpy formulas."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf import schedules


def numpy_tau(k, total, base):
    k = np.clip(np.asarray(k, np.float64), 0, total)
    return 1.0 - (1.0 - base) * (np.cos(np.pi * k / total) + 1.0) / 2.0


def numpy_lr(step, peak, warmup, total, final):
    step = np.asarray(step, np.float64)
    progress = np.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    cosine = final + (peak - final) * 0.5 * (1.0 + np.cos(np.pi * progress))
    warm = peak * step / max(warmup, 1)
    return np.where(step < warmup, warm, cosine)


@pytest.mark.parametrize(
    "step, expected",
    [(0, 0.99), (50, 0.995), (100, 1.0), (150, 1.0), (-5, 0.99)],
)
def test_tau_table(step, expected):
    tau = schedules.tau(step, total_steps=100, tau_base=0.99)
    assert tau.dtype == tf.float32
    np.testing.assert_allclose(tau.numpy(), expected, atol=1e-6)


def test_tau_matches_numpy_for_int64_steps():
    steps = np.arange(0, 1201, 7, dtype=np.int64)
    tau = schedules.tau(tf.constant(steps), total_steps=1000, tau_base=0.996)
    np.testing.assert_allclose(tau.numpy(), numpy_tau(steps, 1000, 0.996), atol=1e-6)


def test_tau_in_tf_function_with_variable_step():
    step = tf.Variable(250, dtype=tf.int64)
    tau = tf.function(lambda: schedules.tau(step, 1000, 0.97))()
    np.testing.assert_allclose(tau.numpy(), numpy_tau(250, 1000, 0.97), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"total_steps": 0, "tau_base": 0.99}, "total_steps"),
        ({"total_steps": 10.5, "tau_base": 0.99}, "total_steps"),
        ({"total_steps": 10, "tau_base": 1.5}, "tau_base"),
    ],
)
def test_tau_rejects_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.tau(0, **kwargs)


PEAK, WARMUP, TOTAL, FINAL = 0.8, 10, 110, 0.01


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (5, 0.4),  # mid warm-up: peak * 5 / 10
        (9, 0.72),
        (10, PEAK),  # warm-up boundary
        (60, FINAL + (PEAK - FINAL) * 0.5),  # mid cosine
        (110, FINAL),  # end
        (500, FINAL),  # past the end
    ],
)
def test_warmup_cosine_table(step, expected):
    schedule = schedules.WarmupCosine(PEAK, WARMUP, TOTAL, final_learning_rate=FINAL)
    lr = schedule(step)
    assert lr.dtype == tf.float32
    np.testing.assert_allclose(lr.numpy(), expected, atol=1e-6)


def test_warmup_cosine_matches_numpy_on_every_step():
    schedule = schedules.WarmupCosine(PEAK, WARMUP, TOTAL, final_learning_rate=FINAL)
    steps = np.arange(0, 130, dtype=np.int64)
    lrs = schedule(tf.constant(steps)).numpy()
    np.testing.assert_allclose(lrs, numpy_lr(steps, PEAK, WARMUP, TOTAL, FINAL), atol=1e-6)


def test_warmup_cosine_without_warmup_starts_at_peak():
    schedule = schedules.WarmupCosine(2.0, warmup_steps=0, total_steps=4)
    lrs = [float(schedule(s)) for s in range(5)]
    expected = [2.0 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    np.testing.assert_allclose(lrs, expected, atol=1e-6)


def test_warmup_cosine_all_warmup_then_final():
    schedule = schedules.WarmupCosine(2.0, warmup_steps=4, total_steps=4, final_learning_rate=0.5)
    lrs = [float(schedule(s)) for s in range(6)]
    np.testing.assert_allclose(lrs, [0.0, 0.5, 1.0, 1.5, 2.0, 0.5], atol=1e-6)


def test_warmup_cosine_accepts_optimizer_iterations():
    schedule = schedules.WarmupCosine(PEAK, WARMUP, TOTAL)
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    optimizer.iterations.assign(5)
    np.testing.assert_allclose(float(optimizer.learning_rate), 0.4, atol=1e-6)


def test_warmup_cosine_config_round_trip():
    schedule = schedules.WarmupCosine(PEAK, WARMUP, TOTAL, final_learning_rate=FINAL)
    clone = schedules.WarmupCosine.from_config(schedule.get_config())
    assert clone.get_config() == schedule.get_config()
    serialized = keras.optimizers.schedules.serialize(schedule)
    restored = keras.optimizers.schedules.deserialize(serialized)
    assert isinstance(restored, schedules.WarmupCosine)
    np.testing.assert_allclose(restored(60).numpy(), schedule(60).numpy(), atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"peak_learning_rate": -1.0}, "peak_learning_rate"),
        ({"peak_learning_rate": "0.1"}, "peak_learning_rate"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"total_steps": 9}, "total_steps"),  # shorter than warmup_steps
        ({"warmup_steps": 0, "total_steps": 0}, "total_steps"),
        ({"final_learning_rate": 1.0}, "final_learning_rate"),  # above peak
        ({"final_learning_rate": -0.1}, "final_learning_rate"),
    ],
)
def test_warmup_cosine_rejects_bad_args(kwargs, match):
    args = {"peak_learning_rate": PEAK, "warmup_steps": WARMUP, "total_steps": TOTAL}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        schedules.WarmupCosine(**args)


def test_scaled_learning_rate():
    assert schedules.scaled_learning_rate(0.2, 4096) == pytest.approx(3.2, abs=1e-12)
    assert schedules.scaled_learning_rate(0.45, 256) == pytest.approx(0.45, abs=1e-12)
    with pytest.raises(ValueError, match="global_batch_size"):
        schedules.scaled_learning_rate(0.2, 0)
