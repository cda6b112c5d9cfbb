"""BYOL pretraining from a config: the logic behind `byol-tf train` and the TFX Trainer.

`train(config)` builds the strategy, the dataset, the model and the optimizer, runs
`model.fit`, and writes into the run folder: `config.yaml`, TensorBoard logs under `logs/`
(with an Embedding Projector view of held-out images in `logs/embeddings/` at the end) and
the encoder as `encoder.keras`. While it runs, `backup/` holds atomic checkpoints of the
whole training state: the same command run again after a kill resumes from the last one and
ends with the same weights as an uninterrupted run (with `train.deterministic`); SIGTERM
backs up the step under way first. The backup is deleted once the run has finished: run
again in a finished run's folder, `train` starts from step 0 and says so, moving the earlier
run's outputs into `earlier-<UTC time>/` first (nothing lost, nothing mixed).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
from typing import Callable, Sequence

import keras
import tensorflow as tf

from byol_tf import byol, checkpointing, export, fileio, monitoring, networks, schedules
from byol_tf import config as config_lib
from byol_tf import data
from byol_tf.optimizers import LARS

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.keras"
CONFIG_FILE = "config.yaml"
BACKUP_DIR = "backup"
LOG_DIR = "logs"
EXPORT_DIR = "export"
# What a finished run leaves in its folder (backup/ is deleted at its end); a run started
# from step 0 in the same folder moves them aside first (`_set_aside_earlier_run`).
RUN_OUTPUTS = (export.EVALUATION_FILE, ENCODER_FILE, CONFIG_FILE, EXPORT_DIR, LOG_DIR)


@dataclasses.dataclass
class TrainResult:
    """What a pretraining run produced."""

    model: byol.BYOLModel
    history: dict  # {metric: one value per epoch}, the whole run's where backups are on
    run_dir: str
    steps_per_epoch: int
    is_chief: bool = True
    backup: checkpointing.TrainingBackup | None = None  # kept by `train(keep_backup=True)`

    def delete_backup(self):
        """Removes a backup `train(keep_backup=True)` kept, once what follows training is done."""
        if self.backup is not None:
            self.backup.delete()
            self.backup = None

    @property
    def encoder(self) -> keras.Model:
        return self.model.encoder

    @property
    def encoder_path(self) -> str:
        return fileio.join(self.run_dir, ENCODER_FILE)


def global_batch_size(config: config_lib.Config, strategy: tf.distribute.Strategy) -> int:
    """The configured batch is global: split over `strategy`'s replicas, then into micro-batches."""
    batch = config.data.batch_size
    replicas = strategy.num_replicas_in_sync
    accumulation = config.train.gradient_accumulation_steps
    if batch % (replicas * accumulation):
        raise ValueError(
            f"data.batch_size={batch} must be divisible by the {replicas} replicas x "
            f"train.gradient_accumulation_steps={accumulation}"
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


def learning_rate_schedule(config: config_lib.Config, steps_per_epoch: int) -> schedules.WarmupCosine:
    """The optimizer's learning rate by step: warm-up, then cosine to 0, peak base x global batch / 256."""
    opt = config.optimizer
    total_steps = config.train.epochs * steps_per_epoch
    return schedules.WarmupCosine(
        peak_learning_rate=schedules.scaled_learning_rate(opt.base_learning_rate, config.data.batch_size),
        warmup_steps=min(int(round(opt.warmup_epochs * steps_per_epoch)), total_steps),
        total_steps=total_steps,
    )


def build_optimizer(config: config_lib.Config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Optimizer with `learning_rate_schedule`'s learning rate."""
    opt = config.optimizer
    schedule = learning_rate_schedule(config, steps_per_epoch)
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
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        augment=config.augment,
    )


def build_compiled_model(
    config: config_lib.Config, runtime, steps_per_epoch: int, num_classes: int | None, *, one_replica_rule: bool = True
) -> byol.BYOLModel:
    """The BYOLModel `train` fits: built and compiled under `runtime`, optimizer built.

    Args:
        config: the experiment.
        runtime: a `distribute.Runtime` (strategy, XLA, precision policy).
        steps_per_epoch: sets the length of the learning-rate and tau schedules.
        num_classes: classes of the online probe (None: no probe).
        one_replica_rule: build the networks from `model_config` (plain BN on one replica),
            as training does; False builds `config.network` as it is (benchmarks compare).
    """
    total_steps = config.train.epochs * steps_per_epoch
    network_config = model_config(config, runtime.strategy) if one_replica_rule else config
    with runtime.scope():
        model = build_model(network_config, total_steps, num_classes)
        optimizer = runtime.wrap_optimizer(build_optimizer(config, steps_per_epoch))
        model.compile(optimizer=optimizer, jit_compile=runtime.jit_compile)
    runtime.prepare(model)
    return model


def train(
    config: config_lib.Config,
    *,
    run_dir: str | None = None,
    dataset: tf.data.Dataset | Callable[[tf.distribute.InputContext | None], tf.data.Dataset] | None = None,
    num_examples: int | None = None,
    num_classes: int | None = None,
    strategy: tf.distribute.Strategy | None = None,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    backup_dir: str | None = None,
    holdout_data: config_lib.DataConfig | None = None,
    keep_backup: bool = False,
) -> TrainResult:
    """Pretrains BYOL with `keras.Model.fit`, resuming from a backup if one exists, and saves the encoder.

    Args:
        config: the experiment.
        run_dir: output folder; defaults to `config.train.run_dir`.
        dataset: batches of {"view1", "view2", "label"} at the global batch size, or better a
            function `input_context or None -> such a dataset` (None: global batches; a
            `tf.distribute.InputContext`: that worker's shard, batched per replica). Built
            from `config.data` when omitted (the TFX Trainer passes its own). A function is
            called afresh for every `fit`, which exact resumes need: a tf.data shuffle with
            reshuffle_each_iteration draws a new order for each iterator of one dataset object.
        num_examples: training images in `dataset` (sets steps per epoch when the config
            does not); counted from `config.data` when omitted.
        num_classes: classes for the online probe; from the config or the data when omitted.
        strategy: a `tf.distribute` strategy; from `config.distribute` when omitted.
        extra_callbacks: appended to the standard ones.
        backup_dir: where the training state is backed up and resumed from; defaults to
            RUN_DIR/backup. Must outlive the process (and be shared by all workers).
        holdout_data: where the Embedding Projector's held-out images are read
            (`evaluation.projector_images`); default `config.data` (the TFX Trainer passes
            its Examples artifact).
        keep_backup: leave the final backup in place (`TrainResult.delete_backup` removes
            it): a kill during what the caller does next (evaluation, export) then resumes
            at the last step instead of training again. False: removed once the encoder is
            saved.

    Returns:
        The trained model, the history (each epoch's logs; with backups on, those of epochs
        before a resume too), the run folder, the steps per epoch and a kept backup.

    Raises:
        byol_tf.checkpointing.NonFiniteTrainingError: the loss or the weights became NaN / Inf;
            the last good backup is kept.
    """
    # Imported here: distribute must set logical devices before TF touches them.
    from byol_tf import distribute

    runtime = distribute.Runtime.from_config(config, strategy)
    run_dir = run_dir or config.train.run_dir
    fileio.makedirs(run_dir)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.train.seed)

    batch = global_batch_size(config, runtime.strategy)
    if dataset is None:
        dataset = functools.partial(_config_dataset, config, batch)
        num_examples = data.num_examples(config.data, "train")
    elif num_examples is None and not config.train.steps_per_epoch:
        raise ValueError("train(): pass num_examples with a custom dataset, or set train.steps_per_epoch")
    if num_classes is None:
        num_classes = data.num_classes(config.data)
    steps = steps_per_epoch(config, num_examples or 0)
    total_steps = config.train.epochs * steps

    logger.debug("train: jit_compile %s, precision policy %s", runtime.jit_compile, runtime.policy)
    model = build_compiled_model(config, runtime, steps, num_classes)

    backup = None
    if config.train.keep_checkpoints:
        backup = checkpointing.TrainingBackup(
            backup_dir or fileio.join(run_dir, BACKUP_DIR),
            model,
            steps,
            every_steps=config.train.checkpoint_every_steps,
            keep=config.train.keep_checkpoints,
            is_chief=runtime.is_chief,
            task_id=runtime.task_id,
            multi_worker=distribute.is_multi_worker(runtime.strategy),
        )
    start = backup.restore() if backup else 0
    if runtime.is_chief:
        if not start:
            _set_aside_earlier_run(run_dir)
        config_lib.save(config, fileio.join(run_dir, CONFIG_FILE))
    if start:
        logger.info("resumed from backup at step %d of %d (%s)", start, total_steps, backup.last_saved)
        if not callable(dataset):
            logger.warning(
                "resuming with a dataset object: its batches match the interrupted run only if its "
                "order does not depend on how often it was iterated; pass a function for exact resumes"
            )

    callbacks = []
    if runtime.is_chief:  # the other workers would write the same logs
        preview = dataset(None) if callable(dataset) else dataset
        log_dir = fileio.join(run_dir, LOG_DIR)
        callbacks += [
            keras.callbacks.TensorBoard(log_dir=log_dir, update_freq="epoch"),
            monitoring.ViewGridLogger(preview, log_dir, config.train.log_images),
        ]
        if config.evaluation.projector_images:
            callbacks += _projector_logger(config, log_dir, holdout_data or config.data)
    callbacks += [
        monitoring.CollapseGuard(),
        *extra_callbacks,
        # Last, guard then backup: a non-finite step stops training before it is backed up.
        checkpointing.TerminateOnNonFiniteLoss(steps, backup),
        *([backup] if backup else []),
    ]
    if config.evaluation.knn_every_epochs > 0:  # first: TensorBoard logs the knn_accuracy it adds
        callbacks.insert(0, monitoring.KNNMonitor.from_config(config))
    history = _fit(model, runtime, config, dataset, start, steps, callbacks)
    if backup is not None:
        history = backup.history  # also the epochs before a resume
    if runtime.is_chief:
        save_keras_atomically(model.encoder, fileio.join(run_dir, ENCODER_FILE))
    result = TrainResult(
        model=model, history=history, run_dir=run_dir, steps_per_epoch=steps, is_chief=runtime.is_chief, backup=backup
    )
    if not keep_backup:
        result.delete_backup()
    return result


