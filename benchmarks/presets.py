"""Benchmark configs: an encoder's preset YAML with batch, image size and overrides set,
and the command-line arguments (--jit, --set, --smoke's heads) that choose them.

Free of TensorFlow imports, so drivers that only start worker processes stay light.
"""

from __future__ import annotations

import argparse
import os

from benchmarks import common
from byol_tf import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The preset whose network / optimizer / jit settings a benchmark of this encoder uses.
ENCODER_PRESETS = {
    "small_convnet": "configs/mnist5k.yaml",
    "resnet18_cifar": "configs/cifar10_resnet18.yaml",
    "resnet50": "configs/imagenet_resnet50.yaml",
}
JIT_CHOICES = ("config", "on", "off")
# Steps per epoch of the LR / tau schedules: any value works, timing does not depend on it.
SCHEDULE_STEPS = 1000


def head_overrides(heads) -> list[str]:
    """(projector hidden, projection, predictor hidden) widths as config overrides."""
    projector_hidden, projection, predictor_hidden = heads
    return [
        f"network.projector_hidden_dim={projector_hidden}",
        f"network.projection_dim={projection}",
        f"network.predictor_hidden_dim={predictor_hidden}",
    ]


SMOKE_OVERRIDES = tuple(head_overrides(common.SMOKE_HEADS))


def add_config_arguments(parser: argparse.ArgumentParser, jit_help: str = "jit_compile (default: the preset's)"):
    """--jit and --set, which `jit_setting` and `config_overrides` read."""
    parser.add_argument("--jit", choices=JIT_CHOICES, default="config", help=jit_help)
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override (repeatable)"
    )


def config_overrides(args) -> list[str]:
    """The --set overrides, with the smoke heads under --smoke."""
    return [*args.set, *(SMOKE_OVERRIDES if args.smoke else ())]


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
