"""Tests for byol_tf.optimizers.LARS against a numpy reference of the update."""

import copy
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf.optimizers import LARS
from byol_tf.schedules import WarmupCosine

LR, MOMENTUM, WEIGHT_DECAY, ETA = 0.5, 0.9, 0.1, 0.05
PATHS = ["net/dense/kernel", "net/dense/bias", "net/bn/gamma", "net/bn/beta"]


def numpy_lars(weights, grads_per_step, lrs, adapt):
    """Independent float64 LARS: decay, trust ratio, momentum, step."""
    weights = [np.array(w, np.float64) for w in weights]
    moments = [np.zeros_like(w) for w in weights]
    for grads, lr in zip(grads_per_step, lrs):
        for i, g in enumerate(grads):
            g = np.array(g, np.float64)
            if adapt[i]:
                g = g + WEIGHT_DECAY * weights[i]
                w_norm, g_norm = np.linalg.norm(weights[i]), np.linalg.norm(g)
                g = g * (ETA * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0)
            moments[i] = MOMENTUM * moments[i] + g
            weights[i] = weights[i] - lr * moments[i]
    return weights


def make_model(seed=0, zeros=False):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, name="dense"),
            keras.layers.BatchNormalization(name="bn"),
        ],
        name="net",
    )
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:
        value = np.zeros(variable.shape) if zeros else rng.normal(size=variable.shape)
        variable.assign(value.astype(np.float32))
    return model


def make_grads(model, steps, seed=1):
    rng = np.random.default_rng(seed)
    shapes = [v.shape for v in model.trainable_variables]
    return [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(steps)]


def run(optimizer, model, grads_per_step):
    for grads in grads_per_step:
        optimizer.apply([tf.constant(g) for g in grads], model.trainable_variables)
    return [v.numpy() for v in model.trainable_variables]


def make_lars(**kwargs):
    args = dict(
        learning_rate=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, trust_coefficient=ETA
    )
    args.update(kwargs)
    return LARS(**args)


def assert_weights_close(actual, expected):
    for path, a, e in zip(PATHS, actual, expected):
        np.testing.assert_allclose(a, e, atol=1e-6, err_msg=path)


def test_model_variable_paths_are_what_exclusion_matches():
    assert [v.path for v in make_model().trainable_variables] == PATHS


@pytest.mark.parametrize("steps", [1, 2])
def test_default_excludes_bias_and_batchnorm(steps):
    model = make_model()
    initial = [v.numpy() for v in model.trainable_variables]
    grads = make_grads(model, steps)
    actual = run(make_lars(), model, grads)
    expected = numpy_lars(initial, grads, [LR] * steps, adapt=[True, False, False, False])
    assert_weights_close(actual, expected)


def test_default_exclusion_is_plain_sgd_and_kernel_is_not():
    model = make_model()
    initial = [v.numpy() for v in model.trainable_variables]
    (grads,) = make_grads(model, 1)
    actual = run(make_lars(), model, [grads])
    # First step with zero momentum: excluded variables move by exactly -lr * g.
    for i in (1, 2, 3):
        expected = initial[i] - LR * grads[i]
        np.testing.assert_allclose(actual[i], expected, atol=1e-6, err_msg=PATHS[i])
    assert np.max(np.abs(actual[0] - (initial[0] - LR * grads[0]))) > 1e-2


@pytest.mark.parametrize("steps", [1, 2])
def test_empty_exclusion_adapts_every_variable(steps):
    model = make_model()
    initial = [v.numpy() for v in model.trainable_variables]
    grads = make_grads(model, steps)
    actual = run(make_lars(exclude_from_adaptation=[]), model, grads)
    assert_weights_close(actual, numpy_lars(initial, grads, [LR] * steps, adapt=[True] * 4))
    plain_sgd = numpy_lars(initial, grads, [LR] * steps, adapt=[False] * 4)
    assert np.max(np.abs(actual[1] - plain_sgd[1])) > 1e-2


