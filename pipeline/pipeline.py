"""The BYOL TFX pipeline: ingestion -> validation -> pretraining -> serving check + linear evaluation -> push.

`create_pipeline` takes every setting as an argument and has no side effects: the
runners (`local_runner`, `kubeflow_v2_runner`) own the paths, the metadata store and the
orchestrator. Components are thin adapters over `byol_tf`:

    ImageExampleGen   -> examples (splits train, eval; full-resolution images), ingestion
                      report (Beam: one process, several, or Dataflow)
    StatisticsGen -> ImageSchemaGen -> ExampleValidator -> ValidationGate
                      -> validated_schema, only when the examples have no anomaly
    Trainer           examples + validated_schema -> model (run_fn: byol_tf.training); in the
                      step's container, or as a Vertex AI custom job (`vertex_training`)
    ServingCheck      model -> infra blessing: loads in a fresh process, answers its warm-up
                      requests (byol_tf.serving)
    Resolver          ML Metadata -> the latest blessed model and its blessing
    LinearEval        examples + model + latest blessed -> metrics, blessing (byol_tf.evaluation)
    Pusher            model + blessing + infra blessing -> push_destination/<timestamp>/
                      when both are blessed
    EmbedImages       examples + pushed model -> Parquet embeddings of one split (optional,
                      `embed_split`; byol_tf.embed, on Beam)
"""

from __future__ import annotations

import os
from typing import Sequence

from tfx import v1 as tfx

from byol_tf import config as config_lib

DEFAULT_BLESSING_MARGIN = 0.01
TRAINER_RUN_FN = "byol_tfx.components.trainer_module.run_fn"

# Node ids, also the task names in the compiled Vertex pipeline.
EXAMPLE_GEN = "ImageExampleGen"
TRAINER = "Trainer"
SERVING_CHECK = "ServingCheck"
LATEST_BLESSED_MODEL_RESOLVER = "latest_blessed_model_resolver"
LINEAR_EVAL = "LinearEval"
PUSHER = "Pusher"
EMBED_IMAGES = "EmbedImages"


def default_pipeline_name(config_path: str) -> str:
    """`byol-tf-<stem of the config file>`, e.g. byol-tf-mnist5k."""
    stem = os.path.splitext(os.path.basename(config_path))[0]
    return "byol-tf-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)


