"""BYOL pretraining from a config: the logic behind `byol-tf train` and the TFX Trainer.

`train(config)` builds the strategy, the dataset, the model and the optimizer, runs
`model.fit`, and writes into the run folder: `config.yaml`, TensorBoard logs under `logs/`
and the encoder as `encoder.keras`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import keras
import tensorflow as tf

from byol_tf import byol, callbacks as byol_callbacks, config as config_lib, data, networks, schedules
from byol_tf.optimizers import LARS

ENCODER_FILE = "encoder.keras"
CONFIG_FILE = "config.yaml"


@dataclasses.dataclass
class TrainResult:
    """What a pretraining run produced."""

    model: byol.BYOLModel
    history: dict
    run_dir: str
    steps_per_epoch: int

    @property
    def encoder(self) -> keras.Model:
        return self.model.encoder

    @property
    def encoder_path(self) -> str:
        return os.path.join(self.run_dir, ENCODER_FILE)


def global_batch_size(config: config_lib.Config, strategy: tf.distribute.Strategy) -> int:
    """The configured batch is global: it is split over `strategy`'s replicas."""
    batch = config.data.batch_size
    if batch % strategy.num_replicas_in_sync:
        raise ValueError(
            f"data.batch_size={batch} must be divisible by the {strategy.num_replicas_in_sync} replicas"
        )
    return batch


def steps_per_epoch(config: config_lib.Config, num_examples: int) -> int:
    """Configured steps per epoch, else full batches per pass over `num_examples`."""
    if config.train.steps_per_epoch:
        return config.train.steps_per_epoch
    steps = num_examples // config.data.batch_size
    if steps < 1:
        raise ValueError(
            f"data.batch_size={config.data.batch_size} is larger than the {num_examples} training images"
        )
    return steps


def build_optimizer(config: config_lib.Config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Optimizer with warm-up + cosine learning rate scaled by the global batch (base x B/256)."""
    opt = config.optimizer
    total_steps = config.train.epochs * steps_per_epoch
    schedule = schedules.WarmupCosine(
        peak_learning_rate=schedules.scaled_learning_rate(opt.base_learning_rate, config.data.batch_size),
        warmup_steps=min(int(round(opt.warmup_epochs * steps_per_epoch)), total_steps),
        total_steps=total_steps,
    )
    if opt.name == "lars":
        return LARS(
            learning_rate=schedule,
            momentum=opt.momentum,
            weight_decay=opt.weight_decay,
            trust_coefficient=opt.trust_coefficient,
        )
    if opt.name == "adamw":
        return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=opt.weight_decay)
    return keras.optimizers.SGD(learning_rate=schedule, momentum=opt.momentum)


def build_model(config: config_lib.Config, total_steps: int, num_classes: int | None) -> byol.BYOLModel:
    """BYOLModel for the config's networks (call inside the strategy scope)."""
    net = config.network
    size = config.augment.image_size
    return byol.BYOLModel(
        build_encoder=lambda: networks.build_encoder(net, size),
        build_projector=lambda: networks.build_mlp(
            net.projector_hidden_dim, net.projection_dim, net, name="projector"
        ),
        build_predictor=lambda: networks.build_mlp(
            net.predictor_hidden_dim, net.projection_dim, net, name="predictor"
        ),
        image_size=size,
        total_steps=total_steps,
        tau_base=config.train.tau_base,
        num_classes=num_classes if config.train.online_probe else None,
    )


def train(
    config: config_lib.Config,
    *,
    run_dir: str | None = None,
    dataset: tf.data.Dataset | None = None,
    num_examples: int | None = None,
    num_classes: int | None = None,
    strategy: tf.distribute.Strategy | None = None,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
) -> TrainResult:
    """Pretrains BYOL with `keras.Model.fit` and saves the encoder.

    Args:
        config: the experiment.
        run_dir: output folder; defaults to `config.train.run_dir`.
        dataset: batches of {"view1", "view2", "label"} at the global batch size; built
            from `config.data` when omitted (the TFX Trainer passes its own).
        num_examples: training images in `dataset` (sets steps per epoch when the config
            does not); counted from `config.data` when omitted.
        num_classes: classes for the online probe; from the config or the data when omitted.
        strategy: a `tf.distribute` strategy; from `config.distribute` when omitted.
        extra_callbacks: appended to the standard ones.

    Returns:
        The trained model, the fit history, the run folder and the steps per epoch.
    """
    # Imported here: distribute must set logical devices before TF touches them.
    from byol_tf import distribute

    strategy = strategy or distribute.strategy_from_config(config.distribute)
    run_dir = run_dir or config.train.run_dir
    os.makedirs(run_dir, exist_ok=True)
    config_lib.save(config, os.path.join(run_dir, CONFIG_FILE))
    keras.utils.set_random_seed(config.train.seed)

    batch = global_batch_size(config, strategy)
    if dataset is None:
        dataset = data.make_pretraining_dataset(config, split="train", batch_size=batch)
        num_examples = data.num_examples(config.data, "train")
    elif num_examples is None and not config.train.steps_per_epoch:
        raise ValueError("train(): pass num_examples with a custom dataset, or set train.steps_per_epoch")
    if num_classes is None:
        num_classes = config.data.num_classes or data.num_classes(config.data)
    steps = steps_per_epoch(config, num_examples or 0)
    total_steps = config.train.epochs * steps

    with strategy.scope():
        model = build_model(config, total_steps, num_classes)
        model.compile(optimizer=build_optimizer(config, steps), jit_compile=config.train.jit_compile)

    callbacks = [
        keras.callbacks.TensorBoard(log_dir=os.path.join(run_dir, "logs"), update_freq="epoch"),
        byol_callbacks.ViewGridLogger(dataset, os.path.join(run_dir, "logs"), config.train.log_images),
        byol_callbacks.CollapseGuard(),
        *extra_callbacks,
    ]
    if config.evaluation.knn_every_epochs > 0:  # first: TensorBoard logs the knn_accuracy it adds
        callbacks.insert(0, byol_callbacks.KNNMonitor.from_config(config))
    history = model.fit(
        dataset, epochs=config.train.epochs, steps_per_epoch=steps, callbacks=callbacks, verbose=config.train.verbose
    )
    model.encoder.save(os.path.join(run_dir, ENCODER_FILE))
    return TrainResult(model=model, history=history.history, run_dir=run_dir, steps_per_epoch=steps)
