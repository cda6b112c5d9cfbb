"""Two-view augmentation throughput of the tf.data pipeline, and whether training is input-bound.

    python -m benchmarks.input_pipeline --source mnist5k --encoder small_convnet --size 28 --batch 128
    python -m benchmarks.input_pipeline --source synthetic --encoder resnet18_cifar --size 32 --batch 128
    python -m benchmarks.input_pipeline --source synthetic --encoder resnet50 --size 224 --batch 64 --fit-steps 0

1. `input_pipeline`: images/s that `data.pretraining_dataset` delivers alone (both views of
   each image, the encoder preset's view distributions), from images held in memory: the
   embedded MNIST-5k, or synthetic uint8 images of `--source-size` (default: `--size`). Timed
   in blocks, each on a fresh iterator (a live iterator's prefetch threads would keep working
   while another is timed), alternating nothing: one pipeline per process run.
2. `input_bound` (unless `--fit-steps 0`): `model.fit` on the live pipeline versus `fit` on
   views made beforehand and cached in memory, alternating (cached, live, cached, live ...),
   with the preset's model and compile settings. Cached-view fit speed is what the train step
   consumes; live / cached step time near 1 means the pipeline keeps up while sharing the
   cores with training. Headroom = pipeline alone / consumption (target >= 2 at 32 px).
3. `augment_op` (with `--ops`): where the augmentation time goes: `augment.two_views` on one
   batch in a `tf.function` with only one op enabled (probability 1), per op, interleaved;
   `ms_over_crop` is its cost above the crops alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time

from benchmarks import common

common.quiet_tensorflow()

import keras  # noqa: E402  (after the environment is set)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import presets, tfmodel  # noqa: E402
from byol_tf import augment, data  # noqa: E402
from byol_tf.config import ViewConfig  # noqa: E402

TARGET_HEADROOM = 2.0


def synthetic_images(count: int, size: int, seed: int = 0) -> dict:
    """uint8 images [count, size, size, 3] and labels, held in memory like a cached dataset."""
    rng = np.random.default_rng(seed)
    # Smooth random blobs plus noise rather than pure noise: the ops do the same work either
    # way, but the view grids in a debugger look like images.
    coarse = rng.uniform(0, 255, size=(count, 4, 4, 3)).astype(np.float32)
    images = tf.image.resize(coarse, (size, size), method="bilinear").numpy()
    images += rng.normal(0, 12, size=images.shape)
    return {
        "image": np.clip(images, 0, 255).astype(np.uint8),
        "label": rng.integers(0, 10, size=(count,)).astype(np.int64),
    }


def make_dataset(config, source: str, source_size: int, count: int, parallel: int | None = None,
                 options: tf.data.Options | None = None) -> tf.data.Dataset:
    """The training input (`data.pretraining_dataset`) over in-memory images of `source`."""
    if source == "mnist5k":
        images = data.load_split(config.data, "train")
    else:
        images = tf.data.Dataset.from_tensor_slices(synthetic_images(count, source_size))
    dataset = data.pretraining_dataset(
        images,
        config.augment,
        config.data.batch_size,
        config.data.seed,
        shuffle_buffer=config.data.shuffle_buffer if source == "mnist5k" else min(config.data.shuffle_buffer, count),
        num_parallel_calls=config.data.num_parallel_calls if parallel is None else parallel,
        cache=config.data.cache,
    )
    return dataset.with_options(options) if options is not None else dataset


def pipeline_throughput(make, blocks: int, batches: int, warmup: int) -> dict:
    """Times `batches` batches after `warmup` ones, in `blocks` fresh iterators of `make()`.

    Returns:
        {"images_per_s": total images / total time, "batch_times_s": every batch's time}.
    """
    times, images = [], 0
    for _ in range(blocks):
        iterator = iter(make())
        for _ in range(warmup):
            next(iterator)
        for _ in range(batches):
            start = time.perf_counter()
            batch = next(iterator)
            times.append(time.perf_counter() - start)
            images += int(batch["view1"].shape[0])
        del iterator, batch
        gc.collect()  # stop the block's prefetch threads before the next block starts
    return {"images_per_s": images / sum(times), "batch_times_s": times}


class StepTimer(keras.callbacks.Callback):
    """Wall time between consecutive train-batch ends: the step plus its wait for input."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self._last = None

    def on_train_begin(self, logs=None):
        self._last = None

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self._last is not None:  # the first step also starts the iterator: not counted
            self.times.append(now - self._last)
        self._last = now


def fit_live_versus_cached(config, jit_compile, live, steps: int, rounds: int, precision: str | None = None) -> dict:
    """Alternates `fit` on pre-made cached views and on the live pipeline; per-step seconds.

    With `augment.placement: device` the cached batches are crops and parameters: both fits
    then include the augmentation in the step, and only the host's share differs.
    """
    model = tfmodel.build(config, jit_compile, precision)
    # Views made once, before timing, and replayed from memory: no augmentation cost.
    made = list(live().take(min(steps + 1, 8)))
    stacked = {key: tf.stack([batch[key] for batch in made]) for key in made[0]}
    cached = tf.data.Dataset.from_tensor_slices(stacked).repeat().prefetch(2)
    del made
    timers = {"cached": StepTimer(), "live": StepTimer()}
    sources = {"cached": lambda: cached, "live": live}
    # The first fit traces and (with XLA) compiles the step: untimed.
    model.fit(cached, epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)
    for _ in range(rounds):
        for name in ("cached", "live"):
            model.fit(sources[name](), epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[timers[name]], shuffle=False)
            gc.collect()
    return {name: timer.times for name, timer in timers.items()}


def op_variants(view: ViewConfig) -> dict[str, ViewConfig]:
    """One view config per augmentation op, firing on every image; "crop" has no other op."""
    crop_only = dataclasses.replace(
        view, flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0
    )
    jitter = dict(color_jitter_prob=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    variants = {"crop": crop_only, "flip": dataclasses.replace(crop_only, flip_prob=1.0)}
    for name in ("brightness", "contrast", "saturation", "hue"):
        # A magnitude the preset switches off (e.g. hue for digits) gets the paper's, to show its cost.
        magnitude = getattr(view, name) or getattr(ViewConfig(), name)
        variants[f"jitter_{name}"] = dataclasses.replace(crop_only, **{**jitter, name: magnitude})
    variants["grayscale"] = dataclasses.replace(crop_only, grayscale_prob=1.0)
    variants["blur"] = dataclasses.replace(crop_only, blur_prob=1.0)
    variants["solarize"] = dataclasses.replace(crop_only, solarize_prob=1.0)
    variants["full_view"] = view  # the preset's view 1, with its own probabilities
    return variants


def op_costs(config, source: str, source_size: int, reps: int, warmup: int, out) -> list[dict]:
    """Where the augmentation time goes: each op alone on one batch, in a tf.function.

    Both views get the same variant (view 1's distribution with one op at probability 1),
    so each figure is the cost of that op on two views plus the crops.
    """
    batch_size, size = config.data.batch_size, config.augment.image_size
    if source == "mnist5k":
        images = next(iter(data.load_split(config.data, "train").batch(batch_size)))["image"]
    else:
        images = tf.constant(synthetic_images(batch_size, source_size)["image"])
    seed = tf.constant([1, 2], tf.int64)
    functions = {}
    for name, view in op_variants(config.augment.view1).items():
        augment_config = dataclasses.replace(config.augment, view1=view, view2=view)

        @tf.function
        def run(images, seed, augment_config=augment_config):
            return augment.two_views(images, augment_config, seed)

        functions[name] = lambda run=run: [view.numpy() for view in run(images, seed)]
    times = common.interleaved(functions, reps, warmup)
    crop = common.median(times["crop"])
    records = []
    for name, values in times.items():
        median = common.median(values)
        records.append(
            common.record(
                "augment_op",
                {"op": name, "source": source, "size": size, "batch": batch_size},
                batch_size / median,
                "images/s",
                median,
                len(values),
                out,
                ms_over_crop=1000.0 * (median - crop) if name != "crop" else 0.0,
            )
        )
    return records


def measure(args) -> list[dict]:
    overrides = presets.config_overrides(args)
    if args.source == "mnist5k":
        overrides += ["data.source=mnist5k", "data.name=null", "data.eval_split=null"]
    config = presets.load_config(args.encoder, args.batch, args.size, overrides, args.config)
    source_size = args.source_size or args.size
    jit_compile = tfmodel.jit_setting(config, args.jit)
    keras.utils.set_random_seed(0)

    def live():
        return make_dataset(config, args.source, source_size, args.count, args.parallel)

    description = {
        "source": args.source,
        "source_size": 28 if args.source == "mnist5k" else source_size,
        "size": args.size,
        "batch": args.batch,
        "encoder": args.encoder,
        "num_parallel_calls": config.data.num_parallel_calls if args.parallel is None else args.parallel,
        "smoke": args.smoke,
    }
    if args.ops:
        op_costs(config, args.source, source_size, args.op_reps, args.warmup, args.out)
    pipeline = pipeline_throughput(live, args.blocks, args.batches, args.warmup)
    records = [
        common.record(
            "input_pipeline",
            description,
            pipeline["images_per_s"],
            "images/s",
            common.median(pipeline["batch_times_s"]),
            len(pipeline["batch_times_s"]),
            args.out,
        )
    ]
    if args.fit_steps > 0:
        times = fit_live_versus_cached(config, jit_compile, live, args.fit_steps, args.rounds)
        cached, live_median = common.median(times["cached"]), common.median(times["live"])
        consumption = args.batch / cached
        records.append(
            common.record(
                "input_bound",
                {**description, "jit_compile": jit_compile},
                live_median / cached,
                "live/cached step time",
                live_median,
                len(times["live"]),
                args.out,
                cached_median_s=cached,
                consumption_images_per_s=consumption,
                live_images_per_s=args.batch / live_median,
                pipeline_images_per_s=pipeline["images_per_s"],
                headroom=pipeline["images_per_s"] / consumption,
                target_headroom=TARGET_HEADROOM,
                cached_times_s=times["cached"],
                live_times_s=times["live"],
            )
        )
    return records


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.input_pipeline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--source", choices=("mnist5k", "synthetic"), default="synthetic")
    parser.add_argument("--encoder", default="resnet18_cifar", choices=sorted(presets.ENCODER_PRESETS),
                        help="its preset gives the view distributions and the model for the fit test")
    parser.add_argument("--size", type=int, default=32, help="view size (augment.image_size)")
    parser.add_argument("--source-size", type=int, default=None, help="synthetic image side (default --size)")
    parser.add_argument("--count", type=int, default=2048, help="synthetic images in memory")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--parallel", type=int, default=None,
                        help="num_parallel_calls of every map (-1 AUTOTUNE; default: the config's)")
    parser.add_argument("--blocks", type=int, default=3, help="fresh iterators timed")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per block")
    parser.add_argument("--fit-steps", type=int, default=5, help="timed steps per fit (0: no fit test)")
    parser.add_argument("--rounds", type=int, default=2, help="cached/live fit alternations")
    parser.add_argument("--ops", action="store_true", help="also time each augmentation op alone (augment_op)")
    parser.add_argument("--op-reps", type=int, default=10, help="timed repetitions per op with --ops")
    parser.add_argument("--config", default=None, help="a config YAML instead of the encoder's preset")
    presets.add_config_arguments(parser)
    # Warm-up batches also drain the prefetch buffer filled while the iterator started, so
    # the timed batches show the steady-state rate, not buffered ones.
    common.add_common_arguments(parser, reps=None, warmup=5)
    return parser


def main(argv=None):
    args = parser().parse_args(argv)
    if args.smoke:
        args.batch, args.count = min(args.batch, 8), min(args.count, 64)
        if args.source == "synthetic":
            args.size = min(args.size, 16)
        args.blocks, args.batches, args.warmup, args.rounds = 1, 2, 1, 1
        args.fit_steps = min(args.fit_steps, 2)
        args.op_reps = 2
    measure(args)


if __name__ == "__main__":
    main()
