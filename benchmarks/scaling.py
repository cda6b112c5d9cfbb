"""How the BYOL step's cost grows with batch size and with image size.

    python -m benchmarks.scaling --encoder small_convnet --batches 32 64 128 256 512 --batch-sweep-size 28 \\
        --sizes 16 28 32 64 --size-sweep-batch 128
    python -m benchmarks.scaling --encoder resnet18_cifar --batches 32 64 128 --batch-sweep-size 32 --sizes 16 32 \\
        --size-sweep-batch 32

Two sweeps, each a set of models (one per point, the preset's settings) whose `fit` train
steps are timed interleaved (point 1, point 2, ..., point 1, ...), so drift is shared. One
JSON line `scaling` per point: value = median seconds per step; images/s alongside.
`python -m benchmarks.report` plots both sweeps.
"""

from __future__ import annotations

import argparse

from benchmarks import common

common.quiet_tensorflow()

import keras  # noqa: E402  (after the environment is set)
import tensorflow as tf  # noqa: E402

from benchmarks import presets, tfmodel  # noqa: E402


def sweep(args, name: str, points: list[tuple[int, int]], overrides) -> list[dict]:
    """Times the train step at each (batch, size) point, interleaved."""
    steps, jit_of = {}, {}
    for batch, size in points:
        config = presets.load_config(args.encoder, batch, size, overrides)
        jit_compile = tfmodel.jit_setting(config, args.jit)
        keras.utils.set_random_seed(0)
        model = tfmodel.build(config, jit_compile)
        data = tfmodel.synthetic_batch(batch, size, tfmodel.num_classes(config))
        key = f"b{batch}_s{size}"
        steps[key] = tfmodel.train_step_function(model, tf.data.Dataset.from_tensors(data).repeat())
        jit_of[key] = jit_compile
    times = common.interleaved(steps, args.reps, args.warmup)
    records = []
    for (batch, size), key in zip(points, steps):
        median = common.median(times[key])
        description = {
            "sweep": name, "encoder": args.encoder, "batch": batch, "size": size,
            "jit_compile": jit_of[key], "smoke": args.smoke,
        }
        records.append(
            common.record(
                "scaling", description, median, "s/step", median, args.reps, args.out,
                images_per_s=batch / median, times_s=times[key],
            )
        )
    return records


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="small_convnet", choices=sorted(presets.ENCODER_PRESETS))
    parser.add_argument("--batches", type=int, nargs="*", default=[32, 64, 128, 256, 512])
    parser.add_argument("--batch-sweep-size", type=int, default=28, help="image size of the batch sweep")
    parser.add_argument("--sizes", type=int, nargs="*", default=[16, 28, 32, 64])
    parser.add_argument("--size-sweep-batch", type=int, default=128, help="batch of the image-size sweep")
    presets.add_config_arguments(parser)
    common.add_common_arguments(parser, reps=5, warmup=2)
    return parser


def main(argv=None):
    args = parser().parse_args(argv)
    if args.smoke:
        args.batches, args.batch_sweep_size = [4, 8], 16
        args.sizes, args.size_sweep_batch = [12, 16], 4
        args.reps, args.warmup = 2, 1
    overrides = presets.config_overrides(args)
    if args.batches:
        sweep(args, "batch", [(batch, args.batch_sweep_size) for batch in args.batches], overrides)
    if args.sizes:
        sweep(args, "size", [(args.size_sweep_batch, size) for size in args.sizes], overrides)


if __name__ == "__main__":
    main()
