"""The BYOL model, optimizer and compiled train step exactly as `training.train` builds them.

The benchmarks time what `model.fit` runs, not a look-alike: the config comes from the
preset YAML of the encoder (the same heads, BatchNorm and optimizer settings), the model
and optimizer from `training.build_model` / `training.build_optimizer` under the precision
policy, `model.compile(jit_compile=...)`, and the step is Keras' own `train_function`
called on a `tf.data` iterator, as `fit` calls it.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from byol_tf import config as config_lib
from byol_tf import byol, distribute, networks, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The preset whose network / optimizer / jit settings a benchmark of this encoder uses.
ENCODER_PRESETS = {
    "small_convnet": "configs/mnist5k.yaml",
    "resnet18_cifar": "configs/cifar10_resnet18.yaml",
    "resnet50": "configs/imagenet_resnet50.yaml",
}
# Heads small enough for a seconds-long smoke run.
SMOKE_OVERRIDES = (
    "network.projector_hidden_dim=32",
    "network.projection_dim=16",
    "network.predictor_hidden_dim=32",
)
# Steps per epoch of the LR / tau schedules: any value works, timing does not depend on it.
SCHEDULE_STEPS = 1000


def load_config(
    encoder: str,
    batch: int,
    size: int,
    overrides=(),
    config_path: str | None = None,
) -> config_lib.Config:
    """The encoder's preset (or `config_path`) with batch, image size and `overrides` set."""
    if config_path is None:
        if encoder not in ENCODER_PRESETS:
            raise ValueError(f"--encoder: {encoder!r} is not one of {', '.join(ENCODER_PRESETS)}")
        config_path = os.path.join(ROOT, ENCODER_PRESETS[encoder])
    return config_lib.load(
        config_path,
        [
            f"network.encoder={encoder}",
            f"data.batch_size={batch}",
            f"augment.image_size={size}",
            # The schedules need a length; nothing is read from the data source.
            f"train.steps_per_epoch={SCHEDULE_STEPS}",
            *overrides,
        ],
    )


def jit_setting(config: config_lib.Config, jit: str) -> bool:
    """--jit config|on|off -> the `jit_compile` that `model.compile` gets."""
    if jit == "config":
        return bool(config.train.jit_compile)
    return jit == "on"


def num_classes(config: config_lib.Config) -> int | None:
    """Classes of the online probe as training would have it (10 when the source can't tell)."""
    if not config.train.online_probe:
        return None
    return config.data.num_classes or 10


def build(config: config_lib.Config, jit_compile: bool, precision: str | None = None, build_encoder=None):
    """A compiled BYOLModel as `training.train` builds it (default strategy, one device).

    Args:
        config: the experiment.
        jit_compile: passed to `model.compile`.
        precision: a Keras dtype policy name, or None for the config's precision.
        build_encoder: a zero-argument encoder factory replacing the library's (prototypes
            of encoder changes); the heads, optimizer and everything else stay the library's.

    Returns:
        The model, compiled and ready for `model.make_train_function()`.
    """
    strategy = tf.distribute.get_strategy()
    policy = precision or distribute.precision_policy(config.distribute)
    total_steps = config.train.epochs * SCHEDULE_STEPS
    with distribute.dtype_policy(policy):
        if build_encoder is None:
            model = training.build_model(config, total_steps, num_classes(config))
        else:
            net = config.network
            model = byol.BYOLModel(
                build_encoder=build_encoder,
                build_projector=lambda: networks.build_mlp(
                    net.projector_hidden_dim, net.projection_dim, net, name="projector"
                ),
                build_predictor=lambda: networks.build_mlp(
                    net.predictor_hidden_dim, net.projection_dim, net, name="predictor"
                ),
                image_size=config.augment.image_size,
                total_steps=total_steps,
                tau_base=config.train.tau_base,
                num_classes=num_classes(config),
                gradient_accumulation_steps=config.train.gradient_accumulation_steps,
            )
        optimizer = distribute.wrap_optimizer(training.build_optimizer(config, SCHEDULE_STEPS), policy)
        model.compile(optimizer=optimizer, jit_compile=jit_compile)
    distribute.prepare_for_fit(model, strategy)
    return model


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
