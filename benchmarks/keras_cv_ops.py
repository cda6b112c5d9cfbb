"""keras-cv 0.9's per-image augmentation layers versus byol-tf's own view transform.

    python -m benchmarks.keras_cv_ops --batch 128 --size 32
    python -m benchmarks.keras_cv_ops --batch 32 --size 224

The design card named keras-cv for augmentation. Both sides get the same crops (uint8
images already cropped to the output size) and apply BYOL's first view distribution after
the crop: flip, colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur (p=1.0, sigma in
[0.1, 2]), solarisation (p=0 for view 1, so view 2's p=0.2 is used). keras-cv side:
RandomFlip, RandomApply(RandomColorJitter), RandomApply(Grayscale), RandomGaussianBlur,
RandomApply(Solarization); byol-tf side: `augment.view_transform`. Each is one
`tf.function` over the batch, timed interleaved.

Besides speed, the record notes what keras-cv cannot express: RandomColorJitter applies
brightness, contrast, saturation and hue in a fixed order (BYOL draws a random order per
image) and scales brightness by a factor (the reference adds a delta).

One JSON line `keras_cv_ops` per size: value = keras-cv seconds / byol-tf seconds.
"""

from __future__ import annotations

import argparse

from benchmarks import common

common.quiet_tensorflow()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from byol_tf import augment  # noqa: E402
from byol_tf.config import ViewConfig  # noqa: E402


def keras_cv_view(size: int, view: ViewConfig):
    """BYOL's post-crop view as keras-cv 0.9 layers (closest equivalent)."""
    import keras
    import keras_cv

    kernel = max(3, 2 * int(size / 10 / 2) + 1)
    layers = keras_cv.layers
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal"),
            layers.RandomApply(
                layers.RandomColorJitter(
                    value_range=(0, 255),
                    brightness_factor=view.brightness,
                    contrast_factor=view.contrast,
                    saturation_factor=(0.5 - view.saturation / 2, 0.5 + view.saturation / 2),
                    hue_factor=view.hue,
                ),
                rate=view.color_jitter_prob,
            ),
            layers.RandomApply(layers.Grayscale(output_channels=3), rate=view.grayscale_prob),
            layers.RandomGaussianBlur(kernel_size=kernel, factor=tuple(view.blur_sigma)),
            layers.RandomApply(layers.Solarization(value_range=(0, 255), threshold_factor=0), rate=0.2),
        ]
    )


def measure(args) -> list[dict]:
    view = ViewConfig(blur_prob=1.0, solarize_prob=0.2)
    rng = np.random.default_rng(0)
    crops = tf.constant(rng.integers(0, 256, size=(args.batch, args.size, args.size, 3)).astype(np.uint8))
    model = keras_cv_view(args.size, view)
    seed = tf.constant([0, 1], tf.int64)

    @tf.function
    def with_keras_cv():
        return model(tf.cast(crops, tf.float32), training=True)

    @tf.function
    def with_byol_tf():
        return augment.view_transform(crops, view, seed)

    functions = {
        "keras_cv": lambda: with_keras_cv().numpy(),
        "byol_tf": lambda: with_byol_tf().numpy(),
    }
    times = common.interleaved(functions, args.reps, args.warmup)
    keras_cv_s, byol_tf_s = common.median(times["keras_cv"]), common.median(times["byol_tf"])
    return [
        common.record(
            "keras_cv_ops",
            {"batch": args.batch, "size": args.size, "smoke": args.smoke},
            keras_cv_s / byol_tf_s,
            "ratio",
            byol_tf_s,
            args.reps,
            args.out,
            keras_cv_s=keras_cv_s,
            byol_tf_s=byol_tf_s,
            keras_cv_images_per_s=args.batch / keras_cv_s,
            byol_tf_images_per_s=args.batch / byol_tf_s,
            not_expressible=["jitter order random per image", "additive brightness delta"],
        )
    ]


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    result.add_argument("--batch", type=int, default=128)
    result.add_argument("--size", type=int, default=32)
    common.add_common_arguments(result)
    return result


def main(argv=None):
    args = parser().parse_args(argv)
    if args.smoke:
        common.smoke_sizes(args)
    return measure(args)


if __name__ == "__main__":
    main()
