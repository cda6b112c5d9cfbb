"""Tests for byol_tf.byol: the train step, the EMA target update and distribution."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf import byol, losses, schedules
from fixtures.models import IMAGE, fit_steps, random_batch, tiny_encoder, tiny_mlp, tiny_model


def test_target_starts_as_copy_of_online():
    model = tiny_model()
    assert len(model.target_weights) == len(model.online_weights) > 0
    for target, online in zip(model.target_weights, model.online_weights):
        np.testing.assert_array_equal(target.numpy(), online.numpy())


def test_no_target_variable_is_trainable_but_its_layers_are():
    model = tiny_model(num_classes=3)
    trainable = {id(v) for v in model.trainable_variables}
    assert not trainable & {id(v) for v in model.target_weights}
    assert not any(variable.trainable for variable in model.target_weights)
    online_trainable = model.online_encoder.trainable_weights + model.online_projector.trainable_weights
    predictor = model.predictor.trainable_weights
    probe = model.probe.trainable_weights
    assert trainable == {id(v) for v in online_trainable + predictor + probe}
    # Frozen variables, not frozen layers: a frozen Keras 3 BatchNormalization layer would
    # normalise with its moving statistics even in training mode.
    assert all(layer.trainable for layer in model.target_encoder.layers + model.target_projector.layers)


def _first(model, layer_class):
    return next(layer for layer in model.target_encoder.layers if isinstance(layer, layer_class))


def test_target_normalises_each_batch_with_its_own_statistics():
    model = tiny_model()
    batch = random_batch(batch=8)["view1"]
    changed = batch.copy()
    changed[1:] = np.random.default_rng(5).uniform(size=changed[1:].shape)  # all but example 0
    first, again = model.target_projection(batch), model.target_projection(changed)
    # Example 0 is the same image, but the batch around it changed: its output changes.
    assert not np.allclose(first[0], again[0], atol=1e-4)
    # The online network behaves the same way (both in training mode, as the reference).
    _, online_first, _ = model.online_forward(batch)
    _, online_again, _ = model.online_forward(changed)
    assert not np.allclose(online_first[0], online_again[0], atol=1e-4)


def test_one_step_ema_of_parameters_and_the_targets_own_moving_statistics():
    model = tiny_model(total_steps=10, tau_base=0.9)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    batch = random_batch(with_labels=False)
    statistics = {id(v) for v in model.batch_norm_statistics}
    old_target = {id(v): v.numpy().copy() for v in model.target_weights}
    old_online = {id(v): v.numpy().copy() for v in model.online_weights}
    # What the target's first BN sees in the step: its conv (= the online one at the start)
    # on each view, before any update. Keras momentum 0.9: m <- 0.9 m + 0.1 batch mean.
    norm = _first(model, keras.layers.BatchNormalization)
    conv = _first(model, keras.layers.Conv2D)
    mean1, mean2 = (np.mean(conv(batch[view]).numpy(), axis=(0, 1, 2)) for view in ("view1", "view2"))
    start = norm.moving_mean.numpy().copy()
    expected_moving_mean = 0.9 * (0.9 * start + 0.1 * mean1) + 0.1 * mean2

    logs = fit_steps(model, batch)
    tau = 0.9  # tau at step 0 is tau_base
    np.testing.assert_allclose(logs["tau"][0], tau, rtol=1e-6)
    pairs = model.ema_pairs()
    target_statistics = [v for v in model.target_weights if id(v) in statistics]
    assert len(pairs) == len(model.target_weights) - len(target_statistics) > 0
    for target, online in pairs:
        expected = tau * old_target[id(target)] + (1 - tau) * online.numpy()
        np.testing.assert_allclose(target.numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=target.path)
        assert not np.allclose(online.numpy(), old_online[id(online)]), online.path  # not vacuous
    # The target's moving statistics are its own: moved by its forward passes, not the EMA.
    np.testing.assert_allclose(norm.moving_mean.numpy(), expected_moving_mean, rtol=1e-5, atol=1e-6)
    assert not np.allclose(norm.moving_mean.numpy(), start)


def test_tau_follows_cosine_schedule_over_steps():
    model = tiny_model(total_steps=4, tau_base=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    batch = random_batch(with_labels=False)
    taus = []
    for _ in range(4):
        taus.append(fit_steps(model, batch)["tau"][0])
    expected = [1 - 0.5 * (np.cos(np.pi * k / 4) + 1) / 2 for k in range(4)]
    np.testing.assert_allclose(taus, expected, rtol=1e-6)


def test_loss_metric_matches_manual_symmetric_loss():
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # lr 0: nothing moves
    batch = random_batch(with_labels=False)
    online = lambda v: model.predictor(
        model.online_projector(model.online_encoder(v, training=True), training=True), training=True
    )
    target = lambda v: model.target_projector(model.target_encoder(v, training=True), training=True)
    # Same weights on both branches at start: compute the expected loss before the step
    # (BN in training mode uses batch statistics, so moving-stat updates do not matter).
    p1, p2 = online(batch["view1"]), online(batch["view2"])
    z1, z2 = target(batch["view1"]), target(batch["view2"])
    expected = np.mean(losses.regression_loss(p1, z2) + losses.regression_loss(p2, z1))
    logs = fit_steps(model, batch)
    np.testing.assert_allclose(logs["loss"][0], expected, rtol=1e-5)


def test_online_probe_learns_only_from_labelled_examples():
    model = tiny_model(num_classes=3)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    batch = random_batch()
    batch["label"][: len(batch["label"]) // 2] = -1
    logs = fit_steps(model, batch)
    assert 0.0 <= logs["probe_accuracy"][0] <= 1.0
    assert np.isfinite(logs["probe_loss"][0])
    # All unlabelled: the probe gets no gradient at all.
    model = tiny_model(num_classes=3)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    before = [v.numpy().copy() for v in model.probe.weights]
    batch["label"][:] = -1
    fit_steps(model, batch)
    for variable, old in zip(model.probe.weights, before):
        np.testing.assert_array_equal(variable.numpy(), old)


def test_encoder_is_the_online_encoder():
    model = tiny_model()
    images = np.random.default_rng(0).uniform(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
    np.testing.assert_allclose(model(images), model.encoder(images, training=False), rtol=1e-6)
    assert model.encoder is model.online_encoder


def test_ema_update_closed_form():
    targets = [keras.Variable(np.array([1.0, 2.0], np.float32)), keras.Variable(np.float32(-3.0))]
    onlines = [keras.Variable(np.array([3.0, -2.0], np.float32)), keras.Variable(np.float32(5.0))]
    byol.ema_update(targets, onlines, 0.75)
    np.testing.assert_allclose(targets[0].numpy(), [0.75 * 1 + 0.25 * 3, 0.75 * 2 - 0.25 * 2])
    np.testing.assert_allclose(targets[1].numpy(), 0.75 * -3 + 0.25 * 5)


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    from byol_tf import distribute
    from byol_tf.config import DistributeConfig
    mirrored = distribute.strategy_from_config(DistributeConfig(strategy="mirrored", num_cpu_devices=2))
    import keras
    sys.path.insert(0, "tests")
    from fixtures import models as t

    def run(strategy):
        with strategy.scope():
            model = t.tiny_model(num_classes=3, synchronized=True)
            model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
        before = [v.numpy().tolist() for v in model.online_weights + model.target_weights]
        logs = t.fit_steps(model, t.random_batch(batch=8), steps=2)
        return logs, before, [v.numpy().tolist() for v in model.online_weights + model.target_weights]

    default = run(tf.distribute.get_strategy())
    mirrored_run = run(mirrored)
    print(json.dumps({"replicas": mirrored.num_replicas_in_sync, "default": default, "mirrored": mirrored_run}))
    """
)


