"""`byol-tf` command line: a thin layer over `byol_tf.experiment`, `evaluation`, `finetune` and `export`.

    byol-tf train --config configs/mnist5k.yaml [--set section.field=value ...]
    byol-tf train --config configs/imagenet_resnet50.yaml --paper-budget 300
    byol-tf eval --encoder RUN_DIR/encoder.keras --config configs/mnist5k.yaml
    byol-tf eval --protocol finetune --label-fraction 0.1 --encoder RUN_DIR/encoder.keras --config ...
    byol-tf export --run RUN_DIR --out DIR
    byol-tf embed --model RUN_OR_EXPORT --config configs/mnist5k.yaml --split test --out DIR
    byol-tf neighbours --embeddings DIR --query digit.png [-k 8] --out grid.png

The TFX pipeline has its own command, `byol-tf-pipeline` (`byol_tfx.pipeline.cli`).
Output is byol-tf's progress and results; `--verbose` adds TensorFlow's own logging.
"""

from __future__ import annotations

import argparse
import os
import sys

from byol_tf import embed as embed_lib
from byol_tf import logs, presets
from byol_tf.config import EVALUATION_PROTOCOLS, FINETUNE_PROTOCOL


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True):
    """--config FILE and repeatable --set KEY=VALUE (shared with `byol-tf-pipeline`)."""
    parser.add_argument("--config", required=required, help="YAML experiment file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, the value read as YAML, e.g. --set train.epochs=3 or "
        "--set evaluation.l2_sweep=[0,1e-4] (repeatable)",
    )


