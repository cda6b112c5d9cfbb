"""Ingestion: turns any supported image source into checked, uniform tf.Examples.

Plain functions, no TFX: `byol_tfx.components.example_gen.ImageExampleGen` is a thin adapter over
`ingest`. Every candidate record goes through `check_image` / `check_array`, which decide
*per record*, inside a try/except, whether it is kept as is, kept after conversion to
8-bit RGB, kept after resizing, or dropped with a named reason. Nothing is dropped
silently: `IngestionReport` counts every outcome per split, and `ingest` fails with a
message naming the counts when more than `max_bad_fraction` of the records are dropped.

Output encoding (one for every source, so the trainer decodes all of them alike with
`tf.io.decode_image(channels=3)`): tf.Example {image: bytes, label: int64, height: int64,
width: int64}, the image an 8-bit RGB PNG -- or, when a PNG/JPEG file already is 8-bit
RGB of the right size, its original bytes, so that large JPEG datasets do not grow
five-fold by re-encoding.
"""

import collections
import dataclasses
import io
import json
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image

# Examples splits written by ImageExampleGen, and the byol_tf.data split each comes from.
TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"
SPLITS = (TRAIN_SPLIT, EVAL_SPLIT)
LIBRARY_SPLITS = {TRAIN_SPLIT: "train", EVAL_SPLIT: "test"}

# TFX ExampleGen's layout (tfx/components/example_gen/write_split.py): Split-<name>/
# data_tfrecord-<shard>-of-<n>.gz, GZIP-compressed TFRecords of serialized tf.Examples.
FILE_PREFIX = "data_tfrecord"
REPORT_FILE = "ingestion_report.json"

# Drop reasons. Each names what a user has to fix in their data.
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

_MAX_LISTED_DROPS = 50


class IngestionError(ValueError):
    """Too many bad records, an empty split, or a source that cannot be read at all."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One record as read from a source, before any check.

    Exactly one of `data` (encoded image bytes) and `array` (uint8 pixels) is set, unless
    `drop_reason` is: a reader that already knows the record is bad (an unreadable file,
    an unparseable tf.Example) says so here, so the decision is still counted per record.
    """

    record_id: str
    label: Optional[int]
    data: Optional[bytes] = None
    array: Optional[np.ndarray] = None
    drop_reason: Optional[str] = None
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class RecordResult:
    """The decision for one record.

    Attributes:
        record_id: where the record came from (a file path, `file:index`, `split:index`).
        drop_reason: one of DROP_REASONS, or None when the record is kept.
        detail: a human-readable reason (the decoder's message, the bad label).
        converted_from: the source image mode (e.g. "RGBA", "I;16", "L") when the pixels
            were converted to 8-bit RGB, else None.
        resized_from: (height, width) of the source when it was resized, else None.
        image: the encoded image to write (None when dropped).
        label, height, width: the values to write.
    """

    record_id: str
    drop_reason: Optional[str] = None
    detail: str = ""
    converted_from: Optional[str] = None
    resized_from: Optional[Tuple[int, int]] = None
    image: Optional[bytes] = None
    label: Optional[int] = None
    height: int = 0
    width: int = 0

    @property
    def kept(self) -> bool:
        return self.drop_reason is None

    @property
    def status(self) -> str:
        """'dropped', 'converted', 'resized', 'converted+resized' or 'ok'."""
        if not self.kept:
            return "dropped"
        fixes = [name for name, done in (("converted", self.converted_from), ("resized", self.resized_from)) if done]
        return "+".join(fixes) or "ok"