def _run_script(script: str) -> dict:
    """Runs `script` in a fresh Python (it sets up its own logical devices) and returns the
    JSON object of its last line."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_mirrored_two_cpus_matches_default_strategy():
    result = _run_script(MIRRORED_SCRIPT)
    assert result["replicas"] == 2
    (default_logs, default_before, default_weights) = result["default"]
    (mirrored_logs, mirrored_before, mirrored_weights) = result["mirrored"]
    # Sums in another order: relative tolerances for the derived values (float32 has ~7 digits).
    for key in ("loss", "collapse_std", "probe_loss", "probe_accuracy", "tau"):
        np.testing.assert_allclose(mirrored_logs[key], default_logs[key], rtol=1e-4, atol=1e-7, err_msg=key)
    assert len(default_weights) == len(mirrored_weights)
    for before_m, before_d in zip(mirrored_before, default_before):
        np.testing.assert_array_equal(before_m, before_d)  # the same start
    # What two steps changed, compared per variable relative to the size of the change:
    # float32 sums in another order (cross-replica BN moments, the gradient all-reduce)
    # move it by ~1e-4 of its norm; unsynchronised BN (per-replica statistics) moves it by
    # tens of percent. The absolute floor (1e-5 per element) covers variables whose exact
    # gradient is zero (a Dense bias before BN), whose change is rounding alone.
    for index, (m_after, d_after, before) in enumerate(zip(mirrored_weights, default_weights, default_before)):
        change_m = np.asarray(m_after) - np.asarray(before)
        change_d = np.asarray(d_after) - np.asarray(before)
        allowed = 2e-3 * np.linalg.norm(change_d) + 1e-5 * np.sqrt(change_d.size)
        assert np.linalg.norm(change_m - change_d) <= allowed, (index, np.linalg.norm(change_d))


def test_global_collapse_std_equals_collapse_std_on_one_replica():
    z = np.random.default_rng(3).normal(size=(64, 16)).astype(np.float32)
    np.testing.assert_allclose(byol._global_collapse_std(z), losses.collapse_std(z), rtol=1e-5)
    constant = np.ones((32, 16), np.float32)
    assert float(byol._global_collapse_std(constant)) < 1e-4


def _numpy_collapse_std(z):
    z = np.asarray(z, np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    return np.mean(np.std(z, axis=0))


@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_moments_of_parts_combine_to_the_std_of_a_nearly_collapsed_batch(parts):
    # Every projection close to one direction: the std is ~1000x below the mean, where
    # E[z^2] - E[z]^2 in float32 loses most of its digits.
    rng = np.random.default_rng(7)
    z = (np.ones((48, 16)) + 1e-3 * rng.normal(size=(48, 16))).astype(np.float32)
    combined = None
    for piece in np.array_split(z, parts):
        combined = byol._combine_moments(combined, byol._projection_moments(piece))
    assert float(combined["count"]) == 48
    np.testing.assert_allclose(byol._collapse_std_from_moments(combined), _numpy_collapse_std(z), rtol=1e-3)


# ------------------------------------------------------- augmentation on the device


def _device_batches(batch=8, seed=0):
    """One batch both ways: host-augmented views, and `augment.host_views`' crops + parameters."""
    from byol_tf import augment
    from byol_tf.config import AugmentConfig

    config = AugmentConfig(image_size=IMAGE)
    rng = np.random.default_rng(seed)
    crops = [rng.integers(0, 256, (batch, IMAGE, IMAGE, 3), dtype=np.uint8) for _ in range(2)]
    labels = rng.integers(0, 3, size=(batch,)).astype(np.int64)
    key = tf.constant([seed, 1], tf.int64)
    view1, view2 = augment.transform_views(*crops, config, key)
    host = {"view1": view1.numpy(), "view2": view2.numpy(), "label": labels}
    device = {name: value.numpy() for name, value in augment.host_views(*crops, config, key).items()}
    return config, host, {**device, "label": labels}