def create_pipeline(
    pipeline_name: str,
    pipeline_root: str,
    config: config_lib.Config,
    metadata_connection_config=None,
    beam_pipeline_args: Sequence[str] | None = None,
    push_destination: str | None = None,
    blessing_margin=DEFAULT_BLESSING_MARGIN,
    enable_cache: bool = True,
    max_bad_fraction=None,
    source_fingerprint: str | None = None,
    embed_split: str | None = None,
    vertex_image: str | None = None,
) -> tfx.dsl.Pipeline:
    """Builds the pipeline (nothing runs, nothing is written).

    Args:
        pipeline_name: the pipeline's name in ML Metadata (the cache is per name).
        pipeline_root: folder (or gs:// path) for the artifacts.
        config: the experiment, serialised by `byol_tf.config.to_json` (canonical, so the
            same experiment keeps its cache keys): every custom component and the Trainer's
            `custom_config` get it as their one `config` parameter. Ingestion and validation
            get the sections they read only (their modules' `CONFIG_SECTIONS`), so a change
            of training settings reruns training, not ingestion.
        metadata_connection_config: ML Metadata connection (None on Vertex, which has its own).
        beam_pipeline_args: for the Beam-based components (DirectRunner, Dataflow, ...).
        push_destination: base folder of the pushed encoders (one timestamped folder per push).
        blessing_margin: required top-1 gain of the BYOL encoder over a random-init
            encoder (fraction; 0.01 = one point); a float or a RuntimeParameter.
        enable_cache: reuse executions whose inputs and parameters are unchanged.
        max_bad_fraction: ImageExampleGen fails when more records than this are bad;
            a float or a RuntimeParameter; None: `config.data.max_bad_fraction`.
        source_fingerprint: a hash of a folder / TFRecord source's files
            (`byol_tfx.components.ingestion.source_fingerprint`, computed by the runner): part of
            ImageExampleGen's cache key, so changed files are read again.
        embed_split: "eval" or "train" adds EmbedImages after the Pusher: the blessed
            encoder's Parquet embeddings of that split (nothing when not blessed); None: no
            such step.
            (`byol_tf.sources.fingerprint`, computed by the runner): part of ImageExampleGen's
            cache key, so changed files are read again.
        vertex_image: the container image of a Vertex AI pipeline; with
            `config.vertex_training.enabled`, the Trainer then runs as a Vertex AI custom
            job in it (or in `vertex_training.image`), with the config's worker pools. None
            (local runs): the Trainer runs in its own step.

    Returns:
        A `tfx.dsl.Pipeline`.

    Raises:
        ValueError: `push_destination` is missing, or `embed_split` is not a split.
    """
    from byol_tfx.components import embed_images as embed_images_lib
    from byol_tfx.components import example_gen as example_gen_lib
    from byol_tfx.components import linear_eval as linear_eval_lib
    from byol_tfx.components import serving_check as serving_check_lib
    from byol_tfx.components import trainer_module
    from byol_tfx.components import validation as validation_lib

    if not push_destination:
        raise ValueError("create_pipeline: push_destination (where blessed encoders go) is required")
    config_json = config_lib.to_json(config)

    example_gen = example_gen_lib.ImageExampleGen(
        config=config_lib.to_json(config, example_gen_lib.CONFIG_SECTIONS),
        max_bad_fraction=config.data.max_bad_fraction if max_bad_fraction is None else max_bad_fraction,
        source_fingerprint=source_fingerprint or None,
    ).with_id(EXAMPLE_GEN)
    examples = example_gen.outputs["examples"]
    validation = validation_lib.validation_components(
        examples, config_lib.to_json(config, validation_lib.CONFIG_SECTIONS)
    )

    trainer_config = trainer_module.custom_config(config_json)
    trainer_class = tfx.components.Trainer
    if vertex_image and config.vertex_training.enabled:
        # The same run_fn, started by TFX's Vertex Trainer as a custom job with worker pools.
        trainer_class = tfx.extensions.google_cloud_ai_platform.Trainer
        trainer_config.update(trainer_module.vertex_custom_config(config.vertex_training, vertex_image))
    trainer = trainer_class(
        run_fn=TRAINER_RUN_FN,
        examples=examples,
        # The gate's output exists only when ExampleValidator found no anomaly: the
        # Trainer (and everything after it) cannot run on data that failed validation.
        schema=validation["validation_gate"].outputs["validated_schema"],
        custom_config=trainer_config,
    ).with_id(TRAINER)

    # What InfraValidator does, without a model server: nothing is pushed that does not load
    # and answer its warm-up requests in a fresh process.
    serving_check = serving_check_lib.ServingCheck(model=trainer.outputs["model"], config=config_json).with_id(
        SERVING_CHECK
    )

    latest_blessed = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id(LATEST_BLESSED_MODEL_RESOLVER)

    linear_eval = linear_eval_lib.LinearEval(
        examples=examples,
        model=trainer.outputs["model"],
        config=config_json,
        blessing_margin=blessing_margin,
        baseline_model=latest_blessed.outputs["model"],
        baseline_blessing=latest_blessed.outputs["model_blessing"],
    ).with_id(LINEAR_EVAL)

    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"],
        model_blessing=linear_eval.outputs["blessing"],
        infra_blessing=serving_check.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=push_destination)
        ),
    ).with_id(PUSHER)

    embedding = []
    if embed_split is not None:
        embedding = [
            embed_images_lib.EmbedImages(
                examples=examples, pushed_model=pusher.outputs["pushed_model"], config=config_json, split=embed_split
            ).with_id(EMBED_IMAGES)
        ]

    return tfx.dsl.Pipeline(
        pipeline_name=pipeline_name,
        pipeline_root=pipeline_root,
        components=[
            example_gen, *validation.values(), trainer, serving_check, latest_blessed, linear_eval, pusher, *embedding
        ],
        enable_cache=enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=list(beam_pipeline_args or []),
    )