def save_keras_atomically(model: keras.Model, path: str) -> None:
    """Saves `model` (as standard Keras layers, `networks.portable_copy`) to a temporary
    `.keras` file beside `path`, then renames it over `path`: a kill never leaves a
    half-written file where a reader looks."""
    fileio.remove_leftovers(path)
    temporary = fileio.temporary_sibling(path) + ".keras"  # Keras saves only to names ending so
    try:
        networks.portable_copy(model).save(temporary)
        tf.io.gfile.rename(temporary, path, overwrite=True)
    finally:
        fileio.remove(temporary)


def _set_aside_earlier_run(run_dir: str) -> None:
    """Moves what an earlier, finished run left in `run_dir` into `run_dir/earlier-<UTC time>/`
    before a run starts there from step 0.

    Nothing is lost (an accidental rerun keeps the trained encoder), and the folder never holds
    one run's encoder or evaluation beside another run's config or logs. A kill while moving
    leaves each output whole, in one of the two places.
    """
    if not any(fileio.exists(fileio.join(run_dir, name)) for name in (ENCODER_FILE, export.EVALUATION_FILE)):
        return
    aside = fileio.join(run_dir, "earlier-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    while fileio.exists(aside):
        aside += "-1"
    fileio.makedirs(aside)
    moved = []
    for name in RUN_OUTPUTS:
        source = fileio.join(run_dir, name)
        if not fileio.exists(source):
            continue
        if fileio.isdir(source):
            fileio.replace_dir(source, fileio.join(aside, name))
        else:
            tf.io.gfile.rename(source, fileio.join(aside, name))
        moved.append(name)
    logger.warning(
        "%s holds an earlier run's outputs and no backup to resume from: moved %s to %s; training from step 0",
        run_dir, ", ".join(moved), aside,
    )


def model_config(config: config_lib.Config, strategy: tf.distribute.Strategy) -> config_lib.Config:
    """The config the networks are built from: synchronised BN only with several replicas.

    With one replica it computes the same statistics as plain BN, but Keras then takes its
    cross-replica path anyway, slower on CPU (benchmarks/RESULTS.md, switches).
    """
    if strategy.num_replicas_in_sync > 1 or not config.network.sync_batchnorm:
        return config
    return dataclasses.replace(config, network=dataclasses.replace(config.network, sync_batchnorm=False))


def _projector_logger(config: config_lib.Config, log_dir: str, holdout: config_lib.DataConfig) -> list:
    """[the Embedding Projector callback], or [] when the data has no held-out split."""
    if holdout.eval_split is None and holdout.holdout_examples == 0:
        logger.info("embedding projector off: the data has no held-out split (data.holdout_examples is 0)")
        return []
    return [monitoring.ProjectorLogger.from_config(config, log_dir, holdout)]


def _config_dataset(config: config_lib.Config, batch: int, input_context: tf.distribute.InputContext | None):
    return data.make_pretraining_dataset(config, split="train", batch_size=batch, input_context=input_context)


def _fit(model, runtime, config, dataset, start: int, steps: int, callbacks) -> dict:
    """`model.fit` from global step `start`: the rest of a started epoch, then whole epochs.

    Keras resumes at epoch granularity only, so a backup taken inside an epoch is resumed
    with one short `fit` that finishes that epoch, then one for the remaining epochs.
    """
    epochs = config.train.epochs
    epoch, done = divmod(start, steps)
    history = {}
    while epoch < epochs:
        inputs = runtime.input(dataset, epoch * steps + done, global_batch=config.data.batch_size)
        last = epoch + 1 if done else epochs
        logs = model.fit(
            inputs,
            initial_epoch=epoch,
            epochs=last,
            steps_per_epoch=steps - done,
            callbacks=callbacks,
            verbose=config.train.verbose,
            shuffle=False,  # the input pipeline shuffles
        ).history
        for name, values in logs.items():
            history.setdefault(name, []).extend(values)
        epoch, done = last, 0
    return history
