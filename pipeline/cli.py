"""`byol-tf-pipeline`: run the TFX pipeline here, or compile it for Vertex AI / Kubeflow.

    byol-tf-pipeline run --config configs/mnist5k.yaml [--set train.epochs=5] [--output-dir DIR] [--embed-split eval] \\
        [--beam-arg=--direct_running_mode=multi_processing --beam-arg=--direct_num_workers=4]
    byol-tf-pipeline compile --target vertex --config configs/mnist5k.yaml --out byol.json \\
        --image IMAGE --pipeline-root gs://BUCKET/byol-tf

The config is loaded (and validated) once, here, before TFX is imported: a bad setting fails
in a second. The runners get the `Config` object; `create_pipeline` serialises it once.
"""

from __future__ import annotations

import argparse
import sys

from byol_tf import cli as library_cli
from byol_tf import logs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="byol-tf-pipeline", description="The byol-tf TFX pipeline: run it locally or compile it for Vertex AI."
    )
    actions = parser.add_subparsers(dest="command", required=True)

    run = actions.add_parser("run", help="run the pipeline here (LocalDagRunner, ML Metadata in SQLite)")
    library_cli.add_config_arguments(run)
    run.add_argument("--output-dir", default="pipeline_output", help="artifacts, metadata and pushed encoders go here")
    run.add_argument("--blessing-margin", type=float, help="required top-1 gain over random init (default 0.01)")
    run.add_argument("--no-cache", action="store_true", help="rerun every component even if nothing changed")
    add_embed_split_argument(run)
    add_beam_argument(run, "e.g. --beam-arg=--direct_running_mode=multi_processing --beam-arg=--direct_num_workers=4")
    library_cli.add_verbose_argument(run)

    compile_ = actions.add_parser("compile", help="compile the pipeline to a Kubeflow v2 / Vertex AI job file")
    compile_.add_argument("--target", choices=["vertex"], default="vertex", help="orchestrator (vertex: KFP v2 JSON)")
    library_cli.add_config_arguments(compile_)
    compile_.add_argument("--out", required=True, help="the pipeline JSON file to write")
    compile_.add_argument("--image", help="container image of every step, built from the Dockerfile")
    compile_.add_argument("--pipeline-root", help="gs:// folder for artifacts")
    compile_.add_argument("--push-destination", help="gs:// folder for pushed encoders (default PIPELINE_ROOT/serving_model)")
    add_beam_argument(compile_, "e.g. --beam-arg=--runner=DataflowRunner")
    add_embed_split_argument(compile_)
    library_cli.add_verbose_argument(compile_)
    return parser


def add_beam_argument(parser: argparse.ArgumentParser, example: str):
    """Repeatable --beam-arg ARG: Beam pipeline arguments of ImageExampleGen, StatisticsGen, EmbedImages."""
    parser.add_argument(
        "--beam-arg",
        dest="beam_args",
        action="append",
        default=None,
        metavar="ARG",
        help=f"a Beam pipeline argument for ingestion, statistics and embedding, {example} (repeatable)",
    )


def add_embed_split_argument(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--embed-split",
        choices=["eval", "train"],
        help="after the Pusher, embed this split with the blessed encoder (EmbedImages, Parquet)",
    )


def _run(args) -> int:
    config = library_cli.load_config(args)
    from byol_tfx.pipeline import local_runner
    from byol_tfx.pipeline import pipeline as pipeline_lib

    options = {"beam_pipeline_args": args.beam_args} if args.beam_args else {}
    summary = local_runner.run(
        config,
        pipeline_lib.default_pipeline_name(args.config),
        output_dir=args.output_dir,
        blessing_margin=args.blessing_margin,
        enable_cache=not args.no_cache,
        embed_split=args.embed_split,
        **options,
    )
    print(summary.format(), flush=True)
    return 0


def _compile(args) -> int:
    config = library_cli.load_config(args)
    from byol_tfx.pipeline import kubeflow_v2_runner
    from byol_tfx.pipeline import pipeline as pipeline_lib

    options = {
        "image": args.image,
        "pipeline_root": args.pipeline_root,
        "push_destination": args.push_destination,
        "beam_pipeline_args": args.beam_args,
        "embed_split": args.embed_split,
    }
    path = kubeflow_v2_runner.compile_pipeline(
        config,
        args.out,
        pipeline_lib.default_pipeline_name(args.config),
        **{key: value for key, value in options.items() if value is not None},
    )
    print(f"Vertex AI pipeline written to {path}")
    return 0


COMMANDS = {"run": _run, "compile": _compile}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logs.prepare_environment(args.verbose, modules=("tensorflow", "tfx.v1"))
    logs.configure(args.verbose)
    return library_cli.run_command(COMMANDS, args, prog="byol-tf-pipeline")


if __name__ == "__main__":
    sys.exit(main())
