"""TFX Trainer module: `run_fn` pretrains BYOL on the Examples artifact with `byol_tf.experiment`.

The Trainer is given `run_fn="byol_tfx.components.trainer_module.run_fn"` and
`custom_config={"config": byol_tf.config.to_json(config)}`: the same canonical JSON every
custom component of the pipeline takes. `run_fn` reads the train split's tf.Examples
(`fn_args.train_files`, full-resolution images of any size) with
`byol_tf.data.parse_example`, makes view pairs with `byol_tf.data.make_pretraining_dataset`
(the random resized crops of `byol-tf train`, taken here from the full image), and runs
`byol_tf.experiment.run` -- the flow of `byol-tf train` -- without its evaluation
(LinearEval scores the encoder), writing:

- `fn_args.model_run_dir`: the run folder (config.yaml, TensorBoard logs under logs/,
  encoder.keras), as `byol-tf train` lays it out;
- `fn_args.serving_model_dir`: the encoder export (SavedModel with `serving_default` /
  `embed_images` signatures, encoder.keras, config.yaml, and metrics.json with the last
  epoch's training metrics). This folder is what LinearEval scores and the Pusher copies.

Both are written in place through `tf.io.gfile` (gs:// on Vertex): nothing is staged.
With `vertex_training.enabled` in a compiled Vertex pipeline, TFX's Vertex Trainer runs the
same `run_fn` as a custom job on the worker pools of `vertex_worker_pools`.
The eval split is never trained on: it is the linear-evaluation test split. Only the
Embedding Projector view (`evaluation.projector_images`) reads a few of its images at the
end of training, as `byol-tf train` reads its held-out split. The kNN monitor of `byol-tf train` (`evaluation.knn_every_epochs`) is off in
the Trainer: it would read `config.data` around the validated Examples; LinearEval
reports kNN accuracy of the final encoder instead.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging

from byol_tf import config as config_lib

logger = logging.getLogger(__name__)

CONFIG_KEY = "config"  # the key of custom_config that holds the experiment's JSON


def custom_config(config_json: str) -> dict[str, str]:
    """The Trainer's `custom_config` for an experiment's canonical JSON."""
    return {CONFIG_KEY: config_json}


def vertex_worker_pools(vertex: config_lib.VertexTrainingConfig, image: str) -> list[dict]:
    """Vertex AI worker pool specs (CustomJobSpec.worker_pool_specs) for the training.

    Pool 0 is one chief; with replica_count > 1, pool 1 holds the other replicas. Vertex
    sets TF_CONFIG on each machine (task types "chief" and "worker"), which
    MultiWorkerMirroredStrategy reads (`distribute.strategy: multi_worker`). TFX's Vertex
    Trainer sets each container's command: it runs this module's `run_fn` there.
    """
    machine = {"machine_type": vertex.machine_type}
    if vertex.accelerator_type:
        machine.update(accelerator_type=vertex.accelerator_type, accelerator_count=vertex.accelerator_count)
    container = {"image_uri": vertex.image or image}
    pools = [{"machine_spec": dict(machine), "replica_count": 1, "container_spec": dict(container)}]
    if vertex.replica_count > 1:
        pools.append(
            {"machine_spec": dict(machine), "replica_count": vertex.replica_count - 1, "container_spec": dict(container)}
        )
    return pools


def vertex_custom_config(vertex: config_lib.VertexTrainingConfig, image: str) -> dict:
    """The `custom_config` keys of TFX's Vertex Trainer (tfx.extensions.google_cloud_ai_platform)
    that start the training as a Vertex AI custom job with `vertex_worker_pools`."""
    from tfx.extensions.google_cloud_ai_platform import constants
    from tfx.extensions.google_cloud_ai_platform.trainer import executor

    return {
        constants.ENABLE_VERTEX_KEY: True,
        constants.VERTEX_REGION_KEY: vertex.region,
        executor.TRAINING_ARGS_KEY: {
            "project": vertex.project,
            "job_spec": {"worker_pool_specs": vertex_worker_pools(vertex, image)},
        },
    }


def training_dataset(config: config_lib.Config, file_patterns, image_shape, input_context=None):
    """Batches of {"view1", "view2", "label"} from tf.Example files, as `byol-tf train` makes them.

    `byol_tf.data.make_pretraining_dataset` with the Examples artifact in place of
    `config.data` (sharding, per-replica batches and per-pipeline seeds included).
    """
    import tensorflow as tf

    from byol_tf import data
    from byol_tfx.components import examples_io

    parallel = config.data.num_parallel_calls
    images = examples_io.image_dataset(
        file_patterns, image_shape=image_shape, num_parallel_calls=tf.data.AUTOTUNE if parallel == -1 else parallel
    )
    return data.make_pretraining_dataset(config, input_context=input_context, images=images)


def examples_data_config(config: config_lib.Config, train_files, eval_files) -> config_lib.DataConfig:
    """The Examples artifact as a `tfrecord` data source: its train split and held-out eval split.

    The library's readers then serve the Trainer as they serve `byol-tf train` (ImageExampleGen
    already applied the hold-out and the size cap, so neither is applied again).
    """
    if len(train_files) != 1 or len(eval_files) != 1:
        raise ValueError(f"Trainer: expected one file pattern per split, got {train_files} / {eval_files}")
    return dataclasses.replace(
        config.data, source="tfrecord", path=train_files[0], eval_split=eval_files[0], name=None, max_examples=None
    )


def pipeline_training_config(config: config_lib.Config) -> config_lib.Config:
    """The config the Trainer trains with: the kNN monitor off (see the module docstring)."""
    if config.evaluation.knn_every_epochs:
        logger.info("Trainer: kNN monitor off (evaluation.knn_every_epochs=%d ignored)", config.evaluation.knn_every_epochs)
    return dataclasses.replace(config, evaluation=dataclasses.replace(config.evaluation, knn_every_epochs=0))


def backup_dir(fn_args) -> str:
    """Where the Trainer backs up its training state: stable across retries of one training.

    Each Trainer execution gets a fresh model_run folder, so the backup lives beside them,
    keyed by the config and the input files: a retried (e.g. preempted) Trainer with the
    same inputs resumes from it; any other training starts afresh. Training deletes it
    once it has finished.
    """
    from byol_tf import fileio

    key = json.dumps({"config": fn_args.custom_config, "train_files": sorted(fn_args.train_files)}, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    executions = fileio.dirname(fn_args.model_run_dir)  # .../Trainer/model_run
    return fileio.join(executions, "backup", digest)


def run_fn(fn_args):
    """Pretrains BYOL and exports the encoder to the Trainer's Model artifact.

    Args:
        fn_args: `tfx.components.FnArgs`; uses `custom_config` (`custom_config(config_json)`),
            `train_files`, `model_run_dir` and `serving_model_dir`.

    Raises:
        byol_tf.config.ConfigError: the config is not valid.
        ValueError: `custom_config` holds no config, or the train split is empty.
    """
    from byol_tf import experiment
    from byol_tfx.components import examples_io

    if not fn_args.custom_config or CONFIG_KEY not in fn_args.custom_config:
        raise ValueError(f"Trainer: custom_config must be {{{CONFIG_KEY!r}: byol_tf.config.to_json(config)}}")
    config = pipeline_training_config(config_lib.from_json(fn_args.custom_config[CONFIG_KEY]))
    summary = examples_io.summarize_split(fn_args.train_files)
    if summary.num_examples == 0:
        raise ValueError(f"Trainer: the train split {fn_args.train_files} holds no examples")
    num_classes = config.data.num_classes or summary.num_classes or None
    logger.info(
        "Trainer: %d training images, %s classes, image shape %s",
        summary.num_examples, num_classes, summary.image_shape,
    )
    # A function, not a dataset: training calls it per fit (exact resumes) and per input
    # pipeline under a distribution strategy.
    dataset = functools.partial(training_dataset, config, list(fn_args.train_files), summary.image_shape)
    experiment.run(
        config,
        run_dir=fn_args.model_run_dir,
        export_dir=fn_args.serving_model_dir,
        evaluate=False,
        dataset=dataset,
        num_examples=summary.num_examples,
        num_classes=num_classes,
        backup_dir=backup_dir(fn_args),
        # Never None while the projector is on: config.data would read the source around
        # the validated Examples.
        holdout_data=examples_data_config(config, fn_args.train_files, fn_args.eval_files)
        if config.evaluation.projector_images
        else None,
    )
