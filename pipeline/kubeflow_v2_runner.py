"""Compiles the pipeline to a Kubeflow Pipelines v2 / Vertex AI Pipelines job file (JSON).

    byol-tf-pipeline compile --target vertex --config configs/mnist5k.yaml --out byol.json \\
        --image REGION-docker.pkg.dev/PROJECT/REPO/byol-tf:0.1.0 \\
        --pipeline-root gs://BUCKET/byol-tf --push-destination gs://BUCKET/byol-tf/serving_model

Every step runs in one container image: the TFX 1.21 base image with this package
installed (see the repository's Dockerfile). Build and push it, compile, then submit:

    docker build -t $IMAGE . && docker push $IMAGE
    python -c "from google.cloud import aiplatform; aiplatform.PipelineJob(
        display_name='byol-tf', template_path='byol.json').submit()"

The same `create_pipeline` as the local runner is compiled; Vertex keeps ML Metadata
itself. The blessing margin and the ingestion's maximum bad-record fraction are runtime
parameters (set them at submission, e.g. `parameter_values={"blessing_margin": 0.02}`).
The Beam-based components (ImageExampleGen, StatisticsGen, EmbedImages) take `beam_pipeline_args`, e.g.
`dataflow_beam_args(...)` to run them on Dataflow. With `vertex_training.enabled` in the
config, the Trainer runs as a Vertex AI custom job with the config's worker pools.

Nothing here needs Google Cloud credentials: compiling only writes a file.
"""

from __future__ import annotations

import os
from typing import Sequence

# The image every step runs in: build it from the repository's Dockerfile and push it to
# a registry your Vertex project can pull from; pass its name with --image.
DEFAULT_IMAGE = "us-docker.pkg.dev/YOUR_PROJECT/byol-tf/byol-tf:0.1.0"
DEFAULT_PIPELINE_ROOT = "gs://YOUR_BUCKET/byol-tf/pipeline_root"
# Beam in the step's own container: several worker processes, one per CPU.
DEFAULT_BEAM_PIPELINE_ARGS = ("--direct_running_mode=multi_processing", "--direct_num_workers=0")
BLESSING_MARGIN_PARAMETER = "blessing_margin"
MAX_BAD_FRACTION_PARAMETER = "max_bad_fraction"


def dataflow_beam_args(project: str, region: str, temp_location: str, image: str | None = None) -> list[str]:
    """`beam_pipeline_args` that run the Beam-based components on Google Cloud Dataflow.

    Args:
        project: GCP project id.
        region: Dataflow region, e.g. us-central1.
        temp_location: gs:// folder for Dataflow's temporary files.
        image: worker container (this package's image) so workers import byol_tf too.
    """
    args = [
        "--runner=DataflowRunner",
        f"--project={project}",
        f"--region={region}",
        f"--temp_location={temp_location}",
    ]
    if image:
        args += [f"--sdk_container_image={image}", "--experiments=use_runner_v2"]
    return args


def compile_pipeline(
    config,
    output_file: str,
    pipeline_name: str,
    *,
    image: str = DEFAULT_IMAGE,
    pipeline_root: str = DEFAULT_PIPELINE_ROOT,
    push_destination: str | None = None,
    beam_pipeline_args: Sequence[str] = DEFAULT_BEAM_PIPELINE_ARGS,
    blessing_margin: float | None = None,
    max_bad_fraction: float | None = None,
    source_fingerprint: str | None = None,
    embed_split: str | None = None,
) -> str:
    """Writes the Vertex / Kubeflow v2 pipeline job JSON for a config.

    Args:
        config: the experiment (`byol_tf.config.Config`).
        output_file: the JSON file to write (its folder is created).
        pipeline_name: the pipeline's name (`pipeline.default_pipeline_name(config_path)`).
        image: container image of every step (see the Dockerfile).
        pipeline_root: gs:// folder for artifacts.
        push_destination: base folder of pushed encoders; default `<pipeline_root>/serving_model`.
        beam_pipeline_args: for the Beam-based components (e.g. `dataflow_beam_args`).
        blessing_margin: default of the `blessing_margin` runtime parameter.
        max_bad_fraction: default of the `max_bad_fraction` runtime parameter; None:
            `config.data.max_bad_fraction`.
        source_fingerprint: `byol_tf.sources.fingerprint` of a folder / TFRecord source,
            when the compiling machine can list it: a new value (new files) makes
            ImageExampleGen a cache miss on Vertex too.
        embed_split: "eval" or "train" adds the EmbedImages step (Beam, `beam_pipeline_args`).

    Returns:
        `output_file`.
    """
    from tfx import v1 as tfx

    from byol_tfx.pipeline import pipeline as pipeline_lib

    name = pipeline_name
    margin = pipeline_lib.DEFAULT_BLESSING_MARGIN if blessing_margin is None else blessing_margin
    max_bad_fraction = config.data.max_bad_fraction if max_bad_fraction is None else max_bad_fraction
    tfx_pipeline = pipeline_lib.create_pipeline(
        pipeline_name=name,
        pipeline_root=pipeline_root,
        config=config,
        metadata_connection_config=None,
        beam_pipeline_args=list(beam_pipeline_args),
        push_destination=push_destination or pipeline_root.rstrip("/") + "/serving_model",
        blessing_margin=tfx.dsl.experimental.RuntimeParameter(
            name=BLESSING_MARGIN_PARAMETER, ptype=float, default=float(margin)
        ),
        max_bad_fraction=tfx.dsl.experimental.RuntimeParameter(
            name=MAX_BAD_FRACTION_PARAMETER, ptype=float, default=float(max_bad_fraction)
        ),
        source_fingerprint=source_fingerprint,
        embed_split=embed_split,
        vertex_image=image,
    )
    output_dir, filename = os.path.split(os.path.abspath(output_file))
    os.makedirs(output_dir, exist_ok=True)
    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(default_image=image),
        output_dir=output_dir,
        output_filename=filename,
    )
    # TFX drops RuntimeParameter defaults when compiling: the job's runtimeConfig carries them.
    runner.run(
        tfx_pipeline,
        parameter_values={BLESSING_MARGIN_PARAMETER: float(margin), MAX_BAD_FRACTION_PARAMETER: float(max_bad_fraction)},
        write_out=True,
    )
    return os.path.join(output_dir, filename)
