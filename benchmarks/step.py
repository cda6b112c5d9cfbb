"""Full BYOL train step versus the sum of its parts, timed in one process.

    python -m benchmarks.step --encoder resnet18_cifar --batch 128 --size 32
    python -m benchmarks.step --encoder small_convnet --batch 128 --size 28

(a) the full step: `fit`'s compiled train function (same `jit_compile` as the encoder's
preset, `--jit` to change it) on an in-memory batch of two views;
(b) its parts, each its own `tf.function` with the same jit setting: 2 x online
forward+backward (encoder -> projector -> predictor -> loss -> gradients of the online
variables), 2 x target forward (BN in training mode, as in the step), the optimizer's
`apply_gradients` (LARS for the presets) and the EMA target update.

All are timed interleaved (full, online x2, target x2, optimizer, EMA, full, ...) so drift
hits each alike. Prints two JSON lines: `step` (images/s of the full step; an image is one
source image, i.e. a pair of views) and `step_vs_parts` (full / sum of the parts' medians;
target <= 1.10). A ratio above 1 is what the step does beyond its parts (the online probe,
metrics, schedules, Keras' wrapper) plus what the parts gain from running alone.
"""

from __future__ import annotations

import argparse
import os

from benchmarks import common

common.quiet_tensorflow()

import keras  # noqa: E402  (after the environment is set)
import tensorflow as tf  # noqa: E402

from benchmarks import presets, tfmodel  # noqa: E402
from byol_tf import byol, losses  # noqa: E402

TARGET_RATIO = 1.10


def online_variables(model) -> list:
    return (
        model.online_encoder.trainable_variables
        + model.online_projector.trainable_variables
        + model.predictor.trainable_variables
    )


def part_functions(model, batch: dict, jit_compile: bool) -> dict:
    """The step's parts as zero-argument callables, each running its own tf.function."""
    view1, view2 = batch["view1"], batch["view2"]
    size = tf.cast(tf.shape(view1)[0], tf.float32)
    variables = online_variables(model)
    compile_options = dict(jit_compile=jit_compile, reduce_retracing=True)

    @tf.function(**compile_options)
    def online_forward_backward(view, target_projection):
        with tf.GradientTape() as tape:
            _, _, prediction = model.online_forward(view)
            loss = tf.reduce_sum(losses.regression_loss(prediction, target_projection)) / size
        return tape.gradient(loss, variables)

    @tf.function(**compile_options)
    def target_forward(view):
        # BN on batch statistics (and its moving-statistics update), as in the train step.
        return model.target_projection(view)

    @tf.function(**compile_options)
    def optimizer_apply(gradients):
        model.optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return model.optimizer.iterations.value

    @tf.function(**compile_options)
    def ema(tau):
        targets, onlines = zip(*model.ema_pairs())
        byol.ema_update(targets, onlines, tau)
        return tau

    target1, target2 = target_forward(view1), target_forward(view2)
    # Gradients of the right shapes for every trainable variable (the probe's included, as
    # the step applies them too); small, so the weights stay sane over many applications.
    gradients = [tf.random.normal(v.shape, stddev=1e-4, dtype=v.dtype) for v in model.trainable_variables]
    tau = tf.constant(0.99)

    def online_x2():
        online_forward_backward(view1, target2)
        online_forward_backward(view2, target1)

    def target_x2():
        target_forward(view1)
        target_forward(view2)

    return {
        "online_fwd_bwd_x2": online_x2,
        "target_fwd_x2": target_x2,
        "optimizer_apply": lambda: optimizer_apply(gradients),
        "ema_update": lambda: ema(tau),
    }


def measure(args) -> list[dict]:
    config = presets.load_config(args.encoder, args.batch, args.size, presets.config_overrides(args), args.config)
    jit_compile = tfmodel.jit_setting(config, args.jit)
    keras.utils.set_random_seed(0)
    model = tfmodel.build(config, jit_compile, args.precision)
    batch = tfmodel.synthetic_batch(args.batch, args.size, tfmodel.num_classes(config))
    dataset = tf.data.Dataset.from_tensors(batch).repeat()

    functions = {"full_step": tfmodel.train_step_function(model, dataset)}
    # One untimed step first: it builds the optimizer's variables, which the parts use.
    functions["full_step"]()
    if args.parts:
        functions.update(part_functions(model, batch, jit_compile))
    times = common.interleaved(functions, args.reps, args.warmup)
    full = common.median(times["full_step"])
    description = {
        "encoder": args.encoder,
        "batch": args.batch,
        "size": args.size,
        "jit_compile": jit_compile,
        "precision": args.precision or config.distribute.precision,
        "optimizer": config.optimizer.name,
        "heads": [
            config.network.projector_hidden_dim,
            config.network.projection_dim,
            config.network.predictor_hidden_dim,
        ],
        "sync_batchnorm": tfmodel.sync_batchnorm(config),
        "online_probe": config.train.online_probe,
        "overrides": list(args.set),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "interop_threads": os.environ.get("TF_NUM_INTEROP_THREADS", "default"),
        "smoke": args.smoke,
        "accelerator": tfmodel.accelerator(),
    }
    records = [
        common.record(
            "step",
            description,
            args.batch / full,
            "images/s",
            full,
            args.reps,
            args.out,
            step_times_s=times["full_step"],
        )
    ]
    if not args.parts:
        return records
    medians = {name: common.median(values) for name, values in times.items() if name != "full_step"}
    parts_sum = sum(medians.values())
    per_rep_ratios = [
        times["full_step"][rep] / sum(times[name][rep] for name in medians) for rep in range(args.reps)
    ]
    records.append(
        common.record(
            "step_vs_parts",
            description,
            full / parts_sum,
            "ratio",
            full,
            args.reps,
            args.out,
            parts_s=medians,
            sum_parts_s=parts_sum,
            ratio_paired_median=common.median(per_rep_ratios),
            target=TARGET_RATIO,
        )
    )
    return records


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="resnet18_cifar", choices=sorted(presets.ENCODER_PRESETS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--config", default=None, help="a config YAML instead of the encoder's preset")
    presets.add_config_arguments(parser)
    parser.add_argument(
        "--precision", default=None, help="Keras dtype policy, e.g. mixed_bfloat16 (default: the config's)"
    )
    parser.add_argument(
        "--no-parts", dest="parts", action="store_false", help="time the full step only (no step_vs_parts line)"
    )
    common.add_common_arguments(parser)
    return parser


def main(argv=None):
    args = parser().parse_args(argv)
    if args.smoke:
        common.smoke_sizes(args)
        args.encoder = "small_convnet" if args.encoder == "resnet50" else args.encoder
    measure(args)


if __name__ == "__main__":
    main()
