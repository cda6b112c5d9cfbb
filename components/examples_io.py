"""Reading a TFX `Examples` artifact (image tf.Examples from ImageExampleGen) with `byol_tf.data`.

The Trainer and LinearEval stream a split through `tf.data`, decoding records with
`byol_tf.data.parse_example` (the decoder of `byol-tf train`), so the pipeline and
`byol-tf train` read images the same way. Images have any size: ImageExampleGen keeps them
at full resolution, and `byol_tf.data` crops each one to the encoder's input size.
The features are ImageExampleGen's `image` and `label`; files from ImportExampleGen may use
the other common names too (`image/encoded`, `image/class/label`: `byol_tf.sources`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import tensorflow as tf
from tfx.types import standard_artifact_utils

from byol_tf import data, sources
from byol_tf.config import DataConfig


def split_file_patterns(examples, split: str) -> list[str]:
    """File patterns of one split of an `Examples` artifact (as the Trainer's `fn_args.train_files`)."""
    uri = standard_artifact_utils.get_split_uri([examples], split)
    return [os.path.join(uri, "*")]


def record_files(file_patterns: Sequence[str]) -> list[str]:
    """The sorted files matching `file_patterns`.

    Raises:
        ValueError: no file matches.
    """
    files = sorted({name for pattern in file_patterns for name in tf.io.gfile.glob(pattern)})
    if not files:
        raise ValueError(f"no TFRecord file matches {list(file_patterns)!r}")
    return files


def records(file_patterns: Sequence[str]) -> tf.data.Dataset:
    """Serialized records of the files, in sorted file order.

    The compression is recognised by content (`byol_tf.sources.compression_type`: TFX writes
    `*.gz`, other tools may not name it); all files of a split are compressed alike, as every
    ExampleGen writes them.
    """
    files = record_files(file_patterns)
    return tf.data.TFRecordDataset(files, compression_type=sources.compression_type(files[0]))


def record_keys(file_patterns: Sequence[str]) -> sources.RecordKeys:
    """The image and label features of the records, from the first one (`byol_tf.sources.resolve_keys`).

    Raises:
        ValueError: the first record has no image feature (its features listed).
    """
    files = record_files(file_patterns)
    record = sources.first_record(files)
    if record is None:
        raise ValueError(f"no readable record in {list(file_patterns)!r}")
    return sources.resolve_keys(DataConfig(source="tfrecord", path=files[0]), sources.feature_names(record), files[0])


def image_dataset(
    file_patterns: Sequence[str],
    image_shape: tuple[int, int, int] | None = None,
    num_parallel_calls: int = tf.data.AUTOTUNE,
) -> tf.data.Dataset:
    """Unbatched {"image": uint8 [H, W, 3], "label": int64} from tf.Example TFRecord files.

    Args:
        file_patterns: globs of the files (e.g. the Trainer's `fn_args.train_files`).
        image_shape: when every image has this shape (`summarize_split`), it is set on the
            elements, so `byol_tf.data.pretraining_dataset` can batch before augmenting;
            None for images of different sizes (cropped one by one).
        num_parallel_calls: parallelism of the decoding map.
    """
    keys = record_keys(file_patterns)

    def parse(serialized):
        example = data.parse_example(serialized, keys.image, keys.label)
        if image_shape is not None:
            example["image"] = tf.ensure_shape(example["image"], image_shape)
        return example

    return records(file_patterns).map(parse, num_parallel_calls=num_parallel_calls)


@dataclasses.dataclass(frozen=True)
class SplitSummary:
    """What a split holds, read from the int64 features only (no image is decoded).

    Attributes:
        num_examples: records in the split.
        num_classes: max label + 1 (0 when no record has a label).
        image_shape: (height, width, 3) when every record has the same `height` and
            `width` features (e.g. the embedded 28 x 28 digits), else None.
    """

    num_examples: int
    num_classes: int
    image_shape: tuple[int, int, int] | None


def summarize_split(file_patterns: Sequence[str]) -> SplitSummary:
    """Counts records, classes and image sizes of a split (cheap next to decoding images)."""
    label = record_keys(file_patterns).label or "label"
    spec = {name: tf.io.FixedLenFeature([], tf.int64, default_value=-1) for name in (label, "height", "width")}

    def parse(serialized):
        features = tf.io.parse_single_example(serialized, spec)
        return {"label": features[label], "height": features["height"], "width": features["width"]}

    features = records(file_patterns).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    big = tf.constant(np.iinfo(np.int64).max, tf.int64)
    small = tf.constant(-1, tf.int64)
    initial = (tf.constant(0, tf.int64), small, big, small, big, small)

    def add(state, example):
        count, top, min_h, max_h, min_w, max_w = state
        return (
            count + 1,
            tf.maximum(top, example["label"]),
            tf.minimum(min_h, example["height"]),
            tf.maximum(max_h, example["height"]),
            tf.minimum(min_w, example["width"]),
            tf.maximum(max_w, example["width"]),
        )

    count, top, min_h, max_h, min_w, max_w = (int(value) for value in features.reduce(initial, add))
    fixed = count > 0 and min_h == max_h > 0 and min_w == max_w > 0
    return SplitSummary(count, top + 1, (min_h, min_w, 3) if fixed else None)
