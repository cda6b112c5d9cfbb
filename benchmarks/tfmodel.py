"""The BYOL model, optimizer and compiled train step exactly as `training.train` builds them.

The benchmarks time what `model.fit` runs, not a look-alike: the config comes from the
preset YAML of the encoder (the same heads, BatchNorm and optimizer settings), the model
and optimizer from `training.build_model` / `training.build_optimizer` under the precision
policy, `model.compile(jit_compile=...)`, and the step is Keras' own `train_function`
called on a `tf.data` iterator, as `fit` calls it.
"""

from __future__ import annotations

import dataclasses
import numpy as np
import tensorflow as tf

from benchmarks import presets
from byol_tf import distribute, training
from byol_tf import config as config_lib


def num_classes(config: config_lib.Config) -> int | None:
    """Classes of the online probe as training would have it (10 when the source can't tell)."""
    if not config.train.online_probe:
        return None
    return config.data.num_classes or 10


def jit_setting(config: config_lib.Config, jit: str) -> bool:
    """--jit config|on|off -> the `jit_compile` that `model.compile` gets ('auto' resolved as
    `training.train` resolves it: XLA on GPUs and TPUs, not on CPUs)."""
    return distribute.resolve_jit_compile(presets.jit_setting(config, jit), tf.distribute.get_strategy())


def accelerator() -> str:
    """What the step runs on, for the records: 'cpu' or the first GPU's name and the count."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    return f"{name} x{len(gpus)}"


def sync_batchnorm(config: config_lib.Config) -> bool:
    """Whether `build` (one replica, the training rule) uses synchronised BN: for the records."""
    return training.model_config(config, tf.distribute.get_strategy()).network.sync_batchnorm


def build(config: config_lib.Config, jit_compile: bool, precision: str | None = None, one_replica_rule: bool = True):
    """A compiled BYOLModel as `training.train` builds it (default strategy, one device).

    Args:
        config: the experiment.
        jit_compile: passed to `model.compile`.
        precision: a Keras dtype policy name, or None for the config's precision.
        one_replica_rule: build the networks from `training.model_config` (synchronised BN
            off on one replica) as training does; False keeps `network.sync_batchnorm` as
            given (the `sync_bn` switch measures both).

    Returns:
        The model, compiled and ready for `model.make_train_function()`.
    """
    runtime = distribute.Runtime.from_config(config, tf.distribute.get_strategy())
    runtime = dataclasses.replace(
        runtime,
        jit_compile=jit_compile,
        policy=precision or distribute.precision_policy(config.distribute, jit_compile),
    )
    return training.build_compiled_model(
        config, runtime, presets.SCHEDULE_STEPS, num_classes(config), one_replica_rule=one_replica_rule
    )


def synthetic_batch(batch: int, size: int, classes: int | None, seed: int = 0) -> dict:
    """Two random views in [0, 1] and labels: what the input pipeline hands the step."""
    rng = np.random.default_rng(seed)
    data = {
        "view1": tf.constant(rng.uniform(size=(batch, size, size, 3)).astype(np.float32)),
        "view2": tf.constant(rng.uniform(size=(batch, size, size, 3)).astype(np.float32)),
        "label": tf.constant(rng.integers(0, classes or 10, size=(batch,)).astype(np.int64)),
    }
    return data


def train_step_function(model, dataset: tf.data.Dataset):
    """A zero-argument callable running ONE step of `fit`'s compiled train function.

    `make_train_function` builds the same `tf.function` (with the model's `jit_compile`)
    around `train_step` that `fit` calls; passing it a `tf.data` iterator takes fit's path
    (`iterator.get_next()` inside the function). Reading the loss blocks until the step is done.
    """
    model.make_train_function()
    iterator = iter(dataset)

    def step():
        logs = model.train_function(iterator)
        return float(logs["loss"])

    return step
