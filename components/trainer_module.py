"""TFX Trainer module: `run_fn` pretrains BYOL on the Examples artifact with `byol_tf.training`.

The Trainer is given `run_fn="components.trainer_module.run_fn"` and
`custom_config` = the whole experiment config as a dict (`byol_tf.config.to_dict`).
`run_fn` reads the train split's tf.Examples (`fn_args.train_files`) with
`byol_tf.data.parse_example`, makes view pairs with `byol_tf.data.pretraining_dataset`,
calls `byol_tf.training.train` -- the same code as `byol-tf train` -- and writes:

- `fn_args.model_run_dir`: the run folder (config.yaml, TensorBoard logs under logs/,
  encoder.keras), as `byol-tf train` lays it out;
- `fn_args.serving_model_dir`: the encoder export of `byol_tf.export.export_encoder`
  (SavedModel with `serving_default` / `embed_images` signatures, encoder.keras,
  config.yaml, and metrics.json with the last epoch's training metrics). This folder is
  what LinearEval scores and the Pusher copies.

The eval split is not read here: it is the linear-evaluation test split, never seen in
pretraining. The kNN monitor of `byol-tf train` (`evaluation.knn_every_epochs`) is off
in the Trainer: `training.train` builds it from `config.data`, which would bypass the
validated Examples; LinearEval reports kNN accuracy of the final encoder instead.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile

from absl import logging

from byol_tf import config as config_lib


def _is_remote(path: str) -> bool:
    return "://" in path


def _copy_tree(source: str, destination: str):
    """Copies a local folder to `destination` (local or e.g. gs://) with tf.io.gfile."""
    import tensorflow as tf

    for root, _, files in os.walk(source):
        target_root = os.path.join(destination, os.path.relpath(root, source))
        tf.io.gfile.makedirs(target_root)
        for name in files:
            tf.io.gfile.copy(os.path.join(root, name), os.path.join(target_root, name), overwrite=True)


def training_dataset(config: config_lib.Config, file_patterns, image_shape, input_context=None):
    """Batches of {"view1", "view2", "label"} from tf.Example files, as `byol-tf train` makes them.

    `byol_tf.data.make_pretraining_dataset` with the Examples artifact in place of
    `config.data` (sharding, per-replica batches and per-pipeline seeds included).
    """
    import tensorflow as tf

    from byol_tf import data

    from components import examples_io

    parallel = config.data.num_parallel_calls
    images = examples_io.image_dataset(
        file_patterns, image_shape=image_shape, num_parallel_calls=tf.data.AUTOTUNE if parallel == -1 else parallel
    )
    return data.make_pretraining_dataset(config, input_context=input_context, images=images)


def pipeline_training_config(config: config_lib.Config) -> config_lib.Config:
    """The config the Trainer trains with: the kNN monitor off (see the module docstring)."""
    if config.evaluation.knn_every_epochs:
        logging.info("Trainer: kNN monitor off (evaluation.knn_every_epochs=%d ignored)", config.evaluation.knn_every_epochs)
    return dataclasses.replace(config, evaluation=dataclasses.replace(config.evaluation, knn_every_epochs=0))


def final_training_metrics(history: dict) -> dict[str, float]:
    """The last epoch's value of each metric Keras logged."""
    return {name: float(values[-1]) for name, values in history.items() if len(values)}


def backup_dir(fn_args) -> str:
    """Where the Trainer backs up its training state: stable across retries of one training.

    Each Trainer execution gets a fresh model_run folder, so the backup lives beside them,
    keyed by the config and the input files: a retried (e.g. preempted) Trainer with the
    same inputs resumes from it; any other training starts afresh. `training.train`
    deletes it once training has finished.
    """
    key = json.dumps({"config": fn_args.custom_config, "train_files": sorted(fn_args.train_files)}, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    executions = os.path.dirname(fn_args.model_run_dir.rstrip("/"))  # .../Trainer/model_run
    return os.path.join(executions, "backup", digest)


def run_fn(fn_args):
    """Pretrains BYOL and saves the encoder to the Trainer's Model artifact.

    Args:
        fn_args: `tfx.components.FnArgs`; uses `custom_config` (the config dict),
            `train_files`, `model_run_dir` and `serving_model_dir`.

    Raises:
        byol_tf.config.ConfigError: `custom_config` is not a valid config.
        ValueError: the train split is empty.
    """
    from byol_tf import export, training

    from components import examples_io

    if not fn_args.custom_config:
        raise ValueError("Trainer: custom_config must hold the experiment config (byol_tf.config.to_dict)")
    config = pipeline_training_config(config_lib.from_dict(fn_args.custom_config))
    summary = examples_io.summarize_split(fn_args.train_files)
    if summary.num_examples == 0:
        raise ValueError(f"Trainer: the train split {fn_args.train_files} holds no examples")
    num_classes = config.data.num_classes or summary.num_classes or None
    logging.info(
        "Trainer: %d training images, %s classes, image shape %s",
        summary.num_examples, num_classes, summary.image_shape,
    )
    # A function, not a dataset: train() calls it per fit (exact resumes) and per input
    # pipeline under a distribution strategy.
    dataset = functools.partial(training_dataset, config, list(fn_args.train_files), summary.image_shape)

    # byol_tf writes with local file APIs: train and export locally, then copy when the
    # artifact folders are remote (gs:// on Vertex).
    scratch = tempfile.mkdtemp(prefix="byol-trainer-")
    try:
        run_dir = os.path.join(scratch, "run") if _is_remote(fn_args.model_run_dir) else fn_args.model_run_dir
        result = training.train(
            config,
            run_dir=run_dir,
            dataset=dataset,
            num_examples=summary.num_examples,
            num_classes=num_classes,
            backup_dir=backup_dir(fn_args),
        )
        metrics = {
            "training": final_training_metrics(result.history),
            "num_train_examples": summary.num_examples,
            "steps_per_epoch": result.steps_per_epoch,
        }
        serving_dir = fn_args.serving_model_dir
        export_dir = os.path.join(scratch, "serving") if _is_remote(serving_dir) else serving_dir
        export.export_encoder(
            result.encoder, export_dir, config.augment.image_size, config=config, metrics=metrics, overwrite=True
        )
        if _is_remote(fn_args.model_run_dir):
            _copy_tree(run_dir, fn_args.model_run_dir)
        if _is_remote(serving_dir):
            _copy_tree(export_dir, serving_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logging.info("Trainer: encoder exported to %s", fn_args.serving_model_dir)
