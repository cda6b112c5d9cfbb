"""`byol-tf` command line: a thin layer over `byol_tf.training`, `evaluation`, `export`
and the TFX pipeline runners.

    byol-tf train --config configs/mnist5k.yaml [--set section.field=value ...]
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
    train.add_argument("--run-dir", help="output folder (default: train.run_dir of the config)")
    train.add_argument("--no-eval", action="store_true", help="skip the linear evaluation at the end")
    return parser


def _load_config(args):
    from byol_tf import config

    return config.load(args.config, args.overrides)


def _train(args) -> int:
    cfg = _load_config(args)  # before the heavy imports: a bad config fails in a second
    from byol_tf import training

    result = training.train(cfg, run_dir=args.run_dir)
    print(f"encoder saved to {result.encoder_path}")
    return 0


COMMANDS = {"train": _train}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as error:
        # Bad configs and inputs: one clear line, not a traceback from deep inside TF.
        if os.environ.get("BYOL_TF_TRACEBACK"):
            raise
        print(f"byol-tf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
