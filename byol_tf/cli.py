"""`byol-tf` command line: a thin layer over `byol_tf.training`, `evaluation`, `export`
and the TFX pipeline runners.

    byol-tf train --config configs/mnist5k.yaml [--set section.field=value ...]
    byol-tf train --config configs/imagenet_resnet50.yaml --paper-budget 300
    byol-tf eval --encoder RUN_DIR/encoder.keras --config configs/mnist5k.yaml
    byol-tf export --run RUN_DIR --out DIR
    byol-tf pipeline run --config configs/mnist5k.yaml
    byol-tf pipeline compile --target vertex --config configs/mnist5k.yaml --out FILE.json
"""

from __future__ import annotations

import argparse
import os
import sys

# tfx.v1 sets TF_USE_LEGACY_KERAS=1 for child processes; this project is Keras 3 throughout.
os.environ["TF_USE_LEGACY_KERAS"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from byol_tf import presets  # noqa: E402 -- after the environment; light, no TensorFlow

EXPORT_FOLDER = "export"  # `byol-tf train` exports to RUN_DIR/export


def _add_config_arguments(parser: argparse.ArgumentParser, required: bool = True):
    parser.add_argument("--config", required=required, help="YAML experiment file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.epochs=3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byol-tf", description="BYOL self-supervised pretraining (TF/Keras 3).")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="pretrain with keras.Model.fit, then evaluate and save the encoder")
    _add_config_arguments(train)
    train.add_argument(
        "--paper-budget",
        type=int,
        choices=sorted(presets.PAPER_IMAGENET_BUDGETS),
        metavar="EPOCHS",
        help="the paper's ImageNet epochs, base LR, weight decay and tau_base for this budget "
        f"({', '.join(map(str, presets.PAPER_IMAGENET_BUDGETS))}; byol_tf/presets.py), applied before --set",
    )
    train.add_argument("--run-dir", help="output folder (default: train.run_dir of the config)")
    train.add_argument("--no-eval", action="store_true", help="skip the linear evaluation at the end")

    evaluate = commands.add_parser(
        "eval", help="linear evaluation of a saved encoder, beside random-init and raw-pixel baselines"
    )
    evaluate.add_argument("--encoder", required=True, help="a Keras encoder file (RUN_DIR/encoder.keras)")
    _add_config_arguments(evaluate)
    evaluate.add_argument("--out", help="also write the report as JSON to this file")
    evaluate.add_argument("--no-baselines", action="store_true", help="evaluate the encoder only")

    export = commands.add_parser("export", help="export a run's encoder as a SavedModel for serving")
    export.add_argument("--run", required=True, help="a run folder written by `byol-tf train`")
    export.add_argument("--out", required=True, help="the export folder to create")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export folder")

    _add_pipeline_parser(commands)
    return parser


def _add_pipeline_parser(commands):
    pipeline = commands.add_parser("pipeline", help="the TFX pipeline: run it locally or compile it for Vertex AI")
    actions = pipeline.add_subparsers(dest="pipeline_command", required=True)

    run = actions.add_parser("run", help="run the pipeline here (LocalDagRunner, ML Metadata in SQLite)")
    _add_config_arguments(run)
    run.add_argument("--output-dir", default="pipeline_output", help="artifacts, metadata and pushed encoders go here")
    run.add_argument("--blessing-margin", type=float, help="required top-1 gain over random init (default 0.01)")
    run.add_argument("--no-cache", action="store_true", help="rerun every component even if nothing changed")

    compile_ = actions.add_parser("compile", help="compile the pipeline to a Kubeflow v2 / Vertex AI job file")
    compile_.add_argument("--target", choices=["vertex"], default="vertex", help="orchestrator (vertex: KFP v2 JSON)")
    _add_config_arguments(compile_)
    compile_.add_argument("--out", required=True, help="the pipeline JSON file to write")
    compile_.add_argument("--image", help="container image of every step, built from the Dockerfile")
    compile_.add_argument("--pipeline-root", help="gs:// folder for artifacts")
    compile_.add_argument("--push-destination", help="gs:// folder for pushed encoders (default PIPELINE_ROOT/serving_model)")
    compile_.add_argument(
        "--beam-arg",
        dest="beam_args",
        action="append",
        default=None,
        metavar="ARG",
        help="a Beam pipeline argument, e.g. --beam-arg=--runner=DataflowRunner (repeatable)",
    )