def check_label(label: Optional[int], num_classes: Optional[int]) -> Tuple[Optional[str], str]:
    """Decides whether a label is usable.

    Args:
        label: the label read from the source; None or -1 means "not given" (byol_tf.data
            uses -1 for unknown labels).
        num_classes: labels must lie in [0, num_classes - 1]; None accepts any label >= 0.

    Returns:
        (drop_reason or None, detail).
    """
    if label is None or label == -1:
        return MISSING_LABEL, "no label"
    if label < 0 or (num_classes is not None and label >= num_classes):
        allowed = f"[0, {num_classes - 1}]" if num_classes is not None else ">= 0"
        return LABEL_OUT_OF_RANGE, f"label {label} is outside {allowed}"
    return None, ""


def check_image(
    record_id: str, data: bytes, label: Optional[int], *, image_size: int, num_classes: Optional[int]
) -> RecordResult:
    """Decides what to do with one encoded image (a file's bytes, a tf.Example's `image`).

    Never raises for bad input: every decoder failure becomes a drop reason.

    Args:
        record_id: a name for the report.
        data: the encoded image.
        label: the record's label, None / -1 when missing.
        image_size: side of the square output image; 0 keeps each image's own size.
        num_classes: labels must lie in [0, num_classes - 1] (None: any label >= 0).

    Returns:
        The decision, with the bytes to write when the record is kept.
    """
    if not data:
        return RecordResult(record_id, EMPTY_FILE, "zero bytes")
    reason, detail = check_label(label, num_classes)
    if reason:
        return RecordResult(record_id, reason, detail)
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:  # Pillow raises several unrelated types for unknown formats.
        return RecordResult(record_id, NOT_AN_IMAGE, _message(error))
    source_format = image.format
    try:
        image.load()  # Image.open reads only the header; truncation shows up here.
        pixels, converted_from = _to_rgb8(image)
    except Exception as error:
        return RecordResult(record_id, CORRUPT_IMAGE, f"{source_format or 'image'}: {_message(error)}")
    result = _finish(record_id, pixels, converted_from, label, image_size)
    if result.converted_from is None and result.resized_from is None and source_format in ("PNG", "JPEG"):
        # Unchanged pixels: keep the original bytes (see the module docstring).
        result = dataclasses.replace(result, image=data)
    return result


def check_array(
    record_id: str, array: Any, label: Optional[int], *, image_size: int, num_classes: Optional[int]
) -> RecordResult:
    """Decides what to do with one decoded image (from byol_tf.data or TFDS).

    Args:
        record_id: a name for the report.
        array: pixels, [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; uint8 or uint16.
        label, image_size, num_classes: as for `check_image`.

    Returns:
        The decision, with PNG bytes when the record is kept.
    """
    reason, detail = check_label(label, num_classes)
    if reason:
        return RecordResult(record_id, reason, detail)
    try:
        array = np.asarray(array)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
            raise ValueError(f"shape {array.shape} is not an image")
        deep = None
        if array.dtype == np.uint16:
            array, deep = _to_uint8(array), "uint16"
        elif array.dtype != np.uint8:
            raise ValueError(f"dtype {array.dtype} is not uint8 or uint16")
        pixels, converted_from = _to_rgb8(Image.fromarray(array))
    except Exception as error:
        return RecordResult(record_id, BAD_ARRAY, _message(error))
    return _finish(record_id, pixels, deep or converted_from, label, image_size)


def _message(error: Exception) -> str:
    text = str(error).replace("\n", " ")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _to_uint8(array: np.ndarray) -> np.ndarray:
    # 16-bit -> 8-bit by rounding v / 257, which maps 0 -> 0 and 65535 -> 255 exactly.
    return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)