def test_custom_exclusion_replaces_defaults():
    model = make_model()
    initial = [v.numpy() for v in model.trainable_variables]
    grads = make_grads(model, 2)
    actual = run(make_lars(exclude_from_adaptation=["dense/kernel"]), model, grads)
    expected = numpy_lars(initial, grads, [LR] * 2, adapt=[False, True, True, True])
    assert_weights_close(actual, expected)


def test_zero_weights_and_zero_gradients_use_trust_ratio_one():
    model = make_model(zeros=True)
    grads = make_grads(model, 1)
    grads[0][3] = np.zeros_like(grads[0][3])  # beta: zero weight and zero gradient
    actual = run(make_lars(exclude_from_adaptation=[]), model, grads)
    # Zero weights: decay adds nothing and the ratio is 1, so w = -lr * g.
    for i in range(4):
        np.testing.assert_allclose(
            actual[i], -LR * grads[0][i], atol=1e-6, err_msg=PATHS[i]
        )
    assert all(np.all(np.isfinite(a)) for a in actual)


def test_jit_compiled_steps_with_schedule_match_numpy():
    schedule = WarmupCosine(peak_learning_rate=1.0, warmup_steps=2, total_steps=6)
    model = make_model()
    initial = [v.numpy() for v in model.trainable_variables]
    grads = make_grads(model, 3)
    optimizer = make_lars(learning_rate=schedule)
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=True)
    def step(step_grads):
        optimizer.apply(step_grads, model.trainable_variables)

    for step_grads in grads:
        step([tf.constant(g) for g in step_grads])
    actual = [v.numpy() for v in model.trainable_variables]
    # Steps 0, 1, 2 of the schedule: 0, 0.5 (warm-up) and 1.0 (peak).
    expected = numpy_lars(initial, grads, [0.0, 0.5, 1.0], adapt=[True, False, False, False])
    assert_weights_close(actual, expected)
    assert int(optimizer.iterations) == 3


def test_config_round_trip():
    optimizer = make_lars(
        learning_rate=WarmupCosine(1.0, 2, 6), exclude_from_adaptation=["bn/"], name="lars_opt"
    )
    config = optimizer.get_config()
    clone = LARS.from_config(copy.deepcopy(config))  # from_config mutates its argument
    assert clone.get_config() == config
    assert config["weight_decay"] == WEIGHT_DECAY
    assert config["exclude_from_adaptation"] == ["bn/"]
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, LARS)
    assert restored.get_config() == config
    assert LARS(0.1).exclude_from_adaptation == ("bias", "beta", "gamma")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"trust_coefficient": 0.0}, "trust_coefficient"),
        ({"exclude_from_adaptation": "bias"}, "exclude_from_adaptation"),
    ],
)
def test_rejects_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_lars(**kwargs)


_MIRRORED_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
import keras
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, "tests")
from test_optimizers import make_grads, make_lars, make_model

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = make_model()
    optimizer = make_lars()
    optimizer.build(model.trainable_variables)
initial = [v.numpy().tolist() for v in model.trainable_variables]
per_replica = [make_grads(model, 2, seed=1), make_grads(model, 2, seed=2)]

@tf.function
def step(g0, g1):
    def replica_fn():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        grads = [tf.where(replica == 0, a, b) for a, b in zip(g0, g1)]
        optimizer.apply(grads, model.trainable_variables)
    strategy.run(replica_fn)

for s in range(2):
    step([tf.constant(g) for g in per_replica[0][s]], [tf.constant(g) for g in per_replica[1][s]])
print(json.dumps({
    "initial": initial,
    "final": [v.numpy().tolist() for v in model.trainable_variables],
    "grads": [[[g.tolist() for g in step] for step in replica] for replica in per_replica],
}))
"""


@pytest.mark.slow
def test_mirrored_strategy_matches_numpy_on_summed_gradients():
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # Keras sums gradients across replicas before update_step.
    summed = [[np.add(a, b) for a, b in zip(s0, s1)] for s0, s1 in zip(*out["grads"])]
    expected = numpy_lars(out["initial"], summed, [LR, LR], adapt=[True, False, False, False])
    assert_weights_close([np.array(w) for w in out["final"]], expected)