def _load_config(args):
    from byol_tf import config

    overrides = list(args.overrides)
    if getattr(args, "paper_budget", None) is not None:
        # First, so that --set overrides still win.
        overrides = presets.paper_budget_overrides(args.paper_budget) + overrides
    return config.load(args.config, overrides)


def _train(args) -> int:
    cfg = _load_config(args)  # before the heavy imports: a bad config fails in a second
    from byol_tf import evaluation, export, training

    result = training.train(cfg, run_dir=args.run_dir)
    print(f"encoder saved to {result.encoder_path}")
    metrics = None
    if not args.no_eval:
        try:
            report = evaluation.evaluate(result.encoder, cfg)
        except evaluation.NoLabelsError as error:
            print(f"no linear evaluation: {error}")
        else:
            metrics = report.to_dict()
            print(report.format_table())
            path = os.path.join(result.run_dir, export.EVALUATION_FILE)
            _write_json(metrics, path)
            print(f"evaluation written to {path}")
    # The export records the metrics just measured; a rerun in the same folder replaces it.
    export_dir = export.export_encoder(
        result.encoder,
        os.path.join(result.run_dir, EXPORT_FOLDER),
        cfg.augment.image_size,
        config=cfg,
        metrics=metrics,
        overwrite=True,
    )
    print(f"SavedModel exported to {export_dir}")
    return 0


def _evaluate(args) -> int:
    cfg = _load_config(args)
    if not os.path.isfile(args.encoder):
        raise ValueError(f"--encoder: {args.encoder!r} does not exist")
    import keras

    from byol_tf import evaluation

    encoder = keras.models.load_model(args.encoder, compile=False)
    report = evaluation.evaluate(encoder, cfg, baselines=False if args.no_baselines else None)
    print(report.format_table())
    if args.out:
        _write_json(report.to_dict(), args.out)
        print(f"evaluation written to {args.out}")
    return 0


def _export(args) -> int:
    from byol_tf import export

    export_dir = export.export_run(args.run, args.out, overwrite=args.overwrite)
    print(f"SavedModel exported to {export_dir}")
    return 0


def _pipeline(args) -> int:
    _load_config(args)  # a bad config fails in a second, before TFX is imported
    if args.pipeline_command == "run":
        from pipeline import local_runner

        local_runner.run(
            args.config,
            args.overrides,
            output_dir=args.output_dir,
            blessing_margin=args.blessing_margin,
            enable_cache=not args.no_cache,
        )
        return 0
    from pipeline import kubeflow_v2_runner

    options = {
        "image": args.image,
        "pipeline_root": args.pipeline_root,
        "push_destination": args.push_destination,
        "beam_pipeline_args": args.beam_args,
    }
    path = kubeflow_v2_runner.compile_pipeline(
        args.config, args.out, args.overrides, **{key: value for key, value in options.items() if value is not None}
    )
    print(f"Vertex AI pipeline written to {path}")
    return 0


def _write_json(value, path: str):
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(value, stream, indent=2, sort_keys=True)


COMMANDS = {"train": _train, "eval": _evaluate, "export": _export, "pipeline": _pipeline}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FloatingPointError) as error:
        # Bad configs and inputs, and a run stopped by a NaN loss (NonFiniteTrainingError):
        # one clear line, not a traceback from deep inside TF.
        if os.environ.get("BYOL_TF_TRACEBACK"):
            raise
        print(f"byol-tf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
