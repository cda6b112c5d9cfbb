"""ResNet-50 224 px BYOL on one GPU: step-only versus end to end from JPEG TFRecords.

    python benchmarks/device/end_to_end.py --out benchmarks/results/gpu-e2e.jsonl
    python benchmarks/device/end_to_end.py --smoke          # seconds, on CPU (tests)

Writes a TFRecord set of synthetic natural-ish JPEGs of about 400 x 350 (generated here, no
downloads) to a temporary folder, then alternates two `fit` runs of the same compiled model
(XLA + mixed_bfloat16 unless --jit / --precision say otherwise):
- `step_only`: batches made beforehand and replayed from memory (no input cost);
- `end_to_end`: `data.make_pretraining_dataset` on the TFRecords as `byol-tf train` builds it:
  decode-and-crop, augmentation placed on the device (`augment.placement: device`).
Prints one `machine` record and one `end_to_end` JSON record: end-to-end images/s, with the
step-only figure and their ratio beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import common  # noqa: E402

common.quiet_tensorflow()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import input_pipeline, input_speed, presets, tfmodel  # noqa: E402
from byol_tf import data  # noqa: E402


def write_records(directory: str, count: int, width: int, files: int = 8) -> str:
    """`count` JPEG tf.Examples ("image", "label") in `files` TFRecord files; returns their glob."""
    images = input_speed.jpeg_images(count, width * 7 // 8, width)
    for index in range(files):
        with tf.io.TFRecordWriter(os.path.join(directory, f"train-{index:05d}.tfrecord")) as writer:
            for number, encoded in enumerate(images[index::files]):
                feature = {
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[number % 10])),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return os.path.join(directory, "train-*.tfrecord")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="resnet50", choices=sorted(presets.ENCODER_PRESETS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--count", type=int, default=4096, help="JPEGs written (default 4096)")
    parser.add_argument("--source-size", type=int, default=400, help="JPEG width; height 7/8 of it")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per fit")
    parser.add_argument("--rounds", type=int, default=2, help="step_only / end_to_end alternations")
    parser.add_argument("--jit", default="on", choices=("auto", "on", "off"))
    parser.add_argument("--precision", default="mixed_bfloat16")
    parser.add_argument("--placement", default="device", choices=("auto", "host", "device"))
    parser.add_argument("--set", action="append", default=[], help="config override section.field=value")
    parser.add_argument("--config", default=None)
    common.add_common_arguments(parser, reps=None, warmup=2)
    args = parser.parse_args(argv)
    if args.smoke:
        args.encoder, args.size, args.batch, args.count, args.source_size = "small_convnet", 16, 8, 32, 48
        args.steps, args.rounds, args.jit, args.precision = 2, 1, "off", "float32"
    common.record("machine", common.machine(), common.usable_cores(), "cores", None, 1, args.out)
    keras.utils.set_random_seed(0)
    with tempfile.TemporaryDirectory(prefix="byol-e2e-") as directory:
        pattern = write_records(directory, args.count, args.source_size)
        overrides = [
            "data.source=tfrecord", f"data.path={pattern}", "data.name=null", "data.eval_split=null",
            "data.holdout_examples=0", "data.max_examples=null", f"data.shuffle_buffer={min(args.count, 10000)}",
            f"data.check_cache_dir={directory}/check", f"augment.placement={args.placement}",
            *presets.config_overrides(args),
        ]
        config = presets.load_config(args.encoder, args.batch, args.size, overrides, args.config)
        jit_compile = tfmodel.jit_setting(config, args.jit)
        times = input_pipeline.fit_live_versus_cached(
            config, jit_compile, lambda: data.make_pretraining_dataset(config), args.steps, args.rounds,
            precision=args.precision,
        )
    step_only, end_to_end = common.median(times["cached"]), common.median(times["live"])
    return common.record(
        "end_to_end",
        {"encoder": args.encoder, "size": args.size, "batch": args.batch, "jit_compile": jit_compile,
         "precision": args.precision, "placement": args.placement, "accelerator": tfmodel.accelerator(),
         "source_size": args.source_size, "images": args.count, "cpu_flags": input_speed.cpu_flags(),
         "smoke": args.smoke},
        args.batch / end_to_end,
        "images/s",
        end_to_end,
        len(times["live"]),
        args.out,
        step_only_images_per_s=args.batch / step_only,
        end_to_end_over_step_only=step_only / end_to_end,
    )


if __name__ == "__main__":
    main()