def positive_int(text: str) -> int:
    """argparse type of a count flag: the flag's own one-line error, before any work starts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_verbose_argument(parser: argparse.ArgumentParser):
    parser.add_argument("--verbose", action="store_true", help="also show TensorFlow's, absl's and TFX's logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byol-tf", description="BYOL self-supervised pretraining (TF/Keras 3).")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="pretrain with keras.Model.fit, then evaluate and export the encoder")
    add_config_arguments(train)
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
    add_verbose_argument(train)

    evaluate = commands.add_parser(
        "eval",
        help="linear evaluation of a saved encoder beside random-init and raw-pixel baselines, or "
        "fine-tuning on a fraction of the labels beside a random-init encoder (--protocol finetune)",
    )
    evaluate.add_argument("--encoder", required=True, help="a Keras encoder file (RUN_DIR/encoder.keras)")
    add_config_arguments(evaluate)
    evaluate.add_argument("--out", help="also write the report as JSON to this file")
    evaluate.add_argument("--no-baselines", action="store_true", help="evaluate the encoder only")
    evaluate.add_argument(
        "--protocol",
        choices=[*EVALUATION_PROTOCOLS, FINETUNE_PROTOCOL],
        help="a linear protocol (sets evaluation.protocol; default: the config's) or finetune: the encoder "
        "fine-tuned on a fraction of the labels beside a random-init one (evaluation.finetune_*)",
    )
    evaluate.add_argument(
        "--label-fraction",
        type=float,
        nargs="+",
        metavar="F",
        help="with --protocol finetune: label fractions in (0, 1], e.g. 0.01 0.1 "
        "(sets evaluation.finetune_label_fractions)",
    )
    add_verbose_argument(evaluate)

    export = commands.add_parser("export", help="export a run's encoder as a SavedModel for serving")
    export.add_argument("--run", required=True, help="a run folder written by `byol-tf train`")
    export.add_argument("--out", required=True, help="the export folder to create")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    add_verbose_argument(export)

    embed = commands.add_parser("embed", help="embed a data split with an exported encoder, to Parquet")
    embed.add_argument("--model", required=True, help="an export folder, or a run folder (uses its export/)")
    add_config_arguments(embed)
    embed.add_argument(
        "--split",
        choices=["train", "test"],
        default="test",
        help="which split of the config's data (default %(default)s)",
    )
    embed.add_argument("--out", required=True, help="the folder to create: _manifest.json and part-*.parquet")
    embed.add_argument(
        "--batch-size",
        type=positive_int,
        default=embed_lib.DEFAULT_BATCH_SIZE,
        help="images per forward pass (default %(default)s)",
    )
    embed.add_argument(
        "--part-rows",
        type=positive_int,
        default=embed_lib.DEFAULT_PART_ROWS,
        help="rows per Parquet file; a rerun after a kill keeps the finished ones (default %(default)s)",
    )
    embed.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_verbose_argument(embed)

    neighbours = commands.add_parser("neighbours", help="nearest neighbours of query images in `byol-tf embed` output")
    neighbours.add_argument("--embeddings", required=True, help="a folder written by `byol-tf embed`")
    neighbours.add_argument("--query", required=True, action="append", help="an image file (repeatable: one row each)")
    neighbours.add_argument("-k", type=positive_int, default=8, help="neighbours per query (default %(default)s)")
    neighbours.add_argument("--out", required=True, help="the PNG picture to write: each query, then its neighbours")
    neighbours.add_argument(
        "--index", choices=["exact", "hnsw"], default="exact",
        help="exact cosine search (default), or an approximate HNSW index (faiss, extra [ann]) for large collections",
    )
    add_verbose_argument(neighbours)
    return parser


def load_config(args, flag_overrides=()):
    """The config of --config, then --paper-budget, --set and `flag_overrides` (the command's own flags) on top."""
    from byol_tf import config

    overrides = list(args.overrides) + list(flag_overrides)
    if getattr(args, "paper_budget", None) is not None:
        # First, so that --set overrides still win.
        overrides = presets.paper_budget_overrides(args.paper_budget) + overrides
    return config.load(args.config, overrides)


def _train(args) -> int:
    cfg = load_config(args)  # before the heavy imports: a bad config fails in a second
    from byol_tf import experiment

    result = experiment.run(cfg, run_dir=args.run_dir, evaluate=not args.no_eval)
    if result.report is not None:
        print(result.report.format_table())
    return 0


def _evaluate(args) -> int:
    finetuning = args.protocol == FINETUNE_PROTOCOL
    if args.label_fraction and not finetuning:
        raise ValueError("--label-fraction: only with --protocol finetune")
    flags = []
    if args.protocol in EVALUATION_PROTOCOLS:
        flags.append(f"evaluation.protocol={args.protocol}")
    if args.label_fraction:
        flags.append(f"evaluation.finetune_label_fractions={args.label_fraction}")
    cfg = load_config(args, flags)
    from byol_tf import evaluation, fileio, finetune

    if not fileio.isfile(args.encoder):
        raise ValueError(f"--encoder: {args.encoder!r} does not exist")
    import keras

    encoder = keras.models.load_model(args.encoder, compile=False)
    baselines = False if args.no_baselines else None
    if finetuning:
        report = finetune.evaluate(encoder, cfg, baselines=baselines)
    else:
        report = evaluation.evaluate(encoder, cfg, baselines=baselines)
    print(report.format_table())
    if args.out:
        fileio.write_json(args.out, report.to_dict())
        print(f"evaluation written to {args.out}")
    return 0


def _export(args) -> int:
    from byol_tf import export

    export_dir = export.export_run(args.run, args.out, overwrite=args.overwrite)
    print(f"SavedModel exported to {export_dir}")
    return 0


def _embed(args) -> int:
    cfg = load_config(args)
    manifest = embed_lib.embed_split(
        args.model, cfg, args.split, args.out, batch_size=args.batch_size, part_rows=args.part_rows,
        overwrite=args.overwrite,
    )
    print(f"{manifest['count']} embeddings (d={manifest['dimension']}) of the {args.split} split written to {args.out}")
    return 0


def _neighbours(args) -> int:
    import io

    from byol_tf import fileio, neighbours

    picture, found = neighbours.neighbours_picture(args.embeddings, args.query, args.k, index=args.index)
    for query, keys, labels, similarities in zip(args.query, found.keys, found.labels, found.similarities):
        print(f"{query}:")
        for rank, (key, label, similarity) in enumerate(zip(keys, labels, similarities), start=1):
            print(f"  {rank:2d}  {similarity:.4f}  label {label:>3}  {key}")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    fileio.write_bytes(args.out, buffer.getvalue())
    print(f"picture written to {args.out}")
    return 0


COMMANDS = {"train": _train, "eval": _evaluate, "export": _export, "embed": _embed, "neighbours": _neighbours}


def run_command(commands, args, prog: str = "byol-tf") -> int:
    """Runs `commands[args.command]`; bad input and a NaN stop are one line on stderr, exit 2."""
    try:
        return commands[args.command](args)
    except (ValueError, FloatingPointError) as error:
        # Bad configs and inputs, and a run stopped by a NaN loss (NonFiniteTrainingError):
        # one clear line, not a traceback from deep inside TF (BYOL_TF_TRACEBACK=1 shows it).
        if os.environ.get("BYOL_TF_TRACEBACK"):
            raise
        print(f"{prog} {args.command}: error: {error}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logs.prepare_environment(args.verbose)
    logs.configure(args.verbose)
    return run_command(COMMANDS, args)


if __name__ == "__main__":
    sys.exit(main())