def test_fit_on_device_placed_augmentation_equals_fit_on_host_views():
    config, host, device = _device_batches()
    reference = tiny_model(num_classes=3)
    reference.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
    reference_logs = fit_steps(reference, host, steps=2)
    model = tiny_model(num_classes=3)
    model.augment = config
    model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), jit_compile=True)  # as on a GPU
    logs = fit_steps(model, device, steps=2)
    for key in ("loss", "collapse_std", "probe_loss"):
        np.testing.assert_allclose(logs[key], reference_logs[key], rtol=1e-5, err_msg=key)
    for got, expected in zip(model.online_weights + model.target_weights, reference.online_weights + reference.target_weights):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)  # XLA sums differently


def test_crops_without_an_augment_config_fail_with_a_clear_message():
    _, _, device = _device_batches()
    model = tiny_model()
    with pytest.raises(ValueError, match="no augment config"):
        model.views(device)


MIRRORED_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    from byol_tf import distribute
    from byol_tf.config import DistributeConfig
    mirrored = distribute.strategy_from_config(DistributeConfig(strategy="mirrored", num_cpu_devices=2))
    import keras
    sys.path.insert(0, "tests")
    from fixtures import models as t
    from test_byol import _device_batches

    config, host, device = _device_batches()

    def run(strategy, batch):
        with strategy.scope():
            model = t.tiny_model(num_classes=3, synchronized=True)
            model.augment = config
            model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
        logs = t.fit_steps(model, batch, steps=2)
        return logs, [v.numpy().tolist() for v in model.online_weights + model.target_weights]

    print(json.dumps({"host": run(tf.distribute.get_strategy(), host), "device": run(mirrored, device)}))
    """
)


@pytest.mark.slow
def test_device_placed_augmentation_under_mirrored_two_cpus_matches_host_views():
    result = _run_script(MIRRORED_DEVICE_SCRIPT)
    (host_logs, host_weights), (device_logs, device_weights) = result["host"], result["device"]
    for key in ("loss", "collapse_std", "probe_loss"):
        np.testing.assert_allclose(device_logs[key], host_logs[key], rtol=1e-4, err_msg=key)
    for got, expected in zip(device_weights, host_weights):
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
