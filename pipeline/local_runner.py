"""Runs the pipeline on this machine: LocalDagRunner, ML Metadata in SQLite, Beam DirectRunner.

    byol-tf-pipeline run --config configs/mnist5k.yaml [--set train.epochs=5] [--output-dir DIR]

Everything of a run lives under `OUTPUT_DIR/PIPELINE_NAME/` (the pipeline name is
`byol-tf-<config file stem>` unless given):

    pipeline_root/     the artifacts of every component execution
    metadata.sqlite    ML Metadata: executions, artifacts, lineage, the cache
    serving_model/     the Pusher's destination: one folder per pushed (blessed) encoder,
                       named by its Unix timestamp

A rerun with the same config and output folder reuses cached executions (ingestion,
validation and, for an unchanged config, training) and compares the new encoder with the
latest blessed one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

DEFAULT_OUTPUT_DIR = "pipeline_output"
METADATA_FILE = "metadata.sqlite"
PIPELINE_ROOT_DIR = "pipeline_root"
SERVING_MODEL_DIR = "serving_model"
# Beam DirectRunner in this process: worker processes would each pay their start-up and
# double memory on a 2-core machine, for the small datasets this default is meant for. For
# a large source, pass e.g. --direct_running_mode=multi_processing --direct_num_workers=N
# (`byol-tf-pipeline run --beam-arg=...`): ingestion then reads and checks on N cores.
DEFAULT_BEAM_PIPELINE_ARGS = ("--direct_running_mode=in_memory", "--direct_num_workers=1")


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where a local pipeline keeps its artifacts, metadata and pushed encoders."""

    base: str
    pipeline_root: str
    metadata_path: str
    serving_model_dir: str


def run_paths(output_dir: str, pipeline_name: str) -> RunPaths:
    """The folders of pipeline `pipeline_name` under `output_dir` (absolute paths)."""
    base = os.path.abspath(os.path.join(output_dir, pipeline_name))
    return RunPaths(
        base=base,
        pipeline_root=os.path.join(base, PIPELINE_ROOT_DIR),
        metadata_path=os.path.join(base, METADATA_FILE),
        serving_model_dir=os.path.join(base, SERVING_MODEL_DIR),
    )


@dataclasses.dataclass
class RunSummary:
    """What one pipeline run did, read back from ML Metadata.

    Attributes:
        run_id: the pipeline_run context name (LocalDagRunner: a timestamp).
        states: node id -> execution state names in this run (e.g. ["COMPLETE"], ["CACHED"]).
        linear_eval: LinearEval's linear_eval.json of this run, or None.
        blessed: whether this run's encoder was blessed.
        blessing_message: LinearEval's reason.
        pushed_to: where the Pusher copied the encoder in this run, or None.
        latest_pushed: the newest pushed encoder of any run of this pipeline, or None.
        serving_check: ServingCheck's reason (it loads the encoder in a fresh process and
            answers its warm-up requests), or None when it did not run.
        embeddings: EmbedImages' Parquet folder in this run, or None (not enabled, or skipped).
    """

    run_id: str
    states: dict[str, list[str]]
    linear_eval: dict | None
    blessed: bool
    blessing_message: str
    pushed_to: str | None
    latest_pushed: str | None
    serving_check: str | None = None
    embeddings: str | None = None

    def format(self) -> str:
        """The lines the runner prints: the linear-eval (and fine-tuning) tables and where the encoder went."""
        lines = []
        if self.linear_eval:
            lines.append(self.linear_eval["table"])
            if "finetune" in self.linear_eval:
                lines.append(self.linear_eval["finetune"]["table"])
        lines.append(f"LinearEval: {self.blessing_message}")
        if self.serving_check:
            lines.append(f"ServingCheck: {self.serving_check}")
        if self.pushed_to:
            lines.append(f"blessed encoder pushed to {self.pushed_to}")
        else:
            lines.append("nothing pushed in this run")
            if self.latest_pushed:
                lines.append(f"latest blessed encoder (an earlier run): {self.latest_pushed}")
        if self.embeddings:
            lines.append(f"embeddings written to {self.embeddings}")
        return "\n".join(lines)


def _node_id(store, execution) -> str:
    from tfx.dsl.compiler import constants

    for context in store.get_contexts_by_execution(execution.id):
        if store.get_context_types_by_id([context.type_id])[0].name == constants.NODE_CONTEXT_TYPE_NAME:
            return context.name.split(".", 1)[-1]
    return store.get_execution_types_by_id([execution.type_id])[0].name


def _outputs(store, execution) -> list:
    import ml_metadata as mlmd

    events = store.get_events_by_execution_ids([execution.id])
    ids = [event.artifact_id for event in events if event.type == mlmd.proto.Event.OUTPUT]
    return store.get_artifacts_by_id(ids) if ids else []


