"""Host cost of BYOL's input at 224 px from JPEGs: decode-and-crop and augmentation placement.

    python -m benchmarks.input_speed host --size 224 --batch 64 --rounds 5
    python -m benchmarks.input_speed fit --encoder resnet18_cifar --size 224 --batch 32 --setting decode_crop_host

1. `host` (`input_host` records): images/s of the tf.data pipeline alone, per usable core,
   from JPEG bytes held in memory (synthetic natural-ish images of about `--source-size`,
   encoded once), in three settings alternated round by round in one process, each round
   on fresh iterators:
   - `decode_full_host`: today's path, the whole JPEG decoded, then the whole augmentation;
   - `decode_crop_host`: only the crop windows decoded (`data.decode_crop_views`), the
     whole augmentation on the host;
   - `decode_crop_device`: only the windows decoded, crops and flips to uint8; the rest
     waits for the accelerator (`augment.placement: device`), so this is the host's share.
   Nothing is cached (`data.cache` off): every image is decoded every time, as on a
   dataset larger than memory. Each record carries the load average and the CPU's
   instruction-set flags (avx2, avx512f, avx512_bf16, amx).
2. `fit` (`input_fit` records): `model.fit` images/s on the live JPEG pipeline versus on views
   made beforehand and cached in memory, alternating (`benchmarks.input_pipeline`'s timing).
"""

from __future__ import annotations

import argparse
import time

from benchmarks import common

common.quiet_tensorflow()

import keras  # noqa: E402  (after the environment is set)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import input_pipeline, presets, tfmodel  # noqa: E402
from byol_tf import data, distribute  # noqa: E402

SETTINGS = {
    "decode_full_host": ("decoded", "host"),
    "decode_crop_host": ("encoded", "host"),
    "decode_crop_device": ("encoded", "device"),
}
# The flags that decide how fast TensorFlow's CPU kernels are (RESULTS.md names them).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_flags() -> list[str]:
    flags = distribute.cpu_flags()
    return [flag for flag in CPU_FLAGS if flag in flags]


def jpeg_images(count: int, height: int, width: int, seed: int = 0) -> list[bytes]:
    """`count` JPEGs (quality 90, 4:2:0) of smooth colour fields with noise, sizes jittered by
    up to 10 % around height x width: photograph-like work for the decoder."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(count):
        h = max(8, int(height * rng.uniform(0.9, 1.1)))
        w = max(8, int(width * rng.uniform(0.9, 1.1)))
        coarse = rng.uniform(0.0, 1.0, size=(1, h // 24 + 2, w // 24 + 2, 3)).astype(np.float32)
        image = tf.image.resize(coarse, (h, w), method="bicubic")[0].numpy()
        image = np.clip(image + rng.normal(0.0, 0.03, size=image.shape), 0.0, 1.0)
        encoded.append(tf.io.encode_jpeg((image * 255).astype(np.uint8), quality=90).numpy())
    return encoded


def live_dataset(config, encoded: list[bytes], form: str, placement: str) -> tf.data.Dataset:
    """`data.pretraining_dataset` over in-memory JPEG bytes, decoded whole or in the crop map."""
    labels = np.zeros(len(encoded), np.int64)
    images = tf.data.Dataset.from_tensor_slices({"encoded": np.array(encoded, object), "label": labels})
    if form == "decoded":
        images = images.map(
            lambda example: {"image": data.decode_image(example["encoded"]), "label": example["label"]},
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return data.pretraining_dataset(
        images,
        config.augment,
        config.data.batch_size,
        config.data.seed,
        shuffle_buffer=len(encoded),
        num_parallel_calls=config.data.num_parallel_calls,
        cache=False,
        placement=placement,
    )


def _images_per_s(make, batches: int, warmup: int) -> float:
    iterator = iter(make())
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        batch = next(iterator)
        images += int(batch["label"].shape[0])
    return images / (time.perf_counter() - start)


def host(args, config, encoded) -> list[dict]:
    cores = common.usable_cores()
    rates = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, (form, placement) in SETTINGS.items():
            rates[name].append(
                _images_per_s(lambda: live_dataset(config, encoded, form, placement), args.batches, args.warmup)
            )
    records = []
    baseline = common.median(rates["decode_full_host"])
    for name, values in rates.items():
        median = common.median(values)
        records.append(
            common.record(
                "input_host",
                {"setting": name, "size": args.size, "source_size": args.source_size, "batch": args.batch,
                 "cores": cores, "cpu_flags": cpu_flags(), "smoke": args.smoke},
                median / cores,
                "images/s per core",
                args.batch / median,
                len(values),
                args.out,
                images_per_s=median,
                versus_decode_full_host=median / baseline,
                rounds_images_per_s=values,
            )
        )
    return records


def fit(args, config, encoded) -> list[dict]:
    form, placement = SETTINGS[args.setting]
    jit_compile = tfmodel.jit_setting(config, args.jit)
    times = input_pipeline.fit_live_versus_cached(
        config, jit_compile, lambda: live_dataset(config, encoded, form, placement), args.fit_steps, args.rounds
    )
    cached, live = common.median(times["cached"]), common.median(times["live"])
    return [
        common.record(
            "input_fit",
            {"setting": args.setting, "encoder": args.encoder, "size": args.size, "batch": args.batch,
             "jit_compile": jit_compile, "cores": common.usable_cores(), "cpu_flags": cpu_flags(),
             "smoke": args.smoke},
            args.batch / live,
            "images/s",
            live,
            len(times["live"]),
            args.out,
            cached_images_per_s=args.batch / cached,
            live_over_cached=cached / live,
        )
    ]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("host", "fit"))
    parser.add_argument("--encoder", default="resnet50", choices=sorted(presets.ENCODER_PRESETS))
    parser.add_argument("--size", type=int, default=224, help="view size (default 224)")
    parser.add_argument("--source-size", type=int, default=400, help="JPEG width; height is 7/8 of it (default 400)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--count", type=int, default=512, help="distinct JPEGs held in memory (default 512)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per setting and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, settings alternated in each")
    parser.add_argument("--setting", default="decode_crop_device", choices=sorted(SETTINGS), help="(fit)")
    parser.add_argument("--fit-steps", type=int, default=10, help="(fit) timed steps per fit")
    parser.add_argument("--jit", default="auto", choices=("auto", "on", "off"), help="(fit)")
    parser.add_argument("--set", action="append", default=[], help="config override section.field=value")
    parser.add_argument("--config", default=None)
    common.add_common_arguments(parser, reps=None, warmup=2)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.size, args.source_size, args.count = 4, 16, 40, 12
        args.batches, args.rounds, args.warmup, args.fit_steps = 2, 1, 1, 2
        args.encoder = "small_convnet"
    config = presets.load_config(args.encoder, args.batch, args.size, presets.config_overrides(args), args.config)
    keras.utils.set_random_seed(0)
    encoded = jpeg_images(args.count, args.source_size * 7 // 8, args.source_size)
    return host(args, config, encoded) if args.mode == "host" else fit(args, config, encoded)


if __name__ == "__main__":
    main()