def _to_rgb8(image: Image.Image) -> Tuple[np.ndarray, Optional[str]]:
    """Returns uint8 [H, W, 3] pixels and the source mode when a conversion was needed."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8), None
    if mode.startswith("I;16") or mode in ("I", "F"):
        # Pillow's own convert("RGB") clips 16-bit values at 255: scale instead.
        values = np.asarray(image)
        if mode == "F" or values.max(initial=0) > 65535 or values.min(initial=0) < 0:
            low, high = float(values.min()), float(values.max())
            values = (values - low) * (65535.0 / (high - low) if high > low else 0.0)
        gray = _to_uint8(np.clip(values, 0, 65535))
        return np.repeat(gray[..., None], 3, axis=-1), mode
    # L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...: Pillow converts these exactly (alpha dropped).
    return np.asarray(image.convert("RGB"), dtype=np.uint8), mode


def _finish(
    record_id: str, pixels: np.ndarray, converted_from: Optional[str], label: int, image_size: int
) -> RecordResult:
    height, width = pixels.shape[:2]
    resized_from = None
    if image_size and (height, width) != (image_size, image_size):
        pixels = resize_and_center_crop(pixels, image_size)
        resized_from = (height, width)
        height = width = image_size
    return RecordResult(
        record_id,
        converted_from=converted_from,
        resized_from=resized_from,
        image=encode_png(pixels),
        label=int(label),
        height=int(height),
        width=int(width),
    )


def resize_and_center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to `size` (bicubic) and crops the centre square.

    Keeps the aspect ratio, so objects are not squashed; the random resized crop in the
    trainer then works on an image of the configured size.
    """
    height, width = pixels.shape[:2]
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    image = Image.fromarray(pixels).resize((new_width, new_height), Image.Resampling.BICUBIC)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """8-bit PNG bytes of uint8 [H, W, 3] pixels."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def to_tf_example(result: RecordResult) -> bytes:
    """Serialized tf.Example {image, label, height, width} of a kept record."""
    import tensorflow as tf  # deferred: the checks above need no TensorFlow

    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[result.image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[result.label])),
        "height": tf.train.Feature(int64_list=tf.train.Int64List(value=[result.height])),
        "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[result.width])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


# --------------------------------------------------------------------------- report


class IngestionReport:
    """Counts of every per-record decision, per split.

    `counts[split]` holds: total (records read), written, ok (kept unchanged), converted
    and resized (kept after a fix; a record can be both), dropped, and one count per
    drop reason. Converted and resized records are not bad; dropped ones are.
    """

    def __init__(self, **settings: Any):
        self.settings = dict(settings)
        self.counts: Dict[str, collections.Counter] = {split: collections.Counter() for split in SPLITS}
        self.converted_from: Dict[str, collections.Counter] = {split: collections.Counter() for split in SPLITS}
        self.dropped: List[Dict[str, str]] = []

    def add(self, split: str, result: RecordResult):
        counts = self.counts[split]
        counts["total"] += 1
        if not result.kept:
            counts["dropped"] += 1
            counts[result.drop_reason] += 1
            if len(self.dropped) < _MAX_LISTED_DROPS:
                self.dropped.append(
                    {"split": split, "record": result.record_id, "reason": result.drop_reason, "detail": result.detail}
                )
            return
        counts["written"] += 1
        if result.converted_from:
            counts["converted"] += 1
            self.converted_from[split][result.converted_from] += 1
        if result.resized_from:
            counts["resized"] += 1
        if not result.converted_from and not result.resized_from:
            counts["ok"] += 1

    def totals(self) -> collections.Counter:
        total = collections.Counter()
        for counts in self.counts.values():
            total.update(counts)
        return total

    @property
    def bad_fraction(self) -> float:
        totals = self.totals()
        return totals["dropped"] / totals["total"] if totals["total"] else 0.0

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict: settings, per-split and total counts, the first drops."""

        def full(counts):
            keys = ("total", "written", "ok", "converted", "resized", "dropped")
            return {
                **{key: counts[key] for key in keys},
                "dropped_by_reason": {reason: counts[reason] for reason in DROP_REASONS if counts[reason]},
            }

        return {
            "settings": self.settings,
            "splits": {
                split: {**full(self.counts[split]), "converted_from": dict(self.converted_from[split])}
                for split in SPLITS
            },
            "total": full(self.totals()),
            "bad_fraction": self.bad_fraction,
            "first_dropped_records": self.dropped,
        }

    def summary(self) -> str:
        """A few lines for the component's log."""
        lines = ["Ingestion report:"]
        for split in SPLITS:
            c = self.counts[split]
            reasons = ", ".join(f"{r}={c[r]}" for r in DROP_REASONS if c[r]) or "none"
            converted = ", ".join(f"{m}={n}" for m, n in sorted(self.converted_from[split].items())) or "none"
            lines.append(
                f"  {split}: read {c['total']}, written {c['written']} (ok {c['ok']}, converted {c['converted']}"
                f" [{converted}], resized {c['resized']}), dropped {c['dropped']} [{reasons}]"
            )
        lines.append(f"  bad fraction {self.bad_fraction:.2%}")
        return "\n".join(lines)

    def write(self, path: str):
        import tensorflow as tf  # gfile: the report may live on GCS

        with tf.io.gfile.GFile(path, "w") as stream:
            stream.write(json.dumps(self.to_dict(), indent=2, sort_keys=False))

    def check(self, max_bad_fraction: float, report_path: str = ""):
        """Raises IngestionError if too many records were dropped or a split is empty."""
        totals = self.totals()
        if totals["total"] == 0:
            raise IngestionError("ingestion read no records at all: check the source settings")
        if self.bad_fraction > max_bad_fraction:
            reasons = ", ".join(f"{r}={totals[r]}" for r in DROP_REASONS if totals[r])
            first = "; ".join(f"{d['record']} ({d['reason']}: {d['detail']})" for d in self.dropped[:3])
            where = f" Full report: {report_path}." if report_path else ""
            raise IngestionError(
                f"ingestion dropped {totals['dropped']} of {totals['total']} records ({self.bad_fraction:.2%}),"
                f" more than max_bad_fraction={max_bad_fraction:.2%}: {reasons}. First: {first}.{where}"
                " Fix or remove these records, or raise max_bad_fraction."
            )
        for split in SPLITS:
            if self.counts[split]["written"] == 0:
                raise IngestionError(
                    f"split {split!r} has no records after ingestion ({self.counts[split]['total']} read):"
                    " the pipeline needs both 'train' and a held-out 'eval' split (holdout_examples > 0)"
                )