def summarize_run(metadata_path: str, pipeline_name: str, run_id: str | None = None) -> RunSummary:
    """Reads a run of the pipeline back from its SQLite ML Metadata.

    Args:
        metadata_path: the metadata.sqlite of the pipeline.
        pipeline_name: its name.
        run_id: a pipeline_run context name; default the latest run.

    Raises:
        ValueError: the store has no run of this pipeline.
    """
    import ml_metadata as mlmd
    from tfx.dsl.compiler import constants
    from tfx.orchestration import metadata
    from tfx.types import standard_artifacts

    from byol_tfx.components import embed_images, linear_eval, serving_check

    store = mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(metadata_path))
    pipeline_context = store.get_context_by_type_and_name(constants.PIPELINE_CONTEXT_TYPE_NAME, pipeline_name)
    if pipeline_context is None:
        raise ValueError(f"{metadata_path} holds no run of pipeline {pipeline_name!r}")
    runs = [
        context
        for context in store.get_contexts_by_type(constants.PIPELINE_RUN_CONTEXT_TYPE_NAME)
        if run_id is None or context.name == run_id
    ]
    pipeline_execution_ids = {e.id for e in store.get_executions_by_context(pipeline_context.id)}
    runs = [r for r in runs if any(e.id in pipeline_execution_ids for e in store.get_executions_by_context(r.id))]
    if not runs:
        raise ValueError(f"{metadata_path} holds no run {run_id or ''} of pipeline {pipeline_name!r}".replace("  ", " "))
    run = max(runs, key=lambda context: context.id)

    states: dict[str, list[str]] = {}
    linear_eval_doc, blessed, message, pushed_to, serving_message = None, False, "LinearEval did not run", None, None
    embeddings = None
    for execution in sorted(store.get_executions_by_context(run.id), key=lambda e: e.id):
        node = _node_id(store, execution)
        states.setdefault(node, []).append(mlmd.proto.Execution.State.Name(execution.last_known_state))
        for artifact in _outputs(store, execution):
            type_name = store.get_artifact_types_by_id([artifact.type_id])[0].name
            properties = artifact.custom_properties
            if type_name == linear_eval.LinearEvalMetrics.TYPE_NAME:
                with open(os.path.join(artifact.uri, linear_eval.METRICS_FILE), encoding="utf-8") as stream:
                    linear_eval_doc = json.load(stream)
                blessed = bool(linear_eval_doc["blessing"]["blessed"])
                message = linear_eval_doc["blessing"]["message"]
            elif type_name == standard_artifacts.InfraBlessing.TYPE_NAME:
                serving_message = properties[serving_check.MESSAGE_KEY].string_value
            elif type_name == standard_artifacts.PushedModel.TYPE_NAME and properties["pushed"].int_value == 1:
                pushed_to = properties["pushed_destination"].string_value
            elif type_name == embed_images.Embeddings.TYPE_NAME and properties[embed_images.EMBEDDED_KEY].int_value:
                embeddings = artifact.uri

    latest_pushed = None
    pushes = [
        artifact
        for artifact in store.get_artifacts_by_type(standard_artifacts.PushedModel.TYPE_NAME)
        if artifact.custom_properties["pushed"].int_value == 1
    ]
    if pushes:
        latest_pushed = max(pushes, key=lambda a: a.id).custom_properties["pushed_destination"].string_value
    return RunSummary(
        run_id=run.name,
        states=states,
        linear_eval=linear_eval_doc,
        blessed=blessed,
        blessing_message=message,
        pushed_to=pushed_to,
        latest_pushed=latest_pushed,
        serving_check=serving_message,
        embeddings=embeddings,
    )


def run(
    config,
    pipeline_name: str,
    output_dir: str = DEFAULT_OUTPUT_DIR,
    *,
    blessing_margin: float | None = None,
    beam_pipeline_args: Sequence[str] = DEFAULT_BEAM_PIPELINE_ARGS,
    enable_cache: bool = True,
    embed_split: str | None = None,
) -> RunSummary:
    """Runs the pipeline of an experiment here and reads back what the run did.

    Args:
        config: the experiment (`byol_tf.config.Config`).
        pipeline_name: the pipeline's name (`default_pipeline_name(config_path)`); the cache
            is per pipeline name.
        output_dir: folder holding every pipeline's artifacts, metadata and pushed models.
        blessing_margin: required top-1 gain over the random-init encoder (fraction);
            default `pipeline.DEFAULT_BLESSING_MARGIN`.
        beam_pipeline_args: for the Beam-based components (ImageExampleGen, StatisticsGen, EmbedImages).
        enable_cache: reuse executions whose inputs and parameters are unchanged.
        embed_split: "eval" or "train": also embed that split with the blessed encoder
            (EmbedImages); None: not.

    Returns:
        The run's summary.
    """
    from tfx import v1 as tfx

    from byol_tf import sources
    from byol_tfx.pipeline import pipeline as pipeline_lib

    paths = run_paths(output_dir, pipeline_name)
    os.makedirs(paths.base, exist_ok=True)
    tfx_pipeline = pipeline_lib.create_pipeline(
        pipeline_name=pipeline_name,
        pipeline_root=paths.pipeline_root,
        config=config,
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(paths.metadata_path),
        beam_pipeline_args=list(beam_pipeline_args),
        push_destination=paths.serving_model_dir,
        blessing_margin=pipeline_lib.DEFAULT_BLESSING_MARGIN if blessing_margin is None else blessing_margin,
        enable_cache=enable_cache,
        # Changed files in a folder / TFRecord source must not be served from the cache.
        source_fingerprint=sources.fingerprint(config.data),
        embed_split=embed_split,
    )
    tfx.orchestration.LocalDagRunner().run(tfx_pipeline)
    return summarize_run(paths.metadata_path, pipeline_name)
