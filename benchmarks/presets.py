"""Benchmark configs: an encoder's preset YAML with batch, image size and overrides set.

Free of TensorFlow imports, so drivers that only start worker processes stay light.
"""

from __future__ import annotations

import os

from byol_tf import config as config_lib

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


def jit_setting(config: config_lib.Config, jit: str) -> bool | str:
    """--jit config|on|off -> `train.jit_compile` (True, False or 'auto', which
    `tfmodel.jit_setting` resolves for the machine)."""
    if jit == "config":
        return config.train.jit_compile
    return jit == "on"