# --------------------------------------------------------------------------- sources


def holdout_split(count: int, holdout: int, seed: int, max_examples: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Indices of train and eval in a seeded shuffle of `count` records.

    The same rule as byol_tf.data's "train" / "test" split, so a pipeline and
    `byol-tf train` hold out the same images: shuffle with numpy's default_rng(seed),
    keep the first `max_examples`, and hold out the *last* `holdout` of them. Indices are
    then sorted so that reading stays sequential.
    """
    order = np.random.default_rng(seed).permutation(count)
    if max_examples is not None:
        order = order[:max_examples]
    if holdout == 0:
        raise IngestionError("holdout_examples is 0 and no eval_split is set, so there is no eval split")
    if holdout >= len(order):
        raise IngestionError(
            f"holdout_examples={holdout} leaves none of the {len(order)} records for pretraining"
            " (lower holdout_examples or raise max_examples)"
        )
    cut = len(order) - holdout
    return {TRAIN_SPLIT: np.sort(order[:cut]), EVAL_SPLIT: np.sort(order[cut:])}


def list_folder(path: str, class_names: Optional[List[str]] = None):
    """Lists a folder of class sub-folders, every file included.

    Class ids are the positions of the sorted sub-folder names (or of `class_names`, for
    a held-out folder), as in byol_tf.data. Files whose extension byol_tf.data does not
    read (notes.txt, .DS_Store) are returned apart, so that they are reported rather than
    skipped without a word, while the split of the image files stays the library's.

    Returns:
        (files, others, class_names): `files` as (path, label) in byol_tf.data's order
        (class by class, sorted paths; label -1 in a folder without class folders);
        `others` as (path, drop reason, detail) for the files byol_tf.data skips.
    """
    import tensorflow as tf  # gfile: folders may live on GCS

    from byol_tf import data as data_lib

    if not tf.io.gfile.isdir(path):
        raise IngestionError(f"image folder {path!r} does not exist")
    entries = sorted(entry.rstrip("/") for entry in tf.io.gfile.listdir(path))
    found = [entry for entry in entries if tf.io.gfile.isdir(os.path.join(path, entry))]
    names = found if class_names is None else class_names
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise IngestionError(f"class folders {unknown} of {path!r} are not among the training classes {names}")
    files: List[Tuple[str, int]] = []
    others: List[Tuple[str, str, str]] = []

    def add(file_path, label):
        if not file_path.lower().endswith(data_lib.IMAGE_EXTENSIONS):
            others.append((file_path, NOT_AN_IMAGE, "not an image file extension"))
        elif label is None:
            others.append((file_path, MISSING_LABEL, "file outside the class folders"))
        else:
            files.append((file_path, label))

    for label, class_name in enumerate(names):
        class_dir = os.path.join(path, class_name)
        if tf.io.gfile.isdir(class_dir):
            for root, _, filenames in tf.io.gfile.walk(class_dir):
                for filename in sorted(filenames):
                    add(os.path.join(root, filename), label)
    for entry in entries:
        if entry not in found:
            # No class folders at all: an unlabelled folder (label -1, dropped as missing).
            add(os.path.join(path, entry), None if found else -1)
    return files, others, names


def _read_file(path: str, label: Optional[int], record_id: str) -> Candidate:
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path, "rb") as stream:
            return Candidate(record_id, label, data=stream.read())
    except Exception as error:  # a permissions problem or a vanished file is one bad record
        return Candidate(record_id, label, drop_reason=UNREADABLE_FILE, detail=_message(error))


def _folder_candidates(settings) -> Tuple[Dict[str, Iterator[Candidate]], int]:
    files, others, class_names = list_folder(settings.path)
    if settings.eval_split:
        eval_files, eval_others, _ = list_folder(settings.eval_split, class_names)
        others = others + eval_others
        if settings.max_examples is not None:
            # As byol_tf.data: a seeded sample, not the first files (the first classes).
            chosen = np.sort(np.random.default_rng(settings.seed).permutation(len(files))[: settings.max_examples])
            files = [files[i] for i in chosen]
            chosen = np.sort(np.random.default_rng(settings.seed).permutation(len(eval_files))[: settings.max_examples])
            eval_files = [eval_files[i] for i in chosen]
        split_files = {TRAIN_SPLIT: files, EVAL_SPLIT: eval_files}
    else:
        indices = holdout_split(len(files), settings.holdout_examples, settings.seed, settings.max_examples)
        split_files = {split: [files[i] for i in indices[split]] for split in SPLITS}

    def read(split):
        for path, label in split_files[split]:
            yield _read_file(path, label, path)
        if split == TRAIN_SPLIT:
            # Files byol_tf.data would skip by extension: reported, never silently ignored.
            for path, reason, detail in others:
                yield Candidate(path, None, drop_reason=reason, detail=detail)

    return {split: read(split) for split in SPLITS}, settings.num_classes or len(class_names) or None


def _tfrecord_files(pattern: str) -> List[str]:
    from byol_tf import data

    try:
        return data.tfrecord_files(pattern, "path")
    except ValueError as error:
        raise IngestionError(str(error)) from None


def _iterate_tfrecords(files: List[str]) -> Iterator[Tuple[str, Optional[bytes], str]]:
    """Yields (record_id, serialized record or None, error detail) for every record.

    Files are read one after the other in sorted order. A file that is corrupt partway
    (bad CRC, truncated) yields one None entry and reading moves on to the next file,
    instead of failing the run deep inside tf.data.
    """
    import tensorflow as tf

    from byol_tf import data

    for path in files:
        index = 0
        try:
            compression = "GZIP" if data.is_gzip(path) else ""
            for record in tf.data.TFRecordDataset(path, compression_type=compression).as_numpy_iterator():
                yield f"{path}:{index}", record, ""
                index += 1
        except Exception as error:
            yield f"{path}:{index}", None, _message(error)


def _parse_tf_example(record_id: str, record: Optional[bytes], detail: str) -> Candidate:
    import tensorflow as tf

    if record is None:
        return Candidate(record_id, None, drop_reason=CORRUPT_TFRECORD_FILE, detail=detail)
    try:
        example = tf.train.Example.FromString(record)
    except Exception as error:
        return Candidate(record_id, None, drop_reason=UNPARSEABLE_RECORD, detail=_message(error))
    feature = example.features.feature
    label = None
    if "label" in feature and feature["label"].int64_list.value:
        label = int(feature["label"].int64_list.value[0])
    if "image" not in feature or not feature["image"].bytes_list.value:
        return Candidate(record_id, label, drop_reason=MISSING_IMAGE, detail="no 'image' bytes feature")
    return Candidate(record_id, label, data=feature["image"].bytes_list.value[0])


def _tfrecord_candidates(settings) -> Dict[str, Iterator[Candidate]]:
    def read(files, wanted=None, limit=None):
        for index, entry in enumerate(_iterate_tfrecords(files)):
            if limit is not None and index >= limit:
                return
            if wanted is None or index in wanted:
                yield _parse_tf_example(*entry)

    files = _tfrecord_files(settings.path)
    if settings.eval_split:
        eval_files = _tfrecord_files(settings.eval_split)
        limit = settings.max_examples
        return {TRAIN_SPLIT: read(files, limit=limit), EVAL_SPLIT: read(eval_files, limit=limit)}
    # A first pass counts records, so that the split holds indices in memory, not images.
    # As in byol_tf.data, max_examples keeps the first records of the stream.
    count = sum(1 for _ in _iterate_tfrecords(files))
    if settings.max_examples is not None:
        count = min(count, settings.max_examples)
    indices = holdout_split(count, settings.holdout_examples, settings.seed)
    return {split: read(files, wanted=set(indices[split].tolist()), limit=count) for split in SPLITS}


def _library_candidates(settings) -> Dict[str, Iterator[Candidate]]:
    """mnist5k / digits / tfds through byol_tf.data, so the split is the library's own."""
    from byol_tf import data as data_lib

    data_config = settings

    def read(split):
        dataset = data_lib.load_split(data_config, LIBRARY_SPLITS[split])
        for index, element in enumerate(dataset.as_numpy_iterator()):
            yield Candidate(f"{split}:{index}", int(element["label"]), array=element["image"])

    return {split: read(split) for split in SPLITS}


def candidates(settings) -> Tuple[Dict[str, Iterator[Candidate]], Optional[int]]:
    """Candidate records of each split of a source, and the number of classes if known.

    Args:
        settings: the config's `data` section (`byol_tf.config.DataConfig`).

    Raises:
        IngestionError: the source as a whole cannot be read (missing folder, no files).
    """
    if settings.source == "folder":
        return _folder_candidates(settings)
    if settings.source == "tfrecord":
        return _tfrecord_candidates(settings), settings.num_classes
    from byol_tf import data as data_lib

    return _library_candidates(settings), data_lib.num_classes(settings)


def check_candidate(candidate: Candidate, *, image_size: int, num_classes: Optional[int]) -> RecordResult:
    """Routes a candidate to `check_image` or `check_array`."""
    if candidate.drop_reason:
        return RecordResult(candidate.record_id, candidate.drop_reason, candidate.detail)
    if candidate.array is not None:
        return check_array(
            candidate.record_id, candidate.array, candidate.label, image_size=image_size, num_classes=num_classes
        )
    return check_image(
        candidate.record_id, candidate.data or b"", candidate.label, image_size=image_size, num_classes=num_classes
    )


def source_fingerprint(source: str, path: Optional[str] = None, eval_split: Optional[str] = None) -> str:
    """A short hash of the names, sizes and modification times of a source's files.

    TFX caches ImageExampleGen on its parameters alone, so a folder or TFRecord source
    whose files changed would be served from the cache. Passing this value as
    ImageExampleGen's `source_fingerprint` parameter (computed by the runner, which owns
    the paths) makes any change to the files a cache miss. Sources inside installed
    packages (mnist5k, digits) and TFDS (versioned) return "".
    """
    import hashlib

    import tensorflow as tf

    if source not in ("folder", "tfrecord"):
        return ""
    digest = hashlib.sha256()
    for location in (path, eval_split):
        if not location:
            continue
        if source == "folder" or tf.io.gfile.isdir(location):
            files = [os.path.join(root, name) for root, _, names in tf.io.gfile.walk(location) for name in names]
        else:
            files = tf.io.gfile.glob(location)
        for name in sorted(files):
            stat = tf.io.gfile.stat(name)
            digest.update(f"{name}\0{stat.length}\0{stat.mtime_nsec}\n".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- writing


def split_file_pattern(examples_uri: str, split: str) -> str:
    """Glob of the TFRecord files of one split of an Examples artifact."""
    return os.path.join(examples_uri, f"Split-{split}", "*")


def write_split(path: str, results: Iterable[RecordResult], report: IngestionReport, split: str, num_shards: int = 1):
    """Writes kept records as GZIP TFRecords, `num_shards` files, and counts every record."""
    import tensorflow as tf

    tf.io.gfile.makedirs(path)
    names = [os.path.join(path, f"{FILE_PREFIX}-{i:05d}-of-{num_shards:05d}.gz") for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(name, options="GZIP") for name in names]
    try:
        written = 0
        for result in results:
            report.add(split, result)
            if result.kept:
                writers[written % num_shards].write(to_tf_example(result))
                written += 1
    finally:
        for writer in writers:
            writer.close()


def ingest(
    config,
    examples_uri: str,
    report_path: str,
    *,
    max_bad_fraction: float = 0.01,
    num_shards: int = 1,
) -> IngestionReport:
    """Reads a source, checks every record, writes train/eval tf.Examples and a report.

    Args:
        config: the experiment (`byol_tf.config.Config`): its `data` section names the source
            and the split, `augment.image_size` the size of the images written.
        examples_uri: the Examples artifact's folder; splits go to Split-train/ and
            Split-eval/ as TFX's ExampleGen lays them out.
        report_path: where the JSON report goes (written also when the run then fails).
        max_bad_fraction: fail when more than this fraction of all records is dropped.
        num_shards: files per split (more lets Beam read in parallel).

    Returns:
        The report.

    Raises:
        IngestionError: too many bad records, an empty split, or an unreadable source.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise IngestionError(f"max_bad_fraction={max_bad_fraction} must lie in [0, 1]")
    if num_shards < 1:
        raise IngestionError(f"num_shards={num_shards} must be at least 1")
    from byol_tf import config as config_lib

    settings, image_size = config.data, config.augment.image_size
    generators, num_classes = candidates(settings)
    report = IngestionReport(
        **config_lib.to_dict(config)["data"],
        image_size=image_size,
        num_classes_used=num_classes,
        max_bad_fraction=max_bad_fraction,
    )
    for split in SPLITS:
        results = (
            check_candidate(candidate, image_size=image_size, num_classes=num_classes)
            for candidate in generators[split]
        )
        write_split(os.path.join(examples_uri, f"Split-{split}"), results, report, split, num_shards)
    report.write(report_path)
    print(report.summary(), flush=True)
    report.check(max_bad_fraction, report_path)
    return report
